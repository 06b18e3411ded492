"""Stores behave alike and survive what a shared host does to them: corruption, contention, no disk.

Real SQLite files in tmp_path and real subprocesses; no mocks.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from tunevault.core.model import ConfigSpec, Decision, Fingerprint, KernelId, TuningKey
from tunevault.store.base import Query, Store, StoreUnavailable, open_store
from tunevault.store.memory import MemoryStore
from tunevault.store.sqlite import SqliteStore

TESTS_DIR = Path(__file__).resolve().parent
SRC_DIR = TESTS_DIR.parent / "src"


def make_decision(n: int, config_index: int = 0, kernel: str = "pkg.attn:fwd_kernel",
                  device: str = "NVIDIA H100") -> Decision:
    """A small valid decision; ``n`` picks the tuning key, ``config_index`` the winner."""
    return Decision(
        kernel=KernelId(kernel, "src0", "cfg0", ("N",)),
        fingerprint=Fingerprint("3.9.0", "cuda:90", device, "12.8"),
        key=TuningKey((("N", n), ("dtype(x)", "float16"))),
        config_index=config_index,
        config=ConfigSpec((("BLOCK", 32 << config_index),), (("num_warps", 4),)),
        margin=0.1,
        provenance=(("pid", 1),),
    )


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    s: Store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "tv" / "db.sqlite")
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> SqliteStore:
    s = SqliteStore(tmp_path / "db.sqlite")
    yield s
    s.close()


def raw(store: SqliteStore, sql: str, *params: object) -> list[tuple]:
    """Run SQL on a plain connection, tampering with the file behind the store's back."""
    with closing(sqlite3.connect(store.path, isolation_level=None)) as db:
        return db.execute(sql, params).fetchall()


def tv_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tunevault" and r.levelno == logging.WARNING]


# -- behaviour shared by every store -----------------------------------------------------------

def test_round_trip(store: Store) -> None:
    d = make_decision(1)
    assert isinstance(store, Store)
    assert store.get(*d.store_key) is None
    assert store.put(d) == d
    assert store.get(*d.store_key) == d
    assert store.count() == 1
    assert store.get(d.kernel.digest, d.fingerprint.digest, make_decision(2).key.text) is None


def test_first_writer_wins(store: Store) -> None:
    first, second = make_decision(1, config_index=0), make_decision(1, config_index=2)
    assert store.put(first) == first
    assert store.put(second) == first
    assert store.get(*second.store_key) == first
    assert store.count() == 1


def test_query_filters(store: Store) -> None:
    a = [make_decision(n, kernel="pkg.attn:fwd_kernel") for n in range(3)]
    b = [make_decision(n, kernel="pkg.norm:rms_kernel", device="NVIDIA A100") for n in range(2)]
    for d in a + b:
        store.put(d)
    assert set(store.decisions()) == set(a + b)
    assert set(store.decisions(Query(kernel="attn"))) == set(a)
    assert set(store.decisions(Query(kernel="ATTN"))) == set()  # substring, case-sensitive
    assert set(store.decisions(Query(kernel="%"))) == set()  # no LIKE wildcards
    assert set(store.decisions(Query(kernel_digest=b[0].kernel.digest))) == set(b)
    assert set(store.decisions(Query(fingerprint_digest=a[0].fingerprint.digest))) == set(a)
    assert set(store.decisions(Query(key_text=a[1].key.text))) == {a[1], b[1]}
    assert list(store.decisions(Query(kernel="attn", key_text=a[1].key.text))) == [a[1]]
    assert list(store.decisions(Query(kernel="rms", key_text=a[1].key.text))) == [b[1]]


def test_delete(store: Store) -> None:
    for n in range(3):
        store.put(make_decision(n, kernel="pkg.attn:fwd_kernel"))
        store.put(make_decision(n, kernel="pkg.norm:rms_kernel"))
    assert store.delete(Query(kernel="rms")) == 3
    assert store.count() == 3
    assert all("attn" in d.kernel.name for d in store.decisions())
    assert store.delete(Query(kernel="rms")) == 0
    assert store.delete() == 3
    assert store.count() == 0


def test_leases(store: Store) -> None:
    assert store.try_lease("k1", "alice", 10.0)
    assert store.try_lease("k1", "alice", 10.0)  # renew
    assert not store.try_lease("k1", "bob", 10.0)
    assert store.try_lease("k2", "bob", 10.0)  # another lease is independent
    store.release("k1", "bob")  # not bob's: must not free alice's lease
    assert not store.try_lease("k1", "bob", 10.0)
    store.release("k1", "alice")
    assert store.try_lease("k1", "bob", 0.05)
    time.sleep(0.15)
    assert store.try_lease("k1", "carol", 10.0)  # bob's lease expired


def test_threads_lose_nothing(store: Store) -> None:
    errors: list[BaseException] = []
    winners: list[tuple[int, int]] = []
    start = threading.Barrier(8)

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(50):
                store.put(make_decision(t * 1000 + i))
                if i % 10 == 0:
                    key = -1 - i
                    winners.append((key, store.put(make_decision(key, config_index=t)).config_index))
        except BaseException as exc:  # reported below, with the thread's traceback lost otherwise
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert store.count() == 8 * 50 + 5
    for t in range(8):
        for i in range(50):
            assert store.get(*make_decision(t * 1000 + i).store_key) is not None
    stored = {d.key.items[0][1]: d.config_index for d in store.decisions() if d.key.items[0][1] < 0}
    assert len(stored) == 5 and len(winners) == 8 * 5
    assert all(stored[key] == idx for key, idx in winners)  # every thread was told the stored value


def test_open_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    s = SqliteStore(tmp_path / "db.sqlite")
    assert s.url == f"sqlite:///{tmp_path / 'db.sqlite'}"  # four slashes: an absolute path
    s.put(make_decision(1))
    again = open_store(s.url)
    assert isinstance(again, SqliteStore) and again.path == s.path
    assert again.get(*make_decision(1).store_key) == make_decision(1)
    s.close()
    again.close()


# -- SQLite: persistence, validation, failure ----------------------------------------------------

def test_sqlite_persists_across_instances(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "a" / "b" / "db.sqlite")  # parent dirs are created
    s.put(make_decision(1))
    s.close()
    s2 = SqliteStore(tmp_path / "a" / "b" / "db.sqlite")
    assert s2.get(*make_decision(1).store_key) == make_decision(1)
    assert s2.put(make_decision(1, config_index=3)).config_index == 0
    s2.close()


def test_corrupt_json_row_is_a_miss_with_one_warning(sqlite_store: SqliteStore,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    good, bad = make_decision(1), make_decision(2)
    sqlite_store.put(good)
    sqlite_store.put(bad)
    raw(sqlite_store, "UPDATE decisions SET payload = '{oops' WHERE key_text = ?", bad.key.text)
    caplog.set_level(logging.WARNING, logger="tunevault")
    assert sqlite_store.get(*bad.store_key) is None
    assert list(sqlite_store.decisions()) == [good]
    warnings = tv_warnings(caplog)
    assert len(warnings) == 1 and "corrupt" in warnings[0] and bad.key.text in warnings[0]
    healed = make_decision(2, config_index=1)
    assert sqlite_store.put(healed) == healed  # a corrupt entry does not block retuning
    assert sqlite_store.get(*bad.store_key) == healed


def test_tampered_payload_is_rejected(sqlite_store: SqliteStore, caplog: pytest.LogCaptureFixture) -> None:
    a, b = make_decision(1, config_index=0), make_decision(2, config_index=3)
    sqlite_store.put(a)
    sqlite_store.put(b)
    pa, pb = (raw(sqlite_store, "SELECT payload FROM decisions WHERE key_text = ?", d.key.text)[0][0]
              for d in (a, b))
    raw(sqlite_store, "UPDATE decisions SET payload = ? WHERE key_text = ?", pb, a.key.text)
    raw(sqlite_store, "UPDATE decisions SET payload = ? WHERE key_text = ?", pa, b.key.text)
    caplog.set_level(logging.WARNING, logger="tunevault")
    assert sqlite_store.get(*a.store_key) is None
    assert sqlite_store.get(*b.store_key) is None
    assert list(sqlite_store.decisions()) == []
    assert len(tv_warnings(caplog)) == 2


@pytest.mark.parametrize("content", [b"", b"this is not a database" * 300, "truncate"])
def test_garbage_or_truncated_file_is_unavailable(tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "db.sqlite"
    if content == "truncate":
        s = SqliteStore(path)
        for n in range(200):
            s.put(make_decision(n))
        s.close()
        raw_db = sqlite3.connect(path)
        raw_db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        raw_db.close()
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        with open(path, "r+b") as f:
            f.truncate(1000)
    else:
        path.write_bytes(content)
    if content == b"":  # an empty file is a valid, empty database
        SqliteStore(path).close()
        return
    with pytest.raises(StoreUnavailable, match="cannot open tuning store"):
        SqliteStore(path)


def test_unwritable_location_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("a regular file, not a directory")
    with pytest.raises(StoreUnavailable):
        SqliteStore(tmp_path / "afile" / "db.sqlite")  # fails for root as well


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_unavailable(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StoreUnavailable):
            SqliteStore(ro / "db.sqlite")
    finally:
        ro.chmod(0o700)


def test_newer_layout_or_foreign_database_is_unavailable(tmp_path: Path) -> None:
    newer = sqlite3.connect(tmp_path / "newer.sqlite")
    newer.execute("PRAGMA user_version = 99")
    newer.close()
    with pytest.raises(StoreUnavailable, match="version 99"):
        SqliteStore(tmp_path / "newer.sqlite")
    foreign = sqlite3.connect(tmp_path / "foreign.sqlite")
    foreign.execute("CREATE TABLE users (id INTEGER)")
    foreign.close()
    with pytest.raises(StoreUnavailable, match="something else"):
        SqliteStore(tmp_path / "foreign.sqlite")


def test_corruption_after_open_degrades(sqlite_store: SqliteStore, caplog: pytest.LogCaptureFixture) -> None:
    d = make_decision(1)
    sqlite_store.put(d)
    raw(sqlite_store, "PRAGMA wal_checkpoint(TRUNCATE)")
    size = os.path.getsize(sqlite_store.path)
    with open(sqlite_store.path, "r+b") as f:
        f.write(b"\xff" * size)
    caplog.set_level(logging.WARNING, logger="tunevault")
    assert sqlite_store.get(*d.store_key) is None
    assert list(sqlite_store.decisions()) == []
    assert tv_warnings(caplog)
    with pytest.raises(StoreUnavailable):
        sqlite_store.put(make_decision(2))
    with pytest.raises(StoreUnavailable):
        sqlite_store.count()
    sqlite_store.release("k", "me")  # best effort, never raises


def test_closed_store(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "db.sqlite")
    s.put(make_decision(1))
    s.close()
    assert s.get(*make_decision(1).store_key) is None
    with pytest.raises(StoreUnavailable):
        s.put(make_decision(2))



CLOSED_UNDER_READS = """
import json, sqlite3, sys, threading, time
from tunevault.store.base import Query, StoreUnavailable
from tunevault.store.sqlite import SqliteStore
path, closes = sys.argv[1], int(sys.argv[2])
SqliteStore(path).close()
with sqlite3.connect(path) as db:  # rows to scan (matching no query), so each read is long enough to close under
    db.executemany("INSERT INTO decisions VALUES (?, ?, ?, ?, ?, ?)",
                   [(f"k{i}", "fp", f"key{i}", "kern", "x" * 200, 0.0) for i in range(20000)])
current = [SqliteStore(path)]
stop, outcomes, lock = threading.Event(), {}, threading.Lock()
def read():
    while not stop.is_set():
        store = current[0]
        for what, op in (("decisions", lambda: list(store.decisions(Query(kernel="absent")))),
                         ("count", store.count)):
            try:
                op()
                outcome = what + " ok"
            except StoreUnavailable:
                outcome = what + " StoreUnavailable"
            except Exception as exc:
                outcome = f"{what} {type(exc).__name__}: {exc}"
            with lock:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
readers = [threading.Thread(target=read) for _ in range(2)]
for t in readers:
    t.start()
for _ in range(closes):  # what Runtime.close() does on install()/uninstall() while requests miss
    time.sleep(0.003)
    old, current[0] = current[0], SqliteStore(path)
    old.close()
stop.set()
for t in readers:
    t.join()
print(json.dumps(outcomes))
"""


def test_closing_a_store_while_other_threads_read_it_never_crashes(tmp_path: Path) -> None:
    """close() used to close every thread's connection under its running query: SIGSEGV. Now a busy
    connection is closed by its own thread when the query ends; reads succeed or raise StoreUnavailable
    (decisions() on a closed store is empty, as documented)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC_DIR), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CLOSED_UNDER_READS,
                          str(tmp_path / "db.sqlite"), "300"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, (run.returncode, run.stderr[-3000:])
    outcomes = json.loads(run.stdout)
    assert set(outcomes) <= {"decisions ok", "count ok", "count StoreUnavailable"}, outcomes
    assert outcomes.get("decisions ok") and outcomes.get("count ok"), outcomes

def test_leases_are_shared_between_instances(tmp_path: Path) -> None:
    a, b = SqliteStore(tmp_path / "db.sqlite"), SqliteStore(tmp_path / "db.sqlite")
    assert a.try_lease("tune:k", "host1:1", 10.0)
    assert not b.try_lease("tune:k", "host1:2", 10.0)
    a.release("tune:k", "host1:1")
    assert b.try_lease("tune:k", "host1:2", 10.0)
    a.close()
    b.close()


CHILD = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
from test_store import make_decision
from tunevault.store.sqlite import SqliteStore
wid, path, go = int(sys.argv[1]), sys.argv[2], sys.argv[3]
deadline = time.time() + 60
while not os.path.exists(go) and time.time() < deadline:
    time.sleep(0.001)
store = SqliteStore(path)  # all children create the schema at once
winners = {{}}
for i in range(100):
    store.put(make_decision(wid * 1000 + i))
    if i % 5 == 0:
        winners[-1 - i] = store.put(make_decision(-1 - i, config_index=wid)).config_index
store.close()
print(json.dumps(winners))
"""


def test_processes_share_one_file(tmp_path: Path) -> None:
    path, go = tmp_path / "shared" / "db.sqlite", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC_DIR), os.environ.get("PYTHONPATH", "")])}
    script = CHILD.format(tests=str(TESTS_DIR))
    children = [subprocess.Popen([sys.executable, "-c", script, str(w), str(path), str(go)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for w in range(4)]
    time.sleep(0.5)  # let every interpreter start, then release them together
    go.touch()
    results = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        assert "Traceback" not in err and "Error" not in err, err
        results.append({int(k): v for k, v in json.loads(out).items()})
    store = SqliteStore(path)
    assert store.count() == 4 * 100 + 20
    for w in range(4):
        for i in range(100):
            assert store.get(*make_decision(w * 1000 + i).store_key) is not None
    for key in results[0]:
        stored = store.get(*make_decision(key).store_key)
        assert stored is not None
        assert {r[key] for r in results} == {stored.config_index}  # one value, seen by all
    store.close()


def test_a_store_busy_when_opened_is_not_read_only_for_the_process(tmp_path: Path) -> None:
    """Another writer holding the lock past the busy wait is contention, not "cannot write": the store
    stays writable, and a new file whose tables wait on the lock gets them at its first use."""
    for name, existing in (("decided.db", True), ("new.db", False)):
        path = tmp_path / name
        if existing:
            SqliteStore(path).close()
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # e.g. another process's long write or a backup
        store = SqliteStore(path, timeout_s=0.1)
        assert store.read_only is None, store.read_only
        if not existing:
            with pytest.raises(StoreUnavailable, match="next use"):
                store.put(make_decision(1))  # still busy: this write fails, the store is not given up
        other.execute("COMMIT")
        other.close()
        assert store.put(make_decision(1)) == make_decision(1)
        assert store.get(*make_decision(1).store_key) == make_decision(1)
        store.close()


FOREIGN_LAYOUTS = {
    # A harmless view here: the one in the review was an endless recursive CTE, and reading it filled the disk.
    "view": "CREATE VIEW decisions(kernel_digest, fingerprint_digest, key_text, kernel_name, payload, created) AS "
            "SELECT 'k', 'f', 'x', 'name', 'p', 0.0",
    "trigger": "CREATE TABLE decisions (kernel_digest TEXT NOT NULL, fingerprint_digest TEXT NOT NULL, key_text TEXT "
               "NOT NULL, kernel_name TEXT NOT NULL, payload TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY "
               "(kernel_digest, fingerprint_digest, key_text)); CREATE TRIGGER t AFTER INSERT ON decisions BEGIN "
               "DELETE FROM leases; END",
    "columns": "CREATE TABLE decisions (kernel_digest, fingerprint_digest, key_text, kernel_name, payload, created, "
               "extra TEXT)",
}


@pytest.mark.parametrize("layout", sorted(FOREIGN_LAYOUTS))
def test_a_file_claiming_our_layout_version_is_checked_before_it_is_read(tmp_path: Path, layout: str) -> None:
    path = tmp_path / f"{layout}.db"
    with closing(sqlite3.connect(path)) as db:
        db.executescript("PRAGMA user_version = 1; CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, "
                         f"expires REAL NOT NULL); {FOREIGN_LAYOUTS[layout]};")
    before = path.read_bytes()
    for writable in (True, False):
        with pytest.raises(StoreUnavailable, match="tunevault never makes|other columns"):
            SqliteStore(path, writable=writable)
    assert path.read_bytes() == before


def test_a_read_only_open_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="no such file"):
        SqliteStore(tmp_path / "missing.db", writable=False)
    assert not (tmp_path / "missing.db").exists()


def test_quick_check_gives_one_line_per_finding(tmp_path: Path) -> None:
    """SQLite reports a damaged page's findings as one multi-line row under a header; a miss
    message quotes the first finding and must stay one line."""
    import sqlite3

    from tunevault.store.sqlite_file import quick_check

    path = tmp_path / "damaged.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT)")
        db.executemany("INSERT INTO t VALUES (?, ?)", [(i, "x" * 200) for i in range(200)])
    data, page = bytearray(path.read_bytes()), 4096
    leaf = next(n * page for n in range(1, len(data) // page) if data[n * page] == 0x0D)  # a table leaf
    cells = int.from_bytes(data[leaf + 3:leaf + 5], "big")
    data[leaf + 8:leaf + 8 + 2 * cells] = bytes(2 * cells)  # its cell pointers: "Offset 0 out of range"
    path.write_bytes(bytes(data))
    found = quick_check(str(path), limit=5)
    assert found and len(found) <= 5
    assert all("\n" not in f and "Offset 0 out of range" in f for f in found), found
