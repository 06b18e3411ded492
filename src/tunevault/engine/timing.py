"""Benchmarkers: our CUDA-event timer on a GPU, a CPU wall-clock timer under the interpreter.

Stock Triton cannot benchmark under ``TRITON_INTERPRET=1`` ("0 active drivers"); the CPU
timer makes the whole pipeline run, and be tested, on a machine with no GPU. Each benchmarker
comes in two efforts: ``screen`` (a few runs, to rank candidates) and ``full`` (careful).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tunevault.core.env import positive
from tunevault.core.machine import interpreting

if TYPE_CHECKING:
    from triton.runtime.autotuner import Autotuner

Benchmarker = Callable[..., Sequence[float]]
EFFORTS = ("screen", "full")
# What the CPU timer reports as (center, p20, p80) of its paired runs (each over its round's
# median, engine/inprocess.py): the median, since a loaded machine's quiet moments are luck that
# some configs meet and others do not.
CPU_QUANTILES = (0.5, 0.2, 0.8)
# The CPU screen's: its fastest paired run of a few rounds. A screen only has to keep every config
# that may tie, and a preemption only ever adds time: with one run per config, the earliest of
# eight equal configs was screened out by one preempted run in 12 of 120 tunings on a loaded 2-core
# machine, and another config won.
CPU_SCREEN_QUANTILES = (0.0, 0.2, 0.8)
CPU_SCREEN_ROUNDS = 4  # as the GPU screen's (engine/rounds.py)
DEFAULT_CPU_REPS = 15  # careful rounds; TUNEVAULT_CPU_BENCH_REPS overrides (cpu_reps says why 15)
MAX_CPU_REPS = 10_000  # more is a typo that would stall the kernel call for hours under the interpreter


def quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (numpy's default method)."""
    point = q * (len(ordered) - 1)
    lo = int(point)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (point - lo) * (ordered[hi] - ordered[lo])


def summarize(times: Sequence[float], quantiles: Sequence[float]) -> list[float]:
    ordered = sorted(times)
    return [statistics.median(ordered) if q == 0.5 else quantile(ordered, q) for q in quantiles]


def spread(times: Sequence[float]) -> tuple[int, float | None]:
    """How many runs, and their interquartile range (None below 3 runs: too few to say)."""
    if len(times) < 3:
        return len(times), None
    ordered = sorted(times)
    return len(ordered), quantile(ordered, 0.75) - quantile(ordered, 0.25)


def cpu_reps() -> int:
    """Timed rounds per config under the interpreter (``TUNEVAULT_CPU_BENCH_REPS``).

    15 by default: on a loaded machine the scheduler preempts a run for a whole time slice, several
    times a run's length. With 5 rounds, a config preempted in 4 of them had a median and an
    interquartile range both in the preempted mode and looked confidently slower than its equal
    twins (2 of 18 eight-process determinism runs under load failed, as did one CI run); with 15, 12
    of 15 would have to be preempted."""
    return positive("TUNEVAULT_CPU_BENCH_REPS", DEFAULT_CPU_REPS, int, f"a positive integer at most {MAX_CPU_REPS}",
                    MAX_CPU_REPS)


def cpu_bench(fn: Callable[[], Any], quantiles: Sequence[float] = (0.5, 0.2, 0.8), reps: int | None = None,
              samples: list[float] | None = None, **_: Any) -> list[float]:
    """Median-based wall-clock timing in milliseconds, one untimed warm-up call first.

    ``samples``, when given, receives every run's time (the selection judges noise from them)."""
    n = reps or cpu_reps()
    fn()
    times = []
    for _i in range(max(1, n)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if samples is not None:
        samples.extend(times)
    return summarize(times, quantiles)


def fills_samples(bench: Benchmarker) -> bool:
    """Whether ``bench`` is one of ours, which accept a ``samples`` list (Triton's do_bench does not)."""
    from tunevault.engine import gpu_timing

    return getattr(bench, "func", bench) in (cpu_bench, gpu_timing.gpu_bench)


def _cuda_ready() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def benchmarker_for(autotuner: Autotuner) -> Benchmarker:
    """What times a candidate on its own: the kernel's own ``do_bench`` if it declared one, else the
    driver's. Our timers time candidates together instead (InProcessSession.time): the CPU timer in
    rounds under the interpreter, the GPU timer in interleaved rounds on a GPU."""
    own = getattr(autotuner, "_do_bench", None)
    return own if own is not None else autotuner.do_bench


def uses_gpu_rounds(autotuner: Autotuner) -> bool:
    """Whether careful timing runs our GPU timer in interleaved rounds (engine/rounds.py)."""
    return not interpreting() and not has_own_benchmarker(autotuner) and _cuda_ready()


def uses_cpu_timer(autotuner: Autotuner) -> bool:
    return interpreting() and not has_own_benchmarker(autotuner)


def has_own_benchmarker(autotuner: Autotuner) -> bool:
    """A user ``do_bench`` (or ``_bench``) has one effort only, so screening with it would time
    everything twice."""
    return getattr(autotuner, "_do_bench", None) is not None or own_bench(autotuner) is not None


def own_bench(autotuner: Autotuner) -> Callable[..., Any] | None:
    """The autotuner's own ``_bench`` where its subclass (or the instance) replaces how Triton's
    measures a config, or its subclass replaces ``do_bench``, which Triton's ``_bench`` calls: stock
    measures every config through it, so tunevault must too. None for Triton's own (compared with
    ``Autotuner``'s attributes as they are now, so a shim patched onto the class is not "own")."""
    from triton.runtime.autotuner import Autotuner

    if not isinstance(autotuner, Autotuner):
        return None
    cls = type(autotuner)
    if ("_bench" in vars(autotuner) or cls._bench is not Autotuner._bench
            or getattr(cls, "do_bench", None) is not getattr(Autotuner, "do_bench", None)):
        return autotuner._bench
    return None
