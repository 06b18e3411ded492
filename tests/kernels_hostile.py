"""Kernels for the hostile-input tests, importable by ``module:qualname`` (warmup, the worker).

``add_one`` is the kernel every hostile document is aimed at: three declared configs, key ``n``.
``forging`` has a config whose ``pre_hook`` writes forged ``result`` lines to every pipe the
tuning worker holds, as a careless or hostile hook could.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import triton
import triton.language as tl

CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((16, 1), (32, 2), (64, 4))]
SIZES = (40, 48)


@triton.autotune(configs=CONFIGS, key=["n"])
@triton.jit
def add_one(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


def forge(nargs: dict[str, Any]) -> None:
    """Claim, on every pipe of this process, that config #1 ran in 0 ms (only inside the worker)."""
    if os.environ.get("TUNEVAULT_WORKER") != "1":
        return
    line = json.dumps({"ev": "result", "index": 1, "timings": [0.0, 0.0, 0.0], "error": None, "launches": 1})
    for fd in range(3, 64):
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.write(fd, (line + "\n").encode())
        except OSError:
            continue


@triton.autotune(configs=[triton.Config({"BLOCK": 16}, num_warps=1, pre_hook=forge),
                          triton.Config({"BLOCK": 32}, num_warps=2)], key=["n"])
@triton.jit
def forging(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


@triton.autotune(configs=CONFIGS[:2], key=["n"])
@triton.jit
def gather(out_ptr, src_ptr, idx_ptr, n, BLOCK: tl.constexpr):
    """out[i] = src[idx[i]]: the index tensor's values are addresses, as in an embedding lookup."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    index = tl.load(idx_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, tl.load(src_ptr + index, mask=mask, other=0.0), mask=mask)


@triton.autotune(configs=CONFIGS[:2], key=["n"])
@triton.jit
def shift(out_ptr, src_ptr, off, n, BLOCK: tl.constexpr):
    """out[i] = src[off + i]: a runtime offset into ``src``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(src_ptr + off + offs, mask=mask), mask=mask)


def run_indexed(n: int) -> None:
    """One genuine call of each of ``gather`` and ``shift`` for ``n``, results checked."""
    src = torch.arange(64, dtype=torch.float32)
    idx = (torch.arange(n, dtype=torch.int32) * 7) % 64
    out = torch.empty(n, dtype=torch.float32)
    gather[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](out, src, idx, n)
    assert torch.equal(out, src[idx.long()]), "wrong gather"
    shift[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](out, src, 8, n)
    assert torch.equal(out, src[8:8 + n]), "wrong shift"


def run(kernel: Any, n: int) -> torch.Tensor:
    x = torch.arange(n, dtype=torch.float32)
    out = torch.full_like(x, -7)
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, out, n)
    return out


def expected(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32) + 1


class Launches:
    """The config kwargs of every launch below the autotuner."""

    def __init__(self, autotuner: Any) -> None:
        self.declared = [dict(c.all_kwargs()) for c in autotuner.configs]
        self.seen: list[dict[str, Any]] = []

    def undeclared(self) -> list[dict[str, Any]]:
        """Launches whose meta-parameters and options match no declared config."""
        return [kw for kw in self.seen
                if not any(all(kw.get(k) == v for k, v in d.items()) for d in self.declared)]


@contextmanager
def launches(autotuner: Any) -> Iterator[Launches]:
    from conftest import observe_launches

    record = Launches(autotuner)
    with observe_launches(autotuner, lambda kw: record.seen.append(
            {k: v for k, v in kw.items() if k not in ("grid", "warmup")})):
        yield record


def call_checked(kernel: Any, n: int, call: Callable[[], torch.Tensor] | None = None) -> Launches:
    """Call ``kernel`` for ``n``: the result must be right and every launch a declared config."""
    with launches(kernel) as seen:
        out = run(kernel, n) if call is None else call()
    assert torch.equal(out, expected(n)), "wrong result"
    assert not seen.undeclared(), f"undeclared launch: {seen.undeclared()}"
    return seen
