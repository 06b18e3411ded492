"""What the installed Triton's ``Autotuner.run`` does around a decision, done the same way here.

tunevault changes only *how* a config is decided (stored, tuned once, fallen back to); what a
user or a tool can observe of the autotuner stays stock: the autotuner's own ``prune_configs``
(so each release's pruning rules apply unchanged), ``cache`` keyed by Triton's own key,
``best_config``, ``configs_timings``, ``bench_time``, the ``reset_only`` pre-hook after
benchmarking, ``TRITON_PRINT_AUTOTUNING``'s lines and ``knobs.autotuning.listener``.
Release differences are detected on the installed Triton, never assumed.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from tunevault.core.kernel_state import stock_key as stock_key  # Triton's key (core: capture reads it too)
from tunevault.core.model import CandidateResult

if TYPE_CHECKING:
    from triton import Config
    from triton.runtime.autotuner import Autotuner


@functools.lru_cache(maxsize=1)
def single_pruned_skips_benchmark() -> bool:
    """Whether this Triton decides a key whose pruning leaves one config without benchmarking it.

    Newer releases do (and then neither print nor call the listener); 3.4-3.6 benchmark it.
    Read off the installed ``triton/runtime/autotuner.py`` itself (not ``Autotuner.run``, which
    tunevault replaces), so a release in between is followed too.
    """
    import triton.runtime.autotuner as module

    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return False
    return "len(pruned_configs) == 1" in source


def listener() -> Callable[..., Any] | None:
    """``knobs.autotuning.listener`` where this Triton has one (3.8+) and it is set."""
    try:
        from triton import knobs
    except ImportError:  # pragma: no cover - every supported Triton has knobs
        return None
    return getattr(knobs.autotuning, "listener", None)


def print_enabled() -> bool:
    try:
        from triton import knobs

        return bool(knobs.autotuning.print)
    except (ImportError, AttributeError):  # pragma: no cover
        import os

        return os.environ.get("TRITON_PRINT_AUTOTUNING", "0") == "1"


def timings_by_config(by_index: Mapping[int, Config],
                      results: list[CandidateResult] | tuple[CandidateResult, ...]) -> dict[Config, Any]:
    """``configs_timings`` as Triton fills it: each measured config -> its quantiles, or the one
    number a kernel's own benchmarker returned (stock keeps what it returned); failures inf.

    ``by_index``: the pruned configs by candidate index (a declared index, or ``len(configs)+j``
    for the j-th pruned config the kernel does not declare), so each timing lands on the very
    Config object that was measured, as stock's ``{config: self._bench(...)}`` does. A result
    whose config spec differs from that object's (a stored decision read back) is left out.
    """
    from tunevault.core.identity import config_spec

    out: dict[Config, Any] = {}
    for r in results:
        config = by_index.get(r.index)
        if config is None or config_spec(config) != r.config:
            continue
        if r.scalar:
            out[config] = r.timings[0] if r.ok else float("inf")
        else:
            out[config] = list(r.timings) if r.ok else [float("inf")] * 3
    return out


def after_decision(autotuner: Autotuner, key: tuple, config: Config, timings: dict[Config, Any] | None,
                   bench_time: float | None, fresh: bool) -> None:
    """Fill the autotuner's public state and tell Triton's observers, as stock does after deciding.

    ``fresh``: benchmarked here (stock's ``used_cached_result`` False); otherwise a stored
    decision, which observers see as Triton's disk-cache hit.
    """
    record(autotuner, key, config)
    if timings is not None:
        autotuner.configs_timings = timings
    if fresh and bench_time is not None:
        autotuner.bench_time = bench_time
    notify = listener()
    if notify is not None:
        from tunevault.core.identity import jit_of  # the JIT function under any wrappers

        notify(fn=jit_of(autotuner), key=key, best_config=config,
               configs_timings=getattr(autotuner, "configs_timings", timings),
               duration=bench_time if fresh else None, cache_hit=not fresh)
    if fresh and print_enabled():
        print(f"Triton autotuning for function {autotuner.base_fn.__name__},\nwith key as {key},\n"
              f"finished after {bench_time or 0.0:.2f}s,\nbest config selected: {config};")


def record(autotuner: Autotuner, key: tuple, config: Config) -> None:
    """Put tunevault's decision into ``autotuner.cache`` without invalidating the hot path."""
    cache = autotuner.cache
    if isinstance(cache, MirroredCache):
        cache.record(key, config)
    else:
        cache[key] = config


def forget(autotuner: Autotuner, key: tuple) -> None:
    """Take back tunevault's own entry for ``key`` (a fallback), leaving every other entry and the
    kernel's in-memory hits alone; an entry someone else wrote stays."""
    cache = autotuner.cache
    if isinstance(cache, MirroredCache):
        cache.forget(key)


class MirroredCache(dict):
    """``Autotuner.cache`` while tunevault is installed: a plain dict that tells tunevault when
    someone else changes it, so ``cache.clear()`` still means "decide again" and a config written
    into it by hand is launched, exactly as stock Triton reads its cache.

    Reads are dict's own (no Python in the way); tunevault's own writes use ``dict.__setitem__``.
    """

    __slots__ = ("_on_change", "_own")

    def __init__(self, contents: Mapping[tuple, Config], on_change: Callable[[], None]) -> None:
        super().__init__(contents)
        self._on_change = on_change
        self._own: set[tuple] = set()

    def record(self, key: tuple, config: Config) -> None:
        super().__setitem__(key, config)
        self._own.add(key)

    def forget(self, key: tuple) -> None:
        if key in self._own:
            super().pop(key, None)  # not a change by someone else: no invalidation
            self._own.discard(key)

    def without_own(self) -> dict[tuple, Config]:
        """What stock Triton would have: entries written by others (before install, or by hand)."""
        return {k: v for k, v in self.items() if k not in self._own}

    def drop_own(self) -> None:
        """Take tunevault's entries out, in place and silently (its runtime is being replaced)."""
        for key in self._own:
            super().pop(key, None)
        self._own.clear()

    def _changed(self) -> None:
        self._own.intersection_update(self.keys())
        self._on_change()

    def __setitem__(self, key: tuple, value: Config) -> None:
        super().__setitem__(key, value)
        self._own.discard(key)
        self._on_change()

    def __delitem__(self, key: tuple) -> None:
        super().__delitem__(key)
        self._changed()

    def clear(self) -> None:
        super().clear()
        self._changed()

    def pop(self, *args: Any) -> Any:
        value = super().pop(*args)
        self._changed()
        return value

    def popitem(self) -> tuple[tuple, Config]:
        item = super().popitem()
        self._changed()
        return item

    def setdefault(self, key: tuple, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            super().__setitem__(key, value)
            self._own.discard(key)
        self._on_change()

    # mypy checks __ior__ against dict.__or__'s overloads argument by argument (a dict only), but |= takes
    # any mapping or iterable of pairs, as update does: no signature of what this accepts passes (misc)
    def __ior__(self, other: Any) -> MirroredCache:  # type: ignore[misc]
        self.update(other)
        return self
