"""``tinygptv eval BENCHMARK --data DIR``: run a model on a benchmark from its official files, or
score a predictions file, with the paper's pinned protocol and the benchmark's official metric."""

from __future__ import annotations

from .options import add_model_options, load_model_from_args

BENCHMARK_NAMES = (
    "gqa", "vsr", "iconqa", "vizwiz", "hm", "okvqa", "vqav2",
    "refcoco", "refcoco+", "refcocog", "coco-caption", "shapes",
)  # fmt: skip
# The same names as tinygptv.eval.BENCHMARKS, listed here so that `--help` imports nothing.


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate on a benchmark (GQA, VSR, IconQA, VizWiz, HM, OK-VQA, VQAv2, RefCOCO/+/g, COCO, shapes)",
        description="Run a model on a benchmark read from its official files (layouts: README, "
        "'Evaluation'), greedy with the paper's prompts, and score it with the benchmark's official "
        "metric. Writes OUT/predictions.jsonl (appended as answers come: a re-run resumes) and "
        "OUT/result.json. With --predictions, scores an existing predictions file instead.",
    )
    p.add_argument("benchmark", choices=BENCHMARK_NAMES, help="the benchmark")
    p.add_argument("--data", required=True, help="folder with the benchmark's files in their official layout")
    p.add_argument(
        "--split", default=None, help="split (default: the one the paper reports; all for RefCOCO and shapes)"
    )
    p.add_argument("--images", default=None, help="image folder, when not where the layout puts it")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions (of each split / task)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per batch (default 8)")
    p.add_argument("--out", default=None, help="output folder (default eval-results/BENCHMARK[-SPLIT])")
    p.add_argument(
        "--predictions",
        metavar="FILE",
        default=None,
        help='score this JSON / JSONL file of {"question_id", "answer"} instead of running a model',
    )
    p.add_argument(
        "--iou-threshold",
        type=float,
        default=0.5,
        help="a box is right when IoU > this (RefCOCO, shapes; default 0.5, the authors')",
    )
    p.add_argument(
        "--tasks", nargs="+", default=None, help="shapes tasks (default: vqa refer identify caption grounding)"
    )
    p.add_argument("--overwrite", action="store_true", help="discard the predictions already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval import get_benchmark
    from ..eval.runner import run_benchmark, score_predictions_file
    from ..inference import BUILTIN_NAME

    settings = {}
    if args.benchmark.startswith("refcoco") or args.benchmark == "shapes":
        settings["iou_threshold"] = args.iou_threshold
    if args.benchmark == "shapes" and args.tasks:
        settings["tasks"] = args.tasks
    elif args.tasks:
        raise ValueError("--tasks is for the shapes benchmark only")
    out = args.out or f"eval-results/{args.benchmark}" + (f"-{args.split}" if args.split else "")
    if args.predictions:
        benchmark = get_benchmark(args.benchmark, **settings)
        result = score_predictions_file(
            benchmark, args.data, args.predictions, out, args.split, args.limit, args.images
        )
    else:
        model = load_model_from_args(args)
        if args.benchmark == "shapes":
            settings["image_size"] = model.config.vision.image_size
        benchmark = get_benchmark(args.benchmark, **settings)
        result = run_benchmark(
            benchmark,
            args.data,
            model,
            out,
            model_name=args.model or BUILTIN_NAME,
            split=args.split,
            limit=args.limit,
            batch_size=args.batch_size,
            images=args.images,
            template=args.template,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    print_result(result)
    print(f"wrote {out}/result.json and {out}/predictions.jsonl")
    return 0


def print_result(result: dict) -> None:
    split = f" ({result['split']})" if result.get("split") else ""
    print(f"{result['benchmark']}{split}: n={result['n']}, model {result['model']}")
    if result["benchmark"] == "shapes":
        from ..eval.shapes import format_shapes_table, shapes_summary

        metrics = result["metrics"]
        splits = list(dict.fromkeys(k.split("_", 1)[1].split("/")[0] for k in metrics if k.startswith("n_")))
        tasks = list(dict.fromkeys(k.split("/", 1)[1] for k in metrics if k.startswith("n_")))
        print(format_shapes_table(shapes_summary(metrics, splits, tasks)))
        print(f"overall: {metrics['accuracy']}")
        return
    for key, value in result["metrics"].items():
        if isinstance(value, float):
            print(f"  {key}: {value:.2f}")
        elif value is not None and not isinstance(value, dict):
            print(f"  {key}: {value}")
