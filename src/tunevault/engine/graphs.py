"""Is a CUDA graph being captured? Asked without ever initialising CUDA.

While a stream is captured (``torch.cuda.graph``, as vLLM and SGLang do after warmup), launches
on it are recorded, not run; synchronising, allocating or timing there invalidates the capture
(``cudaErrorStreamCaptureInvalidated``), and in the default (global) capture mode so do such
calls from any other thread of the process. So the miss path asks the probe before it would
benchmark, and background tuning waits until captures are over.

The probe is a seam: :func:`use_probe` installs another implementation of :class:`CaptureProbe`,
e.g. a :class:`FlagProbe` an embedder raises around its capture phase (tests on a CPU do).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from types import ModuleType

    import torch

QUIET_S = 1.0  # captures come in bursts (one graph per batch size): wait this long after the last


class CaptureProbe(Protocol):
    """Where captures are seen. ``last_seen`` is the monotonic time one was last seen in progress."""

    last_seen: float

    def here(self) -> bool:
        """This thread's current stream is being captured."""
        ...

    def anywhere(self) -> bool:
        """Some capture is in progress that tuning here could invalidate (this thread's, or one seen
        before on another stream that is still capturing)."""
        ...


class TorchCaptureProbe:
    """Asks torch about this thread's current stream, and keeps the streams it saw capturing, so
    another thread can ask about those (``cudaStreamIsCapturing`` is legal during any capture).
    A capture during which no key missed is not seen from another thread."""

    def __init__(self) -> None:
        self.last_seen = 0.0
        self._lock = threading.Lock()
        self._streams: list[torch.cuda.Stream] = []

    @staticmethod
    def _torch() -> ModuleType | None:
        torch = sys.modules.get("torch")  # never import torch, nor initialise CUDA, just to ask
        try:
            return torch if torch is not None and torch.cuda.is_initialized() else None
        except Exception:
            return None

    def here(self) -> bool:
        torch = self._torch()
        if torch is None:
            return False
        try:
            if not torch.cuda.is_current_stream_capturing():
                return False
            stream = torch.cuda.current_stream()
        except Exception:
            return False
        with self._lock:
            self.last_seen = time.monotonic()
            if stream not in self._streams:
                self._streams.append(stream)
        return True

    def anywhere(self) -> bool:
        if self.here():
            return True
        torch = self._torch()
        if torch is None:
            return False
        with self._lock:
            streams = list(self._streams)
        busy = []
        for stream in streams:
            try:
                with torch.cuda.stream(stream):
                    if torch.cuda.is_current_stream_capturing():
                        busy.append(stream)
            except Exception:
                continue
        if busy:
            with self._lock:
                self.last_seen = time.monotonic()
        return bool(busy)


class FlagProbe:
    """Captures as a caller declares them: one is in progress while ``capturing`` is set. For an
    embedder that knows its capture phase (and for tests on machines without CUDA graphs).
    ``asked`` counts how often it was asked (a waiting background tuner asks repeatedly)."""

    def __init__(self) -> None:
        self.capturing = threading.Event()
        self.last_seen = 0.0
        self.asked = 0

    def here(self) -> bool:
        self.asked += 1
        if self.capturing.is_set():
            self.last_seen = time.monotonic()
            return True
        return False

    def anywhere(self) -> bool:
        return self.here()


_probe: CaptureProbe = TorchCaptureProbe()


def probe() -> CaptureProbe:
    return _probe


def use_probe(new: CaptureProbe) -> CaptureProbe:
    """Install ``new`` as the capture probe; returns the previous one (to put back)."""
    global _probe
    old, _probe = _probe, new
    return old


def wait_until_quiet(quiet: float = QUIET_S, timeout: float | None = None) -> bool:
    """Block until no capture is in progress and none was seen for ``quiet`` seconds.

    Polls with a backoff (50 ms up to 0.5 s); returns at once when no capture was ever seen.
    False when ``timeout`` passed first."""
    end = None if timeout is None else time.monotonic() + timeout
    step = 0.05
    while True:
        p = _probe
        busy = p.anywhere()
        left = 0.0 if busy else quiet - (time.monotonic() - p.last_seen)
        if not busy and left <= 0:
            return True
        if end is not None and time.monotonic() >= end:
            return False
        time.sleep(step if busy else min(left, step))
        step = min(2 * step, 0.5) if busy else 0.05
