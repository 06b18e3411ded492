"""A GPU timer with CUDA events and an L2 flush buffer the size of the device's L2 cache.

Stock Triton flushes L2 by zeroing a 256 MB buffer before every timed run; after a server has
allocated its KV cache that allocation alone can run out of memory. Zeroing a buffer as large
as the L2 cache evicts it just as well at a fraction of the memory. A small flush finishes
before the host has launched the next run, though, and the event pair would then time the
host's launch latency too; so the GPU is kept busy with a short spin (``torch.cuda._sleep``)
sized to the measured host time of one launch, which hides that gap as the big flush did.

A kernel of a few microseconds is timed as a server runs it: a CUDA graph of N launches is
captured once and replayed, so the launch cost is not part of the time (eager timing of such a
kernel measures the host). Only where the replay does what the eager call does: no config
``pre_hook`` and only Triton's own autotuner hooks (``reset_to_zero``/``restore_value`` are
device copies, captured with the launch); a capture that fails falls back to eager timing.
``TUNEVAULT_BENCH_GRAPHS=0`` turns graph timing off.

A process's first few graph timings read fast: on an H200 the first timing of each of the first
three configs a fresh process timed was 7-21% below every later one, in every process, whatever
was loaded, after a pause or after eager launches alike; three throwaway graph timings first
removed it (BENCHMARKS.md, "Compile ahead", after the helper fixes). So the first graph timer of
a process on a device times its own graph three times and throws the times away.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tunevault.core.env import positive
from tunevault.engine.timing import summarize

if TYPE_CHECKING:
    import torch
    from triton import Config
    from triton.runtime.autotuner import Autotuner

FALLBACK_L2_BYTES = 64 << 20
MAX_FLUSH_BYTES = 4 << 30  # far above any L2 (H200: 60 MiB); more is a typo that would exhaust the GPU
# (warm-up ms, timed ms, min reps, max reps): "screen" ranks candidates, "full" times the few that
# survive it. Half of Triton's default effort (25 ms, 100 ms): the median of up to 500 flushed runs
# already resolves differences well below the 2% tolerance band.
EFFORT = {"screen": (2.0, 10.0, 3, 50), "full": (10.0, 50.0, 10, 500)}
GRAPH_BELOW_MS = 0.1  # kernels shorter than this are timed by graph replay
GRAPH_REPLAY_MS = 1.0  # one replay (N launches) lasts about this long
GRAPH_MAX_LAUNCHES = 256
PRIME_TIMINGS = 3  # throwaway graph timings before a process's first (see the module docstring)
PRIME_MS = 20.0
_primed: set[int] = set()  # devices whose graph timing this process has primed
_prime_lock = threading.Lock()
_no_graphs: weakref.WeakSet[Autotuner] = weakref.WeakSet()  # kernels whose capture failed once: eager from then


class CaptureInProgress(RuntimeError):
    """Benchmarking was asked for while this thread's stream is being captured into a CUDA graph."""


def graph_safe(autotuner: Autotuner, config: Config | None = None) -> Autotuner | None:
    """``autotuner`` when its launches of ``config`` may be timed by graph replay, else None."""
    if os.environ.get("TUNEVAULT_BENCH_GRAPHS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if config is not None and getattr(config, "pre_hook", None) is not None:
        return None  # arbitrary host code: a replay would skip it
    for hook in (getattr(autotuner, "pre_hook", None), getattr(autotuner, "post_hook", None)):
        if hook is not None and getattr(hook, "__module__", None) != "triton.runtime.autotuner":
            return None  # the user's own autotuner hooks
    try:
        return None if autotuner in _no_graphs else autotuner
    except TypeError:
        return None


@functools.lru_cache(maxsize=16)
def l2_cache_bytes(device: int) -> int:
    """The L2 size of CUDA device ``device`` as torch reports it, else a conservative default."""
    import torch

    try:
        size = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
    except Exception:
        size = 0
    default = size if size > 0 else FALLBACK_L2_BYTES
    if os.environ.get("TUNEVAULT_L2_FLUSH_BYTES", "").strip() == "0":
        return 0  # no flush
    return positive("TUNEVAULT_L2_FLUSH_BYTES", default, int, f"a number of bytes at most {MAX_FLUSH_BYTES} "
                    "(0: no flush)", MAX_FLUSH_BYTES)


@functools.lru_cache(maxsize=16)
def cycles_per_us(device: int) -> float:
    """GPU clock cycles per microsecond, measured once with a spin kernel."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)  # load the spin kernel
    start.record()
    torch.cuda._sleep(2_000_000)
    end.record()
    torch.cuda.synchronize()
    return 2_000_000 / max(start.elapsed_time(end) * 1e3, 1.0)


def _host_launch_us(fn: Callable[[], Any], runs: int = 5) -> float:
    """How long the host takes to issue one run (the GPU must not idle that long before it)."""
    import time

    best = float("inf")
    for _i in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) * 1e6)
    return best


class ConfigTimer:
    """One config's launches, set up once and timed as often as asked: the first (compiling) call,
    the L2 flush, the spin that hides the host's launch latency, the runtime estimate and, for a
    short kernel that allows it, the captured CUDA graph. ``round(ms)`` returns per-launch times."""

    replay: tuple[torch.cuda.CUDAGraph, int] | None  # the captured graph and its launches per replay

    def __init__(self, fn: Callable[[], Any], graph: Autotuner | None = None, warmup_ms: float = 0.0,
                 flush: torch.Tensor | None = None) -> None:
        import torch

        self.fn, self.graph, self.replay = fn, graph, None
        device = torch.cuda.current_device()
        fn()
        torch.cuda.synchronize()
        self.flush = flush if flush is not None else new_flush(device)
        self.spin = 0
        if hasattr(torch.cuda, "_sleep"):
            self.spin = int(min(2000.0, 1.5 * _host_launch_us(fn) + 10.0) * cycles_per_us(device))
            torch.cuda.synchronize()
        self.estimate = max(sorted(self._eager(3))[1], 1e-3)
        self.wants_graph = graph is not None and self.estimate < GRAPH_BELOW_MS
        if self.wants_graph:
            self.capture()
            if self.replay is not None:
                self._prime(device)
        if self.replay is None:
            self._warm(warmup_ms)

    def _prime(self, device: int) -> None:
        """Once per process and device: time freshly captured graphs of this config and discard them."""
        with _prime_lock:
            if device in _primed:
                return
            _primed.add(device)
        for _i in range(PRIME_TIMINGS):
            replay = _capture(self.fn, self.estimate)
            if replay is None:
                return
            graph, launches = replay
            try:  # best effort: a fault here shows again, with its config, in the timing itself
                self._timed(self._runs(PRIME_MS, launches, 5, 500), graph.replay, launches)
            except Exception:
                return
            finally:
                graph.reset()

    def _warm(self, warmup_ms: float) -> None:
        for _i in range(max(1, int(warmup_ms / self.estimate))):
            self.fn()

    def capture(self) -> None:
        """Capture the graph of N launches (again); a kernel whose capture fails is timed eagerly."""
        self.replay = _capture(self.fn, self.estimate)
        if self.replay is None and self.graph is not None:
            _no_graphs.add(self.graph)

    def eager_only(self, warmup_ms: float) -> None:
        """Time eager runs from now on, like a config whose capture failed (see rounds.one_method)."""
        if self.replay is not None:
            self.close()
            self._warm(warmup_ms)

    def _prepare(self) -> None:
        import torch

        self.flush.zero_()
        if self.spin:
            torch.cuda._sleep(self.spin)

    def _eager(self, n: int) -> list[float]:
        return self._timed(n, self.fn, 1)

    def _timed(self, n: int, run: Callable[[], Any], launches: int) -> list[float]:
        """``n`` runs of ``run``, each after a flush and a spin, in ms per launch (``launches`` per run)."""
        import torch

        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for s, e in zip(starts, ends, strict=True):
            self._prepare()
            s.record()
            run()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) / launches for s, e in zip(starts, ends, strict=True)]

    def round(self, ms: float, min_reps: int = 1, max_reps: int = 500) -> list[float]:
        """Per-launch times of about ``ms`` of timed work (at least ``min_reps`` runs or replays)."""
        if self.replay is None:
            return self._eager(self._runs(ms, 1, min_reps, max_reps))
        graph, launches = self.replay
        return self._timed(self._runs(ms, launches, min_reps, max_reps), graph.replay, launches)

    def _runs(self, ms: float, launches: int, min_reps: int, max_reps: int) -> int:
        """Runs of ``launches`` launches each that make about ``ms`` of timed work, within the bounds."""
        return min(max_reps, max(min_reps, int(ms / (self.estimate * launches))))

    def close(self) -> None:
        if self.replay is not None:
            self.replay[0].reset()
            self.replay = None


def new_flush(device: int) -> torch.Tensor:
    """A buffer as large as the L2 cache; zeroing it evicts whatever a previous run left there."""
    import torch

    return torch.empty(max(1, l2_cache_bytes(device) // 4), dtype=torch.int32, device=device)


def refuse_in_capture() -> None:
    import torch

    if torch.cuda.is_current_stream_capturing():
        raise CaptureInProgress("refusing to benchmark inside a CUDA graph capture")


def gpu_bench(fn: Callable[[], Any], quantiles: Sequence[float] = (0.5, 0.2, 0.8), effort: str = "full",
              warmup_ms: float | None = None, rep_ms: float | None = None, graph: Autotuner | None = None,
              samples: list[float] | None = None, **_: Any) -> list[float]:
    """Time ``fn`` with CUDA events, flushing L2 before every run; milliseconds at ``quantiles``.

    ``graph``: the kernel (from graph_safe) when a short ``fn`` may be timed by graph replay.
    ``samples`` receives every timed run (per launch), for the selection's noise estimate."""
    refuse_in_capture()
    w_ms, r_ms, min_reps, max_reps = EFFORT.get(effort, EFFORT["full"])
    timer = ConfigTimer(fn, graph, w_ms if warmup_ms is None else warmup_ms)
    try:
        times = timer.round(r_ms if rep_ms is None else rep_ms, min_reps, max_reps)
    finally:
        timer.close()
    if samples is not None:
        samples.extend(times)
    return summarize(times, quantiles)


def _capture(fn: Callable[[], Any], estimate: float) -> tuple[torch.cuda.CUDAGraph, int] | None:
    """A captured graph of N launches of ``fn`` (one replay lasts about GRAPH_REPLAY_MS), replayed
    once; None if capture fails.

    Captured on a side stream in thread-local mode, so other threads of the process stay free to
    use CUDA meanwhile; no ``torch.cuda.graph`` context (it would empty the process's cache). Any
    error under capture, the config's own (ConfigRaised) included, is a failed capture: the eager
    runs that follow run the call again and report what it raises outside a capture."""
    import torch

    launches = max(1, min(GRAPH_MAX_LAUNCHES, round(GRAPH_REPLAY_MS / estimate)))
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                for _i in range(launches):
                    fn()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        graph.replay()  # warm-up: the first replay uploads the graph
        torch.cuda.synchronize()
    except Exception:
        torch.cuda.synchronize()
        return None
    return graph, launches


class MemoryProbe:
    """Device memory this process gained across tuning: allocator reserve and driver free memory."""

    def __init__(self) -> None:
        self.device: int | None = None
        self.reserved = self.free = 0
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self.device = torch.cuda.current_device()
                self.reserved = torch.cuda.memory_reserved(self.device)
                self.free = torch.cuda.mem_get_info(self.device)[0]
        except Exception:
            self.device = None

    def delta(self, include_driver: bool = True) -> list[tuple[str, int]]:
        """Provenance notes; the driver figure covers module loads but is device-wide."""
        if self.device is None:
            return []
        import torch

        try:
            torch.cuda.synchronize(self.device)
            notes = [("gpu_mem_delta_bytes", int(torch.cuda.memory_reserved(self.device) - self.reserved))]
            if include_driver:
                free = torch.cuda.mem_get_info(self.device)[0]
                notes.append(("gpu_driver_mem_delta_bytes", int(self.free - free)))
            return notes
        except Exception:
            return []
