"""``tinygptv ablate RECIPE_DIR --out DIR``: the paper's Table 4 on the micro model."""

from __future__ import annotations


def register(subparsers) -> None:
    from .train import accept_late_overrides

    from ..recipes.micro import ABLATIONS

    p = subparsers.add_parser(
        "ablate",
        help="the paper's Table 4 on the micro model: the four stages without LoRA, input LayerNorm, RMSNorm or QK norm",
        description="Run the four micro stages (configs/micro) once per variant on the frozen parts of a "
        "finished `tinygptv recipe micro` run, with each of TinyGPT-V's changes removed, and print the "
        "final loss of every stage (or where the trainer stopped the run: NaN/Inf, vanished gradients) "
        "and the test accuracy after stage 4, as a markdown table. Results go to --out/ablation.json "
        "and --out/ablation.md.",
    )
    p.add_argument("recipe_dir", help="the --out folder of `tinygptv recipe micro` (its world, tokenizer, lm, vision)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--only", action="append", choices=list(ABLATIONS), default=None, metavar="VARIANT",
        help=f"run only these rows (repeatable): {', '.join(ABLATIONS)}",
    )
    p.add_argument("--seed", type=int, default=None, help="seed (default 0, as the recipe)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    p.add_argument("--no-eval", action="store_true", help="skip the accuracy after stage 4")
    p.add_argument("--configs", default=None, help="folder of the stage configs (default: configs/micro of the source tree)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings applied to every stage config")
    p.set_defaults(func=run)
    accept_late_overrides(p)


def run(args) -> int:
    from ..recipes.micro import format_ablation, run_ablation
    from .recipe import recipe_from_args

    results = run_ablation(
        args.recipe_dir,
        args.out,
        recipe_from_args(args),
        configs_dir=args.configs,
        variants=args.only,
        stage_overrides=args.overrides,
        evaluate_final=not args.no_eval,
        log=lambda message: print(message, flush=True),
    )
    print(format_ablation(results))
    return 0
