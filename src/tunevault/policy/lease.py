"""One tuning per key fleet-wide: take the key's lease before benchmarking, or wait for its decision.

Agreement comes from the store, not from a collective: the holder benchmarks and publishes (first
writer wins), everyone else polls the store for the decision and adopts it. Nothing waits for a
peer that may never come: a holder that dies stops renewing, its lease expires and a waiter takes
over; a waiter that waited ``lease_wait`` seconds tunes by itself, with a warning.
"""

from __future__ import annotations

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


def lease_name(kernel_digest: str, fingerprint_digest: str, key_text: str) -> str:
    return key_lease_name("tune:", kernel_digest, fingerprint_digest, key_text)


def new_holder() -> str:
    """Unique per tuning attempt, readable in the store: host, pid and a nonce."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Heartbeat:
    """Renews a lease every third of its time to live while the holder works."""

    def __init__(self, store: Store, name: str, holder: str, ttl_s: float, what: str) -> None:
        self.store, self.name, self.holder, self.ttl, self.what = store, name, holder, ttl_s, what
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
                held = self.store.try_lease(self.name, self.holder, self.ttl)
            except Exception as exc:
                log.debug("tunevault: lease renewal for %s failed: %s", self.what, exc)
                continue
            if not held and not lost:
                lost = True
                log.warning("tunevault: lost the tuning lease for %s (renewal came after it expired); "
                            "another process may tune it too, and the first decision published is kept",
                            self.what)


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
def holding(store: Store, name: str, holder: str, ttl_s: float, what: str) -> Iterator[None]:
    """While this thread works under a lease it took itself: renew it; ``under_lease`` skips it."""
    with taken_here(name), Heartbeat(store, name, holder, ttl_s, what):
        yield


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
            rt.warn_once(("lease", type(exc)), "tunevault: cannot take tuning leases in %s (%s); tuning "
                         "without one", shown(store), exc)
            return work()
        if taken:
            break
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
    try:
        found = lookup()  # published while we were taking the lease (the holder just finished)
        if found is not None:
            return found
        with Heartbeat(store, name, holder, ttl, what):
            return work()
    finally:
        _release(rt, store, name, holder, what)


def _release(rt: Runtime, store: Store, name: str, holder: str, what: str) -> None:
    """Give the lease back. Where the runtime closed while this tuning ran (``uninstall()``, a
    re-install), ``store`` closed with it: release through the store the runtime opens for what its
    in-flight work still writes (the tuning's decision was published there), or the lease would
    linger for its time to live with a warning that it could not be released."""
    try:
        (rt.store if rt.closed else store).release(name, holder)
    except Exception as exc:
        log.debug("tunevault: releasing the lease for %s failed (%s); it expires by itself", what, exc)
