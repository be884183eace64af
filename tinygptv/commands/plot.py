"""``tinygptv plot RUN_DIR``: draw a training run's loss curve to a PNG."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plot",
        help="draw a run's loss curve (RUN_DIR/loss.png)",
        description="Read RUN_DIR/metrics.jsonl and draw the training loss, the validation loss and "
        "the learning rate against the step into a PNG (RUN_DIR/loss.png unless --out).",
    )
    p.add_argument("run_dir", help="a training run directory (the out_dir of `tinygptv train`)")
    p.add_argument("--out", help="where to write the PNG")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train_log import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0
