"""``tinygptv recipe micro --out DIR``: the whole micro recipe, from nothing to a finished model."""

from __future__ import annotations


def register(subparsers) -> None:
    from .train import accept_late_overrides

    p = subparsers.add_parser(
        "recipe",
        help="run a whole training recipe (micro: the built-in model, from nothing, on the CPU)",
        description="Run every phase of a recipe into --out. micro: make the shapes world, train its "
        "tokenizer, pretrain the tiny language model and the tiny vision encoder + Q-Former, anneal the "
        "language model (its embeddings frozen), then the "
        "four TinyGPT-V stages (configs/micro/stage{1..4}.yaml) with an evaluation after each; the "
        "finished model is --out/model (LoRA merged). Times, losses and accuracies go to "
        "--out/report.json and --out/report.md. The same --seed gives the same weights on the same "
        "machine with the same --threads and --processes.",
    )
    p.add_argument("name", choices=["micro"], help="the recipe")
    p.add_argument("--out", required=True, help="output folder (must not hold an earlier run, unless --resume)")
    p.add_argument("--seed", type=int, default=None, help="seed of everything (default 0)")
    p.add_argument("--configs", default=None, help="folder of the stage configs (default: configs/micro of the source tree)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1; results repeat only for the same count)")
    p.add_argument(
        "--processes", type=int, default=None,
        help="processes sharing every training phase (default 2: one per core of a 2-core machine; results repeat only for the same count)",
    )
    p.add_argument(
        "--set", dest="recipe_settings", action="append", default=[], metavar="KEY=VALUE",
        help="a setting of the recipe itself (MicroRecipe; dotted for the pretraining loops), repeatable: "
        "--set lm.steps=1500 --set lm.drill_short_prompts=true --set template_tokens=true",
    )
    p.add_argument(
        "--resume", action="store_true",
        help="continue a run that stopped in --out: finished phases are loaded, a cut-short stage continues from its "
        "last checkpoint (same recipe settings required; the model is the one an uninterrupted run writes)",
    )
    p.add_argument(
        "--reuse", default=None, metavar="RUN",
        help="take the finished phases of an earlier run (its --out) that this recipe would repeat exactly "
        "(world, tokenizer, language model, vision, base, in order, up to the first whose settings differ) "
        "instead of rerunning them; the stages always run",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after each stage")
    p.add_argument("--progress", action="store_true", help="progress bars during the stages")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="settings of every stage config (e.g. epochs=1), or of one as stageN.key=value (stage4.iters_per_epoch=500)"
    )
    p.set_defaults(func=run)
    accept_late_overrides(p)


def recipe_from_args(args):
    """The default :class:`~tinygptv.recipes.micro.MicroRecipe` with ``--seed`` / ``--threads`` / ``--processes`` applied."""
    from ..recipes.micro import MicroRecipe

    recipe = MicroRecipe()
    if args.seed is not None:
        recipe.seed = args.seed
    if args.threads is not None:
        recipe.threads = args.threads
    if getattr(args, "processes", None) is not None:
        if args.processes < 1:
            raise ValueError(f"--processes must be at least 1, got {args.processes}")
        recipe.processes = args.processes
    for pair in getattr(args, "recipe_settings", None) or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {pair!r}")
        recipe.set(key.strip(), value.strip())
    return recipe


def run(args) -> int:
    from ..recipes.micro import run_micro_recipe

    recipe = recipe_from_args(args)
    run_micro_recipe(
        args.out,
        recipe,
        configs_dir=args.configs,
        stage_overrides=args.overrides,
        evaluate_stages=not args.no_eval,
        progress=args.progress,
        log=print,
        resume=args.resume,
        reuse=args.reuse,
    )
    return 0
