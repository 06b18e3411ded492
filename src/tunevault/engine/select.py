"""Deterministic choice under timing noise.

A candidate ties with the fastest when its median is within ``tolerance`` of the fastest's,
or when the two cannot be told apart by the measurements themselves (its p20 is below the
fastest's p80). Ties go to the earliest declared config: five equal configs pick the same
winner in every process, where picking the raw minimum picks by noise.
"""

from __future__ import annotations

from collections.abc import Sequence

from tunevault.core.model import CandidateResult


class NoWorkingConfig(RuntimeError):
    """Every candidate failed to compile or run."""


def band_top(fastest: CandidateResult, tolerance: float) -> float:
    """Anything whose fast end (p20) is at or below this may tie with ``fastest``."""
    top = fastest.timings[0] * (1.0 + tolerance)
    return max(top, fastest.timings[2]) if len(fastest.timings) >= 3 else top


def tied(candidate: CandidateResult, fastest: CandidateResult, tolerance: float) -> bool:
    t, f = candidate.timings, fastest.timings
    if t[0] <= f[0] * (1.0 + tolerance):
        return True
    return len(t) >= 3 and len(f) >= 3 and t[1] <= f[2]  # interquantile ranges overlap: indistinguishable


def select(candidates: Sequence[CandidateResult], tolerance: float) -> tuple[CandidateResult, float | None]:
    """Return the winner and its margin to the fastest other working candidate (None if alone)."""
    ok = [c for c in candidates if c.ok]
    if not ok:
        raise NoWorkingConfig("no candidate config compiled and ran")
    fastest = min(ok, key=lambda c: (c.timings[0], c.index))
    winner = min((c for c in ok if tied(c, fastest, tolerance)), key=lambda c: c.index)
    others = [c.timings[0] for c in ok if c is not winner]
    if not others or winner.timings[0] <= 0:
        return winner, None
    return winner, min(others) / winner.timings[0] - 1.0
