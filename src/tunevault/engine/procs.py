"""A worker subprocess seen from the server: JSON lines over pipes, every wait bounded.

Reader threads turn the worker's stdout into a queue of events (``None`` marks its death) and
keep the tail of its stderr for error messages, so the server never blocks on a pipe. Only lines
framed with the worker's session token count as events: kernel code running in the worker (a
config ``pre_hook``) that writes to its descriptors cannot forge a result.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any

from tunevault.core.env import positive

log = logging.getLogger("tunevault")
DEFAULT_IDLE_S = 30.0
MAX_IDLE_S = 7 * 86400.0  # a week: longer is a leaked worker (and 1e300 overflows its select)


def idle_timeout(env: dict[str, str] | None = None, warn: bool = True) -> float:
    """Seconds an idle worker waits for its next session before it exits (``TUNEVAULT_WORKER_IDLE``)."""
    return positive("TUNEVAULT_WORKER_IDLE", DEFAULT_IDLE_S, float,
                    f"a positive number of seconds at most {MAX_IDLE_S:.0f}", MAX_IDLE_S, env, warn)


class WorkerDied(RuntimeError):
    """The worker process is gone (or its pipe is)."""


class Unencodable(ValueError):
    """A message JSON cannot carry (a value it has no form for): nothing was sent, the worker is fine."""


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen[bytes], env: dict[str, str], token: str = "") -> None:
        self.proc, self.env, self.pid = proc, env, proc.pid
        self.token = token.encode()
        self.forged = 0  # unframed lines seen on the protocol pipe (kernel code writing to it)
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.tail: deque[str] = deque(maxlen=40)
        self.opened: set[int] = set()
        self.last_used = time.monotonic()
        self.eof = False
        self.idle = idle_timeout(env, warn=False)  # as last told: it exits after this
        self._send_lock = threading.Lock()  # import hints come from other threads than the session's
        self.importing: str | None = None  # the hinted module it is importing now (worker.import_modules)
        self.importing_since = 0.0
        self.holding = False  # a session is open: import hints wait for its end (isolated.hint_imports)
        self.deferred: list[str] = []  # the hints that wait
        for target in (self._read_events, self._read_stderr):
            threading.Thread(target=target, name=f"tunevault-worker-{self.pid}", daemon=True).start()

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in iter(self.proc.stdout.readline, b""):
                event = self._unframe(line)
                if event is not None and event.get("ev") == "importing":  # progress, for no session
                    module = event.get("module")
                    self.importing = module if isinstance(module, str) else None
                    self.importing_since = time.monotonic()
                elif event is not None:
                    self.events.put(event)
        except (OSError, ValueError):
            pass
        finally:
            self.events.put(None)
        # Its output ends when it exits (idle, end of input, a crash): reap it now, or it stays a
        # zombie until the next tuning looks at it. (A worker that closed its output and runs on
        # is waited for here; poll() and the bounded waits of kill() and close() still work.)
        with contextlib.suppress(OSError, ValueError):
            self.proc.wait()

    def _unframe(self, line: bytes) -> dict[str, Any] | None:
        """The event after the token (bytes before it are someone else's partial write), or None."""
        at = line.find(self.token + b" ") if self.token else 0
        try:
            event = json.loads(line[at + len(self.token):]) if at >= 0 else None
        except ValueError:
            event = None
        if not isinstance(event, dict):
            self.forged += 1
            if self.forged == 1:
                log.debug("tunevault: ignoring an unframed line on the worker's protocol pipe: %r", line[:200])
            return None
        return event

    def differs_from(self, env: dict[str, str], timeout: float) -> list[str]:
        """The variables (of ``comparable``) on which this worker's environment differs from ``env``.

        Where the spawn-time environment differs, the worker is asked for its own, after the imports
        it was asked for before: a library may set a variable at import (flash-linear-attention sets
        ``TRITON_F32_DEFAULT``), in the server and in the worker alike, and that worker is still the
        right one. An unanswered question counts as a difference."""
        theirs = comparable(env)
        if comparable(self.env) != theirs and self.alive():
            try:
                self.send({"op": "env"})
                reported = self.wait_for(("env",), timeout).get("env")
                if isinstance(reported, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in reported.items()):
                    self.env = reported
            except (WorkerDied, queue.Empty):
                pass
        mine = comparable(self.env)
        return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))

    def follow_path(self, path: str) -> None:
        """Where the server's import path ``path`` only adds entries after this worker's, have the
        worker append them to its ``sys.path`` (a fresh worker would search them last too), so a
        library that appends its directory while the server runs does not replace the worker.
        Any other change (an entry removed, moved or put before others) is left to
        :meth:`differs_from`: modules the worker imported may resolve differently now."""
        mine = self.env.get("PYTHONPATH", "")
        old, new = entries(mine), entries(path)
        if path == mine or len(new) <= len(old) or new[:len(old)] != old or not self.alive():
            return
        log.debug("tunevault: tuning worker %d appends %s to its sys.path", self.pid, new[len(old):])
        try:
            self.send({"op": "path", "append": new[len(old):]})
        except WorkerDied:
            return  # differs_from finds the worker gone
        self.env = {**self.env, "PYTHONPATH": path}

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        with contextlib.suppress(OSError, ValueError):
            for raw in iter(self.proc.stderr.readline, b""):
                line = raw.decode(errors="replace").rstrip()
                self.tail.append(line)
                log.debug("tunevault worker %d: %s", self.pid, line)

    def alive(self) -> bool:
        return not self.eof and self.proc.poll() is None

    def send(self, msg: dict[str, Any]) -> None:
        try:
            data = (json.dumps(msg, allow_nan=False) + "\n").encode()
        except (TypeError, ValueError, RecursionError) as exc:
            raise Unencodable(f"{type(exc).__name__}: {exc}") from exc
        try:
            assert self.proc.stdin is not None
            with self._send_lock:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
        except (OSError, ValueError) as exc:
            raise WorkerDied(f"cannot write to the worker: {exc}") from exc
        self.last_used = time.monotonic()
        if isinstance(msg.get("idle"), int | float):
            self.idle = float(msg["idle"])

    def next_event(self, timeout: float) -> dict[str, Any]:
        """The next event; ``queue.Empty`` after ``timeout`` seconds, WorkerDied at end of stream."""
        if self.eof:
            raise WorkerDied("the worker exited")
        event = self.events.get(timeout=timeout)
        if event is None:
            self.eof = True
            raise WorkerDied("the worker exited")
        self.last_used = time.monotonic()
        return event

    def wait_for(self, kinds: tuple[str, ...], timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise queue.Empty
            event = self.next_event(left)
            if event.get("ev") in kinds:
                return event

    def stalled_importing(self, limit: float) -> bool:
        """Importing a hinted module for more than ``limit`` seconds."""
        return self.importing is not None and time.monotonic() - self.importing_since > limit

    def exit_reason(self) -> str:
        try:
            rc = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "closed its output but kept running"
        if rc < 0:
            try:
                reason = f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                reason = f"killed by signal {-rc}"
        else:
            reason = f"exit code {rc}"
        last = next((line for line in reversed(self.tail) if line.strip()), "")
        return f"{reason}; stderr: {last[:200]}" if last and rc > 0 else reason

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)  # its own session: compiler subprocesses go too
        except (ProcessLookupError, PermissionError, OSError):
            with contextlib.suppress(OSError):
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._close_pipes()

    def close(self) -> None:
        """End of input asks the worker to exit; a worker that does not is killed."""
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close_pipes()

    def disown(self) -> None:
        """In a forked child: this process's copies of the worker's pipes point at the null device
        from now on (closing them could flush a half-written request into the parent's worker, and
        a closed descriptor's number may be reused while these file objects still own it)."""
        null = os.open(os.devnull, os.O_RDWR)
        try:
            for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                with contextlib.suppress(OSError, ValueError):
                    if pipe is not None:
                        os.dup2(null, pipe.fileno())
        finally:
            os.close(null)
        self.eof = True

    def _close_pipes(self) -> None:
        # Only stdin: the reader threads own stdout/stderr and finish at end of stream.
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()


def visible_devices() -> list[str]:
    """This process's ``CUDA_VISIBLE_DEVICES`` entries (empty when unset)."""
    return [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]


def physical_device(index: int) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` entry that pins a child to this process's GPU ``index``."""
    visible = visible_devices()
    return visible[index] if index < len(visible) else str(index)


def import_path() -> str:
    """This process's ``sys.path`` as a worker's ``PYTHONPATH``: absolute, existing directories, once each."""
    paths = [os.path.abspath(p or os.getcwd()) for p in sys.path if isinstance(p, str)]
    return os.pathsep.join(p for p in dict.fromkeys(paths) if os.path.isdir(p))


def worker_env(device: int | None) -> dict[str, str]:
    """This process's environment, minus activation, with its import path and (on a GPU) one device."""
    env = {k: v for k, v in os.environ.items() if k != "TUNEVAULT_MODE"}  # the worker never installs
    env["PYTHONPATH"] = import_path()
    env["TUNEVAULT_WORKER"] = "1"
    if device is not None:  # pin the worker to the server's device: it sees exactly one GPU
        env["CUDA_VISIBLE_DEVICES"] = physical_device(device)
    return env


def entries(path: str) -> list[str]:
    return [p for p in path.split(os.pathsep) if p]


def append_path(added: object) -> None:
    """In the worker: the server appended ``added`` to its import path (WorkerProcess.follow_path)."""
    import importlib

    new = [p for p in added if isinstance(p, str) and p] if isinstance(added, list) else []
    sys.path.extend(p for p in dict.fromkeys(new) if p not in sys.path)
    known = entries(os.environ.get("PYTHONPATH", ""))
    os.environ["PYTHONPATH"] = os.pathsep.join(known + [p for p in new if p not in known])  # as reported
    importlib.invalidate_caches()


# Variables of ours a worker does not compute with: the idle timeout travels in each request, and
# the allow list limits what the server imports from a manifest (`warmup --allow-module` sets it
# after the worker was prestarted); the worker imports only the kernels and modules the server
# sends, and never reads it.
UNCOMPARED = frozenset({"TUNEVAULT_WORKER_IDLE", "TUNEVAULT_ALLOW_MODULES"})


def comparable(env: dict[str, str]) -> dict[str, str]:
    """The part of a worker's environment that changes what it computes (not PYTEST_CURRENT_TEST...)."""
    keep = ("PYTHONPATH", "CUDA_", "HIP_", "ROCR_", "TRITON_", "TORCH", "TUNEVAULT_", "LD_LIBRARY_PATH",
            "PATH")
    return {k: v for k, v in env.items() if k.startswith(keep) and k not in UNCOMPARED}


def likely_device() -> int | None:
    """The device this process will most likely tune on, guessed without touching CUDA.

    A prestarted worker is pinned to it; a wrong guess costs only that worker's replacement."""
    from tunevault.core.machine import interpreting

    if interpreting():
        return None  # arguments live on the CPU: the worker gets no device pin
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return int(torch.cuda.current_device())
    except Exception:
        pass
    rank = os.environ.get("LOCAL_RANK", "")
    if len(visible_devices()) != 1 and rank.isdigit():
        return int(rank)
    return 0


def device_index(callspec: dict[str, Any]) -> int | None:
    """The CUDA ordinal of the call's first GPU tensor; None when it has none."""
    specs = list(callspec.get("args", [])) + list(callspec.get("kwargs", {}).values())
    for spec in specs:
        if spec.get("kind") == "tensor":
            index = cuda_ordinal(spec.get("device", ""))
            if index is not None:
                return index
    return None


def cuda_ordinal(device: str) -> int | None:
    """``cuda:N`` -> N, ``cuda`` -> the current device; None for any other device."""
    if not device.startswith("cuda"):
        return None
    if ":" in device:
        return int(device.split(":", 1)[1])
    import torch

    return int(torch.cuda.current_device())


def pin(callspec: dict[str, Any]) -> dict[str, Any]:
    """The worker sees one GPU, as ``cuda:0``."""
    def fix(spec: dict[str, Any]) -> dict[str, Any]:
        if spec.get("kind") == "tensor" and str(spec.get("device", "")).startswith("cuda"):
            return {**spec, "device": "cuda:0"}
        return spec

    return {**callspec, "args": [fix(a) for a in callspec["args"]],
            "kwargs": {k: fix(v) for k, v in callspec["kwargs"].items()}}


def spawn(env: dict[str, str], timeout: float) -> WorkerProcess:
    """Start ``python -m tunevault.engine.worker`` and wait for it to say it is ready."""
    try:
        proc = subprocess.Popen([sys.executable, "-m", "tunevault.engine.worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=os.getcwd(),
                                start_new_session=True)
    except OSError as exc:
        raise WorkerDied(f"cannot start a worker: {exc}") from exc
    token = secrets.token_hex(16)  # in this process and the worker's memory only, never in its environment
    try:
        assert proc.stdin is not None
        proc.stdin.write((json.dumps({"op": "hello", "token": token}) + "\n").encode())
        proc.stdin.flush()
    except (OSError, ValueError):
        pass  # it died at once: the wait below says so
    worker = WorkerProcess(proc, env, token)
    try:
        worker.wait_for(("ready",), timeout)
    except queue.Empty:
        worker.kill()
        raise WorkerDied(f"the worker was not ready within {timeout:.0f}s") from None
    except WorkerDied:
        raise WorkerDied(f"the worker exited at start-up ({worker.exit_reason()})") from None
    log.debug("tunevault: started tuning worker %d", worker.pid)
    return worker
