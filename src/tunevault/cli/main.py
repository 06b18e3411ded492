"""Entry point: builds the parser from the command modules and runs one command.

Each module in ``COMMAND_MODULES`` exposes ``register(subparsers)``; every subparser sets
``func(args) -> int`` (the exit status). Keeping families apart keeps each module small.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Sequence

COMMAND_MODULES = (
    "tunevault.cli.store_cmds",  # info ls show export import rm
    "tunevault.cli.demo_cmd",  # demo
    "tunevault.cli.serving_cmds",  # check warmup report
    "tunevault.cli.fleet_cmds",  # diff (export --winners-only lives with export)
    "tunevault.cli.doctor_cmd",  # doctor
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunevault", description="Persistent, safe Triton autotuning.")
    parser.add_argument("--version", action="store_true", help="print the versions of tunevault, Triton, "
                        "torch and Python, then exit")
    parser.add_argument("--store", help="store URL: sqlite:///relative.db, sqlite:////absolute.db, memory://, "
                        "redis://host:port/db (default: $TUNEVAULT_STORE or the user cache SQLite file)")
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


def versions() -> str:
    """``tunevault 0.1.0 (Triton 3.9.0, torch 2.13.0+cpu, Python 3.11.7)``, without importing Triton or torch."""
    import platform

    import tunevault
    from tunevault.core.machine import torch_build, triton_version

    torch = (torch_build() or {}).get("__version__") or "not installed"
    return (f"tunevault {tunevault.__version__} (Triton {triton_version() or 'not installed'}, torch {torch}, "
            f"Python {platform.python_version()})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(versions())
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from tunevault.integration.logs import show_logs
    from tunevault.policy.settings import warn_unknown_variables
    from tunevault.store.base import StoreUnavailable

    show_logs(logging.DEBUG if args.verbose else None)
    warn_unknown_variables()  # the commands read TUNEVAULT_STORE and others: a typo of one is said
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at interpreter exit
        return status
    except BrokenPipeError:
        # `tunevault show ... | head`: the reader has what it wanted; stop quietly, as cat does.
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no file descriptor: nothing to quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError, StoreUnavailable) as exc:
        print(f"tunevault {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what it stopped, not a traceback (as ``warmup --jobs`` says)
        print(f"tunevault {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
