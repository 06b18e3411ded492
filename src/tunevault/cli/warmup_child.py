"""One ``tunevault warmup --jobs`` child: its start-up overlapped and measured, then the shared walk.

A sharded warmup's start-up does not shrink with more processes (every child pays it), so the
child overlaps what can overlap and reports where the rest went:

- main thread: the interpreter decision (on a GPU it initialises the CUDA driver, which the
  process needs anyway), the manifest, torch and Triton, Triton's driver, then
  ``tunevault.install`` (store, fingerprint: device name, ptxas) and the walk;
- on a GPU, from the first instant: the device's primary CUDA context is created through the
  driver API (ctypes releases the GIL, so it runs beside the imports; torch and Triton later
  use that same context), and Triton's C helper module, compiled once per Triton cache, is built
  while torch imports (the driver is created only after it, so it is never compiled twice);
- the manifest's kernel modules are not imported here: the walk imports each one when it first
  reaches one of its keys, on its own thread, between keys. An import on a thread beside the
  first key's compile threads competed with them for the GIL (on an H200 a kernel library's
  import took ~10 s that way, and timing had to wait for it), and a worker that never reaches a
  library's keys never pays for it.

One ``ready`` event carries the phases (seconds) and ``since_start_s``, measured from the
parent's spawn time (``TUNEVAULT_WARMUP_SPAWNED``, a ``time.time()``): it is sent when the first
key starts tuning or, if none does, when the first key is settled.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

MARK = "@tunevault-warmup "  # the parent (warmup_jobs.py) reads these lines
SPAWNED_VAR = "TUNEVAULT_WARMUP_SPAWNED"


class StartupClock:
    """The phases of this process's start-up, in seconds; background jobs add their own."""

    def __init__(self, spawned: str | None) -> None:
        now = time.time()
        try:
            self.origin = float(spawned) if spawned else now
        except ValueError:
            self.origin = now
        self.phases: dict[str, float] = {"python_s": now - self.origin}  # interpreter + this module's imports

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = time.perf_counter() - began

    def background(self, name: str, job: Callable[[], object]) -> threading.Thread:
        """Run ``job`` on a daemon thread; records ``{name}_s`` and ``{name}_done_at_s`` (since spawn)."""
        def timed() -> None:
            with contextlib.suppress(Exception), self.phase(f"{name}_s"):
                job()
            self.phases[f"{name}_done_at_s"] = self.since_start()

        thread = threading.Thread(target=timed, name=f"tunevault-{name}", daemon=True)
        thread.start()
        return thread

    def since_start(self) -> float:
        return time.time() - self.origin

    def report(self) -> dict[str, Any]:
        return {"phases": {k: round(v, 3) for k, v in self.phases.items()},
                "since_start_s": round(self.since_start(), 3)}


def _device_index(device: str | None) -> int | None:
    """The CUDA ordinal ``--device`` names (``cuda`` and no device: 0); None for anything else."""
    if device is None or device == "cuda":
        return 0
    m = re.fullmatch(r"cuda:(\d+)", device)
    return int(m.group(1)) if m else None


def create_cuda_context(index: int) -> None:
    """Create the device's primary context, as torch's and Triton's first use of the device would."""
    import ctypes

    lib = ctypes.CDLL("libcuda.so.1")
    if lib.cuInit(0) != 0:
        return
    device, context = ctypes.c_int(0), ctypes.c_void_p()
    if lib.cuDeviceGet(ctypes.byref(device), index) == 0:
        lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device)  # held until exit: torch reuses it


def build_triton_helper() -> None:
    """Compile (or load from the Triton cache) Triton's CUDA helper module; needs neither torch nor a device."""
    from triton.backends.nvidia.driver import CudaUtils

    CudaUtils()


def exit_with_stdin() -> None:
    """Exit at once when stdin (a pipe from the ``--jobs`` parent) closes: the parent is gone, however
    it went (SIGKILL included), and a walk nobody follows must not go on tuning. Exiting closes
    this process's own pipes, so its compile-ahead helpers exit too."""
    def watch() -> None:
        with contextlib.suppress(Exception):
            while sys.stdin.buffer.read(4096):
                pass
        os._exit(129)  # 128 + SIGHUP: what a terminal's hang-up would do

    threading.Thread(target=watch, name="tunevault-parent-watch", daemon=True).start()


def open_store_strictly(url: str | None) -> str | None:
    """The reason the store cannot hold this warmup's leases and decisions, or None when it can
    (a warmup into a store that silently fell back to memory would report keys it never saved)."""
    from tunevault.cli.serving_cmds import probe_store

    try:
        probe_store(argparse.Namespace(store=url))
    except Exception as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    """One worker: warm the manifest up on the store, reporting each key as a marked JSON line."""
    clock = StartupClock(os.environ.get(SPAWNED_VAR))
    p = argparse.ArgumentParser(prog="tunevault-warmup-worker")
    p.add_argument("manifest")
    p.add_argument("--store")
    p.add_argument("--device")
    p.add_argument("--bytes", type=int, help="read the manifest up to this length (the parent's snapshot)")
    p.add_argument("--retry-before", type=float, help="retry keys recorded as failed before this time")
    p.add_argument("--exit-with-stdin", action="store_true", help="exit when stdin closes (the parent is gone)")
    args = p.parse_args(argv)
    if args.exit_with_stdin:
        exit_with_stdin()
    from tunevault.capture.locate import allowed_prefixes

    try:
        allowed_prefixes()  # an empty or malformed list must stop the run, never mean "any module"
    except ValueError as exc:
        print(f"tunevault warmup: error: {exc}", file=sys.stderr)
        return 2
    import logging

    from tunevault.core.machine import use_interpreter_if_no_gpu

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    with clock.phase("interpreter_s"):
        gpu = not use_interpreter_if_no_gpu()
    index = _device_index(args.device) if gpu else None
    helper = None
    if index is not None:
        clock.background("cuda_context", lambda: create_cuda_context(index))
        helper = clock.background("triton_helper", build_triton_helper)
    with clock.phase("manifest_s"):
        from tunevault.capture import manifest as mf
        entries = mf.read(args.manifest, upto=args.bytes)
    with clock.phase("imports_s"):
        import torch  # noqa: F401  (imported here so that its time is its own phase)
        import triton

        import tunevault
        from tunevault.integration.shared_warmup import install_for_own_manifest, warmup
    if index is not None:
        with clock.phase("driver_s"):
            if helper is not None:
                helper.join()
            with contextlib.suppress(Exception):
                triton.runtime.driver.active  # noqa: B018  (created here: no thread races to create it)
    lock = threading.Lock()
    ready: list[bool] = []

    def say(**msg: Any) -> None:
        with lock:
            if not ready:  # the first thing this worker does with a key ends its start-up
                ready.append(True)
                clock.phases["first_key_s"] = time.perf_counter() - walk_began
                sys.stdout.write(MARK + json.dumps({"t": "ready", **clock.report()}) + "\n")
            sys.stdout.write(MARK + json.dumps(msg, default=str) + "\n")
            sys.stdout.flush()

    with clock.phase("install_s"):
        unusable = open_store_strictly(args.store)
        if unusable is not None:
            print(f"tunevault warmup: error: {unusable}", file=sys.stderr)
            return 2
        install_for_own_manifest(args.store)  # not TUNEVAULT_WARMUP: the parent said it is ignored
    walk_began = time.perf_counter()
    try:
        report = warmup(entries, device=args.device, read_from=args.manifest, retry_before=args.retry_before,
                        progress=lambda done, total, item: say(t="item", **item.to_json()),
                        started=lambda task: say(t="tuning", what=task.what))
    finally:
        tunevault.uninstall()
    say(t="done", ok=report.ok, counts=report.counts())
    return 0 if report.ok else 1


def exit_now(code: int) -> NoReturn:
    """Exit without tearing the interpreter down: freeing torch's modules one object at a time (and
    a CUDA context) costs this worker ~0.4 s on a CPU, all of it after its last key. Exit handlers
    still run (a capture manifest's flush, the isolated worker's shutdown, logging's flush)."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
