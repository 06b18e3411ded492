"""Key capture: record every key a process resolves, with the ArgSpec to replay it.

Two feeds: the runtime's observers (a key resolved on the miss path: hit in the store, tuned,
or missed) and, only while capturing, a hook the adapter calls on in-memory hits, which costs
one dict lookup and two increments per active recorder. Every active recorder is fed: each
``capture()`` block and the settings' (``TUNEVAULT_CAPTURE``) one, so the server-wide manifest
also holds keys first met inside a block. Counts are flushed as manifest lines periodically, at
exit and when :func:`capture` ends; a forked child starts counting afresh.

The runtime sits above this layer: it hands itself over as a :class:`Host` at every
(re)installation (``on_install``), and recording attaches through that, never by importing it.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from tunevault.capture import manifest
from tunevault.capture.locate import importable_name

if TYPE_CHECKING:
    from tunevault.core.kernel_state import KernelState
    from tunevault.core.model import TuningKey

log = logging.getLogger("tunevault")

_KIND = {"hit": 0, "tuned": 1, "missed": 2}  # index into _Record.counts, in manifest.OUTCOMES order
_lock = threading.RLock()
_stack: list[Recorder] = []  # capture() recorders, innermost last
_from_settings: Recorder | None = None  # TUNEVAULT_CAPTURE / install(capture=...)
_hooks_registered = False
_host: Host | None = None  # the installed runtime's side of key capture (integration.activation)


class Host(Protocol):
    """What key capture needs from the runtime it records for."""

    def installed(self) -> bool:
        """Whether tunevault is installed now (keys are resolved by it)."""
        ...

    def sign_key(self) -> str | None:
        """The installed settings' ``bundle_key``, which capture signs lines with."""
        ...

    def attach(self, recorders: Sequence[Recorder]) -> None:
        """Feed every one of ``recorders`` (none: capture is off) from the runtime's observers and
        in-memory hits (``hit_hook``)."""
        ...


class _Record:
    __slots__ = ("kernel", "key", "callspec", "error", "counts", "flushed", "first", "last", "spec_written",
                 "digest")

    def __init__(self, kernel: str, key: TuningKey, callspec: dict | None, error: str | None,
                 digest: str | None = None) -> None:
        self.kernel, self.key, self.callspec, self.error = kernel, key, callspec, error
        self.digest = digest  # the called kernel's identity: replay must not take another autotuner over it
        self.counts = [0, 0, 0]
        self.flushed = [0, 0, 0]
        self.first = self.last = time.time()
        self.spec_written = False


def _typed(state: KernelState, raw_key: tuple) -> tuple[KernelState, tuple, tuple]:
    """What the recorder counts a call under: its raw key and the types of the key's elements."""
    return (state, raw_key, tuple(map(type, raw_key)))


class Recorder:
    """Counts keys for one manifest path and appends them to it."""

    def __init__(self, path: str | os.PathLike[str], flush_interval: float = 10.0,
                 sign_key: str | bytes | None = None) -> None:
        self.path = os.fspath(path)
        self.flush_interval = flush_interval
        self.sign_key = sign_key  # TUNEVAULT_BUNDLE_KEY: every line is signed, as bundles are
        self._records: dict[tuple[str, str], _Record] = {}
        # By raw key and the types of its elements: the raw key holds True == 1 and 64 == 64.0, which
        # the labelled key (and Triton's compilation) tells apart, so each is a key of its own here.
        self._by_raw: dict[tuple[KernelState, tuple, tuple], tuple[_Record, int]] = {}
        self._left_out: set[tuple[KernelState, tuple, tuple]] = set()  # keys decided by rule: nothing to warm up
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False
        self._dropped = False  # count-only lines dropped near the size cap (warned once)
        self._lost: set[tuple[str, str]] = set()  # new keys refused at the size cap, each named once
        self.host = socket.gethostname()

    # ------------------------------------------------------------------ feeds

    def hit(self, state: KernelState, raw_key: tuple, args: tuple, kwargs: dict[str, Any]) -> None:
        """The adapter's hot-path hook: a call whose raw key was already in the in-memory dict."""
        try:
            typed = _typed(state, raw_key)
            found = self._by_raw.get(typed)
            if found is None and typed in self._left_out:
                return
            if found is None:
                found = self._learn(typed, args, kwargs, "missed" if state.serves_fallback(args, kwargs) else "hit")
            rec, idx = found
            rec.counts[idx] += 1
            rec.last = time.time()
        except Exception as exc:  # capture must never break a kernel call
            self._warn(exc)

    def observe(self, kind: str, state: KernelState, key: TuningKey, args: tuple | None, kwargs: dict | None) -> None:
        """Runtime observer: a key resolved on the miss path as ``hit`` / ``tuned`` / ``missed``, or
        by ``rule`` (pruning left one config: not recorded, now or on later calls)."""
        if kind == "rule" and args is not None:
            with self._lock:
                self._left_out.add(_typed(state, state.raw_key(args, kwargs or {})))
            return
        idx = _KIND.get(kind)
        if idx is None:
            return
        raw = state.raw_key(args, kwargs or {}) if args is not None else None
        with self._lock:
            rec = self._record(state, key, args, kwargs)
            if raw is not None:  # later calls with this raw key hit the dict: count them alike
                self._by_raw[_typed(state, raw)] = (rec, _KIND["missed"] if kind == "missed" else _KIND["hit"])
            rec.counts[idx] += 1
            rec.last = time.time()
        self._ensure_thread()

    def _learn(self, typed: tuple[KernelState, tuple, tuple], args: tuple, kwargs: dict[str, Any], kind: str,
               ) -> tuple[_Record, int]:
        state = typed[0]
        key = state.labelled_key(state.named_args(args, kwargs))
        with self._lock:
            found = (self._record(state, key, args, kwargs), _KIND[kind])
            self._by_raw[typed] = found
        self._ensure_thread()
        return found

    def _record(self, state: KernelState, key: TuningKey, args: tuple | None, kwargs: dict | None) -> _Record:
        # The attribute that holds this very kernel (an alias of the jit function's name, or one of
        # several autotuners over it), so replay imports the kernel that was called.
        kernel = importable_name(state.autotuner) or state.kernel_id.name
        rec = self._records.get((kernel, key.text))
        if rec is None:
            spec, err = None, None
            if args is None:
                err = "arguments not available when the key was recorded"
            else:
                from tunevault.capture.argspec import CallSpec

                try:
                    spec = CallSpec.of(state.autotuner, args, kwargs or {}).to_json()
                except Exception as exc:
                    err = f"{type(exc).__name__}: {exc}"[:300]
            rec = self._records[(kernel, key.text)] = _Record(kernel, key, spec, err, state.kernel_id.digest)
        elif rec.callspec is None and args is not None:
            with contextlib.suppress(Exception):
                from tunevault.capture.argspec import CallSpec

                rec.callspec, rec.error = CallSpec.of(state.autotuner, args, kwargs or {}).to_json(), None
        return rec

    # ------------------------------------------------------------------ output

    def flush(self, final: bool = True) -> int:
        """Append one line per key counted since the last flush; returns how many lines.

        A key's first line is written at once; after it, the periodic flush (``final=False``)
        writes a count-only line only when the key's count has doubled since its last one, so a
        busy key costs O(log calls) lines, not one per flush; the final flush writes every count."""
        with self._lock:
            pid, done = os.getpid(), []
            new: list[str] = []
            more: list[str] = []
            for rec in self._records.values():
                counts = list(rec.counts)
                delta = [c - f for c, f in zip(counts, rec.flushed, strict=True)]
                if not any(delta):  # nothing counted since the last flush (or, in a forked child, the fork)
                    continue
                if rec.spec_written and not final and sum(counts) < 2 * sum(rec.flushed):
                    continue  # a count-only line waits until the count doubles, or the final flush
                try:
                    (more if rec.spec_written else new).append(
                        self._line(rec, dict(zip(manifest.OUTCOMES, delta, strict=True)), pid))
                except Exception as exc:  # this record's problem only: its counts wait, the others are written
                    self._warn(exc)
                    continue
                done.append((rec, counts))
            try:
                counted = manifest.append(self.path, new, more)
            except (OSError, ValueError) as exc:  # ValueError: not a regular file (a FIFO would block exit)
                self._refused(exc, [rec for rec, _ in done if not rec.spec_written])
                return 0
            if not counted and not self._dropped:
                self._dropped = True
                log.warning("tunevault: key capture: %s is near the %d MiB a manifest may hold: count-only lines "
                            "are dropped from now on (keys met for the first time are still written); capture "
                            "into a new file", self.path, manifest.MAX_MANIFEST_BYTES >> 20)
            for rec, counts in done:
                rec.flushed, rec.spec_written = counts, True
            return len(new) + (len(more) if counted else 0)

    def _refused(self, exc: BaseException, new: list[_Record]) -> None:
        """A write refused: the counts wait for the next flush. Keys met for the first time that the
        manifest cannot take (its size cap) are named, loudly, once each: warmup will not cover them."""
        lost = [rec for rec in new if (rec.kernel, rec.key.text) not in self._lost]
        if isinstance(exc, OSError) and exc.errno == errno.EFBIG and lost:
            self._lost.update((rec.kernel, rec.key.text) for rec in lost)
            log.error("tunevault: key capture: %s is full (%d MiB): %d key(s) met for the first time are NOT "
                      "recorded, so warmup will not cover them: %s; capture into a new file", self.path,
                      manifest.MAX_MANIFEST_BYTES >> 20, len(lost),
                      "; ".join(f"{rec.kernel} [{rec.key.describe()}]" for rec in lost)[:4000])
            return
        self._warn(exc)

    def _line(self, rec: _Record, counted: dict[str, int], pid: int) -> str:
        """``rec``'s manifest line; a captured call that cannot be written becomes its callspec_error."""
        spec, error = (None, None) if rec.spec_written else (rec.callspec, rec.error)
        try:
            return manifest.line(rec.kernel, rec.key, counted, rec.first, rec.last, pid, self.host, spec, error,
                                 self.sign_key, rec.digest)
        except (TypeError, ValueError) as exc:
            if spec is None:
                raise
            rec.callspec, rec.error = None, f"the captured call cannot be written: {type(exc).__name__}: {exc}"[:300]
            return manifest.line(rec.kernel, rec.key, counted, rec.first, rec.last, pid, self.host, None, rec.error,
                                 self.sign_key, rec.digest)

    def close(self) -> None:
        self._stop.set()
        self.flush()

    def _ensure_thread(self) -> None:
        if self._thread is None and self.flush_interval > 0 and not self._stop.is_set():
            self._thread = threading.Thread(target=self._loop, name="tunevault-capture", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_interval):
            try:
                self.flush(final=False)
            except Exception as exc:  # the thread outlives one bad flush: later ones may succeed
                self._warn(exc)

    def _after_fork(self) -> None:
        """In a forked child: the parent owns what was counted so far, and writes it; count afresh
        from here, so the child writes only keys it meets itself. An ArgSpec the parent already
        wrote is not repeated (readers take it from any line of the key)."""
        self._lock = threading.RLock()
        for rec in self._records.values():
            rec.flushed = list(rec.counts)
        self._thread = None
        if not self._stop.is_set():
            self._ensure_thread()

    def _warn(self, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning("tunevault: key capture to %s failed: %s", self.path, exc)


# ---------------------------------------------------------------------- activation


def _feeding() -> list[Recorder]:
    """The recorders to feed, innermost first: one per manifest file, so that a block capturing
    into the settings' file (or a nested block into its outer one's) does not count calls twice."""
    seen: set[str] = set()
    fed = []
    for rec in reversed(_recorders()):
        where = os.path.realpath(rec.path)
        if where not in seen:
            seen.add(where)
            fed.append(rec)
    return fed


def hit_hook(recorders: Sequence[Recorder]) -> Callable[[KernelState, tuple, tuple, dict[str, Any]], None] | None:
    """The adapter's in-memory-hit hook for ``recorders``: None when there is none (the hot path then
    checks nothing), the recorder's own ``hit`` when there is one, else a loop over them."""
    if not recorders:
        return None
    if len(recorders) == 1:
        return recorders[0].hit
    hits = tuple(rec.hit for rec in recorders)

    def hit_all(state: KernelState, raw_key: tuple, args: tuple, kwargs: dict[str, Any]) -> None:
        for hit in hits:
            hit(state, raw_key, args, kwargs)

    return hit_all


def _attach() -> None:
    """Point the runtime's observers and the adapter's hit hook at every active recorder."""
    if _host is not None:
        _host.attach(_feeding())


def _register_hooks() -> None:
    global _hooks_registered
    if not _hooks_registered:
        _hooks_registered = True
        atexit.register(_flush_all)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_all)


def _recorders() -> list[Recorder]:
    """Every active recorder, outermost (the settings') first."""
    return [*([_from_settings] if _from_settings is not None else []), *_stack]


def _flush_all() -> None:
    for rec in _recorders():
        try:
            rec.close()
        except Exception as exc:  # at exit: the other recorders still flush, and no traceback
            rec._warn(exc)


def _after_fork_all() -> None:
    for rec in _recorders():
        rec._after_fork()


class CaptureSettings(Protocol):
    """The settings key capture follows (policy.settings.Settings, a layer above capture)."""

    @property
    def capture(self) -> str | None: ...

    @property
    def bundle_key(self) -> str | None: ...


def on_install(settings: CaptureSettings, host: Host) -> None:
    """Called after (re)installation: follow ``settings.capture`` and re-attach the active recorder."""
    global _from_settings, _host
    with _lock:
        _host = host
        wanted = settings.capture
        if _from_settings is not None and _from_settings.path != wanted:
            _from_settings.close()
            _from_settings = None
        if wanted and _from_settings is None:
            _register_hooks()
            _from_settings = Recorder(wanted, sign_key=settings.bundle_key)
        _attach()


def on_uninstall() -> None:
    """Called after uninstallation: the settings' capture ends with them; ``capture()`` blocks live on."""
    global _from_settings
    with _lock:
        if _from_settings is not None:
            _from_settings.close()
            _from_settings = None
        _attach()


def _sign_key(installed: str | None) -> str | None:
    """The installed runtime's key, else ``$TUNEVAULT_BUNDLE_KEY``: capture signs whenever one is set."""
    if installed is not None:
        return installed
    from tunevault.store.bundle import key_from_env

    return key_from_env()


@contextlib.contextmanager
def capture(path: str | os.PathLike[str], flush_interval: float = 10.0) -> Iterator[Recorder]:
    """Record every key resolved inside the block to the manifest at ``path`` (JSON lines, appended)."""
    installed = _host is not None and _host.installed()
    if not installed:
        log.warning("tunevault: capture(%s): tunevault is not installed, so no key is resolved by it yet; "
                    "call tunevault.install() first", os.fspath(path))
    rec = Recorder(path, flush_interval, _sign_key(_host.sign_key() if installed and _host is not None else None))
    with _lock:
        _register_hooks()
        _stack.append(rec)
        _attach()
    try:
        yield rec
    finally:
        with _lock:
            _stack.remove(rec)
            _attach()
        rec.close()
