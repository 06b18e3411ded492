"""Validation: configs that write wrong values, or different values run to run, are excluded."""

from __future__ import annotations

import pytest
import torch
import triton

import kernels_engine as ke
import tunevault
from tunevault.integration.triton_adapter import runtime


def checked_decision():
    (decision,) = [d for (name, _), d in runtime().used.items() if name.endswith(":add_checked")]
    return decision


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "worker"])
def test_wrong_and_racy_configs_are_excluded(sqlite_url: str, isolate: bool) -> None:
    tunevault.install(mode="tune", store=sqlite_url, validate=True, isolate=isolate)
    x, y = torch.randn(1000), torch.randn(1000)
    x0, y0 = x.clone(), y.clone()
    out = ke.run_add(ke.add_checked, x, y)
    assert torch.equal(out, x0 + y0)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # validation restored every input it touched

    decision = checked_decision()
    by = {c.index: c for c in decision.candidates}
    assert by[1].error is not None and by[1].error.startswith("invalid: ")
    assert "out_ptr vs first config (#0)" in by[1].error
    assert by[2].error is not None and by[2].error.startswith("nondeterministic")
    assert by[0].ok and by[3].ok
    assert decision.config_index in (0, 3)
    prov = dict(decision.provenance)
    assert prov["validated"] == 2 and prov["tuned_in"] == ("worker" if isolate else "process")


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "worker"])
def test_a_worker_killed_mid_validation_keeps_the_reference(sqlite_url: str, isolate: bool) -> None:
    """#1 kills the worker after #0 passed: its replacement still compares with #0, so the
    wrong-tail #2 is excluded (not made the reference, excluding the good #3), as in process."""
    tunevault.install(mode="tune", store=sqlite_url, validate=True, isolate=isolate)
    x, y = torch.randn(1000), torch.randn(1000)
    assert torch.equal(ke.run_add(ke.add_checked_kill, x, y), x + y)

    (decision,) = [d for (name, _), d in runtime().used.items() if name.endswith(":add_checked_kill")]
    by = {c.index: c for c in decision.candidates}
    assert by[2].error is not None and by[2].error.startswith("invalid: "), by[2].error
    assert "vs first config (#0)" in by[2].error
    assert by[0].ok and by[3].ok
    assert by[1].ok != isolate  # it kills only the worker
    assert decision.config_index in ((0, 3) if isolate else (0, 1, 3))


def test_validation_checks_what_the_call_writes_in_place(sqlite_url: str) -> None:
    """Each validation run is prepared as stock prepares the call after tuning (the autotuner's
    ``pre_hook(reset_only=True)``, the config's ``pre_hook``, the launch) and has no ``post_hook``:
    ``_bench``'s ``restore_value`` post_hook would put back the very output being checked."""
    tunevault.install(mode="tune", store=sqlite_url, validate=True)
    x, y = torch.randn(1000), torch.randn(1000)
    expected = x + y
    n = x.numel()
    ke.add_into_checked[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, n)
    assert torch.equal(x, expected)
    (decision,) = [d for (name, _), d in runtime().used.items() if name.endswith(":add_into_checked")]
    by = {c.index: c for c in decision.candidates}
    assert by[1].error is not None and "x_ptr vs first config (#0)" in by[1].error, by[1].error
    assert by[0].ok and by[2].ok


def test_without_validation_the_wrong_config_is_just_timed(sqlite_url: str) -> None:
    tunevault.install(mode="tune", store=sqlite_url)
    x, y = torch.randn(1000), torch.randn(1000)
    ke.run_add(ke.add_checked, x, y)
    assert all(c.ok for c in checked_decision().candidates)  # nothing checks outputs by default
