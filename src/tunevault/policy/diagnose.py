"""Explain a miss by the labelled key elements that differ from the nearest decided key.

"dtype(g): float16 -> float32" is the one line that finds a warmup/serving mismatch in minutes.
"""

from __future__ import annotations

from collections.abc import Sequence

from tunevault.core.model import TuningKey


class TuningMiss(RuntimeError):
    """A key had no decision and the on-miss policy is ``error``."""

    def __init__(self, message: str, kernel: str = "", key: TuningKey | None = None,
                 nearest: TuningKey | None = None) -> None:
        super().__init__(message)
        self.kernel = kernel
        self.key = key
        self.nearest = nearest


def nearest_keys(key: TuningKey, decided: Sequence[TuningKey]) -> list[TuningKey]:
    """The decided keys with the fewest differing elements (ties kept, in a stable order)."""
    if not decided:
        return []
    scored = sorted(((len(key.differences(k)), k.text, k) for k in decided), key=lambda t: (t[0], t[1]))
    best = scored[0][0]
    return [k for n, _t, k in scored if n == best]


def explain_miss(kernel: str, key: TuningKey, decided: Sequence[TuningKey]) -> tuple[str, TuningKey | None]:
    near = nearest_keys(key, decided)
    head = f"{kernel}: no decision for {key.describe() or '(empty key)'}"
    if not near:
        return f"{head}; no key of this kernel is decided for this machine", None
    diffs = key.differences(near[0])
    if not diffs:  # the nearest is this very key: its stored decision was not usable (an undeclared config)
        return f"{head}; the decision stored for this very key names no config this kernel declares: ignored", None
    text = ", ".join(f"{label}: {old} -> {new}" for label, old, new in diffs)
    more = f" (and {len(near) - 1} other key(s) as near)" if len(near) > 1 else ""
    return f"{head}; nearest decided key differs in {text}{more}", near[0]
