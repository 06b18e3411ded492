"""Kernels for the stock-conformance tests: one JIT function under several autotuners.

``copy`` is a plain masked copy whose ``BLOCK`` does not change the result, so any config is a
correct launch and a test can ask only *which* configs were launched (``LAUNCHED``). Importing
this module does not import tunevault. Run as a script it is a tiny "server" for the
two-process tests: ``python kernels_conformance.py WHICH N`` prints the BLOCKs it launched.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import triton
import triton.language as tl

LAUNCHED: list[int] = []  # BLOCK of every execution below the autotuner
PRUNED: list[str] = []  # which prune function ran


def clear() -> None:
    LAUNCHED.clear()
    PRUNED.clear()


def configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK": b}) for b in (16, 32, 64, 128)]


@triton.jit
def copy_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


class _Recording:
    """Stands between the autotuner and the JIT function and records each launch's BLOCK."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.arg_names = fn.arg_names

    def run(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("warmup"):
            LAUNCHED.append(int(kwargs["BLOCK"]))
        return self.fn.run(*args, **kwargs)

    def warmup(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn.warmup(*args, **kwargs)


def _small_blocks(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    PRUNED.append("small")
    return [c for c in configs if c.kwargs["BLOCK"] <= 32]


def _large_blocks(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    PRUNED.append("large")
    return [c for c in configs if c.kwargs["BLOCK"] >= 64]


def _autotuned(**options: Any) -> Any:
    return triton.autotune(configs=configs(), key=["n"], **options)(_Recording(copy_kernel))


small = _autotuned(prune_configs_by={"early_config_prune": _small_blocks})
large = _autotuned(prune_configs_by={"early_config_prune": _large_blocks})
plain = _autotuned()


def run(kernel: Any, n: int) -> torch.Tensor:
    x = torch.arange(n, dtype=torch.float32)
    out = torch.empty_like(x)
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, out, n)
    assert torch.equal(out, x)
    return out


if __name__ == "__main__":
    import tunevault

    tunevault.install(mode="tune", store=sys.argv[3])
    kernel = {"small": small, "large": large, "plain": plain}[sys.argv[1]]
    run(kernel, int(sys.argv[2]))
    print(json.dumps({"launched": sorted(set(LAUNCHED)), "pruned": PRUNED,
                      "tunings": tunevault.stats()["kernels"].get("total", {}).get("warmup", {}).get("tunings", 0)}))
