"""tunevault: persistent, explainable, shared Triton autotuning for production serving.

``install()`` (or ``TUNEVAULT_MODE``) routes every ``@triton.autotune`` kernel through
tunevault; ``seal()`` ends warmup: after it a miss never benchmarks unless asked to.
"""

from __future__ import annotations

from typing import Any

from tunevault.policy.diagnose import TuningMiss
from tunevault.policy.resolve import TuningError
from tunevault.policy.settings import Settings

__version__ = "0.1.0"

__all__ = ["Settings", "TuningError", "TuningMiss", "install", "installed", "seal", "stats", "uninstall"]


def install(mode: str = "tune", **options: Any) -> Settings:
    """Route every ``@triton.autotune`` kernel through tunevault. Options override ``TUNEVAULT_*``.

    Options: on_miss, store, remote, bundles, bundle_key, capture, events, isolate, validate,
    tolerance, tune_timeout, lease_wait. Calling it again replaces the settings.
    """
    from tunevault.integration import activation

    return activation.install(Settings.from_env().with_options(mode=mode, **options))


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
    rt.on_miss = on_miss
    rt.sealed = True
    rt.events.emit("seal", on_miss=on_miss)


def stats() -> dict[str, Any]:
    """Counters per kernel and phase (``warmup`` before the seal, ``serving`` after)."""
    from tunevault.integration.triton_adapter import kernel_states, runtime

    rt = runtime()
    if rt is None:
        return {"installed": False, "kernels": {}}
    snap = rt.stats.snapshot()
    for st in kernel_states():
        if st._kernel_id is not None and st.n_hits:
            snap.setdefault(st._kernel_id.name, {}).setdefault("all", {})["hits"] = st.n_hits
    return {"installed": True, "sealed": rt.sealed, "on_miss": rt.on_miss, "kernels": snap}
