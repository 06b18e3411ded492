"""Kernels for the engine tests, importable by ``module:qualname`` from the isolated worker.

Misbehaving configs misbehave only while tuning (inside the worker, or on the background
thread), so a test process that launches them by accident survives.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import triton
import triton.language as tl

GATE_DIR_VAR = "TV_TEST_GATE_DIR"


def in_worker() -> bool:
    return os.environ.get("TUNEVAULT_WORKER") == "1"


def tuning() -> bool:
    """True inside the isolated worker or on tunevault's background thread."""
    return in_worker() or threading.current_thread().name == "tunevault-background"


def kill_in_worker(nargs: dict) -> None:
    if in_worker():
        os.kill(os.getpid(), signal.SIGKILL)


_runs_seen = [0]


def kill_in_worker_on_third_run(nargs: dict) -> None:
    """Past the warm-up, in a timed round (a CPU batch times every config once per round)."""
    if in_worker():
        _runs_seen[0] += 1
        if _runs_seen[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)


def hang_in_worker(nargs: dict) -> None:
    if in_worker():
        if GATE_DIR_VAR in os.environ:  # tell the test the worker hangs now
            open(os.path.join(os.environ[GATE_DIR_VAR], "hanging"), "w").close()
        time.sleep(600)


def slow_in_worker(nargs: dict) -> None:
    if in_worker():
        time.sleep(0.4)


def jitter(nargs: dict) -> None:
    """Perturb the input differently on every run: a stand-in for a racy config."""
    import torch

    nargs["x_ptr"].add_(torch.rand(1).item() * 1e-2)


def fail_while_tuning(nargs: dict) -> None:
    if tuning():
        raise RuntimeError("this config only works outside tuning")


def gate_path() -> str:
    return os.path.join(os.environ.get(GATE_DIR_VAR, "/nonexistent"), "open")


def slow_gated(nargs: dict) -> None:
    """While tuning: wait for the test to open the gate, then be clearly the slowest config."""
    if tuning():
        end = time.monotonic() + 60
        while not os.path.exists(gate_path()) and time.monotonic() < end:
            time.sleep(0.01)
        time.sleep(0.05)


def _configs(*blocks: int, **hooks: object) -> list[triton.Config]:
    return [triton.Config({"BLOCK": b}, num_warps=1, pre_hook=hooks.get(str(i)))  # type: ignore[arg-type]
            for i, b in enumerate(blocks)]


@triton.jit
def _add_body(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


@triton.autotune(configs=_configs(32, 64, 128, **{"1": kill_in_worker}), key=["n"])
@triton.jit
def add_kill(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    _add_body(x_ptr, y_ptr, out_ptr, n, BLOCK)


@triton.autotune(configs=_configs(32, 64, 128, **{"1": kill_in_worker_on_third_run}), key=["n"])
@triton.jit
def add_kill_later(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    _add_body(x_ptr, y_ptr, out_ptr, n, BLOCK)


@triton.autotune(configs=_configs(32, 64, 128, **{"1": slow_in_worker}), key=["n"])
@triton.jit
def add_slow(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    _add_body(x_ptr, y_ptr, out_ptr, n, BLOCK)


@triton.autotune(configs=_configs(32, 64, 128, **{"1": hang_in_worker}), key=["n"])
@triton.jit
def add_hang(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    _add_body(x_ptr, y_ptr, out_ptr, n, BLOCK)


@triton.autotune(configs=_configs(32, 64, 128, **{"0": slow_gated}), key=["n"])
@triton.jit
def add_gated(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    _add_body(x_ptr, y_ptr, out_ptr, n, BLOCK)


@triton.autotune(configs=_configs(32, 64, **{"0": fail_while_tuning, "1": fail_while_tuning}), key=["n"])
@triton.jit
def add_fails(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    _add_body(x_ptr, y_ptr, out_ptr, n, BLOCK)


def out_of_resources_in_worker(nargs: dict) -> None:
    """What a config too large for the device raises: it loses, in stock Triton as here."""
    if in_worker():
        from triton.runtime.errors import OutOfResources

        raise OutOfResources(262144, 232448, "shared memory")


def out_of_memory_in_worker(nargs: dict) -> None:
    """The worker shares the server's device: running out of memory there is the worker's lot."""
    if in_worker():
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def key_error_in_worker(nargs: dict) -> None:
    """A bug in a hook: stock Triton lets it reach the caller."""
    if in_worker():
        raise KeyError("no scale for this BLOCK")


@triton.autotune(configs=_configs(32, 64, 128, 16, **{"0": out_of_resources_in_worker, "1": out_of_memory_in_worker,
                                                      "2": key_error_in_worker}), key=["n"])
@triton.jit
def add_buggy_hook(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    _add_body(x_ptr, y_ptr, out_ptr, n, BLOCK)


HICCUPS = {"calls": 0}


def hiccup_once(nargs: dict) -> None:
    """The first timed run (the second call: the first is the warm-up) is preempted for 50 ms."""
    HICCUPS["calls"] += 1
    if HICCUPS["calls"] == 2:
        time.sleep(0.05)


@triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=w, num_stages=s,
                                        pre_hook=hiccup_once if (s, w) == (2, 1) else None)
                          for s in (2, 3) for w in (1, 2, 4, 8)], key=["n"])
@triton.jit
def add_equal8_hiccup(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Eight configs of equal cost (enough to screen); the first is preempted in its first timed run."""
    _add_body(x_ptr, y_ptr, out_ptr, n, BLOCK)


@triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=w) for w in (1, 2, 4, 8, 16)], key=["n"])
@triton.jit
def add_equal(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    _add_body(x_ptr, y_ptr, out_ptr, n, BLOCK)


@triton.jit
def _checked_body(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr, BUG: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n - BUG
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


@triton.autotune(
    configs=[triton.Config({"BLOCK": 32, "BUG": 0}), triton.Config({"BLOCK": 128, "BUG": 1}),
             triton.Config({"BLOCK": 16, "BUG": 0}, pre_hook=jitter), triton.Config({"BLOCK": 64, "BUG": 0})],
    key=["n"])
@triton.jit
def add_checked(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr, BUG: tl.constexpr):
    """``BUG=1`` forgets the last element: a wrong-tail config that validation must exclude."""
    _checked_body(x_ptr, y_ptr, out_ptr, n, BLOCK, BUG)


@triton.autotune(
    configs=[triton.Config({"BLOCK": 16, "BUG": 0}), triton.Config({"BLOCK": 32, "BUG": 0}, pre_hook=kill_in_worker),
             triton.Config({"BLOCK": 256, "BUG": 1}), triton.Config({"BLOCK": 64, "BUG": 0})],
    key=["n"])
@triton.jit
def add_checked_kill(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr, BUG: tl.constexpr):
    """As ``add_checked``, with a config that kills the worker before the wrong-tail one."""
    _checked_body(x_ptr, y_ptr, out_ptr, n, BLOCK, BUG)


@triton.autotune(configs=[triton.Config({"BLOCK": 32, "BUG": 0}), triton.Config({"BLOCK": 128, "BUG": 1}),
                         triton.Config({"BLOCK": 64, "BUG": 0})], key=["n"], restore_value=["x_ptr"])
@triton.jit
def add_into_checked(x_ptr, y_ptr, n, BLOCK: tl.constexpr, BUG: tl.constexpr):
    """``x += y`` in place (``restore_value`` undoes each timed run); ``BUG=1`` forgets the last element."""
    _checked_body(x_ptr, y_ptr, x_ptr, n, BLOCK, BUG)


def run_add(kernel: object, x: object, y: object) -> object:
    import torch

    out = torch.full_like(x, float("nan"))
    n = x.numel()
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, out, n)
    return out


@triton.autotune(configs=_configs(32, 64), key=["n"])
@triton.jit
def clamp(x_ptr, out_ptr, n, lo, hi, BLOCK: tl.constexpr):
    """out = x clamped to [lo, hi]: float scalars such as -inf (a common mask value) that JSON cannot hold."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.minimum(tl.maximum(tl.load(x_ptr + offs, mask=mask), lo), hi), mask=mask)


def run_clamp(x: object, lo: float, hi: float) -> object:
    import torch

    out = torch.full_like(x, float("nan"))
    n = x.numel()
    clamp[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, out, n, lo, hi=hi)
    return out


def pause(nargs: dict) -> None:
    """A fixed cost that dwarfs the interpreter's jitter on a busy machine."""
    time.sleep(0.03)


@triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=w, pre_hook=pause)
                          for w in (1, 2, 4, 8, 16)], key=["n"])
@triton.jit
def add_tied(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Five configs of equal cost."""
    _add_body(x_ptr, y_ptr, out_ptr, n, BLOCK)


def delay(nargs: dict) -> None:
    """Each config costs its ``DELAY`` in milliseconds: a config space with a known best."""
    time.sleep(nargs["DELAY"] / 1000)


@triton.autotune(configs=[triton.Config({"BLOCK": 64, "DELAY": d}, pre_hook=delay)
                          for d in (120, 90, 100, 10, 110, 80, 130, 70)], key=["n"])
@triton.jit
def add_delayed(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr, DELAY: tl.constexpr):
    _add_body(x_ptr, y_ptr, out_ptr, n, BLOCK)


@triton.jit
def twin(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    _add_body(x_ptr, y_ptr, out_ptr, n, BLOCK)


# Two autotuners over one body: the module name ``twin`` ends up holding its own autotuner only,
# so ``twin_b`` is found in a fresh process by its own attribute, not by its function's name.
twin_b = triton.autotune(configs=_configs(16, 32), key=["n"])(twin)
twin = triton.autotune(configs=_configs(32, 64), key=["n"])(twin)
