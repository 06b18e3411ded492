"""Compile ahead: while a warmup tunes one key, helper processes compile the keys that follow.

A key's precompile cannot end before its slowest config's compile: one config of
flash-linear-attention's l2norm spends 3-23 s in ptxas while the other 24 are ready in 1-2 s
(BENCHMARKS.md, "the compile floor"), and a warmup tunes its keys one after another, so most of
a host's cores idle through most of a warmup. A manifest says which keys come next. Their configs
compile in helper processes (the tuning worker's program, asked only to compile; each takes a
share of every key's configs), many keys at once, into Triton's on-disk cache, where this
process's precompile of each key then finds them. The helpers hold no GIL of this process, so
timing here is not slowed by them, and no compiled module of a losing config stays in this
process beyond what stock Triton keeps.

A key is claimed before it is tuned: if the helpers are compiling it, the tuning waits for that
(compiling it here too would only race them for the same cores); if they have not started it,
it is dropped from their list and compiles here as usual. Everything is best effort: a helper
that fails to start or dies costs the warmup nothing but its help.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunevault.core.machine import available_cores
from tunevault.engine.procs import WorkerDied, WorkerProcess, cuda_ordinal, device_index, pin, spawn, worker_env

if TYPE_CHECKING:
    from triton import Config
    from triton.runtime.autotuner import Autotuner

log = logging.getLogger("tunevault")

DEFAULT_KEYS = 16  # keys compiling at once: their stragglers overlap
MAX_HELPERS = 2
# HELPER_NOTE: one process's compile threads share its GIL (Triton's frontend and the glue
# between passes are Python). On a 16-core H200 host the 388 configs of 27 keys compiled in
# 30.6 s with 15 threads of one process and in 19.1 s with 8 processes of 2 threads
# (bench/compile_throughput.py); each helper also pays its imports, so two is the default.
START_TIMEOUT = 120.0
# A claimed key the helpers have not finished after this long: they are stuck, not slow (the
# slowest config known, one of flash-linear-attention's, spends 23 s in ptxas, and a claimed key
# waits at most for the compiles already running). An 80-key warmup on an H200 once waited on
# one key until ``tune_timeout`` with both helpers alive and busy (cause not found): past this, compile
# ahead stops for the rest of the warmup and every key compiles in its own tuning.
STALL_S = 90.0
POLL_S = 0.05
STACKS_S = 0.5
# A helper must not idle out between keys (a long tuning, keys leased to other processes): it
# lives as long as the warmup, which kills it when the walk returns; if the warmup dies, the
# helper sees its input close and exits.
HELPER_IDLE_S = 7 * 24 * 3600.0


def helper_layout(cores: int, helpers: int | None = None) -> tuple[int, int]:
    """(helpers, threads each) for ``cores`` cores: one helper per 8 cores up to MAX_HELPERS (see
    HELPER_NOTE), their threads filling all cores but one, which stays with the timing."""
    count = helpers or max(1, min(MAX_HELPERS, cores // 8))
    return count, max(1, min(16, (cores - 1) // count))


@dataclass(frozen=True)
class AheadJob:
    """One key to compile: the kernel as the worker imports it, its arguments, the configs."""

    target: str  # module:qualname
    digest: str  # the kernel's identity digest: the helper checks it imported the same kernel
    callspec: dict[str, Any]  # pinned: the helper sees its one GPU as cuda:0
    configs: tuple[int, ...]  # declared indices
    device: int | None = None  # the GPU the warmup tunes on, as this process numbers it


class CompileAhead:
    """The server side: a feeder thread keeps up to ``keys`` jobs compiling in the helpers."""

    def __init__(self, keys: int = DEFAULT_KEYS, start_timeout: float = START_TIMEOUT,
                 helpers: int | None = None, cores: int | None = None, stall_s: float = STALL_S) -> None:
        self.keys, self.start_timeout, self.stall_s = max(1, keys), start_timeout, stall_s
        self.helpers, self.threads = helper_layout(cores or available_cores(), helpers)
        self._cv = threading.Condition()
        self._queued: dict[Hashable, AheadJob] = {}  # in the order wanted
        self._sent: dict[int, Hashable] = {}  # sid -> token, still compiling in some helper
        self._left: dict[int, int] = {}  # sid -> helpers yet to finish their share
        self._done: set[Hashable] = set()
        self._closed = False
        self._starting = False  # the feeder is starting the helpers
        self._stacks_asked = False  # a stall asked the helpers for their stacks
        self._procs: list[WorkerProcess] = []
        self._thread: threading.Thread | None = None
        self.compiled = 0  # keys the helpers finished
        self.helper_pids: list[int] = []

    def want(self, token: Hashable, job: AheadJob) -> None:
        """Compile ``job`` when a slot is free, unless it is queued, compiling or done already."""
        with self._cv:
            if self._closed or token in self._queued or token in self._done or token in self._sent.values():
                return
            self._queued[token] = job
            if self._thread is None:
                self._thread = threading.Thread(target=self._feed, name="tunevault-compile-ahead", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def claim(self, token: Hashable, timeout: float) -> bool:
        """About to tune ``token``: wait while the helpers compile it; True when they compiled it.

        Waits at most ``timeout``, and at most ``stall_s``: helpers that have not finished a claimed
        key by then are stuck, and compile ahead stops (the tunings compile for themselves)."""
        began = time.monotonic()
        end = began + min(timeout, self.stall_s)
        with self._cv:
            self._queued.pop(token, None)  # not started: it compiles in the tuning, as usual
            while token in self._sent.values() and not self._closed:
                left = end - time.monotonic()
                if left <= 0:
                    if time.monotonic() - began >= self.stall_s:
                        self._stalled(token)
                    return False
                self._cv.wait(min(left, POLL_S * 4))
            return token in self._done

    def _stalled(self, token: Hashable) -> None:
        """Stop compiling ahead: the feeder sees it closed and kills the helpers (called holding _cv).
        First each helper writes every thread's stack to its stderr, which the debug log shows."""
        log.warning("tunevault: compile ahead: the helpers did not finish a key in %.0f s; compile ahead "
                    "stops for the rest of this warmup (each key compiles in its own tuning; the helpers' "
                    "stacks are in the debug log)", self.stall_s)
        log.debug("tunevault: compile ahead stalled on %s; still compiling: %s", token, sorted(
            map(str, self._sent.values())))
        for helper in list(self._procs):
            with contextlib.suppress(OSError, AttributeError):
                os.kill(helper.pid, signal.SIGUSR1)  # faulthandler in the worker (engine/worker.py)
        self._stacks_asked = True
        self._closed = True
        self._queued.clear()
        self._cv.notify_all()

    def busy(self) -> bool:
        """Keys wait for the helpers or compile in them."""
        with self._cv:
            return bool(self._queued or self._sent)

    def close(self) -> None:
        """Stop feeding and let the helpers go (their compiles end with them). Helpers still starting
        are not waited for (a short warmup would pay their start-up): the feeder kills them once
        they are up, and a helper whose warmup process is gone exits by itself."""
        with self._cv:
            self._closed = True
            self._queued.clear()
            self._cv.notify_all()
        if self._thread is not None and not self._starting:
            self._thread.join(timeout=10)

    def _feed(self) -> None:
        try:
            self._serve()
        except Exception as exc:  # best effort: the tunings compile for themselves
            log.info("tunevault: compile ahead stopped (%s: %s); keys compile as they are tuned",
                     type(exc).__name__, exc)
        finally:
            if self._stacks_asked:
                time.sleep(STACKS_S)  # the helpers' dumps reach their stderr readers before the kill
            procs, self._procs = self._procs, []
            with self._cv:
                self._closed = True
                self._queued.clear()
                self._sent.clear()
                self._cv.notify_all()
            for helper in procs:
                helper.kill()  # at once: whatever it still compiles is no longer wanted

    def _serve(self) -> None:
        sid = 0
        while True:
            with self._cv:
                while not self._closed and not self._queued and not self._sent:
                    self._cv.wait()
                if self._closed:
                    return
                first = next(iter(self._queued.values()), None)
            if not self._procs and first is not None:
                self._start(first)  # meanwhile a key tuned is dropped from the list, not waited for
                continue
            job = None
            with self._cv:
                if self._queued and len(self._sent) < self.keys:
                    token, job = next(iter(self._queued.items()))
                    del self._queued[token]
                    sid += 1
                    self._sent[sid] = token
                    log.debug("tunevault: compile ahead: %s (%d configs) sent as #%d", token, len(job.configs), sid)
            if job is not None:
                shares = [job.configs[h::len(self._procs)] for h in range(len(self._procs))]
                with self._cv:
                    self._left[sid] = sum(1 for share in shares if share)
                for helper, share in zip(list(self._procs), shares, strict=True):
                    if not share:
                        continue
                    try:
                        helper.send({"op": "ahead", "sid": sid, "kernel": job.target, "digest": job.digest,
                                     "callspec": job.callspec, "configs": list(share), "threads": self.threads,
                                     "idle": HELPER_IDLE_S})
                    except WorkerDied:
                        self._drop(helper)
                continue
            self._collect()

    def _drop(self, helper: WorkerProcess) -> None:
        """A helper died: the others go on. The keys it was compiling are given up (their tunings
        compile what is missing); with no helper left, compile ahead stops."""
        reason = helper.exit_reason()
        helper.kill()
        self._procs = [p for p in self._procs if p is not helper]
        with self._cv:
            for sid in list(self._sent):
                self._left.pop(sid, None)
                self._sent.pop(sid)
            self._cv.notify_all()
        if not self._procs:
            raise RuntimeError(f"the last helper exited ({reason})")
        log.info("tunevault: a compile-ahead helper exited (%s); %d go on", reason, len(self._procs))

    def _start(self, job: AheadJob) -> None:
        """Start the helpers side by side (each imports torch and Triton on its own cores)."""
        env = worker_env(job.device)
        started: list[WorkerProcess | BaseException] = []

        def one() -> None:
            try:
                started.append(spawn(env, self.start_timeout))
            except BaseException as exc:
                started.append(exc)

        threads = [threading.Thread(target=one, daemon=True) for _ in range(self.helpers)]
        self._starting = True
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            self._starting = False
        self._procs = [p for p in started if isinstance(p, WorkerProcess)]
        self.helper_pids = [p.pid for p in self._procs]
        if not self._procs:
            raise next(e for e in started if isinstance(e, BaseException))
        log.debug("tunevault: compile-ahead helpers %s started", self.helper_pids)

    def _collect(self) -> None:
        """Wait a moment for a helper to finish its share of a key (or to refuse it)."""
        for helper in list(self._procs):
            try:
                ev = helper.wait_for(("compiled", "fatal"), POLL_S / len(self._procs))
            except queue.Empty:
                continue
            except WorkerDied:
                self._drop(helper)
                return
            with self._cv:
                sid = int(ev.get("sid", -1))
                if sid not in self._sent:
                    continue
                if ev.get("ev") != "compiled":
                    log.debug("tunevault: compile ahead refused %s: %s", self._sent[sid], ev.get("message"))
                    del self._left[sid]
                    self._sent.pop(sid)
                    self._cv.notify_all()
                    continue
                self._left[sid] -= 1
                if self._left[sid] <= 0:
                    log.debug("tunevault: compile ahead: #%d compiled", sid)
                    self._done.add(self._sent.pop(sid))
                    del self._left[sid]
                    self.compiled += 1
                    self._cv.notify_all()


def job_for(target: str | None, digest: str, callspec: dict[str, Any] | None,
            configs: Sequence[int], device: str | None = None) -> AheadJob | None:
    """The job for a key, pinned to one GPU as the worker sees it; None when it cannot be compiled ahead.

    ``device``: where the warmup rebuilds the call (its ``device`` option), else the call's own
    device, as the manifest recorded it."""
    if target is None or callspec is None or len(configs) < 2:
        return None
    index = device_index(callspec)
    if index is None:
        return AheadJob(target, digest, callspec, tuple(configs))
    if device is not None:
        index = cuda_ordinal(device)
        if index is None:
            return None  # rebuilt on the CPU: nothing for a GPU helper to compile
    return AheadJob(target, digest, pin(callspec), tuple(configs), index)


class HelperCompiles:
    """The helper's side (in the worker): every key's configs on one pool; a key reported once all
    its compiles ended, successful or not (errors surface when the config is timed for real)."""

    def __init__(self, emit: Callable[..., None], threads: int | None = None) -> None:
        self.emit = emit
        workers = threads or helper_layout(available_cores(), helpers=1)[1]
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tunevault-ahead")
        self._lock = threading.Lock()
        self.pending: dict[int, int] = {}  # sid -> compiles left

    def busy(self) -> bool:
        with self._lock:
            return bool(self.pending)

    def abandon(self) -> None:
        """Drop the compiles not yet started (those running cannot be stopped)."""
        self.pool.shutdown(wait=False, cancel_futures=True)

    def add(self, sid: int, autotuner: Autotuner, args: tuple, kwargs: dict[str, Any], configs: Sequence[Config],
            ) -> None:
        from tunevault.core.machine import interpreting
        from tunevault.engine.inprocess import compiler, device_caches_ready

        if interpreting() or not configs:  # nothing compiles under the interpreter
            self.emit(ev="compiled", sid=sid)
            return
        compile_one = compiler(autotuner, args, kwargs)
        device_caches_ready(autotuner.fn)  # one set of per-device caches for all the threads
        with self._lock:
            self.pending[sid] = len(configs)
        for config in configs:
            self.pool.submit(compile_one, config).add_done_callback(lambda f: self._ended(sid, f))

    def _ended(self, sid: int, future: Future[Any]) -> None:
        with contextlib.suppress(Exception):
            future.result()  # a config that does not compile fails again, with its error, when timed
        with self._lock:
            self.pending[sid] -= 1
            finished = self.pending[sid] == 0
            if finished:
                del self.pending[sid]
        if finished:
            self.emit(ev="compiled", sid=sid)
