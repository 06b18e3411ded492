"""tunevault: persistent, explainable, shared Triton autotuning for production serving.

``install()`` (or ``TUNEVAULT_MODE``) routes every ``@triton.autotune`` kernel through
tunevault; ``seal()`` ends warmup: after it a miss never benchmarks unless asked to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tunevault import capture  # a callable package: ``with tunevault.capture(path): ...``
from tunevault.core.model import TuningError
from tunevault.policy.diagnose import TuningMiss
from tunevault.policy.settings import Settings

if TYPE_CHECKING:
    import os
    from collections.abc import Callable, Sequence

    from torch.distributed import ProcessGroup

    from tunevault.capture.manifest import ManifestEntry
    from tunevault.capture.replay import WarmupItem, WarmupReport
    from tunevault.fleet import AgreementReport
    from tunevault.policy.check import CheckResult

__version__ = "0.1.0"

__all__ = ["Settings", "TuningError", "TuningMiss", "capture", "check", "install", "installed", "seal",
           "stats", "uninstall", "warmup",
           "verify_agreement"]


def install(mode: str = "tune", **options: Any) -> Settings:
    """Route every ``@triton.autotune`` kernel through tunevault. Options override ``TUNEVAULT_*``.

    Options: on_miss, store, remote, bundles, bundle_key, capture, events, isolate, prestart, validate,
    tolerance, tune_timeout, lease_wait, lease_ttl. Calling it again replaces the settings.
    """
    from tunevault.integration import activation

    return activation.install(Settings.for_install(mode=mode, **options))


def uninstall() -> None:
    """Restore stock Triton autotuning exactly."""
    from tunevault.integration import activation

    activation.uninstall()


def installed() -> bool:
    from tunevault.integration.triton_adapter import runtime

    return runtime() is not None


def seal(on_miss: str = "fallback") -> None:
    """End warmup: from now on a miss is handled by ``on_miss`` (fallback, error, background, tune)."""
    from tunevault.integration.triton_adapter import runtime
    from tunevault.policy.settings import ON_MISS

    rt = runtime()
    if rt is None:
        raise RuntimeError("tunevault is not installed: call tunevault.install() or set TUNEVAULT_MODE first")
    if on_miss not in ON_MISS:
        raise ValueError(f"on_miss must be one of {', '.join(ON_MISS)}; got {on_miss!r}")
    if rt.settings.mode == "first" and on_miss != "fallback":
        rt.warn_once(("first-seal", on_miss), "tunevault: seal(on_miss=%r) has no effect in mode 'first': every key "
                     "is decided by rule (the first config that compiles), nothing is benchmarked", on_miss)
    if not rt.sealed:  # in-memory hits so far count as warmup hits in stats()
        import weakref

        from tunevault.integration.triton_adapter import kernel_states

        rt.hits_at_seal = weakref.WeakKeyDictionary({st: (st.n_hits, st.n_fallback_hits) for st in kernel_states()})
    rt.on_miss = on_miss
    rt.sealed = True
    rt.events.emit("seal", on_miss=on_miss)
    _warmup_ended()


def _warmup_ended() -> None:
    """The isolated tuning worker exits now, not after its idle timeout (that is for serving misses)."""
    import sys

    isolated = sys.modules.get("tunevault.engine.isolated")  # never imported just to say so
    if isolated is not None:
        isolated.warmup_ended()


def stats() -> dict[str, Any]:
    """Counters per kernel and phase (``warmup`` before the seal, ``serving`` after).

    Every kernel met, and ``"total"``, has both phases with every counter (0 where nothing
    happened), so ``stats()["kernels"][k]["serving"]["tunings"]`` reads before the seal too."""
    from tunevault.integration.triton_adapter import kernel_states, runtime

    rt = runtime()
    if rt is None:
        return {"installed": False, "kernels": {}}
    from tunevault.core.events import COUNTERS

    snap = rt.stats.snapshot()
    at_seal = rt.hits_at_seal
    for st in kernel_states():  # in-memory hits, split at the seal: decided ones and fallback ones
        now = (st.n_hits, st.n_fallback_hits)
        before = now if at_seal is None else at_seal.get(st, (0, 0))
        for phase, (hits, fallback_hits) in (("warmup", before), ("serving", (now[0] - before[0], now[1] - before[1]))):
            for name in (st.kernel_id.name, "total"):
                if hits:
                    counts = snap.setdefault(name, {}).setdefault(phase, dict.fromkeys(COUNTERS, 0))
                    counts["hits"] += hits - fallback_hits
                    counts["fallback_hits"] += fallback_hits
    for phases in snap.values():
        for phase in ("warmup", "serving"):
            phases.setdefault(phase, dict.fromkeys(COUNTERS, 0))
    return {"installed": True, "sealed": rt.sealed, "on_miss": rt.on_miss, "kernels": snap}


def warmup(manifest: str | os.PathLike[str] | Sequence[ManifestEntry] | None = None, device: str | None = None,
           progress: Callable[[int, int, WarmupItem], None] | None = None) -> WarmupReport:
    """Tune every key a captured manifest lists that has no decision yet; call it on every rank.

    Processes on the same store (SQLite on a host, ``TUNEVAULT_REMOTE`` across hosts) divide the
    keys through leases, never a collective; each returns when every key is settled, with the
    decisions loaded. ``manifest`` defaults to ``$TUNEVAULT_WARMUP``. Returns a report with
    ``counts()`` (tuned / decided / skipped / failed), ``items`` and ``ok``.
    """
    from tunevault.integration.shared_warmup import warmup as shared

    if manifest is None:
        from tunevault.integration.triton_adapter import runtime

        rt = runtime()
        manifest = (rt.settings if rt is not None else Settings.from_env()).warmup
        if manifest is None:
            raise ValueError("tunevault.warmup() needs a manifest (or TUNEVAULT_WARMUP)")
    try:
        return shared(manifest, device=device, progress=progress)
    finally:
        _warmup_ended()


def check(manifest: str | os.PathLike[str] | Sequence[ManifestEntry], store: str | None = None) -> CheckResult:
    """Preflight: which captured keys lack a decision for this machine; the result has ``ok``, ``missing``."""
    from tunevault.policy.check import check as preflight

    return preflight(manifest, store=store)


def verify_agreement(group: ProcessGroup | None = None) -> AgreementReport:
    """Check that every rank of ``group`` launched the same config per key (collective: call on all ranks).

    Returns a report with ``ok`` and ``mismatches`` (kernel, key, configs with their ranks) and logs it.
    """
    from tunevault.fleet import verify_agreement as verify

    return verify(group)
