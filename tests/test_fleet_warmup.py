"""Sharded warmup: processes divide a manifest's keys through the store's leases, with no collective.

Benchmark launches are counted below the autotuner (the test kernel's config ``pre_hook`` logs
``pid n`` per launch), and events files show who took which lease and when anyone waited.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kernels_shard as ks
import redis_server
import tunevault
from conftest import count_launches, subprocess_env
from tunevault.policy.shard import read_failed_record
from tunevault.store.sqlite import SqliteStore

SIZES = [64 + 29 * i for i in range(16)]

RANK = r"""
import json, logging, os, sys, time
from pathlib import Path

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
import tunevault
from tunevault.integration.triton_adapter import runtime

tunevault.install(mode="tune")  # store, remote, events and lease time to live from TUNEVAULT_*
Path(os.environ["TV_DIR"], f"ready.{os.getpid()}").touch()
while not Path(os.environ["TV_DIR"], "go").exists():
    time.sleep(0.01)
report = tunevault.warmup(os.environ["TV_MANIFEST"])
chosen = {d.key.text: d.config_index for d in runtime().decided.values()}
print(json.dumps({"pid": os.getpid(), "ok": report.ok, "counts": report.counts(), "chosen": chosen}))
"""


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "keys.jsonl"
    ks.write_manifest(path, SIZES)
    return path


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[redis_server.RedisServer]:
    yield from redis_server.serve(tmp_path)


def start_ranks(tmp_path: Path, manifest: Path, envs: list[dict[str, str]]) -> list[subprocess.Popen[str]]:
    """Processes that install, meet at a file barrier, then call ``tunevault.warmup`` at once."""
    procs = []
    for rank, extra in enumerate(envs):
        env = subprocess_env(TV_DIR=str(tmp_path), TV_MANIFEST=str(manifest),
                             TV_LAUNCH_LOG=str(tmp_path / "launch.log"), TUNEVAULT_CPU_BENCH_REPS="3",
                             TUNEVAULT_EVENTS=str(tmp_path / "events.jsonl"),
                             RANK=str(rank), WORLD_SIZE=str(len(envs)), **extra)
        procs.append(subprocess.Popen([sys.executable, "-c", RANK], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready.*"))) < len(procs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "ranks never got ready"
        time.sleep(0.02)
    (tmp_path / "go").touch()
    return procs


def finish(procs: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, f"rank failed ({p.returncode}):\n{stdout}\n{stderr}"
        assert "waiting up to" not in stderr, "a process blocked on another's lease:\n" + stderr
        out.append({**json.loads(stdout.strip().splitlines()[-1]), "stderr": stderr})
    return out


def events(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]


def assert_shared_without_waiting(tmp_path: Path, pids: set[int] | None = None) -> None:
    """Every key benchmarked by exactly one of ``pids`` (default: every process); none of them waited
    while a key was still free."""
    launched = {n: ps & pids if pids else ps for n, ps in ks.launches(tmp_path / "launch.log").items()}
    assert sorted(launched) == SIZES
    assert all(len(ps) == 1 for ps in launched.values()), f"a key was benchmarked twice: {launched}"
    evs = [e for e in events(tmp_path) if not pids or e["pid"] in pids]
    first_taken: dict[str, float] = {}
    for e in evs:
        if e["event"] == "lease_taken":
            text = json.dumps(e["key"])
            first_taken[text] = min(first_taken.get(text, e["time"]), e["time"])
    assert len(first_taken) == len(SIZES)
    for wait in (e for e in evs if e["event"] == "lease_wait"):
        free = [k for k, t in first_taken.items() if t > wait["time"]]
        assert not free, f"pid {wait['pid']} waited while {len(free)} key(s) were still untaken"
    tunings = [e for e in evs if e["event"] == "tuning"]
    assert len(tunings) == len(SIZES)


def test_two_ranks_on_one_sqlite_store_tune_each_key_once(tmp_path: Path, manifest: Path) -> None:
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    ranks = finish(start_ranks(tmp_path, manifest, [{"TUNEVAULT_STORE": store}] * 2))
    assert all(r["ok"] and r["counts"]["tuned"] + r["counts"]["decided"] == len(SIZES) for r in ranks)
    assert sum(r["counts"]["tuned"] for r in ranks) == len(SIZES)
    assert_shared_without_waiting(tmp_path)
    assert ranks[0]["chosen"] == ranks[1]["chosen"] and len(ranks[0]["chosen"]) == len(SIZES), \
        "every rank leaves with every decision loaded, the same ones"


def test_hosts_sharing_redis_tune_each_key_once_per_fingerprint(tmp_path: Path, manifest: Path,
                                                                redis: redis_server.RedisServer) -> None:
    hosts = [{"TUNEVAULT_STORE": f"sqlite:///{tmp_path / f'host{i}.db'}", "TUNEVAULT_REMOTE": redis.url}
             for i in range(3)]
    hosts[2]["TRITON_DEFAULT_FP_FUSION"] = "0"  # a codegen setting in the fingerprint: "another GPU model"
    ranks = finish(start_ranks(tmp_path, manifest, hosts))
    assert all(r["ok"] for r in ranks)
    assert sum(r["counts"]["tuned"] for r in ranks[:2]) == len(SIZES)
    assert_shared_without_waiting(tmp_path, {ranks[0]["pid"], ranks[1]["pid"]})
    assert ranks[0]["chosen"] == ranks[1]["chosen"]
    for i in range(2):  # each host's own file now holds every decision: it restarts without the network
        assert SqliteStore(tmp_path / f"host{i}.db").count() == len(SIZES)
    assert ranks[2]["counts"]["tuned"] == len(SIZES), "the other fingerprint tuned its own keys"
    assert_shared_without_waiting(tmp_path, {ranks[2]["pid"]})


def test_a_killed_holder_loses_its_key_to_the_other_after_the_lease_expires(tmp_path: Path,
                                                                          manifest: Path) -> None:
    store, orphan = f"sqlite:///{tmp_path / 'shared.db'}", SIZES[0]
    common = {"TUNEVAULT_STORE": store, "TUNEVAULT_LEASE_TTL": "1.5"}
    victim, survivor = start_ranks(tmp_path, manifest, [  # rank 0 starts its walk at the orphan and hangs there
        {**common, "TV_HANG_N": str(orphan), "TV_HANG_FILE": str(tmp_path / "hung")}, common])
    deadline = time.monotonic() + 60
    while not (tmp_path / "hung").exists():
        assert time.monotonic() < deadline and victim.poll() is None, victim.communicate()
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    (result,) = finish([survivor])
    assert result["ok"] and result["counts"]["tuned"] + result["counts"]["decided"] == len(SIZES)
    launched = ks.launches(tmp_path / "launch.log")
    assert launched[orphan] == {victim.pid, result["pid"]}, "the orphan was tuned again, by the survivor"
    assert all(len(launched[n]) == 1 for n in SIZES[1:])
    taken = [e for e in events(tmp_path) if e["event"] == "lease_taken" and e["pid"] == result["pid"]
             and dict(map(tuple, e["key"]))["n"] == orphan]
    assert len(taken) == 1
    assert SqliteStore(tmp_path / "shared.db").count() == len(SIZES)


def hold_first_key(tmp_path: Path, manifest: Path, ttl: float) -> tuple[SqliteStore, Any]:
    """A store where "another process" holds the lease of the manifest's first key for ``ttl`` s."""
    from tunevault.capture.manifest import read
    from tunevault.core.identity import current_fingerprint, kernel_id
    from tunevault.policy.lease import lease_name

    held = read(manifest)[0].key
    store = SqliteStore(tmp_path / "held.db")
    name = lease_name(kernel_id(ks.shard_scale).digest, current_fingerprint().digest, held.text)
    assert store.try_lease(name, "another-host:1:x", ttl)
    return store, held


def test_a_held_key_is_skipped_and_taken_last_once_its_holder_is_gone(tmp_path: Path, manifest: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEVAULT_WARMUP_WORKER", "0/1")  # this process starts its walk at the held key
    store, held = hold_first_key(tmp_path, manifest, 3.0)  # taken by a process that died at once
    tunevault.install(mode="tune", store=store.url, events=str(tmp_path / "events.jsonl"))
    report = tunevault.warmup(manifest)
    assert report.ok and report.counts()["tuned"] == len(SIZES)
    evs = [e for e in events(tmp_path) if e["event"].startswith("lease_")]
    assert evs[0]["event"] == "lease_skipped" and evs[0]["key"] == held.to_json(), "skipped, not waited on"
    taken = [e for e in evs if e["event"] == "lease_taken"]
    assert taken[-1]["key"] == held.to_json() and taken[-1]["revisited"], "taken last, once its lease expired"
    for wait in (e for e in evs if e["event"] == "lease_wait"):  # waited only with nothing else left to do
        assert wait["remaining"] == 1 and wait["time"] > taken[-2]["time"]


def test_a_key_held_past_lease_wait_is_tuned_here_without_waiting_again(
        tmp_path: Path, manifest: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    monkeypatch.setenv("TUNEVAULT_WARMUP_WORKER", "0/1")
    store, held = hold_first_key(tmp_path, manifest, 600.0)  # alive and renewing, but never finishing
    tunevault.install(mode="tune", store=store.url, lease_wait=0.5)
    with caplog.at_level(logging.INFO, logger="tunevault"):
        report = tunevault.warmup(manifest)
    assert report.ok and report.counts()["tuned"] == len(SIZES)
    said = [r.getMessage() for r in caplog.records]
    assert sum("tuning here too" in m for m in said) == 1
    assert not any("waiting up to" in m for m in said), "the tuning path waited for the holder again"


def test_cli_jobs_share_the_keys_and_summarise(tmp_path: Path, manifest: Path) -> None:
    env = subprocess_env(TV_LAUNCH_LOG=str(tmp_path / "launch.log"), TUNEVAULT_EVENTS=str(tmp_path / "events.jsonl"),
                         TUNEVAULT_CPU_BENCH_REPS="3")
    store = f"sqlite:///{tmp_path / 'jobs.db'}"
    cmd = [sys.executable, "-m", "tunevault.cli.main", "--store", store, "warmup", str(manifest), "--jobs", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"warmup: {len(SIZES)} tuned, 0 already decided, 0 skipped, 0 failed" in done.stdout
    assert "2 processes" in done.stdout and f"[{len(SIZES)}/{len(SIZES)}]" in done.stderr  # plain progress
    assert_shared_without_waiting(tmp_path)

    again = subprocess.run(cmd[:-1] + ["1", "--json"], capture_output=True, text=True, env=env, timeout=180)
    report = json.loads(again.stdout)
    assert again.returncode == 0 and report["ok"]
    assert report["counts"] == {"tuned": 0, "decided": len(SIZES), "skipped": 0, "failed": 0}
    assert [w["tuned"] for w in report["workers"]] == [0]


def test_cli_jobs_json_has_every_field_of_the_single_process_json(tmp_path: Path) -> None:
    """A script reading ``warmup --json`` works with and without --jobs: the same fields (malformed
    lines, each item's seconds), the items in manifest order; --jobs adds its workers."""
    path = tmp_path / "keys.jsonl"
    ks.write_manifest(path, SIZES[:3])
    lines = path.read_text().splitlines()
    moved = json.loads(lines[1]) | {"kernel": "no_such_module_here:k"}  # skipped, with a reason
    path.write_text("\n".join([lines[0], json.dumps(moved), lines[2], '{"format": "tunevault-manifest/1"}']) + "\n")
    env = subprocess_env(TUNEVAULT_CPU_BENCH_REPS="3")
    reports = []
    for store, jobs in (("one.db", []), ("jobs.db", ["--jobs", "2"])):
        done = subprocess.run([sys.executable, "-m", "tunevault.cli.main", "--store", f"sqlite:///{tmp_path / store}",
                               "warmup", str(path), "--json", *jobs], capture_output=True, text=True, env=env,
                              timeout=180)
        assert done.returncode == 1, done.stdout + done.stderr  # a malformed line and a skipped key
        reports.append(json.loads(done.stdout))
    one, jobs = reports
    assert set(one) <= set(jobs) and {"workers", "spawn_s"} <= set(jobs), (sorted(one), sorted(jobs))
    assert one["malformed"] == jobs["malformed"] == [{"line": 4, "reason": "kernel must be 'module:qualname'"}]
    assert one["ok"] is jobs["ok"] is False and one["counts"] == jobs["counts"]
    assert all(set(a) <= set(b) for a, b in zip(one["items"], jobs["items"], strict=True))
    assert [(i["kernel"], i["key"], i["status"]) for i in one["items"]] == \
        [(i["kernel"], i["key"], i["status"]) for i in jobs["items"]]
    assert all(i["seconds"] > 0 for i in jobs["items"] if i["status"] == "tuned")


def test_cli_jobs_count_each_key_of_a_legacy_order_manifest_once(tmp_path: Path, manifest: Path) -> None:
    """A manifest from before stop 26 lists a key's dtypes in a call's order: every item of an entry
    reports the manifest's key, so the board merges one key per entry (it counted each twice)."""
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for d in lines:
        n, x, out = d["key"]
        d["key"] = [n, out, x]  # dtype(out_ptr) before dtype(x_ptr): a call passing out= first
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text("".join(json.dumps(d) + "\n" for d in lines))
    env = subprocess_env(TV_LAUNCH_LOG=str(tmp_path / "launch.log"), TUNEVAULT_CPU_BENCH_REPS="3")
    cmd = [sys.executable, "-m", "tunevault.cli.main", "--store", f"sqlite:///{tmp_path / 'jobs.db'}",
           "warmup", str(legacy), "--jobs", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"warmup: {len(SIZES)} tuned, 0 already decided, 0 skipped, 0 failed" in done.stdout, done.stdout
    assert f"[{len(SIZES)}/{len(SIZES)}]" in done.stderr and f"[{len(SIZES) + 1}/" not in done.stderr
    assert sorted(ks.launches(tmp_path / "launch.log")) == sorted(SIZES)

    again = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, timeout=180)
    report = json.loads(again.stdout)
    assert again.returncode == 0 and report["ok"], again.stdout + again.stderr
    assert report["counts"] == {"tuned": 0, "decided": len(SIZES), "skipped": 0, "failed": 0}
    assert [i["key"] for i in report["items"]] == [d["key"] for d in lines]


@pytest.mark.parametrize("jobs", [[], ["--jobs", "2"]], ids=["one-process", "jobs"])
def test_cli_warmup_ignores_a_tunevault_warmup_naming_another_manifest(tmp_path: Path, manifest: Path,
                                                                       jobs: list[str]) -> None:
    """``tunevault warmup A`` warms up A only: a ``TUNEVAULT_WARMUP=B`` in its environment used to
    warm B up too, inside A's first store lookup, in none of the summary's counts."""
    other = tmp_path / "other.jsonl"
    ks.write_manifest(other, [n + 1 for n in SIZES])  # other keys of the same kernel
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(manifest.read_text().splitlines(keepends=True)[:3]))
    env = subprocess_env(TUNEVAULT_CPU_BENCH_REPS="3", TUNEVAULT_WARMUP=str(other))
    db = tmp_path / "s.db"
    done = subprocess.run([sys.executable, "-m", "tunevault.cli.main", "--store", f"sqlite:///{db}", "warmup",
                           str(mine), *jobs], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warmup: 3 tuned, 0 already decided, 0 skipped, 0 failed" in done.stdout, done.stdout
    assert done.stderr.count(f"TUNEVAULT_WARMUP={other} ignored") == 1, done.stderr
    stored = sorted(dict(d.key.items)["n"] for d in SqliteStore(db).decisions())
    assert stored == SIZES[:3]


def test_cli_jobs_report_each_workers_startup(tmp_path: Path, manifest: Path) -> None:
    """--json says where each child's time went: start-up (spawned to first key, with its phases),
    the walk, the exit; the walk holds the tuning. Warm store: every key decided, all is start-up."""
    env = subprocess_env(TUNEVAULT_CPU_BENCH_REPS="3")
    store = f"sqlite:///{tmp_path / 'startup.db'}"
    cmd = [sys.executable, "-m", "tunevault.cli.main", "--store", store, "warmup", str(manifest), "--json",
           "--jobs", "2"]
    for expect in ("tuned", "decided"):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
        report = json.loads(done.stdout)
        assert done.returncode == 0 and report["ok"], done.stderr
        assert set(report["counts"]) >= {expect} and report["counts"][expect] == len(SIZES)
        assert 0 <= report["spawn_s"] < report["seconds"]
        for w in report["workers"]:
            assert 0 < w["startup_s"] < report["seconds"] and w["walk_s"] >= 0 and 0 <= w["exit_s"] < 5, w
            assert w["startup_s"] + w["walk_s"] + w["exit_s"] <= report["seconds"] + 0.1, w
            assert w["tuning_s"] <= w["walk_s"] + 0.1, w
            phases = w["startup_phases"]
            assert {"python_s", "interpreter_s", "manifest_s", "imports_s", "install_s",
                    "first_key_s"} <= set(phases), phases
            assert all(v >= 0 for v in phases.values()) and phases["imports_s"] < w["startup_s"], phases


LATE_LIB = """
import os, time
from pathlib import Path
Path(os.environ["TV_IMPORTED"]).write_text(repr(time.time()))
from kernels_shard import shard_scale
"""


def test_a_kernel_library_is_imported_when_the_walk_reaches_its_keys(tmp_path: Path, manifest: Path) -> None:
    """No import runs on a thread beside the first keys' compiles and timings (it competed with them
    for the GIL): the walk imports a library when it first reaches one of its keys, and not before."""
    (tmp_path / "late_lib.py").write_text(LATE_LIB)
    ks.write_manifest(manifest, [50, 70], name="late_lib:shard_scale", first_seen=len(SIZES))  # walked last
    imported = tmp_path / "imported"
    env = subprocess_env(TUNEVAULT_EVENTS=str(tmp_path / "events.jsonl"), TUNEVAULT_CPU_BENCH_REPS="3",
                         TV_IMPORTED=str(imported))
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    cmd = [sys.executable, "-m", "tunevault.cli.main", "--store", f"sqlite:///{tmp_path / 'late.db'}",
           "warmup", str(manifest), "--jobs", "1", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["counts"]["tuned"] == len(SIZES) + 2
    tuned_at = sorted(e["time"] for e in events(tmp_path) if e["event"] == "tuning")
    assert len(tuned_at) == len(SIZES) + 2
    assert tuned_at[len(SIZES) - 1] < float(imported.read_text()) < tuned_at[len(SIZES)]


PEER_LIB = """
import os
if os.environ.get("TV_IMPORTED"):
    with open(os.environ["TV_IMPORTED"], "a") as log:
        log.write(f"{os.getpid()}\\n")
import triton
import triton.language as tl

@triton.autotune(configs=[triton.Config({"BLOCK": b}) for b in (32, 64)], key=["n"])
@triton.jit
def peer_scale(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 3.0, mask=offs < n)
"""


def load_unimported(path: Path) -> Any:
    """The module at ``path``, run but not put in sys.modules (only to write its manifest lines)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_keys_an_earlier_run_decided_are_judged_by_digest_after_an_import(tmp_path: Path, manifest: Path) -> None:
    """An earlier run's decision under the manifest's kernel name may be stale (the source may have
    changed since): a ``--jobs`` child imports the library to check its digest, then counts the key
    as decided when the decision is current, without tuning it again."""
    (tmp_path / "peer_lib.py").write_text(PEER_LIB)
    peer_lib = load_unimported(tmp_path / "peer_lib.py")
    peer_manifest = tmp_path / "peer.jsonl"
    ks.write_manifest(peer_manifest, [50], kernel=peer_lib.peer_scale)
    ks.write_manifest(manifest, [50], kernel=peer_lib.peer_scale, first_seen=len(SIZES))
    imported = tmp_path / "imported"
    env = subprocess_env(TUNEVAULT_CPU_BENCH_REPS="3", TV_IMPORTED=str(imported))
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    cmd = [sys.executable, "-m", "tunevault.cli.main", "--store", f"sqlite:///{tmp_path / 'peer.db'}", "warmup"]

    first = subprocess.run([*cmd, str(peer_manifest), "--json"], capture_output=True, text=True, env=env,
                           timeout=180)
    assert first.returncode == 0 and json.loads(first.stdout)["counts"]["tuned"] == 1, first.stderr
    imported.unlink()

    done = subprocess.run([*cmd, str(manifest), "--jobs", "2", "--json"], capture_output=True, text=True,
                          env=env, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["counts"]["tuned"] == len(SIZES) and report["counts"]["decided"] == 1
    assert imported.exists(), "an earlier run's decision was trusted by the kernel's name alone"


def test_a_jobs_child_trusts_the_digest_a_peer_of_its_run_found_and_nothing_else(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``--jobs`` child does not import a library only to learn that its keys are decided, once a
    peer of the same run has imported it and said its digest; a decision under any other digest (an
    earlier version of the kernel) never counts, and without a run folder nothing counts by name."""
    from tunevault.capture.replay import entries
    from tunevault.core.identity import kernel_id
    from tunevault.integration import triton_adapter
    from tunevault.integration.shared_warmup import RUN_VAR, DecidedNames, EntryTask

    (tmp_path / "peer_lib.py").write_text(PEER_LIB)
    peer_lib = load_unimported(tmp_path / "peer_lib.py")
    manifest = tmp_path / "peer.jsonl"
    ks.write_manifest(manifest, [50], kernel=peer_lib.peer_scale)
    store = f"sqlite:///{tmp_path / 'peer.db'}"
    env = subprocess_env(TUNEVAULT_CPU_BENCH_REPS="3")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    tuned = subprocess.run([sys.executable, "-m", "tunevault.cli.main", "--store", store, "warmup", str(manifest)],
                           capture_output=True, text=True, env=env, timeout=180)
    assert tuned.returncode == 0, tuned.stdout + tuned.stderr

    tunevault.install(mode="tune", store=store)
    runtime = triton_adapter.runtime()
    assert runtime is not None
    (entry,) = entries(str(manifest), None)
    digest = kernel_id(peer_lib.peer_scale).digest

    def task() -> EntryTask:
        return EntryTask(runtime, entry, None, DecidedNames(runtime.store, runtime.fingerprint.digest))

    assert not task().decided_by_name()  # no run folder: names are not trusted
    monkeypatch.setenv(RUN_VAR, str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    mine = task()
    assert not mine.decided_by_name()  # no peer has imported the kernel in this run
    DecidedNames(runtime.store, runtime.fingerprint.digest).vouch(entry.kernel, "0123456789abcdef")
    assert not mine.decided_by_name()  # this run's kernel is another version than the one decided
    monkeypatch.setenv(RUN_VAR, str(tmp_path / "next run"))
    (tmp_path / "next run").mkdir()
    mine = task()
    DecidedNames(runtime.store, runtime.fingerprint.digest).vouch(entry.kernel, digest)  # a peer imported it
    assert mine.decided_by_name()
    assert "peer_lib" not in sys.modules


EDITED_LIB = """
import triton
import triton.language as tl

@triton.autotune(configs=[triton.Config({"BLOCK": b}) for b in (32, 64)], key=["n"])
@triton.jit
def edited_scale(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * FACTOR, mask=offs < n)
"""


def test_jobs_retune_the_stale_decisions_of_an_edited_kernel(tmp_path: Path) -> None:
    """After a kernel's source changes, its old decisions (another digest) no longer apply: ``--jobs``
    children used to count them as decided by the kernel's name, tuned nothing and exited 0 while
    ``tunevault check`` said no key was decided."""
    lib = tmp_path / "edited_lib.py"
    lib.write_text(EDITED_LIB.replace("FACTOR", "3.0"))
    manifest = tmp_path / "keys.jsonl"
    sizes = ks.write_manifest(manifest, [40, 90, 150], kernel=load_unimported(lib).edited_scale)
    env = subprocess_env(TUNEVAULT_CPU_BENCH_REPS="3", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    cli = [sys.executable, "-m", "tunevault.cli.main", "--store", f"sqlite:///{tmp_path / 'edited.db'}"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)

    first = run("warmup", str(manifest), "--jobs", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"warmup: {len(sizes)} tuned, 0 already decided" in first.stdout
    lib.write_text(EDITED_LIB.replace("FACTOR", "30.0"))  # a new version of the kernel
    assert run("check", str(manifest)).returncode == 1  # its keys are not decided

    again = run("warmup", str(manifest), "--jobs", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"warmup: {len(sizes)} tuned, 0 already decided" in again.stdout
    checked = run("check", str(manifest))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_only_keys_whose_every_config_fails_are_recorded_for_everyone(tmp_path: Path) -> None:
    """Every config failing holds for every process of this kernel source and fingerprint: recorded
    once. A module that does not import is this process's setup: reported, never recorded."""
    path = tmp_path / "bad.jsonl"
    ks.write_manifest(path, [40], kernel=ks.no_config_works)
    ks.write_manifest(path, [40], name="no_such_module_here:kernel")
    store = f"sqlite:///{tmp_path / 'bad.db'}"

    tunevault.install(mode="tune", store=store, events=str(tmp_path / "events.jsonl"))
    first = tunevault.warmup(path)
    assert [i.status for i in first.items] == ["failed", "skipped"]
    assert "every config failed" in first.items[0].reason and "not importable" in first.items[1].reason
    tunevault.uninstall()

    tunevault.install(mode="tune", store=store, events=str(tmp_path / "events.jsonl"))  # "another process"
    with count_launches(ks.no_config_works) as launches:
        second = tunevault.warmup(path)
    assert launches.count == 0, "the recorded failure was not retried"
    assert [i.status for i in second.items] == ["failed", "skipped"] and not second.ok
    assert "recorded by" in second.items[0].reason and "recorded by" not in second.items[1].reason
    failed = [e for e in events(tmp_path) if e["event"] == "key_failed"]
    assert sorted(e["recorded"] for e in failed) == [False, False, True], \
        "recorded once; the import failure reported by each run"


class ReleaseWatch(SqliteStore):
    """The real SQLite store, noting at each tuning lease's release whether the key's failed record
    is in the store yet (a peer taking the lease then reads it)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.recorded_at_release: list[bool] = []

    def release(self, name: str, holder: str) -> None:
        from tunevault.policy.shard import failed_record_name

        if name.startswith("tune:"):
            self.recorded_at_release.append(self.lease_holder(failed_record_name(name)) is not None)
        super().release(name, holder)


def test_a_failed_key_is_recorded_before_its_tuning_lease_is_released(tmp_path: Path) -> None:
    """The record was written after the release: a peer taking the lease in between tuned a key
    whose every config fails a second time."""
    from tunevault.capture import manifest as mf
    from tunevault.integration.shared_warmup import EntryTask
    from tunevault.integration.triton_adapter import runtime
    from tunevault.policy.shard import Sharing, share

    path = tmp_path / "bad.jsonl"
    ks.write_manifest(path, [40], kernel=ks.no_config_works)
    tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'bad.db'}")
    rt = runtime()
    assert rt is not None
    store = ReleaseWatch(tmp_path / "bad.db")
    try:
        items = share([EntryTask(rt, e, None) for e in mf.read(path)], store, Sharing(rt.fingerprint.digest))
    finally:
        store.close()
    assert [i.status for i in items] == ["failed"] and "every config failed" in items[0].reason
    assert store.recorded_at_release == [True]


def test_failed_key_records_are_validated_on_read() -> None:
    from tunevault.capture.replay import WarmupItem
    from tunevault.core.model import TuningKey
    from tunevault.policy.shard import failed_record

    key = TuningKey((("n", 4),))
    good = failed_record(WarmupItem("m:k", key, "failed", "boom"))
    assert read_failed_record(good, "m:k", key).reason.startswith("boom (recorded by ")
    other_key = TuningKey((("n", 5),))
    for text in (None, "not json", "[]", good.replace("failed", "tuned"), json.dumps({"format": "x"})):
        assert read_failed_record(text, "m:k", key) is None
    assert read_failed_record(good, "m:other", key) is None and read_failed_record(good, "m:k", other_key) is None


def test_a_warm_store_returns_at_once_and_env_warmup_runs_at_the_first_miss(tmp_path: Path, manifest: Path) -> None:
    import torch

    store, events_path = f"sqlite:///{tmp_path / 'warm.db'}", tmp_path / "events.jsonl"
    tunevault.install(mode="tune", store=store, warmup=str(manifest), events=str(events_path))
    x = torch.rand(10)
    ks.shard_scale[(1,)](x, torch.empty_like(x), 10)  # the first miss warms the whole manifest up first
    assert SqliteStore(tmp_path / "warm.db").count() == len(SIZES) + 1
    tunevault.uninstall()

    tunevault.install(mode="tune", store=store, events=str(events_path))
    report = tunevault.warmup(manifest)
    assert report.ok and report.counts()["decided"] == len(SIZES)
    kinds = [e["event"] for e in events(tmp_path)]
    assert kinds.count("lease_taken") == len(SIZES) and kinds.count("tuning") == len(SIZES) + 1


def test_cuda_visible_devices_are_read_as_torch_reads_them() -> None:
    from tunevault.core.machine import visible_devices_spec

    assert visible_devices_spec("0,1") == ["0", "1"]
    assert visible_devices_spec(" 3 , 1gpu") == ["3", "1"]  # strtoul: "1gpu" is 1
    assert visible_devices_spec("") == [] and visible_devices_spec("-1") == []
    assert visible_devices_spec("0,-1,2") == ["0"] and visible_devices_spec("0,x,2") == ["0"]  # ends the list
    assert visible_devices_spec("1,1") == []  # a repeated device hides them all
    assert visible_devices_spec("GPU-a1b2,GPU-c3d4") == ["GPU-a1b2", "GPU-c3d4"]
    assert visible_devices_spec("GPU-a1b2,0,GPU-c3d4") == ["GPU-a1b2"]
    assert visible_devices_spec("MIG-x") == ["MIG-x"]


def test_gpu_count_imports_no_torch() -> None:
    """The parent of --jobs counts GPUs before starting any child: without importing torch (seconds)."""
    code = ("import json, sys\nfrom tunevault.core.machine import gpu_count\n"
            "print(json.dumps([gpu_count(), 'torch' in sys.modules]))")
    for variables in ({}, {"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": ""}):
        env = {k: v for k, v in subprocess_env(**variables).items() if k != "TRITON_INTERPRET"}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        count, torch_imported = json.loads(done.stdout)
        assert not torch_imported, done.stderr
        if not _cuda_build():  # this torch can use no GPU, whatever the variable says
            assert count == 0


def _cuda_build() -> bool:
    from tunevault.core.machine import torch_build

    build = torch_build()
    return build is None or build.get("cuda") is not None


def test_jobs_plan_pins_one_gpu_per_child(monkeypatch: pytest.MonkeyPatch) -> None:
    from tunevault.cli.warmup_jobs import plan
    from tunevault.core.machine import available_cores

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert plan("3", "0,1", visible=2) == ["4", "5", "4"]
    assert plan(None, "1", visible=2) == ["5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert plan("2", None) == [None, None]  # the interpreter: CPU processes, no GPU to pin
    assert plan(None, None) == [None] * min(available_cores(), 256)
    assert len(plan("256", None)) == 256
    for bad in (("0", None), ("x", None), ("2", "a,b"), ("2", "-1"), ("257", None), ("²", None),
                ("99999999999999999999", None), ("9" * 5000, None)):
        with pytest.raises(ValueError, match="--jobs takes a number of processes from 1 to 256|--devices"):
            plan(*bad)


def test_jobs_beyond_the_cap_is_one_line_and_exit_2(tmp_path: Path, manifest: Path) -> None:
    """``--jobs 99999999999999999999`` built one list entry per process until memory ran out."""
    proc = subprocess.run([sys.executable, "-m", "tunevault.cli.main", "--store", f"sqlite:///{tmp_path / 'j.db'}",
                           "warmup", str(manifest), "--jobs", "99999999999999999999"],
                          capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "tunevault warmup: error: --jobs takes a number of processes from 1 to 256; got '99999999999999999999'"]


def test_available_cores_follow_a_containers_cpu_quota(tmp_path: Path) -> None:
    """A pod limited to 1.5 CPUs on a larger host gets 2 cores' worth of threads, not the host's."""
    from tunevault.core.machine import available_cores, cpu_quota

    cpuset = available_cores(str(tmp_path))  # no cgroup files there: the cpuset alone
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(str(v2)) == 1.5 and available_cores(str(v2)) == min(cpuset, 2)
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(str(v2)) is None and available_cores(str(v2)) == cpuset
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(str(tmp_path / "v1")) == 0.5 and available_cores(str(tmp_path / "v1")) == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert cpu_quota(str(tmp_path / "v1")) is None
    (v2 / "cpu.max").write_text("garbage\n")
    assert cpu_quota(str(v2)) is None


def test_each_participant_walks_its_own_kernels_first_then_helps_from_the_far_end() -> None:
    """Kernels are dealt out whole (largest first, to the least loaded), the same deal everywhere."""
    from tunevault.integration.shared_warmup import walk
    from tunevault.policy.shard import affinity_order

    kernels = ["m:a", "m:a", "m:b", "m:a", "m:b", "m:c"]
    assert affinity_order(kernels, 0, 2) == [0, 1, 3, 5, 4, 2]
    assert affinity_order(kernels, 1, 2) == [2, 4, 5, 3, 1, 0]
    for me in range(3):
        assert sorted(affinity_order(kernels, me, 3)) == list(range(len(kernels)))
    assert walk(kernels, {"TUNEVAULT_WARMUP_WORKER": "1/2"}) == [2, 4, 5, 3, 1, 0]
    assert walk(kernels, {"RANK": "0", "WORLD_SIZE": "2"}) == [0, 1, 3, 5, 4, 2]
    rotation = walk(kernels, {})  # no place known: a random starting point, every key once
    assert sorted(rotation) == list(range(6)) and rotation == [(rotation[0] + j) % 6 for j in range(6)]


def test_a_library_that_fits_one_participants_share_is_dealt_whole() -> None:
    """Importing a library is paid by each participant that walks its keys: one owns all of it."""
    from tunevault.policy.shard import affinity_order

    suite = ["suite:a"] * 3 + ["suite:d"] * 2 + ["suite:e"] * 2  # 7 keys: more than a share of 5
    lib = ["fla.ops.x:f", "fla.ops.y:g", "fla.modules.z:h"]  # 3 keys of three modules of one library
    kernels = suite + lib
    owned = [set(affinity_order(kernels, me, 2)[:5]) for me in range(2)]
    fla_keys = set(range(len(suite), len(kernels)))
    assert fla_keys <= owned[0] or fla_keys <= owned[1]
    assert owned[0] | owned[1] == set(range(len(kernels))) and not owned[0] & owned[1]
