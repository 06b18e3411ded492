"""Search: precompile, validate, then successive halving over the survivors.

A short screen ranks every candidate; only the best fraction (and anything close to the
fastest screen time) is timed carefully. Any screened-out candidate that the screen cannot tell
apart from its fastest (engine.select's tie: within the tolerance, or within the noise) is timed
carefully too, together with the careful ones it may tie with, in one batch: ties are judged
within one batch only, never across two that a change of machine load (or the screen's colder
runs) could tell apart. Selection then compares the carefully timed candidates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Protocol

from tunevault.core.model import CandidateResult, ConfigSpec
from tunevault.engine.select import DEFAULT_CONFIDENCE, NoWorkingConfig, judge, pooled_noise

HALVING_MIN = 8  # below this many, a screen saves little: the configs it might tie are timed again anyway
KEEP_FRACTION = 0.25
SCREEN_BAND = 0.05  # also keep anything within 5% of the fastest screen time


class Session(Protocol):
    """Where candidates run: this process (inprocess.InProcessSession) or a worker (isolated)."""

    def precompile(self, indices: Sequence[int]) -> None: ...

    def validate(self, indices: Sequence[int], reference: int | None = None) -> dict[int, str | None]: ...

    def time(self, indices: Sequence[int], effort: str) -> dict[int, CandidateResult]: ...


def _low(r: CandidateResult) -> float:
    """A screen's lower quantile: noise only ever slows a run down, so rank by the fast end."""
    return min(r.timings)


def survivors(screen: dict[int, CandidateResult], order: Sequence[int]) -> list[int]:
    """The best ``KEEP_FRACTION`` (at least 2) plus any within ``SCREEN_BAND`` of the fastest."""
    ok = sorted((i for i in order if screen[i].ok), key=lambda i: (_low(screen[i]), order.index(i)))
    if not ok:
        return []
    keep = max(2, math.ceil(len(ok) * KEEP_FRACTION))
    band = _low(screen[ok[0]]) * (1.0 + SCREEN_BAND)
    chosen = set(ok[:keep]) | {i for i in ok if _low(screen[i]) <= band}
    return [i for i in order if i in chosen]


def halving(session: Session, order: Sequence[int], tolerance: float,
            confidence: float = DEFAULT_CONFIDENCE) -> tuple[dict[int, CandidateResult], str]:
    """Screen all, time the best carefully; returns results by index and a one-line summary.

    A screened-out config that the screen cannot tell apart from the screen's fastest (judged
    within the screen, one batch, with the careful timings' noise) is timed carefully too, in
    one batch with the careful configs it may tie with."""
    started = time.perf_counter()
    screen = session.time(order, "screen")
    screened_s = time.perf_counter() - started
    careful = session.time(survivors(screen, order), "full")
    try:
        noise = pooled_noise(list(careful.values()))
        unsure = set(judge(list(screen.values()), tolerance, confidence, noise).tied) - set(careful)
        if unsure:
            tied = judge(list(careful.values()), tolerance, confidence).tied
            careful.update(session.time([i for i in order if i in unsure or i in tied], "full"))
    except NoWorkingConfig:
        pass
    results = {i: careful.get(i, replace(screen[i], screened=True)) for i in order}
    return results, (f"halving: screened {len(order)} in {screened_s:.2f}s, "
                     f"timed {len(careful)} carefully")


Notes = list[tuple[str, Any]]


def search(session: Session, order: Sequence[int], specs: dict[int, ConfigSpec], tolerance: float,
           validate: bool = False, exhaustive: bool = False,
           confidence: float = DEFAULT_CONFIDENCE) -> tuple[list[CandidateResult], Notes]:
    """Results for every candidate in ``order`` (failed ones carry their error) and provenance notes."""
    results: dict[int, CandidateResult] = {}
    notes: list[tuple[str, Any]] = []
    clock = time.perf_counter()

    def lap(stage: str) -> None:  # seconds per stage, so a slow tuning says where its time went
        nonlocal clock
        now = time.perf_counter()
        notes.append((f"{stage}_s", round(now - clock, 3)))
        clock = now

    session.precompile(order)
    lap("precompile")
    live = list(order)
    if validate:
        verdicts = session.validate(live)
        lap("validate")
        for i, err in verdicts.items():
            if err is not None:
                results[i] = CandidateResult(i, specs[i], (), err)
        live = [i for i in live if verdicts.get(i) is None]
        notes.append(("validated", len(live)))
    if live:
        if exhaustive or len(live) < HALVING_MIN:
            results.update(session.time(live, "full"))
            notes.append(("search", f"exhaustive: timed {len(live)} carefully"))
        else:
            timed, summary = halving(session, live, tolerance, confidence)
            results.update(timed)
            notes.append(("search", summary))
        lap("timing")
    return [results[i] for i in order], notes
