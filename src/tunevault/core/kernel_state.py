"""Per-kernel state the adapter keeps beside each Autotuner: its key recipe and decided configs.

The raw key (a slot per ``key`` arg, then name and dtype of every tensor arg: Triton's recipe with
dtype objects instead of their strings, made unambiguous, see ``key_code.py``) indexes an in-memory
dict: a decided call costs one tuple and one dict lookup. The labelled, JSON-safe TuningKey is
built only on a miss.
``bench/dispatch_overhead.py`` measures this path against stock Triton's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from tunevault.core.forks import renewed_in_child
from tunevault.core.key_code import RawKeyFn, make_raw_key
from tunevault.core.model import ConfigSpec, JsonScalar, KernelId, TuningKey

if TYPE_CHECKING:
    from triton import Config
    from triton.runtime.autotuner import Autotuner

    from tunevault.core.model import Decision

STATE_ATTR = "_tunevault_state"  # where the adapter keeps a KernelState on its Autotuner


def state_of(autotuner: Autotuner) -> KernelState:
    """The adapter's state on ``autotuner`` where it is installed, else a fresh one (not attached):
    what serving judges a stored decision by, for a preflight or a warmup that judges it too."""
    state = autotuner.__dict__.get(STATE_ATTR)
    return state if isinstance(state, KernelState) else KernelState(autotuner)


def stock_key(arg_names: list[str], keys: list[str], args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    """Triton's own tuning key, exactly as ``Autotuner.run`` builds it (dtype as a string)."""
    all_args = {**dict(zip(arg_names, args, strict=False)), **kwargs}
    named = {k: v for k, v in all_args.items() if k in arg_names}
    key = [named[k] for k in keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


def is_kernel(autotuner: Autotuner) -> bool:
    """Whether a Triton kernel (JIT or interpreted function) lies under the autotuner's ``.fn``."""
    from tunevault.core.identity import jit_of

    try:
        jit_of(autotuner)
    except TypeError:
        return False
    return True


def dtype_label(dtype: Any) -> str:  # an argument's ``.dtype``: torch's, numpy's, any
    text = str(dtype)
    return text[6:] if text.startswith("torch.") else text


class KernelState:
    __slots__ = ("autotuner", "arg_names", "argset", "keys", "key_fns", "hits", "lock",
                 "_kernel_id", "_specs", "_configs", "_declared", "n_hits", "n_fallback_hits", "first_logged",
                 "fallback_keys", "__weakref__")

    def __init__(self, autotuner: Autotuner) -> None:
        self.autotuner = autotuner
        self.arg_names: list[str] = list(autotuner.arg_names)
        self.argset = frozenset(self.arg_names)
        self.keys: list[str] = list(autotuner.keys)
        # per number of positional args: Triton's key recipe as straight-line code (key_code.py)
        self.key_fns = _KeyFns(self.arg_names, self.keys)
        # raw key -> (config, its launch kwargs, its pre_hook): everything a hit needs, precomputed
        self.hits: dict[tuple, tuple[Config, dict[str, Any], Callable[..., Any] | None]] = {}
        # held for a whole tuning: a fork meanwhile must not leave the child's first miss waiting
        self.lock = renewed_in_child(self, "lock", threading.RLock)
        self._kernel_id: KernelId | None = None
        self._specs: list[ConfigSpec] | None = None
        # the declared list the identity and specs were made from, and its elements (kept, so that
        # their ids cannot be reused by new objects)
        self._configs: list[Config] = autotuner.configs
        self._declared: tuple[Config, ...] = tuple(autotuner.configs)
        self.n_hits = 0  # in-memory hits (the hot path counts them), fallback hits included
        self.n_fallback_hits = 0  # of those, calls of a key served by its fallback config
        # Triton's keys (the autotuner's ``cache``) served by a fallback config: another raw key of
        # one of them (keywords in another order) is a fallback call too
        self.fallback_keys: set[tuple] = set()
        self.first_logged = False

    def raw_key(self, args: tuple, kwargs: dict[str, Any]) -> tuple:
        """This call's key in the in-memory dict: equal for two calls exactly when Triton's key and
        the labelled key are (key arg values or ``ABSENT`` in ``key=`` order, then name and dtype of
        each arg in ``_args`` order).

        Dtype objects rather than their strings; a name given both positionally and by keyword is
        not re-ordered (such a call cannot launch: the JIT function rejects it).
        """
        return self.key_fns[len(args)](args, kwargs)

    def named_args(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Triton's ``_args``: positional args by name, then keyword args that are kernel args."""
        named = dict(zip(self.arg_names, args, strict=False))
        for k, v in kwargs.items():
            if k in self.argset:
                named[k] = v
        return named

    def labelled_key(self, named: dict[str, Any]) -> TuningKey:
        from tunevault.core.identity import json_scalar

        items: list[tuple[str, JsonScalar]] = [(k, json_scalar(named[k])) for k in self.keys if k in named]
        # In the kernel's parameter order, however the call ordered its keyword arguments: the same
        # dtypes by the same names are one key (the raw key keeps the call's order; both map here).
        items += [(f"dtype({n})", dtype_label(named[n].dtype)) for n in self.arg_names
                  if n in named and hasattr(named[n], "dtype")]
        return TuningKey(tuple(items))

    def earlier_key(self, named: dict[str, Any]) -> TuningKey | None:
        """The key as tunevault labelled it before stop 26 (dtypes in the call's order), where that
        differs: decisions and manifests written then are found under it."""
        key = self.labelled_key(named)
        earlier = key.in_order(list(named))
        return None if earlier == key else earlier

    @property
    def kernel_id(self) -> KernelId:
        if self._kernel_id is None:
            from tunevault.core.identity import kernel_id

            self._kernel_id = kernel_id(self.autotuner)
        return self._kernel_id

    @property
    def specs(self) -> list[ConfigSpec]:
        if self._specs is None:
            from tunevault.core.identity import config_spec

            self._specs = [config_spec(c) for c in self.autotuner.configs]
        return self._specs

    def refresh_configs(self) -> None:
        """Start over when ``autotuner.configs`` was replaced or edited since the identity was made
        (a new list, or other Config objects in it): the kernel's identity (its config hash), the
        specs and the in-memory hits all name positions in the old list. Miss path only."""
        configs = self.autotuner.configs
        if configs is self._configs and len(configs) == len(self._declared) and all(
                a is b for a, b in zip(configs, self._declared, strict=True)):
            return
        from tunevault.core.identity import forget_kernel_id

        self._configs, self._declared = configs, tuple(configs)
        forget_kernel_id(self.autotuner)
        self._kernel_id = None
        self._specs = None
        self.hits.clear()

    def serves_fallback(self, args: tuple, kwargs: dict[str, Any]) -> bool:
        """Whether this call's key is served by a fallback config (a miss not decided): capture
        counts its calls as ``missed``. Off the hot path: computes Triton's key."""
        return bool(self.fallback_keys) and stock_key(self.arg_names, self.keys, args, kwargs) in self.fallback_keys

    def remember(self, raw_key: tuple, config: Config, fallback: bool = False) -> None:
        """What a hit on ``raw_key`` launches. A ``fallback`` config launches through a pre_hook
        that also counts the call, so stats() can tell fallback calls from decided ones without
        the hot path checking which one it launches (fallback calls pay for the hook's call)."""
        pre_hook = config.pre_hook
        if fallback:
            def counting(nargs: dict[str, Any], inner: Callable[..., Any] | None = config.pre_hook) -> None:
                self.n_fallback_hits += 1
                if inner is not None:
                    inner(nargs)

            pre_hook = counting
        self.hits[raw_key] = (config, config.all_kwargs(), pre_hook)

    def declared_index(self, index: int, spec: ConfigSpec) -> int | None:
        """The declared config a stored decision names, or None: entries cannot inject configs.

        The config at ``index`` is read again, not only its cached spec: a Config edited in place
        since would otherwise launch under a decision made for what it was."""
        from tunevault.core.identity import declared_index

        return declared_index(self.autotuner.configs, index, spec, self.specs)

    def stored_index(self, decision: Decision) -> int | None:
        """The declared config a stored ``decision`` launches, or None where serving ignores it
        (UNDECLARED): the one test by which resolve serves a decision and check and warmup count
        its key decided, so that none of them calls a key decided that serving would miss."""
        return self.declared_index(decision.config_index, decision.config)


class _KeyFns(dict[int, RawKeyFn]):
    """Number of positional args -> its raw-key function, generated on first use."""

    __slots__ = ("arg_names", "key_names", "specialised")

    def __init__(self, arg_names: list[str], key_names: list[str]) -> None:
        super().__init__()
        self.arg_names, self.key_names = arg_names, key_names
        self.specialised: set[int] = set()

    def __missing__(self, n_args: int) -> RawKeyFn:
        fn = self[n_args] = make_raw_key(n_args, self.arg_names, self.key_names)
        return fn

    def specialise(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Once per number of positional args, on a miss: code for calls shaped like this one."""
        if len(args) not in self.specialised:
            self.specialised.add(len(args))
            self[len(args)] = make_raw_key(len(args), self.arg_names, self.key_names, (args, kwargs))
