"""Compile ahead: a helper process compiles a warmup's coming keys while the current one is tuned.

Under the interpreter nothing compiles, so these tests check the plumbing with a real helper
process: keys are handed over in walk order, a tuning waits for the helper's key, the helper never
runs a config, a helper that refuses a key or dies costs the warmup nothing, and it is gone when
the warmup returns.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

import kernels_shard as ks
from conftest import gone, run_py
from tunevault.policy.settings import Settings

if TYPE_CHECKING:
    from tunevault.engine.ahead import AheadJob, CompileAhead

WARMUP = r"""
import json, logging, os, sys, time
lines = []
class Keep(logging.Handler):
    def emit(self, record): lines.append(record.getMessage())
logging.getLogger("tunevault").addHandler(Keep())
logging.getLogger("tunevault").setLevel(logging.DEBUG)
import tunevault
from tunevault.integration import warmup_ahead

plans = []
class Watched(warmup_ahead.AheadPlan):  # the plan the warmup made, kept to read its counters
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        plans.append(self)

    def before(self, task):
        first = not self.tuned
        super().before(task)
        deadline = time.monotonic() + 120
        while first and self.ahead.compiled < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # the helper starts in seconds, the interpreter's keys tune in ms: let it catch up
warmup_ahead.AheadPlan = Watched
if os.environ.get("TV_HELPERS"):  # two helpers share every key's configs even on a small machine
    import functools
    warmup_ahead.CompileAhead = functools.partial(warmup_ahead.CompileAhead, helpers=int(os.environ["TV_HELPERS"]))
tunevault.install(mode="tune", store=os.environ["TV_STORE"], compile_ahead=int(os.environ["TV_AHEAD"]))
report = tunevault.warmup(os.environ["TV_MANIFEST"])
ahead = plans[0].ahead if plans else None
print(json.dumps({"ok": report.ok, "counts": report.counts(), "pid": os.getpid(),
                  "compiled": ahead.compiled if ahead else None,
                  "helpers": ahead.helper_pids if ahead else [], "log": lines}))
"""


def _launch_pids(log: Path) -> set[int]:
    return {int(line.split()[0]) for line in log.read_text().splitlines()} if log.exists() else set()


def test_helpers_compile_the_coming_keys_and_are_gone_when_the_warmup_returns(tmp_path: Path) -> None:
    manifest = tmp_path / "keys.jsonl"
    ks.write_manifest(manifest, [64 + 29 * i for i in range(6)])
    launches = tmp_path / "launch.log"
    out = run_py(WARMUP, TV_STORE=f"sqlite:///{tmp_path / 'tv.db'}", TV_MANIFEST=str(manifest), TV_AHEAD="2",
                 TV_HELPERS="2", TV_LAUNCH_LOG=str(launches), TUNEVAULT_CPU_BENCH_REPS="3")
    assert out["ok"] and out["counts"]["tuned"] == 6
    assert out["compiled"] >= 2, out["log"]  # the keys after the first, handed over as the walk went
    assert any("compile ahead: " in line and "compiled by the helper" in line for line in out["log"])
    assert len(out["helpers"]) == 2 and out["pid"] not in out["helpers"]  # each took a share of each key
    deadline = time.monotonic() + 10
    while not all(gone(pid) for pid in out["helpers"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(pid) for pid in out["helpers"])
    assert _launch_pids(launches) == {out["pid"]}  # the helper compiled; it never ran a config


def test_a_key_the_helper_refuses_is_tuned_as_usual(tmp_path: Path) -> None:
    """A kernel the helper cannot import as the same kernel (its digest differs) is refused there;
    the tuning does not wait for it and compiles it itself."""
    from tunevault.capture import manifest as mf
    from tunevault.engine.ahead import CompileAhead, job_for

    manifest = tmp_path / "keys.jsonl"
    ks.write_manifest(manifest, [64])
    entry = mf.read(manifest)[0]
    ahead = CompileAhead(keys=1)
    try:
        job = job_for("kernels_shard:shard_scale", "not-its-digest", entry.callspec, [0, 1])
        assert job is not None
        ahead.want("k", job)
        started = time.monotonic()
        while ahead.busy():  # sent, then refused
            assert time.monotonic() - started < 120, "the helper never answered"
            time.sleep(0.05)
        assert ahead.claim("k", timeout=5) is False
        assert ahead.compiled == 0
    finally:
        ahead.close()


def test_a_helper_that_dies_costs_the_warmup_only_its_help(tmp_path: Path) -> None:
    """SIGKILL the helper between keys: the next key is not waited for, nothing stays busy, and
    closing returns at once."""
    import signal

    from tunevault.capture import manifest as mf
    from tunevault.capture.locate import autotuner_under
    from tunevault.core.identity import kernel_id
    from tunevault.engine.ahead import CompileAhead, job_for
    from tunevault.engine.isolated import kernel_target

    manifest = tmp_path / "keys.jsonl"
    ks.write_manifest(manifest, [64, 93])
    first, second = mf.read(manifest)
    at = autotuner_under(ks.shard_scale)
    target, _ = kernel_target(at)
    digest = kernel_id(at).digest
    ahead = CompileAhead(keys=1, helpers=1)
    try:
        ahead.want("a", job_for(target, digest, first.callspec, range(len(at.configs))))
        deadline = time.monotonic() + 120
        while ahead.compiled < 1:
            assert time.monotonic() < deadline, "the helper never compiled the first key"
            time.sleep(0.05)
        (pid,) = ahead.helper_pids
        os.kill(pid, signal.SIGKILL)
        ahead.want("b", job_for(target, digest, second.callspec, range(len(at.configs))))
        started = time.monotonic()
        assert ahead.claim("b", timeout=60) is False
        while ahead.busy():
            assert time.monotonic() - started < 30, "a dead helper's key stayed pending"
            time.sleep(0.05)
        assert time.monotonic() - started < 30
    finally:
        started = time.monotonic()
        ahead.close()
        assert time.monotonic() - started < 10


def _shard_jobs(tmp_path: Path, sizes: list[int]) -> list[AheadJob]:
    from tunevault.capture import manifest as mf
    from tunevault.capture.locate import autotuner_under
    from tunevault.core.identity import kernel_id
    from tunevault.engine.ahead import job_for
    from tunevault.engine.isolated import kernel_target

    manifest = tmp_path / "keys.jsonl"
    ks.write_manifest(manifest, sizes)
    at = autotuner_under(ks.shard_scale)
    target, _ = kernel_target(at)
    jobs = [job_for(target, kernel_id(at).digest, e.callspec, range(len(at.configs))) for e in mf.read(manifest)]
    assert all(job is not None for job in jobs)
    return [job for job in jobs if job is not None]


def _wait_compiled(ahead: CompileAhead, n: int) -> None:
    deadline = time.monotonic() + 120
    while ahead.compiled < n:
        assert time.monotonic() < deadline, f"the helpers compiled {ahead.compiled} keys, not {n}"
        time.sleep(0.05)


def test_helpers_outlive_the_workers_idle_timeout_between_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              ) -> None:
    """A long tuning (or keys leased to other processes) leaves the helpers idle between keys;
    the tuning worker's idle timeout must not end them, nor compile ahead with them."""
    from tunevault.engine.ahead import CompileAhead

    monkeypatch.setenv("TUNEVAULT_WORKER_IDLE", "1")
    first, second = _shard_jobs(tmp_path, [64, 93])
    ahead = CompileAhead(keys=1, helpers=1)
    try:
        ahead.want("a", first)
        _wait_compiled(ahead, 1)
        (pid,) = ahead.helper_pids
        time.sleep(2.5)  # longer than the idle timeout
        assert not gone(pid)
        ahead.want("b", second)
        _wait_compiled(ahead, 2)
        assert ahead.helper_pids == [pid]
    finally:
        ahead.close()


def test_a_dead_helper_leaves_the_other_compiling(tmp_path: Path) -> None:
    import signal

    from tunevault.engine.ahead import CompileAhead

    first, second, third = _shard_jobs(tmp_path, [64, 93, 122])
    ahead = CompileAhead(keys=1, helpers=2)
    try:
        ahead.want("a", first)
        _wait_compiled(ahead, 1)
        dead, alive = ahead.helper_pids
        os.kill(dead, signal.SIGKILL)
        ahead.want("b", second)  # its share on the dead helper: given up, compiled by its tuning
        started = time.monotonic()
        while ahead.busy():
            assert time.monotonic() - started < 30, "a dead helper's key stayed pending"
            time.sleep(0.05)
        ahead.want("c", third)  # the survivor takes every config
        _wait_compiled(ahead, ahead.compiled + 1)
        assert not gone(alive)
    finally:
        ahead.close()


def test_a_helper_whose_warmup_died_stops_compiling(tmp_path: Path) -> None:
    """The warmup process is killed (SIGKILL, OOM, --jobs stopping its children): the helper sees
    its input close and exits at once, not after every compile it was handed."""
    from tunevault.capture.argspec import CallSpec
    from tunevault.capture.locate import autotuner_under
    from tunevault.core.identity import kernel_id
    from tunevault.engine.procs import spawn, worker_env

    at = autotuner_under(ks.slow_compile)
    x = torch.zeros(64)
    spec = CallSpec.of(at, (x, torch.empty_like(x), 64), {"grid": (1,)}).to_json()
    env = worker_env(None)
    env.pop("TRITON_INTERPRET", None)  # the helper compiles for real (each compile takes a second here)
    helper = spawn(env, 120)
    try:
        helper.send({"op": "ahead", "sid": 1, "kernel": "kernels_shard:slow_compile", "digest": kernel_id(at).digest,
                     "callspec": spec, "configs": list(range(8)), "threads": 1})
        time.sleep(1.5)
        assert helper.proc.stdin is not None
        helper.proc.stdin.close()  # what the helper sees when its warmup process dies
        started = time.monotonic()
        while helper.proc.poll() is None and time.monotonic() - started < 30:
            time.sleep(0.05)
        assert time.monotonic() - started < 3, "the helper went on compiling for a warmup that is gone"
    finally:
        helper.kill()


def test_a_stuck_helper_ends_compile_ahead_and_shows_its_stacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A helper that never finishes a claimed key (here: stuck importing the kernel's module): the
    tuning waits at most ``stall_s``, compile ahead stops, and the helper's threads' stacks reach the
    debug log before it is killed, so a stall can be explained."""
    import logging

    from tunevault.engine.ahead import CompileAhead

    mark = tmp_path / "importing"
    (tmp_path / "stuck_module.py").write_text(
        f"import time\nopen({str(mark)!r}, 'w').close()\ntime.sleep(120)\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the helper imports from this process's path
    (job,) = _shard_jobs(tmp_path, [64])
    caplog.set_level(logging.DEBUG, logger="tunevault")
    ahead = CompileAhead(keys=1, helpers=1, stall_s=1.0)
    try:
        ahead.want("a", dataclasses.replace(job, target="stuck_module:kernel"))
        deadline = time.monotonic() + 120
        while not mark.exists():
            assert time.monotonic() < deadline, "the helper never began the key"
            time.sleep(0.05)
        (pid,) = ahead.helper_pids
        started = time.monotonic()
        assert ahead.claim("a", timeout=60) is False
        assert 1.0 <= time.monotonic() - started < 10
    finally:
        ahead.close()
    assert gone(pid) and not ahead.busy()
    ahead.want("b", job)  # stopped for the rest of the warmup
    assert not ahead.busy()
    text = caplog.text
    assert "did not finish a key in 1 s" in text
    assert "(most recent call first)" in text and "stuck_module.py\", line 3" in text, "the helper's stacks"


def test_a_key_is_compiled_for_the_gpu_the_warmup_tunes_on() -> None:
    """The helper sees one GPU as cuda:0, so the job is pinned; which GPU that is comes from the
    warmup's device, else the call's own (not from the pinned call, which always says 0)."""
    from tunevault.engine.ahead import job_for

    tensor = {"kind": "tensor", "device": "cuda:3", "dtype": "float32", "shape": [4], "stride": [1]}
    callspec = {"args": [tensor, {"kind": "scalar", "value": 4}], "kwargs": {}}
    job = job_for("m:k", "digest", callspec, [0, 1])
    assert job is not None and job.device == 3 and job.callspec["args"][0]["device"] == "cuda:0"
    moved = job_for("m:k", "digest", callspec, [0, 1], device="cuda:5")
    assert moved is not None and moved.device == 5
    assert job_for("m:k", "digest", callspec, [0, 1], device="cpu") is None
    on_cpu = job_for("m:k", "digest", {"args": [{**tensor, "device": "cpu"}], "kwargs": {}}, [0, 1])
    assert on_cpu is not None and on_cpu.device is None and on_cpu.callspec["args"][0]["device"] == "cpu"


def test_compile_ahead_settings_are_checked() -> None:
    assert Settings.from_env({"TUNEVAULT_COMPILE_AHEAD": "3"}).compile_ahead == 3
    assert Settings.from_env({}).compile_ahead is None
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(ValueError, match="TUNEVAULT_COMPILE_AHEAD"):
            Settings.from_env({"TUNEVAULT_COMPILE_AHEAD": bad})
    for bad_value in (-1, True, 2.0):
        with pytest.raises(ValueError, match="compile_ahead"):
            Settings(compile_ahead=bad_value)  # type: ignore[arg-type]


def test_compile_ahead_is_off_under_the_interpreter_unless_asked() -> None:
    from tunevault.integration.warmup_ahead import keys_ahead

    assert keys_ahead(Settings()) == 0  # the suite runs under TRITON_INTERPRET=1: nothing to compile
    assert keys_ahead(Settings(compile_ahead=2)) == 2
    assert keys_ahead(Settings(compile_ahead=0)) == 0


def test_helpers_and_threads_follow_the_cores_this_process_shares() -> None:
    """One helper per 8 cores (at most two: beyond that each helper's imports cost more than its
    GIL-free compiles gain), threads filling all cores but one; --jobs children and torchrun's
    local ranks split the host's cores between them."""
    from tunevault.engine.ahead import helper_layout
    from tunevault.integration.shared_warmup import host_sharers

    assert helper_layout(16) == (2, 7)
    assert helper_layout(64) == (2, 16)
    assert helper_layout(8) == (1, 7)
    assert helper_layout(2) == (1, 1)
    assert helper_layout(4, helpers=2) == (2, 1)
    assert host_sharers({"TUNEVAULT_WARMUP_WORKER": "1/4", "LOCAL_WORLD_SIZE": "8"}) == 4
    assert host_sharers({"RANK": "3", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}) == 8
    assert host_sharers({"WORLD_SIZE": "16"}) == 1
    assert host_sharers({"LOCAL_WORLD_SIZE": "0"}) == 1


def test_helpers_rebuild_arguments_as_layouts_only() -> None:
    """A helper compiles with arguments on ``meta``: the same dtype, shape, strides and 16-byte
    alignment (what Triton specializes a pointer on) as the tuning's own rebuild, and no data."""
    import torch

    from tunevault.capture.argspec import ArgSpec

    for captured in (torch.randn(4, 8)[:, 1:], torch.arange(12, dtype=torch.int32).view(3, 4).t(),
                     torch.zeros(5, dtype=torch.bfloat16)):
        spec = ArgSpec.of(captured)
        meta, real = spec.build("meta"), spec.build("cpu")
        assert meta.device.type == "meta"
        assert (meta.dtype, meta.shape, meta.stride()) == (real.dtype, real.shape, real.stride())
        assert (meta.data_ptr() % 16 == 0) == (real.data_ptr() % 16 == 0)


def test_a_sharded_warmup_compiles_on_its_share_of_the_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--jobs`` children (and torchrun's local ranks) tune at the same time: each one's precompile
    pool takes its share of the host's cores, not all of them (8 children x 16 threads on 16 cores)."""
    import tunevault
    from tunevault.core.machine import available_cores
    from tunevault.engine.context import compile_cores

    manifest = tmp_path / "keys.jsonl"
    ks.write_manifest(manifest, [64, 93])
    monkeypatch.setenv("TUNEVAULT_WARMUP_WORKER", "0/2")
    seen: list[int] = []
    tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'tv.db'}")
    report = tunevault.warmup(str(manifest), progress=lambda done, total, item: seen.append(compile_cores()))
    assert report.ok and seen == [max(1, available_cores() // 2)] * 2
    assert compile_cores() == available_cores()  # outside the warmup: a miss has the process's cores


def test_closing_does_not_wait_for_helpers_still_starting(tmp_path: Path) -> None:
    """A short warmup ends before its helpers are up (they import torch and Triton): it returns at
    once, and the helpers are killed as soon as they are up."""
    from tunevault.engine.ahead import CompileAhead

    (job,) = _shard_jobs(tmp_path, [64])
    ahead = CompileAhead(keys=1, helpers=1)
    ahead.want("a", job)
    deadline = time.monotonic() + 30
    while not ahead._starting:
        assert time.monotonic() < deadline, "the helpers never started"
        time.sleep(0.01)
    ahead.close()
    feeder = ahead._thread
    assert feeder is not None and feeder.is_alive()  # close() returned while the helper was starting
    feeder.join(timeout=120)
    assert not feeder.is_alive() and ahead.helper_pids
    deadline = time.monotonic() + 10
    while not all(gone(pid) for pid in ahead.helper_pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(pid) for pid in ahead.helper_pids)


def test_helpers_stuck_on_a_claimed_key_stop_compile_ahead(caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A key the helpers do not finish within the stall limit: the tuning does not wait for them any
    longer, compile ahead stops for the rest of the warmup, and the helpers are killed."""
    import logging

    from tunevault.capture.argspec import CallSpec
    from tunevault.capture.locate import autotuner_under
    from tunevault.core.identity import kernel_id
    from tunevault.engine.ahead import AheadJob, CompileAhead

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the helper compiles for real: a second a config
    at = autotuner_under(ks.slow_compile)
    x = torch.zeros(64)
    spec = CallSpec.of(at, (x, torch.empty_like(x), 64), {"grid": (1,)}).to_json()
    job = AheadJob("kernels_shard:slow_compile", kernel_id(at).digest, spec, tuple(range(8)))
    caplog.set_level(logging.WARNING, logger="tunevault")
    ahead = CompileAhead(keys=1, helpers=1, cores=2, stall_s=2.0)  # 8 configs on one thread: 8 s
    try:
        ahead.want("a", job)
        deadline = time.monotonic() + 120
        while not ahead._sent:
            assert time.monotonic() < deadline, "the helper never took the key"
            time.sleep(0.05)
        assert ahead.claim("a", timeout=300) is False
        assert any("did not finish a key" in r.getMessage() for r in caplog.records)
        feeder = ahead._thread
        assert feeder is not None
        feeder.join(timeout=30)
        assert not feeder.is_alive()
        ahead.want("b", job)  # closed: nothing more is handed over
        assert not ahead.busy()
        assert all(gone(pid) for pid in ahead.helper_pids)
    finally:
        ahead.close()
