"""Hypothesis side of the hostile-input suite: the example budget and the document strategy.

Budget: the ``ci`` profile (30 examples per test, derandomized, no example database) runs by
default, about 15 s for the whole fuzz file on 2 cores; ``TUNEVAULT_FUZZ=thorough`` runs 500
examples per test with fresh randomness (several minutes). The documents and the CLI check are
in ``hostile_docs`` (shared with bench/hostile.py, which needs no hypothesis).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from hostile_docs import cli, env, mutate

__all__ = ["FUZZ", "cli", "env", "mutated"]

T = TypeVar("T")
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
          HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_QUIET, print_blob=True)
settings.register_profile("thorough", max_examples=500, deadline=None, database=None,
                          suppress_health_check=_QUIET, print_blob=True)
FUZZ = settings(settings.get_profile(os.environ.get("TUNEVAULT_FUZZ", "ci")))


class _Draws:
    """hostile_docs' Chooser on hypothesis draws, so a failing document shrinks."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw

    def choice(self, options: Sequence[T]) -> T:
        return self.draw(st.sampled_from(options))

    def randint(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))


@st.composite
def mutated(draw: st.DrawFn, valid: Any) -> str:
    """``valid`` (a JSON value) with one to three hostile mutations, as JSON text."""
    return mutate(_Draws(draw), valid)
