"""Find a kernel's Autotuner again from the ``module:qualname`` a manifest recorded.

The name is the one ``KernelId`` carries (the Python function under the decorators); the
module attribute it names is the outermost decorator (an Autotuner, or Heuristics wrapping
one), so we follow ``.fn`` down to the Autotuner.

Importing a module runs its code, and a manifest may come from another machine: a manifest is
code. ``allow_modules(prefixes)`` (the CLI's ``--allow-module``, or ``$TUNEVAULT_ALLOW_MODULES``,
comma-separated) limits which modules may be imported; whatever an import raises, ``SystemExit``
included, is a KernelNotFound for that line only (KeyboardInterrupt still stops the command).
A list that is set but empty or malformed (an unset ``$PREFIX`` in a deploy script) is refused,
never read as "any module": only an unset variable means no limit.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from triton.runtime.autotuner import Autotuner

ALLOW_VAR = "TUNEVAULT_ALLOW_MODULES"
_allowed: tuple[str, ...] | None = None  # set by allow_modules(); else $TUNEVAULT_ALLOW_MODULES


class KernelNotFound(LookupError):
    """The manifest names a kernel this process cannot import; the message says why."""


def parse_prefixes(prefixes: Sequence[str]) -> tuple[str, ...]:
    """``--allow-module``'s prefixes, stripped; a ValueError when there is none, or one is empty or
    starts or ends with a dot: an allow list that names nothing must not allow everything."""
    cleaned = tuple(p.strip() for p in prefixes)
    if not cleaned or not all(cleaned) or any(p.startswith(".") or p.endswith(".") for p in cleaned):
        raise ValueError(f"--allow-module needs module prefixes such as 'mypkg.kernels'; got {list(prefixes)!r}")
    return cleaned


def allowed_prefixes() -> tuple[str, ...] | None:
    """The module prefixes a manifest may name, or None for any module (``$TUNEVAULT_ALLOW_MODULES``
    unset). A ValueError when the variable is set but empty or malformed."""
    if _allowed is not None:
        return _allowed
    raw = os.environ.get(ALLOW_VAR)
    if raw is None:
        return None
    try:
        return parse_prefixes(raw.split(","))
    except ValueError:
        raise ValueError(f"${ALLOW_VAR} needs comma-separated module prefixes such as 'mypkg.kernels'; "
                         f"got {raw!r} (unset it to allow any module)") from None


def module_allowed(module: str, prefixes: Sequence[str] | None) -> bool:
    """``pkg`` allows ``pkg`` and ``pkg.sub``, never ``pkgevil``."""
    return prefixes is None or any(module == p or module.startswith(p + ".") for p in prefixes)


@contextlib.contextmanager
def allow_modules(prefixes: Sequence[str] | None) -> Iterator[None]:
    """Only modules under ``prefixes`` may be imported inside the block (None: no limit). Child
    processes (sharded warmup) inherit the limit through ``$TUNEVAULT_ALLOW_MODULES``."""
    global _allowed
    if prefixes is None:
        yield
        return
    cleaned = parse_prefixes(prefixes)
    saved, saved_env = _allowed, os.environ.get(ALLOW_VAR)
    _allowed = cleaned
    os.environ[ALLOW_VAR] = ",".join(cleaned)
    try:
        yield
    finally:
        _allowed = saved
        if saved_env is None:
            os.environ.pop(ALLOW_VAR, None)
        else:
            os.environ[ALLOW_VAR] = saved_env


def import_autotuner(path: str) -> Autotuner:
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
        prefixes = allowed_prefixes()
    except ValueError as exc:  # fail closed: a broken allow list imports nothing
        raise KernelNotFound(f"{exc}; not imported") from None
    if not module_allowed(module_name, prefixes):
        raise KernelNotFound(f"module {module_name!r} is not under an allowed prefix "
                             f"({', '.join(prefixes or ())}; see --allow-module); not imported")
    try:
        obj: Any = importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit from imported code must not end a whole warmup
        raise KernelNotFound(f"module {module_name!r} not importable: {type(exc).__name__}: {exc}"[:500]) from None
    try:
        for part in qualname.split("."):
            obj = getattr(obj, part)
        for _ in range(32):
            if isinstance(obj, Autotuner):
                return obj
            obj = getattr(obj, "fn", None)
            if obj is None:
                break
    except KeyboardInterrupt:
        raise
    except AttributeError:
        raise KernelNotFound(f"module {module_name!r} has no attribute {qualname!r}") from None
    except BaseException as exc:  # a module __getattr__ or property may run anything
        raise KernelNotFound(f"{path}: looking it up raised {type(exc).__name__}: {exc}"[:500]) from None
    raise KernelNotFound(f"{path} is not an @triton.autotune kernel")
