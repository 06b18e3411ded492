"""The SQLite file under SqliteStore: the tables tunevault writes and how a file from elsewhere is
told apart (its layout), which SQLite errors mean busy or read-only, a write transaction that
waits, ``quick_check``, and ``sqlite:`` URLs <-> paths. No connection is kept here.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from tunevault.store.base import StoreUnavailable

LAYOUT_VERSION = 1  # of the tables below, kept in PRAGMA user_version
TABLES = {
    "decisions": "CREATE TABLE IF NOT EXISTS decisions ("
    " kernel_digest TEXT NOT NULL, fingerprint_digest TEXT NOT NULL, key_text TEXT NOT NULL,"
    " kernel_name TEXT NOT NULL, payload TEXT NOT NULL, created REAL NOT NULL,"
    " PRIMARY KEY (kernel_digest, fingerprint_digest, key_text))",
    "leases": "CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL,"
    " expires REAL NOT NULL)",
}
# Each table's columns as ``PRAGMA table_xinfo`` gives them: (name, type, not null, primary key
# position, hidden). A file whose tables differ is not one we wrote (test_store: foreign layouts).
SHAPES = {
    "decisions": (("kernel_digest", "TEXT", 1, 1, 0), ("fingerprint_digest", "TEXT", 1, 2, 0),
                  ("key_text", "TEXT", 1, 3, 0), ("kernel_name", "TEXT", 1, 0, 0), ("payload", "TEXT", 1, 0, 0),
                  ("created", "REAL", 1, 0, 0)),
    "leases": (("name", "TEXT", 0, 1, 0), ("holder", "TEXT", 1, 0, 0), ("expires", "REAL", 1, 0, 0)),
}
_BUSY_CODES = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (primary codes)
_READ_ONLY_CODES = (3, 8, 14)  # SQLITE_PERM, SQLITE_READONLY, SQLITE_CANTOPEN: this process cannot write
_READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def quick_check(path: str, limit: int = 20, db: sqlite3.Connection | None = None) -> list[str]:
    """``PRAGMA quick_check`` on ``path`` (or the open ``db``): [] when sound, else SQLite's findings.

    It reads every page (seconds for gigabytes, milliseconds for a tuning store) without the
    slower index cross-checks of ``integrity_check``. A file SQLite cannot read at all is one finding.
    """
    own = db is None
    try:
        if db is None:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
            db.execute("PRAGMA trusted_schema = OFF")
        rows = db.execute(f"PRAGMA quick_check({max(1, int(limit))})").fetchall()
    except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
        return [str(exc)]
    finally:
        if own and db is not None:
            db.close()
    # One finding per line: SQLite puts a page's findings in one row under a "*** in database main
    # ***" header, and a miss message quoting the first finding must stay one line.
    lines = (line.strip() for r in rows if r and r[0] != "ok" for line in str(r[0]).splitlines())
    return [line for line in lines if line and not line.startswith("*** in database")][:max(1, int(limit))]


def is_busy(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _BUSY_CODES
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


def cannot_write(exc: BaseException) -> bool:
    """This process may not write the file or its directory (permissions, a read-only mount): not
    a busy file, a full disk or a damaged one, which read-only access would not mend."""
    if isinstance(exc, OSError):
        return exc.errno in _READ_ONLY_ERRNOS
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _READ_ONLY_CODES
    msg = str(exc).lower()
    return any(w in msg for w in ("readonly", "read-only", "unable to open", "permission", "access"))


def layout_problem(db: sqlite3.Connection, complete: bool) -> str | None:
    """Why the file's schema is not one tunevault wrote, or None. Checked at every open, because a
    file from elsewhere may say ``user_version = 1`` over a ``decisions`` VIEW of an endless query
    (every read then fills the temp disk) or a trigger that runs on our writes. ``complete``: both
    tables must exist (a decided store); else a missing one is created."""
    found = {}
    for kind, name, table, sql in db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"):
        if kind in ("view", "trigger"):
            return f"it holds a {kind} ({str(name)[:80]!r} on {str(table)[:80]!r}), which tunevault never makes"
        if name in SHAPES:
            if kind != "table" or not str(sql).upper().startswith("CREATE TABLE"):
                return f"its {name!r} is not a plain table"
            found[name] = tuple(tuple(c[i] for i in (1, 2, 3, 5, 6))
                                for c in db.execute(f"PRAGMA table_xinfo({name})"))
    for name, shape in SHAPES.items():
        if name in found and found[name] != shape:
            return f"its {name!r} table has other columns than tunevault's"
        if complete and name not in found:
            return f"it has no {name!r} table"
    return None


@contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes the write lock up front, so it waits instead of failing."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


def refuse_dangling_link(path: str) -> None:
    """SQLite would create a dangling symlink's target, wherever it points: refuse instead."""
    if os.path.islink(path) and not os.path.exists(path):
        raise StoreUnavailable(f"tuning store {path} is a symlink to {os.readlink(path)!r}, which does not "
                               "exist; refusing to create it (point the store at a real path)")


def path_of_url(url: str) -> str:
    """The absolute file path of a ``sqlite:`` URL, read as SQLAlchemy does.

    ``sqlite:///rel/tv.db`` is relative to the current directory, ``sqlite:////abs/tv.db`` is
    absolute; anything else (``sqlite://host/x``, no path) is a ValueError that shows both forms.
    """
    rest = url.partition("://")[2]
    if not rest.startswith("/") or not rest.strip("/"):
        raise ValueError(f"{url!r} is not a SQLite URL with a path: use sqlite:///relative/path.db (three "
                         f"slashes: relative to the current directory) or sqlite:////absolute/path.db (four)")
    path = rest[1:]
    if path.startswith("/"):
        path = "/" + path.lstrip("/")  # POSIX keeps a leading "//"; a path never needs it
    return os.path.abspath(path)


def url_of_path(path: str | os.PathLike[str]) -> str:
    """The URL :func:`path_of_url` reads back as ``path`` (four slashes: absolute)."""
    return "sqlite:///" + os.path.abspath(os.fspath(path))
