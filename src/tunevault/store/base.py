"""The one small interface every store implements, and URL-based selection.

Stores are selected by URL like httpx transports: ``sqlite:///relative/path.db`` or
``sqlite:////absolute/path.db`` (SQLAlchemy's forms), ``memory://``, ``redis://host:port/0``.
A store validates everything it reads: a malformed entry is a miss plus a warning, never an
exception into a kernel call.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tunevault.core.model import Decision

log = logging.getLogger("tunevault")


@dataclass(frozen=True)
class Query:
    """Filters for listing or deleting decisions; ``None`` matches everything."""

    kernel: str | None = None  # substring of the kernel's qualified name
    kernel_digest: str | None = None
    fingerprint_digest: str | None = None
    key_text: str | None = None

    def matches(self, d: Decision) -> bool:
        return (
            (self.kernel is None or self.kernel in d.kernel.name)
            and (self.kernel_digest is None or self.kernel_digest == d.kernel.digest)
            and (self.fingerprint_digest is None or self.fingerprint_digest == d.fingerprint.digest)
            and (self.key_text is None or self.key_text == d.key.text)
        )


@runtime_checkable
class Store(Protocol):
    url: str

    def get(self, kernel_digest: str, fingerprint_digest: str, key_text: str) -> Decision | None:
        """The published decision, or None (also for a corrupt entry, with a warning)."""

    def put(self, decision: Decision) -> Decision:
        """Publish unless one exists (first writer wins); return the published decision."""

    def decisions(self, query: Query = Query()) -> Iterator[Decision]:
        """Every valid decision matching ``query``; corrupt rows are skipped with a warning."""

    def delete(self, query: Query = Query()) -> int:
        """Remove matching decisions; return how many."""

    def count(self) -> int: ...

    def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew the tuning lease ``name``; False while another live holder has it."""

    def release(self, name: str, holder: str) -> None: ...

    def lease_holder(self, name: str) -> str | None:
        """Who holds the live lease ``name`` (the holder text as given), or None."""

    def close(self) -> None: ...


def supersede(store: Store, stale: Decision, decision: Decision) -> Decision:
    """Replace a stored entry that names no declared config (``stale``) with a re-tuned decision.

    First writer wins everywhere else; this is the one exception, and only for an entry that can
    never be launched. Compare-and-swap: returns the decision the store holds afterwards."""
    replace: Callable[[Decision, Decision], Decision] | None = getattr(store, "supersede", None)
    if replace is None:
        return store.put(decision)
    return replace(stale, decision)


def overwrite(store: Store, decision: Decision) -> Decision:
    """Store ``decision`` over whatever ``store`` holds for its key; returns it.

    First writer wins within one store; this is for a local store adopting the decision its
    fleet's remote holds (LayeredStore), which outranks the host's own. A store without an
    ``overwrite`` method gets a delete of that one key and a put."""
    write: Callable[[Decision], Decision] | None = getattr(store, "overwrite", None)
    if write is not None:
        return write(decision)
    kd, fd, kt = decision.store_key
    store.delete(Query(kernel_digest=kd, fingerprint_digest=fd, key_text=kt))
    return store.put(decision)


def key_lease_name(prefix: str, kernel_digest: str, fingerprint_digest: str, key_text: str) -> str:
    """A lease name per store key (``prefix`` says what it is for: a tuning, an unpublished mark):
    bounded in length, whatever the key's text."""
    return f"{prefix}{kernel_digest}:{fingerprint_digest}:{hashlib.sha256(key_text.encode()).hexdigest()[:32]}"


# The password in a URL's userinfo (scheme://user:PASSWORD@host) or in a ``password=`` query argument
# (redis-py reads both); the netloc ends at the first '/', '?', '#' or blank.
_USERINFO_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s:@]*:)[^/?#\s]*@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#\s]*", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with every store URL's password in it replaced by ``***``: store URLs reach logs,
    ``tunevault info`` and JSON reports, and a Redis URL may carry the server's password."""
    return _QUERY_PASSWORD.sub(r"\1***", _USERINFO_PASSWORD.sub(r"\1***@", text))


def shown(store: object) -> str:
    """A store's URL as messages show it (password masked); its repr when it has no URL."""
    return redact(str(getattr(store, "url", None) or repr(store)))


class StoreUnavailable(RuntimeError):
    """The store cannot be opened or reached; callers degrade to memory with one warning."""


def open_store(url: str) -> Store:
    """Open the store a URL names; raises StoreUnavailable or ValueError for a bad URL."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"store URL {redact(url)!r} has no scheme; use sqlite:////abs/path.db, memory:// or "
                         "redis://host:port/db")
    if scheme == "memory":
        from tunevault.store.memory import MemoryStore

        return MemoryStore()
    if scheme == "sqlite":
        from tunevault.store.sqlite import SqliteStore
        from tunevault.store.sqlite_file import path_of_url

        return SqliteStore(path_of_url(url))
    if scheme in ("redis", "rediss", "unix"):
        from tunevault.store.redis import RedisStore

        return RedisStore(url)
    raise ValueError(f"unknown store scheme {scheme!r} in {redact(url)!r}")
