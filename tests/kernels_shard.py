"""A cheap kernel for sharded-warmup tests, importable as ``kernels_shard:shard_scale``.

Every benchmark launch of it is counted below the autotuner: the configs' ``pre_hook`` appends
``pid n`` to the file named by ``$TV_LAUNCH_LOG`` (one O_APPEND write per line), so a test can
tell which processes benchmarked which key; with ``$TV_HANG_N`` set, a launch for that size
touches ``$TV_HANG_FILE`` and hangs (a process to kill mid-key). ``no_config_works`` fails with
every config. ``slow_compile`` takes a second per config to compile. ``pruned_to_one`` keeps one config for
large ``n``. ``write_manifest`` builds a
key manifest from sizes without running anything.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

from tunevault.capture import manifest as mf
from tunevault.capture.argspec import CallSpec
from tunevault.core.identity import kernel_id
from tunevault.core.kernel_state import KernelState


def _count(nargs: dict[str, Any]) -> None:
    path, n = os.environ.get("TV_LAUNCH_LOG"), int(nargs["n"])
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{os.getpid()} {n}\n".encode())
        finally:
            os.close(fd)
    if os.environ.get("TV_HANG_N") == str(n):
        Path(os.environ["TV_HANG_FILE"]).touch()
        time.sleep(3600)


@triton.autotune(configs=[triton.Config({"BLOCK": b}, pre_hook=_count) for b in (32, 64)], key=["n"])
@triton.jit
def shard_scale(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2.0, mask=mask)


def _out_of_resources(nargs: dict[str, Any]) -> None:
    """What launching a config too large for the device raises: stock's benchmark lets it lose."""
    from triton.runtime.errors import OutOfResources

    raise OutOfResources(262144, 232448, "shared memory")


@triton.autotune(configs=[triton.Config({"BLOCK": b}, pre_hook=_out_of_resources) for b in (16, 32)], key=["n"])
@triton.jit
def no_config_works(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)  # every config runs out of resources: each loses, none is left
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _copy_block(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


# The same failing configs over a jit function of another name: an alias (captured as
# ``kernels_shard:aliased_no_config_works``; its decisions would be named ``kernels_shard:_copy_block``).
aliased_no_config_works = triton.autotune(
    configs=[triton.Config({"BLOCK": b}, pre_hook=_out_of_resources) for b in (16, 32)], key=["n"])(_copy_block)


def _compile_time(nargs: dict[str, Any]) -> int:
    time.sleep(1.0)  # evaluated on every compile: a config whose compile takes a second
    return 1


@triton.autotune(configs=[triton.Config({"BLOCK": 16 * (i + 1)}) for i in range(8)], key=["n"])
@triton.heuristics({"SLOW": _compile_time})
@triton.jit
def slow_compile(x_ptr, out_ptr, n, BLOCK: tl.constexpr, SLOW: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def _one_for_large_n(configs: list[triton.Config], nargs: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """Leaves one config for n >= 100: stock launches it untimed, and so does tunevault."""
    return configs[-1:] if nargs["n"] >= 100 else configs


@triton.autotune(configs=[triton.Config({"BLOCK": b}) for b in (32, 64)], key=["n"],
                 prune_configs_by={"early_config_prune": _one_for_large_n})
@triton.jit
def pruned_to_one(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2.0, mask=mask)


def write_manifest(path: Path, sizes: list[int], kernel: Any = shard_scale, name: str | None = None,
                   first_seen: int = 0) -> list[int]:
    """One manifest line per size, as capture would write it (``name`` renames the kernel; keys are
    read back in the order they were first seen, from ``first_seen`` on)."""
    state, lines = KernelState(kernel), []
    for i, n in enumerate(sizes, start=first_seen):
        x = torch.rand(n)
        args = (x, torch.empty_like(x), n)
        kwargs = {"grid": lambda meta, n=n: (triton.cdiv(n, meta["BLOCK"]),)}
        key = state.labelled_key(state.named_args(args, kwargs))
        spec = CallSpec.of(kernel, args, kwargs).to_json()
        lines.append(mf.line(name or kernel_id(kernel).name, key, {"hit": 1}, i, i, os.getpid(), "test", spec))
    mf.append(path, lines)
    return sizes


def launches(path: Path) -> dict[int, set[int]]:
    """Size -> the pids that benchmarked it, from ``$TV_LAUNCH_LOG``."""
    out: dict[int, set[int]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            pid, n = line.split()
            out.setdefault(int(n), set()).add(int(pid))
    return out
