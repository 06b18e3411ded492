"""Deterministic choice under timing noise: ties follow the measured noise.

A candidate ties with the fastest when its median is within ``tolerance`` of the fastest's, or
when its timings cannot tell it apart from the fastest's at the configured ``confidence``; ties
go to the earliest declared config. A fixed band alone cannot be deterministic: on a noisy
machine every config straddles its edge, and equal configs then pick a different winner in
every process. Here the noise widens the tie exactly as far as it reaches.

The test: centers (medians; the fastest run in the GPU's rounds and in the CPU screen) compared
by their ratio, in logs, with their relative standard errors (``sqrt(pi/2) * sigma / sqrt(n)``,
sigma from the interquartile range, never below the batch's typical noise at the fastest's
scale), one-sided and Bonferroni-corrected for comparing with the fastest of k candidates (the
fastest of k equal configs is fast by luck). A candidate loses the tie only when the corrected
confidence that it is slower reaches ``confidence``. Candidates whose noise is unknown (a kernel's own
``do_bench``) tie by ``tolerance`` alone.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from tunevault.core.model import CandidateResult

DEFAULT_CONFIDENCE = 0.999
IQR_SIGMAS = 1.349  # a normal distribution's interquartile range, in standard deviations
MEDIAN_SE = math.sqrt(math.pi / 2)  # a median's standard error, in sigma / sqrt(n), for n >= 3


class NoWorkingConfig(RuntimeError):
    """Every candidate failed to compile or run."""


def _median(c: CandidateResult) -> float:
    return c.timings[0]


def pooled_noise(candidates: Sequence[CandidateResult]) -> float | None:
    """The typical relative spread (sigma / center) of one run, over candidates timed 3+ times:
    a floor under each candidate's own, which a few runs can underestimate."""
    rel = [c.iqr / IQR_SIGMAS / _median(c) for c in candidates
           if c.ok and c.n >= 3 and c.iqr is not None and _median(c) > 0]
    return statistics.median(rel) if rel else None


def _stderr(c: CandidateResult, floor: float | None) -> float | None:
    """Standard error of ``c``'s center, its sigma at least ``floor``; None when noise is unknown."""
    own = c.iqr / IQR_SIGMAS if c.n >= 3 and c.iqr is not None else None
    if c.n < 1 or (own is None and floor is None):
        return None
    sigma = max(s for s in (own, floor) if s is not None)
    return (MEDIAN_SE if c.n >= 3 else 1.0) * sigma / math.sqrt(c.n)


def slower_confidence(c: CandidateResult, fastest: CandidateResult, pooled: float | None,
                      compared: int) -> float | None:
    """Confidence that ``c`` is slower than ``fastest``, corrected for ``compared`` comparisons.

    The pooled noise applies at the fastest's scale: load adds time in bursts of a given length,
    so a config ten times slower is not ten times noisier for it."""
    if c is fastest:
        return 0.0
    floor = None if pooled is None else pooled * _median(fastest)
    se_c, se_f = _stderr(c, floor), _stderr(fastest, floor)
    if se_c is None or se_f is None:
        return None
    if _median(c) <= 0 or _median(fastest) <= 0:
        return None
    # In logs: a ratio's noise is relative, and a config 8x slower is not hidden by the fast one's
    # absolute spread (a loaded CPU measured 98 ms +- 37 against 12 ms +- 37: 0.998 in linear terms).
    gap = math.log(_median(c) / _median(fastest))
    scale = math.hypot(se_c / _median(c), se_f / _median(fastest))
    if scale <= 0:
        return 1.0 if gap > 0 else 0.0
    p_value = 0.5 * math.erfc(gap / scale / math.sqrt(2))  # P(a gap this large | no difference)
    return max(0.0, 1.0 - max(1, compared) * p_value)


@dataclass(frozen=True)
class Judgement:
    """Every working candidate judged against the fastest."""

    fastest: CandidateResult
    tied: tuple[int, ...]  # declared indices tied with the fastest (the fastest included), ascending
    within: tuple[int, ...]  # of those, within ``tolerance``
    slower: dict[int, float | None]  # confidence that each is slower than the fastest
    tolerance: float
    confidence: float

    @property
    def winner(self) -> int:
        return self.tied[0]

    def reason(self) -> str:
        f, w = self.fastest, self.winner
        if len(self.tied) == 1:
            return f"#{w} is the fastest ({_median(f):.4g} ms); no other config ties with it"
        noisy = [i for i in self.tied if i not in self.within]
        parts = [f"within {self.tolerance:.1%}: {_list(self.within)}"] if self.within else []
        if noisy:
            parts.append(f"not slower at {self.confidence:.1%} confidence: {_list(noisy)}")
        who = "fastest and earliest declared" if w == f.index else "earliest declared"
        return (f"#{w} wins as the {who} of {len(self.tied)} tied with the fastest #{f.index} "
                f"({_median(f):.4g} ms); " + "; ".join(parts))


def _list(indices: Sequence[int]) -> str:
    return " ".join(f"#{i}" for i in indices)


def contenders(candidates: Sequence[CandidateResult]) -> list[CandidateResult]:
    """The working candidates a selection compares: the carefully timed ones, where there are any."""
    ok = [c for c in candidates if c.ok]
    return [c for c in ok if not c.screened] or ok


def judge(candidates: Sequence[CandidateResult], tolerance: float, confidence: float = DEFAULT_CONFIDENCE,
          noise: float | None = None) -> Judgement:
    """Ties with the fastest contender; ``noise`` is a relative spread known from elsewhere (the
    careful timings, when judging a screen of single runs)."""
    ok = contenders(candidates)
    if not ok:
        raise NoWorkingConfig("no candidate config compiled and ran")
    fastest = min(ok, key=lambda c: (_median(c), c.index))
    pooled = max((x for x in (pooled_noise(ok), noise) if x is not None), default=None)
    top = _median(fastest) * (1.0 + tolerance)
    slower = {c.index: slower_confidence(c, fastest, pooled, len(ok) - 1) for c in ok}
    within = sorted(c.index for c in ok if _median(c) <= top)
    unsure = [c.index for c in ok if (s := slower[c.index]) is not None and s < confidence]
    tied = sorted({*within, *unsure})
    return Judgement(fastest, tuple(tied), tuple(within), slower, tolerance, confidence)


def annotate(candidates: Sequence[CandidateResult], judgement: Judgement) -> list[CandidateResult]:
    """The candidates with each one's confidence of being slower than the fastest filled in."""
    return [replace(c, slower=round(s, 6)) if (s := judgement.slower.get(c.index)) is not None else c
            for c in candidates]


def select(candidates: Sequence[CandidateResult], tolerance: float,
           confidence: float = DEFAULT_CONFIDENCE) -> tuple[CandidateResult, float | None]:
    """Return the winner and its margin to the fastest other working candidate (None if alone)."""
    judgement = judge(candidates, tolerance, confidence)
    ok = [c for c in candidates if c.ok]
    winner = next(c for c in ok if c.index == judgement.winner)
    others = [_median(c) for c in ok if c is not winner]
    if not others or _median(winner) <= 0:
        return winner, None
    return winner, min(others) / _median(winner) - 1.0
