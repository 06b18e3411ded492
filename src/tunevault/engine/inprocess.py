"""Benchmark candidate configs inside this process, with Triton's hook semantics.

Mirrors ``Autotuner._bench``: config ``pre_hook``, the autotuner's ``pre_hook`` (reset_to_zero /
restore_value by default), the launch, then ``post_hook`` with the exception if any. Unlike
stock Triton it works on the caller's own argument dict, never on ``self.nargs``, so threads
tuning different keys cannot see each other's arguments. As in stock, only the errors of
``failures.losing_errors`` make a config lose; any other error of a config's call stops the
tuning as ``ConfigRaised`` (engine/failures.py), and the caller gets it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tunevault.core.model import CandidateResult, ConfigSpec
from tunevault.engine.failures import ConfigRaised, losing_errors, raising

if TYPE_CHECKING:
    from triton import Config
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import KernelInterface

    from tunevault.engine.validate import Validator

log = logging.getLogger("tunevault")


def conflict_error(kwargs: dict[str, Any], config: Config) -> ValueError | None:
    """Stock's ValueError for a meta-parameter both passed by the caller and set by ``config``."""
    conflicts = kwargs.keys() & config.kwargs.keys()
    if not conflicts:
        return None
    return ValueError(f"Conflicting meta-parameters: {', '.join(sorted(conflicts))}."
                      " Make sure that you don't re-define auto-tuned symbols.")


def check_conflicts(kwargs: dict[str, Any], config: Config, index: int) -> None:
    """The conflict as ConfigRaised: stock's ``_bench`` raises it to the caller."""
    if (error := conflict_error(kwargs, config)) is not None:
        raise ConfigRaised(index, error)


def make_kernel_call(autotuner: Autotuner, args: tuple, kwargs: dict[str, Any], nargs: dict[str, Any],
                     config: Config, on_launch: Callable[[], None] | None = None) -> Callable[[], None]:
    """One launch of ``config`` wrapped in the hooks, as the benchmarker will call it."""
    current = dict(kwargs, **config.all_kwargs())
    full_nargs = {**nargs, **current}
    run = autotuner.fn.run

    def kernel_call() -> None:
        if config.pre_hook:
            config.pre_hook(full_nargs)
        autotuner.pre_hook(full_nargs)
        if on_launch is not None:
            on_launch()
        try:
            run(*args, **current)
        except Exception as exc:
            try:
                autotuner.post_hook(full_nargs, exception=exc)
            finally:
                raise
        autotuner.post_hook(full_nargs, exception=None)

    return kernel_call


def failure(index: int, spec: ConfigSpec, exc: BaseException) -> CandidateResult:
    """The result of a config that lost by ``exc`` (it does not build here, or cannot be timed)."""
    return CandidateResult(index, spec, (), f"{type(exc).__name__}: {exc}"[:500])


def bench_candidates(autotuner: Autotuner, args: tuple, kwargs: dict[str, Any], nargs: dict[str, Any],
                     candidates: Sequence[tuple[int, Config, ConfigSpec]], benchmarker: Callable[..., Any],
                     on_launch: Callable[[], None] | None = None) -> list[CandidateResult]:
    """Time each (declared index, Config, spec) with the kernel's or Triton's own benchmarker, as
    stock's ``_bench`` does: a losing error is recorded, any other raises ConfigRaised."""
    from tunevault.engine.timing import fills_samples, spread

    losing = losing_errors()
    results = []
    for index, config, spec in candidates:
        check_conflicts(kwargs, config, index)
        call = make_kernel_call(autotuner, args, kwargs, nargs, config, on_launch)
        runs: list[float] = []
        try:  # the call goes unmarked: a kernel's own do_bench sees the config's errors as stock's does
            extra = {"samples": runs} if fills_samples(benchmarker) else {}
            timings = benchmarker(call, quantiles=(0.5, 0.2, 0.8), **extra)
        except losing as exc:
            log.debug("tunevault: config %s failed: %s", spec.describe(), exc)
            results.append(failure(index, spec, exc))
            continue
        except Exception as exc:  # stock's _bench lets it reach the caller
            raise ConfigRaised(index, exc) from exc
        scalar = isinstance(timings, int | float)  # stock's configs_timings keeps the shape returned
        try:
            values = bench_values(timings)
        except RuntimeError as exc:
            results.append(replace(failure(index, spec, exc), scalar=scalar))
            continue
        n, iqr = spread(runs)
        results.append(CandidateResult(index, spec, values, None, n, iqr, scalar=scalar))
    return results


def bench_values(timings: float | Sequence[float]) -> tuple[float, ...]:
    """A benchmarker's result as times; RuntimeError where it reports a failure (Triton: inf)."""
    values = [float(timings)] if isinstance(timings, int | float) else [float(t) for t in timings]
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise RuntimeError(f"benchmark returned {values}")
    return tuple(values)


def bench_own(autotuner: Autotuner, bench: Callable[..., Any], args: tuple, kwargs: dict[str, Any],
              nargs: dict[str, Any], index: int, config: Config, spec: ConfigSpec) -> CandidateResult:
    """Time one config through the autotuner's own ``_bench`` (engine.timing.own_bench), called as
    stock calls it: the call's arguments, ``config=``, and ``self.nargs`` set to this call's. Its
    noise is unknown, so the selection ties it by ``tolerance`` alone. Whatever it raises reaches the
    caller, as in stock, whose ``benchmark`` calls ``_bench`` without a ``try`` (Triton's own
    ``_bench`` turns the losing errors into infinite times itself)."""
    previous, autotuner.nargs = getattr(autotuner, "nargs", None), nargs
    try:
        measured = bench(*args, config=config, **kwargs)
    except Exception as exc:
        raise ConfigRaised(index, exc) from exc
    finally:
        autotuner.nargs = previous
    scalar = isinstance(measured, int | float)
    try:
        return CandidateResult(index, spec, bench_values(measured), scalar=scalar)
    except Exception as exc:
        log.debug("tunevault: config %s failed: %s", spec.describe(), exc)
        return replace(failure(index, spec, exc), scalar=scalar)


def precompile(autotuner: Autotuner, args: tuple, kwargs: dict[str, Any], configs: Sequence[Config],
               threads: int | None = None) -> None:
    """Compile every config in a thread pool before any is timed; best effort, errors surface later.

    Triton >= 3.5 has ``AsyncCompileMode`` (compiles run in the pool, results land in the kernel
    cache); older versions get plain threads calling ``run(warmup=True)``. Under the interpreter
    there is nothing to compile.
    """
    from tunevault.core.machine import interpreting

    if interpreting() or len(configs) < 2:
        return
    from concurrent.futures import ThreadPoolExecutor

    compile_one = compiler(autotuner, args, kwargs)
    rest = list(configs)
    if not device_caches_ready(autotuner.fn):
        try:
            compile_one(configs[0])  # creates the per-device caches before threads share them
        except Exception as exc:
            log.debug("tunevault: precompile of %s failed: %s", configs[0], exc)
        rest = rest[1:]
    from tunevault.engine.context import compile_cores

    workers = threads or min(16, len(rest), compile_cores())  # ptxas runs as a process: threads overlap it
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="tunevault-compile") as pool:
        try:
            from triton.runtime._async_compile import AsyncCompileMode
        except ImportError:  # Triton 3.4
            for future in [pool.submit(compile_one, c) for c in rest]:
                with contextlib.suppress(Exception):
                    future.result()
            return
        try:
            with AsyncCompileMode(pool, ignore_errors=True):
                for config in rest:
                    with contextlib.suppress(Exception):
                        compile_one(config)
        except Exception as exc:
            log.debug("tunevault: parallel precompile failed: %s", exc)


def compiler(autotuner: Autotuner, args: tuple, kwargs: dict[str, Any]) -> Callable[[Config], Any]:
    """Compile one config for this call without launching it (``run(warmup=True)``)."""
    base = {k: v for k, v in kwargs.items() if k != "warmup"}

    def compile_one(config: Config) -> Any:
        return autotuner.fn.run(*args, warmup=True, **base, **config.all_kwargs())

    return compile_one


def device_caches_ready(fn: KernelInterface) -> bool:
    """Create the JIT function's per-device caches on this thread, so compile threads share one
    set without compiling a config first on their own; False where this Triton differs."""
    from tunevault.core.identity import jit_of

    try:
        caches = getattr(jit_of(fn), "device_caches", None)  # through @triton.heuristics wrappers
        if caches is None or not hasattr(caches, "default_factory"):
            return False
        from triton.runtime.driver import driver

        caches[driver.active.get_current_device()]
        return True
    except Exception:
        return False


class InProcessSession:
    """Runs the engine's stages (precompile, validate, time) on arguments in this process.

    The isolated worker drives the very same class on arguments it rebuilt from a CallSpec.
    """

    where = "process"

    def __init__(self, autotuner: Autotuner, args: tuple, kwargs: dict[str, Any], configs: dict[int, Config],
                 specs: dict[int, ConfigSpec], on_launch: Callable[[], None] | None = None,
                 deadline: float | None = None) -> None:
        self.autotuner, self.args, self.kwargs = autotuner, args, kwargs
        self.nargs = dict(zip(autotuner.arg_names, args, strict=False))
        self.configs, self.specs, self.on_launch, self.deadline = configs, specs, on_launch, deadline
        self.validator: Validator | None = None
        self.on_setup: Callable[[int | None], None] | None = None  # batch timing: config i runs first

    def _late(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def _skipped(self, index: int) -> CandidateResult:
        return CandidateResult(index, self.specs[index], (), "timeout: tuning exceeded tune_timeout; not run")

    def precompile(self, indices: Sequence[int], threads: int | None = None) -> None:
        precompile(self.autotuner, self.args, self.kwargs, [self.configs[i] for i in indices], threads)

    def validate(self, indices: Sequence[int], reference: int | None = None) -> dict[int, str | None]:
        from tunevault.engine.validate import Validator

        if self.validator is None:
            self.validator = Validator(self.autotuner, self.args, self.kwargs)
        v = self.validator
        if reference is not None and v.reference is None and reference in self.configs:
            with contextlib.suppress(Exception):
                v.check(reference, self.configs[reference])
        out: dict[int, str | None] = {}
        for i in indices:
            if self._late():
                out[i] = "timeout: tuning exceeded tune_timeout; not validated"
                continue
            check_conflicts(self.kwargs, self.configs[i], i)
            try:
                out[i] = v.check(i, self.configs[i], self.on_launch)
            except ConfigRaised:
                raise
            except Exception as exc:  # a losing error, or one of the validator's own
                out[i] = f"{type(exc).__name__}: {exc}"[:500]
        return out

    def time(self, indices: Sequence[int], effort: str) -> dict[int, CandidateResult]:
        from tunevault.engine.timing import (
            CPU_QUANTILES,
            CPU_SCREEN_QUANTILES,
            CPU_SCREEN_ROUNDS,
            benchmarker_for,
            cpu_reps,
            own_bench,
            uses_cpu_timer,
        )

        own = own_bench(self.autotuner)
        if own is not None:
            return {i: self._skipped(i) if self._late() else
                    bench_own(self.autotuner, own, self.args, self.kwargs, self.nargs, i, self.configs[i],
                              self.specs[i]) for i in indices}
        if uses_cpu_timer(self.autotuner):
            if effort == "screen":
                return self._interleaved(indices, CPU_SCREEN_ROUNDS, CPU_SCREEN_QUANTILES)
            return self._interleaved(indices, cpu_reps(), CPU_QUANTILES)
        if self.times_together(effort):
            return self._gpu_rounds(indices, effort)
        out: dict[int, CandidateResult] = {}
        for i in indices:
            if self._late():
                out[i] = self._skipped(i)
                continue
            bench = benchmarker_for(self.autotuner)
            out[i] = bench_candidates(self.autotuner, self.args, self.kwargs, self.nargs,
                                      [(i, self.configs[i], self.specs[i])], bench, self.on_launch)[0]
        return out

    def times_together(self, effort: str) -> bool:
        """Whether ``time`` must see all of a batch at once (interleaved GPU or CPU rounds), not one
        by one: the CPU timer's noise is the spread of runs compared within a round."""
        from tunevault.engine.timing import EFFORTS, uses_cpu_timer, uses_gpu_rounds

        return effort in EFFORTS and (uses_gpu_rounds(self.autotuner) or uses_cpu_timer(self.autotuner))

    def _gpu_rounds(self, indices: Sequence[int], effort: str) -> dict[int, CandidateResult]:
        """GPU timing of all ``indices`` together, in interleaved rounds (engine/rounds.py)."""
        from tunevault.engine.gpu_timing import graph_safe
        from tunevault.engine.rounds import time_in_rounds

        out: dict[int, CandidateResult] = {}
        calls: dict[int, Callable[[], None]] = {}
        for i in indices:
            check_conflicts(self.kwargs, self.configs[i], i)
            calls[i] = raising(make_kernel_call(self.autotuner, self.args, self.kwargs, self.nargs, self.configs[i],
                                                self.on_launch), i)
        graphs = {i: graph_safe(self.autotuner, self.configs[i]) for i in calls}
        timed = time_in_rounds(calls, graphs, effort, late=self._late, on_setup=self.on_setup)
        for i in calls:
            if i in timed.errors:
                log.debug("tunevault: config %s failed: %s", self.specs[i].describe(), timed.errors[i])
                out[i] = CandidateResult(i, self.specs[i], (), timed.errors[i])
            elif i in timed.fastest:
                center, n, iqr = timed.summary(i)
                out[i] = CandidateResult(i, self.specs[i], center, None, n, iqr)
            else:
                out[i] = self._skipped(i)
        return {i: out[i] for i in indices}

    def _interleaved(self, indices: Sequence[int], reps: int,
                     quantiles: Sequence[float]) -> dict[int, CandidateResult]:
        """CPU timing in rounds (one run of each config per round): a burst of load from elsewhere
        then slows every config a little instead of one config a lot. Each round runs the configs
        in a new random order, so no config is always first (or always right after a given other one).

        Configs are compared within a round (each run over its round's median), then across rounds
        by the median of those ratios (``quantiles``' first; the screen takes the fastest): on a
        loaded machine the load comes in phases longer than a round, and a config's fastest run
        mostly says whether it met a quiet moment (on two shared cores, five equal configs' fastest
        runs split 1.35 ms against 1.85 ms in 3 tunings of 160). The ratios are scaled back to
        milliseconds by the quietest round's median.

        ``on_setup(i)`` is called before every run of config i (the worker names the config that
        kills or hangs it; runs here are synchronous), ``on_setup(None)`` after the last."""
        from tunevault.engine.timing import spread, summarize

        out: dict[int, CandidateResult] = {}
        calls: dict[int, Callable[[], None]] = {}
        losing = losing_errors()
        announce = self.on_setup or (lambda _index: None)
        for i in indices:
            check_conflicts(self.kwargs, self.configs[i], i)
            call = raising(make_kernel_call(self.autotuner, self.args, self.kwargs, self.nargs, self.configs[i],
                                            self.on_launch), i)  # stock's _bench lets other errors reach the caller
            announce(i)
            try:
                call()  # warm-up, and the place where a broken config shows itself
            except losing as exc:
                out[i] = failure(i, self.specs[i], exc)
                continue
            calls[i] = call
        rounds: list[dict[int, float]] = []
        # A new order every round, different in every process: two processes tuning the same kernel
        # at once would otherwise run their rounds in step, and each config would keep meeting the
        # same phase of the other's work.
        order = random.Random(os.getpid() * 1_000_003 + len(calls))
        for _round in range(max(1, reps)):
            if self._late():
                break
            ring = list(calls.items())
            order.shuffle(ring)
            rounds.append({})
            for i, call in ring:
                announce(i)
                t0 = time.perf_counter()
                try:
                    call()
                except losing as exc:
                    out[i] = failure(i, self.specs[i], exc)
                    del calls[i]
                    continue
                rounds[-1][i] = (time.perf_counter() - t0) * 1e3
        announce(None)
        times = paired(rounds, calls)
        # Load from other processes is the machine's, not a config's: a config that happened to run
        # between its bursts has not shown how noisy the machine was. Each reports the batch's
        # spread, relative to its own center (the runs are ratios to their round's median).
        spreads = {i: spread(times[i]) for i in calls if times[i]}
        centers = {i: summarize(times[i], quantiles) for i in spreads}
        batch = max((iqr / centers[i][0] for i, (_n, iqr) in spreads.items() if iqr is not None and centers[i][0] > 0),
                    default=None)
        for i in calls:
            out[i] = self._skipped(i)
            if i in spreads:
                n, iqr = spreads[i]
                out[i] = CandidateResult(i, self.specs[i], tuple(centers[i]), None, n,
                                         None if iqr is None or batch is None else batch * centers[i][0])
        return {i: out[i] for i in indices}

    def close(self) -> None:
        self.validator = None


def paired(rounds: Sequence[dict[int, float]], keep: Iterable[int]) -> dict[int, list[float]]:
    """Each config's runs relative to their round's median, in ms of the quietest round's median."""
    keep = set(keep)
    filled = [r for r in rounds if r]
    levels = [statistics.median(r.values()) for r in filled]
    scale = min(levels, default=0.0)
    out: dict[int, list[float]] = {i: [] for i in keep}
    for r, level in zip(filled, levels, strict=True):
        for i, t in r.items():
            if i in keep and level > 0:
                out[i].append(t / level * scale)
    return out
