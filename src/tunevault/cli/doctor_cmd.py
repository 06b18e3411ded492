"""``tunevault doctor [--repair]``: is the store's SQLite file sound, and a way out when it is not.

A damaged page reads as missing decisions, so without a check a damaged store looks merely
empty. ``doctor`` runs SQLite's own ``PRAGMA quick_check``; ``--repair`` keeps every decision
that still reads and validates in a fresh file and renames the damaged one aside.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from tunevault.cli.output import print_json

if TYPE_CHECKING:
    from tunevault.store.base import Store


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("doctor", help="check the store file with SQLite's quick_check; --repair a damaged one",
                       description="Check the SQLite store with PRAGMA quick_check. Exit status 0 when it is "
                                   "sound (or repaired, or the default store not created yet), 1 when it is damaged, "
                                   "2 when a store named by --store or $TUNEVAULT_STORE does not exist. "
                                   "--repair copies every decision that still reads into a fresh file and "
                                   "keeps the damaged one as PATH.damaged-TIME; stop processes using the "
                                   "store first.")
    p.add_argument("--repair", action="store_true", help="replace a damaged file by its readable decisions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)


def store_damage(store: Store) -> list[str]:
    """SQLite's findings for a store that has a file ([] when sound or when it has none)."""
    check = getattr(store, "integrity_problems", None)
    if check is None:
        return []
    try:
        return list(check())
    except Exception as exc:  # a store that cannot even be checked is damaged as far as we can tell
        return [f"integrity check failed: {exc}"]


def damage_message(url: str, problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more finding(s))" if len(problems) > 1 else ""
    return (f"the tuning store {url} is damaged: SQLite's quick_check says {problems[0]!r}{more}; "
            f"decisions on damaged pages are missing. Run `tunevault --store {url} doctor --repair`")


def damaged(url: str, problems: list[str], consequence: str = "") -> int:
    """Exit status 1, with the reason on stderr, when the store's file is damaged; else 0.

    ``consequence`` says what the command did not do because of it (e.g. ``"; nothing exported"``).
    """
    if not problems:
        return 0
    print(f"tunevault: {damage_message(url, problems)}{consequence}", file=sys.stderr)
    return 1


def cmd_doctor(args: argparse.Namespace) -> int:
    from tunevault.cli.store_cmds import store_url
    from tunevault.store.base import redact
    from tunevault.store.sqlite_file import path_of_url, quick_check
    from tunevault.store.sqlite_repair import readable_decisions, salvage

    url = store_url(args)
    if not url.startswith("sqlite:"):
        return _done(args, {"store": redact(url), "status": "not checked",
                            "detail": "only SQLite stores have a file"}, 0)
    path = path_of_url(url)
    if not os.path.exists(path):
        if args.store or os.environ.get("TUNEVAULT_STORE"):  # a named path: a typo, as for every other command
            raise OSError(f"no tuning store at {path} ({url}): check the path; `tunevault doctor` only checks "
                          "a store (tunevault.install(), warmup and import create one)")
        return _done(args, {"store": url, "path": path, "status": "absent", "detail": "no store file yet"}, 0)
    problems = quick_check(path)
    try:
        readable, invalid = readable_decisions(path)
        counts: dict[str, int | str] = {"decisions": len(readable), "invalid_rows": invalid}
    except Exception as exc:  # sqlite3.DatabaseError: not a database at all
        counts = {"decisions": 0, "invalid_rows": 0, "unreadable": str(exc)}
    report: dict[str, Any] = {"store": url, "path": path, "problems": problems, **counts}
    if not problems:
        _refuse_foreign(path)
        return _done(args, {**report, "status": "sound"}, 0)
    if not args.repair:
        return _done(args, {**report, "status": "damaged"}, 1)
    result = salvage(path)
    return _done(args, {**report, "status": "repaired", "recovered": result.recovered, "lost": result.lost,
                        "damaged_copy": result.kept_as}, 0)


def _refuse_foreign(path: str) -> None:
    """OSError (exit 2) for a sound SQLite file that is not a tunevault store (other tables, a view):
    every other command refuses it, so doctor must not call it sound."""
    from tunevault.store.base import StoreUnavailable
    from tunevault.store.sqlite import SqliteStore

    try:
        SqliteStore(path, writable=False).close()  # mode=ro: checks the layout, changes nothing
    except StoreUnavailable as exc:
        raise OSError(f"{path} is not a tunevault store: {str(exc).partition(': ')[2] or exc}") from exc


def _done(args: argparse.Namespace, report: dict[str, Any], status: int) -> int:
    if args.json:
        print_json(report)
        return status
    where = report.get("path", report["store"])
    state = report["status"]
    if state in ("not checked", "absent"):
        print(f"{where}: {report['detail']}; nothing to check")
    elif state == "sound":
        invalid = report["invalid_rows"]
        print(f"{where}: sound (SQLite quick_check: ok); {report['decisions']} decision(s)"
              + (f", {invalid} invalid row(s) that are tuned again when met" if invalid else ""))
    else:
        print(f"{where}: DAMAGED; SQLite quick_check found:", file=sys.stderr)
        for problem in report["problems"][:10]:
            print(f"  {problem}", file=sys.stderr)
        if state == "damaged":
            print(f"{report['decisions']} decision(s) still readable. Run `tunevault --store {report['store']} "
                  f"doctor --repair` to keep them in a fresh file (the damaged one is kept beside it); "
                  f"stop processes using the store first.", file=sys.stderr)
        else:
            print(f"repaired: {report['recovered']} decision(s) kept in a fresh {where}, {report['lost']} "
                  f"unreadable row(s) dropped (tuned again when met); the damaged file is kept as "
                  f"{report['damaged_copy']}")
    return status
