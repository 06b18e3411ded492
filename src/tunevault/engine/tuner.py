"""Measure candidates: in this process, or in a disposable worker when isolation is on.

Both places run the same stages (engine.search): parallel precompile, optional validation,
then a screen and careful timing of the best. Isolation falls back to this process, with one
warning, for kernels a fresh process cannot import.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from tunevault.core.model import CandidateResult, ConfigSpec
from tunevault.engine import context
from tunevault.engine.failures import ConfigRaised, WorkerStalled
from tunevault.engine.gpu_timing import MemoryProbe
from tunevault.engine.inprocess import InProcessSession
from tunevault.engine.search import search
from tunevault.engine.select import NoWorkingConfig, annotate, judge
from tunevault.engine.timing import has_own_benchmarker

if TYPE_CHECKING:
    from collections.abc import Hashable

    from triton import Config

    from tunevault.core.events import Stats
    from tunevault.core.kernel_state import KernelState
    from tunevault.engine.isolated import WorkerSession


log = logging.getLogger("tunevault")


class TuningSettings(Protocol):
    """The settings a tuning reads (policy.settings.Settings, a layer above the engine)."""

    @property
    def tune_timeout(self) -> float: ...

    @property
    def config_timeout(self) -> float: ...

    @property
    def isolate(self) -> bool: ...

    @property
    def validate(self) -> bool: ...

    @property
    def tolerance(self) -> float: ...

    @property
    def confidence(self) -> float: ...


class TuningRuntime(Protocol):
    """What a tuning needs from the runtime that asked for it (policy.runtime.Runtime)."""

    @property
    def settings(self) -> TuningSettings: ...

    @property
    def stats(self) -> Stats: ...

    @property
    def phase(self) -> str: ...

    def warn_once(self, token: Hashable, msg: str, *args: Any) -> bool: ...


class Measured(list[CandidateResult]):
    """Candidate results plus provenance notes (where tuning ran, how, device memory gained)."""

    notes: list[tuple[str, Any]]


def config_timeout(settings: TuningSettings) -> float:
    return float(settings.config_timeout or min(60.0, settings.tune_timeout))


def open_worker_session(rt: TuningRuntime, st: KernelState, args: tuple, kwargs: dict[str, Any],
                        candidates: Sequence[tuple[int, Config, ConfigSpec]], deadline: float,
                        phase: str | None = None) -> WorkerSession | None:
    """A started WorkerSession, or None (with one warning per kernel) when isolation cannot apply."""
    from tunevault.capture.argspec import CallSpec
    from tunevault.engine.hints import of_targets
    from tunevault.engine.isolated import IsolationUnavailable, WorkerSession, hint_imports, kernel_target

    at, name, phase = st.autotuner, st.kernel_id.name, phase or rt.phase
    target, why = kernel_target(at)
    if target is not None:  # a worker started later imports it first thing
        hint_imports(of_targets([target]))
    if target is not None and any(i >= len(at.configs) for i, _, _ in candidates):
        target, why = None, "early_config_prune returned configs the kernel does not declare"
    spec = context.current_spec()
    if target is not None and spec is None:
        try:
            spec = CallSpec.of(at, args, kwargs)
        except Exception as exc:
            target, why = None, f"its arguments cannot be captured ({type(exc).__name__}: {exc})"
    if target is not None:
        assert spec is not None  # captured above, or there is no target

        def launched(n: int) -> None:
            rt.stats.add(name, phase, "benchmark_runs", n)

        session = WorkerSession(target, st.kernel_id.digest, spec.to_json(), {i: s for i, _, s in candidates},
                                deadline, config_timeout(rt.settings), launched)
        try:
            session.start()
            return session
        except IsolationUnavailable as exc:
            why = str(exc)
    rt.warn_once(("isolate", name), "tunevault: %s cannot be tuned in an isolated worker (%s); "
                 "tuning it in this process", name, why)
    return None


def measure(rt: TuningRuntime, st: KernelState, args: tuple, kwargs: dict[str, Any],
            candidates: Sequence[tuple[int, Config, ConfigSpec]], phase: str | None = None) -> list[CandidateResult]:
    """Every candidate's result; a config's error that stock Triton lets reach the caller is raised
    as is (in process) or as a TuningError naming it (isolated), and nothing is decided. Benchmark
    runs count under ``phase``, the miss's (a seal() while it tunes does not change it)."""
    name, settings, phase = st.kernel_id.name, rt.settings, phase or rt.phase
    deadline = time.monotonic() + settings.tune_timeout
    probe = MemoryProbe()

    def counted() -> None:
        rt.stats.add(name, phase, "benchmark_runs")

    session: WorkerSession | InProcessSession | None = None
    opened: list[tuple[str, Any]] = []
    if settings.isolate or context.in_background():
        started = time.perf_counter()
        session = open_worker_session(rt, st, args, kwargs, candidates, deadline, phase)
        opened.append(("worker_open_s", round(time.perf_counter() - started, 3)))
    if session is None:
        if opened:  # isolation fell back: the wait for the worker (its lock, its start) was not tuning
            deadline = time.monotonic() + settings.tune_timeout
        if (rebuild := context.real_arguments()) is not None:  # a background job's placeholders
            args, kwargs = rebuild()
        session = InProcessSession(st.autotuner, args, kwargs, {i: c for i, c, _ in candidates},
                                   {i: s for i, _, s in candidates}, counted, deadline)
    confidence = settings.confidence
    raised: Exception | None = None
    specs = {i: s for i, _, s in candidates}

    def run(order: list[int]) -> tuple[list[CandidateResult], list[tuple[str, Any]]]:
        assert session is not None
        return search(session, order, specs, settings.tolerance, settings.validate,
                      has_own_benchmarker(st.autotuner), confidence)

    try:
        try:
            results, notes = run([i for i, _, _ in candidates])
        except WorkerStalled as exc:  # the worker's fault, not a config's: tune here (docs/engine.md)
            session.close()
            log.warning("tunevault: %s: the tuning worker stalled (%s); tuning this key in this process, "
                        "without the %d config(s) that crashed or hung the worker", name, exc, len(exc.faulted))
            if (rebuild := context.real_arguments()) is not None:  # a background job's placeholders
                args, kwargs = rebuild()
            session = InProcessSession(st.autotuner, args, kwargs,
                                       {i: c for i, c, _ in candidates if i not in exc.faulted},
                                       {i: s for i, _, s in candidates if i not in exc.faulted}, counted,
                                       time.monotonic() + settings.tune_timeout)
            rest, notes = run([i for i, _, _ in candidates if i not in exc.faulted])
            by_index = {r.index: r for r in rest} | exc.faulted
            results = [by_index[i] for i, _, _ in candidates]
            notes = [*notes, ("worker_stalled", str(exc)[:200])]
    except ConfigRaised as exc:  # a config's error that stock Triton lets reach the caller
        raised = exc.error
    finally:
        session.close()
    if raised is not None:
        raise raised  # the very exception, raised outside the handler so it does not chain ConfigRaised
    try:  # why the winner wins, and each candidate's confidence of being slower, go into the decision
        judgement = judge(results, settings.tolerance, confidence)
        results = annotate(results, judgement)
        notes = [*notes, ("selection", judgement.reason()), ("confidence", confidence)]
    except NoWorkingConfig:
        pass  # the caller reports it
    out = Measured(results)
    out.notes = [*opened, *notes, ("tuned_in", session.where), *probe.delta(include_driver=session.where == "process")]
    return out

