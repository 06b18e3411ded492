"""An in-process store: the fallback when no persistent store can be opened, and for tests.

It keeps the same semantics as the persistent stores (first writer wins, leases with a
time to live) so code above it cannot tell the difference except for persistence.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from tunevault.core.model import Decision
from tunevault.store.base import Query

StoreKey = tuple[str, str, str]
EVERYTHING = Query()  # shared default: Query is frozen, so one instance is safe


class MemoryStore:
    """A dict behind a lock. Leases use ``time.monotonic`` since they never leave the process."""

    url = "memory://"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decisions: dict[StoreKey, Decision] = {}
        self._leases: dict[str, tuple[str, float]] = {}

    def get(self, kernel_digest: str, fingerprint_digest: str, key_text: str) -> Decision | None:
        with self._lock:
            return self._decisions.get((kernel_digest, fingerprint_digest, key_text))

    def put(self, decision: Decision) -> Decision:
        """Publish unless present; the first decision published for a key is the one kept."""
        with self._lock:
            return self._decisions.setdefault(decision.store_key, decision)

    def supersede(self, stale: Decision, decision: Decision) -> Decision:
        """Replace ``stale`` with a re-tuned ``decision`` unless another one replaced it first."""
        with self._lock:
            current = self._decisions.get(decision.store_key)
            if current is not None and current != stale:
                return current
            self._decisions[decision.store_key] = decision
            return decision

    def overwrite(self, decision: Decision) -> Decision:
        """Store ``decision`` whatever is there (a LayeredStore adopting its fleet's decision)."""
        with self._lock:
            self._decisions[decision.store_key] = decision
            return decision

    def decisions(self, query: Query = EVERYTHING) -> Iterator[Decision]:
        with self._lock:  # snapshot, so callers may delete while iterating
            matched = [d for d in self._decisions.values() if query.matches(d)]
        yield from matched

    def delete(self, query: Query = EVERYTHING) -> int:
        with self._lock:
            doomed = [k for k, d in self._decisions.items() if query.matches(d)]
            for k in doomed:
                del self._decisions[k]
            return len(doomed)

    def count(self) -> int:
        with self._lock:
            return len(self._decisions)

    def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take the lease if free, expired or already ours (then renew it)."""
        now = time.monotonic()
        with self._lock:
            current = self._leases.get(name)
            if current is not None and current[0] != holder and current[1] > now:
                return False
            self._leases[name] = (holder, now + ttl_s)
            return True

    def lease_holder(self, name: str) -> str | None:
        with self._lock:
            current = self._leases.get(name)
        return current[0] if current is not None and current[1] > time.monotonic() else None

    def leases(self, prefix: str) -> dict[str, str]:
        """The live leases whose name starts with ``prefix``: name -> holder."""
        now = time.monotonic()
        with self._lock:
            return {n: h for n, (h, expires) in self._leases.items() if n.startswith(prefix) and expires > now}

    def release(self, name: str, holder: str) -> None:
        """Release only if ``holder`` still holds it: a late release must not free a successor's lease."""
        with self._lock:
            current = self._leases.get(name)
            if current is not None and current[0] == holder:
                del self._leases[name]

    def close(self) -> None:
        """Nothing to release; kept for the protocol."""
