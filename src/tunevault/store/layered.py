"""Compose the stores the settings name into the one the runtime reads and writes."""

from __future__ import annotations

from tunevault.policy.settings import Settings
from tunevault.store.base import Store, open_store


def open_layered(settings: Settings) -> Store:
    return open_store(settings.store)
