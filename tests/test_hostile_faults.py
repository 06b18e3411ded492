"""Issue 14, breakages 4, 9 and 10: slow servers, a forging worker hook, and stores in odd places.

A Redis that trickles valid bytes or never answers, a config hook that forges results on the
worker's descriptors, a stored entry naming an undeclared config, a read-only directory, a
dangling symlink and a full file system. Assertions are what a user sees: right results,
declared launches, the store backing off (the server is not asked again), what ``ls`` shows.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path

import pytest

import kernels_hostile as kh
import tunevault
from hostile import cli
from slow_faults import SilentServer, TrickleServer, read_only_copy, small_filesystem
from tunevault.integration.triton_adapter import runtime
from tunevault.store.base import StoreUnavailable
from tunevault.store.sqlite import SqliteStore

pytestmark = pytest.mark.timeout(240)


def tuned_launches(n: int) -> int:
    """Launches of one call of add_one for ``n`` (1: a decided key; more: it was tuned)."""
    return len(kh.call_checked(kh.add_one, n).seen)


# -- 4: a slow Redis ---------------------------------------------------------------------------

@pytest.mark.parametrize("server", [TrickleServer, SilentServer])
def test_slow_redis_costs_one_deadline_then_the_store_backs_off(server: type, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("redis")
    from tunevault.store.redis import RedisStore

    with server() as fake:
        store = RedisStore(fake.url)
        with pytest.raises(StoreUnavailable, match="deadline|timed out|Timeout"):
            store.get("k", "f", "key")
        assert not store.available, "backing off: the next calls fail fast without the network"
        with pytest.raises(StoreUnavailable, match="unreachable; retrying"):
            store.get("k", "f", "key")
        assert fake.connections == 1

        tunevault.install(mode="tune", store="memory://", remote=fake.url)
        for n in kh.SIZES:
            assert tuned_launches(n) > 1
        assert runtime().store.remote_down
        # Each miss makes about five remote operations; backing off (1 s, doubling) leaves the server
        # a connection or two, where retrying every operation would have made ten.
        assert fake.connections - 1 <= 3, fake.connections
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "remote store unusable" in warnings[0], warnings


def test_redis_deadline_is_set_from_the_url() -> None:
    pytest.importorskip("redis")
    from tunevault.store.redis import RedisStore

    assert RedisStore("redis://127.0.0.1:1/0?deadline=2.5").deadline == 2.5
    assert RedisStore("redis://127.0.0.1:1/0?socket_timeout=3").deadline == 6.0
    with pytest.raises(StoreUnavailable, match="deadline"):
        RedisStore("redis://127.0.0.1:1/0?deadline=forever")


# -- 9: a hook forging results on the worker's descriptors ---------------------------------------

def test_forged_worker_results_are_ignored(sqlite_url: str) -> None:
    tunevault.install(mode="tune", store=sqlite_url, isolate=True)
    assert len(kh.call_checked(kh.forging, 40, lambda: kh.run(kh.forging, 40)).seen) == 1
    (decision,) = runtime().decided.values()
    timings = {c.index: c.timings for c in decision.candidates}
    assert dict(decision.provenance)["tuned_in"] == "worker"
    assert all(t and min(t) > 0 for t in timings.values()), f"a forged 0 ms result was recorded: {timings}"


# -- 10: stores in odd places ---------------------------------------------------------------------

def test_entry_naming_an_undeclared_config_is_superseded_on_retune(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    tunevault.install(mode="tune", store=url)
    tuned_launches(40)
    tunevault.uninstall()
    with sqlite3.connect(tmp_path / "s.db") as db:
        (payload,) = db.execute("SELECT payload FROM decisions").fetchone()
        doc = json.loads(payload)
        doc["config_index"], doc["config"]["kwargs"]["BLOCK"] = 7, 128  # declared nowhere
        db.execute("UPDATE decisions SET payload = ?", (json.dumps(doc, sort_keys=True, separators=(",", ":")),))

    tunevault.install(mode="tune", store=url)
    assert tuned_launches(40) > 1, "the bad entry is ignored: the key is tuned again"
    tunevault.uninstall()
    code, out, _ = cli("--store", url, "ls", "--json")
    (row,) = json.loads(out)
    assert code == 0 and row["config_index"] < len(kh.CONFIGS) and row["config"]["kwargs"]["BLOCK"] != 128
    tunevault.install(mode="tune", store=url)  # a restart: decided, no tuning
    assert tuned_launches(40) == 1


def test_read_only_directory_with_a_decided_store_is_used_read_only(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "src").mkdir()
    tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'src' / 's.db'}")
    tuned_launches(40)
    tunevault.uninstall()
    with read_only_copy(tmp_path / "src", tmp_path / "ro") as ro:
        tunevault.install(mode="tune", store=f"sqlite:///{ro / 's.db'}")
        assert tuned_launches(40) == 1, "the stored decision is used: no tuning"
        assert tuned_launches(48) > 1, "a new key is tuned, and kept in memory"
        store = runtime().store
        assert isinstance(store, SqliteStore) and store.read_only
        tunevault.uninstall()
        assert cli("--store", f"sqlite:///{ro / 's.db'}", "ls")[0] == 0


def test_store_path_never_creates_a_dangling_symlinks_target(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "elsewhere" / "target.db"
    (tmp_path / "elsewhere").mkdir()
    os.symlink(target, tmp_path / "link.db")
    tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'link.db'}")
    for n in kh.SIZES:
        assert tuned_launches(n) > 1
    assert not target.exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "symlink" in warnings[0] and "does not exist" in warnings[0], warnings


def test_full_filesystem_never_fails_a_call(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with small_filesystem(tmp_path / "full", size_kb=64) as full:
        fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError, match="No space"):
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        tunevault.install(mode="tune", store=f"sqlite:///{full / 's.db'}", events=str(full / "events.jsonl"),
                          capture=str(full / "keys.jsonl"))
        for n in kh.SIZES:
            assert tuned_launches(n) > 1
            assert tuned_launches(n) == 1
        tunevault.uninstall()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING], "said so"
