"""The disposable tuning worker: ``python -m tunevault.engine.worker``.

Speaks JSON lines only (requests on stdin, events on a private copy of stdout; the kernel's own
prints go to stderr). The first request carries a per-process token that only the server and
this process's memory know (never the environment or argv); every event line starts with it,
so a line that kernel code writes to an inherited descriptor is ignored by the server.

It imports the kernel by ``module:qualname``, checks it is the kernel
the server asked for, rebuilds the arguments from a CallSpec and runs the engine's stages on
them. Each config is announced before it runs, so when this process dies the server knows
which config killed it. It exits on end of input, after ``TUNEVAULT_WORKER_IDLE`` idle
seconds, after a sticky device error, or (whatever it is running) within a fraction of a second
of its server's death, so it never holds device memory for long.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import importlib
import json
import math
import os
import select
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, TextIO

from tunevault.core.model import CandidateResult
from tunevault.engine.failures import ConfigRaised

if TYPE_CHECKING:
    from triton.runtime.autotuner import Autotuner

    from tunevault.engine.ahead import HelperCompiles
    from tunevault.engine.inprocess import InProcessSession

STICKY = ("illegal memory access", "unspecified launch failure", "misaligned address", "device-side assert",
          "an illegal instruction", "CUDA error: unknown error")


class Fatal(Exception):
    """The kernel cannot be tuned here at all (import failure, different kernel, bad arguments)."""


def import_autotuner(target: str, digest: str | None = None) -> Autotuner:
    """The Autotuner ``target`` names: an alias's, or among those over a named jit function the one
    with ``digest`` (capture.locate.find_kernel); Fatal when there is none."""
    from tunevault.capture.locate import KernelNotFound, find_kernel

    try:
        return find_kernel(importlib.import_module(target.partition(":")[0]), target, digest)
    except KernelNotFound as exc:
        raise Fatal(f"{exc} in the worker") from exc
    except Exception as exc:
        raise Fatal(f"cannot import {target}: {type(exc).__name__}: {exc}") from exc


class Worker:
    def __init__(self, out: TextIO, token: str = "") -> None:
        self.out = out
        self.token = token
        self.sessions: dict[int, InProcessSession] = {}
        self.launches = 0
        self.ahead: HelperCompiles | None = None  # compiles for a warmup's coming keys
        self._emit_lock = threading.Lock()  # compile-ahead threads report too

    def emit(self, **event: Any) -> None:
        """One framed line, written whole (``os.write`` of one buffer, below the pipe's atomic size
        for every event but long error messages)."""
        line = f"{self.token} {json.dumps(event, allow_nan=False)}\n"
        with self._emit_lock:
            self.out.write(line)
            self.out.flush()

    def busy(self) -> bool:
        """Mid-tuning or compiling ahead: no idle exit now."""
        return bool(self.sessions) or (self.ahead is not None and self.ahead.busy())

    def counted(self) -> None:
        self.launches += 1

    def open(self, msg: dict[str, Any]) -> None:
        from tunevault.core.identity import config_spec
        from tunevault.engine.inprocess import InProcessSession

        at, args, kwargs = self.rebuild(msg)
        configs = dict(enumerate(at.configs))
        specs = {i: config_spec(c) for i, c in configs.items()}
        self.sessions[int(msg["sid"])] = InProcessSession(at, args, kwargs, configs, specs, self.counted)

    def rebuild(self, msg: dict[str, Any], device: str | None = None) -> tuple[Autotuner, tuple, dict[str, Any]]:
        """The kernel the server named (checked by digest) and the server's call's arguments
        (on ``device`` instead of the call's own, e.g. ``meta`` to compile without device memory)."""
        from tunevault.capture.argspec import CallSpec
        from tunevault.core.identity import kernel_id

        target = str(msg["kernel"])
        at = import_autotuner(target, msg["digest"])
        if kernel_id(at).digest != msg["digest"]:
            raise Fatal(f"{target} imported in the worker is a different kernel (source or configs differ)")
        try:
            spec = CallSpec.from_json(msg["callspec"], untrusted=False)  # the server's call
            args, kwargs = spec.build(at, device, seed=0)
        except Exception as exc:
            raise Fatal(f"cannot rebuild the arguments of {target}: {type(exc).__name__}: {exc}") from exc
        return at, args, kwargs

    def compile_ahead(self, msg: dict[str, Any]) -> None:
        """Compile a key's configs for a warmup's later tuning (engine/ahead.py); "compiled" follows."""
        from tunevault.engine.ahead import HelperCompiles

        at, args, kwargs = self.rebuild(msg, device="meta")  # compiles only: no device memory for tensors
        if self.ahead is None:
            self.ahead = HelperCompiles(self.emit, int(msg.get("threads") or 0) or None)
        configs = [at.configs[i] for i in (int(j) for j in msg["configs"]) if 0 <= i < len(at.configs)]
        self.ahead.add(int(msg["sid"]), at, args, kwargs, configs)

    def run(self, msg: dict[str, Any]) -> bool:
        """Run configs one by one; returns False when a sticky device error means this process must go."""
        session = self.sessions[int(msg["sid"])]
        mode, reference = str(msg["mode"]), msg.get("reference")
        indices = [int(i) for i in msg["configs"]]
        if len(indices) > 1 and session.times_together(mode):
            return self.run_together(session, mode, indices)
        for index in indices:
            self.emit(ev="start", index=index)
            before = self.launches
            spread: dict[str, Any] = {}
            try:
                if mode == "validate":
                    error = session.validate([index], reference)[index]
                    timings: list[float] = []
                else:
                    result = session.time([index], mode)[index]
                    error, timings = result.error, list(result.timings)
                    spread = {"n": result.n, "iqr": result.iqr, "scalar": result.scalar}
            except ConfigRaised as exc:
                if not worker_fault(exc):
                    return self.report_raised(exc, index, self.launches - before)
                error, timings = exc.describe(), []
            if not self.report(index, error, timings, self.launches - before, **spread):
                return False
        self.emit(ev="done")
        return True

    def report_raised(self, exc: ConfigRaised, index: int, launches: int) -> bool:
        """A config raised an error stock Triton lets reach the caller: send it with its type (the
        server raises a TuningError naming it) and end the run, as stock ends its benchmark."""
        index = exc.index if exc.index is not None else index
        if not self.report(index, exc.describe(), [], launches, raised=type(exc.error).__name__):
            return False
        self.emit(ev="done")
        return True

    def run_together(self, session: InProcessSession, mode: str, indices: list[int]) -> bool:
        """Time a batch at once (interleaved GPU or CPU rounds): a config's result follows the batch,
        its launches counted with it. Each config is announced before its first run (on the CPU
        before every run), so a fault there names it; a fault in the GPU's rounds loses the batch,
        which the server sends again. A config's error that stock lets reach the caller ends the
        batch; running out of memory only loses that config."""
        before = self.launches
        session.on_setup = lambda index: self.emit(ev="start", index=index)
        results: dict[int, CandidateResult] = {}
        rest = list(indices)
        try:
            while rest:
                try:
                    results.update(session.time(rest, mode))
                    break
                except ConfigRaised as exc:
                    index = exc.index if exc.index in rest else rest[0]
                    if not worker_fault(exc):
                        return self.report_raised(exc, index, self.launches - before)
                    # out of memory or a dead device: that config loses, as before (docs/engine.md)
                    results[index] = CandidateResult(index, session.specs[index], (), exc.describe())
                    rest.remove(index)
                    if not healthy(exc.describe()):
                        break
        finally:
            session.on_setup = None
        if len(indices) > 1 and any(r.error is not None and sticky(r.error) for r in results.values()):
            # A sticky device error (an illegal memory access) surfaces at the next synchronisation,
            # often in another config's timing, and every config after it fails alike: no config of
            # a batch can be blamed. The server times them one at a time in fresh workers.
            self.emit(ev="poisoned")
            return False
        for index in indices:
            if index not in results:
                continue  # the device died on another config: the server sends this one again
            result = results[index]
            if not self.report(index, result.error, list(result.timings), self.launches - before,
                               n=result.n, iqr=result.iqr, scalar=result.scalar):
                return False
            before = self.launches
        self.emit(ev="done")
        return True

    def report(self, index: int, error: str | None, timings: list[float], launches: int, **spread: Any) -> bool:
        """Send one config's result; False when its error is a sticky device error (this process must go)."""
        if not all(math.isfinite(t) for t in timings):
            error, timings = f"benchmark returned {timings}", []
        self.emit(ev="result", index=index, timings=timings, error=error, launches=launches, **spread)
        return error is None or healthy(error)

    def handle(self, msg: dict[str, Any]) -> bool:
        op, sid = msg.get("op"), msg.get("sid")
        if op == "open":
            try:
                self.open(msg)
            except Fatal as exc:
                self.emit(ev="fatal", sid=sid, message=str(exc))
                return True
            self.emit(ev="opened", sid=sid)
        elif op == "ahead":
            try:
                self.compile_ahead(msg)
            except Fatal as exc:
                self.emit(ev="fatal", sid=sid, message=str(exc))
        elif op == "precompile":
            session = self.sessions[int(msg["sid"])]
            session.precompile([int(i) for i in msg["configs"]], int(msg.get("threads") or 0) or None)
            self.emit(ev="precompiled", sid=sid)
        elif op == "run":
            return self.run(msg)
        elif op == "prepare":
            prepare(bool(msg.get("context")))
        elif op == "import":
            import_modules(msg.get("modules"), self.emit)
        elif op == "path":
            from tunevault.engine.procs import append_path

            append_path(msg.get("append"))
        elif op == "env":  # after the imports asked before it: what they set (procs.WorkerProcess.differs_from)
            from tunevault.engine.procs import comparable

            self.emit(ev="env", env=comparable(dict(os.environ)))
        elif op == "close":
            # The session's tensors go with it (reference counts); the allocator keeps their blocks for
            # the next key. No full collection here: with a large library loaded it costs the next
            # key a few hundred ms, and the worker's memory goes back when it exits.
            self.sessions.pop(int(msg["sid"]), None)
        return True


def prepare(context: bool = False) -> None:
    """While prestarted and waiting: load what the first session needs.

    ``torch.cuda.init()`` loads the CUDA libraries and initializes the driver. With ``context``
    (the server tunes in this worker during its start-up) the CUDA context of the one device this
    worker sees is created too, with Triton's driver helpers and the timer's spin kernel, so the
    first key does not wait for them; otherwise the first session's allocation creates it."""
    import tunevault.capture.argspec  # noqa: F401
    import tunevault.core.identity  # noqa: F401

    try:
        import torch

        if not torch.cuda.is_available():
            return
        torch.cuda.init()
        if context:
            from triton.runtime.driver import driver

            from tunevault.engine.gpu_timing import cycles_per_us

            torch.empty(1, device="cuda")
            driver.active.get_current_target()
            cycles_per_us(torch.cuda.current_device())
    except Exception:
        pass  # the session will report whatever is wrong with the device


def import_modules(names: Any, emit: Any = None) -> None:
    """Import the kernels' modules the server named, ahead of their first session (best effort).

    Each import is announced (``importing``, then ``module: None`` after the last), so a server
    whose worker stops answering knows which module's import stalled it and hints it no more."""
    for name in names if isinstance(names, list) else ():
        if isinstance(name, str) and name not in sys.modules:
            if emit is not None:
                emit(ev="importing", module=name)
            began = time.perf_counter()
            try:
                importlib.import_module(name)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # SystemExit at import must not end the worker; its session reports it
                print(f"tunevault worker: cannot import {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            print(f"tunevault worker: imported {name} in {time.perf_counter() - began:.2f}s", file=sys.stderr)
    if emit is not None:
        emit(ev="importing", module=None)


def sticky(error: str) -> bool:
    """A CUDA error that leaves the whole context unusable (every later call fails alike)."""
    return any(s in error for s in STICKY)


def worker_fault(exc: ConfigRaised) -> bool:
    """A config's error that is the worker's lot rather than the user's bug: out of memory (the
    worker shares the server's device) or a sticky device error. Its config loses, as a crash does."""
    error = exc.describe()
    return "OutOfMemory" in error or "out of memory" in error or sticky(error)


def healthy(error: str) -> bool:
    """After an error, is the device still usable? Sticky CUDA errors poison the whole context."""
    if "OutOfMemory" in error or "out of memory" in error:
        release_memory()
        return True
    if sticky(error):
        return False
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    except Exception:
        return False
    return True


def release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:
        pass


def watch_server(server: int, every: float = 0.2) -> None:
    """Exit the moment the server (this process's parent, ``server``) is gone, whatever the main
    thread is doing: it reads its input only between requests, so a config that hangs (or a slow
    import) would otherwise leave this process running, holding its device memory, after a server
    killed outright. A parent that dies makes this process a child of another (``getppid``
    changes); its own process group (compiler subprocesses) goes with it. Not PR_SET_PDEATHSIG: that
    follows the spawning *thread*, which may be a short-lived one (the server's prestart)."""
    def watch() -> None:
        while os.getppid() == server:
            time.sleep(every)
        with contextlib.suppress(OSError):
            if os.getpgrp() == os.getpid():  # its own session (procs.spawn): take its subprocesses along
                os.killpg(os.getpid(), signal.SIGKILL)
        os._exit(4)

    threading.Thread(target=watch, name="tunevault-watch-server", daemon=True).start()


def main() -> int:
    watch_server(os.getppid())
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the kernel or a library prints must not corrupt the protocol
    faulthandler.enable()
    if hasattr(signal, "SIGUSR1"):  # the server asks for every thread's stack when a helper seems stuck
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    from tunevault.engine.procs import idle_timeout

    idle = idle_timeout(warn=False)  # the server warned about a malformed value
    import torch  # noqa: F401  (import cost belongs to start-up, not to the first config)
    import triton  # noqa: F401

    import tunevault.engine.inprocess  # noqa: F401

    lines = LineReader(sys.stdin.fileno())
    token = hello(lines)
    if token is None:
        return 2  # not started by a server (or it went away before saying hello)
    worker = Worker(out, token)
    worker.emit(ev="ready", pid=os.getpid())
    while True:
        line = lines.readline(None if worker.busy() else idle)  # never idle out mid-tuning
        if line is None:
            if worker.ahead is not None and worker.ahead.busy():
                worker.ahead.abandon()  # the server is gone: its queued compiles are wanted by no one
                os._exit(0)  # interpreter shutdown would wait for the pool's running compiles
            return 0  # end of input, or idle: give the device memory back
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if not isinstance(msg, dict):
            continue
        if isinstance(msg.get("idle"), int | float) and msg["idle"] > 0:
            idle = float(msg["idle"])  # the server's current idle timeout
        try:
            if not worker.handle(msg):
                return 3
        except Exception as exc:  # a bug or a bad request: report it and stay up
            worker.emit(ev="fatal", sid=msg.get("sid"), message=f"{type(exc).__name__}: {exc}"[:500])


def hello(lines: LineReader, timeout: float = 60.0) -> str | None:
    """The session token from the server's first line, ``{"op": "hello", "token": ...}``."""
    line = lines.readline(timeout)
    try:
        msg = json.loads(line) if line is not None else None
    except ValueError:
        return None
    token = msg.get("token") if isinstance(msg, dict) and msg.get("op") == "hello" else None
    return token if isinstance(token, str) and token.isalnum() and len(token) >= 16 else None


class LineReader:
    """Lines from a raw descriptor with an idle timeout (a buffered reader would hide queued lines)."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf = fd, b""

    def readline(self, timeout: float | None) -> bytes | None:
        while b"\n" not in self.buf:
            readable, _, _ = select.select([self.fd], [], [], timeout)
            if not readable:
                return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line


if __name__ == "__main__":
    sys.exit(main())
