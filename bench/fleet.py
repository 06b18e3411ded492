"""Cold fleet start: benchmark executions and wall time for N processes tuning the same keys.

N = 1, 2, 4, 8 cold processes start together (file barrier) and run the same workload: the
demo kernels ``scaled_add`` (3 sizes) and ``row_sum`` (2 shapes), each key new to everyone.

- ``stock``            -- Triton's own ``Autotuner``: every process benchmarks every key (N x).
- ``tunevault-sqlite`` -- tunevault, one shared SQLite file (processes on one host).
- ``tunevault-redis``  -- tunevault, a local SQLite file per process plus a shared Redis
                          (processes on many hosts); only when ``redis-server`` is installed.

"Benchmark executions" are launches below the autotuner (the JIT function's ``run``) minus the
workload's own calls, summed over the processes. Wall time runs from the barrier's release to
the last process done (imports excluded). Under ``TRITON_INTERPRET=1`` stock Triton cannot
benchmark (no driver), so every variant's autotuner is given the same CPU timer through
``do_bench=`` (``tunevault.engine.timing.cpu_bench``): the counts are exact, the times are the
interpreter's.

    TRITON_INTERPRET=1 PYTHONPATH=src python bench/fleet.py [--out fleet_results.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
LOAD_AT_START = "?"
WORKLOAD = {"scaled_add": [300, 1100, 2500], "row_sum": [[8, 64], [33, 100]]}

CHILD = r"""
import json, os, sys, time
from pathlib import Path

import torch
from tunevault.demo import kernels
from tunevault.engine.timing import cpu_bench

variant, barrier, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
work = json.loads(sys.argv[4])
tuners = [kernels.scaled_add, kernels.row_sum]
for at in tuners:
    at._do_bench = cpu_bench  # the same CPU timer for every variant, as if passed do_bench=
if variant != "stock":
    import tunevault
    tunevault.install(mode="tune")

counts = {"n": 0}
for at in tuners:
    fn = at.fn
    original = fn.run
    def counting(*args, _original=original, **kwargs):
        counts["n"] += 1
        return _original(*args, **kwargs)
    fn.run = counting

barrier.touch()
while not go.exists():
    time.sleep(0.005)
t0, c0 = time.perf_counter(), time.process_time()
calls = 0
for n in work["scaled_add"]:
    x = torch.rand(n)
    assert torch.allclose(kernels.run_scaled_add(x, x), 3 * x)
    calls += 1
for rows, cols in work["row_sum"]:
    x = torch.rand(rows, cols)
    assert torch.allclose(kernels.run_row_sum(x), x.sum(1), atol=1e-4)
    calls += 1
print(json.dumps({"bench": counts["n"] - calls, "seconds": time.perf_counter() - t0,
                  "cpu_s": time.process_time() - c0,
                  "configs": [kernels.scaled_add.best_config.kwargs, kernels.row_sum.best_config.kwargs]}))
"""


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEVAULT_")}
    env["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "1")
    env["TUNEVAULT_CPU_BENCH_REPS"] = os.environ.get("TUNEVAULT_CPU_BENCH_REPS", "5")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def run_fleet(n: int, variant: str, workdir: Path, env_for: Any) -> dict[str, Any]:
    """Start ``n`` processes, release them together, wait for all; totals across the fleet."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{variant}-{n}-", dir=workdir))
    go = run_dir / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, variant, str(run_dir / f"ready{i}"), str(go),
                               json.dumps(WORKLOAD)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=child_env(**env_for(i, run_dir))) for i in range(n)]
    while not all((run_dir / f"ready{i}").exists() for i in range(n)):
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.01)
    t0 = time.perf_counter()
    go.touch()
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"{variant} process failed:\n{stderr[-3000:]}")
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    wall = time.perf_counter() - t0
    agree = len({json.dumps(o["configs"], sort_keys=True) for o in outs}) == 1
    return {"n": n, "variant": variant, "bench": sum(o["bench"] for o in outs), "wall_s": wall,
            "cpu_s": sum(o["cpu_s"] for o in outs), "agree": agree, "per_process": [o["bench"] for o in outs]}


class Redis:
    def __init__(self, workdir: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        binary = shutil.which("redis-server") or "redis-server"
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # ready when it answers PING
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="1,2,4,8", help="fleet sizes (comma-separated)")
    ap.add_argument("--out", default="fleet_results.md", help="markdown results file")
    ap.add_argument("--no-redis", action="store_true", help="skip the Redis variant")
    args = ap.parse_args()
    global LOAD_AT_START
    LOAD_AT_START = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    sizes = [int(s) for s in args.n.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="tv-fleet-"))
    redis = None if args.no_redis or not shutil.which("redis-server") else Redis(workdir)
    rows = []
    try:
        for i, n in enumerate(sizes):
            rows.append(run_fleet(n, "stock", workdir, lambda k, d: {}))
            rows.append(run_fleet(n, "tunevault-sqlite", workdir,
                                  lambda k, d: {"TUNEVAULT_STORE": f"sqlite:///{d / 'shared.db'}"}))
            if redis is not None:
                rows.append(run_fleet(n, "tunevault-redis", workdir, lambda k, d, db=i: {
                    "TUNEVAULT_STORE": f"sqlite:///{d / f'local{k}.db'}", "TUNEVAULT_REMOTE": redis.url(db)}))
            for r in rows[-(3 if redis else 2):]:
                print(f"N={r['n']} {r['variant']:17s} benchmark executions {r['bench']:4d} "
                      f"(per process {r['per_process']}), wall {r['wall_s']:.2f} s, cpu {r['cpu_s']:.2f} s, "
                      f"same configs: {r['agree']}",
                      flush=True)
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    write_markdown(Path(args.out), rows, " ".join(sys.argv[1:]))


def write_markdown(path: Path, rows: list[dict[str, Any]], argv: str) -> None:
    import torch
    import triton

    stock = {r["n"]: r for r in rows if r["variant"] == "stock"}
    lines = [
        "# Cold fleet start: benchmark executions, CPU and wall time (CPU, Triton interpreter)",
        "",
        "Command (one run, all variants side by side):",
        "",
        "```",
        f"TRITON_INTERPRET=1 PYTHONPATH=src python bench/fleet.py {argv}".rstrip(),
        "```",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, triton {triton.__version__}. Workload per process: scaled_add at "
        f"{len(WORKLOAD['scaled_add'])} sizes + row_sum at {len(WORKLOAD['row_sum'])} shapes, 3 configs each "
        "(5 cold keys). Under the interpreter stock Triton cannot benchmark, so every variant's autotuner "
        "uses the same CPU timer via `do_bench=` (`cpu_bench`, "
        f"{os.environ.get('TUNEVAULT_CPU_BENCH_REPS', '5')} timed reps + 1 warm-up per config).",
        "",
        "| N processes | variant | benchmark executions (total) | vs stock | CPU time (s, all processes) "
        "| vs stock | wall time (s) | vs stock | all launch the same configs |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        s = stock[r["n"]]
        agree = "yes" if r["agree"] else "no"
        lines.append(f"| {r['n']} | {r['variant']} | {r['bench']} | {r['bench'] / s['bench']:.2f}x | "
                     f"{r['cpu_s']:.2f} | {r['cpu_s'] / s['cpu_s']:.2f}x | "
                     f"{r['wall_s']:.2f} | {r['wall_s'] / s['wall_s']:.2f}x | {agree} |")
    lines += [
        "",
        "Benchmark executions: launches below the autotuner minus the workload's own calls, summed over "
        "the fleet. Stock grows N x (each process tunes every key; processes may also pick different "
        "configs, shown in the last column); tunevault stays at one process's count for every N: each key "
        "is benchmarked once under a lease, the others wait for the published decision and adopt it.",
        "",
        "CPU time: the workload's process CPU seconds summed over the fleet (waiting costs none; what "
        "remains for a waiter is kernel identity, store reads and its own launches). Wall time: from the "
        "barrier's release to the last process done (imports excluded); it depends on what else shares "
        f"the machine's {os.cpu_count()} cores (load average {LOAD_AT_START} when the run started), so "
        "compare the ratios within one run only.",
        "",
    ]
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
