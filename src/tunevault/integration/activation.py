"""Activation by environment: ``TUNEVAULT_MODE`` switches tunevault on at interpreter start.

The ``tunevault.pth`` startup hook (installed into site-packages by ``pip install``, editable or
not) checks the variable and, only when it is set to a mode other than ``off``, calls
:func:`activate_from_env`. That imports neither Triton nor torch: if Triton is not imported yet, a
one-shot import hook patches ``Autotuner.run`` right after the ``triton`` package has finished
importing (never halfway through it), so a process that never uses Triton pays nothing for it, and
kernels defined before or after are all covered (the patch is on the class).
Every activation (this hook, ``tunevault.install()``, the CLI) shows tunevault's log lines the
same way: see :mod:`tunevault.integration.logs`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, cast

from tunevault.integration.logs import show_logs
from tunevault.policy.settings import Settings, env_problems, warn_once, warn_unknown_variables

if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec
    from types import ModuleType

    from tunevault.capture.recorder import Recorder

log = logging.getLogger("tunevault")

TRIGGER = "triton"  # the package: once it has run, triton.runtime.autotuner is loaded too
_lock = threading.RLock()
_pending: _PatchOnImport | None = None
_settled = False  # installed from the environment or explicitly: the environment no longer applies


def install(settings: Settings) -> Settings:
    global _settled
    cancel_pending()  # an explicit install wins over the environment
    _settled = True
    from tunevault.integration import triton_adapter

    show_logs()
    triton_adapter.install(settings)
    from tunevault.capture import recorder

    recorder.on_install(settings, _CaptureHost())  # key capture follows the runtime
    return settings


def uninstall() -> None:
    global _settled
    cancel_pending()
    _settled = False
    from tunevault.integration import triton_adapter

    triton_adapter.uninstall()
    if "tunevault.capture.recorder" in sys.modules:
        sys.modules["tunevault.capture.recorder"].on_uninstall()


def activate_from_env() -> bool:
    """Install from ``TUNEVAULT_*`` now, or as soon as Triton is imported.

    Returns whether tunevault is (or will be) active; idempotent, never raises: a bad variable
    must not stop the interpreter from starting.
    """
    global _settled
    mode = os.environ.get("TUNEVAULT_MODE", "").strip().lower()
    if not mode or mode == "off":
        return False
    with _lock:
        if _settled:
            return True
        show_logs()
        warn_unknown_variables()
        try:
            settings = Settings.from_env()
        except Exception as exc:
            for problem in env_problems().values() or [str(exc)]:
                warn_once(problem, f"tunevault: not activated from environment: {problem}")
            return False
        _settled = True
        if TRIGGER in sys.modules:
            _install_now(settings)
        else:
            _defer(settings)
        return True


def pending() -> bool:
    """Whether activation waits for Triton to be imported."""
    return _pending is not None


def cancel_pending() -> None:
    global _pending
    with _lock:
        if _pending is not None:
            _remove_finder(_pending)
            _pending = None


def _install_now(settings: Settings) -> None:
    try:
        install(settings)
    except Exception as exc:  # never break the import of Triton or the application's start
        log.warning("tunevault: not activated from environment: %s", exc)


def _defer(settings: Settings) -> None:
    global _pending
    _pending = _PatchOnImport(settings)
    sys.meta_path.insert(0, _pending)


def _remove_finder(finder: _PatchOnImport) -> None:
    with contextlib.suppress(ValueError):
        sys.meta_path.remove(finder)


class _PatchOnImport:
    """A meta path finder that wraps the loader of the ``triton`` package so tunevault installs
    right after it has run (no importlib.abc: importing it costs more than this whole module)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None,
                  ) -> ModuleSpec | None:
        if fullname != TRIGGER or _pending is not self:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = cast("Loader", _PatchingLoader(spec.loader, self))  # duck-typed: no importlib.abc
        return spec


class _PatchingLoader:
    """Delegates to the real loader, then installs; the module keeps the real loader."""

    def __init__(self, loader: Loader, finder: _PatchOnImport) -> None:
        self.loader = loader
        self.finder = finder

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        with _lock:
            if _pending is not self.finder:
                return  # cancelled meanwhile (an explicit install or uninstall)
            cancel_pending()
            _install_now(self.finder.settings)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _CaptureHost:
    """The runtime's side of key capture (capture.recorder.Host): capture sits below the adapter."""

    def installed(self) -> bool:
        from tunevault.integration.triton_adapter import runtime

        return runtime() is not None

    def sign_key(self) -> str | None:
        from tunevault.integration.triton_adapter import runtime

        rt = runtime()
        return None if rt is None else rt.settings.bundle_key

    def attach(self, recorders: Sequence[Recorder]) -> None:
        from tunevault.capture.recorder import Recorder, hit_hook
        from tunevault.integration import triton_adapter

        rt = triton_adapter.runtime()
        if rt is not None:
            rt.observers[:] = [o for o in rt.observers if not isinstance(getattr(o, "__self__", None), Recorder)]
            rt.observers.extend(rec.observe for rec in recorders)
        triton_adapter.set_hit_hook(hit_hook(recorders) if rt is not None else None)
