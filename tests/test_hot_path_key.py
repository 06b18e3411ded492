"""The hot path's raw key tells calls apart exactly as Triton's key and tunevault's labelled key do,
for every way a kernel can be called.

A raw key that merged two keys would launch one key's config for the other; one that split a key
would only cost an extra lookup, but we keep it exact. Kernels are real
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


@triton.autotune(configs=[triton.Config({"BLOCK": b}, num_warps=1) for b in (16, 32)], key=["N", "M", "FLAG"])
@triton.jit
def ordered(x_ptr, M, N, y_ptr, BLOCK: tl.constexpr, FLAG: tl.constexpr = 0):
    """``key=`` in another order than the signature, a defaulted key arg, a tensor that may be None."""
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + M + N + FLAG)


def triton_key(autotuner: Any, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """``Autotuner.run``'s recipe, dtype objects kept (stock keeps ``str(dtype)``)."""
    nargs = dict(zip(autotuner.arg_names, args, strict=False))
    named = {k: v for k, v in {**nargs, **kwargs}.items() if k in autotuner.arg_names}
    return tuple([named[k] for k in autotuner.keys if k in named]
                 + [v.dtype for v in named.values() if hasattr(v, "dtype")])


def full_key(state: KernelState, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """Everything a decision is filed under: Triton's key and tunevault's labelled one."""
    return triton_key(state.autotuner, args, kwargs), state.labelled_key(state.named_args(args, kwargs)).items


Call = tuple[tuple, dict[str, Any]]


def assert_exact(autotuner: Any, calls: list[Call]) -> None:
    """Raw keys equal iff full keys equal, pairwise over ``calls``, with the general code and with
    code specialised on each call shape (as a miss makes it) alike. One exception, the one way
    round: calls passing the same keywords in another order may have two raw keys for one full
    key (the labelled key orders dtypes by the signature; the hot path does not sort keywords),
    which costs a second entry in the in-memory dict, never a wrong launch."""
    general = KernelState(autotuner)
    raws = [general.raw_key(a, k) for a, k in calls]
    fulls = [full_key(general, a, k) for a, k in calls]
    for i in range(len(calls)):
        for j in range(i + 1, len(calls)):
            mine, theirs = ([n for n, v in general.named_args(*calls[c]).items() if hasattr(v, "dtype")]
                            for c in (i, j))  # the tensor args, in the call's order
            reordered = mine != theirs and sorted(mine) == sorted(theirs)
            if raws[i] == raws[j] or not reordered:
                assert (raws[i] == raws[j]) == (fulls[i] == fulls[j]), (calls[i], calls[j], raws[i], raws[j])
    shapes: dict[tuple, Call] = {}
    for a, k in calls:
        shapes.setdefault((len(a), tuple(k), *map(type, a), *map(type, k.values())), (a, k))
    for example_args, example_kwargs in shapes.values():
        state = KernelState(autotuner)
        state.key_fns.specialise(example_args, example_kwargs)
        for (a, k), raw in zip(calls, raws, strict=True):
            assert state.raw_key(a, k) == raw, (example_args, example_kwargs, a, k)


def ways_to_pass(values: dict[str, Any], launcher: dict[str, Any]) -> list[Call]:
    """Every split of ``values`` (signature order) into a positional prefix and keywords, the
    keywords in signature order and reversed, with and without the launcher's own kwargs."""
    names = list(values)
    calls = []
    for p in range(len(names) + 1):
        args = tuple(values[n] for n in names[:p])
        rest = names[p:]
        for kw_names in ([rest, rest[::-1]] if len(rest) > 1 else [rest]):
            for extra in ({}, launcher):
                calls.append((args, {**{n: values[n] for n in kw_names}, **extra}))
    return calls


def test_raw_keys_are_equal_exactly_when_tuning_keys_are_for_every_call_shape() -> None:
    """Key order unlike the signature, key args by keyword or by position, omitted defaults,
    None in place of a tensor, and any number of positional args: no two keys share a raw key."""
    f16, f32 = torch.empty(4, dtype=torch.float16), torch.empty(4, dtype=torch.float32)
    launcher = {"grid": (1,), "warmup": False}
    calls: list[Call] = []
    for m in (1, 2):
        for n in (1, 2):
            for x in (f16, f32):
                for y in (None, f16, f32):
                    for flag in ({}, {"FLAG": 0}, {"FLAG": 1}):  # FLAG omitted (its default), or passed
                        values = {"x_ptr": x, "M": m, "N": n, "y_ptr": y, **flag}
                        calls += ways_to_pass(values, launcher)
    calls += [((f16, 1), {"y_ptr": f32}), ((f16,), {"N": 2, "y_ptr": f32}), ((f16, 2), {}),
              ((f16, 1, 2, f32, 0, 9), {})]  # key args left out; more positional args than the signature
    assert_exact(ordered, calls)


def test_raw_key_is_exact_for_odd_arguments() -> None:
    f16, f32 = torch.empty(4, dtype=torch.float16), torch.empty(4, dtype=torch.float32)
    param = torch.nn.Parameter(torch.empty(4, dtype=torch.bfloat16))
    arr = np.zeros(4, dtype=np.int64)
    launch = {"grid": (1,), "warmup": False}
    at_plain, at_chunk = plain, chunked.fn
    plain_calls = [
        ((f16, f32, f32, 8, 4, 2.0), launch),
        ((f16, f32, f32, 8, 4, 2.0), {**launch, "BLOCK_HINT": 1}),
        ((f16, f32, f32, 8), {**launch, "m": 4, "alpha": 2.0}),
        ((f16, f32), {**launch, "out_ptr": f16, "n": 8, "m": 4, "alpha": 2.0}),
        ((f16,), {"y_ptr": f32, "out_ptr": f16, "n": 8, "m": 4, "alpha": 2.0}),
        ((f16,), {"out_ptr": f16, "y_ptr": f32, "n": 8, "m": 4, "alpha": 2.0}),
        ((f16, f32), {"n": 8, "out_ptr": param, "alpha": 1, "m": 5, **launch}),
        ((f16, None, param, 8, 4, 2.0), launch),
        ((None, f16, param, 8, 4, 2.0), launch),
        ((f16, param, None, 8, 4, 2.0), launch),
        ((arr, f32, f32, 8, 4, 2.0), launch),
        ((WithDtype("custom"), f32, f32, 8, 4, 2.0), launch),
        ((f16, f32, f32, 8, 4, WithDtype(torch.int8)), launch),
        ((f16, f32, f32, 8, 4, 2.0), {**launch, "m_default": arr}),
        ((f16, f32, f32, 8, 4, 2.0), {"grid": WithDtype("not an arg"), "warmup": False}),
        ((f16, f32, f32, 8), launch),  # key arg m omitted: ABSENT, where Triton's key drops it
        ((f16, f32, f32), {"m": 8, **launch}),  # ... which Triton's key cannot tell from this
        ((f16, f32, f32, 4, 8, 2.0), launch),
        ((f16, f32, f32), {"m": 4, "n": 8, **launch}),
    ]
    chunk_calls = [
        ((f16, None, f32, 0.5, 64), {"H": 4, "K": 16, "BT": 64, "USE_G": False, **launch}),
        ((f16, f32, f32, 0.5, 64), {"H": 4, "K": 16, "BT": 64, "USE_G": True, **launch}),
        ((f16, None, f32, 0.5, 64, 4), {"K": 16, "BT": 32, "USE_G": False, **launch}),
        ((f16, None, f32, 0.5, 64), {"H": 4, "BT": 32, "USE_G": False, **launch}),
        ((f16, None, f32, 0.5, 64), {"H": 4, "K": 16, "BT": 64, "EXTRA": f16, "USE_G": 0, **launch}),
        ((f16, None, f32, 0.5, 64), {"H": 4, "K": 16, "BT": 64, "USE_G": 0, "EXTRA": f16, **launch}),
        ((None, f16, f32, 0.5, 64), {"H": 4, "K": 16, "BT": 64, "USE_G": 0, **launch}),
    ]
    assert_exact(at_plain, plain_calls)
    assert_exact(at_chunk, chunk_calls)


def only_block(configs: list[Any], nargs: dict[str, Any], **kwargs: Any) -> list[Any]:
    """M == 1 may only run BLOCK 16, any other M only BLOCK 32: each key has its own config."""
    m = nargs.get("M", kwargs.get("M"))
    return [c for c in configs if c.kwargs["BLOCK"] == (16 if m == 1 else 32)]


@triton.autotune(configs=[triton.Config({"BLOCK": b}, num_warps=1) for b in (16, 32)], key=["N", "M"],
                 prune_configs_by={"early_config_prune": only_block})
@triton.jit
def which_block(out_ptr, M, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, offs * 0 + BLOCK)


def launched_block(args: tuple, kwargs: dict[str, Any]) -> int:
    out = torch.zeros(64, dtype=torch.int32)
    which_block[(1,)](out, *args, **kwargs)
    return int(out.count_nonzero())  # the launched config's BLOCK: how many elements it wrote


def test_each_key_launches_its_own_decided_config_whatever_the_call_shape(tv: Any) -> None:
    """(M=1, N=2) and (M=2, N=1) used to share a raw key when N came by keyword (or when the two
    calls passed different numbers of positional args): the second silently ran the first's config."""
    shapes = [lambda m, n: ((m,), {"N": n}), lambda m, n: ((m, n), {}), lambda m, n: ((), {"N": n, "M": m})]
    for first in shapes:
        for second in shapes:
            which_block.cache.clear()  # forget both keys in memory: each pair starts again from the store
            assert launched_block(*first(1, 2)) == 16
            assert launched_block(*second(2, 1)) == 32
            assert launched_block(*first(2, 1)) == 32
            assert launched_block(*second(1, 2)) == 16


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
