"""Compose the stores the settings name into the one the runtime reads and writes.

Reads go local -> remote -> bundles (the runtime's memory dict sits above all three); a remote
hit is copied into local so the next process on the host needs no network. Writes go remote
first, so the first writer fleet-wide wins and everyone adopts its decision, then local.
A remote that fails is skipped with one warning and retried after its own backoff: the local
store keeps serving, and nothing a remote does raises into a kernel call. Decisions written
only locally meanwhile are remembered, and marked in the local store (``store/unpublished.py``)
so that a process exiting during the outage leaves them to the next one on the host; they are
published once the remote answers again. Whenever the remote turns out to hold another decision
for a key, the local entry is replaced by it, so every host ends up with the fleet's first writer.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from tunevault.core.model import Decision, Fingerprint
from tunevault.store import unpublished
from tunevault.store.base import Query, Store, StoreUnavailable, log, open_store, overwrite, redact, shown, supersede

T = TypeVar("T")
EVERYTHING = Query()
StoreKey = tuple[str, str, str]
PENDING_CAP = 1024  # decisions kept to publish per LayeredStore while the remote is down; more stay local
PUBLISH_BUDGET_S = 1.0  # the most one call spends publishing them (the remote's deadline, when it has one)


class LayeredStore:
    """A writable local store, an optional shared remote, and read-only bundles under both."""

    def __init__(self, local: Store, remote: Store | None = None, bundles: Sequence[Store] = ()) -> None:
        self.local, self.remote, self.bundles = local, remote, tuple(bundles)
        # For messages only (nothing reopens a LayeredStore by its URL): passwords masked.
        self.url = " + ".join(describe_layers(self))
        self._lock = threading.Lock()
        self._remote_down = False
        self._outages = 0
        # Written locally while the remote failed: key -> (the entry it supersedes, if any; the decision).
        self._pending: dict[StoreKey, tuple[Decision | None, Decision]] = {}
        self._marks: dict[StoreKey, unpublished.Mark] = {}  # the local store's marks of pending keys
        self._recovered = False  # whether the marks earlier processes left were read (once the remote answers)
        self._dropped = False  # the pending set was full (warned once until it empties)
        self._publishing = threading.Lock()  # one thread publishes the pending set; the others do not wait

    # -- the remote, guarded -----------------------------------------------------------------

    def _remote(self, what: str, fn: Callable[[Store], T], default: T) -> T:
        """``fn(remote)``, or ``default`` when there is none or it fails (warned once per outage)."""
        if self.remote is None:
            return default
        try:
            result = fn(self.remote)
        except Exception as exc:  # a remote must never break or stall a kernel call
            self._remote_failed(what, exc)
            return default
        if self._remote_down and getattr(self.remote, "available", True):  # a swallowed failure is no answer
            with self._lock:
                self._remote_down = False
            log.info("tunevault: remote store %s answers again", shown(self.remote))
        return result

    def _remote_failed(self, what: str, exc: Exception) -> None:
        with self._lock:
            if self._remote_down:
                return
            self._remote_down = True
            self._outages += 1
            first = self._outages == 1
        level = logging.WARNING if first else logging.INFO
        log.log(level, "tunevault: remote store unusable (%s failed: %s); serving from the local store %s "
                "until it answers again", what, exc, shown(self.local))

    @property
    def remote_down(self) -> bool:
        return self._remote_down

    # -- decisions the remote missed ---------------------------------------------------------

    @property
    def pending(self) -> int:
        """How many decisions were written only locally and wait for the remote to answer again."""
        return len(self._pending)

    def _defer(self, decision: Decision, stale: Decision | None = None) -> None:
        """The remote failed to take ``decision`` (which replaces ``stale``, if given): publish it
        later, from this process or, through its mark in the local store, the next one on the host."""
        skey = decision.store_key
        with self._lock:
            marked = skey in self._marks
            if skey in self._pending:  # a newer local write for a key the remote never got
                self._pending[skey] = (self._pending[skey][0], decision)
                return
            kept = len(self._pending) < PENDING_CAP
            if kept:
                self._pending[skey] = (stale, decision)
            warn = not kept and not self._dropped
            self._dropped = self._dropped or not kept
        if not marked and (mark := unpublished.leave(self.local, skey, stale)) is not None and kept:
            with self._lock:
                self._marks[skey] = mark
        if warn:
            log.warning("tunevault: %d decisions already wait for the remote store %s to answer again; "
                        "newer ones stay in the local store %s until a process there finds it answering",
                        PENDING_CAP, shown(self.remote), shown(self.local))

    def _recover(self) -> None:
        """Take over the decisions earlier processes on this host wrote during an outage and left
        marked (once per store; called while publishing, so by one thread)."""
        self._recovered = True
        for mark in unpublished.found(self.local):
            with self._lock:
                if mark.store_key in self._pending:  # written here meanwhile: publish it under this mark
                    self._marks.setdefault(mark.store_key, mark)
                    continue
                if len(self._pending) >= PENDING_CAP:  # the next process takes the rest
                    break
            try:
                local = self.local.get(*mark.store_key)
            except Exception as exc:
                log.debug("tunevault: reading %s for an unpublished mark: %s", shown(self.local), exc)
                continue
            if local is None:  # removed since (``tunevault rm``): nothing to publish
                unpublished.clear(self.local, mark)
                continue
            with self._lock:
                self._pending.setdefault(mark.store_key, (mark.stale, local))
                self._marks.setdefault(mark.store_key, mark)

    def _publish_pending(self, first: StoreKey | None = None, recover: bool = True) -> None:
        """Publish what was written only locally while the remote failed, ``first`` first, once the
        remote may answer (its backoff is over); adopt the fleet's decision where it holds another.
        With ``recover``, first take over what earlier processes on the host left marked.

        Bounded like any remote call: the first failure stops it (the remote then backs off, so it
        costs at most one deadline), and one call spends at most about one deadline on it."""
        recover = recover and not self._recovered
        if (not recover and not self._pending) or self.remote is None \
                or not getattr(self.remote, "available", True):
            return
        if not self._publishing.acquire(blocking=False):
            return  # another thread is publishing them
        try:
            if recover and not self._recovered:
                self._recover()
            budget = float(getattr(self.remote, "deadline", PUBLISH_BUDGET_S))
            until = time.monotonic() + budget
            while time.monotonic() < until:
                with self._lock:
                    if not self._pending:
                        self._dropped = False
                        return
                    skey = first if first in self._pending else next(iter(self._pending))
                    first = None
                    stale, mine = self._pending.pop(skey)
                fleet = self._remote("publish", functools.partial(_write_to, stale=stale, decision=mine), None)
                if fleet is None:  # still unusable: keep it (unless a newer write took its place)
                    with self._lock:
                        self._pending.setdefault(skey, (stale, mine))
                    return
                if fleet != mine:
                    self._adopt(fleet, mine)
                with self._lock:
                    mark = self._marks.pop(skey, None) if skey not in self._pending else None
                if mark is not None:
                    unpublished.clear(self.local, mark)
        finally:
            self._publishing.release()

    def _adopt(self, fleet: Decision, local: Decision) -> None:
        """The remote holds ``fleet`` where the local store holds ``local``: the fleet's wins here too."""
        try:
            overwrite(self.local, fleet)
        except Exception as exc:
            log.warning("tunevault: %s [%s]: the local store %s holds config #%d but the fleet chose #%d; "
                        "using the fleet's, but the local entry could not be replaced (%s)", fleet.kernel.name,
                        fleet.key.describe(), shown(self.local), local.config_index, fleet.config_index, exc)
            return
        log.warning("tunevault: %s [%s]: the local store %s held config #%d but the fleet chose #%d; "
                    "replaced it with the fleet's", fleet.kernel.name, fleet.key.describe(), shown(self.local),
                    local.config_index, fleet.config_index)

    # -- the Store protocol ------------------------------------------------------------------

    def get(self, kernel_digest: str, fingerprint_digest: str, key_text: str) -> Decision | None:
        skey = (kernel_digest, fingerprint_digest, key_text)
        self._publish_pending(skey)  # a local decision the fleet never got may have lost to another host's
        found = self.local.get(*skey)
        if found is not None:
            return found
        found = self._remote("read", lambda r: r.get(*skey), None)
        if found is not None:
            try:
                self.local.put(found)  # the next process on this host reads it without the network
            except Exception as exc:
                log.debug("tunevault: could not copy a remote decision into %s: %s", shown(self.local), exc)
            return found
        for bundle in self.bundles:
            found = bundle.get(*skey)
            if found is not None:
                return found
        return None

    def put(self, decision: Decision) -> Decision:
        """Remote first: if another host published first, its decision is the one kept everywhere
        (the local entry included). Without the remote, the local store's, published later."""
        return self._write(decision)

    def supersede(self, stale: Decision, decision: Decision) -> Decision:
        """Replace ``stale`` where it is stored (remote first, then local, which also shadows a bundle)."""
        return self._write(decision, stale)

    def _write(self, decision: Decision, stale: Decision | None = None) -> Decision:
        """``put`` (``stale`` None) or ``supersede``: remote first, and what the fleet keeps is kept
        locally too; without the remote, the local store's, published once it answers again."""
        self._publish_pending(decision.store_key)
        published = self._remote("publish" if stale is None else "supersede",
                                 functools.partial(_write_to, stale=stale, decision=decision), None)
        if published is None:
            local = _write_to(self.local, stale, decision)  # raises if it fails too: the runtime keeps it in memory
            if self.remote is not None:
                self._defer(local, stale)
            return local
        try:
            local = _write_to(self.local, stale, published)
        except Exception:
            return published
        if local != published:
            self._adopt(published, local)
        return published

    def decisions(self, query: Query = EVERYTHING) -> Iterator[Decision]:
        """Each key once, from the highest layer that has it."""
        seen: set[tuple[str, str, str]] = set()
        layers: list[Callable[[], list[Decision]]] = [lambda: list(self.local.decisions(query))]
        layers.append(lambda: self._remote("list", lambda r: list(r.decisions(query)), []))
        layers += [functools.partial(_listed, b, query) for b in self.bundles]
        for layer in layers:
            for d in layer():
                if d.store_key not in seen:
                    seen.add(d.store_key)
                    yield d

    def delete(self, query: Query = EVERYTHING) -> int:
        """Delete from local and remote (bundles are read-only); returns the larger of the two counts."""
        with self._lock:  # a deleted decision is not published later
            marks = []
            for skey in [k for k, (_, d) in self._pending.items() if query.matches(d)]:
                del self._pending[skey]
                marks += [m for m in (self._marks.pop(skey, None),) if m is not None]
        for mark in marks:
            unpublished.clear(self.local, mark)
        n_local = self.local.delete(query)
        return max(n_local, self._remote("delete", lambda r: r.delete(query), 0))

    def count(self) -> int:
        return sum(1 for _ in self.decisions())

    def integrity_problems(self) -> list[str]:
        """The local store's own integrity check, where it has one (SQLite)."""
        check = getattr(self.local, "integrity_problems", None)
        return check() if check is not None else []

    def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """On the remote when it answers (one tuning fleet-wide), else on the local store (one per host)."""
        if self.remote is not None:
            taken = self._remote("lease", lambda r: r.try_lease(name, holder, ttl_s), None)
            if taken is not None:
                return taken
        return self.local.try_lease(name, holder, ttl_s)

    def lease_holder(self, name: str) -> str | None:
        """From wherever ``try_lease`` would take it: the remote when it answers, else the local store."""
        if self.remote is not None:
            found = self._remote("lease", lambda r: (r.lease_holder(name),), None)
            if found is not None:
                return found[0]
        return self.local.lease_holder(name)

    def release(self, name: str, holder: str) -> None:
        """Release wherever it was taken: both releases are compare-and-delete, so this is safe."""
        if self.remote is not None:
            self._remote("release", lambda r: r.release(name, holder), None)
        self.local.release(name, holder)

    def close(self) -> None:
        try:
            # the last chance for this process's decisions the remote missed (bounded as ever); what
            # earlier processes left marked waits for a process that uses the store
            self._publish_pending(recover=False)
        except Exception as exc:
            log.debug("tunevault: publishing pending decisions at close: %s", exc)
        for store in (self.local, self.remote, *self.bundles):
            if store is not None:
                try:
                    store.close()
                except Exception as exc:
                    log.debug("tunevault: closing %s: %s", shown(store), exc)

    def __repr__(self) -> str:
        return f"LayeredStore({self.url})"


def _write_to(store: Store, stale: Decision | None, decision: Decision) -> Decision:
    """``store.put(decision)`` (first writer wins), or with ``stale`` its supersede; what it holds."""
    return store.put(decision) if stale is None else supersede(store, stale, decision)


def _listed(store: Store, query: Query) -> list[Decision]:
    return list(store.decisions(query))


def open_bundles(paths: Sequence[str], key: str | None, current: Fingerprint | None = None) -> list[Store]:
    """Every bundle that loads and verifies; a rejected one is logged as an error and skipped."""
    from tunevault.store.bundle import BundleError, BundleStore

    out: list[Store] = []
    for path in paths:
        try:
            bundle = BundleStore(path, key)
        except BundleError as exc:
            log.error("tunevault: %s; continuing without it", exc)
            continue
        except Exception as exc:  # whatever a bundle holds, it costs that bundle, never a kernel call
            log.error("tunevault: tuning bundle %s refused (%s: %s); continuing without it", path,
                      type(exc).__name__, str(exc)[:300])
            continue
        usable = bundle.count() if current is None else sum(
            1 for _ in bundle.decisions(Query(fingerprint_digest=current.digest)))
        if current is not None and bundle.count() and not usable:
            theirs = bundle.fingerprint or next(bundle.decisions()).fingerprint
            log.warning("tunevault: bundle %s was made for another environment (%s); its %d decisions will "
                        "not match here", path, theirs.differences(current) or "same fields", bundle.count())
        else:
            log.info("tunevault: loaded bundle %s: %d decisions, %d for this environment", path,
                     bundle.count(), usable)
        out.append(bundle)
    return out


def open_layered(store: str, remote: str | None = None, bundles: Sequence[str] = (),
                 bundle_key: str | None = None) -> Store:
    """The plain local store (URL ``store``) when nothing else is configured, else a LayeredStore
    over it, the ``remote`` store's URL and the read-only ``bundles`` (checked with ``bundle_key``).

    A remote that cannot be opened (no ``redis`` package, bad URL) is dropped with a warning; a
    local store that cannot be opened is replaced by memory when a remote or bundle remains.
    """
    remote_store: Store | None = None
    if remote and remote != store:
        try:
            remote_store = open_store(remote)
        except Exception as exc:  # a bad remote costs the remote layer, never the local store
            log.warning("tunevault: remote store %s not used: %s", redact(str(remote)), redact(str(exc)))
    opened: list[Store] = []
    if bundles:
        from tunevault.core.identity import current_fingerprint

        try:
            opened = open_bundles(bundles, bundle_key, current_fingerprint())
        except Exception as exc:  # bad bundles cost the bundle layers, never the local store
            log.error("tunevault: bundles %r not used (%s: %s); continuing without them", bundles,
                      type(exc).__name__, str(exc)[:300])
    try:
        local = open_store(store)
    except (StoreUnavailable, OSError, ValueError) as exc:
        if remote_store is None and not opened:
            raise StoreUnavailable(str(exc)) from exc  # the runtime degrades to memory, with a warning
        from tunevault.store.memory import MemoryStore

        log.warning("tunevault: local store %s is unusable (%s); keeping local decisions in memory", redact(store),
                    redact(str(exc)))
        local = MemoryStore()
    if remote_store is None and not opened:
        return local
    return LayeredStore(local, remote_store, opened)


def describe_layers(store: Store) -> list[str]:
    """The URLs of a store's layers, top first (for ``tunevault info``), passwords masked."""
    if isinstance(store, LayeredStore):
        remote = [store.remote] if store.remote else []
        return [shown(s) for s in (store.local, *remote, *store.bundles)]
    return [shown(store)]
