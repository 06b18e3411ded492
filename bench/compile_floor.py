"""Where cold tuning cannot go below: the slowest config's compile, on a third-party kernel.

    PYTHONPATH=/tmp/site:src python3 bench/compile_floor.py [--widths 128,256,512] [--threads 16] [--json OUT]

flash-linear-attention's ``l2norm_fwd_kernel`` (25 configs, key ``D, NB``) compiled with
``triton.compile`` for this machine's GPU, or for ``cuda:90`` where there is none (ptxas ships
with Triton, so no device is needed). Per width: every config compiled one after another (each
config's seconds; their sum is what stock Triton's autotuner spends compiling, one config at a
time), then all of them again in a pool of ``--threads`` threads on a fresh cache, as tunevault's
precompile does. A parallel precompile cannot end before its slowest config's compile does, so
cold tuning is bounded below by the sum over keys of each key's slowest compile.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def target() -> Any:
    from triton.backends.compiler import GPUTarget

    try:
        import torch

        if torch.cuda.is_available():
            from triton.runtime.driver import driver

            return driver.active.get_current_target()
    except Exception:
        pass
    return GPUTarget("cuda", 90, 32)


def compile_all(kernel: Any, width: int, threads: int) -> tuple[float, list[float]]:
    """Wall seconds of compiling every config with ``threads`` threads, and each config's own seconds."""
    import triton
    from triton.compiler import ASTSource

    fn, where = kernel.fn, target()
    signature = {"x": "*bf16", "y": "*bf16", "rstd": "*fp32", "eps": "fp32", "T": "i32",
                 "D": "constexpr", "BD": "constexpr", "NB": "constexpr", "BT": "constexpr"}

    def one(config: Any) -> float:
        values = {"D": width, "BD": width, "NB": 1, "BT": config.kwargs["BT"]}
        constexprs = {(fn.arg_names.index(name),): v for name, v in values.items()}
        began = time.perf_counter()
        triton.compile(ASTSource(fn, signature, constexprs), target=where,
                       options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        return time.perf_counter() - began

    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # read at each compile: nothing comes from a cache
        began = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            each = list(pool.map(one, kernel.configs))
        return time.perf_counter() - began, each


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="128,256,512")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    from fla.modules.norm.l2norm import l2norm_fwd_kernel as kernel

    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        _, alone = compile_all(kernel, width, 1)
        pooled, _ = compile_all(kernel, width, args.threads)
        slowest = max(alone)
        worst = kernel.configs[alone.index(slowest)]
        rows.append({"D": width, "configs": len(alone), "one_by_one_s": round(sum(alone), 2),
                     "slowest_s": round(slowest, 2), "slowest_config": str(worst),
                     "pool_s": round(pooled, 2), "threads": args.threads})
        print(f"D={width}: one by one {sum(alone):.2f} s; slowest config {slowest:.2f} s ({worst}); "
              f"{args.threads} threads {pooled:.2f} s ({pooled / slowest:.2f}x the slowest)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": str(target()), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
