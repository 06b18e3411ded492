"""Kernels for GPU-only tests, importable by the isolated tuning worker as ``kernels_gpu``.

``oob_copy``'s config #2 stores far out of bounds: an illegal memory access, which leaves the
CUDA context of the process that runs it unusable (a sticky error).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.autotune(configs=[triton.Config({"BLOCK": b, "OOB": oob}, num_warps=4)
                          for b, oob in ((256, 0), (512, 0), (1024, 1), (2048, 0), (4096, 0))], key=["n"])
@triton.jit
def oob_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr, OOB: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    if OOB:
        tl.store(y_ptr + offs.to(tl.int64) + (1 << 40), x, mask=mask)
    else:
        tl.store(y_ptr + offs, x * 2.0, mask=mask)


def run_oob_copy(x: torch.Tensor) -> torch.Tensor:
    y = torch.zeros_like(x)
    n = x.numel()
    oob_copy[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, n)
    return y
