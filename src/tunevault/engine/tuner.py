"""Measure candidates: in this process, or in a disposable worker when isolation is on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunevault.core.model import CandidateResult, ConfigSpec
from tunevault.engine.inprocess import bench_candidates
from tunevault.engine.timing import benchmarker_for


def measure(rt: Any, st: Any, args: tuple, kwargs: dict[str, Any],
            candidates: Sequence[tuple[int, Any, ConfigSpec]]) -> list[CandidateResult]:
    name, phase = st.kernel_id.name, rt.phase

    def counted() -> None:
        rt.stats.add(name, phase, "benchmark_runs")

    named = dict(zip(st.autotuner.arg_names, args, strict=False))
    return bench_candidates(st.autotuner, args, kwargs, named, candidates, benchmarker_for(st.autotuner),
                            on_launch=counted)
