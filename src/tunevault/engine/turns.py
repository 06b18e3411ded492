"""Under Triton's interpreter, launches take turns.

The interpreter runs a launch on process-wide state: one builder holds the program id every
program reads, and ``triton.language`` is patched for the launch's duration. Two threads launching
at once read each other's program ids (``x >= grid_dim[0]``) or an unpatched ``tl``. Stock Triton
launches only from the threads its user starts; tunevault adds one of its own (background
tuning), so its launches and the requests' launches of autotuned kernels take turns. On a GPU
nothing changes: a launch is the kernel's own ``run``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

# Reentrant: a config's hook may launch another autotuned kernel. Read it as ``turns.launch_turn``
# at each launch: a forked child gets a new one.
launch_turn = threading.RLock()


def taking_turns(run: Callable[P, R]) -> Callable[P, R]:
    """``run`` itself on a GPU; under the interpreter, ``run`` holding the launch turn."""
    from tunevault.core.machine import interpreting

    if not interpreting():
        return run

    def turn(*args: P.args, **kwargs: P.kwargs) -> R:
        with launch_turn:
            return run(*args, **kwargs)

    return turn


def _new_turn_in_child() -> None:
    """A thread launching at a fork does not exist in the child: its turn would never end there."""
    global launch_turn
    launch_turn = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_turn_in_child)
