"""The GPU rounds' settling rule (engine/rounds.py) and the worker's reading of it; the timing
itself needs a GPU and is measured by bench/determinism_gpu.py."""

from __future__ import annotations

import random

from tunevault.engine.rounds import RoundsResult, Settle
from tunevault.engine.worker import settle_from

RULE = Settle(tolerance=0.02, confidence=0.999)


def rounds(centers: dict[int, float], noise: float, n: int = 16, seed: int = 0) -> RoundsResult:
    rng = random.Random(seed)
    out = RoundsResult()
    for i, c in centers.items():
        out.medians[i] = [c * (1.0 + rng.gauss(0.0, noise)) for _ in range(n)]
    return out


def test_a_gap_on_the_tolerance_edge_is_unsettled_and_asks_for_the_fastest_too() -> None:
    result = rounds({0: 1.0, 1: 1.021, 2: 1.5}, noise=0.01)
    assert result.unsettled(RULE) == [0, 1]


def test_gaps_far_from_the_edge_are_settled() -> None:
    assert rounds({0: 1.0, 1: 1.001, 2: 1.3}, noise=0.002).unsettled(RULE) == []


def test_more_rounds_settle_what_fewer_could_not() -> None:
    few, many = rounds({0: 1.0, 1: 1.03}, 0.01, n=8, seed=3), rounds({0: 1.0, 1: 1.03}, 0.01, n=200, seed=3)
    assert few.unsettled(RULE) == [0, 1]
    assert many.unsettled(RULE) == []


def test_too_few_rounds_say_nothing() -> None:
    assert rounds({0: 1.0, 1: 1.02}, 0.01, n=2).unsettled(RULE) == []


def test_the_worker_reads_only_a_valid_rule() -> None:
    assert settle_from([0.02, 0.999]) == RULE
    for bad in (None, "0.02", [0.02], [2.0, 0.999], [0.02, 0.2], [0.02, float("nan")], {"tolerance": 0.02}):
        assert settle_from(bad) is None
