"""Serve a miss with a predicted config, and measure that prediction once the key is tuned.

The runtime keeps one ``Predictions``: a parsed neighbour table per kernel, rebuilt when this
process learns a decision of that kernel or after ``MAX_AGE_S`` (so decisions that other
processes publish reach it), and the predictions whose key has not been tuned yet. When the key
is tuned (background tuning, the next warmup), the tuning's own measurements give the
prediction's real regret: the predicted config's time over the winner's, minus one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from tunevault.core.events import Stats
from tunevault.core.model import CandidateResult, ConfigSpec, Decision, KernelId, TuningKey
from tunevault.policy.predict import NeighbourTable, Prediction

if TYPE_CHECKING:
    from triton import Config
    from triton.runtime.autotuner import Autotuner

log = logging.getLogger("tunevault")

MAX_AGE_S = 30.0  # a table older than this is rebuilt on the next miss


class Predictions:
    """Neighbour tables per kernel digest, and predictions waiting for their key's tuning."""

    def __init__(self, max_age_s: float = MAX_AGE_S) -> None:
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._tables: dict[str, tuple[float, NeighbourTable]] = {}
        self._generations: dict[str, int] = {}  # per kernel digest: decisions added so far
        self._pending: dict[tuple[str, str], Prediction] = {}

    def table(self, kernel: KernelId, decisions: Callable[[], Iterable[Decision]],
              declared: Sequence[ConfigSpec] | None = None) -> NeighbourTable:
        now = time.monotonic()
        with self._lock:
            cached = self._tables.get(kernel.digest)
            generation = self._generations.get(kernel.digest, 0)
        if cached is not None and now - cached[0] <= self.max_age_s:
            return cached[1]
        table = NeighbourTable(decisions(), declared)
        with self._lock:  # a decision added while this one was built: keep it for this miss only
            if self._generations.get(kernel.digest, 0) == generation:
                self._tables[kernel.digest] = (now, table)
        return table

    def invalidate(self, kernel_digest: str) -> None:
        """A decision of this kernel was added: the next miss re-reads the decisions."""
        with self._lock:
            self._tables.pop(kernel_digest, None)
            self._generations[kernel_digest] = self._generations.get(kernel_digest, 0) + 1

    def remember(self, kernel: str, key: TuningKey, prediction: Prediction) -> None:
        with self._lock:
            self._pending[(kernel, key.text)] = prediction

    def take(self, kernel: str, key: TuningKey) -> Prediction | None:
        with self._lock:
            return self._pending.pop((kernel, key.text), None)


class PredictingRuntime(Protocol):
    """What this module needs from integration.runtime.Runtime."""

    predictions: Predictions
    stats: Stats

    @property
    def phase(self) -> str: ...

    def decisions_of(self, kernel: KernelId) -> list[Decision]: ...

    def warn_once(self, token: Hashable, msg: str, *args: Any) -> bool: ...


class MissedKernel(Protocol):
    """What this module needs from integration.kernel_state.KernelState."""

    autotuner: Autotuner  # its ``configs`` are what a prediction indexes

    @property
    def kernel_id(self) -> KernelId: ...

    @property
    def specs(self) -> list[ConfigSpec]: ...


def choose_fallback(rt: PredictingRuntime, st: MissedKernel, key: TuningKey, nearest: Callable[[], Config | None],
                    first: Callable[[], Config], allowed: set[int] | None = None,
                    builds: Callable[[Config], bool] = lambda config: True,
                    ) -> tuple[Config, str, dict[str, Any]]:
    """The config a miss launches, what the warning says of it, and the ``fallback`` event's fields.

    A prediction when the decided keys allow one, the call's pruning keeps the predicted config
    (``allowed``: declared indices) and it ``builds`` for this call; else today's rule (the nearest
    decided key's config, as the diagnosis names it, if it builds), else the first config that
    compiles. A neighbour's config may not build here (a tile that fits in shared memory at the
    neighbour's size, not at this one), and a fallback is remembered for every later call of the key.
    """
    prediction = _predict(rt, st, key)
    if prediction.config_index is not None and allowed is not None and prediction.config_index not in allowed:
        prediction = Prediction(None, note=f"the predicted config #{prediction.config_index} is excluded by this "
                                           "call's prune_configs")
    if prediction.config_index is not None and not builds(st.autotuner.configs[prediction.config_index]):
        prediction = Prediction(None, note=f"the predicted config #{prediction.config_index} does not build for "
                                           "this call")
    if prediction.config_index is not None:
        name, config = st.kernel_id.name, st.autotuner.configs[prediction.config_index]
        rt.stats.add(name, rt.phase, "predicted")
        rt.predictions.remember(name, key, prediction)
        words = (f"predicted config {describe_config(config)} from {prediction.sources()} "
                 f"(expected penalty {prediction.penalty:+.1%} vs tuning this key)")
        return config, words, {"predicted": prediction.to_json()}
    config, how = nearest(), "nearest key's"
    if config is not None and not builds(config):
        config = None
    if config is None:
        config, how = first(), "first compiling"
    why = prediction.why_not()
    text = f"{how} config {describe_config(config)}; no prediction: {why}"
    return config, text, {"predicted": None, "not_predicted": why}



def _predict(rt: PredictingRuntime, st: MissedKernel, key: TuningKey) -> Prediction:
    try:
        table = rt.predictions.table(st.kernel_id, lambda: rt.decisions_of(st.kernel_id), st.specs)
        return table.predict(key)
    except Exception as exc:  # a prediction must never break a call: degrade to today's fallback
        rt.warn_once(("predict", st.kernel_id.name, type(exc)), "tunevault: %s: config prediction failed "
                     "(%s: %s); using the nearest key's config", st.kernel_id.name, type(exc).__name__, exc)
        return Prediction(None)


def settle(rt: PredictingRuntime, kernel: str, key: TuningKey, winner: int,
           results: Sequence[CandidateResult]) -> dict[str, Any]:
    """The ``tuning`` event's ``prediction`` field when this key was served by a prediction, else {}."""
    prediction = rt.predictions.take(kernel, key)
    if prediction is None or prediction.config_index is None:
        return {}
    outcome = regret(prediction.config_index, winner, results)
    outcome["expected_penalty"] = prediction.penalty
    if outcome["regret"] is None:
        log.info("tunevault: %s [%s]: predicted config #%d: %s", kernel, key.describe(),
                 prediction.config_index, outcome["note"])
    else:
        log.info("tunevault: %s [%s]: predicted config #%d cost %+.1f%% vs the tuned winner #%d "
                 "(expected %+.1f%%)", kernel, key.describe(), prediction.config_index, 100 * outcome["regret"],
                 outcome["winner"], 100 * (prediction.penalty or 0.0))
    return {"prediction": outcome}


def regret(predicted: int, winner: int, results: Sequence[CandidateResult]) -> dict[str, Any]:
    """Predicted config's time / the winner's - 1, both from one tuning's measurements (or why not)."""
    by_index = {r.index: r for r in results}
    best = by_index.get(winner)
    if best is None or not best.ok:
        best = min((r for r in results if r.ok), key=lambda r: (r.timings[0], r.index), default=None)
    out: dict[str, Any] = {"config": predicted, "winner": winner if best is None else best.index,
                           "regret": None, "measured": False, "note": ""}
    mine = by_index.get(predicted)
    if predicted == out["winner"]:
        out.update(regret=0.0, measured=True)
    elif mine is None:
        out["note"] = "the predicted config was not measured (pruned for this key)"
    elif mine.error is not None:
        out["note"] = f"the predicted config failed here: {mine.error[:200]}"
    elif best is None or not mine.ok or best.timings[0] <= 0:
        out["note"] = "the tuning kept no timings to compare"
    else:
        out.update(regret=mine.timings[0] / best.timings[0] - 1.0, measured=True)
    return out


def describe_config(config: Config) -> str:
    from tunevault.core.identity import describe_config as describe  # imports Triton: not at start-up

    return describe(config)
