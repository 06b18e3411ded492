"""Which keys of a warmup compile ahead of their tuning (engine/ahead.py): the next few of this
process's walk, each once, and only what the tuning would compile itself."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

from tunevault.core.machine import available_cores
from tunevault.engine.ahead import AheadJob, CompileAhead
from tunevault.policy.settings import Settings

log = logging.getLogger("tunevault")

AUTO_KEYS = 16  # keys compiling ahead at once when ``compile_ahead`` is left unset, on a GPU


class Ahead(Protocol):
    """A warmup task as the plan sees it."""

    def ahead_job(self) -> AheadJob | None:
        """The key's compile job, or None when it is decided, cannot be tuned, or prunes its configs."""


def keys_ahead(settings: Settings) -> int:
    """How many keys compile ahead: the setting, else 16 on a GPU and none under the interpreter."""
    if settings.compile_ahead is not None:
        return settings.compile_ahead
    from tunevault.core.machine import interpreting

    return 0 if interpreting() else AUTO_KEYS


class AheadPlan:
    """Before each tuning: wait for the helpers if they compile that key, then keep the next
    ``2 * keys`` of the walk queued (the helpers compile ``keys`` of them at once)."""

    def __init__(self, order: Sequence[Ahead], keys: int, claim_timeout: float, cores: int | None = None) -> None:
        self.order, self.claim_timeout = list(order), claim_timeout
        self.position = {id(t): i for i, t in enumerate(self.order)}
        self.ahead = CompileAhead(keys, cores=cores)
        self.tuned: set[int] = set()  # ids of the tasks whose tuning began
        self.planned: set[int] = set()  # ids of the tasks looked at for compiling ahead (once each)
        self.waited_s = 0.0  # tunings held back until the helpers finished their key

    def before(self, task: Ahead) -> None:
        started = time.perf_counter()
        self.ahead.claim(id(task), self.claim_timeout)
        self.waited_s += time.perf_counter() - started
        self.tuned.add(id(task))
        position = self.position.get(id(task))
        if position is None:
            return
        horizon = [t for t in self.order[position + 1:] if id(t) not in self.tuned][:2 * self.ahead.keys]
        for nxt in horizon:
            if id(nxt) in self.planned:
                continue
            self.planned.add(id(nxt))
            try:
                job = nxt.ahead_job()
            except Exception as exc:  # its tuning meets the same problem and reports it
                log.debug("tunevault: compile ahead skips a key: %s", exc)
                job = None
            if job is not None:
                self.ahead.want(id(nxt), job)

    def close(self) -> None:
        self.ahead.close()
        if self.ahead.compiled:
            log.info("tunevault: compile ahead: %d key(s) compiled by the helpers; tunings waited %.1f s for them",
                     self.ahead.compiled, self.waited_s)


def plan_for(settings: Settings, order: Sequence[Ahead], sharers: int = 1) -> AheadPlan | None:
    """The plan of one warmup process; ``sharers`` warmup processes on this host split its cores."""
    keys = keys_ahead(settings)
    if keys <= 0 or len(order) < 2:
        return None
    return AheadPlan(order, keys, settings.tune_timeout, max(2, available_cores() // max(1, sharers)))
