"""Repair a damaged SQLite store: keep every decision that still reads and validates, in a fresh file.

The damaged file is never written to: it is read through a read-only connection, then renamed
aside (``PATH.damaged-TIME``, with its WAL) and a fresh file holding the readable decisions
takes its place. Processes using the store should be stopped first; a decision lost here is
simply tuned again (or replayed by ``tunevault warmup``).
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import closing, suppress
from dataclasses import dataclass

from tunevault.core.model import Decision, InvalidEntry
from tunevault.store.sqlite import SqliteStore

_COLUMNS = "kernel_digest, fingerprint_digest, key_text, payload"


@dataclass(frozen=True)
class Salvage:
    recovered: int  # decisions copied into the fresh file
    lost: int  # rows found but unreadable or invalid (pages SQLite could not read are not counted)
    kept_as: str  # where the damaged file now is


def _valid(row: tuple[object, ...]) -> Decision | None:
    kd, fd, kt, payload = row
    try:
        decision = Decision.loads(payload)  # type: ignore[arg-type]
    except (InvalidEntry, TypeError):
        return None
    return decision if decision.store_key == (kd, fd, kt) else None


def readable_decisions(path: str) -> tuple[list[Decision], int]:
    """Every valid decision SQLite can still read from ``path``, and how many rows were not valid.

    One scan first; when a damaged page stops it, row by row through the rowid b-tree, so one bad
    page costs the rows on it, not the rows after it.
    """
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)) as db:
        try:
            rows = db.execute(f"SELECT {_COLUMNS} FROM decisions").fetchall()
        except sqlite3.DatabaseError:
            rows = _row_by_row(db, os.path.getsize(path))
    found = [d for d in map(_valid, rows) if d is not None]
    return found, len(rows) - len(found)


def _row_by_row(db: sqlite3.Connection, size: int) -> list[tuple[object, ...]]:
    try:
        top = int(db.execute("SELECT max(rowid) FROM decisions").fetchone()[0] or 0)
    except sqlite3.DatabaseError:
        top = size // 64  # no row is smaller than this
    rows = []
    for rowid in range(1, top + 1):
        try:
            row = db.execute(f"SELECT {_COLUMNS} FROM decisions WHERE rowid = ?", (rowid,)).fetchone()
        except sqlite3.DatabaseError:
            continue
        if row is not None:
            rows.append(row)
    return rows


def readable_leases(path: str) -> list[tuple[str, str, float]]:
    """The live leases SQLite can still read from ``path`` (name, holder, seconds left): among them
    the marks of decisions a remote store has not got yet (store/unpublished.py) and the fleet's
    failed-key records, which a repair must not lose."""
    now = time.time()
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)) as db:
            rows = db.execute("SELECT name, holder, expires FROM leases").fetchall()
    except sqlite3.DatabaseError:
        return []
    return [(name, holder, expires - now) for name, holder, expires in rows
            if isinstance(name, str) and isinstance(holder, str) and isinstance(expires, int | float)
            and expires > now]


def salvage(path: str) -> Salvage:
    """Replace the damaged file at ``path`` by a fresh one holding its readable decisions (and
    its readable live leases)."""
    try:
        found, lost = readable_decisions(path)
    except sqlite3.DatabaseError:  # not readable as a database at all
        found, lost = [], 0
    leases = readable_leases(path)
    tmp = f"{path}.repair-{os.getpid()}"
    fresh = SqliteStore(tmp)
    try:
        for decision in found:
            fresh.put(decision)
        for name, holder, ttl in leases:
            fresh.try_lease(name, holder, ttl)
    finally:
        fresh.close()
    aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(path, aside)
    for suffix in ("-wal", "-shm"):
        with suppress(FileNotFoundError):
            os.replace(path + suffix, aside + suffix)
    for suffix in ("-wal", "-shm"):  # the fresh file's WAL, if its last close left one, moves with it
        with suppress(FileNotFoundError):
            os.replace(tmp + suffix, path + suffix)
    os.replace(tmp, path)
    return Salvage(len(found), lost, aside)
