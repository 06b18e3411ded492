"""Benchmarkers: Triton's on a GPU, a CPU wall-clock timer under the interpreter.

Stock Triton cannot benchmark under ``TRITON_INTERPRET=1`` ("0 active drivers"); the CPU
timer makes the whole pipeline run, and be tested, on a machine with no GPU.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

Benchmarker = Callable[..., Sequence[float]]


def interpreting() -> bool:
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cpu_bench(fn: Callable[[], Any], quantiles: Sequence[float] = (0.5, 0.2, 0.8), reps: int | None = None,
              **_: Any) -> list[float]:
    """Median-based wall-clock timing in milliseconds, one untimed warm-up call first."""
    n = reps or int(os.environ.get("TUNEVAULT_CPU_BENCH_REPS", "5"))
    fn()
    times = []
    for _i in range(max(1, n)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    ordered = sorted(times)
    return [statistics.median(ordered) if q == 0.5 else ordered[round(q * (len(ordered) - 1))]
            for q in quantiles]

def benchmarker_for(autotuner: Any) -> Benchmarker:
    """The kernel's own ``do_bench`` if it declared one, else Triton's, else the CPU timer."""
    own = getattr(autotuner, "_do_bench", None)
    if own is not None:
        return own
    if interpreting():
        return cpu_bench
    return autotuner.do_bench
