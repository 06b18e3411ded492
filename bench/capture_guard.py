"""A CUDA graph captured over kernels whose keys are undecided: tune mode, not sealed.

    PYTHONPATH=src:bench python3 bench/capture_guard.py --out OUT_DIR [--budget 180]
    TRITON_INTERPRET=1 PYTHONPATH=src:bench python3 bench/capture_guard.py --out /tmp/cg  # CPU smoke

What it checks (issue 11, part 3), in one fresh process:

1. one RMSNorm key is decided before the capture (an eager call tunes it);
2. ``torch.cuda.graph`` captures three launches: that decided key (a hit), a second RMSNorm
   key (undecided: its nearest decided key's config) and a matmul key (undecided, no key of that
   kernel decided: the first config that compiles);
3. the capture succeeds; during it no benchmark ran (tunevault's ``benchmark_runs`` unchanged,
   and the JIT functions executed exactly the three captured launches), two
   ``capture_fallbacks`` were counted;
4. replaying the graph gives bit for bit what the same calls give eagerly right after (they
   launch the same fallback configs), and matches torch's reference;
5. both undecided keys are decided by background tuning once the capture is over.

Writes ``capture_guard.json`` and ``capture_guard.md`` into ``--out``; exits 1 if a check
fails. Without CUDA (``TRITON_INTERPRET=1``) the capture is simulated through the engine's
capture probe seam (engine.graphs.use_probe) and the "graph" is the same calls made again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for _p in (str(HERE), str(HERE.parent / "src")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def log(msg: str) -> None:
    print(f"[capture_guard] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def count_executions(kernels: list[Any]) -> Iterator[list[int]]:
    """Launches below the autotuners that execute (``warmup=True`` only compiles)."""
    import gpu_kernels as gk

    seen, patched = [0], []
    for kernel in kernels:
        fn = gk.autotuner_of(kernel).fn
        original, had_own = fn.run, "run" in fn.__dict__

        def run(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            seen[0] += 0 if kwargs.get("warmup") else 1
            return _original(*args, **kwargs)

        fn.run = run
        patched.append((fn, original, had_own))
    try:
        yield seen
    finally:
        for fn, original, had_own in patched:
            if had_own:
                fn.run = original
            else:
                del fn.run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=180.0, help="seconds for the whole run")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    smoke = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if smoke:
        os.environ["TUNEVAULT_BENCH_SMOKE"] = "1"  # gpu_kernels: tiny config lists
    report: dict[str, Any] = {"script": "capture_guard", "command": " ".join([sys.executable, *sys.argv]),
                              "smoke": smoke, "checks": {}, "notes": []}
    try:
        run(report, smoke, a.budget, started)
    except Exception as exc:
        import traceback

        report["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
    report["elapsed_s"] = round(time.monotonic() - started, 2)
    ok = not report.get("error") and bool(report["checks"]) and all(report["checks"].values())
    report["ok"] = ok
    (out / "capture_guard.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "capture_guard.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if ok else 1


def run(report: dict[str, Any], smoke: bool, budget: float, started: float) -> None:
    tmp = tempfile.mkdtemp(prefix="tunevault-capture-guard-")
    os.environ.setdefault("TUNEVAULT_WORKER_IDLE", "5")
    import tunevault  # before Triton kernels are defined, as TUNEVAULT_MODE would

    tunevault.install(mode="tune", store=f"sqlite:///{tmp}/decisions.db")  # unsealed, on_miss=tune
    import torch

    import gpu_kernels as gk
    from tunevault.engine import graphs
    from tunevault.integration.triton_adapter import runtime
    from tunevault.policy import background

    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.float16
    report["device"] = "cpu (interpreter)" if smoke else torch.cuda.get_device_name()
    rows, cols, cols2 = (8, 64, 32) if smoke else (4096, 4096, 2048)
    size = 32 if smoke else 1024
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    x, w, x2, w2 = rand(rows, cols), rand(cols), rand(rows, cols2), rand(cols2)
    a, b = rand(size, size), rand(size, size)
    y, y2, c = torch.empty_like(x), torch.empty_like(x2), torch.empty(size, size, device=device, dtype=dtype)

    def calls() -> None:  # what the graph captures
        gk.run_rmsnorm(x, w, y)  # decided before the capture: a hit
        gk.run_rmsnorm(x2, w2, y2)  # undecided: the nearest decided key's config
        gk.run_matmul(a, b, c)  # undecided, nothing of this kernel decided: the first that compiles

    log(f"deciding one rmsnorm key before the capture on {report['device']}")
    gk.run_rmsnorm(x, w, y)
    if not smoke:
        torch.cuda.synchronize()

    def counter(name: str) -> float:
        total = tunevault.stats()["kernels"].get("total", {})
        return sum(p.get(name, 0) for p in total.values())

    before = {k: counter(k) for k in ("benchmark_runs", "tunings", "capture_fallbacks")}
    log("capturing")
    graph, captured, error = None, False, None
    with count_executions([gk.rmsnorm, gk.matmul]) as launched:
        if smoke:
            probe = graphs.FlagProbe()
            previous = graphs.use_probe(probe)
            probe.capturing.set()
            try:
                calls()
                captured = True
            finally:
                probe.capturing.clear()
                graphs.use_probe(previous)
        else:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    calls()
                captured = True
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
    during = {k: counter(k) - before[k] for k in before}
    report["during_capture"] = {**during, "launches_executed_or_captured": launched[0], "capture_error": error}
    checks = report["checks"]
    checks["capture succeeded"] = captured
    checks["no benchmark run during the capture"] = during["benchmark_runs"] == 0 and launched[0] == 3
    checks["two capture fallbacks counted"] = during["capture_fallbacks"] == 2
    if not captured:
        return

    log("replaying, then the same calls eagerly")
    for t in (y, y2, c):
        t.zero_()
    if graph is not None:
        graph.replay()
        torch.cuda.synchronize()
    else:
        calls()
    replayed = [t.clone() for t in (y, y2, c)]
    for t in (y, y2, c):
        t.zero_()
    calls()
    eager = [t.clone() for t in (y, y2, c)]
    checks["replay equals eager, bit for bit"] = all(torch.equal(r, e) for r, e in zip(replayed, eager, strict=True))

    def rms_ref(xx: Any, ww: Any) -> Any:
        xf = xx.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * ww.float()).to(dtype)

    refs = [rms_ref(x, w), rms_ref(x2, w2), (a.float() @ b.float()).to(dtype)]
    tol = {"atol": 2e-2, "rtol": 2e-2} if not smoke else {"atol": 1e-3, "rtol": 1e-3}
    checks["replay matches torch's reference"] = all(
        torch.allclose(r.float(), ref.float(), **tol) for r, ref in zip(replayed, refs, strict=True))

    left = max(5.0, budget - (time.monotonic() - started) - 5)
    log(f"waiting up to {left:.0f}s for background tuning of the two keys")
    drained = background.drain(timeout=left)
    rt = runtime()
    from tunevault.store.base import Query

    def n_decided(kernel: Any) -> int:
        state = gk.autotuner_of(kernel)._tunevault_state
        return len(list(rt.store.decisions(Query(kernel_digest=state.kernel_id.digest))))

    decided = {"rmsnorm": n_decided(gk.rmsnorm), "matmul": n_decided(gk.matmul)}  # keys with a decision
    report["after_capture"] = {"drained": drained, "tunings": counter("tunings") - before["tunings"],
                               "keys_decided": decided,
                               "events": [e["event"] for e in rt.events.recent
                                          if e["event"] in ("capture_fallback", "background_queued",
                                                            "background_tuned", "background_failed")]}
    checks["undecided keys decided after the capture"] = drained and decided == {"rmsnorm": 2, "matmul": 1}
    calls()  # eager calls now launch the tuned configs
    after = [t.clone() for t in (y, y2, c)]
    checks["tuned configs match torch's reference"] = all(
        torch.allclose(r.float(), ref.float(), **tol) for r, ref in zip(after, refs, strict=True))
    report["configs"] = {"rmsnorm": str(gk.autotuner_of(gk.rmsnorm).best_config),
                         "matmul": str(gk.autotuner_of(gk.matmul).best_config)}
    tunevault.uninstall()


SMOKE_NOTE = " (CPU smoke: the capture is simulated through the probe seam)"


def markdown(report: dict[str, Any]) -> str:
    lines = ["# CUDA graph capture over undecided keys (tune mode, unsealed)", "",
             f"Device: {report.get('device', '?')}{SMOKE_NOTE if report['smoke'] else ''}; "
             f"{report.get('elapsed_s', 0)} s. Command: `{report['command']}`", "",
             "| check | result |", "|---|---|"]
    lines += [f"| {name} | {'PASS' if ok else 'FAIL'} |" for name, ok in report["checks"].items()]
    if "during_capture" in report:
        lines += ["", f"During the capture: {json.dumps(report['during_capture'])}"]
    if "after_capture" in report:
        lines += [f"After it: {json.dumps(report['after_capture'])}"]
    if report.get("error"):
        lines += ["", "ERROR: " + report["error"].splitlines()[0]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
