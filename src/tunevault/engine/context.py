"""Whether this thread tunes a key off the request path, and the CallSpec it tunes it from.

The policy's background tuner sets it around a job (``tuning_in_background``); the engine reads
it to tune such keys in the isolated worker, from the job's CallSpec, without rebuilding the
arguments here. A context variable, so only the job's own thread sees it.
"""

from __future__ import annotations

import contextlib
import contextvars
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
