"""Counters and events: what happened, per kernel and per phase (before / after the seal).

Events go to the ``tunevault`` logger at DEBUG and, when a path is configured, to a JSON-lines
file that several processes may append to (one ``write`` per line on an O_APPEND descriptor).
The path is only ever a regular file: anything else is refused once, never waited on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import defaultdict
from typing import Any

from tunevault.core.forks import renewed_in_child
from tunevault.core.untrusted import Refused, open_sink

log = logging.getLogger("tunevault")

COUNTERS = ("hits", "misses", "tunings", "fallbacks", "fallback_hits", "predicted", "errors", "tuning_seconds",
            "benchmark_runs", "capture_fallbacks")


class Stats:
    """Thread-safe counters keyed by (kernel name, phase)."""

    def __init__(self) -> None:
        self._lock = renewed_in_child(self, "_lock", threading.Lock)
        self._counts: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: dict.fromkeys(COUNTERS, 0))

    def add(self, kernel: str, phase: str, counter: str, amount: float = 1) -> None:
        with self._lock:
            self._counts[(kernel, phase)][counter] += amount

    def snapshot(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{kernel: {phase: {counter: value}}}`` plus a ``"total"`` pseudo-kernel."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        total: dict[str, dict[str, float]] = {}
        with self._lock:
            items = [(k, dict(v)) for k, v in self._counts.items()]
        for (kernel, phase), counts in items:
            out.setdefault(kernel, {})[phase] = counts
            agg = total.setdefault(phase, dict.fromkeys(COUNTERS, 0))
            for name, value in counts.items():
                agg[name] += value
        out["total"] = total
        return out

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


class EventLog:
    """Structured events: kept in memory (bounded) and appended to an optional file."""

    def __init__(self, path: str | None = None, keep: int = 10_000) -> None:
        self.path = path
        self.keep = keep
        self.started = time.time()
        self.recent: list[dict[str, Any]] = []
        self._lock = renewed_in_child(self, "_lock", threading.Lock)
        self._warned = False
        self._refused = False  # the path is not a regular file: never tried again

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"event": kind, "time": time.time(), "pid": os.getpid(), **fields}
        with self._lock:
            self.recent.append(event)
            if len(self.recent) > self.keep:
                del self.recent[: len(self.recent) - self.keep]
        log.debug("event %s", event)
        if self.path and not self._refused:
            self._append(self.path, event)
        return event

    def _append(self, path: str, event: dict[str, Any]) -> None:
        """One write per line; a path that is not a regular file (a FIFO without a reader would
        block the tuning call forever) is refused once, with a warning, and not tried again."""
        try:
            line = (json.dumps(event, default=str, separators=(",", ":"), allow_nan=False) + "\n").encode()
        except ValueError:  # a NaN or infinity in a field: keep the line valid JSON
            line = (json.dumps(_finite(event), default=str, separators=(",", ":")) + "\n").encode()
        try:
            fd = open_sink(path)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except Refused as exc:
            self._refused = True
            log.warning("tunevault: not writing events: %s; events stay in memory", exc)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("tunevault: cannot write events to %s (%s); events stay in memory", path, exc)


def _finite(event: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in event.items()}
