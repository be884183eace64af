"""Rebuild the built-in model (``tinygptv/assets/tinygptv-micro-shapes``) from nothing.

    python scripts/build_builtin_model.py                # run the micro recipe, compare with the shipped files
    python scripts/build_builtin_model.py --install      # ... and replace the shipped files with the new ones

The model is the output of ``tinygptv recipe micro`` with the default seed (0; its language model
drawn with the default ``lm_seed``, 3) and one thread:
the shapes world, its tokenizer, the pretrained micro LM / ViT / Q-Former and the four TinyGPT-V
stages (``configs/micro``), LoRA merged. Every step is seeded and deterministic, so on the same
machine (CPU kind, thread count, torch version) the same seed writes the same bytes: without
``--install`` the script compares the SHA-256 of every file of the new model with the
``MANIFEST.json`` shipped beside the built-in model and exits with status 1 on any difference.
Results on another CPU may differ in the last bits (floating-point summation order).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "tinygptv" / "assets" / "tinygptv-micro-shapes"
MANIFEST = "MANIFEST.json"
REPORT = "RECIPE.md"


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (relative POSIX paths), the manifest itself excluded."""
    hashes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in (MANIFEST, REPORT):
            hashes[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def compare(new: dict[str, str], shipped: dict[str, str]) -> list[str]:
    problems = [f"missing from the new build: {name}" for name in sorted(set(shipped) - set(new))]
    problems += [f"not in the shipped model: {name}" for name in sorted(set(new) - set(shipped))]
    problems += [f"differs: {name}" for name in sorted(set(new) & set(shipped)) if new[name] != shipped[name]]
    return problems


def _differences(ran: dict, default: dict) -> list[str]:
    """Dotted names of the settings where a run's recipe differs from the default one (a setting
    newer than the run's code is not in its report: it ran as that setting's default, or as its
    ``BEFORE_SETTING`` value where the default has changed since; ``ran_setting``)."""
    from tinygptv.recipes.micro import ran_setting
    from tinygptv.train import flatten_dotted as flat

    ran, default = flat(json.loads(json.dumps(ran))), flat(json.loads(json.dumps(default)))
    return [f"{key}={ran_setting(ran, default, key)!r} (default {value!r})"
            for key, value in sorted(default.items()) if ran_setting(ran, default, key) != value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=None, help="folder for the recipe run (default: a temporary folder)")
    parser.add_argument(
        "--from-run", default=None, metavar="DIR",
        help="use a finished `tinygptv recipe micro --out DIR` run (same seed and threads) instead of running one",
    )
    parser.add_argument("--install", action="store_true", help="replace the shipped model with the new build")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from tinygptv.recipes.micro import MicroRecipe, run_micro_recipe

    if args.from_run:
        work = Path(args.from_run)
        recipe = json.loads((work / "report.json").read_text())["recipe"]
        ran = (recipe["seed"], recipe["threads"], recipe.get("processes", 1))
        if ran != (args.seed, args.threads, args.processes):
            print(f"{work} ran with seed / threads / processes {ran}, not {(args.seed, args.threads, args.processes)}", file=sys.stderr)
            return 1
        default = MicroRecipe(seed=args.seed, threads=args.threads, processes=args.processes).to_dict()
        changed = sorted(_differences(recipe, default))
        if changed:
            print(f"{work} did not run the default recipe (the built-in model must be what the script rebuilds): "
                  f"{', '.join(changed)}", file=sys.stderr)
            return 1
    else:
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tinygptv-micro-"))
        recipe = MicroRecipe(seed=args.seed, threads=args.threads, processes=args.processes)
        run_micro_recipe(work, recipe, configs_dir=ROOT / "configs" / "micro", log=print)
    model = work / "model"
    new = file_hashes(model)

    if args.install:
        if ASSET.exists():
            shutil.rmtree(ASSET)
        shutil.copytree(model, ASSET)
        (ASSET / MANIFEST).write_text(json.dumps({"seed": args.seed, "threads": args.threads, "processes": args.processes, "sha256": new}, indent=2) + "\n")
        shutil.copy(work / "report.md", ASSET / REPORT)
        print(f"installed the new build into {ASSET}")
        return 0

    manifest = ASSET / MANIFEST
    if not manifest.is_file():
        print(f"no shipped manifest at {manifest}: run with --install to create one", file=sys.stderr)
        return 1
    problems = compare(new, json.loads(manifest.read_text())["sha256"])
    if problems:
        print("the new build differs from the shipped model:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"bit for bit identical to the shipped model ({len(new)} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
