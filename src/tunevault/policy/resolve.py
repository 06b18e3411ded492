"""The miss path: find, tune, fall back or refuse, under the kernel's lock.

Only reached when the in-memory dict has no config for a call's raw key; everything here
may take locks, touch the store and log, because it runs once per key per process.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tunevault.core.model import CandidateResult, Decision, TuningKey
from tunevault.engine.select import NoWorkingConfig, select
from tunevault.policy.diagnose import TuningMiss, explain_miss

log = logging.getLogger("tunevault")


class TuningError(RuntimeError):
    """Every config of a kernel failed for a key."""


def compile_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "this config does not build here", across Triton versions."""
    import triton.compiler.errors as ce
    import triton.runtime.errors as re

    # The interpreter has no compile step: a failing static_assert surfaces as InterpreterError.
    names = [(re, "OutOfResources"), (re, "PTXASError"), (ce, "CompilationError"),
             (ce, "CompileTimeAssertionFailure"), (re, "InterpreterError")]
    return tuple(getattr(m, n) for m, n in names if hasattr(m, n))


def launch(autotuner: Any, args: tuple, kwargs: dict[str, Any], config: Any, cfg_kwargs: dict[str, Any]) -> Any:
    autotuner.best_config = config
    if config.pre_hook is not None:
        config.pre_hook({**dict(zip(autotuner.arg_names, args, strict=False)), **kwargs, **cfg_kwargs})
    return autotuner.fn.run(*args, **kwargs, **cfg_kwargs)


def prune(autotuner: Any, args: tuple, kwargs: dict[str, Any]) -> list[Any]:
    """Triton's ``prune_configs`` on the caller's arguments instead of ``self.nargs``."""
    nargs = dict(zip(autotuner.arg_names, args, strict=False))
    configs = list(autotuner.configs)
    if autotuner.early_config_prune:
        configs = list(autotuner.early_config_prune(autotuner.configs, nargs, **kwargs))
        if not configs:
            raise TuningError("No valid autotuner configs after pruning. "
                              "`early_config_prune` should return at least one config.")
    if autotuner.perf_model:
        top_k = autotuner.configs_top_k
        if isinstance(top_k, float) and top_k <= 1.0:
            top_k = max(1, int(len(configs) * top_k))
        elif not isinstance(top_k, int):
            raise TypeError("Error while pruning configs, top_k must be either 1) a float <= 1.0 or 2) an int")
        if len(configs) > top_k:
            est = {c: autotuner.perf_model(**nargs, **kwargs, **c.all_kwargs()) for c in configs}
            configs = sorted(est, key=lambda c: est[c])[:top_k]
    return configs


def first_working(rt: Any, st: Any, args: tuple, kwargs: dict[str, Any], raw_key: tuple,
                  configs: list[Any], why: str) -> Any:
    """Launch the first config that compiles and launches; remember it for this key."""
    errors = compile_errors()
    at, failures = st.autotuner, []
    for config in configs:
        cfg_kwargs = config.all_kwargs()
        try:
            ret = launch(at, args, kwargs, config, cfg_kwargs)
        except errors as exc:
            failures.append(f"{type(exc).__name__}: {exc}"[:300])
            continue
        st.hits[raw_key] = (config, cfg_kwargs)
        if not st.first_logged:
            st.first_logged = True
            log.info("tunevault[%s]: %s: %d candidate configs, picked #%d %s", why, st.kernel_id.name,
                     len(at.configs), at.configs.index(config) if config in at.configs else -1, config)
        return ret
    raise TuningError(f"{st.kernel_id.name}: no config compiles for this call; errors: {'; '.join(failures)}")


def resolve(rt: Any, st: Any, args: tuple, kwargs: dict[str, Any], raw_key: tuple) -> Any:
    """Decide a config for a call whose raw key missed the in-memory dict, and launch it."""
    with st.lock:
        hit = st.hits.get(raw_key)
        if hit is not None:
            return launch(st.autotuner, args, kwargs, *hit)
        at = st.autotuner
        if rt.settings.mode == "first":
            return first_working(rt, st, args, kwargs, raw_key, list(at.configs), "first")
        if len(at.configs) == 1:
            st.remember(raw_key, at.configs[0])
            return launch(at, args, kwargs, *st.hits[raw_key])
        named = st.named_args(args, kwargs)
        key = st.labelled_key(named)
        config = _stored_config(rt, st, key)
        if config is not None:
            rt.stats.add(st.kernel_id.name, rt.phase, "hits")  # a store hit; in-memory hits are n_hits
            log.debug("tunevault: %s [%s]: reusing stored decision, config %s", st.kernel_id.name,
                      key.describe(), config)
            rt.notify("hit", st, key, args, kwargs)
        else:
            config = _on_miss(rt, st, args, kwargs, named, key)
        st.remember(raw_key, config)
        return launch(at, args, kwargs, *st.hits[raw_key])


def _stored_config(rt: Any, st: Any, key: TuningKey) -> Any:
    decision = rt.lookup(st.kernel_id, key)
    if decision is None:
        return None
    index = st.declared_index(decision.config_index, decision.config)
    if index is None:
        rt.warn_once(("undeclared", decision.store_key),
                     "tunevault: %s: stored decision for %s names config #%d %s, which this kernel does "
                     "not declare; ignoring it", st.kernel_id.name, key.describe(), decision.config_index,
                     decision.config.describe())
        return None
    rt.used[(st.kernel_id.name, key.text)] = decision
    return st.autotuner.configs[index]


def _on_miss(rt: Any, st: Any, args: tuple, kwargs: dict[str, Any], named: dict[str, Any],
             key: TuningKey) -> Any:
    name = st.kernel_id.name
    rt.stats.add(name, rt.phase, "misses")
    policy = rt.on_miss
    if policy == "tune":
        return tune(rt, st, args, kwargs, key)
    message, nearest = explain_miss(st.kernel_id.short_name, key, rt.decided_keys(st.kernel_id))
    message += rt.damage_note()
    rt.events.emit("miss", kernel=name, key=key.to_json(), policy=policy, phase=rt.phase, diagnosis=message)
    rt.notify("missed", st, key, args, kwargs)
    if policy == "error":
        rt.stats.add(name, rt.phase, "errors")
        raise TuningMiss(message, name, key, nearest)
    return fallback_config(rt, st, args, kwargs, key, nearest, message, policy)


def fallback_config(rt: Any, st: Any, args: tuple, kwargs: dict[str, Any], key: TuningKey,
                    nearest: TuningKey | None, message: str, policy: str) -> Any:
    """The nearest decided key's config, else the first config that compiles (no benchmarking)."""
    rt.stats.add(st.kernel_id.name, rt.phase, "fallbacks")
    config = None
    if nearest is not None:
        config = _stored_config(rt, st, nearest)
    if config is None:
        config = _first_compiling(st, args, kwargs)
    rt.warn_once(("fallback", st.kernel_id.name, key.text), "tunevault: %s; using %s config %s (%s)",
                 message, "nearest key's" if nearest is not None else "first compiling", config, policy)
    rt.events.emit("fallback", kernel=st.kernel_id.name, key=key.to_json(), config=str(config), phase=rt.phase)
    if policy == "background":
        rt.submit_background(st, args, kwargs, key)
    return config


def _first_compiling(st: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    """First config whose kernel compiles for these arguments, found without launching it."""
    at, errors = st.autotuner, compile_errors()
    for config in at.configs:
        try:
            at.fn.warmup(*args, **{k: v for k, v in kwargs.items() if k != "warmup"}, **config.all_kwargs())
        except errors:
            continue
        except Exception:
            return config  # warmup unsupported here (e.g. interpreter): let the launch decide
        return config
    return at.configs[0]


def tune(rt: Any, st: Any, args: tuple, kwargs: dict[str, Any], key: TuningKey) -> Any:
    """Tune under the key's lease, so a key is benchmarked once fleet-wide; returns the config to launch.

    Others wait for the holder's decision and adopt it (policy/lease.py)."""
    from tunevault.policy.lease import lease_name, under_lease

    def adopt() -> Any:  # another process published it meanwhile: a store hit for observers (capture)
        config = _stored_config(rt, st, key)
        if config is not None:
            rt.notify("hit", st, key, args, kwargs)
        return config

    name = lease_name(st.kernel_id.digest, rt.fingerprint.digest, key.text)
    return under_lease(rt, name, f"{st.kernel_id.name} [{key.describe()}]", adopt,
                       lambda: _tune_here(rt, st, args, kwargs, key))


def _tune_here(rt: Any, st: Any, args: tuple, kwargs: dict[str, Any], key: TuningKey) -> Any:
    """Prune, benchmark, select deterministically, publish; returns the config to launch."""
    from tunevault.core.identity import provenance
    from tunevault.engine.tuner import measure

    at, kid = st.autotuner, st.kernel_id
    started = time.perf_counter()
    pruned = prune(at, args, kwargs)
    declared = {id(c): i for i, c in enumerate(at.configs)}
    indexed = []
    for j, config in enumerate(pruned):
        i = declared.get(id(config))
        if i is None:
            i = next((n for n, c in enumerate(at.configs) if c == config), None)
        indexed.append((len(at.configs) + j if i is None else i, config))
    if len(indexed) == 1:
        index, config = indexed[0]
        results = [CandidateResult(index, _spec(st, index, config), ())]
        winner_index, margin = index, None
    else:
        verbose = _print_autotuning()
        if verbose:  # stock Triton's per-config lines
            for _i, c in indexed:
                print(f"Autotuning kernel {at.base_fn.__name__} with config {c}")
        results = measure(rt, st, args, kwargs, [(i, c, _spec(st, i, c)) for i, c in indexed])
        if verbose:
            for r in results:
                if r.error:
                    print(f"Autotuning failed with {r.error}")
        try:
            winner, margin = select(results, rt.settings.tolerance)
        except NoWorkingConfig:
            rt.stats.add(kid.name, rt.phase, "errors")
            first = next((r.error for r in results if r.error), "unknown")
            raise TuningError(f"{kid.name}: every config failed for key {key.describe()}; "
                              f"first error: {first}") from None
        winner_index = winner.index
    seconds = time.perf_counter() - started
    config = dict(indexed)[winner_index]
    notes = {**dict(provenance()), **dict(getattr(results, "notes", ()))}  # engine: where/how it was tuned
    decision = Decision(kid, rt.fingerprint, key, winner_index, _spec(st, winner_index, config), tuple(results),
                        margin, seconds, tuple(sorted(notes.items())))
    if winner_index < len(at.configs):
        published = rt.publish(decision)
        # A stored entry naming no declared config was rejected on lookup but still wins the put
        # (first writer): launch what was measured here, never that entry's index.
        if st.declared_index(published.config_index, published.config) is None:
            rt.decided[decision.store_key] = decision
        else:
            decision = published
        config = at.configs[decision.config_index]
    else:
        rt.warn_once(("pruned", kid.name), "tunevault: %s: early_config_prune returned a config the kernel "
                     "does not declare; its decisions are kept in memory only", kid.name)
    rt.used[(kid.name, key.text)] = decision
    _report_tuning(rt, st, key, decision, results, seconds, args, kwargs)
    full = {**dict(zip(at.arg_names, args, strict=False)), **kwargs, **config.all_kwargs()}
    at.pre_hook(full, reset_only=True)
    return config


def _spec(st: Any, index: int, config: Any) -> Any:
    from tunevault.core.identity import config_spec

    return st.specs[index] if index < len(st.specs) else config_spec(config)


def _report_tuning(rt: Any, st: Any, key: TuningKey, decision: Decision, results: list[CandidateResult],
                   seconds: float, args: tuple | None = None, kwargs: dict[str, Any] | None = None) -> None:
    name = st.kernel_id.name
    failed = sum(1 for r in results if r.error)
    rt.stats.add(name, rt.phase, "tunings")
    rt.stats.add(name, rt.phase, "tuning_seconds", seconds)
    margin = "alone" if decision.margin is None else f"margin {decision.margin:.1%}"
    log.info("tunevault: tuned %s [%s] in %.2fs: %d configs tried (%d failed), winner #%d %s (%s)", name,
             key.describe(), seconds, len(results), failed, decision.config_index, decision.config.describe(),
             margin)
    rt.events.emit("tuning", kernel=name, key=key.to_json(), seconds=seconds, configs=len(results),
                   failed=failed, winner=decision.config_index, margin=decision.margin, phase=rt.phase)
    rt.notify("tuned", st, key, args, kwargs)
    if _print_autotuning():
        configs = st.autotuner.configs
        best = configs[decision.config_index] if decision.config_index < len(configs) else decision.config
        print(f"Triton autotuning for function {st.autotuner.base_fn.__name__},\nwith key as {key.describe()},\n"
              f"finished after {seconds:.2f}s,\nbest config selected: {best};")


def _print_autotuning() -> bool:
    try:
        from triton import knobs

        return bool(knobs.autotuning.print)
    except (ImportError, AttributeError):
        import os

        return os.environ.get("TRITON_PRINT_AUTOTUNING", "0") == "1"
