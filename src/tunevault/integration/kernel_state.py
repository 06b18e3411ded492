"""Per-kernel state the adapter keeps beside each Autotuner: its key recipe and decided configs.

The raw key (values of ``key`` args + dtype of every tensor arg, exactly Triton's recipe, with
dtype objects instead of their strings) indexes an in-memory dict: a decided call costs one
tuple and one dict lookup. The labelled, JSON-safe TuningKey is built only on a miss.
"""

from __future__ import annotations

import threading
from typing import Any

from tunevault.core.model import KernelId, TuningKey


def dtype_label(dtype: Any) -> str:
    text = str(dtype)
    return text[6:] if text.startswith("torch.") else text


class KernelState:
    __slots__ = ("autotuner", "arg_names", "argset", "keys", "key_pos", "min_args", "hits", "lock",
                 "_kernel_id", "_specs", "n_hits", "first_logged", "__weakref__")

    def __init__(self, autotuner: Any) -> None:
        self.autotuner = autotuner
        self.arg_names: list[str] = list(autotuner.arg_names)
        self.argset = frozenset(self.arg_names)
        self.keys: list[str] = list(autotuner.keys)
        pos = {n: i for i, n in enumerate(self.arg_names)}
        self.key_pos = [pos[k] for k in self.keys if k in pos]
        self.min_args = max(self.key_pos, default=-1) + 1
        self.hits: dict[tuple, tuple[Any, dict[str, Any]]] = {}
        self.lock = threading.RLock()
        self._kernel_id: KernelId | None = None
        self._specs: list[Any] | None = None
        self.n_hits = 0
        self.first_logged = False

    def raw_key(self, args: tuple, kwargs: dict[str, Any]) -> tuple:
        argset = self.argset
        for k in kwargs:
            if k in argset:
                return self._raw_key_named(self.named_args(args, kwargs))
        if len(args) < self.min_args:
            return self._raw_key_named(self.named_args(args, kwargs))
        return tuple([args[i] for i in self.key_pos] + [a.dtype for a in args if hasattr(a, "dtype")])

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
