"""Find a kernel's Autotuner again from the ``module:qualname`` a manifest recorded.

The name is the one ``KernelId`` carries (the Python function under the decorators); the
module attribute it names is the outermost decorator (an Autotuner, or Heuristics wrapping
one), so we follow ``.fn`` down to the Autotuner.
"""

from __future__ import annotations

import importlib
from typing import Any


class KernelNotFound(LookupError):
    """The manifest names a kernel this process cannot import; the message says why."""


def import_autotuner(path: str) -> Any:
    """The ``triton.runtime.autotuner.Autotuner`` that ``module:qualname`` names."""
    from triton.runtime.autotuner import Autotuner

    module_name, sep, qualname = path.partition(":")
    if not sep or not module_name or not qualname:
        raise KernelNotFound(f"{path!r} is not 'module:qualname'")
    if "<locals>" in qualname:
        raise KernelNotFound(f"{path} is defined inside a function: define the kernel at module level")
    if module_name == "__main__":
        raise KernelNotFound(f"{path} was defined in a script's __main__: move the kernel into a module")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise KernelNotFound(f"module {module_name!r} not importable: {type(exc).__name__}: {exc}") from None
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise KernelNotFound(f"module {module_name!r} has no attribute {qualname!r}") from None
    for _ in range(32):
        if isinstance(obj, Autotuner):
            return obj
        obj = getattr(obj, "fn", None)
        if obj is None:
            break
    raise KernelNotFound(f"{path} is not an @triton.autotune kernel")
