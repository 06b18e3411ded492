"""Serving-shaped test kernels, importable as ``kernels_serving:<name>`` by warmup replay.

``chunk_cumsum`` follows FLA's ``chunk_local_cumsum_scalar_kernel``: a heuristic on top of the
autotuner, key ``B H BT REVERSE``, a float gate ``g`` and int32 ``cu_seqlens`` / ``chunk_indices``
that the kernel uses to index memory, and ``BT`` derived from the sequence length by the caller.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.heuristics({"IS_VARLEN": lambda args: args["cu_seqlens"] is not None})
@triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (1, 2, 4)], key=["B", "H", "BT", "REVERSE"])
@triton.jit(do_not_specialize=["T"])
def chunk_cumsum(g, o, cu_seqlens, chunk_indices, T, B: tl.constexpr, H: tl.constexpr, BT: tl.constexpr,
                 REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int32)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
        T = eos - bos
    else:
        bos = i_b * T
    offs = i_t * BT + tl.arange(0, BT)
    mask = offs < T
    ptrs = (bos + offs) * H + i_h  # layout [B, T, H], heads last
    b = tl.load(g + ptrs, mask=mask, other=0).to(tl.float32)
    c = tl.cumsum(b, axis=0)
    if REVERSE:
        c = tl.sum(b, axis=0) - c + b
    tl.store(o + ptrs, c.to(o.dtype.element_ty), mask=mask)


def chunk_size(max_len: int) -> int:
    """BT as FLA's ``chunk_fwd_o`` derives it: 16, 32 or 64 from the sequence length."""
    return min(64, max(16, triton.next_power_of_2(max_len)))


def prepare_chunk_indices(cu_seqlens: torch.Tensor, bt: int) -> torch.Tensor:
    """``[(sequence, chunk)]`` for every chunk of every sequence, int32 like FLA's."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    pairs = [(n, j) for n, length in enumerate(lens) for j in range(triton.cdiv(length, bt))]
    return torch.tensor(pairs, dtype=torch.int32, device=cu_seqlens.device).reshape(-1, 2)


def chunk_local_cumsum(g: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                       reverse: bool = False) -> torch.Tensor:
    """Cumulative sum of ``g`` ([B, T, H]) within chunks of BT tokens, per sequence when varlen."""
    B, T, H = g.shape
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist() if cu_seqlens is not None else [T]
    bt = chunk_size(max(lens))
    chunk_indices = prepare_chunk_indices(cu_seqlens, bt) if cu_seqlens is not None else None
    nt = len(chunk_indices) if chunk_indices is not None else triton.cdiv(T, bt)
    o = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    chunk_cumsum[(nt, B * H)](g, o, cu_seqlens, chunk_indices, T=T, B=B, H=H, BT=bt, REVERSE=reverse)
    return o


def reference_cumsum(g: torch.Tensor, cu_seqlens: torch.Tensor | None, bt: int, reverse: bool = False,
                     ) -> torch.Tensor:
    """The same chunked cumsum in torch: what a correct launch must produce."""
    B, T, H = g.shape
    x = g.float().reshape(B * T, H) if cu_seqlens is not None else g.float()
    out = torch.zeros_like(x)
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else None
    spans = list(zip(bounds[:-1], bounds[1:], strict=True)) if bounds else [(0, T)]
    for b in range(1 if bounds else B):
        for bos, eos in spans:
            for start in range(bos, eos, bt):
                seg = x[start:min(start + bt, eos)] if bounds else x[b, start:min(start + bt, eos)]
                res = seg.flip(0).cumsum(0).flip(0) if reverse else seg.cumsum(0)
                if bounds:
                    out[start:start + len(seg)] = res
                else:
                    out[b, start:start + len(seg)] = res
    return out.reshape(B, T, H)


def serve(lengths: list[int], H: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """One varlen prefill batch of sequences with ``lengths``: (kernel output, torch reference)."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    g = torch.randn(1, total, H, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = chunk_local_cumsum(g, cu)
    return out, reference_cumsum(g, cu, chunk_size(max(lengths)))


def wide_only(configs: list[triton.Config], nargs: dict, **kwargs: object) -> list[triton.Config]:
    """Big blocks only for WIDE calls: pruning reads an argument that is not part of the key."""
    return [c for c in configs if nargs["WIDE"] or c.kwargs["BLOCK"] <= 32]


@triton.autotune(configs=[triton.Config({"BLOCK": b}, num_warps=1) for b in (16, 32, 64)], key=["n"],
                 prune_configs_by={"early_config_prune": wide_only})
@triton.jit
def add_wide(x_ptr, out_ptr, n, WIDE, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


def run_wide(n: int, wide: int) -> torch.Tensor:
    x = torch.arange(n, dtype=torch.float32)
    out = torch.empty_like(x)
    add_wide[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, out, n, wide)
    assert torch.equal(out, x + 1)
    return out


@triton.heuristics({"BLOCK_N": lambda args: triton.next_power_of_2(args["N"])})
@triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (1, 2)], key=["N"])
@triton.jit
def row_scale(x_ptr, out_ptr, N, BLOCK_N: tl.constexpr):
    """One program per row, one block over the whole row: the heuristic's BLOCK_N reaches the
    autotuner as a keyword argument, larger than a single short row."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    tl.store(out_ptr + row * N + offs, tl.load(x_ptr + row * N + offs, mask=mask) * 2.0, mask=mask)


def scale_rows(rows: int, n: int) -> torch.Tensor:
    x = torch.randn(rows, n)
    out = torch.empty_like(x)
    row_scale[(rows,)](x, out, n)
    torch.testing.assert_close(out, 2 * x)
    return out


@triton.jit
def _scale_by_two(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2.0, mask=mask)


@triton.jit
def _shift_by_one(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)


# Autotuned kernels bound to other names than their jit functions (a common pattern), and two
# autotuners over one function: capture must name the attribute that holds each.
scale_tuned = triton.autotune(configs=[triton.Config({"BLOCK": b}) for b in (32, 64)], key=["n"])(_scale_by_two)
shift_small = triton.autotune(configs=[triton.Config({"BLOCK": b}) for b in (16, 32)], key=["n"])(_shift_by_one)
shift_large = triton.autotune(configs=[triton.Config({"BLOCK": b}) for b in (64, 128)], key=["n"])(_shift_by_one)


@triton.jit
def _triple(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 3.0, mask=mask)


triple_default = triton.autotune(configs=[triton.Config({"BLOCK": b}) for b in (16, 32)], key=["n"])(_triple)
_triple_variants: dict[object, object] = {}


def triple_variant(dtype: object) -> object:
    """A per-dtype variant a factory builds at run time and keeps in a dict (SGLang / vLLM): no
    module attribute holds it, only the module-level ``triple_default`` over the same function."""
    if dtype not in _triple_variants:
        _triple_variants[dtype] = triton.autotune(configs=[triton.Config({"BLOCK": b}) for b in (64, 128)],
                                                  key=["n"])(_triple)
    return _triple_variants[dtype]


def run_blocks(kernel: object, n: int) -> torch.Tensor:
    x = torch.randn(n)
    out = torch.empty_like(x)
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, out, n)
    return out


@triton.autotune(configs=[triton.Config({"BLOCK": b}) for b in (32, 64)], key=["n"])
@triton.heuristics({"ROWS": lambda args: 4 if args["n"] > 100 else 2})
@triton.heuristics({"SPAN": lambda args: args["BLOCK"] * args["ROWS"]})  # sees the outer one's value
@triton.jit
def span_scale(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ROWS: tl.constexpr, SPAN: tl.constexpr):
    """Autotune above two heuristics, a grid that reads their values (``meta["SPAN"]``)."""
    for r in tl.static_range(ROWS):
        offs = tl.program_id(0) * SPAN + r * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2.0, mask=mask)


def run_span(n: int) -> torch.Tensor:
    x = torch.randn(n)
    out = torch.empty_like(x)
    span_scale[lambda meta: (triton.cdiv(n, meta["SPAN"]),)](x, out, n)
    torch.testing.assert_close(out, 2 * x)
    return out


@triton.autotune(configs=[triton.Config({"BLOCK": b}) for b in (32, 64)], key=["n"])
@triton.jit
def rep_scale(x_ptr, out_ptr, n, BLOCK: tl.constexpr, REP: tl.constexpr = 2):
    """A grid that reads a parameter the call leaves to its default (``meta["REP"]``)."""
    for r in tl.static_range(REP):
        offs = (tl.program_id(0) * REP + r) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2.0, mask=mask)


def run_rep(n: int) -> torch.Tensor:
    x = torch.randn(n)
    out = torch.empty_like(x)
    rep_scale[lambda meta: (triton.cdiv(n, meta["BLOCK"] * meta["REP"]),)](x, out, n)
    torch.testing.assert_close(out, 2 * x)
    return out


@triton.autotune(configs=[triton.Config({"BLOCK": b}, num_warps=1) for b in (16, 32)], key=["D"])
@triton.jit
def seq_sums(x_ptr, out_ptr, cu_ptr, stride_cu, D, BLOCK: tl.constexpr):
    """Per-sequence sums of a packed ``[T, D]`` batch; ``cu_seqlens`` may be a strided view (a
    column of a packed ``[N + 1, 2]`` metadata tensor), read through its stride."""
    i = tl.program_id(0)
    bos = tl.load(cu_ptr + i * stride_cu)
    eos = tl.load(cu_ptr + (i + 1) * stride_cu)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in range(bos, eos):
        acc += tl.load(x_ptr + r * D + cols, mask=mask, other=0.0)
    tl.store(out_ptr + i * D + cols, acc, mask=mask)


def sum_sequences(x: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    n, d = cu.numel() - 1, x.shape[1]
    out = torch.empty(n, d)
    seq_sums[(n,)](x, out, cu, cu.stride(0), d)
    return out


def reference_sums(x: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    bounds = cu.tolist()
    return torch.stack([x[a:b].sum(0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])


@triton.autotune(configs=[triton.Config({"BLOCK": b}, num_warps=1) for b in (64, 128)], key=["n"])
@triton.jit
def pad_tokens(ids, lens, out, n, T, pad_id, NO_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """A batch collator: positions past each row's length become ``pad_id`` (a token id, larger
    than the batch); a row of length ``NO_ROW`` (a sentinel constexpr, 2**31 - 1) is all padding."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < T
    length = tl.load(lens + row)
    length = tl.where(length == NO_ROW, 0, length)
    x = tl.load(ids + row * T + offs, mask=m, other=0)
    tl.store(out + row * T + offs, tl.where(offs < length, x, pad_id), mask=m)


def pad_batch(rows: int = 4, width: int = 256, pad_id: int = 151643) -> torch.Tensor:
    ids = torch.randint(0, 1000, (rows, width), dtype=torch.int32)
    lens = torch.tensor([10, width, 2**31 - 1, 3][:rows], dtype=torch.int32)
    out = torch.empty_like(ids)
    pad_tokens[lambda m: (rows, triton.cdiv(width, m["BLOCK"]))](ids, lens, out, rows * width, width, pad_id,
                                                                 NO_ROW=2**31 - 1)
    assert (rows < 3 or (out[2] == pad_id).all()) and (out[0, 10:] == pad_id).all() and torch.equal(out[1], ids[1])
    return out
