"""Warmup replay: tune every key a manifest captured, so serving finds them decided.

For each (kernel, key): import the kernel, rebuild equivalent arguments from its ArgSpec
(index tensors such as ``cu_seqlens`` keep their captured values), check that they give the
captured key, and call the Autotuner in tune mode so the decision lands in the store. Which
process replays which key is decided by the store's leases (policy/shard.py).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tunevault.capture import manifest as mf
from tunevault.capture.locate import KernelNotFound, import_autotuner
from tunevault.core.model import InvalidEntry, TuningError, TuningKey

if TYPE_CHECKING:
    from triton.runtime.autotuner import Autotuner

    from tunevault.capture.argspec import CallSpec
    from tunevault.core.kernel_state import KernelState
    from tunevault.core.model import Decision, KernelId

log = logging.getLogger("tunevault")

STATUSES = ("tuned", "decided", "skipped", "failed")


@dataclass
class WarmupItem:
    kernel: str
    key: TuningKey
    status: str  # one of STATUSES
    reason: str = ""
    seconds: float = 0.0
    # The outcome holds for every process of this fingerprint (every config failed for the key), so
    # the fleet may be told once; False for what this process's setup caused (an import, a store).
    lasting: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "key": self.key.to_json(), "status": self.status,
                "reason": self.reason, "seconds": round(self.seconds, 6)}


@dataclass
class WarmupReport:
    items: list[WarmupItem] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {s: sum(1 for i in self.items if i.status == s) for s in STATUSES}

    @property
    def ok(self) -> bool:
        """Every captured key is decided now."""
        return all(i.status in ("tuned", "decided") for i in self.items)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "counts": self.counts(), "items": [i.to_json() for i in self.items]}


def rebuild(entry: mf.ManifestEntry, device: str | None = None, seed: int = 0) -> tuple[Autotuner, tuple, dict]:
    """``(autotuner, args, kwargs)`` equivalent to the captured call; raises KernelNotFound/InvalidEntry.

    The key's first captured call is rebuilt; where it is refused (its sizes, or another key), the
    next one the manifest holds for the key is tried, and the first refusal is the one reported."""
    autotuner = import_autotuner(entry.kernel, entry.digest)
    _raw, args, kwargs = _first_rebuilt(autotuner, entry, device, seed)
    return autotuner, args, kwargs


def replayed_callspec(autotuner: Autotuner, entry: mf.ManifestEntry) -> dict[str, Any]:
    """The captured call :func:`rebuild` replays for ``entry``, found on ``meta`` (no memory): what
    compile ahead compiles, so its compiles are the tuning's. Raises InvalidEntry as rebuild does."""
    return _first_rebuilt(autotuner, entry, "meta", 0)[0]


def _first_rebuilt(autotuner: Autotuner, entry: mf.ManifestEntry, device: str | None, seed: int,
                   ) -> tuple[dict[str, Any], tuple, dict]:
    if entry.callspec is None:
        raise InvalidEntry(f"no argspec captured ({entry.callspec_error or 'unknown reason'})")
    refusals: list[InvalidEntry] = []
    for raw in entry.callspecs:
        try:
            args, kwargs = _rebuild_call(autotuner, entry, raw, device, seed)
        except InvalidEntry as exc:
            refusals.append(exc)
            continue
        return raw, args, kwargs
    others = f" (the key's {len(refusals) - 1} other captured call(s) were refused too)" if len(refusals) > 1 else ""
    raise InvalidEntry(f"{refusals[0]}{others}") from refusals[0]


def _rebuild_call(autotuner: Autotuner, entry: mf.ManifestEntry, raw: dict[str, Any], device: str | None,
                  seed: int) -> tuple[tuple, dict]:
    from tunevault.capture.argspec import CallSpec
    from tunevault.core.kernel_state import KernelState

    key = entry.key
    spec = CallSpec.from_json(raw, genuine=entry.signed)
    if device is None:
        _require_captured_devices(spec)
    try:
        args, kwargs = spec.build(autotuner, device=device, seed=seed)
    except InvalidEntry:
        raise
    except Exception as exc:  # torch's text can run to a page: its first line, bounded
        text = (str(exc).strip().splitlines() or [""])[0][:300]
        raise InvalidEntry(f"cannot rebuild arguments: {type(exc).__name__}: {text}") from exc
    state = KernelState(autotuner)
    got = state.labelled_key(state.named_args(args, kwargs))
    if got != key.in_order(list(autotuner.arg_names)):  # a manifest from before keys were in order
        diff = ", ".join(f"{lb}: {a} -> {b}" for lb, a, b in got.differences(key))
        raise InvalidEntry(f"rebuilt arguments give another key ({diff})")
    return args, kwargs


def _require_captured_devices(spec: CallSpec) -> None:
    """A manifest captured on a GPU host, replayed where that GPU is not (a CPU or interpreter
    host): one short reason naming ``--device``, instead of torch's page about ATen_cuda."""
    import torch

    for name in sorted(spec.devices):
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            continue  # build reports it
        if dev.type != "cuda":
            continue
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            have, there = (f"{count} CUDA device(s)", "cuda:0") if count else ("no CUDA device", "cpu")
            raise InvalidEntry(f"captured on {name}, and this host has {have}: pass --device {there} "
                               f"(tunevault.warmup(device={there!r})) to rebuild the arguments there")


def entries(source: str | os.PathLike[str] | Sequence[mf.ManifestEntry], key: str | None) -> list[mf.ManifestEntry]:
    """The manifest's entries; a file is verified with ``key``, the installed settings' ``bundle_key``
    (the key capture signs with, which need not be in ``$TUNEVAULT_BUNDLE_KEY``)."""
    if isinstance(source, str | os.PathLike):
        return mf.read(source, key=key)
    return list(source)


class DecisionLookup(Protocol):
    """What a replay needs from the runtime (policy.runtime.Runtime, a layer above capture)."""

    def lookup(self, kernel: KernelId, key: TuningKey) -> Decision | None: ...

    def published(self, kernel: KernelId, key: TuningKey) -> bool: ...

    def unpublished_why(self, kernel: KernelId, key: TuningKey) -> str: ...

    def read_again(self, kernel: KernelId, key: TuningKey) -> Decision | None: ...

    def forget_fallback(self, state: KernelState, args: tuple, kwargs: dict[str, Any]) -> None: ...

    def decided_by_rule(self, kernel: KernelId, key: TuningKey) -> bool: ...


def decided(rt: DecisionLookup, state: KernelState, key: TuningKey, earlier: TuningKey) -> bool:
    """Whether the store holds a decision for ``key`` (or ``earlier``, the manifest's order) that
    serving launches: one naming no declared config is ignored there (UNDECLARED), so the key is
    tuned again, and the tuning replaces that entry (resolve.tune, Runtime.supersede)."""
    kid = state.kernel_id
    return any((found := rt.lookup(kid, k)) is not None and state.stored_index(found) is not None
               for k in dict.fromkeys((key, earlier)))


def replay_one(rt: DecisionLookup, entry: mf.ManifestEntry, device: str | None) -> WarmupItem:
    """Rebuild the entry's arguments and call its kernel in tune mode; the outcome for the key."""
    from tunevault.core.kernel_state import STATE_ATTR, state_of

    def item(status: str, reason: str = "", seconds: float = 0.0, lasting: bool = False) -> WarmupItem:
        return WarmupItem(entry.kernel, entry.key, status, reason, seconds, lasting)

    try:
        autotuner, args, kwargs = rebuild(entry, device)
    except KernelNotFound as exc:
        return item("skipped", f"kernel not importable: {exc}")
    except InvalidEntry as exc:
        return item("skipped", f"argspec invalid: {exc}")
    if len(autotuner.configs) <= 1:
        return item("decided", "one config: nothing to tune")
    judge = state_of(autotuner)
    kid = judge.kernel_id
    key = entry.key.in_order(list(autotuner.arg_names))  # a manifest may list dtypes in a call's order
    if decided(rt, judge, key, entry.key):
        return item("decided")
    state = autotuner.__dict__.get(STATE_ATTR)
    if state is not None:  # e.g. a fallback config remembered for this key: tune it for real now
        rt.forget_fallback(state, args, kwargs)
    started = time.perf_counter()
    try:
        autotuner.run(*args, **kwargs)
    except Exception as exc:
        return item("failed", f"{type(exc).__name__}: {exc}"[:400], time.perf_counter() - started,
                    lasting=isinstance(exc, TuningError))
    seconds = time.perf_counter() - started
    mine = rt.lookup(kid, key)
    if mine is None:
        if rt.decided_by_rule(kid, key):
            return item("decided", "pruning leaves one config for this call: nothing to tune", seconds)
        return item("failed", "the call ran but no decision was stored", seconds)
    if not rt.published(kid, key):
        why = rt.unpublished_why(kid, key)
        held = rt.read_again(kid, key)  # a write that timed out may have landed all the same
        if held is None or judge.stored_index(held) is None:
            return item("failed", f"tuned, but the decision could not be written to the store ({why})"[:400],
                        seconds)
        if held.config_index != mine.config_index:  # another process's, first writer wins: the fleet's
            return item("decided", "the store holds another process's decision, which stands", seconds)
    return item("tuned", "", seconds)
