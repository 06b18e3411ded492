"""Where timing noise comes from on a GPU: within one timing, between rounds, between processes.

    PYTHONPATH=src:bench python3 bench/timing_noise.py --out OUT_DIR [--procs 3] [--rounds 6]

Each of ``--procs`` fresh processes times every config of the determinism keys with tunevault's
own GPU timer (engine/gpu_timing.gpu_bench, ``full`` effort: graph replay below 0.1 ms) in
``--rounds`` rounds, configs in a new random order each round. Half the rounds reuse the
inputs; the other half allocate them anew after a pad of random size, so they sit at other
addresses. Writes every round's median and within-timing spread per config into noise.json;
the analysis (variance components, which rule picks one winner) is done from that file.
"""

from __future__ import annotations

import argparse
import json
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


def task(spec: dict[str, Any]) -> dict[str, Any]:
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out")
    p.add_argument("--procs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
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
    for n in range(a.procs):
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, __file__, "--task", "--spec", json.dumps({"rounds": a.rounds})],
                             capture_output=True, text=True, env=env, cwd=str(ROOT))
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            procs.append({"error": res.stderr[-1500:]})
            continue
        procs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"[timing_noise] process {n + 1}/{a.procs}: {time.monotonic() - t0:.1f} s", flush=True)
    doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "rounds": a.rounds, "procs": procs,
           "elapsed_s": round(time.monotonic() - started, 1)}
    (out / "noise.json").write_text(json.dumps(doc) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
