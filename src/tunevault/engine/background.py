"""Background tuning: a miss is served by the fallback now and tuned off the request path.

One daemon thread works through a queue of keys. Each job carries a CallSpec of the request's
arguments (or, when they cannot be captured, copies of them), so the request's own tensors are
never touched after the call returns. The tuned config is published to the store and swapped
into the kernel's in-memory dict, so the next call with that key launches it.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("tunevault")

IDLE_EXIT = 60.0  # the thread exits after this long without work; submit() starts a new one
_cond = threading.Condition()
_queue: deque[Job] = deque()
_pending: set[tuple[int, str, str]] = set()
_busy = 0
_thread: threading.Thread | None = None
_current: contextvars.ContextVar[Job | None] = contextvars.ContextVar("tunevault_job", default=None)


@dataclass
class Job:
    rt: Any
    state: Any
    raw_key: tuple
    key: Any
    spec: Any = None  # CallSpec
    copies: tuple[tuple, dict[str, Any]] | None = None

    @property
    def token(self) -> tuple[int, str, str]:
        return (id(self.rt), self.state.kernel_id.digest, self.key.text)


def in_background() -> bool:
    return _current.get() is not None


def current_spec() -> Any:
    """The CallSpec of the job being tuned on this thread, if any (the worker needs no rebuild)."""
    job = _current.get()
    return None if job is None else job.spec


def _copy(value: Any) -> Any:
    return value.detach().clone() if hasattr(value, "detach") and hasattr(value, "clone") else value


def submit(rt: Any, state: Any, args: tuple, kwargs: dict[str, Any], key: Any) -> None:
    """Queue ``key`` for tuning; returns at once (a CallSpec capture is the only work done here)."""
    global _thread
    from tunevault.capture.argspec import CallSpec

    job = Job(rt, state, state.raw_key(args, kwargs), key)
    with _cond:
        if job.token in _pending:
            return
        _pending.add(job.token)
    try:
        job.spec = CallSpec.of(state.autotuner, args, kwargs)
    except Exception:
        job.copies = (tuple(_copy(a) for a in args), {k: _copy(v) for k, v in kwargs.items()})
    with _cond:
        _queue.append(job)
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_loop, name="tunevault-background", daemon=True)
            _thread.start()
        _cond.notify_all()
    rt.events.emit("background_queued", kernel=state.kernel_id.name, key=key.to_json())


def _loop() -> None:
    global _busy, _thread
    while True:
        with _cond:
            if not _cond.wait_for(lambda: bool(_queue), timeout=IDLE_EXIT):
                _thread = None
                return
            job = _queue.popleft()
            _busy += 1
        try:
            _run(job)
        except Exception as exc:  # never let one job end the thread
            log.warning("tunevault: background tuning failed unexpectedly: %s", exc)
        finally:
            with _cond:
                _busy -= 1
                _pending.discard(job.token)
                _cond.notify_all()


def _device(args: tuple, kwargs: dict[str, Any]) -> Any:
    for value in (*args, *kwargs.values()):
        dev = getattr(value, "device", None)
        if getattr(dev, "type", None) == "cuda":
            return dev
    return None


def _run(job: Job) -> None:
    import contextlib

    from tunevault.integration.triton_adapter import runtime
    from tunevault.policy.resolve import tune

    rt, st = job.rt, job.state
    if runtime() is not rt:  # uninstalled or re-installed since the miss: nothing to update
        return
    name, token = st.kernel_id.name, _current.set(job)
    try:
        args, kwargs = job.spec.build(st.autotuner, seed=0) if job.spec is not None else job.copies
        device = _device(args, kwargs)
        with contextlib.ExitStack() as stack:
            if device is not None:  # a new thread starts on device 0; the request's may differ
                import torch

                stack.enter_context(torch.cuda.device(device))
            config = tune(rt, st, args, kwargs, job.key)
    except Exception as exc:
        rt.warn_once(("background", name, job.key.text), "tunevault: background tuning of %s [%s] failed "
                     "(%s); keeping the fallback config", name, job.key.describe(), exc)
        rt.events.emit("background_failed", kernel=name, key=job.key.to_json(), error=str(exc)[:500])
        return
    finally:
        _current.reset(token)
    with st.lock:
        st.remember(job.raw_key, config)
    rt.events.emit("background_tuned", kernel=name, key=job.key.to_json(), config=str(config))


def drain(timeout: float | None = None) -> bool:
    """Wait until every queued key is tuned (or failed); False if ``timeout`` passed first."""
    with _cond:
        return _cond.wait_for(lambda: not _queue and _busy == 0, timeout=timeout)


def pending() -> int:
    with _cond:
        return len(_queue) + _busy
