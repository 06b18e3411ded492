"""Whether this thread tunes a key off the request path, and the CallSpec it tunes it from; and
whether other work of this process must end before any timing starts.

The policy's background tuner sets it around a job (``tuning_in_background``); the engine reads
it to tune such keys in the isolated worker, from the job's CallSpec, without rebuilding the
arguments here. A context variable, so only the job's own thread sees it.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunevault.capture.argspec import CallSpec

_NOT_IN_BACKGROUND = object()
_job_spec: contextvars.ContextVar[object] = contextvars.ContextVar("tunevault_background_spec",
                                                                   default=_NOT_IN_BACKGROUND)


@contextlib.contextmanager
def tuning_in_background(spec: CallSpec | None) -> Iterator[None]:
    token = _job_spec.set(spec)
    try:
        yield
    finally:
        _job_spec.reset(token)


def in_background() -> bool:
    return _job_spec.get() is not _NOT_IN_BACKGROUND


def current_spec() -> CallSpec | None:
    """The CallSpec of the background job tuned on this thread, if any (the worker needs no rebuild)."""
    spec = _job_spec.get()
    return None if spec is _NOT_IN_BACKGROUND else spec  # type: ignore[return-value]


# Background work of this process that holds the GIL for seconds (a warmup worker importing the
# manifest's kernel libraries while it tunes its first keys). Timing a kernel meanwhile measures
# the wait for the GIL, not the kernel: an H200 warmup's first key then screened 12 configs in 5.2 s
# instead of 0.15 s and chose a config 68% slower than its best. Timing waits for such work.
_holds: set[threading.Event] = set()
_holds_lock = threading.Lock()
HOLD_LIMIT_S = 300.0


def hold_timing(until: threading.Event) -> None:
    """No timing starts in this process until ``until`` is set (compiles go on meanwhile)."""
    with _holds_lock:
        _holds.add(until)


def wait_until_quiet(limit: float = HOLD_LIMIT_S) -> float:
    """Wait for every hold to end (at most ``limit`` seconds in all); the seconds waited."""
    with _holds_lock:
        _holds.difference_update([e for e in _holds if e.is_set()])
        pending = list(_holds)
    if not pending:
        return 0.0
    started = time.monotonic()
    for event in pending:
        event.wait(max(0.0, limit - (time.monotonic() - started)))
    return time.monotonic() - started
