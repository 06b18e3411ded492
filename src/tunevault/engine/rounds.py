"""Careful GPU timing in short interleaved rounds: every contender once per round, in a new order.

Timing one config in one block measures it at one moment: the GPU's clocks, the memory system
and other work drift over a tuning by more than the block's own spread (an H200 measured a
2 us kernel's block medians 5% apart within one process, each block's spread under 1%), so a
selection that trusts a block's spread ties too little and flips between processes. Short
rounds give every contender the same moments, and the spread of its round medians is the noise
the selection must see. The total timed work per config is the ``full`` effort's, cut in rounds.

Then, given the selection's rule (``Settle``: tolerance and confidence), a contender whose tie
with the fastest could still go either way (its gap lies within two standard errors of the tie
boundary) gets more rounds, with the fastest, until it is settled or ``MAX_ROUNDS`` is reached:
a fresh process then lands on the same side of the boundary unless the true gap sits on it.
Measurement goes only where the decision is uncertain.
"""

from __future__ import annotations

import math
import os
import random
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tunevault.engine.gpu_timing import EFFORT, ConfigTimer, new_flush, refuse_in_capture
from tunevault.engine.select import IQR_SIGMAS, MEDIAN_SE
from tunevault.engine.timing import quantile, spread

ROUNDS = 16
MAX_ROUNDS = 96
SETTLE_SIGMAS = 2.0


@dataclass(frozen=True)
class Settle:
    """The selection's tie rule (engine.select): within ``tolerance``, or not slower at ``confidence``."""

    tolerance: float
    confidence: float


class RoundsResult:
    """Per config: each round's median and every per-launch sample, or the error that stopped it."""

    def __init__(self) -> None:
        self.medians: dict[int, list[float]] = {}
        self.samples: dict[int, list[float]] = {}
        self.errors: dict[int, str] = {}
        self.by_graph: dict[int, bool] = {}
        self.extra_rounds = 0  # rounds added to settle borderline ties

    def summary(self, index: int) -> tuple[tuple[float, float, float], int, float | None]:
        """(center, p20, p80) in ms, the number of rounds and their medians' interquartile range."""
        medians, ordered = self.medians[index], sorted(self.samples[index])
        n, iqr = spread(medians)
        return (statistics.median(medians), quantile(ordered, 0.2), quantile(ordered, 0.8)), n, iqr


    def unsettled(self, settle: Settle) -> list[int]:
        """The fastest and every contender whose tie with it is within SETTLE_SIGMAS of flipping."""
        live = {i: m for i, m in self.medians.items() if len(m) >= 3}
        if len(live) < 2:
            return []
        centers = {i: statistics.median(m) for i, m in live.items()}
        fastest = min(centers, key=lambda i: (centers[i], i))
        noise = statistics.median(_rel_sigma(m) for m in live.values())  # the batch's typical spread

        def se(i: int) -> float:
            return MEDIAN_SE * max(_rel_sigma(live[i]), noise) / math.sqrt(len(live[i]))

        tail = (1.0 - settle.confidence) / (len(live) - 1)  # Bonferroni, as the selection corrects
        z = statistics.NormalDist().inv_cdf(1.0 - tail)
        out = []
        for i in live:
            if i == fastest:
                continue
            gap = centers[i] / centers[fastest] - 1.0
            sigma = math.hypot(se(i), se(fastest))
            boundary = max(settle.tolerance, z * sigma)
            if abs(gap - boundary) < SETTLE_SIGMAS * sigma:
                out.append(i)
        return [fastest, *out] if out else []


def _rel_sigma(medians: list[float]) -> float:
    n, iqr = spread(medians)
    center = statistics.median(medians)
    return 0.0 if iqr is None or center <= 0 else iqr / IQR_SIGMAS / center


def time_in_rounds(calls: Mapping[int, Callable[[], None]], graphs: Mapping[int, object],
                   rounds: int = ROUNDS, late: Callable[[], bool] = lambda: False,
                   settle: Settle | None = None) -> RoundsResult:
    """Time every call in ``rounds`` interleaved rounds, then settle borderline ties (see above);
    ``graphs[i]`` allows graph replay for call i."""
    import torch

    refuse_in_capture()
    warmup_ms, rep_ms, _min, max_reps = EFFORT["full"]
    out = RoundsResult()
    flush = new_flush(torch.cuda.current_device())
    timers: dict[int, ConfigTimer] = {}
    try:
        for i, call in calls.items():
            try:
                timers[i] = ConfigTimer(call, graphs.get(i), warmup_ms, flush)
                out.by_graph[i] = timers[i].by_graph
            except Exception as exc:  # compile errors, out of resources, launch failures: this config loses
                out.errors[i] = f"{type(exc).__name__}: {exc}"[:500]
        # A new order every round, different in every process, so no config always follows another.
        order = random.Random(os.getpid() * 1_000_003 + len(timers))
        per_round = rep_ms / max(1, rounds)
        extra = 0
        for r in range(MAX_ROUNDS):
            if late() and out.medians:
                break
            if r < rounds:
                ring = list(timers.items())
            else:
                want = set(out.unsettled(settle)) if settle is not None else set()
                if not want:
                    break
                ring = [(i, t) for i, t in timers.items() if i in want]
                extra += 1
            order.shuffle(ring)
            for i, timer in ring:
                if i in out.errors:
                    continue
                try:
                    times = timer.round(per_round, 1, max(1, max_reps // rounds))
                except Exception as exc:
                    out.errors[i] = f"{type(exc).__name__}: {exc}"[:500]
                    continue
                out.medians.setdefault(i, []).append(statistics.median(times))
                out.samples.setdefault(i, []).extend(times)
    finally:
        for timer in timers.values():
            timer.close()
    for i in out.errors:
        out.medians.pop(i, None)
        out.samples.pop(i, None)
    out.extra_rounds = extra
    return out
