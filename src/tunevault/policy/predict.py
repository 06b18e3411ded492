"""Predict a config for a key no warmup met, from every candidate's timings at decided neighbours.

The miss diagnosis (diagnose.py) names what differs; this chooses what to launch. Categorical
key elements (dtypes, bools, strings, None) must match; numeric ones are compared on a log2
scale. The neighbours are the nearest keys on each side of the gap (``PER_SIDE`` per side and
overall; keys at the same distance as the last one taken come too, so equidistant keys are
never picked by their text). At each neighbour every config's time is normalised by that key's
best, and a config scores the weighted median of its normalised times over the neighbours,
weights inversely proportional to log2 distance, read off the weighted distribution with linear
interpolation (each neighbour sits at the middle of its weight). Lowest score wins.

Why a median, why 1/distance, why interpolated:

- A median is robust: one neighbour cannot drag a config's score unless it holds half the weight.
  A mean with inverse-square weights let the single nearest key decide alone, even when it is an
  outlier its own neighbours contradict (matmul on an H200: M=1536 is the only key where its
  winner wins; predicting M=2048 from it cost 35%), and let one bad neighbour rule a config out.
- 1/distance rather than 1/distance squared: with the squared weights the nearest key holds more
  than half the weight almost everywhere, and the median degenerates into "the nearest key".
- Interpolated: with two neighbours (a bracket) the score moves smoothly between their values,
  so a config good on both sides (10% off each) still beats each side's winner (80% off on the
  other side), as the mean did; with three or more, a config good only where little weight is
  (the "compromise" that is one side's winner and 10% off on the other) no longer beats the
  config the nearer majority rates best. Measured with ``bench/predict_regret.py --reanalyse``.

Pure and cheap: no benchmarking, no device, no store; ``NeighbourTable`` parses decisions once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeGuard

from tunevault.core.model import ConfigSpec, Decision, JsonScalar, TuningKey

PER_SIDE = 2  # neighbours taken below and above the missing key, per numeric element
FAILED_MIN = 4.0  # a config that failed at a neighbour scores at least this (normalised time) there
ABSENT_MARGIN = 0.01  # a config not measured at a neighbour scores 1% over the worst that ran there
NO_TIMINGS_OTHERS = 2.0  # a decision without timings: its winner scores 1, every other config this

Signature = tuple[tuple[str, bool, JsonScalar], ...]


def is_numeric(value: JsonScalar) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def log_coord(value: float) -> float:
    """log2 that also takes 0 and negatives (sizes are >= 1, where it is ~log2)."""
    return math.copysign(math.log2(1.0 + abs(value)), value)


def signature(key: TuningKey) -> Signature:
    """The categorical part of a key: labels in order, values of non-numeric elements."""
    return tuple((label, is_numeric(v), None if is_numeric(v) else v) for label, v in key.items)


def coords(key: TuningKey) -> tuple[float, ...]:
    return tuple(log_coord(float(v)) for _label, v in key.items if is_numeric(v))


@dataclass(frozen=True)
class Prediction:
    """A predicted config (declared index) or, with ``config_index`` None, why there is none."""

    config_index: int | None
    neighbours: tuple[TuningKey, ...] = ()
    penalty: float | None = None  # expected normalised time - 1 (0: as fast as the neighbours' best)
    unmatched: tuple[str, ...] = ()  # "dtype(x): float16 -> float32": categorical elements no decision has
    note: str = ""  # why there is none, where neither of the above says it

    def sources(self) -> str:
        """The neighbours by their numeric elements only (the categorical ones are all equal)."""
        parts = [" ".join(f"{lb}={v}" for lb, v in k.items if is_numeric(v)) or k.describe()
                 for k in self.neighbours]
        return ", ".join(parts)

    def why_not(self) -> str:
        if self.note:
            return self.note
        if self.unmatched:
            return "no decided key matches " + ", ".join(self.unmatched)
        return "no decided key to predict from"

    def to_json(self) -> dict[str, Any]:
        if self.config_index is None:
            return {"config": None, "why": self.why_not()}
        return {"config": self.config_index, "neighbours": [k.to_json() for k in self.neighbours],
                "expected_penalty": None if self.penalty is None else round(self.penalty, 6)}


@dataclass(frozen=True)
class Point:
    """One decided key, parsed: where it is and how each config did there (time / best time)."""

    key: TuningKey
    coords: tuple[float, ...]
    ratios: dict[int, float]  # config index -> normalised time, for configs that ran
    failed: frozenset[int]  # configs that failed to compile or run here
    failed_score: float  # what a failed config scores here
    absent_score: float  # what a config not measured here scores (just over the worst that ran)
    row: tuple[float, ...] = ()  # score per config of the table's ``configs`` (filled by the table)

    def score(self, index: int) -> float:
        ratio = self.ratios.get(index)
        if ratio is not None:
            return ratio
        return self.failed_score if index in self.failed else self.absent_score

    def dense(self, configs: Sequence[int]) -> Point:
        """This point with its scores laid out over ``configs``, so predictions add rows of floats."""
        return replace(self, row=tuple(self.score(i) for i in configs))


def parse(decision: Decision, declared: Sequence[ConfigSpec] | None = None) -> Point | None:
    """A Point from a decision's candidates, keeping only declared configs; None if it says nothing."""

    def valid(index: int, spec: ConfigSpec) -> bool:
        return declared is None or (0 <= index < len(declared) and declared[index] == spec)

    timed = {c.index: c.timings[0] for c in decision.candidates
             if c.ok and c.timings[0] > 0 and valid(c.index, c.config)}
    point_coords = coords(decision.key)
    failed = frozenset(c.index for c in decision.candidates if c.error is not None)
    if not timed:  # tuned alone, or timings not kept: the winner is all we know
        if not valid(decision.config_index, decision.config):
            return None
        return Point(decision.key, point_coords, {decision.config_index: 1.0}, failed, FAILED_MIN,
                     NO_TIMINGS_OTHERS)
    best = min(timed.values())
    ratios = {i: t / best for i, t in timed.items()}
    worst = max(ratios.values())
    return Point(decision.key, point_coords, ratios, failed, max(FAILED_MIN, 2.0 * worst),
                 worst * (1.0 + ABSENT_MARGIN))


class NeighbourTable:
    """One kernel's decisions on one fingerprint, grouped by their categorical elements."""

    def __init__(self, decisions: Iterable[Decision], declared: Sequence[ConfigSpec] | None = None) -> None:
        parsed = [(signature(d.key), parse(d, declared)) for d in decisions]
        self.configs = tuple(sorted({i for _s, p in parsed if p is not None for i in p.ratios}))
        self.groups: dict[Signature, list[Point]] = {}
        for sig, point in parsed:
            if point is not None:
                self.groups.setdefault(sig, []).append(point.dense(self.configs))
        self.spans = {sig: tuple((min(col), max(col)) for col in zip(*(p.coords for p in points), strict=True))
                      for sig, points in self.groups.items()}  # per numeric element: lowest, highest

    def __len__(self) -> int:
        return sum(len(points) for points in self.groups.values())

    def predict(self, key: TuningKey, per_side: int = PER_SIDE) -> Prediction:
        sig = signature(key)
        points = self.groups.get(sig)
        if not points:
            return Prediction(None, unmatched=self.unmatched(key))
        chosen = neighbours(coords(key), points, per_side, self.spans[sig])
        index, score = best_config(chosen, self.configs)
        return Prediction(index, tuple(p.key for p, _w in chosen), max(0.0, score - 1.0))

    def unmatched(self, key: TuningKey) -> tuple[str, ...]:
        """The categorical elements that differ from the nearest group of decided keys."""
        if not self.groups:
            return ()
        mine = signature(key)

        def diffs(sig: Signature) -> list[str]:
            theirs = {label: (num, v) for label, num, v in sig}
            ours = {label: (num, v) for label, num, v in mine}
            out = []
            for label in dict.fromkeys([*theirs, *ours]):
                a, b = theirs.get(label), ours.get(label)
                if a != b and not (a is not None and b is not None and a[0] and b[0]):
                    out.append(f"{label}: {_shown(a)} -> {_shown(b)}")
            return out

        nearest = min((diffs(sig) for sig in self.groups), key=lambda d: (len(d), d))
        return tuple(nearest)


def _shown(entry: tuple[bool, JsonScalar] | None) -> str:
    if entry is None:
        return "(absent)"
    return "(a number)" if entry[0] else str(entry[1])


def neighbours(target: tuple[float, ...], points: Sequence[Point], per_side: int = PER_SIDE,
               spans: Sequence[tuple[float, float]] | None = None) -> list[tuple[Point, float]]:
    """The keys to learn from, each with its weight (inverse log2 distance, summing to 1).

    Per numeric element: the ``per_side`` nearest keys below the missing key and above it, so a
    gap is bracketed whenever decided keys lie on both sides; plus the ``per_side`` nearest overall.
    A key as far as the last one taken on its side (or overall) is taken too: ties are not broken
    by key text. ``spans`` (lowest and highest coordinate per element) saves looking for a side
    that is empty.
    """
    dist = [math.dist(target, p.coords) for p in points]
    exact = [p for p, d in zip(points, dist, strict=True) if d == 0.0]
    if exact:
        return [(p, 1.0 / len(exact)) for p in exact]
    order = sorted(range(len(points)), key=lambda i: dist[i])
    cut = dist[order[min(per_side, len(order)) - 1]]
    picked: dict[int, None] = dict.fromkeys(i for i in order if dist[i] <= cut)
    for j, t in enumerate(target):
        lo, hi = spans[j] if spans else (-math.inf, math.inf)
        if lo == hi == t:
            continue  # this element is the same at every point: no side to bracket
        last = {-1: math.inf if lo >= t else -1.0, 1: math.inf if hi <= t else -1.0}  # side -> cut distance
        taken = {-1: per_side if lo >= t else 0, 1: per_side if hi <= t else 0}
        for i in order:  # nearest first: stop once both sides are filled beyond ties
            v = points[i].coords[j]
            if v == t:
                continue
            side = -1 if v < t else 1
            if taken[side] < per_side or dist[i] <= last[side]:
                taken[side] += 1
                last[side] = dist[i]
                picked[i] = None
            elif all(dist[i] > last[s] for s in (-1, 1)):
                break
    weights = {i: 1.0 / dist[i] for i in picked}
    total = sum(weights.values())
    return [(points[i], w / total) for i, w in sorted(weights.items(), key=lambda kv: -kv[1])]


def best_config(chosen: Sequence[tuple[Point, float]], configs: Sequence[int]) -> tuple[int, float]:
    """The config with the lowest weighted median normalised time, and that median (ties: lowest index).

    A config measured at none of the ``chosen`` points scores above every config measured at one
    (ABSENT_MARGIN), so it is never picked while one that ran is there."""
    weights = [w for _p, w in chosen]
    columns = list(zip(*(p.row for p, _w in chosen), strict=True))  # rows are laid out over configs
    lowest = [min(col) for col in columns]
    best: tuple[float, int] = (math.inf, configs[0])
    # A weighted median is never below its column's lowest value: once that exceeds the best score
    # so far, no later config (in order of lowest value) can win, and most configs go unscored.
    for j in sorted(range(len(configs)), key=lambda j: (lowest[j], configs[j])):
        if lowest[j] > best[0]:
            break
        best = min(best, (weighted_median(columns[j], weights), configs[j]))
    return best[1], best[0]


def weighted_median(values: Sequence[float], weights: Sequence[float]) -> float:
    """The median of ``values`` under ``weights`` (summing to 1), each value at the middle of its
    weight and linear in between: two equal weights give the mean, one weight over half its value."""
    pairs = sorted(zip(values, weights, strict=True))
    below, prev_mid, prev_value = 0.0, -1.0, pairs[0][0]
    for value, weight in pairs:
        mid = below + weight / 2.0
        if mid >= 0.5:
            if prev_mid < 0.0:
                return value
            return prev_value + (value - prev_value) * (0.5 - prev_mid) / (mid - prev_mid)
        below, prev_mid, prev_value = below + weight, mid, value
    return prev_value


def predict(key: TuningKey, decisions: Iterable[Decision], declared: Sequence[ConfigSpec] | None = None,
            per_side: int = PER_SIDE) -> Prediction:
    """One-shot prediction (the runtime keeps a NeighbourTable per kernel instead)."""
    return NeighbourTable(decisions, declared).predict(key, per_side)
