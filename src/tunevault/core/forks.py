"""Locks a fork renews.

A thread that holds a lock when the process forks does not exist in the child, so there the lock
stays held for ever and the child's next use of it waits for nobody. An object whose lock another
thread may hold at that moment (a kernel's for a whole tuning, the runtime's while the store
opens, a counter's for an instant) makes it with :func:`renewed_in_child`: in a forked child it
gets a new one.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_owners: weakref.WeakKeyDictionary[object, dict[str, Callable[[], object]]] = weakref.WeakKeyDictionary()
_registering = threading.Lock()


def renewed_in_child(owner: object, attr: str, make: Callable[[], T]) -> T:
    """``make()``, to be ``owner.<attr>``; in every forked child ``owner.<attr>`` is ``make()`` afresh."""
    with _registering:
        _owners.setdefault(owner, {})[attr] = make
    return make()


def _renew_in_child() -> None:
    global _registering
    _registering = threading.Lock()
    for owner, attrs in list(_owners.items()):
        for attr, make in attrs.items():
            setattr(owner, attr, make())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_in_child)
