"""Entry point: builds the parser from the command modules and runs one command.

Each module in ``COMMAND_MODULES`` exposes ``register(subparsers)``; every subparser sets
``func(args) -> int`` (the exit status). Keeping families apart keeps each module small.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

COMMAND_MODULES = (
    "tunevault.cli.store_cmds",  # info ls show export import rm
    "tunevault.cli.demo_cmd",  # demo
    "tunevault.cli.serving_cmds",  # check warmup report
    "tunevault.cli.fleet_cmds",  # diff (export --winners-only lives with export)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunevault", description="Persistent, safe Triton autotuning.")
    parser.add_argument("--store", help="store URL (default: $TUNEVAULT_STORE or the user cache SQLite file)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from tunevault.store.base import StoreUnavailable

    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, StoreUnavailable) as exc:
        print(f"tunevault {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
