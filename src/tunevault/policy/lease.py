"""One tuning per key fleet-wide: take the key's lease before benchmarking, or wait for its decision.

Agreement comes from the store, not from a collective: the holder benchmarks and publishes (first
writer wins), everyone else polls the store for the decision and adopts it. Nothing waits for a
peer that may never come: a holder that dies stops renewing, its lease expires and a waiter takes
over; a waiter that waited ``lease_wait`` seconds tunes by itself, with a warning. A process that
exits normally (``sys.exit``, the end of its script, an exception) releases the leases it still
holds; one killed by a signal's default action (SIGTERM, SIGKILL) leaves them to expire.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

from tunevault.store.base import key_lease_name, shown

if TYPE_CHECKING:
    from tunevault.policy.runtime import Runtime
    from tunevault.store.base import Store

log = logging.getLogger("tunevault")

T = TypeVar("T")
POLL_S = (0.02, 0.5)  # first and longest pause between looks at the store while waiting
_taken_here = threading.local()  # .names: leases this thread took itself (sharded warmup) and holds now
EXIT_WAIT_S = 5.0  # the longest interpreter exit waits to release the leases still held


def lease_name(kernel_digest: str, fingerprint_digest: str, key_text: str) -> str:
    return key_lease_name("tune:", kernel_digest, fingerprint_digest, key_text)


def new_holder() -> str:
    """Unique per tuning attempt, readable in the store: host, pid and a nonce."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Held:
    """A lease this process took and has not released: renewed and released under one lock, so
    a renewal never takes back a lease released meanwhile (at exit: ``_release_at_exit``)."""

    __slots__ = ("store", "name", "holder", "what", "pid", "lock", "released", "reopened")

    def __init__(self, store: Store, name: str, holder: str, what: str,
                 reopened: Callable[[], Store | None] | None = None) -> None:
        self.store, self.name, self.holder, self.what = store, name, holder, what
        self.pid, self.lock, self.released = os.getpid(), threading.Lock(), False
        self.reopened = reopened  # the store to release through where ``store`` closed meanwhile

    def renew(self, ttl_s: float) -> bool:
        """Extend the lease; True once released (nothing left to lose)."""
        with self.lock:
            return self.released or self.store.try_lease(self.name, self.holder, ttl_s)

    def release(self) -> None:
        """Best effort, once: an unreleased lease simply expires."""
        with self.lock:
            if self.released:
                return
            self.released = True
            try:
                (self.reopened and self.reopened() or self.store).release(self.name, self.holder)
            except Exception as exc:
                log.debug("tunevault: releasing the lease for %s failed (%s); it expires by itself", self.what, exc)


_held: dict[int, Held] = {}  # id -> a lease this process holds now
_held_lock = threading.Lock()
_exiting = False  # the interpreter is exiting: a lease taken from now on is released at once


@contextmanager
def kept(store: Store, name: str, holder: str, what: str,
         reopened: Callable[[], Store | None] | None = None) -> Iterator[Held]:
    """Hold the lease ``name`` (just taken by ``holder``) for the block, then release it; if the
    interpreter exits first (a daemon thread dropped mid-tuning), exit releases it."""
    held = Held(store, name, holder, what, reopened)
    with _held_lock:
        _held[id(held)] = held
        late = _exiting
    try:
        if late:
            held.release()
        yield held
    finally:
        with _held_lock:
            _held.pop(id(held), None)
        held.release()


def _release_at_exit() -> None:
    """Release what this process still holds, so the next process tunes those keys at once instead
    of waiting for ``lease_ttl``. Bounded: a store that does not answer leaves them to expire."""
    global _exiting
    with _held_lock:
        _exiting = True
        held = [h for h in _held.values() if h.pid == os.getpid()]
    if not held:
        return

    def release_all() -> None:
        for h in held:
            h.release()

    try:
        worker = threading.Thread(target=release_all, name="tunevault-lease-exit", daemon=True)
        worker.start()
    except RuntimeError:  # an interpreter that starts no thread at exit: release here
        release_all()
        return
    worker.join(EXIT_WAIT_S)


def _forget_in_child() -> None:
    """A forked child holds none of its parent's leases (their holder names the parent's pid)."""
    global _held_lock, _exiting
    _held_lock, _exiting = threading.Lock(), False
    _held.clear()


atexit.register(_release_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class Heartbeat:
    """Renews a lease every third of its time to live while the holder works."""

    def __init__(self, held: Held, ttl_s: float) -> None:
        self.held, self.ttl = held, ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="tunevault-lease", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def _beat(self) -> None:
        lost = False
        while not self._stop.wait(self.ttl / 3):
            try:
                held = self.held.renew(self.ttl)
            except Exception as exc:
                log.debug("tunevault: lease renewal for %s failed: %s", self.held.what, exc)
                continue
            if not held and not lost:
                lost = True
                log.warning("tunevault: lost the tuning lease for %s (renewal came after it expired); "
                            "another process may tune it too, and the first decision published is kept",
                            self.held.what)


@contextmanager
def taken_here(name: str) -> Iterator[None]:
    """Tell ``under_lease`` on this thread that ``name`` needs no taking: this thread already tunes
    that key (holding its lease, or done waiting for its holder); taking it would wait on ourselves."""
    names: set[str] = _taken_here.__dict__.setdefault("names", set())
    names.add(name)
    try:
        yield
    finally:
        names.discard(name)


@contextmanager
def holding(held: Held, ttl_s: float) -> Iterator[None]:
    """While this thread works under a lease it took itself: renew it; ``under_lease`` skips it."""
    with taken_here(held.name), Heartbeat(held, ttl_s):
        yield


class Abandoned(Exception):
    """A background job waiting for another process's lease gave up: tunevault is uninstalling
    (``Runtime.stopping``), and that process's decision is the key's anyway."""


def _abandon(rt: Runtime, what: str) -> None:
    from tunevault.engine.context import in_background

    if rt.stopping and in_background():
        raise Abandoned(f"{what}: no longer waited for: tunevault is being uninstalled")


def under_lease(rt: Runtime, name: str, what: str, lookup: Callable[[], T | None], work: Callable[[], T]) -> T:
    """``work()`` under the lease ``name``, unless a decision appears (``lookup()``) first.

    ``what`` names the kernel and key in messages. Store failures never block: without a usable
    lease the process tunes by itself, exactly as it would with no store at all.
    """
    if name in _taken_here.__dict__.get("names", ()):  # the sharded warmup took it for this very tuning
        found = lookup()
        return found if found is not None else work()
    store, settings = rt.store, rt.settings
    holder, ttl = new_holder(), settings.lease_ttl
    deadline = time.monotonic() + settings.lease_wait
    pause, waited = POLL_S[0], False
    while True:
        try:
            taken = store.try_lease(name, holder, ttl)
        except Exception as exc:
            _abandon(rt, what)  # the store closed under a job uninstall() stopped: not "no leases here"
            rt.warn_once(("lease", type(exc)), "tunevault: cannot take tuning leases in %s (%s); tuning "
                         "without one", shown(store), exc)
            return work()
        if taken:
            break
        _abandon(rt, what)
        if not waited:
            waited = True
            log.info("tunevault: %s is being tuned by another process; waiting up to %.0f s for its decision",
                     what, settings.lease_wait)
        found = lookup()
        if found is not None:
            log.info("tunevault: %s: adopted the decision another process published", what)
            return found
        if time.monotonic() >= deadline:
            log.warning("tunevault: %s: no decision after waiting %.0f s for the process tuning it "
                        "(lease_wait); tuning here too, the first decision published is the one kept",
                        what, settings.lease_wait)
            return work()
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())) * random.uniform(0.8, 1.2))
        pause = min(pause * 2, POLL_S[1])
    # Where the runtime closed while this tuning ran (uninstall(), a re-install), ``store`` closed
    # with it: the lease goes back through the store the runtime opens for what its in-flight work
    # still writes (the tuning's decision was published there), not left to linger for its ttl.
    with kept(store, name, holder, what, lambda: rt.store if rt.closed else None) as held:
        found = lookup()  # published while we were taking the lease (the holder just finished)
        if found is not None:
            return found
        with Heartbeat(held, ttl):
            return work()
