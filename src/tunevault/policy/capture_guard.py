"""Never benchmark inside a CUDA graph capture: a miss there is served by a fallback config.

Tuning means synchronising, allocating a flush buffer and timing: inside a capture (or while
another thread captures) that invalidates the capture. So a miss in tune mode during a capture
launches the fallback config (the nearest decided key's, else the first that compiles: no
launch is needed to find it), counts a ``capture_fallbacks``, emits a ``capture_fallback``
event and queues the key for background tuning, which waits until captures are over
(engine.graphs.wait_until_quiet). The captured graph keeps the fallback config; calls after
the key is tuned launch the tuned one.

Whether a capture is in progress is the engine's capture probe (engine.graphs), a seam tests
replace with a predicate of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tunevault.core.model import TuningKey
from tunevault.engine import graphs
from tunevault.policy import background

if TYPE_CHECKING:
    from triton import Config

    from tunevault.core.kernel_state import KernelState
    from tunevault.policy.runtime import Runtime


# The miss path's fallback for this call: (nearest decided key, why, how it is handled) -> config to launch
Fallback = Callable[[TuningKey | None, str, str], "Config"]


def capturing() -> bool:
    """A CUDA graph capture is in progress that tuning on this thread would invalidate."""
    return graphs.probe().anywhere()


def capture_fallback(rt: Runtime, st: KernelState, args: tuple, kwargs: dict[str, Any], key: TuningKey,
                     fallback: Fallback) -> Config:
    """The config to launch for a miss during a capture, found without touching the device."""
    name = st.kernel_id.name
    rt.stats.add(name, rt.phase, "capture_fallbacks")
    message, nearest = rt.explain_miss(st.kernel_id, key)
    rt.events.emit("capture_fallback", kernel=name, key=key.to_json(), phase=rt.phase, diagnosis=message)
    config = fallback(nearest, f"{message}; a CUDA graph is being captured", "tuned once the capture ends")
    # The arguments' ArgSpec cannot be taken now (it reads index tensors back from the device):
    # the job holds them and takes it once the capture is over.
    background.submit(rt, st, args, kwargs, key, during_capture=True)
    return config
