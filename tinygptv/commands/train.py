"""``tinygptv train CONFIG [key=value ...]``: train one stage, or ``--stages 1-4`` in a chain."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a stage (or a chain of stages) from a YAML config",
        description="Train one TinyGPT-V stage from a YAML file of settings (see configs/), with "
        "key=value overrides (e.g. data.root=DIR epochs=2). With --stages A-B, CONFIG is a directory "
        "holding stage1.yaml .. stage4.yaml and each stage starts from the previous one's run. "
        "Under `torchrun --nproc-per-node N -m tinygptv train ...` the run is distributed (DDP, or "
        "FSDP with distributed=fsdp).",
    )
    p.add_argument("config", help="YAML file of settings, or with --stages a directory of stage{N}.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the file's")
    p.add_argument("--stages", help="run stages A-B in order (e.g. 1-4), chaining each to the previous one")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed run from its last checkpoint (finished stages are skipped)",
    )
    p.set_defaults(func=run)
    accept_late_overrides(p)


def accept_late_overrides(p) -> None:
    """Let ``key=value`` overrides (a positional ``overrides`` list) also follow the options.

    argparse hands key=value words that follow an option (``DIR --stages 1-4 data.root=X``) back
    as unrecognised; collect them as overrides, so that they may come before or after the options.
    """
    parse_known_args = p.parse_known_args

    def parse_known_args_with_late_overrides(args=None, namespace=None):
        parsed, rest = parse_known_args(args, namespace)
        late = [a for a in rest if "=" in a and not a.startswith("-")]
        parsed.overrides = [*parsed.overrides, *late]
        return parsed, [a for a in rest if a not in late]

    p.parse_known_args = parse_known_args_with_late_overrides


def stage_files(config: str, stages: str | None) -> list[tuple[int | None, Path]]:
    """The config files to run, in order, with the stage number each must declare (None: any)."""
    if stages is None:
        return [(None, Path(config))]
    first, _, last = stages.partition("-")
    try:
        numbers = list(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"--stages must look like 1-4 or 3, got {stages!r}") from None
    if not numbers or not set(numbers) <= {1, 2, 3, 4}:
        raise ValueError(f"--stages {stages!r} must name stages within 1-4, in increasing order")
    if not Path(config).is_dir():
        raise ValueError(f"with --stages, CONFIG must be a directory holding stage1.yaml .. stage4.yaml; got {config}")
    return [(n, Path(config) / f"stage{n}.yaml") for n in numbers]


def run(args) -> int:
    from ..data.mixture import DataError
    from ..train import TrainingStopped, is_finished, shutdown_distributed, train
    from ..train_config import load_train_config

    plan = stage_files(args.config, args.stages)
    if len(plan) > 1 and any(o.startswith(("out_dir=", "init_from=")) for o in args.overrides):
        raise ValueError("with several --stages, out_dir and init_from come from each stage's file")
    main_process = int(os.environ.get("RANK", "0")) == 0
    previous: Path | None = None
    try:
        for number, path in plan:
            config = load_train_config(path, args.overrides)
            if number is not None and config.stage != number:
                raise ValueError(f"{path} declares stage {config.stage}, expected stage {number}")
            if previous is not None:
                config.init_from = str(previous)
            previous = Path(config.out_dir)
            if args.resume and is_finished(config.out_dir):
                if main_process:
                    print(f"stage {config.stage}: {config.out_dir} is finished, skipping")
                continue
            resume = args.resume and (Path(config.out_dir) / "checkpoints").exists()
            out = train(config, resume=resume)
            if main_process:
                print(f"stage {config.stage} done: {out}")
        shutdown_distributed(wait_for_all=True)
    except (TrainingStopped, DataError) as err:
        if main_process:
            print(f"tinygptv train: stopped: {err}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    return 0
