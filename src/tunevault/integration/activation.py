"""Activation by environment: ``TUNEVAULT_MODE`` switches tunevault on at interpreter start.

The ``.pth`` startup hook calls :func:`activate_from_env`; when the variable is unset it
returns after one dictionary lookup and imports nothing (not even triton).
"""

from __future__ import annotations

import logging
import os

from tunevault.policy.settings import Settings

log = logging.getLogger("tunevault")


def install(settings: Settings) -> Settings:
    from tunevault.integration import triton_adapter

    triton_adapter.install(settings)
    return settings


def uninstall() -> None:
    from tunevault.integration import triton_adapter

    triton_adapter.uninstall()


def activate_from_env() -> None:
    mode = os.environ.get("TUNEVAULT_MODE", "").strip().lower()
    if not mode or mode == "off":
        return
    try:
        install(Settings.from_env())
    except Exception as exc:  # a bad variable must not stop the interpreter from starting
        log.warning("tunevault: not activated from environment: %s", exc)
