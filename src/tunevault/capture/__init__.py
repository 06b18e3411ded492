"""Key capture: which keys real traffic meets, and how to rebuild their arguments.

The package is also callable, so ``with tunevault.capture(path):`` works while
``tunevault.capture.argspec`` and friends stay ordinary submodules (a function of the same
name in ``tunevault/__init__.py`` would be overwritten by, or shadow, this package).
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import os
    from contextlib import AbstractContextManager

    from tunevault.capture.recorder import Recorder


class _CallableModule(types.ModuleType):
    def __call__(self, path: str | os.PathLike[str], flush_interval: float = 10.0) -> AbstractContextManager[Recorder]:
        """Record every key resolved inside the ``with`` block to the JSON-lines manifest ``path``."""
        from tunevault.capture.recorder import capture

        return capture(path, flush_interval)


sys.modules[__name__].__class__ = _CallableModule
