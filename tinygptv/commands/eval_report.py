"""``tinygptv eval-report RESULTS...``: our results beside the paper's Table 2, as a markdown table."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval-report",
        help="print eval results beside the paper's Table 2 (markdown)",
        description="Read result.json files (or folders holding one) written by `tinygptv eval` and print "
        "a markdown table: GQA, VSR, IconQA, VizWiz and Hateful Memes against the paper's Table 2 "
        "(TinyGPT-V, Phi-2), then every other benchmark given; one column per model.",
    )
    p.add_argument("results", nargs="+", help="result.json files or the --out folders of `tinygptv eval`")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval.report import load_results, report_table

    print(report_table(load_results(args.results)))
    return 0
