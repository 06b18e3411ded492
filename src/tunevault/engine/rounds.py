"""Careful GPU timing in short interleaved rounds: every contender once per round, in a new order.

Timing one config in one block measures it at one moment: the GPU's clocks, the memory system
and other work drift over a tuning by more than the block's own spread (an H200 measured a
2 us kernel's block medians 5% apart within one process, each block's spread under 1%), so a
selection that trusts a block's spread ties too little and flips between processes. Short
rounds give every contender the same moments, and the spread between its rounds is the noise
the selection must see. The total timed work per config is the ``full`` effort's, cut in rounds.

A config's time is its fastest per-launch time over all rounds (each sample already averages
the launches of one graph replay, or is one flushed eager run): noise only ever adds time, and
on an H200 the fastest was the statistic that ranked microsecond configs the same way in every
process (the ratio of two RMSNorm configs: 1.014-1.018 over three processes by the fastest,
1.026-1.058 by the median of round medians; bench/timing_noise.py). The noise the selection sees
is the spread of each round's fastest.

The screen runs the same way, in fewer rounds of less work: a screen that timed one config
after another gave a burst of load on the host all of one config's runs. And one batch is timed
by one method: where a short kernel's graph capture fails for one config, every config of the
batch is timed eagerly (an H200 warmup compared a 2 us kernel's eager 14 us with its rivals'
1.6 us replays, and a matmul screened out by its eager time was the fastest by replay).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from tunevault.engine.failures import ConfigRaised
from tunevault.engine.gpu_timing import EFFORT, ConfigTimer, new_flush, refuse_in_capture
from tunevault.engine.timing import quantile, spread

if TYPE_CHECKING:
    from triton.runtime.autotuner import Autotuner

ROUNDS = {"screen": 4, "full": 16}


class RoundsResult:
    """Per config: each round's fastest and every per-launch sample, or the error that stopped it."""

    def __init__(self) -> None:
        self.fastest: dict[int, list[float]] = {}
        self.samples: dict[int, list[float]] = {}
        self.errors: dict[int, str] = {}

    def summary(self, index: int) -> tuple[tuple[float, float, float], int, float | None]:
        """(fastest, p20, p80) in ms, the number of rounds and the interquartile range of their fastest."""
        fastest, ordered = self.fastest[index], sorted(self.samples[index])
        n, iqr = spread(fastest)
        return (ordered[0], quantile(ordered, 0.2), quantile(ordered, 0.8)), n, iqr


def time_in_rounds(calls: Mapping[int, Callable[[], None]], graphs: Mapping[int, Autotuner | None],
                   effort: str = "full", late: Callable[[], bool] = lambda: False,
                   on_setup: Callable[[int | None], None] | None = None) -> RoundsResult:
    """Time every call in interleaved rounds; ``graphs[i]`` allows graph replay for call i.

    ``on_setup(i)`` is called before config i first runs (a fault then names it), and
    ``on_setup(None)`` once every config has run. A call's error that stock Triton lets reach the
    caller (``ConfigRaised``, failures.raising) ends the timing of every config; any other fault,
    the timer's own included, makes only its config lose."""
    import torch

    refuse_in_capture()
    warmup_ms, rep_ms, _min, max_reps = EFFORT[effort]
    rounds = ROUNDS[effort]
    out = RoundsResult()
    flush = new_flush(torch.cuda.current_device())
    timers: dict[int, ConfigTimer] = {}
    try:
        for i, call in calls.items():
            if on_setup is not None:
                on_setup(i)
            try:
                timers[i] = ConfigTimer(call, graphs.get(i), warmup_ms, flush)
            except ConfigRaised:
                raise
            except Exception as exc:  # out of resources, the timer's own faults: this config loses
                out.errors[i] = f"{type(exc).__name__}: {exc}"[:500]
        if on_setup is not None:
            on_setup(None)
        one_method(timers, warmup_ms)
        # A new order every round, different in every process, so no config always follows another.
        order = random.Random(os.getpid() * 1_000_003 + len(timers))
        per_round = rep_ms / rounds
        for _r in range(rounds):
            if late() and out.fastest:
                break
            ring = list(timers.items())
            order.shuffle(ring)
            for i, timer in ring:
                if i in out.errors:
                    continue
                try:
                    times = timer.round(per_round, 1, max(1, max_reps // rounds))
                except ConfigRaised:
                    raise
                except Exception as exc:
                    out.errors[i] = f"{type(exc).__name__}: {exc}"[:500]
                    continue
                out.fastest.setdefault(i, []).append(min(times))
                out.samples.setdefault(i, []).extend(times)
    finally:
        for timer in timers.values():
            timer.close()
    for i in out.errors:
        out.fastest.pop(i, None)
        out.samples.pop(i, None)
    return out


def one_method(timers: Mapping[int, ConfigTimer], warmup_ms: float) -> None:
    """Every timer replays a graph, or none does: a config whose capture failed (twice) times the
    whole batch eagerly, since a replay and an eager run of one kernel measure different things."""
    wanted = [t for t in timers.values() if t.wants_graph]
    for timer in wanted:
        if timer.replay is None:
            timer.capture()  # once more: a capture can fail for a passing reason
    if any(t.replay is None for t in wanted):
        for timer in wanted:
            timer.eager_only(warmup_ms)
