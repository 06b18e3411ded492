"""Under Triton's interpreter, launches take turns.

The interpreter runs a launch on process-wide state: one builder holds the program id every
program reads, and ``triton.language`` is patched for the launch's duration. Two threads launching
at once read each other's program ids (``x >= grid_dim[0]``) or an unpatched ``tl``. Stock Triton
launches only from the threads its user starts; tunevault adds one of its own (background
tuning), so while it is installed every interpreted launch takes its turn: autotuned kernels' and
the user's plain ``@triton.jit`` kernels' alike, at the interpreter's one launcher
(``GridExecutor.__call__``). On a GPU nothing changes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

# Reentrant: a config's hook may launch another kernel. Read at each launch (a forked child gets a new one).
launch_turn = threading.RLock()
_original_call: Callable[..., Any] | None = None  # GridExecutor.__call__ while ours replaces it


def _taking_turns(original: Callable[..., Any]) -> Callable[..., Any]:
    def __call__(self: object, *args: Any, **kwargs: Any) -> Any:
        with launch_turn:
            return original(self, *args, **kwargs)

    return __call__


def start() -> None:
    """Under the interpreter, make every launch take its turn (idempotent; nothing on a GPU)."""
    global _original_call
    from tunevault.core.machine import interpreting

    if _original_call is not None or not interpreting():
        return
    try:
        from triton.runtime.interpreter import GridExecutor
    except ImportError:  # a Triton without the interpreter's launcher: nothing launches there
        return
    _original_call = GridExecutor.__call__
    GridExecutor.__call__ = _taking_turns(_original_call)


def stop() -> None:
    """Give the interpreter its own launcher back (uninstall)."""
    global _original_call
    if _original_call is None:
        return
    from triton.runtime.interpreter import GridExecutor

    GridExecutor.__call__ = _original_call
    _original_call = None


def _new_turn_in_child() -> None:
    """A thread launching at a fork does not exist in the child: its turn would never end there."""
    global launch_turn
    launch_turn = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_turn_in_child)
