"""A fleet-wide store on Redis: one decision per key for every host that shares the server.

First writer wins by construction (``SET NX``), leases are ``SET NX PX`` with a compare-and-delete
release, payloads are the same validated JSON as everywhere else. The network is never trusted
to be there: short socket timeouts, no client-side retries, a deadline on every whole operation
(a server that trickles one valid byte per socket timeout never completes a read in time, so
per-read timeouts alone do not bound it), and after a failure or a missed deadline the store
backs off (fails fast without touching the network) instead of paying a timeout on every call.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from tunevault.core.model import Decision
from tunevault.store.base import Query, StoreUnavailable, log, redact

if TYPE_CHECKING:
    from types import ModuleType

T = TypeVar("T")
EVERYTHING = Query()
PREFIX = "tunevault:v1:"
SOCKET_TIMEOUT_S = 0.5
DEADLINE_S = 1.0  # one whole operation: connect, every round trip, every read (at least 2 socket timeouts)
BACKOFF_S = (1.0, 60.0)  # first and longest pause after a failure; doubles in between
SCAN_COUNT = 1000  # keys the server looks at per SCAN round trip while listing leases

# Renew when ours, else take when free: one round trip, atomic on the server.
_TAKE_LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if cur then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# Release only our own lease: a late release must not free a successor's.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Replace a corrupt entry only if nobody replaced it since we read it.
_SWAP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2]) return 1 end
return 0
"""


class DeadlinePassed(Exception):
    """An operation of many round trips saw its deadline pass between two of them."""


def _redis_module() -> ModuleType:
    try:
        import redis
    except ImportError:
        raise StoreUnavailable("the redis store needs the `redis` package: "
                               "pip install 'tunevault[redis]' (from a checkout: "
                               "pip install -e '.[redis]')") from None
    return redis


def entry_key(kernel_digest: str, fingerprint_digest: str, key_text: str) -> str:
    key_hash = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    return f"{PREFIX}{kernel_digest}:{fingerprint_digest}:{key_hash}"


def index_key(kernel_digest: str, fingerprint_digest: str) -> str:
    return f"{PREFIX}index:{kernel_digest}:{fingerprint_digest}"


INDEXES = PREFIX + "indexes"  # set of "kernel_digest:fingerprint_digest" pairs with an index


def _split_deadline(url: str) -> tuple[str, float | None]:
    """``?deadline=S`` is tunevault's, not redis-py's: take it out of the URL the client sees."""
    parts = urlsplit(url)
    if "deadline" not in parts.query:
        return url, None
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    values = [v for k, v in pairs if k == "deadline"]
    try:
        deadline = float(values[-1])
    except ValueError:
        raise StoreUnavailable(f"redis store URL: deadline must be a number of seconds, got {values[-1]!r}") from None
    if not 0 < deadline < 3600:
        raise StoreUnavailable(f"redis store URL: deadline must be in (0, 3600) seconds, got {deadline}")
    rest = urlencode([(k, v) for k, v in pairs if k != "deadline"])
    return parts._replace(query=rest).geturl(), deadline


def _check_db(url: str, where: str) -> None:
    """Refuse a database in the path that is not a number (``/abc``, a typo ``/1O``): redis-py
    ignores it and uses database 0, so the store would silently share another database."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return  # unix:// names its database in ?db=, which redis-py checks
    text = unquote(parts.path).replace("/", "")  # what redis-py parses
    try:
        int(text or "0")
    except ValueError:
        raise StoreUnavailable(f"bad redis store URL {where!r}: the database {text!r} after the host is not a "
                               "number (redis://host:6379/0 names database 0)") from None


class RedisStore:
    """Decisions and tuning leases on a Redis server named by ``redis://host:port/db``."""

    def __init__(self, url: str, timeout_s: float | None = None) -> None:
        redis = _redis_module()
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self._where = redact(url)
        timeout = SOCKET_TIMEOUT_S if timeout_s is None else timeout_s
        client_url, deadline = _split_deadline(url)
        _check_db(client_url, self._where)
        try:  # options in the URL's query (e.g. ?socket_timeout=2 across a WAN) override these
            self._client = redis.Redis.from_url(
                client_url, socket_timeout=timeout, socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0), health_check_interval=0)
        except (ValueError, TypeError, redis.RedisError) as exc:
            raise StoreUnavailable(f"bad redis store URL {self._where!r}: {redact(str(exc))}") from exc
        socket_timeout = self._client.connection_pool.connection_kwargs.get("socket_timeout") or timeout
        self.deadline = deadline or max(DEADLINE_S, 2 * float(socket_timeout))
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._pause = BACKOFF_S[0]
        self._warned: set[tuple[str, bytes | str | None]] = set()
        self._scripts = {name: self._client.register_script(src)
                         for name, src in (("take", _TAKE_LEASE), ("release", _RELEASE), ("swap", _SWAP))}

    # -- reachability ------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False while backing off after a failure: calls then fail fast without the network."""
        return time.monotonic() >= self._down_until

    @property
    def retry_in(self) -> float:
        """Seconds until the server is asked again (0 when available): a caller that must read once
        more after a failure (a timed-out write that may have been applied) waits that long first."""
        return max(0.0, self._down_until - time.monotonic())

    def _call(self, what: str, fn: Callable[[], T], hint: str = "") -> T:
        """Run one operation within ``self.deadline``; a failure or a missed deadline starts (or
        lengthens) the backoff and raises StoreUnavailable (``hint`` follows a missed deadline)."""
        now = time.monotonic()
        if now < self._down_until:
            raise StoreUnavailable(f"redis store {self._where} unreachable; retrying in "
                                   f"{self._down_until - now:.1f} s")
        expired = threading.Event()
        watchdog = threading.Timer(self.deadline, self._expire, (expired,))
        watchdog.daemon = True
        watchdog.start()
        try:
            result = fn()
        except Exception as exc:  # after the watchdog closed the socket, any error may surface
            watchdog.cancel()
            with self._lock:
                self._down_until = time.monotonic() + self._pause
                pause, self._pause = self._pause, min(self._pause * 2, BACKOFF_S[1])
            overran = expired.is_set() or isinstance(exc, DeadlinePassed)
            why = (f"no complete answer within its {self.deadline:.1f} s deadline{hint}" if overran
                   else f"{type(exc).__name__}: {exc}")
            raise StoreUnavailable(f"redis store {self._where} failed to {what} ({why}); "
                                   f"not retrying for {pause:.0f} s") from exc
        watchdog.cancel()
        if self._pause != BACKOFF_S[0]:
            with self._lock:
                self._pause = BACKOFF_S[0]
        return result

    def _expire(self, expired: threading.Event) -> None:
        """The deadline passed: close the connections, so the read in progress fails now."""
        expired.set()
        with contextlib.suppress(Exception):
            self._client.connection_pool.disconnect()

    # -- validation --------------------------------------------------------------------------

    def _decode(self, where: str, raw: Any, expect: tuple[str, str] | None = None,
                key_text: str | None = None) -> Decision | None:
        """The entry's decision if it is valid and belongs under ``where``; else None and one warning."""
        try:
            if not isinstance(raw, bytes | str):
                raise TypeError(f"value is {type(raw).__name__}")
            decision = Decision.loads(raw)
            kd, fd, kt = decision.store_key
            if entry_key(kd, fd, kt) != where or (key_text is not None and kt != key_text):
                raise ValueError("payload belongs to another key (entry tampered with or swapped)")
            if expect is not None and (kd, fd) != expect:
                raise ValueError("payload belongs to another kernel or fingerprint")
        except Exception as exc:  # any failure to decode is a miss, never a crash
            token = (where, raw if isinstance(raw, bytes | str) else None)
            if token not in self._warned and len(self._warned) < 10_000:
                self._warned.add(token)
                log.warning("ignoring corrupt decision in redis store %s (entry %s): %s",
                            self._where, where, exc)
            return None
        return decision

    # -- the Store protocol ------------------------------------------------------------------

    def get(self, kernel_digest: str, fingerprint_digest: str, key_text: str) -> Decision | None:
        where = entry_key(kernel_digest, fingerprint_digest, key_text)
        raw = self._call("read", lambda: self._client.get(where))
        if raw is None:
            return None
        return self._decode(where, raw, (kernel_digest, fingerprint_digest), key_text)

    def put(self, decision: Decision) -> Decision:
        """SET NX, then read back: whoever set it first fleet-wide is the decision everyone uses."""
        kd, fd, kt = decision.store_key
        where, payload = entry_key(kd, fd, kt), decision.dumps()

        def txn() -> list[Any]:
            pipe = self._client.pipeline(transaction=True)
            pipe.set(where, payload, nx=True)
            pipe.sadd(index_key(kd, fd), where)
            pipe.sadd(INDEXES, f"{kd}:{fd}")
            pipe.get(where)
            return pipe.execute()

        _set, _, _, stored = self._call("publish", txn)
        if stored in (payload, payload.encode()):  # bytes compared as bytes: a non-UTF-8 entry is corrupt, not an error
            return decision
        existing = None if stored is None else self._decode(where, stored, (kd, fd), kt)
        if existing is not None:
            return existing
        return self._replace(decision, where, stored, payload)  # corrupt (or vanished): heal it

    def _replace(self, decision: Decision, where: str, stored: Any, payload: str) -> Decision:
        """Write ``payload`` over ``stored`` unless someone else changed the entry first; return the winner."""
        if stored is None:
            won = self._call("publish", lambda: self._client.set(where, payload, nx=True))
        else:
            won = self._call("publish", lambda: self._scripts["swap"](keys=[where], args=[stored, payload]))
        if won:
            return decision
        return self.get(*decision.store_key) or decision

    def supersede(self, stale: Decision, decision: Decision) -> Decision:
        """Replace ``stale`` (an entry naming a config its kernel does not declare) with a re-tuned
        ``decision``, unless the entry meanwhile holds another valid decision; return what it holds."""
        kd, fd, kt = decision.store_key
        where = entry_key(kd, fd, kt)
        stored = self._call("read", lambda: self._client.get(where))
        if stored is None:
            return self.put(decision)
        current = self._decode(where, stored, (kd, fd), kt)
        if current is not None and current != stale:
            return current
        return self._replace(decision, where, stored, decision.dumps())

    def _indexes(self, query: Query) -> list[tuple[str, str]]:
        if query.kernel_digest is not None and query.fingerprint_digest is not None:
            return [(query.kernel_digest, query.fingerprint_digest)]
        pairs = []
        for raw in self._call("list", lambda: self._client.smembers(INDEXES)):
            kd, _, fd = (raw.decode() if isinstance(raw, bytes) else raw).partition(":")
            if (query.kernel_digest in (None, kd)) and (query.fingerprint_digest in (None, fd)):
                pairs.append((kd, fd))
        return sorted(pairs)

    def _entries(self, query: Query) -> list[tuple[tuple[str, str], str, Any]]:
        """(kernel/fingerprint pair, entry key, raw value) for every indexed entry the query may match."""
        if query.kernel_digest and query.fingerprint_digest and query.key_text is not None:
            kd, fd = query.kernel_digest, query.fingerprint_digest
            where = entry_key(kd, fd, query.key_text)
            return [((kd, fd), where, self._call("read", lambda: self._client.get(where)))]
        out = []
        for kd, fd in self._indexes(query):
            index = index_key(kd, fd)
            members = sorted(m.decode() if isinstance(m, bytes) else m
                             for m in self._call("list", functools.partial(self._client.smembers, index)))
            if not members:
                continue
            values = self._call("read", functools.partial(self._client.mget, members))
            out += [((kd, fd), w, v) for w, v in zip(members, values, strict=True)]
        return out

    def decisions(self, query: Query = EVERYTHING) -> Iterator[Decision]:
        for pair, where, raw in self._entries(query):
            if raw is None:
                continue
            decision = self._decode(where, raw, pair)
            if decision is not None and query.matches(decision):
                yield decision

    def delete(self, query: Query = EVERYTHING) -> int:
        """Remove matching entries; corrupt ones go too unless the query filters on kernel name or key."""
        doomed: list[tuple[tuple[str, str], str]] = []
        for pair, where, raw in self._entries(query):
            decision = None if raw is None else self._decode(where, raw, pair)
            if decision is None:
                if query.kernel is None and query.key_text is None:
                    doomed.append((pair, where))
            elif query.matches(decision):
                doomed.append((pair, where))
        if not doomed:
            return 0

        def txn() -> list[Any]:
            pipe = self._client.pipeline(transaction=True)
            for (kd, fd), where in doomed:
                pipe.delete(where)
                pipe.srem(index_key(kd, fd), where)
            return pipe.execute()

        results = self._call("delete", txn)
        return sum(int(r) for r in results[::2])

    def count(self) -> int:
        """Indexed entries, corrupt ones included (they are still there to be deleted)."""
        pairs = self._indexes(EVERYTHING)

        def txn() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for kd, fd in pairs:
                pipe.scard(index_key(kd, fd))
            return pipe.execute()

        return sum(int(n) for n in self._call("count", txn)) if pairs else 0

    def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        ttl_ms = max(1, int(ttl_s * 1000))
        return bool(self._call("take a lease", lambda: self._scripts["take"](
            keys=[PREFIX + "lease:" + name], args=[holder, ttl_ms])))

    def lease_holder(self, name: str) -> str | None:
        raw = self._call("read a lease", lambda: self._client.get(PREFIX + "lease:" + name))
        if isinstance(raw, bytes):
            return raw.decode("utf-8", "replace")
        return raw if isinstance(raw, str) else None

    def leases(self, prefix: str) -> dict[str, str]:
        """The live leases whose name starts with ``prefix``: name -> holder (e.g. failed-key records)."""
        pattern = _lease_pattern(prefix)
        start = len(PREFIX + "lease:")

        def text(raw: bytes | str) -> str:
            return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw

        def txn() -> dict[str, str]:
            # SCAN walks the whole keyspace, one round trip per SCAN_COUNT keys: on a Redis shared with
            # millions of other keys that is many round trips, so the deadline is checked between them
            # (the watchdog alone closes the connection once, and the next round would reconnect).
            until = time.monotonic() + self.deadline
            names: list[bytes | str] = []
            cursor: int | bytes | str = 0
            while True:
                cursor, batch = self._client.scan(cursor, match=pattern, count=SCAN_COUNT)
                names += batch
                if int(cursor) == 0:
                    break
                if time.monotonic() >= until:
                    raise DeadlinePassed
            values = self._client.mget(names) if names else []
            return {text(n)[start:]: text(v) for n, v in zip(names, values, strict=True) if v is not None}

        return self._call("read leases", txn, hint=(
            " for scanning every key on the server; raise it with ?deadline=S in the store URL"))

    def release(self, name: str, holder: str) -> None:
        """Best effort and never raises: an unreleased lease simply expires."""
        try:
            self._call("release a lease", lambda: self._scripts["release"](
                keys=[PREFIX + "lease:" + name], args=[holder]))
        except StoreUnavailable as exc:
            log.debug("could not release lease %r (%s); it will expire", name, exc)

    def close(self) -> None:
        with contextlib.suppress(*self._errors):
            self._client.close()

    def __repr__(self) -> str:
        return f"RedisStore({self._where!r})"


def _lease_pattern(prefix: str) -> str:
    """The SCAN pattern of the leases whose name starts with ``prefix`` (its glob characters escaped)."""
    return PREFIX + "lease:" + "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
