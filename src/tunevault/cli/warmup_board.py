"""One view of a warmup run by several processes: merged outcomes, progress, the final summary.

Every worker reports every key it settles (tuned by it, decided by someone, skipped or failed);
the board merges them per key: tuned by anyone beats failed, which beats skipped, which beats
decided (decided by a key only when nobody in this run tuned it: "already decided").
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from tunevault.capture.replay import STATUSES
from tunevault.cli.output import clean

RANK = {"tuned": 3, "failed": 2, "skipped": 1, "decided": 0}


@dataclass
class WorkerView:
    index: int
    device: str | None  # its CUDA_VISIBLE_DEVICES, or None on a CPU
    pid: int = 0
    tuned: int = 0
    tuning_s: float = 0.0
    current: str = ""
    exit_code: int | None = None
    finished: bool = False  # sent its final report
    # Where a worker's time went, on this process's clock: spawned, ready to walk the keys (its
    # start-up, with the phases it reported), done with the walk, exited (its teardown).
    spawned: float = 0.0
    ready_at: float | None = None
    done_at: float | None = None
    exit_at: float | None = None
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"worker {self.index}" + (f" (GPU {self.device})" if self.device is not None else "")

    def ready(self, msg: dict[str, Any]) -> None:
        """The child's start-up report: it is about to start its first key (or had none to start)."""
        self.ready_at = time.monotonic()
        phases = msg.get("phases")
        if isinstance(phases, dict):
            self.phases = {str(k): round(float(v), 3) for k, v in phases.items() if isinstance(v, int | float)}

    def timeline(self) -> dict[str, float | None]:
        """Seconds: spawn to ready (start-up), ready to done (the walk), done to exit (teardown)."""
        def span(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round(b - a, 3)

        return {"startup_s": span(self.spawned or None, self.ready_at), "walk_s": span(self.ready_at, self.done_at),
                "exit_s": span(self.done_at, self.exit_at)}


@dataclass
class KeyView:
    kernel: str
    key: Any  # the key as JSON: [[label, value], ...]
    status: str
    reason: str = ""
    by: int | None = None  # the worker that tuned it
    seconds: float = 0.0  # its tuning time, as a single-process item says it

    @property
    def describe(self) -> str:
        return " ".join(f"{lb}={v}" for lb, v in self.key) if isinstance(self.key, list) else str(self.key)


@dataclass
class Board:
    total: int
    workers: list[WorkerView]
    keys: dict[str, KeyView] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    spawn_s: float | None = None  # from the run's start until every child was started
    first_tuned: float | None = None  # when the first key was tuned: the rate is measured from there
    order: dict[str, int] = field(default_factory=dict)  # ident -> its place in the manifest, for to_json

    @staticmethod
    def ident(kernel: Any, key: Any) -> str:
        """One key's name on the board, from its kernel and its key as JSON (lists, not tuples)."""
        return json.dumps([kernel, key], sort_keys=True)

    def settle(self, worker: WorkerView, item: dict[str, Any]) -> KeyView | None:
        """Merge a worker's item; returns the key's view when this changed what is known of it."""
        status = item.get("status")
        if status not in STATUSES:
            return None
        ident = self.ident(item.get("kernel"), item.get("key"))
        if status == "tuned":
            self.first_tuned = self.first_tuned or time.monotonic()
            worker.tuned += 1
            worker.tuning_s += float(item.get("seconds") or 0.0)
            worker.current = ""
        have = self.keys.get(ident)
        if have is not None and RANK[have.status] >= RANK[status]:
            return None
        view = KeyView(str(item.get("kernel")), item.get("key"), status, str(item.get("reason") or ""),
                       worker.index if status == "tuned" else None, float(item.get("seconds") or 0.0))
        self.keys[ident] = view
        return view

    @property
    def done(self) -> int:
        return len(self.keys)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float | None:
        """Seconds left at the rate keys have been tuned since the first one; None until there is a rate."""
        tuned = sum(1 for k in self.keys.values() if k.status == "tuned")
        left = self.total - self.done
        if left <= 0:
            return 0.0
        if self.first_tuned is None or tuned < 2:
            return None
        return (time.monotonic() - self.first_tuned) / (tuned - 1) * left

    def counts(self) -> dict[str, int]:
        return {s: sum(1 for k in self.keys.values() if k.status == s) for s in STATUSES}

    @property
    def ok(self) -> bool:
        crashed = any(w.exit_code not in (0, 1) or not w.finished for w in self.workers)
        return self.done == self.total and not crashed and all(
            k.status in ("tuned", "decided") for k in self.keys.values())

    def headline(self) -> str:
        left = self.remaining()
        eta = "" if left is None else f", ~{left:.0f} s left"
        return f"{self.done}/{self.total} keys settled, {self.elapsed():.0f} s elapsed{eta}"

    def to_json(self) -> dict[str, Any]:
        """Every field of a single-process ``--json`` report (items in manifest order), and the workers'."""
        keys = sorted(self.keys.items(), key=lambda kv: self.order.get(kv[0], len(self.order)))
        return {"ok": self.ok, "counts": self.counts(), "seconds": round(self.elapsed(), 3),
                "spawn_s": None if self.spawn_s is None else round(self.spawn_s, 3),
                "workers": [{"worker": w.index, "device": w.device, "pid": w.pid, "tuned": w.tuned,
                             "tuning_s": round(w.tuning_s, 3), "exit_code": w.exit_code, **w.timeline(),
                             "startup_phases": w.phases} for w in self.workers],
                "items": [{"kernel": k.kernel, "key": k.key, "status": k.status, "reason": k.reason,
                           "seconds": round(k.seconds, 6), "worker": k.by} for _, k in keys]}


class PlainDisplay:
    """A line per newly settled key on stderr: for pipes, logs and machines without rich."""

    def __init__(self, board: Board) -> None:
        self.board = board

    def close(self) -> None:
        """Nothing to take down: every line is already printed."""

    def update(self, worker: WorkerView | None = None, view: KeyView | None = None) -> None:
        if view is None or worker is None:
            return
        b = self.board
        reason = f" ({view.reason})" if view.reason else ""
        print(clean(f"[{b.done}/{b.total}] {worker.label}: {view.status} {view.kernel} [{view.describe}]{reason}"
                    f"  | {b.headline()}"), file=sys.stderr, flush=True)


class RichDisplay:
    """A live bar for the whole warmup and a line per worker (what it tunes now, what it tuned)."""

    def __init__(self, board: Board) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.board = board
        self.progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                 console=Console(stderr=True), transient=False)
        self.overall = self.progress.add_task("warmup", total=board.total)
        self.rows = {w.index: self.progress.add_task(w.label, total=board.total) for w in board.workers}
        self.progress.start()

    def close(self) -> None:
        self.update()
        self.progress.stop()

    def update(self, worker: WorkerView | None = None, view: KeyView | None = None) -> None:
        b = self.board
        self.progress.update(self.overall, completed=b.done, description=f"warmup  {b.headline()}")
        for w in b.workers:
            now = f": {w.current}" if w.current else (": finished" if w.finished else "")
            self.progress.update(self.rows[w.index], completed=w.tuned,
                                 description=clean(f"  {w.label} pid {w.pid or '-'}, {w.tuned} tuned{now}")[:110])


def display(board: Board, quiet: bool) -> PlainDisplay | RichDisplay:
    if not quiet and sys.stderr.isatty():
        try:
            return RichDisplay(board)
        except ImportError:
            pass
    return PlainDisplay(board) if not quiet else _Silent(board)


class _Silent(PlainDisplay):
    def update(self, worker: WorkerView | None = None, view: KeyView | None = None) -> None:
        return None
