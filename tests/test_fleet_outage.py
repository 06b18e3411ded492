"""LayeredStore across a remote outage: what a host decides while Redis is down reaches the fleet
once it answers again, and the fleet's first writer wins on every host (the local entry included).

The tests pause a real redis-server (SIGSTOP) past the client's deadline, as a GC pause, a
failover or a network blip would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import redis_server
from tunevault.core.model import ConfigSpec, Decision, Fingerprint, KernelId, TuningKey
from tunevault.store import layered as layered_module
from tunevault.store.base import Query, open_store
from tunevault.store.layered import LayeredStore, open_layered
from tunevault.store.sqlite import SqliteStore

FP = Fingerprint("3.9.0", "cuda:90", "NVIDIA H100", "12.8")
EVERYTHING = Query()


def decision(n: int, index: int = 0) -> Decision:
    key = TuningKey((("N", n), ("dtype(x)", "float16")))
    return Decision(KernelId("pkg:fwd", "src0", "cfg0", ("N",)), FP, key, index,
                    ConfigSpec((("BLOCK", 32 << index),), (("num_warps", 4),)), margin=0.1)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tunevault" and r.levelno >= logging.WARNING]


def wait_until(ready: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[redis_server.RedisServer]:
    yield from redis_server.serve(tmp_path)


def layered(path: Path, server: redis_server.RedisServer) -> LayeredStore:
    store = open_layered(f"sqlite:///{path}", remote=server.url)
    assert isinstance(store, LayeredStore)
    return store


def put_during_a_pause(store: LayeredStore, server: redis_server.RedisServer, d: Decision) -> Decision:
    """``store.put(d)`` while Redis hangs past the deadline; returns once Redis would be tried again."""
    server.pause()
    try:
        published = store.put(d)
    finally:
        server.resume()
    assert store.remote_down
    assert store.remote is not None
    remote = store.remote
    wait_until(lambda: bool(getattr(remote, "available", True)))  # its backoff (1 s) is over
    return published


def test_a_decision_made_during_an_outage_reaches_the_fleet(tmp_path: Path,
                                                             server: redis_server.RedisServer) -> None:
    host_a, host_b = layered(tmp_path / "a.db", server), layered(tmp_path / "b.db", server)
    rstore = open_store(server.url)
    mine = decision(1, index=0)
    try:
        assert put_during_a_pause(host_a, server, mine) == mine  # kept locally only, for now
        assert rstore.get(*mine.store_key) is None
        assert host_a.get(*decision(2).store_key) is None  # A's next call publishes it
        assert rstore.get(*mine.store_key) == mine
        assert host_b.get(*mine.store_key) == mine, "another host reads what A decided during the outage"
        assert host_b.put(decision(1, index=2)) == mine, "and adopts it: A was the fleet's first writer"
        assert not host_a.remote_down
    finally:
        for store in (host_a, host_b, rstore):
            store.close()


def test_hosts_agree_after_another_host_wins_the_key_first(tmp_path: Path, server: redis_server.RedisServer,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """The reviewer's scenario: B publishes the key before A's outage-time decision reaches Redis."""
    host_a, host_b = layered(tmp_path / "a.db", server), layered(tmp_path / "b.db", server)
    mine, theirs = decision(1, index=0), decision(1, index=2)
    try:
        assert put_during_a_pause(host_a, server, mine) == mine
        assert host_b.put(theirs) == theirs  # Redis had no entry: B is the fleet's first writer
        with caplog.at_level(logging.WARNING, logger="tunevault"):
            assert host_a.get(*mine.store_key) == theirs, "A adopts the fleet's decision"
        assert any("held config #0 but the fleet chose #2; replaced it" in w for w in warnings_of(caplog))
        assert host_b.get(*mine.store_key) == theirs
        assert host_a.put(mine) == theirs
        assert host_a.get(*mine.store_key) == theirs
        fresh = layered(tmp_path / "a.db", server)  # a new process on host A
        assert fresh.get(*mine.store_key) == theirs
        fresh.close()
        local = SqliteStore(tmp_path / "a.db")
        assert local.get(*mine.store_key) == theirs, "A's local file holds the fleet's decision"
        local.close()
    finally:
        host_a.close()
        host_b.close()


def test_adopting_the_fleets_decision_replaces_the_local_entry(tmp_path: Path, server: redis_server.RedisServer,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """The local file holds #0 (an earlier process decided it offline), the fleet holds #2: a put
    adopts #2 and says so, and from then on every read on the host agrees with that message."""
    mine, fleet = decision(1, index=0), decision(1, index=2)
    local = SqliteStore(tmp_path / "a.db")
    local.put(mine)
    rstore = open_store(server.url)
    rstore.put(fleet)
    store = LayeredStore(local, open_store(server.url))
    try:
        with caplog.at_level(logging.WARNING, logger="tunevault"):
            assert store.put(mine) == fleet
        assert local.get(*mine.store_key) == fleet, "the local entry is replaced, as the warning says"
        assert [w for w in warnings_of(caplog) if "the fleet chose #2" in w] == [
            f"tunevault: pkg:fwd [{mine.key.describe()}]: the local store {local.url} held config #0 but the "
            "fleet chose #2; replaced it with the fleet's"]
        assert store.get(*mine.store_key) == fleet
        fresh = layered(tmp_path / "a.db", server)
        assert fresh.get(*mine.store_key) == fleet
        fresh.close()
    finally:
        store.close()
        rstore.close()


def test_pending_decisions_are_bounded_and_forget_deleted_ones(
        tmp_path: Path, server: redis_server.RedisServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(layered_module, "PENDING_CAP", 3, raising=False)
    store, rstore = layered(tmp_path / "a.db", server), open_store(server.url)
    made = [decision(n, index=n % 3) for n in range(1, 6)]
    try:
        server.pause()
        try:
            with caplog.at_level(logging.WARNING, logger="tunevault"):
                for d in made:  # the first waits out the deadline; the rest meet the backoff
                    assert store.put(d) == d
        finally:
            server.resume()
        dropped = [w for w in warnings_of(caplog) if "wait for the remote store" in w]
        assert len(dropped) == 1, dropped  # one line, not one per decision past the cap
        store.delete(Query(key_text=made[1].key.text))  # deleted here: not published later either
        remote = store.remote
        assert remote is not None
        wait_until(lambda: bool(getattr(remote, "available", True)))
        assert store.get(*decision(99).store_key) is None  # the next call publishes what waits
        published = {d.store_key for d in made if rstore.get(*d.store_key) is not None}
        assert published == {made[0].store_key, made[2].store_key}, "the first 3 minus the deleted one"
    finally:
        store.close()
        rstore.close()


def test_a_supersede_during_an_outage_replaces_the_fleets_stale_entry_later(
        tmp_path: Path, server: redis_server.RedisServer) -> None:
    store, rstore = layered(tmp_path / "a.db", server), open_store(server.url)
    stale, fixed = decision(1, index=0), decision(1, index=1)
    try:
        assert store.put(stale) == stale and rstore.get(*stale.store_key) == stale
        server.pause()
        try:
            assert store.supersede(stale, fixed) == fixed
        finally:
            server.resume()
        remote = store.remote
        assert remote is not None
        wait_until(lambda: bool(getattr(remote, "available", True)))
        assert store.get(*fixed.store_key) == fixed, "the local fix is not undone by the fleet's stale entry"
        assert rstore.get(*fixed.store_key) == fixed, "the fleet's stale entry is replaced"
    finally:
        store.close()
        rstore.close()


def decide_and_exit_during_an_outage(path: Path, server: redis_server.RedisServer, d: Decision,
                                     stale: Decision | None = None) -> None:
    """A process on the host writes ``d`` (superseding ``stale``) while Redis hangs, and exits
    before Redis answers again: the decision is in the local file only."""
    store = layered(path, server)
    server.pause()
    try:
        written = store.put(d) if stale is None else store.supersede(stale, d)
        assert written == d and store.remote_down
        store.close()  # Redis still hangs (and backs off): nothing published
    finally:
        server.resume()


def marks_in(path: Path) -> dict[str, str]:
    local = SqliteStore(path)
    try:
        return local.leases("unpublished:")
    finally:
        local.close()


def test_a_decision_left_local_by_a_process_that_exited_reaches_the_fleet(
        tmp_path: Path, server: redis_server.RedisServer) -> None:
    mine = decision(1, index=1)
    rstore = open_store(server.url)
    decide_and_exit_during_an_outage(tmp_path / "a.db", server, mine)
    assert rstore.get(*mine.store_key) is None and len(marks_in(tmp_path / "a.db")) == 1
    nxt = layered(tmp_path / "a.db", server)  # the next process on host A, Redis answering
    try:
        assert nxt.get(*decision(2).store_key) is None  # its first store call publishes the marked one
        assert rstore.get(*mine.store_key) == mine, "the fleet gets what A decided during the outage"
        assert marks_in(tmp_path / "a.db") == {}, "and the mark is gone"
    finally:
        nxt.close()
        rstore.close()


def test_the_next_process_adopts_the_fleets_winner_over_a_marked_decision(
        tmp_path: Path, server: redis_server.RedisServer) -> None:
    mine, theirs = decision(1, index=0), decision(1, index=2)
    host_b, rstore = layered(tmp_path / "b.db", server), open_store(server.url)
    decide_and_exit_during_an_outage(tmp_path / "a.db", server, mine)
    assert host_b.put(theirs) == theirs  # B wins the key while A's decision sits in A's file
    nxt = layered(tmp_path / "a.db", server)
    try:
        assert nxt.get(*decision(2).store_key) is None
        assert nxt.get(*mine.store_key) == theirs, "host A now launches the fleet's winner"
        local = SqliteStore(tmp_path / "a.db")
        assert local.get(*mine.store_key) == theirs
        local.close()
        assert rstore.get(*mine.store_key) == theirs and marks_in(tmp_path / "a.db") == {}
    finally:
        for store in (nxt, host_b, rstore):
            store.close()


def test_a_marked_supersede_replaces_the_fleets_stale_entry(tmp_path: Path,
                                                            server: redis_server.RedisServer) -> None:
    stale, fixed = decision(1, index=0), decision(1, index=1)
    rstore = open_store(server.url)
    assert rstore.put(stale) == stale
    decide_and_exit_during_an_outage(tmp_path / "a.db", server, fixed, stale=stale)
    nxt = layered(tmp_path / "a.db", server)
    try:
        assert nxt.get(*decision(2).store_key) is None
        assert rstore.get(*fixed.store_key) == fixed, "the stale entry is replaced, not adopted"
        assert nxt.get(*fixed.store_key) == fixed
    finally:
        nxt.close()
        rstore.close()


def test_marks_of_removed_or_malformed_entries_publish_nothing(tmp_path: Path,
                                                               server: redis_server.RedisServer) -> None:
    gone = decision(1, index=1)
    decide_and_exit_during_an_outage(tmp_path / "a.db", server, gone)
    local = SqliteStore(tmp_path / "a.db")
    assert local.delete(Query(key_text=gone.key.text)) == 1  # `tunevault rm` while Redis was down
    assert local.try_lease("unpublished:x", "{not json", 60.0)
    assert local.try_lease("unpublished:y", '{"format": "tunevault-unpublished/1", "store_key": [1, 2]}', 60.0)
    local.close()
    rstore = open_store(server.url)
    nxt = layered(tmp_path / "a.db", server)
    try:
        assert nxt.get(*decision(2).store_key) is None
        assert rstore.get(*gone.store_key) is None and nxt.get(*gone.store_key) is None
        assert set(marks_in(tmp_path / "a.db")) == {"unpublished:x", "unpublished:y"}, "only the removed key's goes"
    finally:
        nxt.close()
        rstore.close()


PAUSING_KERNELS = '''
import os
import signal

import triton
import triton.language as tl


def pause_redis(nargs):
    """Hang the Redis server named by the variable, once: the tuning's publish then times out."""
    pid = os.environ.pop("TV_TEST_PAUSE_PID", "")
    if pid:
        os.kill(int(pid), signal.SIGSTOP)


@triton.autotune(configs=[triton.Config({"BLOCK": 16}, pre_hook=pause_redis), triton.Config({"BLOCK": 32})],
                 key=["n"])
@triton.jit
def add_one(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


def run(n):
    import torch

    x = torch.arange(n, dtype=torch.float32)
    out = torch.empty_like(x)
    add_one[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, out, n)
    return out
'''


@pytest.mark.parametrize("resumes", [True, False])
def test_a_publish_that_timed_out_but_landed_is_not_reported_failed(
        tmp_path: Path, server: redis_server.RedisServer, monkeypatch: pytest.MonkeyPatch, resumes: bool) -> None:
    """Redis hangs while the tuning's SET NX is in flight, and runs it when it resumes: the store
    holds the key's decision, so warmup reports it tuned (exit 0), not failed. Where Redis stays
    hung, the key fails with a reason that says why by itself (a ``--jobs`` parent shows no
    child's warnings)."""
    import sys

    import torch

    import tunevault

    (tmp_path / "tv_pausing.py").write_text(PAUSING_KERNELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tv_pausing", raising=False)
    import tv_pausing  # type: ignore[import-not-found]

    tunevault.install(mode="tune", store="memory://")
    with tunevault.capture(tmp_path / "keys.jsonl"):
        assert torch.equal(tv_pausing.run(40), torch.arange(40, dtype=torch.float32) + 1)
    tunevault.uninstall()

    class ResumeAfterTheFailedWrite(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if resumes and "store write failed" in record.getMessage():
                server.resume()  # before the warmup reads the key again

    handler = ResumeAfterTheFailedWrite()
    logging.getLogger("tunevault").addHandler(handler)
    try:
        assert server.proc is not None
        monkeypatch.setenv("TV_TEST_PAUSE_PID", str(server.proc.pid))
        tunevault.install(mode="tune", store=server.url)
        report = tunevault.warmup(str(tmp_path / "keys.jsonl"))
        tunevault.uninstall()
    finally:
        logging.getLogger("tunevault").removeHandler(handler)
        server.resume()
    (item,) = report.items
    if not resumes:
        assert item.status == "failed" and "see the warning" not in item.reason, item
        assert "store write failed: redis store" in item.reason and "failed to publish" in item.reason, item
        return
    assert item.status == "tuned" and report.ok, item
    assert len(list(open_store(server.url).decisions(Query()))) == 1
