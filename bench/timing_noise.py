"""Where timing noise comes from on a GPU: within one timing, between rounds, between processes.

    PYTHONPATH=src:bench python3 bench/timing_noise.py --out OUT_DIR [--procs 3] [--rounds 6]

Each of ``--procs`` fresh processes times every config of the determinism keys with tunevault's
own GPU timer (engine/gpu_timing.gpu_bench, ``full`` effort: graph replay below 0.1 ms) in
``--rounds`` rounds, configs in a new random order each round. Half the rounds reuse the
inputs; the other half allocate them anew after a pad of random size, so they sit at other
addresses. Writes every round's median and within-timing spread per config into noise.json;
the analysis (variance components, which rule picks one winner) is done from that file.

``--placements N`` asks whether a process's own offset comes from where its kernel code was
loaded: only the ``--top`` fastest configs of each key are timed, each from N separately loaded
copies of its compiled module (``placement`` in each row), all in one interleaved order per
round. If the copies of one config differ by as much as processes do, the offset is the load,
and timing several loads averages it out; if not, it lives in the process (its context) itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def kernel_caches(jit: Any) -> list[dict[Any, Any]]:
    """A JITFunction's in-memory caches of compiled kernels, one per device."""
    while not hasattr(jit, "device_caches") and hasattr(jit, "fn"):  # under @heuristics
        jit = jit.fn
    return [entry[0] if isinstance(entry, tuple) else entry for entry in jit.device_caches.values()]


def load_copies(kernel: Any, n: int) -> list[tuple[Any, Any]]:
    """``n`` (module, function) handles of ``kernel``'s binary, each from its own module load."""
    import torch
    from triton.runtime.driver import driver

    kernel._init_handles()
    copies = [(kernel.module, kernel.function)]
    for _ in range(n - 1):
        loaded = driver.active.utils.load_binary(kernel.name, kernel.kernel, kernel.metadata.shared,
                                                 torch.cuda.current_device())
        copies.append((loaded[0], loaded[1]))
    return copies


def task_placements(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import gpu_kernels as gk
    from config_timer import record_calls
    from determinism_gpu import keys
    from tunevault.engine.gpu_timing import gpu_bench, graph_safe
    from tunevault.engine.inprocess import make_kernel_call

    rng = random.Random(os.getpid())
    out: dict[str, Any] = {}
    screens: dict[str, dict[str, Any]] = {}
    for kernel, shape in keys():
        name = gk.label(kernel, shape)
        call = record_calls(gk.make_launch(kernel, shape, "cuda"))[0]
        at = call.autotuner
        nargs = dict(zip(at.arg_names, call.args, strict=False))
        first: dict[int, float] = {}
        fns, loads, entries = {}, {}, []
        for i, cfg in enumerate(at.configs):  # alone in the caches, so the kernel it leaves is its own
            for cache in kernel_caches(at.fn):
                cache.clear()
            fn = make_kernel_call(at, call.args, call.kwargs, nargs, cfg)
            try:
                first[i] = gpu_bench(fn, quantiles=(0.5,), effort="full", graph=graph_safe(at, cfg))[0]
            except Exception:
                continue
            found = [(cache, k, v) for cache in kernel_caches(at.fn) for k, v in cache.items()]
            entries += found
            if len(found) == 1:
                fns[i], loads[i] = fn, found[0][2]
        for cache, k, v in entries:  # every config's kernel back in place, as one process holds them
            cache[k] = v
        top = [i for i in sorted(first, key=first.get) if i in loads][:spec["top"]]
        copies = {i: load_copies(loads[i], spec["placements"]) for i in top}
        rows: dict[str, list[dict[str, Any]]] = {}
        for r in range(spec["rounds"]):
            order = [(i, j) for i in top for j in range(spec["placements"])]
            rng.shuffle(order)
            for i, j in order:
                loads[i].module, loads[i].function = copies[i][j]
                samples: list[float] = []
                median = gpu_bench(fns[i], quantiles=(0.5,), effort="full", graph=graph_safe(at, at.configs[i]),
                                   samples=samples)[0]
                rows.setdefault(str(i), []).append({"round": r, "placement": j, "median": median,
                                                    "min": min(samples)})
            torch.cuda.synchronize()
        for i in top:
            loads[i].module, loads[i].function = copies[i][0]
        out[name] = rows
        # why a config is not among the timed: its screen time, or a compile that left != 1 cache entry
        screens[name] = {"screen_ms": {str(i): t for i, t in sorted(first.items())},
                         "not_loadable": sorted(i for i in first if i not in loads)}
    return {"pid": os.getpid(), "keys": out, "screens": screens}


def task(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("placements", 1) > 1:
        return task_placements(spec)
    import torch

    import gpu_kernels as gk
    from config_timer import record_calls
    from determinism_gpu import keys
    from tunevault.engine.gpu_timing import gpu_bench, graph_safe
    from tunevault.engine.inprocess import make_kernel_call
    from tunevault.engine.timing import spread

    rng = random.Random(os.getpid())
    out: dict[str, Any] = {}
    for kernel, shape in keys():
        name = gk.label(kernel, shape)
        rows: dict[str, list[dict[str, Any]]] = {}
        for r in range(spec["rounds"]):
            moved = r % 2 == 1
            pad = torch.empty(rng.randrange(1, 64) << 20, dtype=torch.uint8, device="cuda") if moved else None
            if moved or r == 0:
                call = record_calls(gk.make_launch(kernel, shape, "cuda"))[0]
            at = call.autotuner
            nargs = dict(zip(at.arg_names, call.args, strict=False))
            order = list(range(len(at.configs)))
            rng.shuffle(order)
            for i in order:
                fn = make_kernel_call(at, call.args, call.kwargs, nargs, at.configs[i])
                samples: list[float] = []
                try:
                    median = gpu_bench(fn, quantiles=(0.5,), effort="full", graph=graph_safe(at, at.configs[i]),
                                       samples=samples)[0]
                except Exception as exc:
                    rows.setdefault(str(i), []).append({"error": type(exc).__name__})
                    continue
                n, iqr = spread(samples)
                rows.setdefault(str(i), []).append({"round": r, "moved": moved, "median": median, "n": n,
                                                    "iqr": iqr, "min": min(samples)})
            del pad
            torch.cuda.synchronize()
        out[name] = rows
    return {"pid": os.getpid(), "keys": out}


def placement_summary(doc: dict[str, Any]) -> list[str]:
    """Per process and key: each config's fastest replay per loaded copy, over the process's fastest."""
    lines = []
    for proc in doc["procs"]:
        for key, rows in proc.get("keys", {}).items():
            if not rows:
                continue
            best = min(r["min"] for rs in rows.values() for r in rs)
            parts = []
            for config, rs in sorted(rows.items(), key=lambda kv: min(r["min"] for r in kv[1])):
                per: dict[int, float] = {}
                for r in rs:
                    per[r["placement"]] = min(per.get(r["placement"], math.inf), r["min"])
                parts.append(f"#{config} " + " ".join(f"{per[j] / best:.4f}" for j in sorted(per)))
            lines.append(f"{proc['pid']} {key}: " + " | ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out")
    p.add_argument("--procs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--placements", type=int, default=1, help="separately loaded copies of each config's module")
    p.add_argument("--top", type=int, default=3, help="with --placements: the fastest configs of each key timed")
    p.add_argument("--task", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for path in (str(HERE), str(ROOT / "src")):
        if path not in sys.path:
            sys.path.insert(0, path)
    if a.task:
        print("\n" + json.dumps(task(json.loads(a.spec))))
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]),
               TRITON_CACHE_DIR=tempfile.mkdtemp(prefix="tv-noise-cache-"))
    started, procs = time.monotonic(), []
    spec = json.dumps({"rounds": a.rounds, "placements": a.placements, "top": a.top})
    for n in range(a.procs):
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, __file__, "--task", "--spec", spec],
                             capture_output=True, text=True, env=env, cwd=str(ROOT))
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            procs.append({"error": res.stderr[-1500:]})
            continue
        procs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"[timing_noise] process {n + 1}/{a.procs}: {time.monotonic() - t0:.1f} s", flush=True)
    doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "rounds": a.rounds,
           "placements": a.placements, "procs": procs,
           "elapsed_s": round(time.monotonic() - started, 1)}
    (out / "noise.json").write_text(json.dumps(doc) + "\n")
    if a.placements > 1:
        print("\n".join(placement_summary(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
