"""Install tunevault under every ``@triton.autotune`` kernel by replacing ``Autotuner.run``.

Patching the class reaches kernels defined before and after installation; ``uninstall``
puts the original method back and drops the per-kernel state, restoring stock behaviour.
The hot path (a decided key) is: one attribute read, one tuple, one dict lookup, the launch.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from tunevault.core.kernel_state import STATE_ATTR, KernelState, is_kernel
from tunevault.engine import turns
from tunevault.policy.resolve import resolve
from tunevault.policy.runtime import Runtime
from tunevault.policy.settings import Settings
from tunevault.policy.stock import MirroredCache

if TYPE_CHECKING:
    from triton.runtime.autotuner import Autotuner

    HitHook = Callable[[KernelState, tuple, tuple, dict[str, Any]], None]  # hook(state, raw_key, args, kwargs)

log = logging.getLogger("tunevault")

_lock = threading.RLock()
_original_run: Any = None  # stock Autotuner.run while installed, else None (Any: _run calls it with no None check)
_runtime: Runtime | None = None
_attached: weakref.WeakSet[Autotuner] = weakref.WeakSet()
_mirrored: weakref.WeakSet[Autotuner] = weakref.WeakSet()  # whose ``cache`` is a MirroredCache now
_NO_ATTR = object()
_hit_hook: HitHook | None = None  # key capture's counter, set only while capturing


def _attach(autotuner: Autotuner) -> KernelState | None:
    """The autotuner's state, made on its first call; None for one tunevault leaves to stock Triton
    (an Autotuner over something that is not a Triton kernel, as Triton's own tests build)."""
    with _lock:
        if STATE_ATTR in autotuner.__dict__:
            return autotuner.__dict__[STATE_ATTR]
        state = KernelState(autotuner) if is_kernel(autotuner) else None
        setattr(autotuner, STATE_ATTR, state)
        _attached.add(autotuner)
        return state


def _on_change(autotuner: Autotuner) -> Callable[[], None]:
    """What a MirroredCache calls when someone else changes it: the hot path's own dict forgets."""
    ref = weakref.ref(autotuner)

    def forget() -> None:
        owner = ref()
        if owner is not None:
            _forget_hits(owner)

    return forget


def _forget_hits(autotuner: Autotuner) -> None:
    """The hot path's own dict forgets what it decided: each key's next call takes the miss path."""
    state = autotuner.__dict__.get(STATE_ATTR)
    if state is not None:
        state.hits.clear()


def _del_instance_attr(autotuner: Autotuner, name: str) -> None:
    """``del autotuner.cache`` / ``del autotuner.configs`` while installed: gone from the instance,
    and forgotten by the hot path."""
    with _lock:
        try:
            del autotuner.__dict__[name]
        except KeyError:
            raise AttributeError(name) from None
        _forget_hits(autotuner)


def _get_cache(autotuner: Autotuner) -> MirroredCache:
    """``Autotuner.cache`` while installed: the dict in the instance, made a MirroredCache on the
    first read, so a reference taken from then on is the cache the miss path reads and writes."""
    try:
        cache = autotuner.__dict__["cache"]
    except KeyError:
        raise AttributeError(f"{type(autotuner).__name__!r} object has no attribute 'cache'") from None
    if type(cache) is MirroredCache:
        return cache
    with _lock:
        cache = autotuner.__dict__["cache"]
        if type(cache) is not MirroredCache:
            cache = autotuner.__dict__["cache"] = MirroredCache(cache, _on_change(autotuner))
            _mirrored.add(autotuner)
        return cache


def _set_cache(autotuner: Autotuner, value: Any) -> None:
    """``autotuner.cache = d`` as stock honours it: the hot path forgets what it decided, and the
    next call of each key reads ``d``. ``d``'s contents are taken over (see docs/conformance.md)."""
    with _lock:
        if value is not autotuner.__dict__.get("cache"):  # ``cache |= d`` assigns the cache itself back
            value = MirroredCache(value, _on_change(autotuner))
            autotuner.__dict__["cache"] = value
            _mirrored.add(autotuner)
        _forget_hits(autotuner)


def _get_configs(autotuner: Autotuner) -> Any:
    try:
        return autotuner.__dict__["configs"]
    except KeyError:
        raise AttributeError(f"{type(autotuner).__name__!r} object has no attribute 'configs'") from None


def _set_configs(autotuner: Autotuner, value: Any) -> None:
    """``autotuner.configs = [...]`` as stock honours it: the hot path forgets what it decided, so
    the next call of each key takes the miss path, which starts over for a new list (a key decided
    among several configs is still launched from ``cache``, as stock launches it; a single-config
    kernel launches the new first config, or tunes when the new list has more)."""
    with _lock:
        autotuner.__dict__["configs"] = value
        _forget_hits(autotuner)


_CONFIGS_PROPERTY = property(_get_configs, _set_configs, lambda autotuner: _del_instance_attr(autotuner, "configs"),
                             "The declared configs; tunevault's hot path follows a replaced list.")


def _copied_state(autotuner: Autotuner) -> dict[str, Any]:
    """The instance dict a copy starts from: stock's, less tunevault's per-kernel state (its lock,
    its back-reference to the original), with a MirroredCache (whose change callback names the
    original) as a plain dict of the entries written by others (by hand, or before install). The
    copy attaches its own state on its first call; those entries read as written by hand, as a
    copied stock cache's are launched. tunevault's own entries are not copied: a decided key's
    decision is found in the store again, and a fallback must not become a pinned config."""
    state = dict(autotuner.__dict__)
    state.pop(STATE_ATTR, None)
    cache = state.get("cache")
    if type(cache) is MirroredCache:
        state["cache"] = cache.without_own()
    return state


def _copy(autotuner: Autotuner) -> Autotuner:
    """``copy.copy(autotuner)`` while installed: stock's shallow copy (see ``_copied_state``)."""
    cls: Any = type(autotuner)  # type(...).__new__ is typed as type's
    new = cls.__new__(cls)
    new.__dict__.update(_copied_state(autotuner))
    return new


def _deepcopy(autotuner: Autotuner, memo: dict[int, Any]) -> Autotuner:
    """``copy.deepcopy(autotuner)`` while installed: stock's deep copy (see ``_copied_state``)."""
    import copy

    cls: Any = type(autotuner)  # type(...).__new__ is typed as type's
    new = cls.__new__(cls)
    memo[id(autotuner)] = new
    new.__dict__.update(copy.deepcopy(_copied_state(autotuner), memo))
    return new


_CACHE_PROPERTY = property(_get_cache, _set_cache, lambda autotuner: _del_instance_attr(autotuner, "cache"),
                           "Decided configs by Triton's key; tunevault's hot path follows every change.")


def _run(self: Autotuner, *args: Any, **kwargs: Any) -> Any:
    try:
        state = self._tunevault_state  # STATE_ATTR, spelled out: the cheapest lookup on the hot path
    except AttributeError:
        state = _attach(self)
    if state is None:
        return _original_run(self, *args, **kwargs)
    raw_key = state.key_fns[len(args)](args, kwargs)
    hit = state.hits.get(raw_key)
    if hit is None:
        return resolve(cast("Runtime", _runtime), state, args, kwargs, raw_key)  # set while installed
    state.n_hits += 1
    config, cfg_kwargs, pre_hook = hit
    self.best_config = config
    if pre_hook is not None:
        pre_hook({**dict(zip(self.arg_names, args, strict=False)), **kwargs, **cfg_kwargs})
    return self.fn.run(*args, **kwargs, **cfg_kwargs)


def _run_counting_hits(self: Autotuner, *args: Any, **kwargs: Any) -> Any:
    """``_run`` while key capture counts in-memory hits (``set_hit_hook``): the plain hot path
    pays nothing for capture when it is off."""
    state = self.__dict__.get(STATE_ATTR)
    if state is not None and _hit_hook is not None:
        raw_key = state.key_fns[len(args)](args, kwargs)
        if raw_key in state.hits:
            _hit_hook(state, raw_key, args, kwargs)
    return _run(self, *args, **kwargs)


def _hot_path() -> Callable[..., Any]:
    """What ``Autotuner.run`` is while installed: decided at installation and when capture's hit
    counting starts or stops, so the plain hot path never checks it."""
    return _run_counting_hits if _hit_hook is not None else _run


def install(settings: Settings) -> Runtime:
    """Route every Autotuner through tunevault with ``settings``; idempotent (re-install replaces)."""
    global _original_run, _runtime
    from triton.runtime.autotuner import Autotuner

    if settings.mode == "off":
        uninstall()
        return Runtime(settings)
    with _lock:
        sealed = _runtime.on_miss if _runtime is not None and _runtime.sealed else None
        if _runtime is not None:
            _runtime.close()
        _drop_states(unwrap=False)
        _runtime = Runtime(settings, _warm_up_pending)
        _runtime.hit_hook = _hit_hook
        if sealed is not None:  # a plugin re-installing must not reopen tuning on the request path
            _runtime.on_miss, _runtime.sealed, _runtime.hits_at_seal = sealed, True, weakref.WeakKeyDictionary()
            log.warning("tunevault: installed again after seal(): still sealed (on_miss=%s); "
                        "uninstall() first to tune on misses again", sealed)
        if _original_run is None:
            _original_run = Autotuner.run
            Autotuner.run = _hot_path()
            _install_cache_property(Autotuner)
            turns.start()
        uses_worker = settings.mode == "tune" and (settings.isolate or settings.on_miss == "background")
        if uses_worker and settings.prestart:
            from tunevault.engine import isolated

            # a manifest names the kernels' modules to import (read with the key that verifies it);
            # tuning isolated means it tunes at start-up
            isolated.prestart(settings.capture, context=settings.isolate, key=settings.bundle_key)
        elif not uses_worker and "tunevault.engine.isolated" in sys.modules:
            # re-installed without isolation: an idle worker (prestarted, with its CUDA context) would
            # otherwise hold its memory until its idle timeout; one mid-session idles out by itself
            sys.modules["tunevault.engine.isolated"].retire_idle()
        log.debug("tunevault installed: %s", settings)
        return _runtime


def _warm_up_pending(runtime: Runtime, manifest: str) -> None:
    """``TUNEVAULT_WARMUP``: the runtime's first miss warms the manifest up (shared with peers)."""
    from tunevault.integration.shared_warmup import warm_up_pending

    warm_up_pending(runtime, manifest)


def uninstall() -> None:
    """Restore stock ``Autotuner.run`` and forget every per-kernel state; idempotent. A background
    tuning in progress is waited for (at most the tuning timeout) and queued ones are dropped:
    none runs beside stock Triton's own benchmarking after this returns."""
    global _original_run, _runtime
    background = sys.modules.get("tunevault.policy.background")
    if _runtime is not None and background is not None:
        settings = _runtime.settings
        if not background.stop(timeout=settings.tune_timeout):
            log.warning("tunevault: uninstall(): a background tuning still runs after %.0f s; "
                        "it will not update anything", settings.tune_timeout)
    with _lock:
        if _runtime is not None:  # before the caches go back to plain dicts: a tuning still in flight
            _runtime.closed = True  # checks this before writing its decision there (policy.resolve)
        if _original_run is not None:
            from triton.runtime.autotuner import Autotuner

            Autotuner.run = _original_run
            _original_run = None
        _drop_states(unwrap=True)
        _uninstall_cache_property()
        turns.stop()
        if _runtime is not None:
            _runtime.close()
            _runtime = None
        if "tunevault.engine.isolated" in sys.modules:
            sys.modules["tunevault.engine.isolated"].retire_idle()


_CLASS_ATTRS: dict[str, Any] = {"cache": _CACHE_PROPERTY, "configs": _CONFIGS_PROPERTY, "__copy__": _copy,
                                 "__deepcopy__": _deepcopy}
_original_class_attrs: dict[str, Any] = {}  # Autotuner's own, while installed (_NO_ATTR: it had none)


def _install_cache_property(autotuner_class: type[Autotuner]) -> None:
    """Make ``autotuner.cache`` a property (a data descriptor, so it wins over the instance's dict
    entry): assigning a new dict then reaches the hot path, which ``_run`` never has to check; so
    does assigning a new ``configs`` list. ``__copy__``/``__deepcopy__`` come and go with them: a
    copy must not share the original's per-kernel state, nor its cache's change callback (the
    copy's would reach the original)."""
    for name, attr in _CLASS_ATTRS.items():
        _original_class_attrs[name] = autotuner_class.__dict__.get(name, _NO_ATTR)
        setattr(autotuner_class, name, attr)


def _uninstall_cache_property() -> None:
    from triton.runtime.autotuner import Autotuner

    for name, attr in _CLASS_ATTRS.items():
        original = _original_class_attrs.pop(name, _NO_ATTR)
        if Autotuner.__dict__.get(name) is attr:
            if original is _NO_ATTR:
                delattr(Autotuner, name)
            else:
                setattr(Autotuner, name, original)


def _drop_states(unwrap: bool) -> None:
    """Forget every per-kernel state and take tunevault's decisions out of each ``cache``; with
    ``unwrap`` (uninstall) each cache becomes a plain dict again, else (re-install) it stays the
    same object, so references to it keep working."""
    for autotuner in list(_attached):
        autotuner.__dict__.pop(STATE_ATTR, None)
    _attached.clear()
    for autotuner in list(_mirrored):
        cache = autotuner.__dict__.get("cache")
        if type(cache) is not MirroredCache:
            continue
        if unwrap:
            autotuner.__dict__["cache"] = cache.without_own()
        else:
            cache.drop_own()
    if unwrap:
        _mirrored.clear()


def set_hit_hook(hook: HitHook | None) -> None:
    """Install (or with None remove) the in-memory-hit counter used by key capture."""
    global _hit_hook
    with _lock:
        _hit_hook = hook
        if _runtime is not None:
            _runtime.hit_hook = hook
        if _original_run is not None:
            from triton.runtime.autotuner import Autotuner

            Autotuner.run = _hot_path()


def runtime() -> Runtime | None:
    return _runtime


def kernel_states() -> list[KernelState]:
    return [s for a in list(_attached) if (s := a.__dict__.get(STATE_ATTR)) is not None]


def _own_counts_in_child() -> None:
    """A forked child's ``stats()`` count its own calls only, as its key capture writes only the
    keys it met itself: summing the workers' counts must not count the parent's calls again."""
    rt = _runtime
    if rt is None:
        return
    from tunevault.core.events import Stats

    rt.stats = Stats()
    states = kernel_states()
    for st in states:
        st.n_hits = st.n_fallback_hits = 0
    if rt.hits_at_seal is not None:
        rt.hits_at_seal = weakref.WeakKeyDictionary({st: (0, 0) for st in states})


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_own_counts_in_child)
