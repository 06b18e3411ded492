"""The server's side of isolated tuning: find the kernel by name, drive a worker, survive it.

One worker process at a time serves every kernel; it is reused while tuning is busy and exits
by itself when idle. A config that kills the worker, hangs past the per-config timeout or
leaves the device unusable is recorded as failed, the worker is replaced, and tuning resumes
with the next config. Waits are bounded, so nothing the worker does stalls the caller longer
than the configured timeouts. A config that raises an error stock Triton lets reach the caller
(engine/failures.py) ends the tuning with a TuningError naming its type and message: the
exception itself stays in the worker.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import itertools
import logging
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from tunevault.core.model import CandidateResult, ConfigSpec, TuningError
from tunevault.engine.failures import WorkerStalled
from tunevault.engine.procs import (
    Unencodable,
    WorkerDied,
    WorkerProcess,
    device_index,
    idle_timeout,
    import_path,
    likely_device,
    pin,
    spawn,
    worker_env,
)

if TYPE_CHECKING:
    from triton.runtime.autotuner import Autotuner

log = logging.getLogger("tunevault")

START_TIMEOUT = 120.0  # importing torch and triton in a cold process
PRESTART_IDLE = 600.0  # until its first session a worker holds no device memory, only its imports
WATCH_S, WATCH_EVERY = 600.0, 0.5  # how long, how often a prestarted worker learns the server's imports
_refs: weakref.WeakKeyDictionary[Autotuner, tuple[str | None, str]] = weakref.WeakKeyDictionary()
_lock = threading.RLock()
_worker: WorkerProcess | None = None
_sids = itertools.count(1)
_generation = 0  # bumped by retire_idle: a prestart still in flight then closes what it started
_hint_lock = threading.Lock()  # orders import hints with (re)starts of the worker
_hinted: dict[str, None] = {}  # modules every new worker imports first, in the order learned
_retire_when_free = False  # warmup ended while a session was open: close the worker after it


class IsolationUnavailable(RuntimeError):
    """The worker cannot tune this kernel; the caller tunes in process instead."""


def kernel_target(autotuner: Autotuner) -> tuple[str | None, str]:
    """``(module:qualname, "")`` when a fresh process imports this very kernel, else ``(None, why)``."""
    try:
        cached = _refs.get(autotuner)
    except TypeError:
        cached = None
    if cached is not None:
        return cached
    found = _resolve_target(autotuner)
    with contextlib.suppress(TypeError):
        _refs[autotuner] = found
    return found


def _resolve_target(autotuner: Autotuner) -> tuple[str | None, str]:
    from tunevault.capture.locate import KernelNotFound, find_kernel, importable_name
    from tunevault.core.identity import kernel_id

    base = autotuner.base_fn
    module, qualname = getattr(base, "__module__", None), getattr(base, "__qualname__", "")
    if not module or module in ("__main__", "__mp_main__"):
        return None, "it is defined in __main__"
    own = importable_name(autotuner)  # the attribute holding this very kernel, an alias included
    if own is not None:
        return own, ""
    if "<locals>" in qualname:
        return None, "it is defined inside a function"
    target = f"{module}:{qualname}"  # no attribute holds this object: an equal kernel there will do
    try:
        found = find_kernel(importlib.import_module(module), target, kernel_id(autotuner).digest)
    except KernelNotFound as exc:
        return None, str(exc)
    except Exception as exc:
        return None, f"{target} cannot be imported ({type(exc).__name__}: {exc})"
    if found is not autotuner and kernel_id(found).digest != kernel_id(autotuner).digest:
        return None, f"{target} names a different kernel (its source or configs differ)"
    return target, ""


def _acquire_worker(env: dict[str, str], timeout: float, first: bool) -> WorkerProcess:
    """The live worker for ``env``, or a fresh one once the old one died, idled or differs."""
    global _worker
    w = _worker
    # Between sessions a worker close to its idle timeout is about to exit by itself: replace it.
    stale = first and w is not None and time.monotonic() - w.last_used > w.idle - min(1.0, w.idle / 2)
    if w is not None and not stale:
        w.follow_path(env.get("PYTHONPATH", ""))
    differs = w.differs_from(env, min(timeout, START_TIMEOUT)) if w is not None and not stale else []
    if w is not None and (stale or not w.alive() or differs):
        log.debug("tunevault: replacing tuning worker %d (%s)", w.pid,
                  "idle too long" if stale else "exited" if not w.alive() else f"environment differs: {differs}")
        w.close()
        w = _worker = None
    if w is None:
        w = spawn(env, min(timeout, START_TIMEOUT))
        _adopt(w)
    return w


def _adopt(w: WorkerProcess) -> None:
    """Make ``w`` the worker, and have it import every module learned so far first."""
    global _worker
    with _hint_lock:
        if _hinted:
            w.send({"op": "import", "modules": list(_hinted)})
        _worker = w


def hint_imports(modules: Iterable[str]) -> None:
    """Have the worker import ``modules`` (kernels' modules) before their first session; never blocks
    on a session, and a worker started later imports them first thing. While a session is open
    they wait for its end: the worker handles requests one by one, and the session must not wait
    behind an import (one that stalls in a fresh process would stall the session)."""
    from tunevault.engine.hints import importable

    with _hint_lock:
        new = [m for m in dict.fromkeys(modules) if m not in _hinted and importable(m)]
        if not new:
            return
        _hinted.update(dict.fromkeys(new))
        w = _worker
        log.debug("tunevault: the worker (%s) will import %s", "running" if w is not None else "not started", new)
        if w is not None and w.alive() and w.holding:
            w.deferred.extend(new)
        elif w is not None and w.alive():
            _send_hints(w, new)


def _send_hints(w: WorkerProcess, modules: list[str]) -> None:
    w.follow_path(import_path())  # a module may live in a directory the server added since
    with contextlib.suppress(WorkerDied):
        w.send({"op": "import", "modules": modules})


def _hold_hints(w: WorkerProcess, hold: bool) -> None:
    """A session opens on ``w`` (hints wait) or ends (the waiting ones go now, of those still wanted)."""
    with _hint_lock:
        w.holding = hold
        if hold:
            return
        waiting = [m for m in w.deferred if m in _hinted]
        w.deferred = []
        if waiting and w.alive():
            _send_hints(w, waiting)


def _drop_stalled_hint(w: WorkerProcess) -> None:
    """``w`` is killed for not answering, or has exited: a module it was importing for a hint is
    hinted no more (every fresh worker would stall on it first thing). Its kernels' own sessions
    still import it. (The hint came from the server's imports or from a manifest: the message
    says neither.)"""
    module = w.importing
    if module is not None:
        with _hint_lock:
            _hinted.pop(module, None)
        log.warning("tunevault: the tuning worker %s importing %s ahead of its kernels' tuning; "
                    "workers no longer import it ahead of time", "stalled" if w.alive() else "exited", module)


def _watch(w: WorkerProcess) -> None:
    """While the prestarted worker waits for its first session, send it every module of this
    process that defines an autotuned kernel, as the server imports them."""
    from tunevault.engine.hints import loaded_kernel_modules

    seen: set[str] = set()
    end = time.monotonic() + WATCH_S
    while time.monotonic() < end and _worker is w and w.alive() and not w.opened:
        try:
            hint_imports(loaded_kernel_modules(seen))
        except Exception as exc:  # never let learning break tuning
            log.debug("tunevault: learning the kernels' modules failed: %s", exc)
            return
        time.sleep(WATCH_EVERY)


def prestart(manifest: str | None = None, context: bool = False, key: str | None = None) -> None:
    """Start the worker now, in the background, so its start-up (imports, about 5 s on a GPU host)
    overlaps the server's own instead of delaying the first tuning. A tuning that arrives before
    it is ready waits for it rather than starting a second one. The worker then imports the
    kernels' modules while the server starts: those a key ``manifest`` of an earlier run names,
    and those the server itself imports meanwhile (engine.hints). ``context``: the server will tune
    in it at start-up, so it also creates its CUDA context now (see worker.prepare). ``key``: the
    installed ``bundle_key``; a manifest it refuses names no module."""
    holding = threading.Event()
    generation = _generation

    def run() -> None:
        global _retire_when_free
        with _lock:
            holding.set()
            if _worker is not None and _worker.alive():
                return
            try:
                w = spawn(worker_env(likely_device()), START_TIMEOUT)
                w.send({"op": "prepare", "idle": PRESTART_IDLE, "context": context})
            except WorkerDied as exc:
                log.debug("tunevault: prestarting the tuning worker failed: %s", exc)
                return
            if generation != _generation:  # uninstalled, or the warmup ended, meanwhile
                w.close()
                _retire_when_free = False
                return
            from tunevault.engine.hints import from_manifest

            hint_imports(from_manifest(manifest, key))
            _adopt(w)
        threading.Thread(target=_watch, args=(w,), name="tunevault-learn-imports", daemon=True).start()

    threading.Thread(target=run, name="tunevault-prestart", daemon=True).start()
    holding.wait(1.0)  # the lock is taken before install() returns, so no tuning races past it


def retire_idle(after_session: bool = False) -> None:
    """Close the worker unless a session is open (uninstall: nothing will use it any more).

    ``after_session``: a worker busy with a session is closed as soon as that session ends,
    rather than after its idle timeout (see :func:`warmup_ended`)."""
    global _generation, _worker, _retire_when_free
    _generation += 1
    if not _lock.acquire(blocking=False):
        _retire_when_free = after_session  # else a tuning or a prestart holds it: it idles out by itself
        return
    try:
        if _worker is not None and not _worker.opened:
            _worker.close()
            _worker = None
        else:
            _retire_when_free = after_session
    finally:
        _lock.release()


def warmup_ended() -> None:
    """Warmup is over (``seal()``, the end of ``warmup()``): the worker exits now, releasing its
    device memory, instead of idling for ``TUNEVAULT_WORKER_IDLE`` seconds; that idle timeout is
    for misses at serving time, which start a worker again."""
    retire_idle(after_session=True)


def retire(kill: bool = False) -> None:
    global _worker
    with _lock:
        if _worker is not None:
            if kill:
                _drop_stalled_hint(_worker)
            _worker.kill() if kill else _worker.close()
            _worker = None


def worker_pid() -> int | None:
    """The pid of the live worker, if any (tests and diagnostics)."""
    w = _worker
    return w.pid if w is not None and w.alive() else None


def _at_exit() -> None:
    """No lock here: a daemon thread may hold it mid-tuning, and exit must not wait for that."""
    w = _worker
    if w is not None:
        w.close()


atexit.register(_at_exit)


def _forget_in_child() -> None:
    """A fork copies this module but not its threads or its worker. A tuning thread's hold on
    ``_lock`` would make every isolated tuning of the child wait until its deadline, and the
    parent's worker answers the parent (its reader threads are not here): the child starts its own,
    and lets go of its copies of the parent's pipes (holding the input's write end would keep the
    parent's worker from seeing its input close)."""
    global _lock, _hint_lock, _worker, _retire_when_free
    _lock, _hint_lock = threading.RLock(), threading.Lock()
    stale, _worker, _retire_when_free = _worker, None, False
    if stale is not None:
        stale.disown()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class WorkerSession:
    """The engine's Session protocol, carried out by the worker, resuming after every fault."""

    where = "worker"

    def __init__(self, target: str, digest: str, callspec: dict[str, Any], specs: dict[int, ConfigSpec],
                 deadline: float, config_timeout: float,
                 on_launches: Callable[[int], None] | None = None) -> None:
        device = device_index(callspec)
        self.callspec = pin(callspec) if device is not None else callspec
        self.env = worker_env(device)
        self.target, self.digest, self.specs = target, digest, specs
        self.deadline, self.config_timeout, self.on_launches = deadline, config_timeout, on_launches
        self.sid = next(_sids)
        self.reference: int | None = None
        self.locked = False
        self.raised: tuple[int, str] | None = None  # a config's error stock lets reach the caller
        self.faulted: dict[int, CandidateResult] = {}  # configs that crashed or hung the worker
        self.singly = False  # a batch was poisoned by a sticky device error: one config per run since

    def _left(self) -> float:
        return self.deadline - time.monotonic()

    def start(self) -> None:
        """Open the session on a worker; IsolationUnavailable means "tune in process instead"."""
        if not _lock.acquire(timeout=max(0.0, self._left())):
            raise IsolationUnavailable("the worker stayed busy until the tuning deadline")
        self.locked = True
        try:
            self._ready(first=True)
        except BaseException:  # whatever went wrong, the lock goes with it: it guards every isolated tuning
            self.close()
            raise

    def _ready(self, first: bool = False) -> WorkerProcess:
        try:
            w = _acquire_worker(self.env, max(1.0, self._left()), first)
            if self.sid not in w.opened:
                _hold_hints(w, True)
                w.send({"op": "open", "sid": self.sid, "kernel": self.target, "digest": self.digest,
                        "callspec": self.callspec, "idle": idle_timeout()})
                ev = self._await_open(w)
                if ev["ev"] == "fatal":
                    raise IsolationUnavailable(ev.get("message", "the worker refused the kernel"))
                w.opened.add(self.sid)
            return w
        except Unencodable as exc:  # the call, not the worker: tune it in process
            raise IsolationUnavailable(f"its call cannot be sent to the worker ({exc})") from exc
        except (WorkerDied, queue.Empty) as exc:
            retire(kill=True)
            reason = f"the worker did not start: {str(exc) or 'no answer in time'}"
            raise IsolationUnavailable(reason) if first else WorkerDied(reason) from exc

    def _await_open(self, w: WorkerProcess) -> dict[str, Any]:
        """The answer to "open" (its import of the kernel may take long); ``queue.Empty`` once it
        is late, or as soon as an import hinted before it has stalled the worker ``config_timeout``."""
        end = time.monotonic() + min(self._left(), START_TIMEOUT)
        while True:
            try:
                return w.wait_for(("opened", "fatal"), max(0.0, min(1.0, end - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= end or w.stalled_importing(self.config_timeout):
                    raise

    def precompile(self, indices: Sequence[int]) -> None:
        try:
            w = self._ready()
            from tunevault.engine.context import compile_cores

            threads = min(16, compile_cores())  # the worker shares this process's cores
            w.send({"op": "precompile", "sid": self.sid, "configs": list(indices), "threads": threads})
            # Every compile gets config_timeout, in rounds of `threads`; and at most half the time
            # left, so a worker stalled here leaves the runs (which compile too) time to go on.
            rounds = math.ceil(len(indices) / max(1, threads))
            w.wait_for(("precompiled",), max(0.0, min(self._left() / 2, self.config_timeout * rounds)))
        except (WorkerDied, queue.Empty) as exc:  # best effort: the per-config runs will compile
            log.debug("tunevault: precompile in the worker failed (%s); replacing it", exc)
            retire(kill=True)

    def validate(self, indices: Sequence[int], reference: int | None = None) -> dict[int, str | None]:
        return {i: r.error for i, r in self._run("validate", indices).items()}

    def time(self, indices: Sequence[int], effort: str) -> dict[int, CandidateResult]:
        return self._run(effort, indices)

    def _fail(self, index: int, why: str) -> CandidateResult:
        return CandidateResult(index, self.specs[index], (), why[:500])

    def _run(self, mode: str, indices: Sequence[int]) -> dict[int, CandidateResult]:
        """Run ``indices`` in the worker, resuming after each fault (a worker that stalls is replaced);
        WorkerStalled when in the end the worker, not a config, kept them from running (it did not
        begin the run, or no worker could be had, until the strikes or the deadline ran out)."""
        pending, strikes, last = list(indices), 0, ""
        out: dict[int, CandidateResult] = {}
        stuck = 0  # failures in a row of the worker itself: not started, or not beginning the run
        while pending and strikes < 3 and self._left() > 0:
            batch = pending[:1] if self.singly else list(pending)  # one at a time once a batch was poisoned
            try:
                w = self._ready()
                w.send({"op": "run", "sid": self.sid, "mode": mode, "configs": batch,
                        "idle": idle_timeout(), "reference": self.reference if mode == "validate" else None})
            except (WorkerDied, IsolationUnavailable) as exc:
                strikes, last, stuck = strikes + 1, f"no worker could be had: {exc}", stuck + 1
                continue
            progressed, last, began = self._collect(w, batch, out, mode)
            pending = [i for i in pending if i not in out]
            stuck = 0 if began else stuck + 1
            strikes = 0 if progressed else strikes + 1
            if self.raised is not None:
                index, error = self.raised
                raise TuningError(f"{self.target}: config #{index} {self.specs[index].describe()} raised "
                                  f"{error} in the tuning worker; stock Triton raises it from the call")
        if pending and stuck:
            raise WorkerStalled(last, dict(self.faulted))
        why = f"worker keeps failing: {last}"
        if self._left() <= 0:
            why = "timeout: tuning exceeded tune_timeout"
        for i in pending:
            out[i] = self._fail(i, why)
        return out

    def _collect(self, w: WorkerProcess, pending: list[int], out: dict[int, CandidateResult],
                 mode: str) -> tuple[bool, str, bool]:
        """Read events until done or a fault: (whether some config finished, what went wrong,
        whether the worker began the run at all).

        Validating, the first config that passes is the reference from the moment its result
        arrives: a worker that replaces one killed later in the batch compares with it too.

        A config announced several times (each run of a CPU batch) has ``config_timeout`` for all
        of its runs together, as when it runs alone."""
        current, progressed, heard = None, False, False
        spent: dict[int, float] = {}  # seconds each config has run in this worker so far
        while True:
            used = spent.get(current, 0.0) if current is not None else 0.0
            budget = self.config_timeout - used
            limit = min(budget, self._left())
            began = time.monotonic()
            try:
                ev = w.next_event(max(0.0, limit))
            except queue.Empty:
                retire(kill=True)
                what = "tune_timeout" if limit < budget else "config_timeout"
                if not heard:  # it never began the run: a stall of its own, no config's
                    return False, f"the worker did not begin the run within {limit:.1f}s", False
                if current is not None:
                    out[current] = self.faulted[current] = self._fail(
                        current, f"timeout: no result within {used + limit:.1f}s ({what}); worker replaced")
                    pending.remove(current)
                    log.warning("tunevault: %s: config %s hung in the worker; killed it after %.1fs",
                                self.target, self.specs[current].describe(), used + limit)
                return current is not None or progressed, f"no answer within {limit:.1f}s", True
            except WorkerDied:
                reason = w.exit_reason()
                retire(kill=True)
                if current is not None:
                    out[current] = self.faulted[current] = self._fail(
                        current, f"worker died ({reason}) while running this config")
                    pending.remove(current)
                    log.warning("tunevault: %s: config %s killed the tuning worker (%s); continuing "
                                "without it", self.target, self.specs[current].describe(), reason)
                return current is not None or progressed, f"worker died ({reason})", heard
            if current is not None:
                spent[current] = used + time.monotonic() - began
            heard = True
            kind = ev.get("ev")
            if kind == "start":  # index None: every config of a batch has run once
                current = ev.get("index") if ev.get("index") in pending else None
            elif kind == "result" and ev.get("index") in pending:
                index, result = ev["index"], self._result(ev)
                out[index] = result
                pending.remove(index)
                current, progressed = None, True
                if mode == "validate" and self.reference is None and result.error is None:
                    self.reference = index
                if isinstance(ev.get("raised"), str) and result.error is not None:
                    self.raised = (index, result.error)  # "done" follows: read up to it
            elif kind == "poisoned":  # a sticky device error in a batch, blamed on no config
                retire(kill=True)
                if not self.singly:
                    self.singly = True
                    log.warning("tunevault: %s: a config left the tuning worker's device unusable; timing "
                                "the configs one at a time to find it", self.target)
                return True, "a config left the device unusable", True
            elif kind in ("done", "fatal"):
                why = f"worker error: {ev.get('message')}" if kind == "fatal" else "the worker skipped it"
                for i in list(pending):
                    out[i] = self._fail(i, why)
                pending.clear()
                return True, "", True

    def _result(self, ev: dict[str, Any]) -> CandidateResult:
        index, timings, error = ev["index"], ev.get("timings") or [], ev.get("error")
        if self.on_launches is not None and isinstance(ev.get("launches"), int):
            self.on_launches(ev["launches"])
        if not isinstance(timings, list) or not all(isinstance(t, int | float) and t >= 0 for t in timings):
            return self._fail(index, "the worker sent invalid timings")
        if error is not None:
            return self._fail(index, str(error))
        n, iqr = ev.get("n", 0), ev.get("iqr")
        finite = iqr is None or isinstance(iqr, int | float) and math.isfinite(iqr) and iqr >= 0
        if not (type(n) is int and n >= 0 and finite):
            n, iqr = 0, None  # noise unknown: the candidate ties by tolerance alone
        return CandidateResult(index, self.specs[index], tuple(float(t) for t in timings), None, n,
                               None if iqr is None else float(iqr), scalar=ev.get("scalar") is True)

    def close(self) -> None:
        global _retire_when_free
        if not self.locked:
            return
        w = _worker
        if w is not None and self.sid in w.opened and w.alive():
            with contextlib.suppress(WorkerDied):
                w.send({"op": "close", "sid": self.sid})
            w.opened.discard(self.sid)
        if w is not None and w.holding:
            _hold_hints(w, False)  # the imports hinted meanwhile go now, after the close
        if _retire_when_free and w is not None and not w.opened:  # warmup ended during this session
            _retire_when_free = False
            retire()
        self.locked = False
        _lock.release()
