"""The default persistent store: one SQLite file shared by every thread and process on a host.

SQLite done the python-diskcache way: WAL so readers never wait for writers, a busy timeout
plus a bounded retry so concurrent writers queue instead of failing, short IMMEDIATE write
transactions (no deferred read-to-write upgrades, which fail without waiting), one connection
per thread and per process (a connection never crosses a fork). Payloads are JSON, validated on
every read; a corrupt row or file is a miss with a warning, never an exception into a launch.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

from tunevault.core.model import Decision
from tunevault.store.base import Query, StoreUnavailable, log
from tunevault.store.sqlite_file import (
    LAYOUT_VERSION,
    TABLES,
    cannot_write,
    immediate,
    is_busy,
    layout_problem,
    quick_check,
    refuse_dangling_link,
    url_of_path,
)

_COLUMNS = "kernel_digest, fingerprint_digest, key_text, kernel_name, payload"
_ROW_KEY = "kernel_digest = ? AND fingerprint_digest = ? AND key_text = ?"
_FORK_ORPHANS: list[_ThreadConn] = []  # connections inherited across fork: never use or close them

T = TypeVar("T")
EVERYTHING = Query()  # shared default: Query is frozen, so one instance is safe


class _ThreadConn:
    """Holds one thread's connection; weak-referenceable (sqlite3.Connection is not).

    ``lock`` is held by its thread for the whole of each operation and ``depth`` counts them, so
    ``close()`` on another thread never closes a connection mid-query (sqlite3 then frees what the
    query still uses: a segfault); it closes idle ones and leaves a busy one to its own thread.
    """

    __slots__ = ("db", "pid", "lock", "depth", "closed", "__weakref__")

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db, self.pid = db, os.getpid()
        self.lock = threading.RLock()
        self.depth = 0
        self.closed = False

    def retire(self) -> None:
        """Close the connection; the caller holds ``lock`` and no operation uses it (``depth`` 0)."""
        if not self.closed and self.depth == 0:
            self.closed = True
            with suppress(sqlite3.Error):
                self.db.close()


def _where(query: Query) -> tuple[str, list[Any]]:
    """The SQL side of a Query; ``instr`` keeps the kernel filter a case-sensitive substring."""
    tests = (("kernel_digest = ?", query.kernel_digest), ("fingerprint_digest = ?", query.fingerprint_digest),
             ("key_text = ?", query.key_text), ("instr(kernel_name, ?) > 0", query.kernel))
    parts, params = [t for t, v in tests if v is not None], [v for _, v in tests if v is not None]
    return (" WHERE " + " AND ".join(parts) if parts else ""), params


class SqliteStore:
    """Decisions and tuning leases in one SQLite file; safe across threads and processes."""

    def __init__(self, path: str | os.PathLike[str], timeout_s: float = 10.0, writable: bool = True) -> None:
        """``writable=False`` opens an existing store ``mode=ro`` and never creates or changes a file
        (``tunevault diff`` reads stores from elsewhere so). Raises StoreUnavailable."""
        self.path = os.path.abspath(os.fspath(path))
        self.url = url_of_path(self.path)
        self._timeout = timeout_s
        self._local = threading.local()
        self._conns: weakref.WeakSet[_ThreadConn] = weakref.WeakSet()
        self._conns_lock = threading.Lock()
        self._warned: set[Hashable] = set()
        self._closed = False
        self._write_lock, self._write_lock_pid = threading.Lock(), os.getpid()
        self._target, self._uri = self.path, False  # what sqlite3.connect opens (a URI when read-only)
        self.read_only: str | None = None  # why this store was opened read-only, if it was
        self._ready = False  # its layout checked (and made, in a new file); until then each use checks first
        try:
            refuse_dangling_link(self.path)
            if not writable:
                problem = self._open_read_only("opened read-only")
                if problem is not None:
                    raise StoreUnavailable(f"cannot read tuning store {self.path}: {problem}")
                return
            parent = os.path.dirname(self.path)
            if not os.path.isdir(parent):
                os.makedirs(parent, exist_ok=True)
            self._settle()
        except (OSError, sqlite3.Error) as exc:
            if is_busy(exc):  # another process's long write: it is checked again at the next use
                log.info("tunevault: tuning store %s is busy (%s); opening it when it is free", self.path, exc)
            elif not (cannot_write(exc) and self._open_read_only(exc) is None):
                self.close()
                raise StoreUnavailable(f"cannot open tuning store {self.path}: {exc}") from exc
        except StoreUnavailable:
            self.close()
            raise

    # -- connections and retries ------------------------------------------------------------

    def _held(self) -> _ThreadConn:
        """This thread's connection holder, opening the connection if it has none (or none of this process)."""
        if self._closed:
            raise StoreUnavailable(f"tuning store {self.path} is closed")
        held = getattr(self._local, "conn", None)
        if held is not None:
            if held.pid == os.getpid() and not held.closed:
                return held
            if held.pid != os.getpid():
                _FORK_ORPHANS.append(held)  # closing it here could checkpoint the parent's WAL
        db = sqlite3.connect(self._target, timeout=self._timeout, isolation_level=None, uri=self._uri,
                             check_same_thread=False)  # only so close() may close it while idle
        try:
            db.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA trusted_schema = OFF")  # the file's schema runs no SQL functions of ours
        except sqlite3.Error:
            db.close()
            raise
        held = _ThreadConn(db)
        self._local.conn = held
        with self._conns_lock:
            self._conns.add(held)
        return held

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection for one operation: ``close()`` meanwhile waits for its end, and
        the connection is then closed here, on its own thread. Raises StoreUnavailable once closed."""
        held = self._held()
        with held.lock:
            if self._closed or held.closed:
                held.retire()
                raise StoreUnavailable(f"tuning store {self.path} is closed")
            held.depth += 1
            try:
                yield held.db
            finally:
                held.depth -= 1
        if self._closed:  # close() came while we used it: it may have left the connection to us
            self._retire(held)

    @staticmethod
    def _retire(held: _ThreadConn) -> None:
        """Close ``held`` unless its thread is using it now (that thread closes it when done)."""
        if held.lock.acquire(blocking=False):
            try:
                held.retire()
            finally:
                held.lock.release()

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on this thread's connection, once the file's layout is known to be ours."""
        if not self._ready:
            self._settle_late()
        return self._retrying(fn)

    def _retrying(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on this thread's connection, retrying lock contention beyond busy_timeout."""
        deadline = time.monotonic() + 3 * self._timeout
        while True:
            with self._db() as db:
                try:
                    return fn(db)
                except sqlite3.OperationalError as exc:
                    if not is_busy(exc) or time.monotonic() > deadline:
                        raise
            time.sleep(random.uniform(0.001, 0.05))

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Writers of one process take turns on a lock (woken at once) before SQLite's busy wait
        (which polls with sleeps, and starves under contention): only processes contend in SQLite."""
        if self.read_only is not None:
            raise StoreUnavailable(f"tuning store {self.path} is read-only here ({self.read_only})")
        if self._write_lock_pid != os.getpid():  # another thread may have held it at fork time
            self._write_lock, self._write_lock_pid = threading.Lock(), os.getpid()
        lock = self._write_lock
        if not lock.acquire(timeout=3 * self._timeout):
            raise StoreUnavailable(f"tuning store {self.path} stayed busy for {3 * self._timeout:.0f} s")
        try:
            return self._run(fn)
        finally:
            lock.release()

    def _settle(self) -> None:
        """Check the file's layout; a new file gets its tables (the only time opening writes)."""
        if not self._retrying(self._check_layout):
            self._retrying(self._init_schema)
        self._ready = True

    def _settle_late(self) -> None:
        """The store was busy when opened: settle it now, or fail this use only (StoreUnavailable)."""
        try:
            self._settle()
        except (OSError, sqlite3.Error) as exc:
            if cannot_write(exc) and self._open_read_only(exc) is None:
                return
            busy = "; it is tried again at the next use" if is_busy(exc) else ""
            raise StoreUnavailable(f"cannot open tuning store {self.path}: {exc}{busy}") from exc

    def _check_layout(self, db: sqlite3.Connection) -> bool:
        """Raise StoreUnavailable for a file that is not a tuning store we can use; True when it is
        complete (WAL, tables made), so opening takes no write lock."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > LAYOUT_VERSION:
            raise StoreUnavailable(
                f"tuning store {self.path} has layout version {version}, newer than this tunevault "
                f"understands ({LAYOUT_VERSION}); upgrade tunevault or point it at another file")
        problem = layout_problem(db, complete=version == LAYOUT_VERSION)
        if problem is not None:
            raise StoreUnavailable(f"{self.path} is not a tuning store tunevault can use: {problem}; "
                                   "refusing to read or write it")
        return version == LAYOUT_VERSION and str(db.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal"

    def _init_schema(self, db: sqlite3.Connection) -> None:
        if str(db.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
            db.execute("PRAGMA journal_mode = WAL")  # persistent in the file; a no-op once set
        with immediate(db):
            self._check_layout(db)  # again under the lock: another process may have made it meanwhile
            if db.execute("PRAGMA user_version").fetchone()[0] == LAYOUT_VERSION:
                return
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables - set(TABLES):
                raise StoreUnavailable(f"{self.path} is an SQLite database of something else "
                                       f"(tables {sorted(tables)}); refusing to write tuning data into it")
            for ddl in TABLES.values():
                db.execute(ddl)
            db.execute(f"PRAGMA user_version = {LAYOUT_VERSION}")

    def _open_read_only(self, why: BaseException | str) -> str | None:
        """A decided store in a directory or on a mount this process cannot write: read it as is.
        Returns None when opened so, else why not.

        ``mode=ro`` first (a WAL file needs its ``-shm`` then); on read-only media, where nobody
        can write the file either, ``immutable=1``. Writes and leases then raise StoreUnavailable,
        so new decisions stay in memory with one warning, and every stored key is still a hit."""
        if not os.path.isfile(self.path):
            return "no such file"
        problem = "SQLite cannot read it"
        for option in ("mode=ro", "immutable=1"):
            target = f"file:{urllib.parse.quote('/' + self.path.lstrip('/'))}?{option}"  # "//x": no URI authority
            try:
                db = sqlite3.connect(target, uri=True, timeout=self._timeout)
                try:
                    db.execute("PRAGMA trusted_schema = OFF")
                    version = db.execute("PRAGMA user_version").fetchone()[0]
                    layout = layout_problem(db, complete=True)
                finally:
                    db.close()
            except sqlite3.Error as exc:
                problem = f"SQLite cannot read it ({exc})"
                continue
            if version != LAYOUT_VERSION or layout is not None:
                return layout or f"its layout version is {version}, not {LAYOUT_VERSION}"
            self._target, self._uri, self._ready = target, True, True
            self.read_only = why if isinstance(why, str) else f"cannot write: {why}"
            if not isinstance(why, str):
                log.info("tunevault: tuning store %s is not writable (%s); reading its decisions (%s), keeping "
                         "new ones in memory", self.path, why, option)
            return None
        return problem

    # -- validation and warnings ------------------------------------------------------------

    def _warn_once(self, what: Hashable, msg: str, *args: Any) -> None:
        """One warning per corrupt row or failure kind, not one per read of it."""
        if what in self._warned:
            return
        if len(self._warned) < 10_000:
            self._warned.add(what)
        log.warning(msg, *args)

    def _decode(self, row: tuple[Any, ...]) -> Decision | None:
        """The row's decision, or None (with a warning) if it is not valid for exactly this row."""
        kd, fd, kt, name, payload = row
        try:
            if not isinstance(payload, str):
                raise TypeError(f"payload is {type(payload).__name__}, not text")
            decision = Decision.loads(payload)
            if decision.store_key != (kd, fd, kt) or decision.kernel.name != name:
                raise ValueError("payload belongs to another key (row tampered with or swapped)")
        except Exception as exc:  # any failure to decode is corruption, never a crash
            self._warn_once(("row", kd, fd, kt),
                            "ignoring corrupt decision in %s (kernel %s %s, key %s): %s",
                            self.path, name, kd, kt, exc)
            return None
        return decision

    def _unreadable(self, exc: Exception) -> None:
        self._warn_once(("unreadable", type(exc).__name__, str(exc)),
                        "tuning store %s is unreadable (%s); treating it as a miss",
                        self.path, exc)

    # -- the Store protocol -----------------------------------------------------------------

    def get(self, kernel_digest: str, fingerprint_digest: str, key_text: str) -> Decision | None:
        sql = f"SELECT {_COLUMNS} FROM decisions WHERE {_ROW_KEY}"
        try:
            row = self._run(lambda db: db.execute(sql, (kernel_digest, fingerprint_digest, key_text))
                            .fetchone())
        except (sqlite3.Error, StoreUnavailable) as exc:
            self._unreadable(exc)
            return None
        return None if row is None else self._decode(row)

    def put(self, decision: Decision) -> Decision:
        """INSERT OR IGNORE, then return what is stored: the first writer's decision wins.

        A stored row that fails validation is replaced, so a corrupt entry heals on retune.
        """
        payload = decision.dumps()
        key = decision.store_key

        def txn(db: sqlite3.Connection) -> Decision:
            with immediate(db):
                db.execute("INSERT OR IGNORE INTO decisions VALUES (?, ?, ?, ?, ?, ?)",
                           (*key, decision.kernel.name, payload, time.time()))
                row = db.execute(f"SELECT {_COLUMNS} FROM decisions WHERE {_ROW_KEY}", key).fetchone()
                if row is not None and row[4] == payload:
                    return decision
                stored = None if row is None else self._decode(row)
                if stored is not None:
                    return stored
                db.execute(f"UPDATE decisions SET kernel_name = ?, payload = ?, created = ? WHERE {_ROW_KEY}",
                           (decision.kernel.name, payload, time.time(), *key))
                return decision

        try:
            return self._write(txn)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot write to tuning store {self.path}: {exc}") from exc

    def decisions(self, query: Query = EVERYTHING) -> Iterator[Decision]:
        """Rows are fetched in one short read, then validated and filtered as they are yielded;
        an unreadable store is a warning and no rows (a miss, for the runtime)."""
        try:
            rows = self._rows(query)
        except StoreUnavailable as exc:
            self._unreadable(exc)
            return
        yield from self._valid(rows, query)

    def listing(self, query: Query = EVERYTHING) -> list[Decision]:
        """What ``decisions`` yields, for tools (``tunevault diff``, ``ls``): an unreadable store raises
        StoreUnavailable instead of reading as empty, which would look like agreement."""
        return list(self._valid(self._rows(query), query))

    def _rows(self, query: Query) -> list[tuple[Any, ...]]:
        where, params = _where(query)
        sql = f"SELECT {_COLUMNS} FROM decisions{where} ORDER BY kernel_name, created"
        try:
            return self._run(lambda db: db.execute(sql, params).fetchall())
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot read tuning store {self.path}: {exc}") from exc

    def _valid(self, rows: list[tuple[Any, ...]], query: Query) -> Iterator[Decision]:
        for row in rows:
            decision = self._decode(row)
            if decision is not None and query.matches(decision):
                yield decision

    def delete(self, query: Query = EVERYTHING) -> int:
        """Delete by the row's columns, so corrupt rows matching the query go too."""
        where, params = _where(query)

        def txn(db: sqlite3.Connection) -> int:
            with immediate(db):
                return db.execute(f"DELETE FROM decisions{where}", params).rowcount

        try:
            return self._write(txn)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot delete from tuning store {self.path}: {exc}") from exc

    def count(self) -> int:
        """Stored rows, corrupt ones included (they are still there to be deleted)."""
        try:
            return int(self._run(lambda db: db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]))
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot read tuning store {self.path}: {exc}") from exc

    def integrity_problems(self, limit: int = 20) -> list[str]:
        """What SQLite's own ``PRAGMA quick_check`` finds wrong with the file: [] when it is sound.

        A damaged page reads as missing rows (or as an error the read path turns into a miss), so a
        damaged store looks empty unless asked; ``tunevault doctor`` repairs it.
        """
        with self._db() as db:
            return quick_check(self.path, limit, db)

    def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take the lease if absent, expired or ours (renew). Wall-clock time: processes share it."""

        def txn(db: sqlite3.Connection) -> bool:
            with immediate(db):
                now = time.time()
                row = db.execute("SELECT holder, expires FROM leases WHERE name = ?", (name,)).fetchone()
                live = row is not None and isinstance(row[1], int | float) and row[1] > now
                if live and row[0] != holder:  # a garbled expiry counts as expired
                    return False
                db.execute("INSERT OR REPLACE INTO leases (name, holder, expires) VALUES (?, ?, ?)",
                           (name, holder, now + ttl_s))
                return True

        try:
            return self._write(txn)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot take lease {name!r} in tuning store {self.path}: {exc}") from exc

    def lease_holder(self, name: str) -> str | None:
        sql = "SELECT holder, expires FROM leases WHERE name = ?"
        try:
            row = self._run(lambda db: db.execute(sql, (name,)).fetchone())
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot read lease {name!r} in tuning store {self.path}: {exc}") from exc
        if row is None or not isinstance(row[1], int | float) or row[1] <= time.time():
            return None
        return row[0] if isinstance(row[0], str) else None

    def leases(self, prefix: str) -> dict[str, str]:
        """The live leases whose name starts with ``prefix``: name -> holder (e.g. failed-key records)."""
        sql = "SELECT name, holder, expires FROM leases WHERE substr(name, 1, ?) = ?"
        try:
            rows = self._run(lambda db: db.execute(sql, (len(prefix), prefix)).fetchall())
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot read leases in tuning store {self.path}: {exc}") from exc
        now = time.time()
        return {name: holder for name, holder, expires in rows
                if isinstance(name, str) and isinstance(holder, str) and isinstance(expires, int | float)
                and expires > now}

    def release(self, name: str, holder: str) -> None:
        """Best effort and never raises: an unreleased lease simply expires."""

        def txn(db: sqlite3.Connection) -> None:
            with immediate(db):
                db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

        try:
            self._write(txn)
        except (sqlite3.Error, StoreUnavailable) as exc:
            log.warning("could not release lease %r in %s (%s); it will expire", name, self.path, exc)

    def supersede(self, stale: Decision, decision: Decision) -> Decision:
        """Replace ``stale`` (an entry that names a config its kernel does not declare) with a re-tuned
        ``decision``, unless the row meanwhile holds another valid decision; return what it holds."""
        key = decision.store_key

        def txn(db: sqlite3.Connection) -> Decision:
            with immediate(db):
                row = db.execute(f"SELECT {_COLUMNS} FROM decisions WHERE {_ROW_KEY}", key).fetchone()
                current = None if row is None else self._decode(row)
                if current is not None and current != stale:
                    return current  # someone else superseded it first
                db.execute("INSERT OR REPLACE INTO decisions VALUES (?, ?, ?, ?, ?, ?)",
                           (*key, decision.kernel.name, decision.dumps(), time.time()))
                return decision

        try:
            return self._write(txn)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot write to tuning store {self.path}: {exc}") from exc

    def overwrite(self, decision: Decision) -> Decision:
        """Store ``decision`` whatever the row holds (a LayeredStore adopting its fleet's decision over
        this host's: the fleet's first writer outranks the local one); returns it."""
        payload = decision.dumps()

        def txn(db: sqlite3.Connection) -> Decision:
            with immediate(db):
                db.execute("INSERT OR REPLACE INTO decisions VALUES (?, ?, ?, ?, ?, ?)",
                           (*decision.store_key, decision.kernel.name, payload, time.time()))
                return decision

        try:
            return self._write(txn)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot write to tuning store {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close every thread's connection opened by this process; later reads miss, writes raise.

        A connection another thread is querying on is closed by that thread when its query ends
        (closing it under the query crashed the process: test_store's close-while-reading test).
        """
        self._closed = True
        with self._conns_lock:
            held = [c for c in self._conns if c.pid == os.getpid()]
            self._conns = weakref.WeakSet()
        for c in held:
            self._retire(c)

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"
