"""on_miss=background: a miss is served by the fallback at once and tuned off the request path."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import triton

import kernels_engine as ke
import tunevault
from conftest import in_fork
from tunevault.integration.triton_adapter import runtime
from tunevault.policy import background

# Set before any worker starts, so every worker can see the gate the tests open.
if ke.GATE_DIR_VAR not in os.environ:
    os.environ[ke.GATE_DIR_VAR] = tempfile.mkdtemp(prefix="tunevault-gate-")
    atexit.register(shutil.rmtree, os.environ[ke.GATE_DIR_VAR], True)


@contextlib.contextmanager
def count_executions(kernel: object) -> Iterator[list[int]]:
    """Launches that execute (``warmup=True`` calls only compile, as the fallback's probe does)."""
    fn = kernel.fn  # type: ignore[attr-defined]
    seen, original = [0], fn.run
    had_own = "run" in fn.__dict__  # Triton 3.4's InterpretedFunction sets run per instance

    def run(*args: object, **kwargs: object) -> object:
        seen[0] += 0 if kwargs.get("warmup") else 1
        return original(*args, **kwargs)

    fn.run = run
    try:
        yield seen
    finally:
        if had_own:
            fn.run = original
        else:
            del fn.run


@pytest.fixture
def gate() -> Iterator[Path]:
    path = Path(ke.gate_path())
    path.unlink(missing_ok=True)
    yield path
    path.touch()  # never leave a tuning job waiting
    background.drain(timeout=120)


def serve_until_tuned(kernel: object, gate: Path) -> object:
    """First call: served by the fallback while tuning waits at the gate. Returns the decision."""
    tunevault.seal(on_miss="background")
    x, y = torch.randn(500), torch.randn(500)
    with count_executions(kernel) as launches:
        out = ke.run_add(kernel, x, y)
    assert torch.equal(out, x + y)
    assert launches[0] == 1  # no benchmarking on the calling thread
    assert kernel.best_config is kernel.configs[0]  # type: ignore[attr-defined]  # the fallback
    assert background.pending() == 1  # the call returned while tuning is still queued or running

    gate.touch()
    assert background.drain(timeout=180)
    with count_executions(kernel) as launches:
        out = ke.run_add(kernel, x, y)
    assert torch.equal(out, x + y)
    assert launches[0] == 1
    decided = [d for (name, _), d in runtime().used.items() if name.endswith(kernel.base_fn.__name__)]  # type: ignore[attr-defined]
    assert len(decided) == 1
    assert decided[0].config_index != 0  # config 0 is the slowest while tuning
    assert kernel.best_config is kernel.configs[decided[0].config_index]  # type: ignore[attr-defined]
    stats = tunevault.stats()["kernels"][decided[0].kernel.name]["serving"]
    assert stats["fallbacks"] == 1 and stats["tunings"] == 1
    return decided[0]


def test_background_tuning_in_the_isolated_worker(sqlite_url: str, gate: Path) -> None:
    tunevault.install(mode="tune", store=sqlite_url)
    decision = serve_until_tuned(ke.add_gated, gate)
    assert dict(decision.provenance)["tuned_in"] == "worker"


def test_background_tuning_in_process_for_a_kernel_a_worker_cannot_import(
        sqlite_url: str, gate: Path) -> None:
    configs = [triton.Config({"BLOCK": b}, pre_hook=ke.slow_gated if i == 0 else None)
               for i, b in enumerate((32, 64, 128))]
    local = triton.autotune(configs=configs, key=["n"])(ke._add_body)  # its name resolves to no autotuner
    tunevault.install(mode="tune", store=sqlite_url)
    decision = serve_until_tuned(local, gate)
    assert dict(decision.provenance)["tuned_in"] == "process"


def test_failed_background_tuning_keeps_serving_the_fallback(
        sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    tunevault.install(mode="tune", store=sqlite_url)
    tunevault.seal(on_miss="background")
    x, y = torch.randn(40), torch.randn(40)
    assert torch.equal(ke.run_add(ke.add_fails, x, y), x + y)
    assert background.drain(timeout=180)
    assert torch.equal(ke.run_add(ke.add_fails, x, y), x + y)
    assert ke.add_fails.best_config is ke.add_fails.configs[0]
    assert any("background tuning of" in r.getMessage() and "keeping the fallback" in r.getMessage()
               for r in caplog.records)


def test_background_pruning_holds_the_kernels_lock_and_leaves_nargs_as_stock_does(sqlite_url: str) -> None:
    """Pruning reads the autotuner's shared ``nargs``, which request threads set and clear under the
    kernel's lock: the background job prunes under that lock too, and leaves ``nargs`` None, as
    stock Triton does outside a call."""
    seen: list[tuple[int, bool]] = []

    def prune(configs: list[triton.Config], nargs: dict[str, object], **kwargs: object) -> list[triton.Config]:
        state = local.__dict__.get("_tunevault_state")
        seen.append((int(nargs["n"]), state is not None and state.lock._is_owned()))  # type: ignore[arg-type]
        return configs

    local = triton.autotune(configs=[triton.Config({"BLOCK": b}) for b in (32, 64)], key=["n"],
                            prune_configs_by={"early_config_prune": prune})(ke._add_body)
    tunevault.install(mode="tune", store=sqlite_url)
    tunevault.seal(on_miss="background")
    x, y = torch.randn(77), torch.randn(77)
    assert torch.equal(ke.run_add(local, x, y), x + y)
    assert background.drain(timeout=180)
    assert tunevault.stats()["kernels"]["total"]["serving"]["tunings"] == 1
    assert seen == [(77, True), (77, True)]  # the request's pruning, then the background job's
    assert local.nargs is None


def test_a_fork_while_a_key_tunes_in_the_background_leaves_the_child_able_to_tune_it(sqlite_url: str) -> None:
    """A server forking its workers while a key tunes in the background: the child inherited the
    queue's busy count and pending key but not the thread, so ``drain()`` never returned True
    there, and the key kept its fallback config in the child (its re-submits were dropped)."""
    parent, tuning, release = os.getpid(), threading.Event(), threading.Event()

    def hold_in_parent(configs: list, nargs: dict, **kwargs: object) -> list:
        if threading.current_thread().name == "tunevault-background" and os.getpid() == parent:
            tuning.set()
            release.wait(120)
        return configs

    kernel = triton.autotune(configs=ke._configs(32, 64, 128), key=["n"],  # in process: not importable
                             prune_configs_by={"early_config_prune": hold_in_parent})(ke._add_body)
    tunevault.install(mode="tune", store=sqlite_url, prestart=False)
    tunevault.seal(on_miss="background")
    x, y = torch.randn(300), torch.randn(300)
    assert torch.equal(ke.run_add(kernel, x, y), x + y)  # the fallback; the key is queued
    assert tuning.wait(120)  # the parent's thread is tuning it

    def child() -> dict[str, object]:
        seen: dict[str, object] = {"pending": background.pending()}
        if seen["pending"] == 0:
            seen["right"] = bool(torch.equal(ke.run_add(kernel, x, y), x + y))  # decided again: queued here
            seen["drained"] = background.drain(timeout=120)
            seen["tunings"] = next(iter(tunevault.stats()["kernels"].values()))["serving"]["tunings"]
        return seen

    try:
        seen = in_fork(child)
    finally:
        release.set()
    assert seen == {"pending": 0, "right": True, "drained": True, "tunings": 1}
    assert background.drain(timeout=120)


def test_under_the_interpreter_background_tuning_and_requests_take_turns_launching(sqlite_url: str) -> None:
    """Triton's interpreter keeps a launch's program id in one process-wide builder: two threads
    launching at once read each other's ids (stock raises ``x >= grid_dim[0]``, or computes
    wrong). Background tuning in this process must not launch while a request does: neither a
    request's autotuned kernel nor its plain ``@triton.jit`` one (which raised "Did you forget to
    add @triton.jit?" or computed wrong while only autotuned launches took turns)."""
    import sys
    import time

    import kernels_core as kc

    # Not kc.add_one's configs: a worker imports no such kernel, so it is tuned in this process.
    local = triton.autotune(configs=kc._three(16, 32, 128), key=["n"])(kc.add_one.fn)
    tunevault.install(mode="tune", store=sqlite_url)
    x, out = kc.vec(2000), torch.empty(2000)
    local[kc.grid(2000)](x, out, 2000)  # decided before the seal: the requests below are hits
    tunevault.seal(on_miss="background")
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: every race shows
    failures: list[str] = []
    try:
        for n in range(2001, 2007):  # six keys to tune in the background, each served by a fallback
            y, o = kc.vec(n), torch.empty(n)
            local[kc.grid(n)](y, o, n)
            if not torch.equal(o, y + 1):
                failures.append(f"fallback n={n}")
        deadline = time.monotonic() + 120
        while background.pending() and time.monotonic() < deadline:
            try:
                local[kc.grid(2000)](x, out, 2000)
                if not torch.equal(out, x + 1):
                    failures.append("wrong result")
                out.zero_()
                kc.add_one.fn[kc.grid(2000)](x, out, 2000, BLOCK=64)  # the plain JIT function, no autotuner
                if not torch.equal(out, x + 1):
                    failures.append("wrong result of a plain launch")
            except Exception as exc:
                failures.append(repr(exc)[:200])
    finally:
        sys.setswitchinterval(interval)
    assert background.drain(timeout=120)
    assert failures == []
    assert tunevault.stats()["kernels"]["total"]["serving"]["tunings"] == 6
    assert {dict(d.provenance)["tuned_in"] for d in runtime().used.values()} == {"process"}


def serve_a_gated_fallback(sqlite_url: str) -> None:
    """Install, seal with background tuning, and miss once: the fallback serves the call and the
    key's job waits at the gate."""
    tunevault.install(mode="tune", store=sqlite_url)
    tunevault.seal(on_miss="background")
    x, y = torch.randn(300), torch.randn(300)
    assert torch.equal(ke.run_add(ke.add_gated, x, y), x + y)


def pending_after_uninstall(gate: Path) -> int:
    """``uninstall()`` while the gated job waits, the gate opening a second later so the job goes on
    while uninstall() waits for it; the jobs still pending right after it returns."""
    opener = threading.Timer(1.0, gate.touch)
    opener.start()
    try:
        tunevault.uninstall()
        return background.pending()
    finally:
        opener.join()


def test_uninstall_leaves_no_background_tuning_running_and_stock_tritons_cache_alone(
        sqlite_url: str, gate: Path) -> None:
    """uninstall() restores stock Triton exactly: a job still tuning went on beside stock's own
    benchmarking (and under the interpreter, raced its launches), then wrote its config into the
    autotuner's cache, so stock skipped benchmarking that key. uninstall() now waits for it."""
    serve_a_gated_fallback(sqlite_url)
    assert background.pending() == 1
    assert pending_after_uninstall(gate) == 0, "a background tuning outlived uninstall()"
    assert dict(ke.add_gated.cache) == {}, "the job's config reached stock Triton's cache"


def test_uninstall_after_a_reinstall_waits_for_the_replaced_runtimes_job(sqlite_url: str, gate: Path) -> None:
    """install() again (a plugin re-initialising) replaced the runtime whose job was tuning:
    uninstall() waited only for the current runtime's jobs, returned at once and gave the
    interpreter its launcher back while that job still launched (``x >= grid_dim[0]``)."""
    serve_a_gated_fallback(sqlite_url)
    tunevault.install(mode="tune", store=sqlite_url)
    assert pending_after_uninstall(gate) == 0, "the replaced runtime's job outlived uninstall()"


def test_uninstall_stops_a_job_waiting_for_another_processs_lease(sqlite_url: str, caplog) -> None:
    """A background job waiting for the lease another process holds held uninstall() for the whole
    tuning timeout, then tuned the key anyway (its store closed, so "tuning without a lease")."""
    import logging

    from tunevault.core.identity import current_fingerprint, kernel_id
    from tunevault.core.kernel_state import KernelState
    from tunevault.policy.lease import lease_name
    from tunevault.store.base import open_store

    x, y = torch.randn(400), torch.randn(400)
    key = KernelState(ke.add_slow).labelled_key({"x_ptr": x, "y_ptr": y, "out_ptr": x, "n": 400})
    other = open_store(sqlite_url)  # another process tuning this key: it holds the lease for long
    assert other.try_lease(lease_name(kernel_id(ke.add_slow).digest, current_fingerprint().digest, key.text),
                           "elsewhere:1:abc", 600.0)
    tunevault.install(mode="tune", store=sqlite_url, isolate=False, tune_timeout=60.0)
    tunevault.seal(on_miss="background")
    caplog.set_level(logging.INFO, logger="tunevault")
    assert torch.equal(ke.run_add(ke.add_slow, x, y), x + y)  # the fallback; the job waits for the lease
    deadline = time.monotonic() + 60
    while not any("being tuned by another process" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the job never waited for the lease"
        time.sleep(0.05)
    tunevault.uninstall()
    assert background.pending() == 0
    assert not any("still runs" in r.getMessage() for r in caplog.records)
    assert list(other.decisions()) == [], "the key was tuned after uninstall()"
    other.close()


def test_a_job_tuned_in_the_worker_builds_no_arguments_in_the_server(sqlite_url: str, gate: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker rebuilds the call from its CallSpec; the server built a full copy of the
    arguments on the call's device anyway (for pruning), while serving, after the KV cache."""
    from tunevault.capture.argspec import CallSpec

    built: list[str] = []
    real_build = CallSpec.build

    def recording(self: CallSpec, autotuner: object, device: str | None = None, seed: int = 0) -> object:
        built.append(str(device))  # what the serving process allocated for, delegated unchanged
        return real_build(self, autotuner, device=device, seed=seed)  # type: ignore[arg-type]

    monkeypatch.setattr(CallSpec, "build", recording)
    tunevault.install(mode="tune", store=sqlite_url)
    decision = serve_until_tuned(ke.add_gated, gate)
    assert dict(decision.provenance)["tuned_in"] == "worker"
    assert built == ["meta"], "placeholders for pruning only: nothing real was built here"


def test_a_copy_made_while_a_fallback_serves_finds_the_tuned_decision(sqlite_url: str, gate: Path) -> None:
    """A copy inherited the fallback as a config pinned by hand: it launched the fallback for good
    (after uninstall too), while the original launched the tuned config."""
    import copy

    tunevault.install(mode="tune", store=sqlite_url)
    tunevault.seal(on_miss="background")
    x, y = torch.randn(500), torch.randn(500)
    assert torch.equal(ke.run_add(ke.add_gated, x, y), x + y)  # the fallback; tuning waits at the gate
    twin = copy.deepcopy(ke.add_gated)
    gate.touch()
    assert background.drain(timeout=180)
    ke.run_add(ke.add_gated, x, y)
    assert ke.add_gated.best_config is not ke.add_gated.configs[0]  # tuned: config 0 is the slowest
    assert torch.equal(ke.run_add(twin, x, y), x + y)
    assert twin.best_config.kwargs == ke.add_gated.best_config.kwargs, "the copy finds the decision"


def test_a_job_whose_worker_stalls_tunes_in_process_on_real_arguments(sqlite_url: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A background job passes placeholders on meta through the server's side; when its worker
    stalled, tuning went on in this process on those placeholders ('Cannot copy out of meta
    tensor') and the key kept its fallback. Each worker is frozen (SIGSTOP) as it is sent the run."""
    import signal

    from tunevault.engine import procs

    frozen: set[int] = set()
    real_send = procs.WorkerProcess.send

    def freezing(self: procs.WorkerProcess, msg: dict) -> None:
        if msg.get("op") == "run" and self.pid not in frozen:
            os.kill(self.pid, signal.SIGSTOP)
            frozen.add(self.pid)
        real_send(self, msg)

    monkeypatch.setattr(procs.WorkerProcess, "send", freezing)
    tunevault.install(mode="tune", store=sqlite_url, prestart=False, config_timeout=2, tune_timeout=60)
    tunevault.seal(on_miss="background")
    x, y = torch.randn(300), torch.randn(300)
    try:
        assert torch.equal(ke.run_add(ke.add_equal, x, y), x + y)  # the fallback
        assert background.drain(timeout=180) and frozen
        serving = tunevault.stats()["kernels"]["kernels_engine:add_equal"]["serving"]
        assert serving["tunings"] == 1, serving
        (decision,) = [d for (k, _), d in runtime().used.items() if k.endswith("add_equal")]
        assert dict(decision.provenance)["tuned_in"] == "process"
    finally:
        for pid in frozen:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_a_fallback_met_through_two_call_sites_is_counted_and_replaced_at_both(sqlite_url: str, gate: Path) -> None:
    """Two call sites passing the tensors by keyword in another order meet one Triton key. The
    second found the fallback in the autotuner's cache and remembered it as decided: its calls
    counted as hits (and captured as hits), and once tuned it kept launching the fallback."""
    tunevault.install(mode="tune", store=sqlite_url)
    tunevault.seal(on_miss="background")
    x, y = torch.randn(500), torch.randn(500)
    out = torch.empty_like(x)
    grid = lambda meta: (triton.cdiv(500, meta["BLOCK"]),)  # noqa: E731

    def site_a() -> object:
        ke.add_gated[grid](x_ptr=x, y_ptr=y, out_ptr=out, n=500)
        return ke.add_gated.best_config

    def site_b() -> object:
        ke.add_gated[grid](y_ptr=y, x_ptr=x, out_ptr=out, n=500)
        return ke.add_gated.best_config

    assert site_a() is site_b() is site_b() is ke.add_gated.configs[0]  # the fallback at both
    serving = tunevault.stats()["kernels"]["kernels_engine:add_gated"]["serving"]
    assert (serving["fallbacks"], serving["fallback_hits"], serving["hits"]) == (1, 2, 0), serving
    gate.touch()
    assert background.drain(timeout=180)
    tuned = site_a()
    assert tuned is not ke.add_gated.configs[0] and site_b() is tuned, "both sites launch the tuned config"
    assert torch.equal(out, x + y)
