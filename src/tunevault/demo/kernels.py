"""Small real ``@triton.autotune`` kernels: a vector op, a row reduction and a matmul.

Importable by ``module:qualname`` so warmup replay and isolated workers can find them;
sized so Triton's interpreter runs them in well under a second on a CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.autotune(
    configs=[triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((64, 1), (128, 2), (256, 4))],
    key=["n"],
)
@triton.jit
def scaled_add(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x * alpha + y, mask=mask)


@triton.autotune(
    configs=[triton.Config({"ROWS": r}, num_warps=w) for r, w in ((1, 1), (2, 2), (4, 4))],
    key=["n_rows", "n_cols"],
)
@triton.jit
def row_sum(x_ptr, out_ptr, n_rows, n_cols, stride, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    for r in tl.static_range(ROWS):
        row = pid * ROWS + r
        if row < n_rows:
            cols = tl.arange(0, BLOCK_N)
            x = tl.load(x_ptr + row * stride + cols, mask=cols < n_cols, other=0.0)
            tl.store(out_ptr + row, tl.sum(x, axis=0))


@triton.autotune(
    configs=[triton.Config({"BM": m, "BN": n, "BK": k}, num_warps=4, num_stages=s)
             for m, n, k, s in ((16, 16, 16, 2), (32, 32, 16, 3), (16, 32, 32, 3), (32, 16, 32, 4))],
    key=["M", "N", "K"],
)
@triton.jit
def matmul(a_ptr, b_ptr, c_ptr, M, N, K, sam, sak, sbk, sbn, scm, scn,
           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
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


def run_scaled_add(x, y, alpha: float = 2.0):
    import torch

    out = torch.empty_like(x)
    n = x.numel()
    scaled_add[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, out, n, alpha)
    return out


def run_row_sum(x):
    import torch

    n_rows, n_cols = x.shape
    out = torch.empty(n_rows, dtype=x.dtype, device=x.device)
    row_sum[lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),)](
        x, out, n_rows, n_cols, x.stride(0), BLOCK_N=triton.next_power_of_2(n_cols))
    return out


def run_matmul(a, b):
    import torch

    M, K = a.shape
    _, N = b.shape
    c = torch.empty((M, N), dtype=torch.float32, device=a.device)
    matmul[lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))](
        a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    return c
