"""Benchmark candidate configs inside this process, with Triton's hook semantics.

Mirrors ``Autotuner._bench``: config ``pre_hook``, the autotuner's ``pre_hook`` (reset_to_zero /
restore_value by default), the launch, then ``post_hook`` with the exception if any. Unlike
stock Triton it works on the caller's own argument dict, never on ``self.nargs``, so threads
tuning different keys cannot see each other's arguments.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from tunevault.core.model import CandidateResult, ConfigSpec

log = logging.getLogger("tunevault")


def check_conflicts(kwargs: dict[str, Any], config: Any) -> None:
    conflicts = kwargs.keys() & config.kwargs.keys()
    if conflicts:
        raise ValueError(f"Conflicting meta-parameters: {', '.join(sorted(conflicts))}."
                         " Make sure that you don't re-define auto-tuned symbols.")


def make_kernel_call(autotuner: Any, args: tuple, kwargs: dict[str, Any], nargs: dict[str, Any],
                     config: Any, on_launch: Callable[[], None] | None = None) -> Callable[[], None]:
    """One launch of ``config`` wrapped in the hooks, as the benchmarker will call it."""
    current = dict(kwargs, **config.all_kwargs())
    full_nargs = {**nargs, **current}

    def kernel_call() -> None:
        if config.pre_hook:
            config.pre_hook(full_nargs)
        autotuner.pre_hook(full_nargs)
        if on_launch is not None:
            on_launch()
        try:
            autotuner.fn.run(*args, **current)
        except Exception as exc:
            try:
                autotuner.post_hook(full_nargs, exception=exc)
            finally:
                raise
        autotuner.post_hook(full_nargs, exception=None)

    return kernel_call


def bench_candidates(autotuner: Any, args: tuple, kwargs: dict[str, Any], nargs: dict[str, Any],
                     candidates: Sequence[tuple[int, Any, ConfigSpec]], benchmarker: Callable[..., Any],
                     on_launch: Callable[[], None] | None = None) -> list[CandidateResult]:
    """Time each (declared index, Config, spec); a config that fails is recorded, not raised."""
    results = []
    for index, config, spec in candidates:
        check_conflicts(kwargs, config)
        call = make_kernel_call(autotuner, args, kwargs, nargs, config, on_launch)
        try:
            timings = benchmarker(call, quantiles=(0.5, 0.2, 0.8))
            values = [float(timings)] if isinstance(timings, int | float) else [float(t) for t in timings]
            if not values or not all(math.isfinite(v) and v >= 0 for v in values):
                raise RuntimeError(f"benchmark returned {values}")  # Triton reports failures as inf
            results.append(CandidateResult(index, spec, tuple(values)))
        except Exception as exc:  # compile errors, OutOfResources, launch failures: this config loses
            log.debug("tunevault: config %s failed: %s", spec.describe(), exc)
            results.append(CandidateResult(index, spec, (), f"{type(exc).__name__}: {exc}"[:500]))
    return results
