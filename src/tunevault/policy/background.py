"""Background tuning: a miss is served by the fallback now and tuned off the request path.

One daemon thread works through a queue of keys. Each job carries a CallSpec of the request's
arguments (or, when they cannot be captured, copies of them), so the request's own tensors are
never touched after the call returns. The tuned config is published to the store and swapped
into the kernel's in-memory dict, so the next call with that key launches it.

A key missed during a CUDA graph capture is the exception: taking a CallSpec reads index tensors
back from the device, which a capture forbids, so the job holds the arguments (the graph's own
static buffers) and takes the CallSpec once captures are over. No job benchmarks while a capture
is in progress anywhere in the process (engine.graphs.wait_until_quiet).

A fork copies the queue but not the thread: the child starts with an empty queue, and forgets the
fallback configs of the keys the parent was still to tune, so its next call of such a key decides
it again (adopting the parent's decision once published, else queueing it in the child).

An on-miss policy, so it lives here and calls the miss path's ``tune``; the engine learns that
it tunes for a background job through ``engine.context``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunevault.policy.stock import forget

if TYPE_CHECKING:
    import torch

    from tunevault.capture.argspec import CallSpec
    from tunevault.core.kernel_state import KernelState
    from tunevault.core.model import TuningKey
    from tunevault.policy.runtime import Runtime

log = logging.getLogger("tunevault")

IDLE_EXIT = 60.0  # the thread exits after this long without work; submit() starts a new one
_cond = threading.Condition()
_queue: deque[Job] = deque()
_pending: set[tuple[int, str, str]] = set()
_running: list[Job] = []  # taken from the queue by the thread, not finished
_thread: threading.Thread | None = None


@dataclass
class Job:
    rt: Runtime
    state: KernelState
    raw_key: tuple
    key: TuningKey
    stock_key: tuple = ()  # Triton's own key, for the autotuner's ``cache``
    spec: CallSpec | None = None
    copies: tuple[tuple, dict[str, Any]] | None = None
    held: tuple[tuple, dict[str, Any]] | None = None  # arguments met during a capture, read after it

    @property
    def token(self) -> tuple[int, str, str]:
        return (id(self.rt), self.state.kernel_id.digest, self.key.text)


def _copy(value: Any) -> Any:
    return value.detach().clone() if hasattr(value, "detach") and hasattr(value, "clone") else value


def submit(rt: Runtime, state: KernelState, args: tuple, kwargs: dict[str, Any], key: TuningKey,
           during_capture: bool = False) -> None:
    """Queue ``key`` for tuning; returns at once (a CallSpec capture is the only work done here,
    and none while a CUDA graph is captured: ``during_capture`` defers it until captures end)."""
    global _thread

    from tunevault.policy.stock import stock_key

    job = Job(rt, state, state.raw_key(args, kwargs), key, stock_key(state.arg_names, state.keys, args, kwargs))
    with _cond:
        if job.token in _pending:
            return
        _pending.add(job.token)
    if during_capture:
        job.held = (tuple(args), dict(kwargs))
    else:
        _describe(job, args, kwargs)
    with _cond:
        _queue.append(job)
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_loop, name="tunevault-background", daemon=True)
            _thread.start()
        _cond.notify_all()
    rt.events.emit("background_queued", kernel=state.kernel_id.name, key=key.to_json())


def _describe(job: Job, args: tuple, kwargs: dict[str, Any]) -> None:
    """Give ``job`` a CallSpec of the arguments, or copies of them when they cannot be described."""
    from tunevault.capture.argspec import CallSpec

    try:
        job.spec = CallSpec.of(job.state.autotuner, args, kwargs)
    except Exception:
        job.copies = (tuple(_copy(a) for a in args), {k: _copy(v) for k, v in kwargs.items()})


def _loop() -> None:
    global _thread
    while True:
        with _cond:
            if not _cond.wait_for(lambda: bool(_queue), timeout=IDLE_EXIT):
                _thread = None
                return
            job = _queue.popleft()
            _running.append(job)
        try:
            _run(job)
        except Exception as exc:  # never let one job end the thread
            log.warning("tunevault: background tuning failed unexpectedly: %s", exc)
        finally:
            with _cond:
                _running.remove(job)
                _pending.discard(job.token)
                _cond.notify_all()


def _device(args: tuple, kwargs: dict[str, Any]) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        dev = getattr(value, "device", None)
        if getattr(dev, "type", None) == "cuda":
            return dev
    return None


def _spec_device(spec: CallSpec) -> torch.device | None:
    """The CUDA device the captured call ran on, if any."""
    cuda = next((name for name in spec.devices if name.startswith("cuda")), None)
    if cuda is None:
        return None
    import torch

    return torch.device(cuda)


def _run(job: Job) -> None:
    import contextlib

    from tunevault.core.identity import describe_config
    from tunevault.engine.context import tuning_in_background
    from tunevault.engine.graphs import wait_until_quiet
    from tunevault.policy import stock
    from tunevault.policy.lease import Abandoned
    from tunevault.policy.resolve import tune

    rt, st = job.rt, job.state
    wait_until_quiet()  # benchmarking now would invalidate a capture in progress
    if rt.closed:  # uninstalled or re-installed since the miss: nothing to update
        return
    if job.held is not None:  # the capture is over: the graph's buffers can be read now
        held, job.held = job.held, None
        device = _device(*held)
        if device is not None:
            import torch

            torch.cuda.synchronize(device)  # what the graph's last replay wrote, not half of it
        _describe(job, *held)
    name, at = st.kernel_id.name, st.autotuner
    try:
        real = None
        if job.spec is not None:
            spec = job.spec
            # Tuned in the worker, which rebuilds the call itself: here placeholders on ``meta`` do,
            # unless pruning reads the arguments. A serving process then allocates nothing for it.
            placeholders = at.early_config_prune is None and at.perf_model is None
            args, kwargs = spec.build(at, device="meta" if placeholders else None, seed=0)
            real = (lambda: spec.build(at, seed=0)) if placeholders else None
            device = _spec_device(spec)
        else:
            assert job.copies is not None  # _describe gave the job one or the other
            args, kwargs = job.copies
            device = _device(args, kwargs)
        with contextlib.ExitStack() as stack:
            stack.enter_context(tuning_in_background(job.spec, real))
            if device is not None:  # a new thread starts on device 0; the request's may differ
                import torch

                stack.enter_context(torch.cuda.device(device))
            config = tune(rt, st, args, kwargs, job.key)
    except Abandoned as exc:
        log.debug("tunevault: background tuning of %s [%s] stopped: %s", name, job.key.describe(), exc)
        return
    except Exception as exc:
        rt.warn_once(("background", name, job.key.text), "tunevault: background tuning of %s [%s] failed "
                     "(%s); keeping the fallback config", name, job.key.describe(), exc)
        rt.events.emit("background_failed", kernel=name, key=job.key.to_json(), error=str(exc)[:500])
        return
    with st.lock:  # the tuned config replaces the fallback, in both in-memory dicts
        if rt.closed:  # uninstalled meanwhile: stock Triton's cache must stay as uninstall() left it
            return
        stock.record(st.autotuner, job.stock_key, config)
        st.fallback_keys.discard(job.stock_key)
        st.hits.clear()  # every raw key of the key (keywords in any order) launches the tuned config now
    rt.events.emit("background_tuned", kernel=name, key=job.key.to_json(), config=describe_config(config))


def drain(timeout: float | None = None) -> bool:
    """Wait until every queued key is tuned (or failed); False if ``timeout`` passed first."""
    with _cond:
        return _cond.wait_for(lambda: not _queue and not _running, timeout=timeout)


def stop(timeout: float | None = None) -> bool:
    """Drop every queued job and wait for the running one (``timeout``: False if it still runs), so
    that ``uninstall()`` leaves no tuning running beside stock Triton: a job of a runtime a
    re-install replaced included. One waiting for another process's lease gives up at once."""
    with _cond:
        for job in list(_queue):
            _queue.remove(job)
            _pending.discard(job.token)
        for job in _running:
            job.rt.stopping = True
        return _cond.wait_for(lambda: not _running, timeout=timeout)


def pending() -> int:
    with _cond:
        return len(_queue) + len(_running)


def _after_fork_in_child() -> None:
    """Start the child afresh: the parent's thread (and any lock it held) did not come along, so
    the inherited queue would never drain and its keys' re-submits would be dropped as pending.
    The parent tunes those keys; the child forgets their fallbacks and decides them again."""
    global _cond, _queue, _pending, _running, _thread
    inherited = [*_running, *_queue]
    _cond, _queue, _pending, _running, _thread = threading.Condition(), deque(), set(), [], None
    for job in inherited:
        job.state.hits.pop(job.raw_key, None)
        forget(job.state.autotuner, job.stock_key)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
