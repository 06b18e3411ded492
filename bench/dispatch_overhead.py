"""Hit-path dispatch overhead: tunevault vs stock ``triton.autotune``, side by side in one run.

For a call whose tuning key is already decided, each variant's per-call cost minus a direct
launch of the chosen config (the same JIT function called with the config's kwargs):

- ``direct``    -- ``kernel_without_autotune[grid](*args, **kwargs, **config.all_kwargs())``
- ``stock``     -- ``kernel[grid](*args, **kwargs)`` with Triton's own ``Autotuner.run``
- ``tunevault`` -- the same call with tunevault installed

On a CPU (no GPU) the JIT function's ``run`` is replaced by a no-op for the measurement, so only
dispatch is timed and the launch below the autotuner costs the same for all three variants. On a
GPU the launches are real (a kernel with a one-store body), synchronised outside the timed loops.
Variants are interleaved in rounds (rotating order) and the median per-round difference is kept.

    PYTHONPATH=src python bench/dispatch_overhead.py [--json out.json] [--rounds 31]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VARIANTS = ("direct", "stock", "tunevault")


def _setup_paths() -> None:
    for p in (str(HERE), str(HERE.parent / "src")):
        if p not in sys.path:
            sys.path.insert(0, p)


def _want_gpu(force_cpu: bool) -> bool:
    if force_cpu or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    import torch

    return torch.cuda.is_available()


def innermost_jit(kernel: Any) -> Any:
    fn = kernel
    while type(fn).__name__ in ("Heuristics", "Autotuner"):
        fn = fn.fn
    return fn


def autotuner_of(kernel: Any) -> Any:
    fn = kernel
    while type(fn).__name__ != "Autotuner":
        fn = fn.fn
    return fn


class Case:
    """One kernel and call shape: how to launch it through the autotuner and directly."""

    def __init__(self, name: str, kernel: Any, launch: Callable[[Any, dict], None], note: str) -> None:
        import triton

        self.name, self.kernel, self.note = name, kernel, note
        self.autotuner = autotuner_of(kernel)
        self.jit = innermost_jit(kernel)
        # the same stack minus the autotuner: heuristics (if any) over the JIT function
        if type(kernel).__name__ == "Heuristics":
            self.direct_kernel = triton.heuristics(kernel.values)(self.jit)
        else:
            self.direct_kernel = self.jit
        self._launch = launch
        self.cfg: dict[str, Any] = {}

    def tuned(self) -> None:
        self._launch(self.kernel, {})

    def direct(self) -> None:
        self._launch(self.direct_kernel, self.cfg)


def build_cases(device: str) -> list[Case]:
    import torch
    import triton

    import gpu_kernels as gk

    T, H, K, V, BT = 64, 4, 64, 64, 64
    q, k, v = (torch.empty(T, H, K, device=device, dtype=torch.bfloat16) for _ in range(3))
    o = torch.empty(T * H * V, device=device, dtype=torch.float32)
    scale = K ** -0.5
    fla_grid = lambda meta: (triton.cdiv(V, meta["BV"]), 1, 1)  # noqa: E731

    def fla(kernel: Any, cfg: dict) -> None:
        kernel[fla_grid](q, k, v, None, o, None, None, scale, T, H=H, Hg=H, K=K, V=V, BT=BT, **cfg)

    M, N, KK = 128, 128, 64
    a = torch.empty(M, KK, device=device, dtype=torch.float16)
    b = torch.empty(KK, N, device=device, dtype=torch.float16)
    c = torch.empty(M * N, device=device, dtype=torch.float32)
    pos_grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
    sam, sak, sbk, sbn = a.stride(0), a.stride(1), b.stride(0), b.stride(1)

    def positional(kernel: Any, cfg: dict) -> None:
        kernel[pos_grid](a, b, c, M, N, KK, sam, sak, sbk, sbn, **cfg)

    R, C = 64, 256
    x = torch.empty(R, C, device=device, dtype=torch.float32)
    sums = torch.empty(R, device=device, dtype=torch.float32)

    def row_sum(kernel: Any, cfg: dict) -> None:
        kernel[(R,)](x, sums, C, x.stride(0), **cfg)

    return [
        Case("fla_kwargs", gk.fla_probe, fla,
             "heuristics over autotune, 9 positional args (5 tensors/None), 6 keyword constexprs, "
             "4 key args"),
        Case("positional", gk.positional_probe, positional,
             "10 positional args (3 tensors), 2 key args"),
        Case("row_sum", gk.row_sum_probe, row_sum, "4 positional args (2 tensors), 1 key arg"),
    ]


class Stub:
    """Replaces ``JITFunction.run`` on the instance: records one call, or does nothing."""

    def __init__(self, jit: Any) -> None:
        self.jit, self.calls = jit, []

    def recording(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append((args, kwargs))

    @staticmethod
    def noop(*args: Any, **kwargs: Any) -> None:
        return None

    def set(self, fn: Callable[..., Any]) -> None:
        self.jit.run = fn

    def remove(self) -> None:
        self.jit.__dict__.pop("run", None)


def _same_call(x: tuple, y: tuple) -> bool:
    (a1, k1), (a2, k2) = x, y
    return (len(a1) == len(a2) and all(p is q for p, q in zip(a1, a2, strict=True))
            and set(k1) == set(k2) and all(k1[n] is k2[n] or k1[n] == k2[n] for n in k1 if n != "grid"))


def _timed(fn: Callable[[], None], n: int, sync: Callable[[], None],
           clock: Callable[[], float] = time.perf_counter) -> float:
    sync()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        t0 = clock()
        for _ in range(n):
            fn()
        dt = clock() - t0
    finally:
        if gc_was:
            gc.enable()
    sync()
    return dt / n


def measure_case(case: Case, runs: dict[str, Any], rounds: int, sample_s: float, gpu: bool,
                 clock: Callable[[], float]) -> dict[str, Any]:
    """Warm both caches, check all three variants launch the same thing, then time them."""
    from triton.runtime.autotuner import Autotuner

    import tunevault.integration.triton_adapter as adapter

    sync: Callable[[], None] = lambda: None  # noqa: E731
    stub = None if gpu else Stub(case.jit)
    if gpu:
        import torch

        sync = torch.cuda.synchronize
    chosen = {}
    try:
        if stub is not None:
            stub.set(stub.recording)
        for variant in ("stock", "tunevault"):
            Autotuner.run = runs[variant]
            case.tuned()  # miss: tunes (both pick config #0 via the kernel's tie benchmarker)
            case.tuned()  # hit
            chosen[variant] = case.autotuner.best_config
        if str(chosen["stock"]) != str(chosen["tunevault"]):
            raise RuntimeError(f"{case.name}: stock chose {chosen['stock']}, tunevault {chosen['tunevault']}")
        case.cfg = chosen["stock"].all_kwargs()
        order = ["direct", "stock", "tunevault"]
        call = {"direct": case.direct, "stock": case.tuned, "tunevault": case.tuned}
        if stub is not None:
            seen = {}
            for variant in order:
                Autotuner.run = runs[variant] if variant != "direct" else runs["stock"]
                stub.calls.clear()
                call[variant]()
                if len(stub.calls) != 1:
                    raise RuntimeError(f"{case.name}/{variant}: {len(stub.calls)} launches for one call")
                seen[variant] = stub.calls[0]
            for variant in ("stock", "tunevault"):
                if not _same_call(seen["direct"], seen[variant]):
                    raise RuntimeError(f"{case.name}: {variant} launches differently from direct:\n"
                                       f"{seen[variant]}\nvs\n{seen['direct']}")
            stub.set(stub.noop)
        states = [s for s in adapter.kernel_states() if s.autotuner is case.autotuner]
        hits_before = states[0].n_hits if states else None
        stock_cache = len(case.autotuner.cache)

        # calibrate: calls per sample so one sample takes about sample_s
        Autotuner.run = runs["stock"]
        n = 64
        while _timed(case.tuned, n, sync, clock) * n < sample_s / 4 and n < 1 << 22:
            n *= 2
        n = max(64, int(n * (sample_s / max(_timed(case.tuned, n, sync, clock) * n, 1e-9))))
        samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(rounds):
            rot = order[r % 3:] + order[:r % 3]
            for variant in rot:
                Autotuner.run = runs["tunevault" if variant == "tunevault" else "stock"]
                samples[variant].append(_timed(call[variant], n, sync, clock))
        if states and states[0].n_hits - hits_before < rounds * n:
            raise RuntimeError(f"{case.name}: tunevault left its hit path during timing")
        if len(case.autotuner.cache) != stock_cache:
            raise RuntimeError(f"{case.name}: stock re-tuned during timing")
    finally:
        Autotuner.run = runs["tunevault"]
        if stub is not None:
            stub.remove()
    us = {v: statistics.median(s) * 1e6 for v, s in samples.items()}
    over = {v: statistics.median([(x - d) * 1e6 for x, d in zip(samples[v], samples["direct"], strict=True)])
            for v in ("stock", "tunevault")}
    return {"case": case.name, "note": case.note, "config": str(chosen["stock"]), "calls_per_sample": n,
            "rounds": rounds, "us_per_call": us, "overhead_us": over,
            "ratio": over["tunevault"] / over["stock"] if over["stock"] > 0 else None,
            "samples_us": {v: [x * 1e6 for x in s] for v, s in samples.items()}}


def environment(gpu: bool) -> dict[str, Any]:
    import torch
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor(),
           "mode": "gpu (real launches)" if gpu else "cpu (interpreter, launch stubbed)"}
    if gpu:
        env["gpu"] = torch.cuda.get_device_name()
    return env


CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}


def run(rounds: int = 31, sample_ms: float = 20.0, force_cpu: bool = False, clock: str | None = None
        ) -> dict[str, Any]:
    gpu = _want_gpu(force_cpu)
    clock = clock or ("wall" if gpu else "thread")
    if not gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    _setup_paths()
    from triton.runtime.autotuner import Autotuner

    import tunevault
    import tunevault.integration.triton_adapter as adapter

    stock_run = Autotuner.run
    from tunevault.policy.settings import Settings

    extra = {"isolate": False} if "isolate" in getattr(Settings, "__dataclass_fields__", {}) else {}
    tunevault.install(mode="tune", store="memory://", on_miss="tune", **extra)
    try:
        runs = {"stock": adapter._original_run or stock_run, "tunevault": Autotuner.run}
        if runs["tunevault"] is runs["stock"]:
            raise RuntimeError("tunevault.install() did not patch Autotuner.run")
        cases = build_cases("cuda" if gpu else "cpu")
        results = [measure_case(c, runs, rounds, sample_ms / 1e3, gpu, CLOCKS[clock]) for c in cases]
    finally:
        tunevault.uninstall()
    env = {**environment(gpu), "clock": clock}
    return {"benchmark": "dispatch_overhead", "env": env, "command": " ".join(sys.argv),
            "target_ratio": 0.3, "results": results}


def table(report: dict[str, Any]) -> str:
    head = (f"{'case':<12} {'direct':>8} {'stock':>8} {'tunevault':>10} {'stock +':>8} {'tunevault +':>12} "
            f"{'ratio':>6}")
    env = report["env"]
    rounds = report["results"][0]["rounds"] if report["results"] else 0
    lines = [f"dispatch overhead per call, us ({env['mode']}; {env['clock']} clock; median of {rounds} "
             "interleaved rounds)", head, "-" * len(head)]
    for r in report["results"]:
        us, ov = r["us_per_call"], r["overhead_us"]
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "n/a"
        lines.append(f"{r['case']:<12} {us['direct']:8.2f} {us['stock']:8.2f} {us['tunevault']:10.2f} "
                     f"{ov['stock']:8.2f} {ov['tunevault']:12.2f} {ratio:>6}")
    lines.append("ratio = tunevault's added overhead / stock's added overhead (target <= 0.25x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=31, help="interleaved rounds (median is reported)")
    p.add_argument("--sample-ms", type=float, default=20.0, help="wall time of one timed sample")
    p.add_argument("--cpu", action="store_true",
                   help="stubbed launches under the interpreter even with a GPU")
    p.add_argument("--clock", choices=sorted(CLOCKS),
                   help="thread: this thread's CPU time (default without a GPU: immune to other processes "
                   "on a shared machine); wall: perf_counter (default on a GPU)")
    p.add_argument("--json", help="write the full report (with every sample) to this file ('-' for stdout)")
    a = p.parse_args(argv)
    report = run(a.rounds, a.sample_ms, a.cpu, a.clock)
    if a.json == "-":
        print(json.dumps(report, indent=1))
    elif a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
