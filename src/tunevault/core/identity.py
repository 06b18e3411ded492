"""Stable identities for kernels, configs and the environment a decision was made in.

Everything here must give the same answer in every process that runs the same code on the
same machine: no ids, no addresses, no line numbers. Triton's own ``fn.cache_key`` includes
the kernel's starting line number, so we hash sources ourselves.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import inspect
import math
import os
import re
import socket
import sys
import textwrap
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import triton
import triton.language as tl

from tunevault.core.machine import codegen_env
from tunevault.core.model import ConfigSpec, Fingerprint, JsonScalar, KernelId, canonical_json, digest

if TYPE_CHECKING:
    from types import CodeType

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, KernelInterface

_OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg", "ir_override")
_DEF_RE = re.compile(r"^def\s+\w+\s*\(", re.MULTILINE)
_KERNEL_IDS: weakref.WeakKeyDictionary[KernelInterface, KernelId] = weakref.WeakKeyDictionary()
_FINGERPRINT: tuple[tuple[Any, ...], Fingerprint] | None = None  # (snapshot, fingerprint)


def _qualified(obj: Any) -> str:
    """``module:qualname`` of a function-like object; never an address."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    if not hasattr(obj, "__qualname__"):
        obj = type(obj)
    return f"{getattr(obj, '__module__', None) or '?'}:{obj.__qualname__}"


def json_scalar(value: Any) -> JsonScalar:
    """Reduce a config or key value to a JSON scalar that spells the same in every process."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else repr(float(value))  # JSON has no NaN/inf
    if isinstance(value, str):
        return str(value)
    if isinstance(value, tl.constexpr):
        return json_scalar(value.value)
    if isinstance(value, tl.dtype):
        return str(value)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return json_scalar(value.item())
    if type(value).__repr__ is object.__repr__:  # the default repr carries an address
        return f"<{_qualified(value)}>"
    return repr(value)


def declared_index(configs: Sequence[triton.Config], index: int, spec: ConfigSpec,
                   first_read: Sequence[ConfigSpec] | None = None) -> int | None:
    """The declared config a stored decision names (``index`` and its spec agree), or None: a
    store's entries cannot inject configs. ``first_read``: the specs as the runtime first read
    them, so that a Config edited in place since counts as another config. Torch-free, for
    ``tunevault check``; KernelState.declared_index is the runtime's."""
    if not 0 <= index < len(configs):
        return None
    if first_read is not None and (index >= len(first_read) or first_read[index] != spec):
        return None
    return index if config_spec(configs[index]) == spec else None


def config_spec(cfg: triton.Config) -> ConfigSpec:
    """A Config's meta-parameters and every launch option this Triton version has that is set."""
    kwargs = {str(k): json_scalar(v) for k, v in cfg.kwargs.items()}
    raw = {n: getattr(cfg, n) for n in _OPTION_NAMES if getattr(cfg, n, None) is not None}
    # Options a newer Triton adds to all_kwargs() but we do not know by name yet.
    raw.update((k, v) for k, v in cfg.all_kwargs().items() if k not in cfg.kwargs and v is not None)
    options = tuple(sorted((k, json_scalar(v)) for k, v in raw.items()))
    hook = getattr(cfg, "pre_hook", None)
    return ConfigSpec(tuple(sorted(kwargs.items())), options, None if hook is None else _hook_identity(hook))


def _hook_identity(hook: Callable[..., Any]) -> str:
    """A config's pre_hook by name and by what it computes (identified as a prune function is): a
    changed body or another lambda in its place launches differently, so it is another config."""
    return f"{_qualified(hook)}@{digest(callable_identity(hook))}"


def describe_config(cfg: triton.Config) -> str:
    """A config as log lines and events print it: its meta-parameters and the options that are set
    (``BLOCK=64 num_warps=4``), not ``Config.__str__``'s ``maxnreg: None``."""
    return config_spec(cfg).describe()


@functools.lru_cache(maxsize=1)
def _jit_types() -> tuple[type, ...]:
    """Classes whose instances wrap a kernel-side python function, as far as this Triton has them."""
    from triton.runtime import jit
    from triton.runtime.interpreter import InterpretedFunction

    # JITCallable (3.5+) also covers constexpr_function; the interpreter's class stands alone.
    return (jit.JITFunction, getattr(jit, "JITCallable", jit.JITFunction), InterpretedFunction)


def _is_jit(obj: Any) -> bool:
    return isinstance(obj, _jit_types()) and inspect.isfunction(getattr(obj, "fn", None))


def _in_triton(obj: Any) -> bool:
    """Triton's own modules and helpers: covered by the fingerprint's Triton version."""
    mod = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", None) or ""
    return mod == "triton" or mod.startswith("triton.")


def _source(jit_obj: Any) -> str:  # anything _is_jit accepts
    """The kernel-side source without decorators, as Triton sees it (``.src`` may be patched)."""
    for attr in ("src", "_src"):
        src = getattr(jit_obj, attr, None)
        if isinstance(src, str):
            return src
    try:
        src = textwrap.dedent(inspect.getsource(jit_obj.fn))
    except (OSError, TypeError):
        return f"<no source: {_qualified(jit_obj.fn)}>"
    m = _DEF_RE.search(src)
    return src[m.start():] if m else src


def _code_names(code: CodeType) -> list[str]:
    """Global and attribute names a code object and its nested code objects mention."""
    names = list(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names += _code_names(const)
    return names


def _jit_options(jit_obj: Any) -> dict[str, Any]:
    """The ``@triton.jit`` options that change generated code, where not the default: ``debug``,
    ``noinline`` (stock's cache key has it for every dependency), ``do_not_specialize`` and
    ``do_not_specialize_on_alignment``. The interpreter's function keeps them in ``kwargs`` (up to
    Triton 3.4, in its rewriter's)."""
    kwargs = getattr(jit_obj, "kwargs", None)
    if not isinstance(kwargs, dict):
        kwargs = getattr(getattr(jit_obj, "rewriter", None), "kwargs", None)
    given: dict[str, Any] = kwargs if isinstance(kwargs, dict) else {}
    options: dict[str, Any] = {}
    for name in ("debug", "noinline", "do_not_specialize", "do_not_specialize_on_alignment"):
        value = given.get(name, getattr(jit_obj, name, None))
        if isinstance(value, bool | None):
            if value:
                options[name] = True
        elif isinstance(value, Iterable) and not isinstance(value, str) and (listed := sorted(map(str, value))):
            options[name] = listed
    return options


class _Walker:
    """Collects a kernel's JIT dependencies and constexpr globals, following globals recursively."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.sources: list[str] = []
        self.constexprs: set[tuple[str, str]] = set()

    def function(self, jit_obj: Any) -> None:  # anything _is_jit accepts
        fn = jit_obj.fn
        if id(fn) in self.seen:
            return
        self.seen.add(id(fn))
        options = _jit_options(jit_obj)
        # only when set: a function with default jit options keeps the identity it always had
        self.sources.append(_source(jit_obj) + (f"\n# jit {canonical_json(options)}" if options else ""))
        scope = dict(fn.__globals__)
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=False):
            try:
                scope[name] = cell.cell_contents
            except ValueError:  # an empty cell
                continue
        attrs = list(dict.fromkeys(_code_names(fn.__code__)))
        for name in dict.fromkeys([*attrs, *fn.__code__.co_freevars]):
            if name in scope:
                self.value(scope[name], name, attrs, set())

    def value(self, val: Any, path: str, attrs: Iterable[str], containers: set[int]) -> None:
        if _is_jit(val):
            if not _in_triton(val.fn):
                self.function(val)
        elif isinstance(val, tl.constexpr):
            self.constexprs.add((path, repr(json_scalar(val.value))))
        elif (inspect.ismodule(val) or inspect.isclass(val)) and not _in_triton(val):
            if id(val) in containers:
                return
            containers.add(id(val))
            for attr, sub in _static_attributes(val, attrs):
                self.value(sub, f"{path}.{attr}", attrs, containers)


def _static_attributes(owner: Any, names: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """The attributes ``names`` of a module or class, as defined (no descriptor runs: reading must
    not execute user code), a static or class method as its function."""
    for name in names:
        try:
            sub = inspect.getattr_static(owner, name)
        except AttributeError:
            continue
        yield name, sub.__func__ if isinstance(sub, staticmethod | classmethod) else sub


def jit_of(obj: KernelInterface) -> JITFunction | InterpretedFunction:
    """Walk ``.fn`` from an Autotuner through any Heuristics down to the JIT function."""
    step: Any = obj  # each wrapper's ``.fn``, an untyped attribute
    for _ in range(32):
        if _is_jit(step):
            return step
        step = getattr(step, "fn", None)
    raise TypeError("not a Triton kernel: no JITFunction/InterpretedFunction under .fn")


USER_CALLABLE_DEPTH = 3  # helper functions followed from a prune function, a perf model, a heuristic
_CONTAINER_DEPTH = 4  # nesting followed inside a container a user function reads
_CONTAINER_TEXT = 4096  # longer canonical contents are summarised by their digest
_NOT_USERS = frozenset({"triton", "torch", "numpy", "builtins", "functools", "math", "typing", "tunevault"})


def _canonical(value: Any, depth: int = 0) -> Any:
    """An immutable container's contents as JSON that spells the same in every process (a
    frozenset sorted by its elements' canonical form: its iteration order follows
    ``PYTHONHASHSEED``). A mutable one (list, dict, set) by its type only: it may be a cache or a
    counter the process fills as it runs (a prune function memoising its answers), and an identity
    that moves with it would make every restart tune again. Constants that decide pruning belong
    in tuples and frozensets."""
    if depth >= _CONTAINER_DEPTH:
        return "<...>"
    if isinstance(value, tuple):
        return {"tuple": [_canonical(v, depth + 1) for v in value]}
    if isinstance(value, frozenset):
        return {"set": sorted((_canonical(v, depth + 1) for v in value), key=canonical_json)}
    if isinstance(value, list | set | dict):
        return {"mutable": type(value).__name__}
    return json_scalar(value)


def _value_text(value: Any) -> JsonScalar:
    """A value a user function reads (a default, a closure cell, a global): a scalar as
    ``json_scalar`` spells it (so identities made before containers counted stay), a container as
    ``_canonical`` spells it, digested when long."""
    if not isinstance(value, tuple | list | set | frozenset | dict):
        return json_scalar(value)
    text = canonical_json(_canonical(value))
    return text if len(text) <= _CONTAINER_TEXT else f"digest:{digest(text, 32)}"


def _state(obj: Any) -> str:
    """An object's instance attributes: what a callable object's ``__call__`` or a bound method's
    ``self`` may read besides its code (each as ``_value_text`` spells it: a cache by its type)."""
    attrs = getattr(obj, "__dict__", None)
    if not isinstance(attrs, dict) or inspect.ismodule(obj) or inspect.isclass(obj):
        return "{}"
    return repr(sorted((str(k), _value_text(v)) for k, v in attrs.items()))


def _users_object(obj: Any) -> bool:
    """A module or class of the user's, not of Python's standard library, torch or Triton."""
    name = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", None) or ""
    root = name.partition(".")[0]
    return root not in _NOT_USERS and root not in sys.stdlib_module_names


def _callable_object(value: Any) -> bool:
    """A bound method or an instance of a user class with ``__call__``: code plus state."""
    if inspect.ismethod(value):
        return inspect.isfunction(value.__func__) and _users(value.__func__)
    return (not inspect.isroutine(value) and not inspect.isclass(value) and not inspect.ismodule(value)
            and inspect.isfunction(inspect.getattr_static(type(value), "__call__", None))
            and _users_object(type(value)))


def callable_identity(fn: Callable[..., Any], _seen: set[int] | None = None, _depth: int = 0) -> str:
    """What a user function (a prune function, a perf model, a heuristic) computes, as text that
    is the same in every process: its source (else its bytecode), closure values and defaults
    (keyword-only ones too), and the module globals it reads: scalars and containers by value (a
    threshold that moves a heuristic's choice), the attributes it reads of the user's modules and
    classes (``S.MAXB``), the user's own helper functions, callable objects and bound methods by
    their identity and state, a few levels deep."""
    seen = set() if _seen is None else _seen
    seen.add(id(fn))
    parts: list[str] = []
    while isinstance(fn, functools.partial):
        parts.append(repr([_value_text(a) for a in fn.args]) + repr(sorted((k, _value_text(v)) for k, v in
                                                                          fn.keywords.items())))
        fn = fn.func
    if _callable_object(fn):  # its code is __call__'s (or the method's), its state the instance's
        parts += [_qualified(fn), "state " + _state(getattr(fn, "__self__", fn))]
        fn = fn.__func__ if inspect.ismethod(fn) else type(fn).__call__
    parts.append(_qualified(fn))
    code = getattr(fn, "__code__", None)
    try:
        parts.append(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError):
        if code is not None:
            parts.append(code.co_code.hex() + repr([json_scalar(c) for c in code.co_consts if not inspect.iscode(c)]))
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        parts.append(_dependency(value, seen, _depth) if callable(value) else repr(_value_text(value)))
    parts.append(repr([_value_text(d) for d in getattr(fn, "__defaults__", None) or ()]))
    kwdefaults = getattr(fn, "__kwdefaults__", None)
    if kwdefaults:  # only when present: functions without keyword-only defaults keep their identity
        parts.append("kwdefaults " + repr(sorted((str(k), _value_text(v)) for k, v in kwdefaults.items())))
    scope = getattr(fn, "__globals__", None)
    if code is not None and isinstance(scope, dict):
        names = sorted(set(_code_names(code)))
        for name in names:
            if name in scope:  # else an attribute name, or a builtin
                parts += _global_parts(name, scope[name], names, seen, _depth, set())
    return "\n".join(parts)


def _global_parts(path: str, value: Any, attrs: list[str], seen: set[int], depth: int,
                  followed: set[int]) -> list[str]:
    """What a global a user function reads contributes to its identity. Modules and classes of the
    user's are followed through the attribute names the function mentions, as the kernel-side
    walker follows them (``S.MAXB``, ``P.limit()``)."""
    if value is None or isinstance(value, bool | int | float | str | tl.constexpr):
        return [f"global {path}={json_scalar(value)!r}"]
    if isinstance(value, tuple | list | set | frozenset | dict):
        return [f"global {path}={_value_text(value)!r}"]
    if (inspect.isfunction(value) and _users(value)) or _callable_object(value):
        return [f"global {path}: {_dependency(value, seen, depth)}"]
    if (inspect.ismodule(value) or inspect.isclass(value)) and _users_object(value) and id(value) not in followed:
        followed.add(id(value))
        parts: list[str] = []
        for attr, sub in _static_attributes(value, attrs):
            parts += _global_parts(f"{path}.{attr}", sub, attrs, seen, depth, followed)
        return parts
    return []


def _users(fn: Callable[..., Any]) -> bool:
    """A function of the user's, not of Python, torch or Triton (their versions are in the fingerprint)."""
    module = getattr(fn, "__module__", None) or ""
    return module.partition(".")[0] not in _NOT_USERS


def _dependency(value: Callable[..., Any], seen: set[int], depth: int) -> str:
    """A callable a user function reaches: its identity while within depth, else its name."""
    if id(value) in seen or depth + 1 >= USER_CALLABLE_DEPTH:
        return _qualified(value)
    if not (inspect.isfunction(value) and _users(value)) and not _callable_object(value):
        return _qualified(value)
    return callable_identity(value, seen, depth + 1)


def _recipe(autotuner: KernelInterface) -> dict[str, Any]:
    """Everything besides the kernel source that changes which configs are eligible for a key or
    how a config launches: the autotuner's pruning and any ``@triton.heuristics`` under it."""
    recipe: dict[str, Any] = {}
    prune = {name: callable_identity(fn) for name in ("early_config_prune", "perf_model")
             if (fn := getattr(autotuner, name, None)) is not None}
    if prune.get("perf_model") is not None:
        prune["top_k"] = repr(json_scalar(getattr(autotuner, "configs_top_k", None)))
    if prune:
        recipe["prune"] = prune
    heuristics, obj = [], getattr(autotuner, "fn", None)
    for _ in range(32):
        if obj is None or _is_jit(obj):
            break
        values = getattr(obj, "values", None)
        if isinstance(values, dict):
            heuristics.append({str(k): callable_identity(v) for k, v in values.items()})
        obj = getattr(obj, "fn", None)
    if heuristics:
        recipe["heuristics"] = heuristics
    return recipe


def _method_functions(attr: Any) -> list[Callable[..., Any]]:
    """The functions behind a class attribute: a method, a property's accessors, a cached
    property's function, a static or class method's function."""
    if isinstance(attr, staticmethod | classmethod):
        attr = attr.__func__
    if isinstance(attr, property):
        return [f for f in (attr.fget, attr.fset, attr.fdel) if f is not None]
    if isinstance(attr, functools.cached_property):
        return [attr.func]
    return [attr] if inspect.isfunction(attr) else []


def _benchmarker(autotuner: KernelInterface) -> dict[str, Any]:
    """How the autotuner measures a config, where it is not Triton's default: a ``do_bench`` it was
    given (or one assigned to the instance), a ``_bench`` assigned to the instance, and for an
    ``Autotuner`` subclass its qualified name and the methods its classes define. Two autotuners
    over one kernel that measure differently may choose differently, so they share no decision."""
    from triton.runtime.autotuner import Autotuner

    bench: dict[str, Any] = {}
    attrs = getattr(autotuner, "__dict__", {})
    own = attrs.get("_do_bench")
    if callable(own):
        bench["do_bench"] = callable_identity(own)
    assigned = attrs.get("do_bench")
    # stock's cached ``do_bench`` leaves ``_do_bench`` or the driver's benchmarker in the instance
    if callable(assigned) and assigned is not own and _users(assigned):
        bench["assigned_do_bench"] = callable_identity(assigned)
    instance_bench = attrs.get("_bench")
    if callable(instance_bench):
        bench["_bench"] = callable_identity(instance_bench)
    cls = type(autotuner)
    if isinstance(autotuner, Autotuner) and cls is not Autotuner:
        methods: dict[str, list[str]] = {}
        for klass in cls.__mro__:
            if klass is Autotuner or not issubclass(klass, Autotuner):
                continue  # Triton's own class: covered by the fingerprint's Triton version
            for name, attr in sorted(vars(klass).items()):
                if name not in methods and (fns := _method_functions(attr)):
                    methods[name] = [callable_identity(f) for f in fns]
        bench["class"] = _qualified(cls)
        bench["methods"] = sorted(methods.items())
    return bench


def kernel_id(autotuner: KernelInterface) -> KernelId:
    """The KernelId of an Autotuner (or bare JIT function), cached per object."""
    with contextlib.suppress(TypeError):  # not weak-referenceable: not a kernel either
        if (cached := _KERNEL_IDS.get(autotuner)) is not None:
            return cached
    jit_obj = jit_of(autotuner)
    base = getattr(autotuner, "base_fn", None)
    base = base if inspect.isfunction(base) else jit_obj.fn
    walker = _Walker()
    walker.function(jit_obj)
    # Dependencies by source alone, not by name: the caller's source already names them.
    source: dict[str, object] = {"kernel": walker.sources[0], "deps": sorted(walker.sources[1:]),
                                 "constexprs": sorted(walker.constexprs)}
    recipe = _recipe(autotuner)
    if recipe:  # only when present, so plain kernels keep the identity they always had
        source["recipe"] = recipe
    bench = _benchmarker(autotuner)
    if bench:  # likewise: the default benchmarker adds nothing
        source["bench"] = bench
    configs = [config_spec(c).to_json() for c in getattr(autotuner, "configs", None) or []]
    keys = tuple(str(k) for k in getattr(autotuner, "keys", None) or ())
    kid = KernelId(_qualified(base), digest(source), digest(configs), keys)
    with contextlib.suppress(TypeError):
        _KERNEL_IDS[autotuner] = kid
    return kid


def forget_kernel_id(autotuner: KernelInterface) -> None:
    """Drop the cached KernelId, so the next ``kernel_id`` hashes the autotuner's configs again."""
    with contextlib.suppress(TypeError):
        _KERNEL_IDS.pop(autotuner, None)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET``)."""
    try:
        return bool(triton.knobs.runtime.interpret)
    except Exception:
        return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _target() -> str:
    try:
        target = triton.runtime.driver.active.get_current_target()
        return f"{target.backend}:{target.arch}"
    except Exception:
        return "unknown"


def _ptxas_version(target: str) -> str | None:
    """``ptxas --version`` through Triton's cached helper; its signature differs across versions."""
    if not target.startswith("cuda:"):
        return None
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        try:
            text = get_ptxas_version(int(target.split(":", 1)[1]))  # 3.5+: ptxas depends on arch
        except TypeError:
            text = get_ptxas_version()  # 3.4
        m = re.search(r"V(\d+(?:\.\d+)+)", str(text))
        return m.group(1) if m else None
    except Exception:
        return None


# Variables that change generated code without being in Triton's cache-invalidating list: Triton
# turns them into compile options (debug, ptxas options) or code-generator behaviour.
def current_fingerprint(refresh: bool = False) -> Fingerprint:
    """Where decisions made in this process are valid. Cached under a snapshot of what can change
    while the process runs (the codegen environment, which ``triton.knobs`` setters write too, the
    Triton version, the interpreter switch), so a process that sets ``knobs.language.fp32_default``
    after its first tuning files later decisions under the new fingerprint. Read on every miss,
    never on the hot path; the snapshot costs a read of a few environment variables."""
    global _FINGERPRINT
    env = codegen_env()
    interp = interpreting()
    snapshot = (env, triton.__version__, interp)
    if _FINGERPRINT is not None and not refresh and _FINGERPRINT[0] == snapshot:
        return _FINGERPRINT[1]
    import torch

    target = "interpreter" if interp else _target()
    device = "cpu"
    if not interp:  # never initialise CUDA for the interpreter
        try:
            if torch.cuda.is_available():
                device = torch.cuda.get_device_name()
        except Exception:
            device = "unknown"
    hip = getattr(torch.version, "hip", None)
    cuda = torch.version.cuda or (f"hip-{hip}" if hip else "none")
    ptxas = None if interp else _ptxas_version(target)
    if ptxas:
        cuda = f"{cuda};ptxas={ptxas}"
    fingerprint = Fingerprint(triton=triton.__version__, target=target, device=device, cuda=cuda, env=env)
    _FINGERPRINT = (snapshot, fingerprint)
    return fingerprint


def _tunevault_version() -> str:
    """The running source's version first: an editable install's metadata can be stale."""
    version = getattr(sys.modules.get("tunevault"), "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version("tunevault")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _rank() -> int | str | None:
    raw = (os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "").strip()
    return (int(raw) if raw.isdigit() else raw) if raw else None


def provenance() -> tuple[tuple[str, JsonScalar], ...]:
    """Who made a decision and when; sorted, as Decision.from_json sorts it."""
    prov = {"host": socket.gethostname(), "pid": os.getpid(), "rank": _rank(), "time": time.time(),
            "triton": triton.__version__, "tunevault": _tunevault_version()}
    return tuple(sorted(prov.items()))
