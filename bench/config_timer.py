"""Time every declared config of an autotuned kernel at one recorded call, without its autotuner.

``record_calls`` runs a workload once with ``Autotuner.run`` replaced by a recorder (it launches
the first config, so nothing is tuned) and returns each autotuner call's arguments. ``time_all``
then launches every config on those arguments with Triton's hook semantics
(tunevault.engine.inprocess.make_kernel_call): compiled in parallel first, then timed by
CUDA-graph replay of n launches in interleaved rounds (every config once per round), falling
back to ``triton.testing.do_bench`` for a config whose launches cannot be captured. Under
``TRITON_INTERPRET=1`` it times with tunevault's CPU timer instead (plumbing only).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunevault.core.identity import config_spec
from tunevault.core.model import CandidateResult
from tunevault.engine.inprocess import make_kernel_call, precompile
from tunevault.engine.timing import cpu_bench, interpreting

GRAPH_MS = 1.0  # launches per graph: enough for one replay to take about this long
ROUNDS = 12  # timed replays of every config's graph, interleaved


@dataclass
class Call:
    """One recorded ``Autotuner.run`` call: the autotuner and the arguments it was given."""

    autotuner: Any
    args: tuple
    kwargs: dict[str, Any]


def record_calls(workload: Callable[[], Any]) -> list[Call]:
    """Run ``workload`` once; every autotuner it reaches launches its first config and is recorded."""
    from triton.runtime.autotuner import Autotuner

    calls: list[Call] = []
    original = Autotuner.run

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(Call(self, args, dict(kwargs)))
        config = self.configs[0]
        nargs = dict(zip(self.arg_names, args, strict=False))
        return make_kernel_call(self, args, kwargs, nargs, config)()

    Autotuner.run = recording
    try:
        workload()
    finally:
        Autotuner.run = original
    return calls


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _event_ms(fn: Callable[[], Any], n: int = 3) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _i in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def _capture(fn: Callable[[], Any]) -> tuple[Any, int] | None:
    """A CUDA graph of n launches of ``fn`` (n so one replay takes ~GRAPH_MS), or None if capture fails."""
    import torch

    per_launch = max(_event_ms(fn), 1e-4)
    n = max(1, min(200, int(GRAPH_MS / per_launch)))
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _i in range(n):
                fn()
        graph.replay()
        torch.cuda.synchronize()
    except Exception:
        torch.cuda.synchronize()
        return None
    return graph, n


def _do_bench(fn: Callable[[], Any]) -> tuple[float, ...]:
    import triton.testing

    values = triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=[0.5, 0.2, 0.8])
    return tuple(float(v) for v in values)


def time_all(call: Call) -> tuple[list[CandidateResult], str]:
    """Every declared config's timings (ms: median, p20, p80) or error at ``call``; and the method used."""
    at = call.autotuner
    nargs = dict(zip(at.arg_names, call.args, strict=False))
    specs = [config_spec(c) for c in at.configs]
    precompile(at, call.args, call.kwargs, list(at.configs))
    launches: dict[int, Callable[[], Any]] = {}
    out: dict[int, CandidateResult] = {}
    for i, config in enumerate(at.configs):
        fn = make_kernel_call(at, call.args, call.kwargs, nargs, config)
        try:
            fn()  # compiled above; this loads it and shows a config that cannot run here
            launches[i] = fn
        except Exception as exc:
            out[i] = CandidateResult(i, specs[i], (), _error(exc))
    if interpreting():
        for i, fn in launches.items():
            out[i] = CandidateResult(i, specs[i], tuple(cpu_bench(fn, reps=2)))
        return [out[i] for i in range(len(specs))], "cpu"
    return _time_on_gpu(launches, specs, out)


def _time_on_gpu(launches: dict[int, Callable[[], Any]], specs: list[Any],
                 out: dict[int, CandidateResult]) -> tuple[list[CandidateResult], str]:
    import torch

    torch.cuda.synchronize()
    graphs: dict[int, tuple[Any, int]] = {}
    for i, fn in launches.items():
        captured = _capture(fn)
        if captured is None:
            try:
                out[i] = CandidateResult(i, specs[i], _do_bench(fn))
            except Exception as exc:
                out[i] = CandidateResult(i, specs[i], (), _error(exc))
        else:
            graphs[i] = captured
    samples: dict[int, list[float]] = {i: [] for i in graphs}
    for _round in range(ROUNDS):
        events = []
        for i, (graph, n) in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            events.append((i, n, start, end))
        torch.cuda.synchronize()
        for i, n, start, end in events:
            samples[i].append(start.elapsed_time(end) / n)
    for i, values in samples.items():
        ordered = sorted(values)
        out[i] = CandidateResult(i, specs[i], (statistics.median(ordered), ordered[len(ordered) // 5],
                                               ordered[(4 * len(ordered)) // 5]))
    del graphs
    method = "cuda-graph" if len(samples) == len(launches) else f"cuda-graph ({len(launches) - len(samples)} do_bench)"
    return [out[i] for i in range(len(specs))], method
