"""Numbers read from environment variables below the policy layer (policy/settings.py reads the
``install()`` options): a malformed value is one warning per process and value, and the default,
never an exception out of the user's kernel call."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from typing import TypeVar

Number = TypeVar("Number", int, float)


def positive(name: str, default: Number, cast: Callable[[str], Number], what: str, most: Number,
             env: Mapping[str, str] | None = None, warn: bool = True) -> Number:
    """``name``'s value as a ``cast`` above 0 and at most ``most`` (``what`` says so in the warning),
    else ``default``. The bound keeps a typo from stalling a kernel call (10**20 timed rounds) or
    overflowing a wait; a value too large for a float is refused, not raised."""
    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
        if 0 < value <= most:  # False for nan; compares a 400-digit int exactly (math.isfinite overflowed)
            return value
    except (ValueError, OverflowError):  # not a number; more digits than int() converts
        pass
    if warn:
        _ignore(name, raw, what, default)
    return default


@functools.cache
def _ignore(name: str, raw: str, what: str, default: float) -> None:
    shown = raw if len(raw) <= 40 else f"{raw[:20]}...({len(raw)} characters)"
    logging.getLogger("tunevault").warning("tunevault: ignoring %s=%r: not %s; using the default (%g)",
                                           name, shown, what, default)
