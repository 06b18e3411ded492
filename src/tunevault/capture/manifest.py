"""Manifests of seen keys: JSON lines that several processes append to, merged when read.

Each line is one process's counts for one (kernel, key) since its previous flush, so writers
never read or rewrite the file: appends under an exclusive ``flock`` on an ``O_APPEND``
descriptor lose nothing. Readers sum the lines of a key; the first line carrying an ArgSpec
(``callspec``) is the one replayed, and the next few distinct ones (other processes') are kept
to replay instead when it is refused.

A manifest names modules that ``warmup`` and ``check`` import: it is code. With a key
(``TUNEVAULT_BUNDLE_KEY``) every line carries the same HMAC-SHA256 signature as a bundle, and a
reader with a key refuses the whole manifest if any line is unsigned or does not verify.
Without a key a malformed line (wrong types, too deep, too long) is skipped with its reason.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunevault.core.model import TIME_RANGE, InvalidEntry, TuningKey
from tunevault.core.untrusted import MAX_DOCUMENT_BYTES, lines, loads, open_sink

log = logging.getLogger("tunevault")

FORMAT = "tunevault-manifest/1"
OUTCOMES = ("hit", "tuned", "missed")
LOCK_WAIT_S = 2.0  # a writer waits this long for another one's lock, then keeps its counts for later
MAX_KERNEL_NAME = 1000
MAX_CALLSPECS = 8  # per key: the first and up to seven distinct others to fall back on
# A manifest is read whole into memory, as a bundle is: the same 256 MiB bound (16 lines at the
# 16 MiB line bound; a real manifest of thousands of keys is a few MB).
MAX_MANIFEST_BYTES = MAX_DOCUMENT_BYTES
# Past this size only lines that carry a new key are appended: count-only lines are dropped first,
# so the last 16 MiB are kept for keys met late (thousands of them).
COUNT_LINES_UP_TO = MAX_MANIFEST_BYTES - (16 << 20)
_FROM_ENV = object()  # read(): take the key from $TUNEVAULT_BUNDLE_KEY


class ManifestError(ValueError):
    """The manifest as a whole cannot be trusted: with a key set, a line is unsigned or does not verify."""


@dataclass
class ManifestEntry:
    """Everything the manifest knows about one (kernel, key), merged over processes."""

    kernel: str  # importable ``module:qualname``
    key: TuningKey
    callspec: dict[str, Any] | None = None
    callspec_error: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    first_seen: float = 0.0
    last_seen: float = 0.0
    processes: set[tuple[str, int]] = field(default_factory=set)
    alternates: list[dict[str, Any]] = field(default_factory=list)  # later distinct callspecs of the key
    signed: bool = False  # every line of it verified with the bundle key: calls that really ran
    digest: str | None = None  # the captured kernel's KernelId digest (None: a manifest from before it)

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    @property
    def callspecs(self) -> list[dict[str, Any]]:
        """Every captured call of the key to replay, in the order to try them."""
        return [] if self.callspec is None else [self.callspec, *self.alternates]

    @property
    def ident(self) -> tuple[str, str]:
        return (self.kernel, self.key.text)

    def to_json(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "key": self.key.to_json(), "count": self.count, **self.counts,
                "first_seen": self.first_seen, "last_seen": self.last_seen, "processes": len(self.processes),
                "has_callspec": self.callspec is not None}


def line(kernel: str, key: TuningKey, counts: dict[str, int], first_seen: float, last_seen: float, pid: int,
         host: str, callspec: dict[str, Any] | None = None, callspec_error: str | None = None,
         sign_key: str | bytes | None = None, digest: str | None = None) -> str:
    """One manifest line (keys in a fixed, readable order), signed when ``sign_key`` is given.
    ``digest`` (the kernel's KernelId digest) lets a reader refuse another kernel of the same name."""
    rec: dict[str, Any] = {"format": FORMAT, "kernel": kernel, "key": key.to_json(),
                           "count": sum(counts.values()), **{o: int(counts.get(o, 0)) for o in OUTCOMES},
                           "first_seen": round(first_seen, 6), "last_seen": round(last_seen, 6),
                           "host": host, "pid": pid}
    if digest is not None:
        rec["digest"] = digest
    if callspec is not None:
        rec["callspec"] = callspec
    if callspec_error is not None:
        rec["callspec_error"] = callspec_error
    if sign_key is not None:
        from tunevault.store.bundle import ALGORITHM, signature

        rec["signature"] = {"alg": ALGORITHM, "hmac": signature(rec, sign_key)}
    return json.dumps(rec, separators=(", ", ": "), allow_nan=False) + "\n"


def append(path: str | os.PathLike[str], new_lines: Iterable[str], count_lines: Iterable[str] = ()) -> bool:
    """Append ``new_lines`` and ``count_lines`` in one locked write, so concurrent writers never interleave.

    ``count_lines`` only add counts to keys the file already holds: past COUNT_LINES_UP_TO they
    are dropped (False is returned) and ``new_lines`` alone are written, up to the hard cap.

    Raises OSError (or Refused, a ValueError, for a path that is not a regular file) and never
    blocks for long: a FIFO is refused at open, another writer's lock is waited for a bounded time.
    All or nothing: a write cut short (disk full, file size limit) is truncated away under the lock,
    so the caller's retry of the same lines never follows a torn line."""
    data, counts = "".join(new_lines).encode(), "".join(count_lines).encode()
    if not data and not counts:
        return True
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = open_sink(path)
    try:
        _lock(fd, os.fspath(path))
        end = os.lseek(fd, 0, os.SEEK_END)  # stable while we hold the lock: every writer takes it
        kept = end + len(data) + len(counts) <= COUNT_LINES_UP_TO
        if kept:
            data += counts
        if end + len(data) > MAX_MANIFEST_BYTES:  # readers refuse it past the cap: stop writing there
            raise OSError(errno.EFBIG, f"{os.fspath(path)} would grow past the {MAX_MANIFEST_BYTES >> 20} MiB a "
                          "manifest may hold; capture into a new file (the counts are kept)")
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            with suppress(OSError):  # /dev/null cannot be truncated, and needs no truncating
                os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)  # closing releases the lock
    return kept or not counts


def _lock(fd: int, path: str) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: O_APPEND alone
        return
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise OSError(errno.EWOULDBLOCK, f"{path} stayed locked by another writer for "
                              f"{LOCK_WAIT_S:.0f} s; the counts are kept for the next flush") from None
            time.sleep(0.01)


def _parse(raw: Any) -> tuple[ManifestEntry, str, int]:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise InvalidEntry("not a tunevault manifest line")
    kernel = raw.get("kernel")
    if not isinstance(kernel, str) or ":" not in kernel or len(kernel) > MAX_KERNEL_NAME:
        raise InvalidEntry("kernel must be 'module:qualname'")
    counts = {o: raw.get(o, 0) for o in OUTCOMES}
    if not all(type(v) is int and 0 <= v < 2**63 for v in counts.values()):
        raise InvalidEntry("counts must be non-negative integers")
    first, last = raw.get("first_seen", 0.0), raw.get("last_seen", 0.0)
    if not all(type(t) in (int, float) and TIME_RANGE[0] <= t <= TIME_RANGE[1] for t in (first, last)):
        raise InvalidEntry("first_seen/last_seen must be times (seconds since 1970)")
    spec, err = raw.get("callspec"), raw.get("callspec_error")
    if spec is not None and not isinstance(spec, dict):
        raise InvalidEntry("callspec must be an object")
    digest = raw.get("digest")
    if digest is not None and not (isinstance(digest, str) and 0 < len(digest) <= 64 and digest.isalnum()):
        raise InvalidEntry("digest must be a kernel digest (hex)")
    entry = ManifestEntry(kernel, TuningKey.from_json(raw.get("key")), spec,
                          err[:1000] if isinstance(err, str) else None, counts, float(first), float(last),
                          digest=digest)
    host, pid = raw.get("host"), raw.get("pid")
    return entry, host[:200] if isinstance(host, str) else "?", pid if type(pid) is int else -1


def read(path: str | os.PathLike[str], key: Any = _FROM_ENV,
         malformed: list[tuple[int, str]] | None = None, upto: int | None = None) -> list[ManifestEntry]:
    """Every (kernel, key) in the manifest, lines of all processes merged, in first-seen order.

    Malformed lines are skipped with one warning or, when ``malformed`` is a list, appended to it as
    ``(line number, reason)`` for the caller to report (a preflight fails on them).

    ``key`` (default: ``$TUNEVAULT_BUNDLE_KEY``; callers in an installed process pass its settings'
    ``bundle_key``, which capture signs with) makes every line's signature mandatory: one line
    that is unsigned, malformed or does not verify refuses the whole manifest (ManifestError).
    A path that is not a regular file, or one larger than MAX_MANIFEST_BYTES, is refused (Refused)
    without blocking or reading it. ``upto``: read only its first so many bytes, so processes
    reading one growing file at different times agree."""
    if key is _FROM_ENV:
        from tunevault.store.bundle import key_from_env

        key = key_from_env()
    merged: dict[tuple[str, str], ManifestEntry] = {}
    bad = 0
    for lineno, raw in lines(path, limit=MAX_MANIFEST_BYTES, upto=upto):  # Refused past the cap
        if raw is not None and not raw.strip():
            continue
        try:
            if raw is None:
                raise InvalidEntry("line too long")
            doc = loads(raw, what="line")
            if key is not None:
                _verify(doc, key)
            entry, host, pid = _parse(doc)
            entry.signed = key is not None
        except ManifestError as exc:
            raise ManifestError(f"{os.fspath(path)}:{lineno}: {exc}; refusing the whole manifest") from None
        except Exception as exc:  # whatever a line holds, it is that line's problem only
            if key is not None:
                raise ManifestError(f"{os.fspath(path)}:{lineno}: {str(exc)[:200]}; with a key set "
                                    "(TUNEVAULT_BUNDLE_KEY or install(bundle_key=...)), every line must be a "
                                    "valid signed line; refusing the whole manifest") from None
            bad += 1
            if malformed is not None:
                malformed.append((lineno, str(exc)[:200]))
            log.debug("tunevault: %s:%d: skipped: %s", path, lineno, str(exc)[:200])
            continue
        _merge(merged, entry, host, pid)
    if bad and malformed is None:
        log.warning("tunevault: %s: skipped %d malformed line(s)", path, bad)
    return sorted(merged.values(), key=lambda e: (e.first_seen, e.kernel, e.key.text))


def _verify(doc: Any, key: str | bytes) -> None:
    from tunevault.store.bundle import BundleError, check_signature

    if not isinstance(doc, dict):
        raise ManifestError("not a manifest line")
    try:
        check_signature("the line", doc, key, "capture it with TUNEVAULT_BUNDLE_KEY set")
    except BundleError as exc:
        raise ManifestError(str(exc)) from None


def _merge(merged: dict[tuple[str, str], ManifestEntry], entry: ManifestEntry, host: str, pid: int) -> None:
    have = merged.get(entry.ident)
    if have is None:
        entry.processes.add((host, pid))
        merged[entry.ident] = entry
        return
    for o in OUTCOMES:
        have.counts[o] += entry.counts[o]
    have.first_seen = min(have.first_seen, entry.first_seen)
    have.last_seen = max(have.last_seen, entry.last_seen)
    have.processes.add((host, pid))
    if have.digest is None:
        have.digest = entry.digest
    if have.callspec is None and entry.callspec is not None:
        have.callspec, have.callspec_error = entry.callspec, None
    elif entry.callspec is not None:
        if len(have.callspecs) < MAX_CALLSPECS and entry.callspec not in have.callspecs:
            have.alternates.append(entry.callspec)
    elif have.callspec is None and have.callspec_error is None:
        have.callspec_error = entry.callspec_error
