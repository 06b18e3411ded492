"""Real ``@triton.autotune`` kernels for the core acceptance tests, one per Triton feature we mirror.

Tiny on purpose: the interpreter runs each launch in milliseconds. Importing this module does not
import tunevault (the activation tests run it as an unmodified "server"). Hooks record what they saw in
module-level lists so tests can assert Triton's hook semantics; ``clear()`` resets them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

SEEN: dict[str, list[Any]] = {"pre": [], "post": [], "cfg_pre": [], "prune": [], "perf": [], "bench": []}


def clear() -> None:
    for v in SEEN.values():
        v.clear()


def _three(*blocks: int) -> list[triton.Config]:
    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in zip(blocks, (1, 2, 4, 8), strict=False)]


@triton.autotune(configs=_three(16, 32, 64), key=["n"])
@triton.jit
def add_one(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = x + 1: the plain multi-config kernel."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


@triton.autotune(configs=_three(16, 32), key=["n", "scale", "flag", "DT", "opt"])
@triton.jit
def keyed(x_ptr, out_ptr, n, scale, flag, opt, DT: tl.constexpr, BLOCK: tl.constexpr):
    """Key elements of every kind: int, float, bool, None and a tl.dtype constexpr."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = x.to(DT).to(tl.float32) * scale
    if flag:
        y = y + 1
    tl.store(out_ptr + offs, y, mask=mask)


@triton.autotune(configs=_three(32, 16, 64), key=["n"])
@triton.jit
def picky(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Config #0 (BLOCK=32) does not compile: a static assertion fails, as OutOfResources would."""
    tl.static_assert(BLOCK != 32, "BLOCK=32 is not supported")
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


@triton.autotune(configs=_three(16, 32), key=["n"])
@triton.jit
def hopeless(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """No config compiles."""
    tl.static_assert(BLOCK > 1024, "nothing fits")
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs))


def out_of_resources(nargs: dict[str, Any]) -> None:
    """What launching a config too large for the device raises; stock's benchmark lets that config
    lose (a static_assert cannot stand in for it here: the interpreter raises InterpreterError,
    which stock lets reach the caller)."""
    from triton.runtime.errors import OutOfResources

    raise OutOfResources(262144, 232448, "shared memory")


def _oversized(*blocks: int, too_large: tuple[int, ...]) -> list[triton.Config]:
    return [triton.Config({"BLOCK": b}, num_warps=w, pre_hook=out_of_resources if i in too_large else None)
            for i, (b, w) in enumerate(zip(blocks, (1, 2, 4), strict=False))]


@triton.autotune(configs=_oversized(32, 16, 64, too_large=(0,)), key=["n"])
@triton.jit
def oversized(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Config #0 (BLOCK=32) runs out of resources: it loses, as in stock Triton."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


@triton.autotune(configs=_oversized(16, 32, too_large=(0, 1)), key=["n"])
@triton.jit
def too_large(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Every config runs out of resources."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


@triton.autotune(configs=_three(16, 32, 64), key=["n"], reset_to_zero=["acc_ptr"])
@triton.jit
def accumulate(x_ptr, acc_ptr, n, BLOCK: tl.constexpr):
    """acc += x: wrong after benchmarking unless ``acc`` is reset to zero before each run."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.load(acc_ptr + offs, mask=mask)
    tl.store(acc_ptr + offs, acc + tl.load(x_ptr + offs, mask=mask), mask=mask)


@triton.autotune(configs=_three(16, 32, 64), key=["n"], restore_value=["x_ptr"])
@triton.jit
def double_inplace(x_ptr, n, BLOCK: tl.constexpr):
    """x *= 2 in place: wrong after benchmarking unless ``x`` is restored after each run."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2, mask=mask)


def user_pre_hook(nargs: dict[str, Any], reset_only: bool = False) -> None:
    SEEN["pre"].append((nargs["out_ptr"].data_ptr(), nargs["n"], nargs["BLOCK"], reset_only))
    nargs["out_ptr"].zero_()


def user_post_hook(nargs: dict[str, Any], exception: BaseException | None) -> None:
    SEEN["post"].append((nargs["out_ptr"].data_ptr(), nargs["n"], nargs["BLOCK"], exception))


@triton.autotune(configs=_three(16, 32), key=["n"], pre_hook=user_pre_hook, post_hook=user_post_hook)
@triton.jit
def hooked(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out += x with user pre/post hooks (the pre hook zeroes ``out``)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(out_ptr + offs, mask=mask) + tl.load(x_ptr + offs, mask=mask), mask=mask)


def zero_out(nargs: dict[str, Any]) -> None:
    SEEN["cfg_pre"].append((nargs["out_ptr"].data_ptr(), nargs["BLOCK"]))
    nargs["out_ptr"].zero_()


@triton.autotune(configs=[triton.Config({"BLOCK": b}, num_warps=1, pre_hook=zero_out) for b in (16, 32)],
                 key=["n"])
@triton.jit
def cfg_hooked(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out += x, with a config pre_hook that zeroes ``out`` before every launch."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(out_ptr + offs, mask=mask) + tl.load(x_ptr + offs, mask=mask), mask=mask)


def early_prune(configs: list[triton.Config], nargs: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """Drop blocks larger than the problem (keeps the declared objects, as prunes usually do)."""
    SEEN["prune"].append((nargs["n"], nargs["x_ptr"].data_ptr(), sorted(kwargs)))
    return [c for c in configs if c.kwargs["BLOCK"] <= max(16, nargs["n"])]


def perf_model(**kw: Any) -> float:
    """Pretend bigger blocks are faster, so top_k keeps the biggest ones."""
    SEEN["perf"].append((kw["n"], kw["BLOCK"]))
    return 1.0 / kw["BLOCK"]


@triton.autotune(configs=_three(16, 32, 64, 128), key=["n"],
                 prune_configs_by={"early_config_prune": early_prune, "perf_model": perf_model, "top_k": 2})
@triton.jit
def pruned(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


def counting_bench(fn: Callable[[], Any], quantiles: Any = None, **kw: Any) -> list[float]:
    """A kernel's own ``do_bench``: a CPU timer that records that it was used."""
    from tunevault.engine.timing import cpu_bench  # lazily: importing this module must not load tunevault

    SEEN["bench"].append(1)
    return cpu_bench(fn, quantiles or (0.5, 0.2, 0.8), reps=2)


@triton.autotune(configs=_three(16, 32, 64), key=["n"], do_bench=counting_bench)
@triton.jit
def own_bench(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


@triton.autotune(configs=_three(16, 32), key=["n"])
@triton.heuristics({"EVEN": lambda a: a["n"] % a["BLOCK"] == 0})
@triton.jit
def heuristic(x_ptr, out_ptr, n, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if EVEN:
        tl.store(out_ptr + offs, tl.load(x_ptr + offs) + 1)
    else:
        mask = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


@triton.autotune(configs=[], key=["n"])
@triton.jit
def no_configs(x_ptr, out_ptr, n):
    """Triton substitutes one default config for an empty list."""
    offs = tl.arange(0, 64)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


@triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=1)], key=["n"])
@triton.jit
def one_config(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


# -- launch helpers: each returns the output so tests can check it is right ----------------------

def grid(n: int) -> Callable[[dict[str, Any]], tuple[int]]:
    return lambda meta: (triton.cdiv(n, meta.get("BLOCK", 64)),)


def vec(n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float32) + seed).to(dtype)


def run_unary(kernel: Any, n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """out = kernel(x) for the ``(x_ptr, out_ptr, n)`` kernels; checks nothing itself."""
    x = vec(n, dtype, seed)
    out = torch.full_like(x, -7)
    kernel[grid(n)](x, out, n)
    return out


def expected_unary(n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return vec(n, dtype, seed) + 1


def run_keyed(n: int, scale: float, flag: bool, dt: Any = tl.float16, opt: Any = None) -> torch.Tensor:
    x = vec(n)
    out = torch.empty_like(x)
    keyed[grid(n)](x, out, n, scale, flag, opt, DT=dt)
    return out


def decided(kernel: Any) -> dict[str, Any]:
    """The config each kernel launched last, as plain values (for cross-process comparison)."""
    return dict(kernel.best_config.all_kwargs())
