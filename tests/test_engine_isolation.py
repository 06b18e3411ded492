"""Isolated tuning: candidates run in a disposable worker; its faults never reach the server."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import kernels_engine as ke
import tunevault
from conftest import count_launches
from tunevault.engine import isolated
from tunevault.integration.triton_adapter import runtime


def decision_for(kernel: object):
    name = f"{kernel.base_fn.__module__}:{kernel.base_fn.__qualname__}"  # type: ignore[attr-defined]
    found = [d for (k, _), d in runtime().used.items() if k == name]
    assert len(found) == 1, f"expected one decision for {name}, got {len(found)}"
    return found[0]


def test_config_that_kills_the_worker_is_recorded_and_never_chosen(sqlite_url: str) -> None:
    tunevault.install(mode="tune", store=sqlite_url, isolate=True)
    x, y = torch.randn(300), torch.randn(300)
    with count_launches(ke.add_kill) as launches:
        out = ke.run_add(ke.add_kill, x, y)
    assert torch.equal(out, x + y)
    assert launches.count == 1  # every candidate ran in the worker; this process launched the winner only
    d = decision_for(ke.add_kill)
    by = {c.index: c for c in d.candidates}
    assert by[1].error is not None and "worker died" in by[1].error and "SIGKILL" in by[1].error
    assert by[0].ok and by[2].ok  # tuning went on in a fresh worker after the crash
    assert d.config_index in (0, 2)
    assert dict(d.provenance)["tuned_in"] == "worker"


def test_config_that_hangs_times_out_and_tuning_continues(sqlite_url: str) -> None:
    tunevault.install(mode="tune", store=sqlite_url, isolate=True, config_timeout=2)
    x, y = torch.randn(300), torch.randn(300)
    assert torch.equal(ke.run_add(ke.add_hang, x, y), x + y)
    d = decision_for(ke.add_hang)
    by = {c.index: c for c in d.candidates}
    assert by[1].error is not None and by[1].error.startswith("timeout") and "config_timeout" in by[1].error
    assert by[0].ok and by[2].ok
    assert d.config_index in (0, 2)


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "worker"])
def test_cpu_batch_is_timed_together_with_its_noise_and_equal_configs_tie(
        sqlite_url: str, isolate: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker times a CPU batch in interleaved rounds as in process: a config timed alone is
    its own round's median in every run (spread 0, so no noise to tie on, and equal configs chose
    a winner by luck)."""
    monkeypatch.setenv("TUNEVAULT_CPU_BENCH_REPS", "5")
    tunevault.install(mode="tune", store=sqlite_url, isolate=isolate)
    x, y = torch.randn(64), torch.randn(64)
    assert torch.equal(ke.run_add(ke.add_equal, x, y), x + y)
    d = decision_for(ke.add_equal)
    assert dict(d.provenance)["tuned_in"] == ("worker" if isolate else "process")
    assert all(c.ok and c.n >= 3 and c.iqr is not None and c.iqr > 0 for c in d.candidates), d.candidates
    assert d.config_index == 0, dict(d.provenance).get("selection")  # all tie: the earliest declared


def test_config_that_kills_the_worker_in_a_later_cpu_round_is_named(sqlite_url: str) -> None:
    """A CPU batch announces every run, so a config that kills the worker on its third run is the
    one recorded as failed, and the others are timed in the next worker."""
    tunevault.install(mode="tune", store=sqlite_url, isolate=True)
    x, y = torch.randn(300), torch.randn(300)
    assert torch.equal(ke.run_add(ke.add_kill_later, x, y), x + y)
    by = {c.index: c for c in decision_for(ke.add_kill_later).candidates}
    assert by[1].error is not None and "worker died" in by[1].error and "SIGKILL" in by[1].error
    assert by[0].ok and by[2].ok


def test_config_timeout_covers_all_runs_of_a_config_in_a_cpu_batch(sqlite_url: str) -> None:
    """Every run is announced, yet ``config_timeout`` is still one config's budget: 0.4 s runs,
    four of them (warm-up and three rounds), exceed 1 s."""
    tunevault.install(mode="tune", store=sqlite_url, isolate=True, config_timeout=1)
    x, y = torch.randn(300), torch.randn(300)
    assert torch.equal(ke.run_add(ke.add_slow, x, y), x + y)
    by = {c.index: c for c in decision_for(ke.add_slow).candidates}
    assert by[1].error is not None and by[1].error.startswith("timeout: no result within 1.0s (config_timeout)")
    assert by[0].ok and by[2].ok


def test_config_error_stock_would_raise_is_a_tuning_error_naming_it(sqlite_url: str) -> None:
    """The worker cannot send the exception itself: the caller gets a TuningError with its type and
    message (config #2's KeyError), where stock raises the KeyError. Config #0 ran out of resources
    and #1 out of device memory in the worker, which only makes them lose."""
    from tunevault import TuningError

    tunevault.install(mode="tune", store=sqlite_url, isolate=True)
    x, y = torch.randn(300), torch.randn(300)
    with count_launches(ke.add_buggy_hook) as launches, pytest.raises(TuningError) as err:
        ke.run_add(ke.add_buggy_hook, x, y)
    text = str(err.value)
    assert "config #2" in text and "KeyError: 'no scale for this BLOCK'" in text and "worker" in text
    assert launches.count == 0 and not runtime().used  # nothing decided, nothing launched here
    assert isolated.worker_pid() is not None  # a config's error is not a fault of the worker


def test_kernel_a_worker_cannot_import_tunes_in_process_with_one_warning(
        sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    @triton.autotune(configs=[triton.Config({"BLOCK": 32}), triton.Config({"BLOCK": 64})], key=["n"])
    @triton.jit
    def local_add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        total = tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask)
        tl.store(out_ptr + offs, total, mask=mask)

    tunevault.install(mode="tune", store=sqlite_url, isolate=True)
    caplog.set_level(logging.WARNING, logger="tunevault")
    for n in (100, 200):
        x, y = torch.randn(n), torch.randn(n)
        assert torch.equal(ke.run_add(local_add, x, y), x + y)
    warnings = [r for r in caplog.records if "cannot be tuned in an isolated worker" in r.getMessage()]
    assert len(warnings) == 1 and "inside a function" in warnings[0].getMessage()
    assert all(dict(d.provenance)["tuned_in"] == "process" for d in runtime().used.values())


def lock_is_free() -> bool:
    """Whether another thread can take the engine's lock (it guards every isolated tuning)."""
    got: list[bool] = []

    def take() -> None:
        got.append(isolated._lock.acquire(timeout=1))
        if got[0]:
            isolated._lock.release()

    t = threading.Thread(target=take)
    t.start()
    t.join()
    return got[0]


def test_non_finite_scalar_is_tuned_in_the_worker_and_leaves_the_lock_free(sqlite_url: str) -> None:
    """-inf as a clamp bound once raised ValueError from the call and kept the engine's lock: every
    later isolated tuning on any thread waited out its tune_timeout, then failed."""
    from tunevault.core.identity import kernel_id

    tunevault.install(mode="tune", store=sqlite_url, isolate=True, tune_timeout=20)
    x = torch.randn(100)
    assert torch.equal(ke.run_clamp(x, float("-inf"), float("inf")), x)
    assert dict(decision_for(ke.clamp).provenance)["tuned_in"] == "worker"
    assert lock_is_free()

    took: list[float] = []

    def other() -> None:
        a, b = torch.randn(300), torch.randn(300)
        started = time.monotonic()
        assert torch.equal(ke.run_add(ke.add_equal, a, b), a + b)
        took.append(time.monotonic() - started)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert took and took[0] < 10 and dict(decision_for(ke.add_equal).provenance)["tuned_in"] == "worker"

    # a call the worker protocol cannot carry is "tune in process", never an error with the lock kept
    session = isolated.WorkerSession("kernels_engine:clamp", kernel_id(ke.clamp).digest,
                                     {"args": [{"kind": "scalar", "value": float("nan")}], "kwargs": {}},
                                     {}, time.monotonic() + 20, 10)
    with pytest.raises(isolated.IsolationUnavailable, match="cannot be sent to the worker"):
        session.start()
    assert lock_is_free() and isolated.worker_pid() is not None  # the worker did nothing wrong: it stays


def test_falling_back_after_waiting_for_the_worker_tunes_with_a_fresh_deadline(sqlite_url: str) -> None:
    """Another tuning kept the worker until this key's deadline: the key is tuned in process, with its
    own tune_timeout (it once inherited the spent one, skipped every config and raised TuningError)."""
    tunevault.install(mode="tune", store=sqlite_url, isolate=True, prestart=False, tune_timeout=2)
    holding, release = threading.Event(), threading.Event()

    def busy() -> None:
        if isolated._lock.acquire(timeout=10):  # as a long isolated tuning on another thread holds it
            holding.set()
            release.wait(60)
            isolated._lock.release()

    holder = threading.Thread(target=busy)
    holder.start()
    try:
        assert holding.wait(10)
        x, y = torch.randn(300), torch.randn(300)
        assert torch.equal(ke.run_add(ke.add_equal, x, y), x + y)
    finally:
        release.set()
        holder.join()
    d = decision_for(ke.add_equal)
    assert dict(d.provenance)["tuned_in"] == "process" and all(c.ok for c in d.candidates)


def test_importability_is_checked_by_kernel_identity() -> None:
    assert isolated.kernel_target(ke.twin) == ("kernels_engine:twin", "")
    # its function's name finds the other autotuner: the worker imports the attribute holding it
    assert isolated.kernel_target(ke.twin_b) == ("kernels_engine:twin_b", "")
    assert isolated.kernel_target(triton.autotune(configs=[triton.Config({"BLOCK": 8})], key=["n"])(
        ke._add_body))[0] is None  # the name resolves to a plain JIT function, not this autotuner


def test_an_autotuner_its_function_name_does_not_hold_is_tuned_in_the_worker(sqlite_url: str) -> None:
    """``twin_b = triton.autotune(...)(twin)``: the worker imports ``kernels_engine:twin_b``."""
    from tunevault.core.identity import kernel_id

    tunevault.install(mode="tune", store=sqlite_url, isolate=True)
    x, y = torch.randn(100), torch.randn(100)
    assert torch.equal(ke.run_add(ke.twin_b, x, y), x + y)
    (d,) = runtime().used.values()
    assert d.kernel.digest == kernel_id(ke.twin_b).digest
    assert dict(d.provenance)["tuned_in"] == "worker"


def test_worker_exits_when_idle(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEVAULT_WORKER_IDLE", "1")
    tunevault.install(mode="tune", store=sqlite_url, isolate=True)
    x, y = torch.randn(64), torch.randn(64)
    assert torch.equal(ke.run_add(ke.add_equal, x, y), x + y)
    assert dict(decision_for(ke.add_equal).provenance)["tuned_in"] == "worker"
    end = time.monotonic() + 60
    while isolated.worker_pid() is not None and time.monotonic() < end:
        time.sleep(0.1)
    assert isolated.worker_pid() is None  # gone by itself: it holds no device memory now


def wait_for_worker(present: bool, limit: float = 90.0) -> int | None:
    end = time.monotonic() + limit
    while (isolated.worker_pid() is not None) != present and time.monotonic() < end:
        time.sleep(0.05)
    return isolated.worker_pid()


def test_worker_is_prestarted_at_install_and_serves_the_first_tuning(sqlite_url: str) -> None:
    isolated.retire()
    tunevault.install(mode="tune", store=sqlite_url, isolate=True)
    pid = wait_for_worker(True)
    assert pid is not None  # started before any kernel ran: its imports overlap the server's start-up
    x, y = torch.randn(64), torch.randn(64)
    assert torch.equal(ke.run_add(ke.add_equal, x, y), x + y)
    assert dict(decision_for(ke.add_equal).provenance)["tuned_in"] == "worker"
    assert isolated.worker_pid() == pid  # the prestarted worker did the tuning, no second start


def test_unused_prestarted_worker_goes_with_uninstall_and_prestart_can_be_off(
        sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    isolated.retire()
    tunevault.install(mode="tune", store=sqlite_url, isolate=True)
    assert wait_for_worker(True) is not None
    tunevault.uninstall()
    assert wait_for_worker(False, 10.0) is None
    monkeypatch.setenv("TUNEVAULT_PRESTART", "0")
    tunevault.install(mode="tune", store=sqlite_url, isolate=True)
    assert not [t for t in threading.enumerate() if t.name == "tunevault-prestart"]
    assert isolated.worker_pid() is None  # started only when a key needs tuning


STALLS = '''
import os
import time

if os.environ.get("TUNEVAULT_WORKER") == "1":
    time.sleep(600)  # e.g. waits for peers only a fresh process contends for
'''


def tuning_in_a_worker_session(sqlite_url: str, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Thread, list[bool]]:
    """A key tuning on a thread, its worker session open and config 0 waiting at the gate (the
    ``open`` file in ``tmp_path``); a module that stalls in the worker is importable. The thread
    appends whether the call's result was right."""
    (tmp_path / "stalls_in_worker.py").write_text(STALLS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(ke.GATE_DIR_VAR, str(tmp_path))
    tunevault.install(mode="tune", store=sqlite_url, isolate=True, prestart=False, validate=True,
                      config_timeout=5, tune_timeout=60)
    x, y = torch.randn(64), torch.randn(64)
    results: list[bool] = []
    tuning = threading.Thread(target=lambda: results.append(bool(torch.equal(ke.run_add(ke.add_gated, x, y), x + y))))
    tuning.start()
    while isolated.worker_pid() is None or not isolated._worker.opened:  # type: ignore[union-attr]
        time.sleep(0.02)
    return tuning, results


def test_a_hinted_module_that_stalls_in_the_worker_never_fails_a_key(sqlite_url: str, tmp_path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A module hinted to the worker while a session was open was imported between the session's
    requests: its import stalled the next one, and every config failed as a timeout (a TuningError
    reached the caller). Hints wait for the session's end; a worker stalled on one is replaced, the
    key tunes in process, and the module is hinted no more."""
    tuning, results = tuning_in_a_worker_session(sqlite_url, tmp_path, monkeypatch)
    isolated.hint_imports(["stalls_in_worker"])  # mid-session; config 0 waits for the gate
    (tmp_path / "open").touch()
    tuning.join(timeout=120)
    assert results == [True]
    for n in (96, 128):  # the first meets the worker stalled on the import; the second a fresh one
        a, b = torch.randn(n), torch.randn(n)
        assert torch.equal(ke.run_add(ke.add_gated, a, b), a + b)
    where = [dict(d.provenance)["tuned_in"] for (k, _), d in runtime().used.items() if k.endswith("add_gated")]
    assert "stalls_in_worker" not in isolated._hinted
    assert sorted(where) == ["process", "worker", "worker"]



def test_a_worker_that_does_not_begin_a_run_is_replaced_and_the_key_tunes_in_a_fresh_one(
        sqlite_url: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker stalled between a session's requests (on an import sent to it directly) is a
    stalled worker: replaced after config_timeout; the key goes on in a fresh worker (in process
    only once no worker begins the run)."""
    tuning, results = tuning_in_a_worker_session(sqlite_url, tmp_path, monkeypatch)
    first = isolated.worker_pid()
    isolated._worker.send({"op": "import", "modules": ["stalls_in_worker"]})  # type: ignore[union-attr]
    (tmp_path / "open").touch()
    tuning.join(timeout=120)
    assert results == [True]
    assert dict(decision_for(ke.add_gated).provenance)["tuned_in"] == "worker"
    assert isolated.worker_pid() not in (None, first)
