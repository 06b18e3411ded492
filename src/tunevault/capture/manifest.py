"""Manifests of seen keys: JSON lines that several processes append to, merged when read.

Each line is one process's counts for one (kernel, key) since its previous flush, so writers
never read or rewrite the file: appends under an exclusive ``flock`` on an ``O_APPEND``
descriptor lose nothing. Readers sum the lines of a key; the first line carrying an ArgSpec
(``callspec``) is the one replayed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunevault.core.model import InvalidEntry, TuningKey

log = logging.getLogger("tunevault")

FORMAT = "tunevault-manifest/1"
OUTCOMES = ("hit", "tuned", "missed")


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

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    @property
    def ident(self) -> tuple[str, str]:
        return (self.kernel, self.key.text)

    def to_json(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "key": self.key.to_json(), "count": self.count, **self.counts,
                "first_seen": self.first_seen, "last_seen": self.last_seen, "processes": len(self.processes),
                "has_callspec": self.callspec is not None}


def line(kernel: str, key: TuningKey, counts: dict[str, int], first_seen: float, last_seen: float, pid: int,
         host: str, callspec: dict[str, Any] | None = None, callspec_error: str | None = None) -> str:
    """One manifest line (keys in a fixed, readable order)."""
    rec: dict[str, Any] = {"format": FORMAT, "kernel": kernel, "key": key.to_json(),
                           "count": sum(counts.values()), **{o: int(counts.get(o, 0)) for o in OUTCOMES},
                           "first_seen": round(first_seen, 6), "last_seen": round(last_seen, 6),
                           "host": host, "pid": pid}
    if callspec is not None:
        rec["callspec"] = callspec
    if callspec_error is not None:
        rec["callspec_error"] = callspec_error
    return json.dumps(rec, separators=(", ", ": "), allow_nan=False) + "\n"


def append(path: str | os.PathLike[str], lines: Iterable[str]) -> None:
    """Append ``lines`` in one locked write, so concurrent writers never interleave."""
    data = "".join(lines).encode()
    if not data:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        _lock(fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)  # closing releases the lock


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: O_APPEND alone
        return
    fcntl.flock(fd, fcntl.LOCK_EX)


def _parse(raw: Any) -> tuple[ManifestEntry, str, int]:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise InvalidEntry("not a tunevault manifest line")
    kernel = raw.get("kernel")
    if not isinstance(kernel, str) or ":" not in kernel:
        raise InvalidEntry("kernel must be 'module:qualname'")
    counts = {o: raw.get(o, 0) for o in OUTCOMES}
    if not all(isinstance(v, int) and v >= 0 for v in counts.values()):
        raise InvalidEntry("counts must be non-negative integers")
    first, last = raw.get("first_seen", 0.0), raw.get("last_seen", 0.0)
    if not all(isinstance(t, int | float) for t in (first, last)):
        raise InvalidEntry("first_seen/last_seen must be numbers")
    spec, err = raw.get("callspec"), raw.get("callspec_error")
    if spec is not None and not isinstance(spec, dict):
        raise InvalidEntry("callspec must be an object")
    entry = ManifestEntry(kernel, TuningKey.from_json(raw.get("key")), spec,
                          err if isinstance(err, str) else None, counts, float(first), float(last))
    host, pid = raw.get("host"), raw.get("pid")
    return entry, host if isinstance(host, str) else "?", pid if isinstance(pid, int) else -1


def read(path: str | os.PathLike[str], malformed: list[tuple[int, str]] | None = None) -> list[ManifestEntry]:
    """Every (kernel, key) in the manifest, lines of all processes merged, in first-seen order.

    Malformed lines are skipped with one warning or, when ``malformed`` is a list, appended to it as
    ``(line number, reason)`` for the caller to report (a preflight fails on them)."""
    merged: dict[tuple[str, str], ManifestEntry] = {}
    bad = 0
    with open(path, encoding="utf-8") as fh:
        for lineno, text in enumerate(fh, 1):
            if not text.strip():
                continue
            try:
                entry, host, pid = _parse(json.loads(text))
            except (ValueError, InvalidEntry) as exc:
                bad += 1
                if malformed is not None:
                    malformed.append((lineno, str(exc)[:200]))
                log.debug("tunevault: %s:%d: skipped: %s", path, lineno, exc)
                continue
            _merge(merged, entry, host, pid)
    if bad and malformed is None:
        log.warning("tunevault: %s: skipped %d malformed line(s)", path, bad)
    return sorted(merged.values(), key=lambda e: (e.first_seen, e.kernel, e.key.text))


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
    if have.callspec is None and entry.callspec is not None:
        have.callspec, have.callspec_error = entry.callspec, None
    elif have.callspec is None and have.callspec_error is None:
        have.callspec_error = entry.callspec_error
