"""The ``tinygptv`` command.

Each sub-command lives in its own module, which exposes ``register(subparsers)`` adding its parser
and setting ``func`` to the function that runs it. Modules are imported only to build the parser;
each keeps torch and transformers out of its top-level imports, so ``tinygptv --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command modules, in the order ``--help`` lists them.
COMMAND_MODULES = [
    "tinygptv.commands.info",
    "tinygptv.commands.ask",
    "tinygptv.commands.chat",
    "tinygptv.commands.bench",
    "tinygptv.commands.quantize",
    "tinygptv.commands.data",
    "tinygptv.commands.convert",
    "tinygptv.commands.train",
    "tinygptv.commands.recipe",
    "tinygptv.commands.ablate",
    "tinygptv.commands.plot",
    "tinygptv.commands.eval",
    "tinygptv.commands.eval_report",
    "tinygptv.commands.serve",
    "tinygptv.commands.demo",
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="tinygptv",
        description="TinyGPT-V: train, evaluate, quantize and serve a small multimodal LLM.",
    )
    parser.add_argument("--version", action="version", version=f"tinygptv {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError) as err:  # user errors: one clear line, no traceback
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"tinygptv {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
