"""What the engine learns from the caller about the thread it tunes on.

Whether this thread tunes a key off the request path, and the CallSpec it tunes it from: the
policy's background tuner sets it around a job (``tuning_in_background``); the engine reads it to
tune such keys in the isolated worker, from the job's CallSpec, without rebuilding the arguments
here. And how many processes of this host tune at once (``sharing_cores``): a sharded warmup's
participants each compile on their share of the cores, not each on all of them. Context
variables, so only the caller's own thread sees them.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from tunevault.capture.argspec import CallSpec

    Rebuild = Callable[[], tuple[tuple, dict[str, Any]]]

_NOT_IN_BACKGROUND = object()
_sharers: contextvars.ContextVar[int] = contextvars.ContextVar("tunevault_host_sharers", default=1)
_job_spec: contextvars.ContextVar[object] = contextvars.ContextVar("tunevault_background_spec",
                                                                   default=_NOT_IN_BACKGROUND)


_real_arguments: contextvars.ContextVar[Rebuild | None] = contextvars.ContextVar("tunevault_real_arguments",
                                                                             default=None)


@contextlib.contextmanager
def tuning_in_background(spec: CallSpec | None, real_arguments: Rebuild | None = None) -> Iterator[None]:
    """A background job tunes on this thread. ``real_arguments``: the arguments it passes are
    placeholders on ``meta`` (the worker rebuilds the call from ``spec``, so the server allocates
    nothing while serving); this builds real ones, for a tuning that falls back to this process."""
    token, real = _job_spec.set(spec), _real_arguments.set(real_arguments)
    try:
        yield
    finally:
        _job_spec.reset(token)
        _real_arguments.reset(real)


def real_arguments() -> Rebuild | None:
    """How to build real arguments where this thread's background job passed placeholders."""
    return _real_arguments.get()


def in_background() -> bool:
    return _job_spec.get() is not _NOT_IN_BACKGROUND


def current_spec() -> CallSpec | None:
    """The CallSpec of the background job tuned on this thread, if any (the worker needs no rebuild)."""
    spec = _job_spec.get()
    return None if spec is _NOT_IN_BACKGROUND else spec  # type: ignore[return-value]


@contextlib.contextmanager
def sharing_cores(processes: int) -> Iterator[None]:
    """``processes`` tuning processes of this host tune at once (a sharded warmup's participants)."""
    token = _sharers.set(max(1, processes))
    try:
        yield
    finally:
        _sharers.reset(token)


def compile_cores() -> int:
    """The cores this thread's tuning may compile on: the process's, divided among the host's
    processes that tune at the same time (a miss in serving has them all)."""
    from tunevault.core.machine import available_cores

    return max(1, available_cores() // _sharers.get())
