"""A config's errors on a GPU: which reach the caller and which make the config lose, against stock.

    PYTHONPATH=src:bench python3 bench/config_errors.py --out OUT_DIR
    TRITON_INTERPRET=1 PYTHONPATH=src:bench python3 bench/config_errors.py --out /tmp/ce  # CPU smoke

Stock ``Autotuner._bench`` lets a config lose by ``OutOfResources``, ``CompileTimeAssertionFailure``
and ``PTXASError`` only; any other error of a config's hooks or launch reaches the caller
(docs/conformance.md, "Failing configs"). On a GPU tunevault times candidates in interleaved
rounds with its own timer (flush buffer, CUDA events, graph replay), which the CPU tests cannot
reach. Each kernel below is called on stock Triton, then under tunevault in ``tune`` mode in
process, in ``tune`` mode isolated, and in ``first`` mode; what each call raised (or which config
it launched) is compared with stock:

- ``buggy``: config #0's ``pre_hook`` raises KeyError: every mode raises that KeyError (the same
  object in process), isolated a TuningError naming it;
- ``broken``: config #0 does not compile (``tl.arange`` of 48, a CompilationError): raised as in
  stock; ``first`` mode takes it as "does not build" and launches #1;
- ``too_many_warps``: config #0 asks for 128 warps (OutOfResources: threads): it loses everywhere;
- ``host_read``: a heuristic reads a tensor on the host, which fails under graph capture only: a fault
  of tunevault's graph timing, which falls back to eager timing; the call works and is decided.

Writes ``config_errors.json`` into ``--out``; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

HERE = Path(__file__).resolve().parent
for _p in (str(HERE), str(HERE.parent / "src")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
RAISED: list[Exception] = []


def buggy_hook(nargs: dict[str, Any]) -> None:
    RAISED.append(KeyError("no scale for this BLOCK"))
    raise RAISED[-1]


@triton.jit
def _copy(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


@triton.autotune(configs=[triton.Config({"BLOCK": 256}, pre_hook=buggy_hook), triton.Config({"BLOCK": 128})],
                 key=["n"])
@triton.jit
def buggy(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    _copy(x_ptr, out_ptr, n, BLOCK)


@triton.autotune(configs=[triton.Config({"BLOCK": 48}), triton.Config({"BLOCK": 128})], key=["n"])
@triton.jit
def broken(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    _copy(x_ptr, out_ptr, n, BLOCK)


@triton.autotune(configs=[triton.Config({"BLOCK": 128}, num_warps=128), triton.Config({"BLOCK": 128})],
                 key=["n"])
@triton.jit
def too_many_warps(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    _copy(x_ptr, out_ptr, n, BLOCK)


def _read_x(nargs: dict[str, Any]) -> int:
    return int(nargs["x_ptr"][:1].sum().item() * 0 + 1)  # a device-to-host copy: illegal under capture


@triton.autotune(configs=[triton.Config({"BLOCK": 128}), triton.Config({"BLOCK": 256})], key=["n"])
@triton.heuristics({"ONE": _read_x})
@triton.jit
def host_read(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ONE: tl.constexpr):
    _copy(x_ptr, out_ptr, n, BLOCK)


def _cpu_bench(fn: Callable[[], Any], quantiles: Any = None, **_: Any) -> list[float]:
    fn()
    return [1.0, 1.0, 1.0]


def call(kernel: Any) -> dict[str, Any]:
    """One call: what it raised, or which config it launched and whether the output is right."""
    RAISED.clear()
    n = 1000
    x = torch.arange(n, dtype=torch.float32, device=DEVICE)
    out = torch.zeros_like(x)
    try:
        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, out, n)
    except Exception as exc:
        return {"raised": type(exc).__name__, "message": str(exc)[:300],
                "same_object": bool(RAISED) and exc is RAISED[-1]}
    return {"launched": kernel.best_config.kwargs["BLOCK"], "num_warps": kernel.best_config.num_warps,
            "ok": bool(torch.equal(out, x))}


def expected(name: str, mode: str, stock: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    if name in ("too_many_warps", "host_read"):
        return lambda got: got.get("ok") is True and got.get("num_warps") != 128
    if mode == "isolated":
        return lambda got: got.get("raised") == "TuningError" and stock["raised"] in got.get("message", "")
    if mode == "first" and name == "broken":
        return lambda got: got.get("launched") == 128 and got.get("ok") is True
    return lambda got: (got.get("raised"), got.get("message"), got.get("same_object")) == (
        stock["raised"], stock["message"], stock["same_object"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    out_dir = parser.parse_args().out
    out_dir.mkdir(parents=True, exist_ok=True)
    import config_errors  # by its module name, so the isolated worker imports the very same kernels

    return config_errors.check(out_dir)


def check(out_dir: Path) -> int:
    import tunevault

    kernels = {"buggy": buggy, "broken": broken, "too_many_warps": too_many_warps, "host_read": host_read}
    if DEVICE == "cpu":  # no thread limit and no graph capture under the interpreter, no stock do_bench
        del kernels["too_many_warps"], kernels["host_read"]
        from triton.runtime.autotuner import Autotuner

        Autotuner.do_bench = property(lambda self: self._do_bench or _cpu_bench)  # type: ignore[assignment]
    report: dict[str, dict[str, Any]] = {}
    failures = []
    for name, kernel in kernels.items():
        tunevault.uninstall()
        seen = report[name] = {"stock": call(kernel)}
        for mode, options in (("tune", {}), ("isolated", {"isolate": True}), ("first", {})):
            kernel.cache.clear()
            store = f"sqlite:///{tempfile.mkdtemp(prefix='config_errors')}/tv.db"
            tunevault.install("first" if mode == "first" else "tune", store=store, **options)
            seen[mode] = call(kernel)
            seen[mode]["pass"] = expected(name, mode, seen["stock"])(seen[mode])
            if not seen[mode]["pass"]:
                failures.append(f"{name}/{mode}")
            tunevault.uninstall()
        print(f"{name}: {json.dumps(seen)}", flush=True)
    summary = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter)",
               "triton": triton.__version__, "torch": torch.__version__, "checks": report, "failed": failures}
    (out_dir / "config_errors.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("config_errors:", "all checks pass" if not failures else f"FAILED {failures}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
