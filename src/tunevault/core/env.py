"""Numbers read from environment variables below the policy layer (policy/settings.py reads the
``install()`` options): a malformed value is one warning per process and value, and the default,
never an exception out of the user's kernel call."""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import TypeVar

Number = TypeVar("Number", int, float)


def positive(name: str, default: Number, cast: Callable[[str], Number], what: str,
             env: Mapping[str, str] | None = None, warn: bool = True) -> Number:
    """``name``'s value as a positive finite ``cast`` (``what`` says so in the warning), else ``default``."""
    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return default
    value: Number | None
    try:
        value = cast(raw)
    except ValueError:
        value = None
    if value is not None and math.isfinite(value) and value > 0:
        return value
    if warn:
        _ignore(name, raw, what, default)
    return default


@functools.cache
def _ignore(name: str, raw: str, what: str, default: float) -> None:
    logging.getLogger("tunevault").warning("tunevault: ignoring %s=%r: not %s; using the default (%g)",
                                           name, raw, what, default)
