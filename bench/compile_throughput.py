"""How fast can a host compile a manifest's configs: threads of one process against several processes.

    PYTHONPATH=src:bench python bench/compile_throughput.py --out OUT_DIR [--suite-keys 12]

Every config of every key of the manifest that ``bench/warmup_ahead.py`` builds (the GPU suite's
kernels and flash-linear-attention's autotuned kernels) is compiled with ``run(warmup=True)``,
never launched, into a fresh Triton cache, by P processes of T threads each (the configs dealt
round-robin). Reports the wall time from the first process's start to the last one's end, the
compile phase alone (imports excluded) and the CPU seconds spent (the processes and their ptxas
children), so the effective parallelism of each layout can be read off. A compile-ahead helper
is one process with a thread pool; this says whether more processes would compile faster.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sharded_warmup as sw
import warmup_ahead as wa

HERE = Path(__file__).resolve().parent
LAYOUTS = [(1, 15), (4, 4), (8, 2), (15, 1)]  # (processes, threads each)


def task_part(manifest: Path, part: int, of: int, threads: int) -> int:
    started = time.time()
    from tunevault.capture import manifest as mf
    from tunevault.capture.replay import rebuild
    from tunevault.engine.inprocess import device_caches_ready

    work = []
    for entry in mf.read(manifest):
        autotuner, args, kwargs = rebuild(entry, "cuda")
        base = {k: v for k, v in kwargs.items() if k != "warmup"}
        device_caches_ready(autotuner.fn)
        for config in autotuner.configs:
            work.append((autotuner, args, base, config))
    mine = work[part::of]
    imported = time.time()

    def one(item: tuple[Any, tuple, dict[str, Any], Any]) -> float:
        autotuner, args, base, config = item
        t = time.time()
        try:
            autotuner.fn.run(*args, warmup=True, **base, **config.all_kwargs())
        except Exception:
            return -1.0
        return time.time() - t

    with ThreadPoolExecutor(max_workers=threads) as pool:
        took = list(pool.map(one, mine))
    ended = time.time()
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"part": part, "configs": len(mine), "started": started, "imported": imported,
                      "ended": ended, "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
                      "failed": sum(1 for t in took if t < 0),
                      "slowest_s": max(took, default=0.0), "sum_s": sum(t for t in took if t > 0)}))
    return 0


def layout(out: Path, manifest: Path, procs: int, threads: int) -> dict[str, Any]:
    env = sw.child_env(False, out / "triton-cache" / f"p{procs}t{threads}")
    t0 = time.time()
    children = [subprocess.Popen([sys.executable, __file__, "--task", "part", "--out", str(out), "--part", str(i),
                                  "--of", str(procs), "--threads", str(threads)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                for i in range(procs)]
    parts = []
    for c in children:
        text, _ = c.communicate()
        parts.append(json.loads(text.strip().splitlines()[-1]))
    wall = time.time() - t0
    compile_start = max(p["imported"] for p in parts)  # every part has its work from here on
    row = {"processes": procs, "threads": threads, "wall_s": round(wall, 2),
           "compile_s": round(max(p["ended"] for p in parts) - min(p["imported"] for p in parts), 2),
           "compile_after_last_import_s": round(max(p["ended"] for p in parts) - compile_start, 2),
           "imports_s": round(max(p["imported"] - p["started"] for p in parts), 2),
           "cpu_s": round(sum(p["cpu_s"] for p in parts), 1),
           "configs": sum(p["configs"] for p in parts), "failed": sum(p["failed"] for p in parts),
           "slowest_config_s": round(max(p["slowest_s"] for p in parts), 2)}
    print(f"[compile_throughput] {row}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="compile-throughput-results")
    p.add_argument("--suite-keys", type=int, default=12)
    p.add_argument("--layouts", default=",".join(f"{a}x{b}" for a, b in LAYOUTS), help="PxT,...")
    p.add_argument("--task", choices=["part"], help=argparse.SUPPRESS)
    p.add_argument("--part", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--of", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.jsonl"
    if args.task == "part":
        return task_part(manifest, args.part, args.of, args.threads)
    made = subprocess.run([sys.executable, str(HERE / "sharded_warmup.py"), "--task", "manifest", "--out", str(out),
                           "--keys", "40"], capture_output=True, text=True,
                          env=sw.child_env(False, out / "triton-cache" / "manifest"), timeout=300)
    if made.returncode != 0:
        print(made.stdout, made.stderr, file=sys.stderr)
        return 1
    results: dict[str, Any] = {"keys": wa.keep(manifest, args.suite_keys), "cpus": os.cpu_count(), "layouts": []}
    for spec in args.layouts.split(","):
        procs, threads = (int(x) for x in spec.split("x"))
        results["layouts"].append(layout(out, manifest, procs, threads))
        (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
