"""Which errors of a config make it lose, and which reach the caller, as stock Triton decides.

Stock ``Autotuner._bench`` turns three errors into an infinite time, so the config loses:
``OutOfResources``, ``CompileTimeAssertionFailure`` and ``PTXASError`` (the same three from Triton
3.4 through 3.9). Any other exception from a config's hooks or launch reaches the caller of the
kernel, after the ``post_hook`` saw it: a user's bug is not a slow config. Tuning here does the same.

tunevault's own timing wraps a config's call in work of its own (flush buffers, CUDA events,
graph capture), whose faults only make that config lose. ``raising`` marks what came out of the
config's call, so each place that catches errors can tell the two apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunevault.core.model import CandidateResult


class ConfigRaised(Exception):
    """Config ``index`` raised ``error``, which stock Triton lets reach the caller: tuning stops and the
    caller gets ``error`` itself (engine.tuner.measure unwraps it)."""

    def __init__(self, index: int | None, error: Exception) -> None:
        super().__init__(index, error)
        self.index, self.error = index, error

    def describe(self) -> str:
        return f"{type(self.error).__name__}: {self.error}"[:500]


class WorkerStalled(RuntimeError):
    """Mid-tuning, the isolated worker stopped answering before any config ran (stalled on an
    import, or no worker could be started): no config's fault, so the key tunes in process with
    a fresh ``tune_timeout`` (engine.tuner.measure), except the configs in ``faulted``, which
    already crashed or hung the worker (their failed results)."""

    def __init__(self, message: str, faulted: dict[int, CandidateResult]) -> None:
        super().__init__(message)
        self.faulted = faulted


def losing_errors() -> tuple[type[Exception], ...]:
    """The exceptions that make a config lose: those the installed Triton's ``_bench`` catches."""
    import triton.compiler.errors as compiler_errors
    import triton.runtime.errors as runtime_errors

    names = [(runtime_errors, "OutOfResources"), (compiler_errors, "CompileTimeAssertionFailure"),
             (runtime_errors, "PTXASError")]
    return tuple(getattr(module, name) for module, name in names if hasattr(module, name))


def raising(call: Callable[[], None], index: int | None) -> Callable[[], None]:
    """``call``, with any error stock would let reach the caller wrapped in ConfigRaised (the losing
    ones pass unchanged), so the timing code around it does not take it for a fault of its own."""
    losing = losing_errors()

    def marked() -> None:
        try:
            call()
        except losing:
            raise
        except Exception as exc:
            raise ConfigRaised(index, exc) from exc

    return marked
