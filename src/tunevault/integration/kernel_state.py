"""Per-kernel state the adapter keeps beside each Autotuner: its key recipe and decided configs.

The raw key (values of ``key`` args + dtype of every tensor arg, exactly Triton's recipe, with
dtype objects instead of their strings) indexes an in-memory dict: a decided call costs one
tuple and one dict lookup. The labelled, JSON-safe TuningKey is built only on a miss.
``bench/dispatch_overhead.py`` measures this path against stock Triton's.
"""

from __future__ import annotations

import threading
from typing import Any

from tunevault.core.model import KernelId, TuningKey

# Exact types whose instances can never have a ``dtype`` attribute (no class attribute, no
# instance dict): skipping them saves a failing ``hasattr`` per scalar argument on the hot path.
_NO_DTYPE = frozenset({int, float, bool, str, bytes, complex, type(None)})
try:
    from torch import Tensor as _Tensor  # the common case, tested first: ``type(a) is _Tensor``
except ImportError:  # pragma: no cover - torch is a dependency; keep the module importable
    _Tensor = None  # type: ignore[assignment,misc]


def is_kernel(autotuner: Any) -> bool:
    """Whether a Triton kernel (JIT or interpreted function) lies under the autotuner's ``.fn``."""
    from tunevault.core.identity import jit_of

    try:
        jit_of(autotuner)
    except TypeError:
        return False
    return True


def dtype_label(dtype: Any) -> str:
    text = str(dtype)
    return text[6:] if text.startswith("torch.") else text


class KernelState:
    __slots__ = ("autotuner", "arg_names", "argset", "keys", "_pos", "_key_refs", "hits", "lock",
                 "_kernel_id", "_specs", "n_hits", "first_logged", "__weakref__")

    def __init__(self, autotuner: Any) -> None:
        self.autotuner = autotuner
        self.arg_names: list[str] = list(autotuner.arg_names)
        self.argset = frozenset(self.arg_names)
        self.keys: list[str] = list(autotuner.keys)
        self._pos = {n: i for i, n in enumerate(self.arg_names)}
        # per number of positional args: where each key value comes from (position, or -1: by name)
        self._key_refs: dict[int, list[tuple[int, str]]] = {}
        self.hits: dict[tuple, tuple[Any, dict[str, Any]]] = {}
        self.lock = threading.RLock()
        self._kernel_id: KernelId | None = None
        self._specs: list[Any] | None = None
        self.n_hits = 0
        self.first_logged = False

    def raw_key(self, args: tuple, kwargs: dict[str, Any]) -> tuple:
        """Triton's key for this call: key arg values, then dtypes of args in ``_args`` order.

        Hot path: no dict of named args is built. Key values come from positions worked out once
        per number of positional args (or by name from ``kwargs``); dtypes from positional args,
        then from keyword args that are kernel args, in call order, as Triton's
        ``{**nargs, **kwargs}`` orders them. (A name given both positionally and by keyword is
        not re-ordered here: such a call cannot launch, the JIT function rejects it.)
        """
        refs = self._key_refs.get(len(args))
        if refs is None:
            refs = self._refs_for(len(args))
        key = []
        for i, name in refs:
            if i >= 0:
                key.append(args[i])
            elif name in kwargs:  # a key arg not passed at all is left out, as Triton does
                key.append(kwargs[name])
        for a in args:
            t = type(a)
            if t is _Tensor or (t not in _NO_DTYPE and hasattr(a, "dtype")):
                key.append(a.dtype)
        if len(kwargs) != 2 or "grid" not in kwargs or "warmup" not in kwargs:  # more than launch's own
            argset = self.argset
            for k, v in kwargs.items():
                t = type(v)
                if t not in _NO_DTYPE and k in argset and (t is _Tensor or hasattr(v, "dtype")):
                    key.append(v.dtype)
        return tuple(key)

    def _refs_for(self, n_args: int) -> list[tuple[int, str]]:
        pos = self._pos
        refs = [(pos[k] if pos[k] < n_args else -1, k) for k in self.keys if k in pos]
        self._key_refs[n_args] = refs
        return refs

    def _raw_key_named(self, named: dict[str, Any]) -> tuple:
        return tuple([named[k] for k in self.keys if k in named]
                     + [v.dtype for v in named.values() if hasattr(v, "dtype")])

    def named_args(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Triton's ``_args``: positional args by name, then keyword args that are kernel args."""
        named = dict(zip(self.arg_names, args, strict=False))
        for k, v in kwargs.items():
            if k in self.argset:
                named[k] = v
        return named

    def labelled_key(self, named: dict[str, Any]) -> TuningKey:
        from tunevault.core.identity import json_scalar

        items: list[tuple[str, Any]] = [(k, json_scalar(named[k])) for k in self.keys if k in named]
        items += [(f"dtype({n})", dtype_label(v.dtype)) for n, v in named.items() if hasattr(v, "dtype")]
        return TuningKey(tuple(items))

    @property
    def kernel_id(self) -> KernelId:
        if self._kernel_id is None:
            from tunevault.core.identity import kernel_id

            self._kernel_id = kernel_id(self.autotuner)
        return self._kernel_id

    @property
    def specs(self) -> list[Any]:
        if self._specs is None:
            from tunevault.core.identity import config_spec

            self._specs = [config_spec(c) for c in self.autotuner.configs]
        return self._specs

    def remember(self, raw_key: tuple, config: Any) -> None:
        self.hits[raw_key] = (config, config.all_kwargs())

    def declared_index(self, index: int, spec: Any) -> int | None:
        """The declared config a stored decision names, or None: entries cannot inject configs."""
        specs = self.specs
        if 0 <= index < len(specs) and specs[index] == spec:
            return index
        return None
