"""One phase of ``tunevault demo``, run in a fresh process: tune (cold) or load (warm) three kernels.

``python -m tunevault.demo.run --phase cold|warm --store URL`` installs tunevault in tune mode
on ``URL``, calls each demo kernel, and prints one JSON line: per kernel the key, the chosen
config, how many kernel executions were benchmarking (counted below the autotuner, on the
JIT/interpreted function's own ``run``), the time to the first result and whether the result
matches torch. The warm phase then seals and serves a key warmup never saw (``serving``).
Nothing here imports triton before the backend is chosen: with no GPU, Triton's
interpreter must be switched on before the first ``@triton.jit`` runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from tunevault.core.machine import use_interpreter_if_no_gpu
from tunevault.integration.logs import show_logs
from tunevault.store.base import redact

if TYPE_CHECKING:
    from types import ModuleType

    import torch
    from triton.runtime.autotuner import Autotuner

    from tunevault.core.model import ConfigSpec
    from tunevault.policy.runtime import Runtime

DEMO_MODULE = "tunevault.demo.kernels"  # the kernels' qualified names start with this
CALLS_PER_KERNEL = 2  # the first call (maybe tuning) and one steady-state call


class _Counter:
    def __init__(self) -> None:
        self.launches = 0


@contextmanager
def count_launches(autotuner: Autotuner) -> Iterator[_Counter]:
    """Count real executions of the kernel below the autotuner (compile-only warmups excluded)."""
    fn = autotuner.fn
    while type(fn).__name__ in ("Heuristics", "Autotuner"):
        fn = fn.fn
    counter = _Counter()
    had_own = "run" in fn.__dict__  # Triton 3.4's InterpretedFunction sets run per instance
    original = fn.run

    def counting_run(*args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("warmup", False):
            counter.launches += 1
        return original(*args, **kwargs)

    fn.run = counting_run
    try:
        yield counter
    finally:
        if had_own:
            fn.run = original
        else:
            del fn.run


def _cases(device: str) -> list[tuple[str, Autotuner, Callable[[], torch.Tensor], Callable[[], torch.Tensor], float]]:
    """(name, autotuner, call, reference, tolerance) for each demo kernel; tiny, seeded inputs."""
    import torch

    from tunevault.demo import kernels as k

    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    x, y = rand(1000), rand(1000)
    m = rand(12, 100)
    a, b = rand(32, 24), rand(24, 40)
    return [
        ("scaled_add", k.scaled_add, lambda: k.run_scaled_add(x, y, 2.0), lambda: 2.0 * x + y, 1e-5),
        ("row_sum", k.row_sum, lambda: k.run_row_sum(m), lambda: m.sum(dim=1), 1e-4),
        ("matmul", k.matmul, lambda: k.run_matmul(a, b), lambda: a @ b, 2e-2),  # tf32 on a GPU
    ]


def _compact(config: ConfigSpec) -> str:
    """Meta-parameters and warps: what tells the demo's configs apart (``tunevault show`` has all)."""
    opts = dict(config.options)
    return " ".join([f"{k}={v}" for k, v in config.kwargs] + [f"num_warps={opts['num_warps']}"] * (
        "num_warps" in opts))


def _run_case(rt: Runtime, name: str, autotuner: Autotuner, call: Callable[[], torch.Tensor],
              ref: Callable[[], torch.Tensor], tol: float) -> dict[str, Any]:
    import torch

    with count_launches(autotuner) as counter:
        t0 = time.perf_counter()
        out = call()
        if out.is_cuda:
            torch.cuda.synchronize()
        first_ms = (time.perf_counter() - t0) * 1e3
        for _ in range(CALLS_PER_KERNEL - 1):
            out = call()
    expected = ref()
    error = float((out.float() - expected.float()).abs().max())
    ok = bool(torch.allclose(out.float(), expected.float(), rtol=tol, atol=tol))
    qualified = f"{DEMO_MODULE}:{name}"
    used = [d for (kname, _), d in rt.used.items() if kname == qualified]
    decision = used[0] if used else None
    return {
        "kernel": name,
        "name": qualified,
        "key": decision.key.describe() if decision else "?",
        "config": _compact(decision.config) if decision else "?",
        "config_index": decision.config_index if decision else None,
        "calls": CALLS_PER_KERNEL,
        "launches": counter.launches,
        "bench_runs": counter.launches - CALLS_PER_KERNEL,
        "first_ms": first_ms,
        "ok": ok,
        "max_error": error,
    }


class _Warnings(logging.Handler):
    """The warnings tunevault logs while serving: the fallback's one-line diagnosis is among them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def serve_unseen_key(tunevault: ModuleType, device: str) -> dict[str, Any]:
    """The serving contract after a warm restart: seal, then serve a key warmup never saw (float16
    inputs; every decision is for float32). It must launch a known config without benchmarking and
    explain the miss in one line."""
    import torch

    from tunevault.core.identity import config_spec
    from tunevault.demo import kernels as k

    tunevault.seal(on_miss="fallback")
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1)).to(device, torch.float16)
    y = torch.ones(1000, device=device, dtype=torch.float16)
    caught = _Warnings()
    log = logging.getLogger("tunevault")
    log.addHandler(caught)
    try:
        with count_launches(k.scaled_add) as counter:
            outs = [k.run_scaled_add(x, y, 2.0) for _ in range(CALLS_PER_KERNEL)]
    finally:
        log.removeHandler(caught)
    serving = tunevault.stats()["kernels"].get(f"{DEMO_MODULE}:scaled_add", {}).get("serving", {})
    warning = next((line for line in caught.lines if "no decision for" in line), "")
    diagnosis, _, using = warning.removeprefix("tunevault: ").partition("; using ")
    how = using.split(" config", 1)[0] or "?"  # "nearest key's", "first compiling", ...
    served_with = f"{how} config {_compact(config_spec(k.scaled_add.best_config))}"
    expected = (2.0 * x.float() + y.float())
    return {
        "kernel": "scaled_add",
        "diagnosis": diagnosis,
        "served_with": served_with,
        "calls": CALLS_PER_KERNEL,
        "bench_runs": counter.launches - CALLS_PER_KERNEL,
        "tunings": int(serving.get("tunings", 0)),
        "fallbacks": int(serving.get("fallbacks", 0)),
        "ok": all(bool(torch.allclose(o.float(), expected, rtol=1e-2, atol=1e-2)) for o in outs),
    }


def run_phase(phase: str, store: str) -> dict[str, Any]:
    interpret = use_interpreter_if_no_gpu()
    import tunevault
    from tunevault.core.identity import current_fingerprint
    from tunevault.integration.triton_adapter import runtime

    # Only what the demo is about is forced; TUNEVAULT_ISOLATE, _TOLERANCE etc. still apply.
    tunevault.install(mode="tune", on_miss="tune", store=store)
    rt = runtime()
    assert rt is not None
    device = "cpu" if interpret else "cuda"
    kernels = [_run_case(rt, *case) for case in _cases(device)]
    stats = tunevault.stats()["kernels"]
    for row in kernels:
        counters = stats.get(row["name"], {}).get("warmup", {})
        row["tunings"] = int(counters.get("tunings", 0))
        row["tuner_benchmark_runs"] = int(counters.get("benchmark_runs", 0))
    serving = serve_unseen_key(tunevault, device) if phase == "warm" else None
    fp = current_fingerprint()
    tunevault.uninstall()
    return {
        "serving": serving,
        "phase": phase,
        "store": redact(store),  # the report is printed: no password
        "interpreter": interpret,
        "fingerprint": {**fp.to_json(), "digest": fp.digest},
        "pid": os.getpid(),
        "kernels": kernels,
        "ok": all(r["ok"] for r in kernels) and (serving is None or serving["ok"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunevault.demo.run", description=__doc__)
    parser.add_argument("--phase", choices=("cold", "warm"), required=True)
    parser.add_argument("--store", required=True, help="store URL the phase reads and writes")
    args = parser.parse_args(argv)
    show_logs(logging.WARNING)  # the parent shows this process's stderr only when it fails
    result = run_phase(args.phase, args.store)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
