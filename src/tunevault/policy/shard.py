"""Share out a warmup's keys through the store's leases: many processes, no collective, no waiting.

Every participant walks the same keys, each from its own starting point. A key already decided
counts as decided; a key nobody holds is leased without waiting, tuned through the normal
tuning path (which publishes the decision) and released; a key another process holds is
skipped and revisited later. Only when every key left is held by someone else does a
participant poll the store, with backoff, until those keys are decided or their holders'
leases expire (then it takes them). A participant therefore never waits on a peer while it
still has work, and a peer that dies costs one lease time to live, not a deadlock.

A key whose every config fails is recorded once in the store for the whole fleet: a small JSON
record held as a lease named ``failed:`` + the key's tuning lease (kernel digest, fingerprint,
key), with a time to live, so the others report it with that reason instead of tuning it again.
Only that outcome is recorded: it holds for every process running this kernel source on this
fingerprint. What this process's setup caused (a module that does not import, arguments that do
not rebuild, a store that did not take the decision) is reported here and tried again by the
next process, so fixing the setup is enough. A record is read only for a key whose kernel
imports and that is not decided; it is validated on read (a malformed or older-format one is
ignored); a walk given ``retry_before`` clears and retries records written before that time.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tunevault.capture.replay import WarmupItem
from tunevault.core.events import EventLog
from tunevault.core.model import TuningKey
from tunevault.policy.lease import POLL_S, holding, kept, new_holder, taken_here
from tunevault.store.base import Store, shown

log = logging.getLogger("tunevault")

FAILED_FORMAT = "tunevault-failed-key/2"  # /1 records also held setup failures: ignored
FAILED_PREFIX = "failed:"
FAILED_TTL_S = 3600.0  # how long the fleet trusts a failure before someone tries the key again
MAX_REASON = 400


class Task(Protocol):
    """One key of the warmup, as the participant that walks it sees it."""

    kernel: str  # module:qualname, as the manifest names it
    key: TuningKey  # as the manifest spells it: every item for the task reports this one
    what: str  # "kernel [key]" for messages

    def lease(self) -> str | WarmupItem:
        """The key's tuning lease name, or the outcome when it cannot be tuned here at all."""

    def decided(self) -> bool:
        """Whether the store holds a decision for the key (loading it into this process)."""

    def identity_name(self) -> str | None:
        """The kernel's name as its decisions carry it (``KernelId.name``), once it was imported."""

    def decided_by_name(self) -> bool:
        """Whether the store holds a decision for the key, judged without importing the kernel's
        module (by a digest a peer of this warmup computed); False where that cannot be known
        (then the digest judges, after the import)."""

    def tune(self) -> WarmupItem:
        """Tune the key through the normal tuning path, so its decision is published."""


@dataclass(frozen=True)
class Sharing:
    """How a participant shares: its leases' time to live, how long it trusts a live holder."""

    fingerprint: str  # digest: records are per environment, like decisions (their names carry it)
    lease_ttl: float = 30.0
    lease_wait: float = 600.0  # a key held this long without a decision is tuned here too
    failed_ttl: float = FAILED_TTL_S
    retry_before: float | None = None  # wall-clock time: failure records written before it are retried
    order: tuple[int, ...] = ()  # the order this participant walks the keys in (empty: as listed)


def library(kernel: str) -> str:
    """The top-level package of a ``module:qualname`` kernel: what importing its module imports."""
    return kernel.partition(":")[0].split(".", 1)[0]


def affinity_order(kernels: Sequence[str], me: int, size: int) -> list[int]:
    """Participant ``me`` of ``size``: the keys of the kernels it owns first, then everyone else's
    from the far end.

    Compiling a kernel's configs is most of a cold tuning, and a kernel's later keys reuse its
    compiled configs; participants that each start on a slice of one kernel's keys compile the
    same configs at once. So kernels are dealt out whole (largest first, to the least loaded
    participant: the same deal everywhere, as every participant reads the same list), and a
    participant done with its own helps the others from the end of their lists, where it meets
    their owners last. A library whose keys fit in one participant's fair share is dealt whole
    too: importing it is paid by whoever walks its keys (flash-linear-attention: 11 s on an H200
    host), and two participants that each owned some of its kernels both paid it."""
    groups: dict[str, list[int]] = {}
    for i, kernel in enumerate(kernels):
        groups.setdefault(kernel, []).append(i)
    libraries: dict[str, list[str]] = {}
    for kernel in groups:
        libraries.setdefault(library(kernel), []).append(kernel)
    fair = len(kernels) / max(1, size)
    units: list[tuple[int, list[str]]] = []  # (keys, kernels) dealt to one participant
    for members in libraries.values():
        keys = sum(len(groups[k]) for k in members)
        units.extend([(keys, members)] if keys <= fair else [(len(groups[k]), [k]) for k in members])
    load, owner = [0] * max(1, size), {}
    for keys, unit in sorted(units, key=lambda u: (-u[0], u[1][0])):
        target = min(range(len(load)), key=lambda w: (load[w], w))
        owner.update(dict.fromkeys(unit, target))
        load[target] += keys
    mine = [i for i, k in enumerate(kernels) if owner[k] == me]
    return mine + [i for i in reversed(range(len(kernels))) if owner[kernels[i]] != me]


def failed_record_name(lease: str) -> str:
    """Named by the key's tuning lease: a fixed kernel source (another digest) is tried afresh."""
    return FAILED_PREFIX + lease.partition(":")[2]


def failed_record(item: WarmupItem, identity: str | None = None) -> str:
    """The record of a key whose every config failed. ``identity``: the kernel's name as its
    decisions carry it (``tunevault ls``, ``rm --kernel``), where the manifest names an alias."""
    return json.dumps({"format": FAILED_FORMAT, "kernel": item.kernel, "identity": identity or item.kernel,
                       "key": item.key.text, "status": item.status, "reason": item.reason[:MAX_REASON],
                       "by": f"{socket.gethostname()}:{os.getpid()}", "time": round(time.time(), 3)},
                      separators=(",", ":"))


def read_failed_record(text: str | None, kernel: str, key: TuningKey,
                       written_after: float | None = None) -> WarmupItem | None:
    """The recorded outcome, if ``text`` is a well-formed record for exactly this kernel and key
    (and, given ``written_after``, written at or after that wall-clock time)."""
    if text is None:
        return None
    try:
        rec = json.loads(text)
    except ValueError:
        return None
    if not (isinstance(rec, dict) and rec.get("format") == FAILED_FORMAT and rec.get("kernel") == kernel
            and rec.get("key") == key.text and rec.get("status") == "failed"):
        return None
    written = rec.get("time")
    if written_after is not None and not (isinstance(written, int | float) and written >= written_after):
        return None
    reason, by = rec.get("reason"), rec.get("by")
    reason = reason[:MAX_REASON] if isinstance(reason, str) else "no reason recorded"
    by = by[:200] if isinstance(by, str) else "another process"
    return WarmupItem(kernel, key, "failed", f"{reason} (recorded by {by})", lasting=True)


class _Walk:
    """One participant's pass over the keys; returns when every key is settled."""

    def __init__(self, tasks: Sequence[Task], store: Store, sharing: Sharing, events: EventLog | None,
                 started: Callable[[Task], None] | None) -> None:
        self.tasks, self.store, self.sharing, self.events, self.started = tasks, store, sharing, events, started
        self.first_held: dict[int, float] = {}  # key index -> when this participant first found it held
        self.warned: set[str] = set()

    def emit(self, kind: str, task: Task, **fields: object) -> None:
        if self.events is not None:
            self.events.emit(kind, kernel=task.kernel, key=task.key.to_json(), **fields)

    def attempt(self, i: int) -> WarmupItem | None:
        """The key's outcome, or None when another process holds it (revisit it later)."""
        task = self.tasks[i]
        if task.decided_by_name():  # before lease(), which imports the kernel's module
            return WarmupItem(task.kernel, task.key, "decided")
        lease = task.lease()
        if isinstance(lease, WarmupItem):
            return self.settled(task, lease, None)
        if task.decided():
            return WarmupItem(task.kernel, task.key, "decided")
        record = self.failed_record(task, lease)
        if record is not None:
            return record
        holder = new_holder()
        try:
            taken = self.store.try_lease(lease, holder, self.sharing.lease_ttl)
        except Exception as exc:
            self.warn_once("lease", "tunevault warmup: cannot take tuning leases in %s (%s); tuning without "
                           "them", shown(self.store), exc)
            return self.settled(task, self.tune(task), lease)
        if not taken:
            return self.held(i, task, lease)
        self.emit("lease_taken", task, lease=lease, revisited=i in self.first_held)
        with kept(self.store, lease, holder, task.what) as held:
            if task.decided():  # published while we took the lease: its holder just finished
                return WarmupItem(task.kernel, task.key, "decided")
            with holding(held, self.sharing.lease_ttl):
                item = self.tune(task)
            # Recorded before the lease is released: a peer that takes the key next reads the
            # record, where it would tune a key whose every config fails all over again.
            return self.settled(task, item, lease)

    def held(self, i: int, task: Task, lease: str) -> WarmupItem | None:
        now = time.monotonic()
        if i not in self.first_held:
            self.first_held[i] = now
            self.emit("lease_skipped", task)
            log.debug("tunevault warmup: %s is being tuned by another process; moving on", task.what)
            return None
        since = self.first_held[i]
        if now - since < self.sharing.lease_wait:
            return None
        log.warning("tunevault warmup: %s: no decision after %.0f s while another process holds its lease "
                    "(lease_wait); tuning here too, the first decision published is the one kept",
                    task.what, now - since)
        with taken_here(lease):  # the tuning path must not wait for the holder all over again
            return self.settled(task, self.tune(task), lease)

    def tune(self, task: Task) -> WarmupItem:
        if self.started is not None:
            self.started(task)
        return task.tune()

    def settled(self, task: Task, item: WarmupItem, lease: str | None) -> WarmupItem:
        """Report a key that cannot be tuned: once for the fleet when the outcome is lasting (every
        config failed), else here only (this process's setup: the next one tries again)."""
        if item.status not in ("skipped", "failed"):
            return item
        first = True
        if item.lasting and lease is not None:
            try:
                record = failed_record(item, task.identity_name())
                first = self.store.try_lease(failed_record_name(lease), record, self.sharing.failed_ttl)
            except Exception as exc:
                log.debug("tunevault warmup: could not record %s as not tunable: %s", task.what, exc)
        if first:
            self.emit("key_failed", task, status=item.status, reason=item.reason, recorded=item.lasting)
            log.warning("tunevault warmup: %s %s: %s", item.status, task.what, item.reason)
        return item

    def failed_record(self, task: Task, lease: str) -> WarmupItem | None:
        """The fleet's record that every config of the key failed; with ``retry_before``, a record
        written before then is cleared once (compare-and-delete) and the key tried again."""
        read = getattr(self.store, "lease_holder", None)
        if read is None:
            return None
        name = failed_record_name(lease)
        try:
            text = read(name)
        except Exception as exc:
            self.warn_once("record", "tunevault warmup: cannot read failed-key records (%s)", exc)
            return None
        found = read_failed_record(text, task.kernel, task.key)
        before = self.sharing.retry_before
        if found is None or text is None or before is None:
            return found
        if read_failed_record(text, task.kernel, task.key, written_after=before) is not None:
            return found  # recorded during this run, by a peer that retried it already
        self.store.release(name, text)
        log.info("tunevault warmup: retrying %s, recorded as failed before this run", task.what)
        return None

    def warn_once(self, token: str, msg: str, *args: object) -> None:
        if token not in self.warned:
            self.warned.add(token)
            log.warning(msg, *args)


def share(tasks: Sequence[Task], store: Store, sharing: Sharing, events: EventLog | None = None,
          progress: Callable[[int, int, WarmupItem], None] | None = None,
          started: Callable[[Task], None] | None = None) -> list[WarmupItem]:
    """Settle every task together with whoever else walks the same keys; items in ``tasks`` order.

    ``progress(done, total, item)`` follows each settled key; ``started(task)`` each tuning begun.
    """
    walk = _Walk(tasks, store, sharing, events, started)
    n = len(tasks)
    pending = list(sharing.order) if sorted(sharing.order) == list(range(n)) else list(range(n))
    items: dict[int, WarmupItem] = {}
    pause, waiting = POLL_S[0], False
    while pending:
        left = []
        for i in pending:
            item = walk.attempt(i)
            if item is None:
                left.append(i)
                continue
            items[i] = item
            if progress is not None:
                progress(len(items), n, item)
        progressed, pending = len(left) < len(pending), left
        if not pending:
            break
        if progressed:  # keys may have been freed meanwhile: walk the rest again at once
            pause, waiting = POLL_S[0], False
            continue
        if not waiting:  # every key left is held by another process: only now does this one wait
            waiting = True
            if events is not None:
                events.emit("lease_wait", remaining=len(pending))
            log.info("tunevault warmup: the %d key(s) left are being tuned by other processes; waiting for "
                     "their decisions (or for their leases to expire)", len(pending))
        time.sleep(pause * random.uniform(0.8, 1.2))
        pause = min(pause * 2, POLL_S[1])
    return [items[i] for i in range(n)]
