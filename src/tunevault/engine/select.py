"""Deterministic choice under timing noise.

Candidates whose median is within ``tolerance`` of the fastest median are tied, and ties go to
the earliest declared config: five equal configs pick the same winner in every process, where
picking the raw minimum picks by noise. (A rule that also tied overlapping p20-p80 ranges was
tried and dropped: short GPU kernels have skewed timings, and it picked configs 15% slower.)
"""

from __future__ import annotations

from collections.abc import Sequence

from tunevault.core.model import CandidateResult


class NoWorkingConfig(RuntimeError):
    """Every candidate failed to compile or run."""


def band_top(fastest: CandidateResult, tolerance: float) -> float:
    """The slowest median that still ties with ``fastest``."""
    return fastest.timings[0] * (1.0 + tolerance)


def select(candidates: Sequence[CandidateResult], tolerance: float) -> tuple[CandidateResult, float | None]:
    """Return the winner and its margin to the fastest other working candidate (None if alone)."""
    ok = [c for c in candidates if c.ok]
    if not ok:
        raise NoWorkingConfig("no candidate config compiled and ran")
    fastest = min(ok, key=lambda c: (c.timings[0], c.index))
    top = band_top(fastest, tolerance)
    winner = min((c for c in ok if c.timings[0] <= top), key=lambda c: c.index)
    others = [c.timings[0] for c in ok if c is not winner]
    if not others or winner.timings[0] <= 0:
        return winner, None
    return winner, min(others) / winner.timings[0] - 1.0
