"""Cold tuning wall time and the chosen config's runtime: tunevault vs stock ``triton.autotune``.

    PYTHONPATH=src python bench/tuning_time.py [--out results.json] [--isolate] [--kernels a,b]
    TRITON_INTERPRET=1 PYTHONPATH=src python bench/tuning_time.py ...   # on a CPU

Kernels: the demo kernels (``tunevault.demo.kernels``: scaled_add, row_sum, matmul) and
``matmul_wide``, the demo matmul's body (copied) with 16 configs (real serving kernels declare tens).
Each (kernel, side) runs once in a fresh process with an empty Triton cache, so compile time
counts as it does on a cold server: the first call's wall time (tuning + compiles + launch) is
the tuning time. Then the chosen config's runtime is timed on the hit path with one timer for
both sides: on a GPU tunevault's ``gpu_bench``, which keeps the GPU busy while the host issues
the launch (``triton.testing.do_bench`` would also count the host's dispatch time of a short
kernel, which differs between the two sides' hit paths); on a CPU ``cpu_bench``.

Sides: ``stock`` is Triton's Autotuner with its default benchmarker; ``tunevault`` installs
tunevault (parallel precompile, successive halving, CUDA-event timer with an L2-sized flush
buffer); ``tunevault-isolated`` (``--isolate``) also benchmarks in a worker process, so its time
includes starting the worker. Under ``TRITON_INTERPRET=1`` stock Triton cannot benchmark at all
("0 active drivers"): there, stock gets tunevault's CPU timer through its ``do_bench=``
parameter, while tunevault uses that same timer through its own search (screen + careful).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
KERNELS = ("scaled_add", "row_sum", "matmul", "matmul_wide")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from tunevault.demo import kernels as demo  # noqa: E402

SHAPES = ((16, 16, 16, 2, 2), (16, 32, 16, 2, 2), (32, 16, 16, 2, 2), (32, 32, 16, 4, 2), (32, 32, 32, 4, 3),
          (64, 32, 32, 4, 3), (32, 64, 32, 4, 3), (64, 64, 32, 4, 3), (64, 64, 64, 8, 3), (128, 64, 32, 4, 4),
          (64, 128, 32, 4, 4), (128, 128, 32, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3),
          (128, 128, 64, 8, 4), (16, 64, 64, 4, 3))
WIDE = [triton.Config({"BM": m, "BN": n, "BK": k}, num_warps=w, num_stages=s) for m, n, k, w, s in SHAPES]


@triton.autotune(configs=WIDE, key=["M", "N", "K"])
@triton.jit
def matmul_wide(a_ptr, b_ptr, c_ptr, M, N, K, sam, sak, sbk, sbn, scm, scn,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """``tunevault.demo.kernels.matmul``'s body, verbatim (a copy, so a worker can import it by name)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * sam + (k0 + rk)[None, :] * sak,
                    mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0.0)
        b = tl.load(b_ptr + (k0 + rk)[:, None] * sbk + rn[None, :] * sbn,
                    mask=((k0 + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * scm + rn[None, :] * scn, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _inputs(name: str, device: str) -> tuple[Any, ...]:
    import torch

    torch.manual_seed(0)
    if name == "scaled_add":
        n = 4096 if INTERPRET else 1 << 24
        return torch.randn(n, device=device), torch.randn(n, device=device)
    if name == "row_sum":
        shape = (16, 128) if INTERPRET else (8192, 1024)
        return (torch.randn(*shape, device=device),)
    size, dtype = (48, torch.float32) if INTERPRET else (2048, torch.float16)
    return tuple(torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))


def _call(name: str) -> Any:
    return {"scaled_add": demo.run_scaled_add, "row_sum": demo.run_row_sum}.get(name, demo.run_matmul)


def _autotuner(name: str) -> Any:
    return matmul_wide if name == "matmul_wide" else getattr(demo, name)


def child(side: str, name: str) -> dict[str, Any]:
    """One cold tuning in this (fresh) process; returns the measurements as a dict."""
    import torch

    from tunevault.engine.timing import cpu_bench

    device = "cpu" if INTERPRET else "cuda"
    at = _autotuner(name)
    if side == "stock" and INTERPRET:  # stock needs a timer it can run under the interpreter
        at = triton.autotune(configs=at.configs, key=at.keys, do_bench=cpu_bench)(at.fn)
    if side.startswith("tunevault"):
        import tunevault

        tunevault.install(mode="tune", store="memory://", isolate=side.endswith("isolated"))
    target = "matmul" if name.startswith("matmul") else name
    setattr(demo, target, at)  # the demo's run_* helpers launch through this module attribute
    args, call = _inputs(name, device), _call(name)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    started = time.perf_counter()
    call(*args)
    sync()
    tuning_s = time.perf_counter() - started
    if INTERPRET:
        runtime_ms = cpu_bench(lambda: call(*args), reps=10)[0]
    else:  # the GPU timer that hides host dispatch time, so both sides' dispatch paths cost the same
        from tunevault.engine.gpu_timing import gpu_bench

        runtime_ms = gpu_bench(lambda: call(*args))[0]
    out: dict[str, Any] = {"kernel": name, "side": side, "configs": len(at.configs), "tuning_s": tuning_s,
                           "runtime_ms": runtime_ms, "chosen": str(at.best_config)}
    if side.startswith("tunevault"):
        import tunevault

        counts = tunevault.stats()["kernels"].get("total", {}).get("warmup", {})
        out["benchmark_runs"] = int(counts.get("benchmark_runs", 0))
    return out


def run_child(side: str, name: str) -> dict[str, Any]:
    env = dict(os.environ)
    cache = tempfile.mkdtemp(prefix="tv-bench-cache-")
    env["TRITON_CACHE_DIR"] = cache  # cold: compile time counts
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent / "src"), env.get("PYTHONPATH", "")])
    code = f"import json, tuning_time; print(json.dumps(tuning_time.child({side!r}, {name!r})))"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        return {"kernel": name, "side": side, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]], sides: list[str]) -> str:
    head = ["kernel", "configs"] + [f"{s} tune s" for s in sides] + [f"{s} run ms" for s in sides]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in dict.fromkeys(r["kernel"] for r in rows):
        got = {r["side"]: r for r in rows if r["kernel"] == name}
        cells = [name, str(next((r.get("configs") for r in got.values() if "configs" in r), "?"))]
        for key, fmt in (("tuning_s", "{:.2f}"), ("runtime_ms", "{:.4g}")):
            for s in sides:
                r = got.get(s, {})
                cells.append(fmt.format(r[key]) if key in r else "error")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the measurements as JSON here")
    parser.add_argument("--isolate", action="store_true", help="also run tunevault with an isolated worker")
    parser.add_argument("--kernels", default=",".join(KERNELS))
    opts = parser.parse_args()
    sides = ["stock", "tunevault"] + (["tunevault-isolated"] if opts.isolate else [])
    rows = []
    for name in opts.kernels.split(","):
        for side in sides:
            rows.append(run_child(side, name))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(table(rows, sides))
    for name in dict.fromkeys(r["kernel"] for r in rows):
        got = {r["side"]: r for r in rows if r["kernel"] == name}
        if "tuning_s" in got.get("stock", {}) and "tuning_s" in got.get("tunevault", {}):
            stock, tv = got["stock"], got["tunevault"]
            print(f"{name}: tunevault tunes {stock['tuning_s'] / tv['tuning_s']:.2f}x faster; chosen config "
                  f"runtime tunevault/stock = {tv['runtime_ms'] / stock['runtime_ms']:.2f}")
    if opts.out:
        meta = {"interpret": INTERPRET, "python": sys.version.split()[0], "triton": triton.__version__,
                "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
        Path(opts.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
