"""A four-config kernel for the prediction tests, importable as ``kernels_predict:scale2``.

Its key is ``n`` plus the tensors' dtypes: ``n`` is the numeric element a prediction
interpolates over, the dtypes are categorical and must match.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((16, 1), (32, 1), (64, 2), (128, 4))]


@triton.autotune(configs=CONFIGS, key=["n"])
@triton.jit
def scale2(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = 2 x."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2, mask=mask)


def run(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = torch.arange(n, dtype=dtype)
    out = torch.empty_like(x)
    scale2[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, out, n)
    torch.testing.assert_close(out, x * 2)
    return out
