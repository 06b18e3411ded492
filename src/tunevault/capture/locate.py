"""Find a kernel's Autotuner again from the ``module:qualname`` a manifest recorded.

Capture records the module attribute that holds the kernel (``importable_name``): the Python
function's own name under the decorators when it holds the Autotuner (or a Heuristics over one:
we follow ``.fn`` down), else an alias such as ``tuned = triton.autotune(...)(_kernel)``. A name
that holds the bare ``@triton.jit`` function (manifests captured before aliases were recorded)
is resolved to the Autotuner over it in that module, as long as that is one kernel.

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
import sys
import weakref
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from triton.runtime.autotuner import Autotuner

ALLOW_VAR = "TUNEVAULT_ALLOW_MODULES"
_allowed: tuple[str, ...] | None = None  # set by allow_modules(); else $TUNEVAULT_ALLOW_MODULES
_names: weakref.WeakKeyDictionary[Autotuner, str | None] = weakref.WeakKeyDictionary()  # importable_name's


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


def autotuner_under(obj: Any) -> Autotuner | None:
    """Walk ``.fn`` from a module attribute (an Autotuner, or Heuristics over one) down to its Autotuner."""
    from triton.runtime.autotuner import Autotuner

    for _ in range(32):
        if isinstance(obj, Autotuner):
            return obj
        obj = getattr(obj, "fn", None)
        if obj is None:
            return None
    return None


def kernels_in(module: ModuleType) -> Iterator[tuple[str, Autotuner]]:
    """``(attribute, Autotuner)`` for each top-level attribute of ``module`` that is an autotuned
    kernel; only Triton's own wrapper classes are looked into, so no user code runs."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    try:
        items = list(vars(module).items())
    except TypeError:  # something that is not a module in sys.modules
        return
    for name, value in items:  # type(), not isinstance(): a proxy's __class__ may run code or warn
        if issubclass(type(value), Autotuner | Heuristics) and (found := autotuner_under(value)) is not None:
            yield name, found


def _lookup(module: ModuleType, qualname: str) -> Any:
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def importable_name(autotuner: Autotuner) -> str | None:
    """The ``module:qualname`` where a fresh process finds this very Autotuner: the name of the
    function under the decorators when that attribute holds it, else an attribute of that function's
    module that does (``tuned = triton.autotune(...)(_kernel)``), else one of another loaded module
    (the autotuner applied where the kernel is imported); None when no module attribute holds it."""
    with contextlib.suppress(KeyError, TypeError):
        return _names[autotuner]
    name = _find_name(autotuner)
    with contextlib.suppress(TypeError):
        _names[autotuner] = name
    return name


def _find_name(autotuner: Autotuner) -> str | None:
    base = getattr(autotuner, "base_fn", None)
    module_name, qualname = getattr(base, "__module__", None) or "", getattr(base, "__qualname__", None) or ""
    home = sys.modules.get(module_name)
    if home is not None and "<locals>" not in qualname:
        with contextlib.suppress(Exception):  # a module __getattr__ may raise anything
            if autotuner_under(_lookup(home, qualname)) is autotuner:
                return f"{module_name}:{qualname}"
    modules = [(module_name, home)] if home is not None else []
    modules += [(n, m) for n, m in list(sys.modules.items()) if m is not home and n not in ("__main__", "__mp_main__")]
    for name, module in modules:
        for attr, found in kernels_in(module):
            if found is autotuner:
                return f"{name}:{attr}"
    return None


def find_kernel(module: ModuleType, path: str, digest: str | None = None, captured: str | None = None) -> Autotuner:
    """The Autotuner that ``path`` (``module:qualname``) names in the imported ``module``.

    A name holding the ``@triton.jit`` function itself (the name ``KernelId`` carries, which is what
    a manifest recorded for an aliased kernel) stands for the autotuned kernel(s) over it in that
    module: one kernel, or several with one identity, is taken; among kernels that differ,
    ``digest`` (a KernelId's) picks; without it they cannot be told apart (KernelNotFound).
    ``captured`` (the digest a manifest line recorded) must match: an autotuner a factory built at
    run time is held by no module attribute, and tuning another one over the same function would
    store decisions serving never reads."""
    from tunevault.core.identity import jit_of, kernel_id

    qualname = path.partition(":")[2]
    try:
        obj = _lookup(module, qualname)
        found = autotuner_under(obj)
    except KeyboardInterrupt:
        raise
    except AttributeError:
        raise KernelNotFound(f"module {module.__name__!r} has no attribute {qualname!r}") from None
    except BaseException as exc:  # a module __getattr__ or property may run anything
        raise KernelNotFound(f"{path}: looking it up raised {type(exc).__name__}: {exc}"[:500]) from None
    if found is not None:
        return found
    over: dict[int, tuple[list[str], Autotuner]] = {}  # distinct Autotuners over ``obj``, with their names
    for attr, autotuner in kernels_in(module):
        with contextlib.suppress(TypeError):
            if jit_of(autotuner) is obj:
                over.setdefault(id(autotuner), ([], autotuner))[0].append(attr)
    if not over and captured is None:
        raise KernelNotFound(f"{path} is not an @triton.autotune kernel")
    kinds = {kernel_id(at).digest: (names, at) for names, at in over.values()}
    if captured is not None:
        if captured in kinds:
            return kinds[captured][1]
        raise KernelNotFound(f"{path}: the captured kernel (digest {captured}) is held by no attribute of "
                             f"module {module.__name__!r}: it was built at run time (a factory, such as "
                             "per-dtype variants kept in a dict), or its code changed since capture; tune it in "
                             "the process that builds it (call it there before tunevault.seal(): on_miss='tune' "
                             "tunes it in process)")
    if digest is not None and digest in kinds:
        return kinds[digest][1]
    if len(kinds) == 1:
        return next(iter(kinds.values()))[1]
    names = ", ".join(f"{module.__name__}:{n}" for names, _ in over.values() for n in names)
    raise KernelNotFound(f"{path} is the @triton.jit function of several autotuned kernels that differ "
                         f"({names}): which one was captured cannot be told; capture again (manifests now "
                         "name the attribute that holds the kernel)")


def import_autotuner(path: str, captured: str | None = None) -> Autotuner:
    """The ``triton.runtime.autotuner.Autotuner`` that ``module:qualname`` names (see ``find_kernel``;
    ``captured``: the digest the manifest line recorded, None for lines from before it was)."""
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
    return find_kernel(obj, path, captured=captured)
