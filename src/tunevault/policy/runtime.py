"""The process-wide state behind the adapter: settings, store, caches, counters, events.

The store is opened lazily on the first miss, so a process that never misses never touches
the disk; an unusable store degrades to memory with one warning.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Any

from tunevault.core.events import EventLog, Stats
from tunevault.core.forks import renewed_in_child
from tunevault.core.model import ConfigSpec, Decision, Fingerprint, KernelId, TuningKey
from tunevault.policy.fallback import Predictions
from tunevault.policy.settings import Settings
from tunevault.store.base import Query, Store, redact

if TYPE_CHECKING:
    from tunevault.core.kernel_state import KernelState

log = logging.getLogger("tunevault")
# Runtime.read_again waits out a store's backoff up to this long: its first pause after a failure
# (RedisStore's BACKOFF_S[0], 1 s), not the longer ones of a store that keeps failing.
REREAD_WAIT_S = 2.0


def _capturing() -> bool:
    """A CUDA graph capture is in progress (policy.capture_guard's probe), read without importing
    torch where nothing imported it."""
    from tunevault.policy.capture_guard import capturing

    return capturing()


class Runtime:
    """Everything a miss needs: settings, the store (opened on the first miss), decisions seen,
    counters, events, observers. ``warm_up(runtime, manifest)`` runs ``TUNEVAULT_WARMUP``'s
    manifest at the first miss; the integration layer, which replays manifests, hands it in."""

    def __init__(self, settings: Settings, warm_up: Callable[[Runtime, str], None] | None = None) -> None:
        self.settings = settings
        self.warm_up = warm_up
        self.closed = False
        # uninstall() is waiting for this runtime's background jobs: one waiting for another
        # process's lease gives up (policy.lease) rather than hold uninstall() or tune after it
        self.stopping = False
        self._on_miss = settings.on_miss
        self._warming = threading.local()  # the threads replaying a warmup: they tune, whatever the seal says
        self.sealed = False
        # (in-memory hits, fallback hits) of each kernel at the seal: set by seal()
        self.hits_at_seal: weakref.WeakKeyDictionary[KernelState, tuple[int, int]] | None = None
        # key capture's counter of in-memory hits (the adapter's hit hook), for hits the miss path serves
        self.hit_hook: Callable[[KernelState, tuple, tuple, dict[str, Any]], None] | None = None
        self.stats = Stats()
        self.events = EventLog(settings.events)
        self._store: Store | None = None
        self._fingerprint: Fingerprint | None = None
        # held while the store opens and for the damage check: a fork meanwhile must not leave it held
        self._lock = renewed_in_child(self, "_lock", threading.RLock)
        self._warned: set[Hashable] = set()
        self._damage: str | None = None
        self.decided: dict[tuple[str, str, str], Decision] = {}
        # Decisions the store did not take (a failed write, or a store that fell back to memory), and
        # why: a warmup must not count them as decided, since no other process or restart sees them.
        self.unpublished: dict[tuple[str, str, str], str] = {}
        self.store_fell_back = False
        # (kernel digest, key text) of keys pruning left one config for: launched untimed, never stored
        self.by_rule: set[tuple[str, str]] = set()
        self.used: dict[tuple[str, str], Decision] = {}  # (kernel name, key text) -> decision launched
        # (kernel name, key text) -> (declared index, config) a fallback launched: verify_agreement compares it
        self.fallbacks: dict[tuple[str, str], tuple[int, ConfigSpec]] = {}
        # (kernel name, key text) -> why its stored decision was not launched, for the miss diagnosis
        self.ignored: dict[tuple[str, str], str] = {}
        # e.g. key capture; called as observer(kind, state, key, args, kwargs)
        self.observers: list[Callable[[str, KernelState, TuningKey, tuple | None, dict | None], None]] = []
        self.predictions = Predictions()  # configs for missed keys, predicted from decided neighbours
        self.pending_warmup = settings.warmup if settings.mode == "tune" else None  # TUNEVAULT_WARMUP

    @property
    def on_miss(self) -> str:
        """What a miss does on this thread: the seal's policy, except on a thread replaying a warmup."""
        return "tune" if self.warming_here() else self._on_miss

    @on_miss.setter
    def on_miss(self, policy: str) -> None:
        self._on_miss = policy

    @property
    def phase(self) -> str:
        return "warmup" if self.warming_here() or not self.sealed else "serving"

    def warming_here(self) -> bool:
        return getattr(self._warming, "depth", 0) > 0

    @contextlib.contextmanager
    def warming(self) -> Iterator[None]:
        """This thread replays a warmup: its misses tune and count as warmup, while request threads
        keep the seal's policy (a warmup never unseals the process, and a seal meanwhile stands)."""
        self._warming.depth = getattr(self._warming, "depth", 0) + 1
        try:
            yield
        finally:
            self._warming.depth -= 1

    @property
    def fingerprint(self) -> Fingerprint:
        """This process's fingerprint now: it follows a codegen knob or variable set after the first
        tuning (``current_fingerprint`` caches it under a snapshot of them). Read on misses only."""
        if self._fingerprint is not None:  # pinned by whoever set it
            return self._fingerprint
        from tunevault.core.identity import current_fingerprint

        return current_fingerprint()

    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                self._store = self._open_store()
            return self._store

    def _open_store(self) -> Store:
        try:
            from tunevault.store.layered import open_layered

            return open_layered(self.settings.store, self.settings.remote, self.settings.bundles,
                                self.settings.bundle_key)
        except Exception as exc:  # nothing a store, a bundle or a file holds may raise into a kernel call
            from tunevault.store.memory import MemoryStore

            self.warn_once(("store", self.settings.store),
                           "tunevault: store %s is unusable (%s); keeping decisions in memory for this process",
                           redact(self.settings.store), redact(str(exc)))
            self.store_fell_back = True
            return MemoryStore()

    def warn_once(self, token: Hashable, msg: str, *args: Any) -> bool:
        with self._lock:
            if token in self._warned:
                return False
            self._warned.add(token)
        log.warning(msg, *args)
        return True

    def take_pending_warmup(self) -> str | None:
        """The ``TUNEVAULT_WARMUP`` manifest not yet warmed up, claimed by the caller (once per process)."""
        with self._lock:
            path, self.pending_warmup = self.pending_warmup, None
        return path

    def lookup(self, kernel: KernelId, key: TuningKey) -> Decision | None:
        if self.pending_warmup is not None and not _capturing():  # the first miss warms the manifest up
            path = self.take_pending_warmup()
            if path is not None and self.warm_up is not None:
                self.warm_up(self, path)
        skey = (kernel.digest, self.fingerprint.digest, key.text)
        found = self.decided.get(skey)
        if found is not None:
            return found
        try:
            found = self.store.get(*skey)
        except Exception as exc:  # a store must never crash a kernel call
            self.warn_once(("get", type(exc)), "tunevault: store read failed (%s); treating as a miss", exc)
            return None
        if found is not None:
            self.decided[skey] = found
        return found

    def publish(self, decision: Decision) -> Decision:
        """Store ``decision`` unless another process published first; return the one to use."""
        try:
            published = self.store.put(decision)
        except Exception as exc:
            self.warn_once(("put", type(exc)), "tunevault: store write failed (%s); decision kept in memory", exc)
            published = decision
            self.unpublished[published.store_key] = f"store write failed: {exc}"
        self.decided[published.store_key] = published
        self.predictions.invalidate(published.kernel.digest)
        return published

    def published(self, kernel: KernelId, key: TuningKey) -> bool:
        """Whether this process's decision for the key reached the store (others and restarts see it)."""
        skey = (kernel.digest, self.fingerprint.digest, key.text)
        return not self.store_fell_back and skey not in self.unpublished

    def unpublished_why(self, kernel: KernelId, key: TuningKey) -> str:
        """Why the key's decision is not in the store, in words that stand alone (a ``--jobs``
        child's warnings do not reach its parent; the report's reason does)."""
        if self.store_fell_back:
            return f"the store {redact(self.settings.store)} is unusable; decisions are kept in memory"
        skey = (kernel.digest, self.fingerprint.digest, key.text)
        return self.unpublished.get(skey, "")

    def read_again(self, kernel: KernelId, key: TuningKey) -> Decision | None:
        """The store's decision for a key whose write failed, read once more (one read, not the
        in-memory copy): a write that timed out may have been applied all the same (a Redis paused
        mid-write runs the SET NX it was sent when it resumes). A store backing off after the failure
        refuses reads for a while: a short pause (``REREAD_WAIT_S``) is waited out, a longer one is
        not. Where it holds a decision, that is the key's decision here too, and it counts as published."""
        if self.store_fell_back:
            return None
        store = self.store
        remote = getattr(store, "remote", None) or store  # a layered store's remote, else the store
        wait = float(getattr(remote, "retry_in", 0.0))
        if wait > REREAD_WAIT_S:
            return None
        if wait > 0:
            time.sleep(wait)
        skey = (kernel.digest, self.fingerprint.digest, key.text)
        try:
            found = store.get(*skey)
        except Exception as exc:
            log.debug("tunevault: reading %s [%s] again failed: %s", kernel.name, key.describe(), exc)
            return None
        if found is not None:
            self.unpublished.pop(skey, None)
            self.decided[skey] = found
            self.predictions.invalidate(kernel.digest)
        return found

    def supersede(self, stale: Decision, decision: Decision) -> None:
        """The store holds ``stale``, which names a config the kernel does not declare: replace it
        with ``decision`` (just tuned here), so the key is not re-tuned after every restart."""
        from tunevault.store.base import supersede

        try:
            supersede(self.store, stale, decision)
            log.info("tunevault: %s [%s]: replaced a stored decision naming an undeclared config #%d",
                     decision.kernel.name, decision.key.describe(), stale.config_index)
        except Exception as exc:
            self.warn_once(("supersede", type(exc)), "tunevault: could not replace a stored decision naming an "
                           "undeclared config (%s); the new decision is kept in memory", exc)
            self.unpublished[decision.store_key] = f"could not replace a stored decision naming an undeclared " \
                                                   f"config: {exc}"
        self.decided[decision.store_key] = decision

    def decided_by_rule(self, kernel: KernelId, key: TuningKey) -> bool:
        """Whether pruning left this key one config in this process (nothing to tune)."""
        return (kernel.digest, key.text) in self.by_rule

    def forget_fallback(self, state: KernelState, args: tuple, kwargs: dict[str, Any]) -> None:
        """A key this process served with a fallback config is about to be tuned for real (a
        warmup): drop the fallback from the in-memory dict and from the autotuner's ``cache``, where
        the miss path would find it first and never decide the key."""
        from tunevault.policy.stock import forget, stock_key

        with state.lock:
            key = stock_key(state.arg_names, state.keys, args, kwargs)
            forget(state.autotuner, key)
            state.fallback_keys.discard(key)
            state.hits.clear()  # every raw key of the key (keywords in any order) decides it again

    def explain_miss(self, kernel: KernelId, key: TuningKey) -> tuple[str, TuningKey | None]:
        """The miss message (policy.diagnose) and the nearest decided key. With no key of ``kernel``
        decided here, the store's decisions under its name say why: another version of the kernel,
        or another machine's fingerprint (and what differs)."""
        from tunevault.policy.diagnose import NONE_HERE, explain_miss, none_here

        decided = self.decided_keys(kernel)
        none = NONE_HERE
        if not decided:
            try:
                none = none_here(kernel, self.fingerprint, list(self.store.decisions(Query(kernel=kernel.name))))
            except Exception as exc:
                self.warn_once(("list", type(exc)), "tunevault: store listing failed (%s)", exc)
        return explain_miss(kernel.short_name, key, decided, self.ignored.get((kernel.name, key.text)), none)

    def decided_keys(self, kernel: KernelId) -> list[TuningKey]:
        """Every key of ``kernel`` decided for this fingerprint (for miss diagnosis)."""
        return [d.key for d in self.decisions_of(kernel)]

    def decisions_of(self, kernel: KernelId) -> list[Decision]:
        """Every decision of ``kernel`` for this fingerprint, this process's first (for predictions)."""
        fp = self.fingerprint.digest
        found = {d.key.text: d for d in self.decided.values()
                 if d.kernel.digest == kernel.digest and d.fingerprint.digest == fp}
        try:
            for d in self.store.decisions(Query(kernel_digest=kernel.digest, fingerprint_digest=fp)):
                found.setdefault(d.key.text, d)
        except Exception as exc:
            self.warn_once(("list", type(exc)), "tunevault: store listing failed (%s)", exc)
        return list(found.values())

    def damage_note(self) -> str:
        """``"; the tuning store ... is damaged ..."`` for a miss message, or ``""``.

        A damaged SQLite file reads as missing decisions; a miss must say so. Checked once per
        process (SQLite's quick_check), on the first miss that is explained.
        """
        with self._lock:
            if self._damage is None:
                try:
                    check = getattr(self.store, "integrity_problems", None)
                    problems = check() if check is not None else []
                except Exception as exc:
                    problems = [f"integrity check failed: {exc}"]
                self._damage = (f"; the tuning store {self.settings.store} is damaged ({problems[0]}): "
                                f"run `tunevault --store {self.settings.store} doctor`") if problems else ""
            return self._damage

    def late_hit(self, state: KernelState, raw_key: tuple, args: tuple, kwargs: dict[str, Any]) -> None:
        """A call that waited for the kernel's lock found its key decided meanwhile: key capture
        counts it as the hot path's hook counts any in-memory hit."""
        hook = self.hit_hook
        if hook is not None:
            try:
                hook(state, raw_key, args, kwargs)
            except Exception as exc:
                self.warn_once(("hit_hook", type(exc)), "tunevault: key capture failed: %s", exc)

    def notify(self, kind: str, state: KernelState, key: TuningKey, args: tuple | None, kwargs: dict | None) -> None:
        """Tell observers (key capture) how a key was resolved; an observer never breaks a call."""
        for observer in list(self.observers):
            try:
                observer(kind, state, key, args, kwargs)
            except Exception as exc:
                self.warn_once(("observer", type(exc)), "tunevault: observer failed: %s", exc)

    def submit_background(self, state: KernelState, args: tuple, kwargs: dict[str, Any], key: TuningKey) -> None:
        """Queue ``key`` for tuning off the request path (policy.background); inside a CUDA graph
        capture the job holds the arguments and reads them once captures are over."""
        from tunevault.policy.background import submit

        submit(self, state, args, kwargs, key, during_capture=_capturing())

    def close(self) -> None:
        self.closed = self.stopping = True  # background jobs queued for this runtime are dropped (policy.background)
        with self._lock:
            if self._store is not None:
                try:
                    self._store.close()
                finally:
                    self._store = None
