"""Which modules the tuning worker should import before its first key.

A worker that imports a kernel's module (and with it the kernel's whole library) only when the
first key arrives makes that key wait for the import: seconds for a large library. The server
knows those modules earlier: from a key manifest recorded by a previous run, or from its own
imports as it starts (every module that defines an autotuned kernel). The worker imports them
while the server is still starting (engine.isolated sends them).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable

_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_SKIP = ("__main__", "__mp_main__", "tunevault", "triton", "torch")  # nothing to learn, or not importable


def importable(module: str) -> bool:
    """A dotted module name a fresh process could import (not ``__main__``, nor our own)."""
    return bool(_MODULE.fullmatch(module)) and module.split(".", 1)[0] not in _SKIP


def of_targets(targets: Iterable[str]) -> list[str]:
    """The modules of ``module:qualname`` kernel targets (manifest entries, worker targets)."""
    return list(dict.fromkeys(m for t in targets if importable(m := t.partition(":")[0])))


def from_manifest(path: str | os.PathLike[str] | None, key: str | None) -> list[str]:
    """The kernels' modules a key manifest names, of those ``$TUNEVAULT_ALLOW_MODULES`` allows (a
    manifest is untrusted: the worker must not import what the server would refuse to); none when
    there is no readable manifest there, the allow list is malformed, or ``key`` (the installed
    ``bundle_key``, which the server verifies the manifest with) refuses it."""
    if not path or not os.path.isfile(path):
        return []
    try:
        from tunevault.capture import manifest
        from tunevault.capture.locate import allowed_prefixes, module_allowed

        prefixes = allowed_prefixes()
        return [m for m in of_targets(e.kernel for e in manifest.read(path, key=key)) if module_allowed(m, prefixes)]
    except Exception:
        return []


def loaded_kernel_modules(seen: set[str]) -> list[str]:
    """Modules imported in this process since the last call (``seen`` remembers) that define an
    autotuned kernel at their top level. A module whose import is still running (a large library
    takes seconds) is looked at again on a later call, once its kernels exist."""
    from tunevault.capture.locate import kernels_in

    found = []
    for name, module in list(sys.modules.items()):
        if name in seen:
            continue
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            continue  # still being imported: its kernels may not be defined yet; look again next time
        seen.add(name)
        if not importable(name):
            continue
        if next(kernels_in(module), None) is not None:
            found.append(name)
    return found
