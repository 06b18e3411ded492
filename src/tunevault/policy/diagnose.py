"""Explain a miss by the labelled key elements that differ from the nearest decided key.

"dtype(g): float16 -> float32" is the one line that finds a warmup/serving mismatch in minutes.
"""

from __future__ import annotations

from collections.abc import Sequence

from tunevault.core.model import Decision, Fingerprint, KernelId, TuningKey
from tunevault.policy.predict import is_numeric, log_coord


class TuningMiss(RuntimeError):
    """A key had no decision and the on-miss policy is ``error``."""

    def __init__(self, message: str, kernel: str = "", key: TuningKey | None = None,
                 nearest: TuningKey | None = None) -> None:
        super().__init__(message)
        self.kernel = kernel
        self.key = key
        self.nearest = nearest


def distance(key: TuningKey, other: TuningKey) -> tuple[int, int, float]:
    """How far ``other`` is from ``key``: its differing categorical elements (dtypes, flags: a key
    warmed up with this call's dtypes at another size is nearer than one of other dtypes at this
    size), then all its differing elements, then how far apart their numbers are on a log2 scale
    (as predict.py measures sizes), so n=980 is nearer to n=990 than n=100 is."""
    diffs = key.differences(other)
    numeric = [(theirs, mine) for _label, theirs, mine in diffs if is_numeric(theirs) and is_numeric(mine)]
    apart = sum(abs(log_coord(float(mine)) - log_coord(float(theirs))) for theirs, mine in numeric)
    return len(diffs) - len(numeric), len(diffs), apart


def nearest_keys(key: TuningKey, decided: Sequence[TuningKey]) -> list[TuningKey]:
    """The decided keys nearest to ``key`` (:func:`distance`; ties kept, in key text order)."""
    if not decided:
        return []
    scored = sorted(((distance(key, k), k.text, k) for k in decided), key=lambda t: (t[0], t[1]))
    best = scored[0][0]
    return [k for d, _t, k in scored if d == best]


NONE_HERE = "no key of this kernel is decided for this machine"


def none_here(kernel: KernelId, here: Fingerprint, others: Sequence[Decision]) -> str:
    """Why no key of ``kernel`` is decided for this machine, from the decisions the store holds
    under its name (``others``): another version of its source or configs (a library upgrade), or
    the same kernel decided only under another fingerprint, saying what differs (a Triton upgrade,
    ``TRITON_DEBUG`` set in one environment only)."""
    if any(d.kernel.digest != kernel.digest and d.fingerprint.digest == here.digest for d in others):
        return f"{NONE_HERE}; decisions exist for another version of this kernel (source or configs changed)"
    elsewhere = [d.fingerprint for d in others
                 if d.kernel.digest == kernel.digest and d.fingerprint.digest != here.digest]
    if elsewhere:
        return (f"{NONE_HERE}; it is decided only on other machines or toolchains (fingerprint differs: "
                f"{elsewhere[0].differences(here)})")
    return NONE_HERE


def explain_miss(kernel: str, key: TuningKey, decided: Sequence[TuningKey],
                 ignored: str | None = None, none: str = NONE_HERE) -> tuple[str, TuningKey | None]:
    """The miss message and the nearest decided key. ``ignored``: why the decision stored for this
    very key (one of ``decided``) was not launched, as ``_stored`` found it; without one, it names
    a config the kernel does not declare. ``none``: what to say when nothing is decided (none_here)."""
    near = nearest_keys(key, decided)
    head = f"{kernel}: no decision for {key.describe() or '(empty key)'}"
    if not near:
        return f"{head}; {none}", None
    diffs = key.differences(near[0])
    if not diffs and ignored is not None:  # decided, but not for calls such as this one
        return f"{head}; the decision stored for this very key {ignored}", near[0]
    if not diffs:  # the nearest is this very key: its stored decision was not usable (an undeclared config)
        return f"{head}; the decision stored for this very key names no config this kernel declares: ignored", None
    text = ", ".join(f"{label}: {old} -> {new}" for label, old, new in diffs)
    more = f" (and {len(near) - 1} other key(s) as near)" if len(near) > 1 else ""
    return f"{head}; nearest decided key differs in {text}{more}", near[0]
