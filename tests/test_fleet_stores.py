"""The fleet's stores against a real redis-server: Redis store, layered reads and writes, bundles.

A user notices: one decision per key whatever the order of writers, a dead or hung Redis that
costs one warning and nothing else, a bundle that serves decisions, and a tampered one refused.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

import redis_server
from tunevault.core.model import ConfigSpec, Decision, Fingerprint, KernelId, TuningKey
from tunevault.store.base import Query, Store, StoreUnavailable, open_store
from tunevault.store.bundle import BundleError, BundleStore, load_bundle, write_bundle
from tunevault.store.layered import LayeredStore, open_layered
from tunevault.store.memory import MemoryStore
from tunevault.store.sqlite import SqliteStore

FP = Fingerprint("3.9.0", "cuda:90", "NVIDIA H100", "12.8")


def decision(n: int, index: int = 0, kernel: str = "pkg.attn:fwd", fp: Fingerprint = FP) -> Decision:
    key = TuningKey((("N", n), ("dtype(x)", "float16")))
    config = ConfigSpec((("BLOCK", 32 << index),), (("num_warps", 4),))
    return Decision(KernelId(kernel, "src0", "cfg0", ("N",)), fp, key, index, config, margin=0.1,
                    provenance=(("pid", 1),))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tunevault" and r.levelno >= logging.WARNING]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[redis_server.RedisServer]:
    yield from redis_server.serve(tmp_path)


@pytest.fixture
def rstore(server: redis_server.RedisServer) -> Iterator[Store]:
    store = open_store(server.url)
    yield store
    store.close()


# -- the Redis store -------------------------------------------------------------------------

def test_redis_first_writer_wins_across_clients(server: redis_server.RedisServer) -> None:
    a, b = open_store(server.url), open_store(server.url)
    try:
        first, second = decision(1, index=0), decision(1, index=2)
        assert a.get(*first.store_key) is None
        assert a.put(first) == first
        assert b.put(second) == first, "a later writer adopts the published decision"
        assert b.get(*first.store_key) == first
        assert a.put(decision(2, index=1)).config_index == 1
        assert a.count() == b.count() == 2
    finally:
        a.close()
        b.close()


def test_redis_listing_and_delete(rstore: Store) -> None:
    for n in (1, 2, 3):
        rstore.put(decision(n))
    other = decision(1, kernel="pkg.mlp:gate")
    rstore.put(other)
    assert len(list(rstore.decisions())) == 4
    assert {d.key.items[0][1] for d in rstore.decisions(Query(kernel="attn"))} == {1, 2, 3}
    assert list(rstore.decisions(Query(kernel_digest=other.kernel.digest, fingerprint_digest=FP.digest,
                                       key_text=other.key.text))) == [other]
    assert rstore.delete(Query(kernel="mlp")) == 1
    assert rstore.count() == 3
    assert rstore.delete() == 3
    assert rstore.count() == 0 and rstore.get(*other.store_key) is None


def test_redis_corrupt_or_swapped_entries_are_misses(rstore: Store, server: redis_server.RedisServer,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    import redis

    from tunevault.store.redis import entry_key

    raw = redis.Redis.from_url(server.url)
    good, other = decision(1), decision(2)
    rstore.put(good)
    rstore.put(other)
    raw.set(entry_key(*good.store_key), b"{not json")
    raw.set(entry_key(*other.store_key), decision(3).dumps())  # a valid entry under the wrong key
    with caplog.at_level(logging.WARNING, logger="tunevault"):
        assert rstore.get(*good.store_key) is None
        assert rstore.get(*other.store_key) is None
        assert list(rstore.decisions()) == []
    assert any("corrupt decision in redis store" in w for w in warnings_of(caplog))
    assert rstore.put(good) == good, "a corrupt entry heals on the next publish"
    assert rstore.get(*good.store_key) == good
    raw.close()


def test_a_non_utf8_redis_entry_is_corrupt_and_heals(tmp_path: Path, server: redis_server.RedisServer) -> None:
    """Bytes that are not UTF-8 are one more corrupt entry: put replaces them, and a layered store
    does not take the remote for down (put used to raise UnicodeDecodeError before validating)."""
    import redis

    from tunevault.store.redis import entry_key

    raw = redis.Redis.from_url(server.url)
    first, second = decision(1), decision(2)
    raw.set(entry_key(*first.store_key), b"\xff\xfe corrupt")
    raw.set(entry_key(*second.store_key), b"\xff\xfe corrupt")
    store = open_store(server.url)
    assert store.get(*first.store_key) is None
    assert store.put(first) == first and store.get(*first.store_key) == first
    layered = LayeredStore(MemoryStore(), open_store(server.url))
    assert layered.put(second) == second and not layered.remote_down
    assert raw.get(entry_key(*second.store_key)) == second.dumps().encode()
    store.close()
    layered.close()
    raw.close()


def test_redis_leases(rstore: Store) -> None:
    assert rstore.try_lease("k", "a", 30)
    assert not rstore.try_lease("k", "b", 30)
    assert rstore.try_lease("k", "a", 30), "the holder renews"
    rstore.release("k", "b")  # not the holder: no effect
    assert not rstore.try_lease("k", "b", 30)
    rstore.release("k", "a")
    assert rstore.try_lease("k", "b", 0.05)
    deadline = time.monotonic() + 30
    while not rstore.try_lease("k", "c", 30):  # b never renews: its lease expires and c takes over
        assert time.monotonic() < deadline, "an expired lease was never released"
        time.sleep(0.02)
    assert rstore.try_lease("failed:k[1]*", '{"kernel": "x"}', 30) and rstore.try_lease("failed:k2", "y", 30)
    assert rstore.leases("failed:k[") == {"failed:k[1]*": '{"kernel": "x"}'}  # glob characters are text
    assert rstore.leases("failed:") == {"failed:k[1]*": '{"kernel": "x"}', "failed:k2": "y"}
    assert "k" in rstore.leases("k")


def test_listing_leases_on_a_crowded_redis_keeps_its_deadline(server: redis_server.RedisServer) -> None:
    """``rm`` lists failed-key records with SCAN, one round trip per thousand keys: on a Redis shared
    with many other keys it stops at the deadline (and says how to raise it) instead of
    reconnecting after the watchdog and running on."""
    import redis

    raw = redis.Redis.from_url(server.url)
    raw.eval("for i = 1, 200000 do redis.call('SET', 'other:app:' .. i, 'v') end", 0)
    raw.close()
    store = open_store(server.url + "?deadline=0.001")
    try:
        with pytest.raises(StoreUnavailable, match=r"failed to read leases \(no complete answer within its "
                                                   r".* raise it with \?deadline=S in the store URL"):
            store.leases("failed:")  # type: ignore[attr-defined]
    finally:
        store.close()
    roomy = open_store(server.url + "?deadline=600")
    try:
        assert roomy.try_lease("failed:k", "x", 30)
        assert roomy.leases("failed:") == {"failed:k": "x"}  # type: ignore[attr-defined]
    finally:
        roomy.close()


def test_redis_down_fails_fast_and_backs_off(rstore: Store, server: redis_server.RedisServer) -> None:
    d = decision(1)
    rstore.put(d)
    server.kill()
    with pytest.raises(StoreUnavailable, match="redis store .* failed to read"):
        rstore.get(*d.store_key)
    assert not rstore.available  # type: ignore[attr-defined]
    with pytest.raises(StoreUnavailable, match="retrying in"):  # no network round trip while backing off
        rstore.put(d)


def test_missing_redis_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # as if the optional extra were not installed
    with pytest.raises(StoreUnavailable, match=r"pip install 'tunevault\[redis\]' \(from a checkout: "
                                               r"pip install -e '\.\[redis\]'\)"):
        open_store("redis://127.0.0.1:1/0")


# -- the layered store -----------------------------------------------------------------------

def test_layered_reads_local_then_remote_then_bundles(tmp_path: Path, rstore: Store) -> None:
    local = SqliteStore(tmp_path / "local.db")
    in_local, in_remote, in_bundle = decision(1, 1), decision(2, 2), decision(3, 0)
    local.put(in_local)
    rstore.put(in_remote)
    rstore.put(replace(in_local, config_index=2))  # the local copy shadows the remote one
    write_bundle(tmp_path / "b.json", [in_bundle, replace(in_remote, config_index=0)], FP)
    layered = LayeredStore(local, rstore, [BundleStore(tmp_path / "b.json")])
    assert layered.get(*in_local.store_key) == in_local
    assert layered.get(*in_remote.store_key) == in_remote
    assert local.get(*in_remote.store_key) == in_remote, "a remote hit is copied into the local store"
    assert layered.get(*in_bundle.store_key) == in_bundle
    assert layered.get(*decision(4).store_key) is None
    assert {d.store_key: d.config_index for d in layered.decisions()} == {
        in_local.store_key: 1, in_remote.store_key: 2, in_bundle.store_key: 0}
    layered.close()


def test_layered_put_adopts_the_fleet_winner(tmp_path: Path, rstore: Store) -> None:
    local = SqliteStore(tmp_path / "local.db")
    layered = LayeredStore(local, rstore)
    fleet = decision(1, index=2)
    rstore.put(fleet)  # another host published first
    assert layered.put(decision(1, index=0)) == fleet
    assert local.get(*fleet.store_key) == fleet
    mine = decision(5, index=1)
    assert layered.put(mine) == mine
    assert rstore.get(*mine.store_key) == mine, "decisions write through to the remote"
    layered.close()


@pytest.mark.parametrize("failure", ["kill", "pause"])
def test_layered_survives_a_dead_or_hung_redis(tmp_path: Path, server: redis_server.RedisServer, failure: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    layered = open_layered(f"sqlite:///{tmp_path / 'local.db'}", remote=server.url)
    assert isinstance(layered, LayeredStore)
    before = decision(1)
    assert layered.put(before) == before
    server.kill() if failure == "kill" else server.pause()
    try:
        with caplog.at_level(logging.INFO, logger="tunevault"):
            for n in range(2, 12):  # new decisions keep being written and read, locally
                d = decision(n, index=n % 3)
                assert layered.get(*d.store_key) is None
                assert layered.put(d) == d
                assert layered.get(*d.store_key) == d
            assert layered.get(*before.store_key) == before
            assert layered.try_lease("x", "me", 30)
            assert layered.count() == 11
        remote_warnings = [w for w in warnings_of(caplog) if "remote store unusable" in w]
        assert len(remote_warnings) == 1, remote_warnings
        assert layered.remote_down
    finally:
        server.resume() if failure == "pause" else None
        layered.close()


def test_layered_with_unopenable_remote_keeps_local(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tunevault"):
        store = open_layered(f"sqlite:///{tmp_path / 'l.db'}", remote="nosuch://x")
    assert isinstance(store, SqliteStore)
    assert any("remote store nosuch://x not used" in w for w in warnings_of(caplog))
    store.close()


@pytest.mark.parametrize("db", ["abc", "1O"])
def test_a_redis_url_whose_database_is_not_a_number_is_refused(tmp_path: Path, server: redis_server.RedisServer,
                                                               db: str, caplog: pytest.LogCaptureFixture,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """redis-py ignores a path that is not a number and uses database 0: a typo (``/1O``) would
    silently share database 0. As $TUNEVAULT_REMOTE it is not used; as the CLI's --store, exit 2."""
    from tunevault.cli.main import main

    url = server.url.rsplit("/", 1)[0] + f"/{db}"
    with caplog.at_level(logging.WARNING, logger="tunevault"):
        store = open_layered(f"sqlite:///{tmp_path / 'l.db'}", remote=url)
    try:
        assert isinstance(store, SqliteStore)
        store.put(decision(1))
    finally:
        store.close()
    assert any(f"remote store {url} not used" in w and f"the database {db!r}" in w for w in warnings_of(caplog))
    capsys.readouterr()
    assert main(["--store", url, "rm", "--all"]) == 2
    assert f"the database {db!r} after the host is not a number" in capsys.readouterr().err
    db0 = open_store(server.url)
    try:
        assert db0.count() == 0, "nothing was written to database 0"
    finally:
        db0.close()


# -- bundles ---------------------------------------------------------------------------------

def test_bundle_round_trip_strips_candidates_and_other_fingerprints(tmp_path: Path) -> None:
    from tunevault.core.model import CandidateResult

    spec = decision(1).config
    with_timings = replace(decision(1), candidates=(CandidateResult(0, spec, (1.0, 0.9, 1.1)),))
    elsewhere = decision(2, fp=replace(FP, device="NVIDIA A100"))
    path = tmp_path / "bundle.json"
    assert write_bundle(path, [with_timings, decision(2, 1), elsewhere], FP, key="s3cret") == 2
    doc = json.loads(path.read_text())
    assert (doc["format"], doc["schema"]) == ("tunevault-decisions", 1)
    assert doc["signature"]["alg"] == "hmac-sha256"
    fp, loaded = load_bundle(path, key="s3cret")
    assert fp == FP
    assert loaded == [replace(with_timings, candidates=()), decision(2, 1)]
    assert BundleStore(path).get(*decision(2).store_key) == decision(2, 1), "unverified without a key"


def test_tampered_or_unsigned_bundle_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bundle.json"
    write_bundle(path, [decision(1, 0)], FP, key="s3cret")
    doc = json.loads(path.read_text())
    doc["decisions"][0]["config_index"] = 1  # a different winner
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="signature does not verify"):
        load_bundle(tampered, key="s3cret")
    with pytest.raises(BundleError, match="signature does not verify"):
        load_bundle(path, key="another key")
    write_bundle(tmp_path / "plain.json", [decision(1, 0)], FP)
    with pytest.raises(BundleError, match="is not signed"):
        load_bundle(tmp_path / "plain.json", key="s3cret")


def test_malformed_bundle_entries_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "bundle.json"
    write_bundle(path, [decision(1), decision(2)], FP)
    doc = json.loads(path.read_text())
    doc["decisions"][0]["config_index"] = "zero"
    doc["decisions"].append({"schema": 99})
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="tunevault"):
        _, loaded = load_bundle(path)
    assert loaded == [decision(2)]
    (warning,) = [w for w in warnings_of(caplog) if "malformed decision" in w]
    assert "ignoring 2 malformed decision(s)" in warning and "first #0" in warning


def test_a_bundle_of_many_malformed_entries_logs_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The size cap bounds the file, not the log: 10,000 bad entries in 20 KB used to be 10,000 warnings."""
    path = tmp_path / "bundle.json"
    write_bundle(path, [decision(1)], FP)
    doc = json.loads(path.read_text())
    doc["decisions"] += [0] * 10_000
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="tunevault"):
        _, loaded = load_bundle(path)
    assert loaded == [decision(1)]
    assert len(warnings_of(caplog)) == 1 and "10000 malformed" in warnings_of(caplog)[0]


def test_open_layered_rejects_a_bad_bundle_and_keeps_working(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    write_bundle(good, [decision(1)], FP, key="k")
    write_bundle(bad, [decision(2)], FP, key="k")
    bad.write_text(bad.read_text().replace('"BLOCK": 32', '"BLOCK": 64'))
    with caplog.at_level(logging.INFO, logger="tunevault"):
        store = open_layered(f"sqlite:///{tmp_path / 'l.db'}", bundles=(str(good), str(bad)), bundle_key="k")
    assert isinstance(store, LayeredStore) and len(store.bundles) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(str(bad) in e and "signature does not verify" in e for e in errors), errors
    assert any("another environment" in w for w in warnings_of(caplog)), "FP is not this machine's"
    assert store.get(*decision(1).store_key) == decision(1)
    assert store.get(*decision(2).store_key) is None
    store.put(decision(3))
    assert store.get(*decision(3).store_key) == decision(3)
    store.close()


def test_memory_store_leases_fall_back(tmp_path: Path) -> None:
    """Without a remote, leases live in the local store: one holder at a time."""
    layered = LayeredStore(MemoryStore(), None, [])
    assert layered.try_lease("k", "a", 30) and not layered.try_lease("k", "b", 30)
    layered.release("k", "a")
    assert layered.try_lease("k", "b", 30)
