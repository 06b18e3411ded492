"""The hot path's raw key is Triton's own key recipe, for every way a kernel can be called.

A raw key that merged two of Triton's keys would launch one key's config for the other; one
that split a key would only cost an extra lookup, but we keep it exact. Kernels are real
``@triton.autotune`` kernels (interpreter); calls cover positional and keyword tensors, key
args by keyword, omitted defaulted key args, ``None``, tensor subclasses, numpy arrays and
objects that carry a ``dtype`` of their own.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this module

from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from conftest import count_launches  # noqa: E402
from tunevault.core.kernel_state import KernelState  # noqa: E402


@triton.heuristics({"USE_G": lambda args: args["g"] is not None})
@triton.autotune(configs=[triton.Config({"BV": b}, num_warps=1) for b in (16, 32)], key=["H", "K", "BT"])
@triton.jit
def chunked(q, g, o, scale, T, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
            USE_G: tl.constexpr, EXTRA: tl.constexpr = 0):
    offs = tl.program_id(0) * BV + tl.arange(0, BV)
    x = tl.load(q + offs, mask=offs < T, other=0.0)
    if USE_G:
        x = x * tl.load(g + offs, mask=offs < T, other=1.0)
    tl.store(o + offs, x * scale, mask=offs < T)


@triton.autotune(configs=[triton.Config({"BLOCK": b}, num_warps=1) for b in (16, 32)], key=["n", "m"])
@triton.jit
def plain(x_ptr, y_ptr, out_ptr, n, m, alpha, BLOCK: tl.constexpr, m_default: tl.constexpr = 3):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * alpha, mask=offs < n)


class WithDtype:
    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype


def triton_key(autotuner: Any, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """``Autotuner.run``'s recipe, dtype objects kept (stock keeps ``str(dtype)``)."""
    nargs = dict(zip(autotuner.arg_names, args, strict=False))
    named = {k: v for k, v in {**nargs, **kwargs}.items() if k in autotuner.arg_names}
    return tuple([named[k] for k in autotuner.keys if k in named]
                 + [v.dtype for v in named.values() if hasattr(v, "dtype")])


def test_raw_key_matches_triton_for_every_call_shape() -> None:
    f16, f32 = torch.empty(4, dtype=torch.float16), torch.empty(4, dtype=torch.float32)
    param = torch.nn.Parameter(torch.empty(4, dtype=torch.bfloat16))
    arr = np.zeros(4, dtype=np.int64)
    launch = {"grid": (1,), "warmup": False}
    at_plain, at_chunk = plain, chunked.fn
    calls = [
        (at_plain, (f16, f32, f32, 8, 4, 2.0), launch),
        (at_plain, (f16, f32, f32, 8, 4, 2.0), {**launch, "BLOCK_HINT": 1}),
        (at_plain, (f16, f32, f32, 8), {**launch, "m": 4, "alpha": 2.0}),
        (at_plain, (f16, f32), {**launch, "out_ptr": f16, "n": 8, "m": 4, "alpha": 2.0}),
        (at_plain, (f16,), {"y_ptr": f32, "out_ptr": f16, "n": 8, "m": 4, "alpha": 2.0}),
        (at_plain, (f16, f32), {"n": 8, "out_ptr": param, "alpha": 1, "m": 5, **launch}),
        (at_plain, (f16, None, param, 8, 4, 2.0), launch),
        (at_plain, (arr, f32, f32, 8, 4, 2.0), launch),
        (at_plain, (WithDtype("custom"), f32, f32, 8, 4, 2.0), launch),
        (at_plain, (f16, f32, f32, 8, 4, WithDtype(torch.int8)), launch),
        (at_plain, (f16, f32, f32, 8, 4, 2.0), {**launch, "m_default": arr}),
        (at_plain, (f16, f32, f32, 8, 4, 2.0), {"grid": WithDtype("not an arg"), "warmup": False}),
        (at_plain, (f16, f32, f32, 8), launch),  # key arg m omitted: left out of the key
        (at_chunk, (f16, None, f32, 0.5, 64), {"H": 4, "K": 16, "BT": 64, "USE_G": False, **launch}),
        (at_chunk, (f16, f32, f32, 0.5, 64), {"H": 4, "K": 16, "BT": 64, "USE_G": True, **launch}),
        (at_chunk, (f16, None, f32, 0.5, 64, 4), {"K": 16, "BT": 32, "USE_G": False, **launch}),
        (at_chunk, (f16, None, f32, 0.5, 64), {"H": 4, "BT": 32, "USE_G": False, **launch}),
        (at_chunk, (f16, None, f32, 0.5, 64), {"H": 4, "K": 16, "BT": 64, "EXTRA": f16, "USE_G": 0,
                                               **launch}),
    ]
    states = {id(at): KernelState(at) for at in (at_plain, at_chunk)}
    for _round in range(2):  # the second round runs on the plans the first one cached
        for at, args, kwargs in calls:
            assert states[id(at)].raw_key(args, kwargs) == triton_key(at, args, kwargs), (args, kwargs)
    # Code specialised on each call shape (as a miss does) stays exact for every other shape.
    for example_at, example_args, example_kwargs in calls:
        state = KernelState(example_at)
        state.key_fns.specialise(example_args, example_kwargs)
        for at, args, kwargs in calls:
            if at is example_at:
                assert state.raw_key(args, kwargs) == triton_key(at, args, kwargs), (example_args, args, kwargs)


def test_keyword_key_args_hit_without_launching_more_and_retune_on_a_new_dtype(tv: Any) -> None:
    def run(q: torch.Tensor, H: int) -> torch.Tensor:
        o = torch.empty(32, dtype=torch.float32)
        chunked[(2,)](q, None, o, 0.5, 32, H=H, K=16, BT=32)
        return o

    q = torch.arange(32, dtype=torch.float32)
    assert torch.equal(run(q, 2), q * 0.5)  # tunes
    with count_launches(chunked) as launches:
        assert torch.equal(run(q, 2), q * 0.5)
    assert launches.count == 1  # a hit: exactly the one real launch
    with count_launches(chunked) as launches:
        run(q.to(torch.float16), 2)  # dtype of a tensor arg is part of the key: tunes again
    assert launches.count > 1
