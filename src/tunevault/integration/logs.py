"""How tunevault's log lines reach a person: through the application's logging, else stderr.

tunevault logs through the ``tunevault`` logger only: one INFO line per tuning, a WARNING per
fallback, explained miss or unusable store. It never calls ``logging.basicConfig`` and never
touches the root logger. Every activation (``tunevault.install()``, ``TUNEVAULT_MODE``, the CLI)
calls :func:`show_logs`, and each record is then routed by what the application has done *at
that moment* (so configuring logging after ``install()`` works):

- the application configured logging (any handler on the root logger or on ``tunevault``'s
  parents) -> its handlers and levels decide, as for any library's records:
  ``logging.basicConfig(level=logging.INFO)`` shows the tuning lines, the default WARNING hides
  them, and a level set on the ``tunevault`` logger wins;
- it configured nothing -> tunevault prints records at ``TUNEVAULT_LOG_LEVEL`` (default ``INFO``)
  and above to stderr as ``[INFO] tunevault: tuned ...``, as ``logging.lastResort`` does for
  warnings. An application that set up the ``tunevault`` logger itself is left alone entirely.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import TextIO

log = logging.getLogger("tunevault")
FORMAT = "[%(levelname)s] %(message)s"
# The level tunevault holds its logger at, so that every record reaches the routing filter. No
# application sets level 1, so any other level on the logger is the application's own choice.
HELD = 1


def app_configured() -> bool:
    """Whether any handler other than tunevault's own would receive a ``tunevault`` record."""
    logger: logging.Logger | None = log
    while logger is not None:
        if any(not isinstance(h, _StderrFallback) for h in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False


def env_level(default: int = logging.INFO) -> int:
    """``TUNEVAULT_LOG_LEVEL`` as a level (a name such as ``debug`` or a number); ``default`` if unset,
    or if bad with one warning: a log setting must never stop a command or the interpreter's start."""
    raw = os.environ.get("TUNEVAULT_LOG_LEVEL", "").strip()
    if not raw:
        return default
    if raw.isascii() and raw.isdigit():  # str.isdigit() alone accepts '²', which int() refuses
        try:
            return int(raw)
        except ValueError:  # more digits than int() converts
            pass
    else:
        level = logging.getLevelName(raw.upper())
        if isinstance(level, int):
            return level
    _ignore_level(raw, default)
    return default


@functools.cache
def _ignore_level(raw: str, default: int) -> None:
    log.warning("tunevault: ignoring TUNEVAULT_LOG_LEVEL=%r: not a level name (debug, info, warning, error, "
                "critical) or a number; using %s", raw, logging.getLevelName(default))


class _StderrFallback(logging.StreamHandler):
    """stderr, looked up at each record (as ``logging.lastResort`` does), while the application has
    configured no logging of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT))

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    @stream.setter
    def stream(self, value: TextIO | None) -> None:
        self._stream = None if value is sys.stderr else value

    def emit(self, record: logging.LogRecord) -> None:
        if not app_configured():
            super().emit(record)


class _RouteByConfiguration(logging.Filter):
    """On the ``tunevault`` logger, whose level tunevault holds low: lets through what the application's
    levels would (when it configured logging) or what ``TUNEVAULT_LOG_LEVEL`` asks (when it did not)."""

    def __init__(self, unconfigured: int) -> None:
        super().__init__()
        self.unconfigured = unconfigured

    def filter(self, record: logging.LogRecord) -> bool:
        if log.level != HELD:
            return True  # the application set tunevault's level itself: it already decided
        if app_configured():
            parent = log.parent
            return parent is None or record.levelno >= parent.getEffectiveLevel()
        return record.levelno >= self.unconfigured


def _ours() -> tuple[_StderrFallback | None, _RouteByConfiguration | None]:
    handler = next((h for h in log.handlers if isinstance(h, _StderrFallback)), None)
    route = next((f for f in log.filters if isinstance(f, _RouteByConfiguration)), None)
    return handler, route


def show_logs(level: int | None = None) -> None:
    """Route tunevault's records as the module docstring says; idempotent.

    ``level`` (the CLI's ``-v``) replaces ``TUNEVAULT_LOG_LEVEL`` for the unconfigured case.
    """
    handler, route = _ours()
    if handler is None and (log.handlers or log.level != logging.NOTSET):
        return  # the application set the tunevault logger up itself
    if route is not None and log.level != HELD and level is None:
        return  # ... or set its level after an earlier activation
    if route is None:
        route = _RouteByConfiguration(logging.INFO)
        log.addFilter(route)
    if handler is None:
        log.addHandler(_StderrFallback())
    log.setLevel(HELD)
    # Read once the routing is in place, so that a bad value's warning is shown as tunevault's others are.
    route.unconfigured = env_level() if level is None else level
