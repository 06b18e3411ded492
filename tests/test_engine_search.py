"""Successive halving: screen everything, time only the best carefully, and still pick the best."""

from __future__ import annotations

import torch

import kernels_engine as ke
import tunevault
from tunevault.core.model import CandidateResult, ConfigSpec
from tunevault.engine.search import survivors
from tunevault.integration.triton_adapter import runtime

SPEC = ConfigSpec((), ())


def screened(*medians: float) -> dict[int, CandidateResult]:
    return {i: CandidateResult(i, SPEC, (m, m, m)) for i, m in enumerate(medians)}


def test_survivors_keep_the_best_fraction_and_anything_close_to_the_fastest() -> None:
    order = list(range(8))
    assert survivors(screened(9, 8, 7, 1, 6, 5, 4, 3), order) == [3, 7]  # at least two
    assert survivors(screened(9, 1.03, 7, 1, 6, 1.04, 4, 3), order) == [1, 3, 5]  # and within 5% of the best
    failed = {**screened(2, 1), 1: CandidateResult(1, SPEC, (), "boom")}
    assert survivors(failed, [0, 1]) == [0]


def test_halving_finds_the_fast_config_with_fewer_careful_timings(sqlite_url: str) -> None:
    tunevault.install(mode="tune", store=sqlite_url)
    x, y = torch.randn(64), torch.randn(64)
    assert torch.equal(ke.run_add(ke.add_delayed, x, y), x + y)
    (decision,) = runtime().used.values()
    assert decision.config.to_json()["kwargs"]["DELAY"] == 10  # the one config that does not sleep long
    notes = dict(decision.provenance)
    assert notes["search"].startswith("halving: screened 8 in ")
    careful = int(notes["search"].split("timed ")[1].split()[0])
    assert careful < 8
    assert notes["precompile_s"] >= 0 and notes["timing_s"] > 0  # where the tuning's time went
    assert decision.margin is not None and decision.margin > 1.0  # the runner-up is far behind


def test_one_preempted_screen_run_does_not_screen_out_a_tied_config(sqlite_url: str) -> None:
    # Eight equal configs; the earliest declared is preempted for 50 ms in its first timed run, as
    # a loaded machine's scheduler does. The screen keeps it (its fastest of a few rounds) and it
    # wins the tie, as it does when nothing is preempted.
    ke.HICCUPS["calls"] = 0
    tunevault.install(mode="tune", store=sqlite_url)
    x, y = torch.randn(64), torch.randn(64)
    assert torch.equal(ke.run_add(ke.add_equal8_hiccup, x, y), x + y)
    (decision,) = runtime().used.values()
    assert ke.HICCUPS["calls"] >= 2  # the hiccup happened
    assert dict(decision.provenance)["search"].startswith("halving: screened 8 in ")
    assert decision.config_index == 0, dict(decision.provenance)["selection"]
