"""The miss path: what ``Autotuner.run`` does for a key it has not decided, with managed decisions.

Only reached when the in-memory dict has no config for a call's raw key; everything here
may take locks, touch the store and log, because it runs once per key per process. The steps
are stock Triton's, in its order (``policy/stock.py``): the autotuner's own ``cache`` first,
then its own ``prune_configs``, then a decision among the pruned configs only (stored, tuned,
first working, fallen back to), then the autotuner's public state and Triton's listener.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from tunevault.core.model import CandidateResult, ConfigSpec, Decision, TuningError, TuningKey
from tunevault.engine.inprocess import conflict_error
from tunevault.engine.select import NoWorkingConfig, select
from tunevault.engine.timing import own_bench
from tunevault.policy import stock
from tunevault.policy.capture_guard import capture_fallback, capturing
from tunevault.policy.diagnose import TuningMiss
from tunevault.policy.fallback import choose_fallback, describe_config, settle
from tunevault.policy.untimed import (
    NOT_LAUNCHED,
    Indexed,
    builds,
    compile_only,
    first_compiling,
    first_working,
    launch,
    log_first,
)

log = logging.getLogger("tunevault")

if TYPE_CHECKING:
    from triton import Config
    from triton.runtime.autotuner import Autotuner

    from tunevault.core.kernel_state import KernelState
    from tunevault.policy.runtime import Runtime


__all__ = ["TuningError"]  # defined in core (a warmup replay tells it apart), raised here


def resolve(rt: Runtime, st: KernelState, args: tuple, kwargs: dict[str, Any], raw_key: tuple) -> Any:
    """Decide a config for a call whose raw key missed the in-memory dict, and launch it."""
    with st.lock:
        hit = st.hits.get(raw_key)
        if hit is not None:  # decided while this call waited for the lock: a hit, counted as the hot path does
            _counted_hit(rt, st, raw_key, args, kwargs)
            return launch(st.autotuner, args, kwargs, *hit)
        st.key_fns.specialise(args, kwargs)
        st.refresh_configs()
        at = st.autotuner
        at.nargs = dict(zip(at.arg_names, args, strict=False))
        result = _resolve_locked(rt, st, args, kwargs, raw_key)
        at.nargs = None  # on normal completion only: after an exception stock leaves the call's nargs
        return result


def _resolve_locked(rt: Runtime, st: KernelState, args: tuple, kwargs: dict[str, Any], raw_key: tuple) -> Any:
    """``resolve`` under the kernel's lock, with ``nargs`` set: decide, remember, launch."""
    at = st.autotuner
    fallback = False
    if len(at.configs) > 1:
        key = stock.stock_key(st.arg_names, st.keys, args, kwargs)
        config = at.cache.get(key)
        if config is not None:  # Triton's key is decided, under another raw key (say, kwargs in another order)
            _counted_hit(rt, st, raw_key, args, kwargs)
            fallback = key in st.fallback_keys
        else:
            config, launched, how = _decide(rt, st, args, kwargs, key)
            if how == "compiled":  # a compile-only call: nothing decided, nothing remembered
                return launched
            if how == "fallback":  # later calls count as fallback hits; this one is the miss
                if _open(rt):
                    st.fallback_keys.add(key)
                    st.remember(raw_key, config, fallback=True)
                return launch(at, args, kwargs, config, config.all_kwargs(), config.pre_hook)
            if launched is not NOT_LAUNCHED:
                if _open(rt):
                    st.remember(raw_key, config)
                return launched
    else:  # one config: decided by rule, a hit as the calls after it are
        config = at.configs[0]
        if rt.settings.mode == "first":
            log_first(st, 0, config)
        _counted_hit(rt, st, raw_key, args, kwargs)
    if not _open(rt):
        return launch(at, args, kwargs, config, config.all_kwargs(), config.pre_hook)
    st.remember(raw_key, config, fallback=fallback)
    return launch(at, args, kwargs, *st.hits[raw_key])


def _open(rt: Runtime) -> bool:
    """Whether the runtime deciding is still the installed one. A decision reached after
    ``uninstall()`` or a re-install (a tuning in flight meanwhile) is launched by the call that
    waited for it, and written nowhere in the process: ``autotuner.cache`` is stock's plain dict
    again, or the new runtime's, and an entry there would read as one written by hand, so the key
    could never be decided again. Checked right before each write, under the kernel's lock."""
    return not rt.closed


def _counted_hit(rt: Runtime, st: KernelState, raw_key: tuple, args: tuple, kwargs: dict[str, Any]) -> None:
    """A call the miss path serves without deciding anything: counted (and captured) as the hot
    path counts an in-memory hit."""
    st.n_hits += 1
    rt.late_hit(st, raw_key, args, kwargs)


def _decide(rt: Runtime, st: KernelState, args: tuple, kwargs: dict[str, Any], key: tuple,
            ) -> tuple[Config, Any, str]:
    """The config for a new key, the launch's result where deciding already launched it, and how
    it was reached: "decided", "fallback" (a miss not decided here) or "compiled" (a compile-only
    call, ``warmup=True``: launched, never remembered)."""
    at = st.autotuner
    indexed = _indexed(at, at.prune_configs(kwargs))  # the installed Triton's pruning, its errors
    if not indexed:  # Triton < 3.6 lets an empty prune reach its min(): the same error, from min()
        min(())
    _check_conflicts(kwargs, indexed)
    compiling = bool(kwargs.get("warmup"))
    if rt.settings.mode == "first" or (compiling and len(indexed) == 1):
        if compiling:  # "first" never reads the store; one config has nothing to read it for
            return (*compile_only(st, args, kwargs, indexed), "compiled")
        rt.stats.add(st.kernel_id.name, rt.phase, "misses")  # decided by rule: one miss per key, as in tune
        if rt.observers:  # key capture: a key served without a decision, as a fallback is
            rt.notify("missed", st, st.labelled_key(st.named_args(args, kwargs)), args, kwargs)
        config, launched = first_working(st, args, kwargs, indexed)
        if _open(rt):
            stock.record(at, key, config)
        return config, launched, "decided"
    if len(indexed) == 1 and stock.single_pruned_skips_benchmark():
        if _open(rt):
            stock.record(at, key, indexed[0][1])
        _decided_by_pruning(rt, st, args, kwargs, *indexed[0])
        return indexed[0][1], NOT_LAUNCHED, "decided"
    named = st.named_args(args, kwargs)
    tkey = st.labelled_key(named)
    decision = _stored(rt, st, tkey, {i for i, _ in indexed})
    if decision is None and (earlier := st.earlier_key(named)) is not None:
        decision = _stored(rt, st, earlier, {i for i, _ in indexed})  # written before keys were in order
        if decision is not None:
            decision = rt.publish(dataclasses.replace(decision, key=tkey))
    if decision is None and compiling:
        return (*compile_only(st, args, kwargs, indexed), "compiled")
    if decision is None:
        config, fell_back = _on_miss(rt, st, args, kwargs, named, tkey, key, indexed)
        return config, NOT_LAUNCHED, "fallback" if fell_back else "decided"
    rt.stats.add(st.kernel_id.name, rt.phase, "hits")  # a store hit; in-memory hits are n_hits
    log.debug("tunevault: %s [%s]: reusing stored decision, config %s", st.kernel_id.name,
              tkey.describe(), decision.config.describe())
    return _adopt(rt, st, decision, key, args, kwargs, indexed), NOT_LAUNCHED, "decided"


def _decided_by_pruning(rt: Runtime, st: KernelState, args: tuple, kwargs: dict[str, Any], index: int,
                        config: Config) -> None:
    """Pruning left one config, which launches untimed (stock's rule, for this process only: a
    prune function may read arguments outside the key, so the choice is not stored). Counted as a
    hit (it never misses, sealed or not); key capture leaves it out, since a warmup has nothing to
    tune for it; a warmup that replays it says so."""
    rt.stats.add(st.kernel_id.name, rt.phase, "hits")
    tkey = st.labelled_key(st.named_args(args, kwargs))
    rt.by_rule.add((st.kernel_id.digest, tkey.text))
    rt.notify("rule", st, tkey, args, kwargs)


def _check_conflicts(kwargs: dict[str, Any], indexed: Indexed) -> None:
    """Stock's ``ValueError`` for a meta-parameter passed by hand that a pruned config sets, raised
    before anything is measured or tried (inside a config's trial it would read as that config
    failing). Stock checks only when it benchmarks: a single survivor it does not benchmark
    launches, and the JIT function rejects the duplicate keyword as it does there."""
    if len(indexed) == 1 and stock.single_pruned_skips_benchmark():
        return
    for _index, config in indexed:
        if (error := conflict_error(kwargs, config)) is not None:
            raise error


def _adopt(rt: Runtime, st: KernelState, decision: Decision, stock_key: tuple | None, args: tuple,
           kwargs: dict[str, Any], indexed: Indexed) -> Config:
    """Launch a stored decision's config: a store hit for observers (key capture), and for the
    autotuner's public state and Triton's listener a disk-cache hit, as stock reports one.
    Its timings go to this call's pruned configs (``indexed``), as stock's disk cache gives them."""
    at = st.autotuner
    rt.notify("hit", st, decision.key, args, kwargs)
    config = at.configs[decision.config_index]
    if stock_key is not None and _open(rt):
        stock.after_decision(at, stock_key, config, stock.timings_by_config(dict(indexed), decision.candidates),
                             None, fresh=False)
    return config


def _indexed(at: Autotuner, pruned: list[Config]) -> Indexed:
    declared = {id(c): i for i, c in enumerate(at.configs)}
    out = []
    for j, config in enumerate(pruned):
        i = declared.get(id(config))
        if i is None:
            i = next((n for n, c in enumerate(at.configs) if c == config), None)
        out.append((len(at.configs) + j if i is None else i, config))
    return out


def _stored(rt: Runtime, st: KernelState, key: TuningKey, allowed: set[int] | None = None,
            launched: bool = True) -> Decision | None:
    """The stored decision for ``key`` if it names a declared config this call may launch; else
    None, and why a stored one was not usable in ``rt.ignored`` (the miss diagnosis says it).
    ``launched``: this call launches it for ``key`` (not for a missed key near it): ``rt.used``."""
    rt.ignored.pop((st.kernel_id.name, key.text), None)
    decision = rt.lookup(st.kernel_id, key)
    if decision is None:
        return None
    index = st.stored_index(decision)
    if index is None:
        rt.warn_once(("undeclared", decision.store_key),
                     "tunevault: %s: stored decision for %s names config #%d %s, which this kernel does "
                     "not declare; ignoring it", st.kernel_id.name, key.describe(), decision.config_index,
                     decision.config.describe())
        return None
    if allowed is not None and index not in allowed:
        rt.ignored[(st.kernel_id.name, key.text)] = f"names config #{index}, which prune_configs excludes for " \
                                                    "these arguments"
        rt.warn_once(("pruned-out", decision.store_key),
                     "tunevault: %s: stored decision for %s names config #%d, which this call's "
                     "prune_configs excludes; deciding again", st.kernel_id.name, key.describe(), index)
        return None
    if launched:
        rt.used[(st.kernel_id.name, key.text)] = decision
    return decision


def _on_miss(rt: Runtime, st: KernelState, args: tuple, kwargs: dict[str, Any], named: dict[str, Any],
             key: TuningKey, stock_key: tuple, indexed: Indexed) -> tuple[Config, bool]:
    """The config a miss launches, and whether it is a fallback (True) or was tuned (False)."""
    name, at = st.kernel_id.name, st.autotuner
    phase = rt.phase  # the miss's: a seal() while it tunes does not make its tuning a serving one
    rt.stats.add(name, phase, "misses")
    policy = rt.on_miss
    # Never benchmark inside a CUDA graph capture, nor read the request's tensors for a background
    # job there (that would record copies into the user's graph): both are served like this.
    if policy == "tune" or (policy == "background" and capturing()):  # no diagnosis: it is tuned, here or later
        rt.events.emit("miss", kernel=name, key=key.to_json(), policy=policy, phase=phase)
    if policy in ("tune", "background") and capturing():
        config = capture_fallback(rt, st, args, kwargs, key, lambda nearest, why, how: fallback_config(
            rt, st, args, kwargs, key, nearest, why, how, indexed))
        if _open(rt):
            stock.record(at, stock_key, config)
        return config, True
    if policy == "tune":
        return tune(rt, st, args, kwargs, key, stock_key, indexed, phase), False
    message, nearest = rt.explain_miss(st.kernel_id, key)
    message += rt.damage_note()
    rt.events.emit("miss", kernel=name, key=key.to_json(), policy=policy, phase=phase, diagnosis=message)
    rt.notify("missed", st, key, args, kwargs)
    if policy == "error":
        rt.stats.add(name, phase, "errors")
        raise TuningMiss(message, name, key, nearest)
    config = fallback_config(rt, st, args, kwargs, key, nearest, message, policy, indexed)
    if _open(rt):
        stock.record(at, stock_key, config)
    return config, True


def fallback_config(rt: Runtime, st: KernelState, args: tuple, kwargs: dict[str, Any], key: TuningKey,
                    nearest: TuningKey | None, message: str, policy: str, indexed: Indexed) -> Config:
    """A config predicted from decided neighbours, else the nearest decided key's, else the first
    that compiles (policy/fallback.py); only configs this call's pruning keeps; no benchmarking."""
    rt.stats.add(st.kernel_id.name, rt.phase, "fallbacks")
    allowed = {i for i, _ in indexed}

    def nearest_config() -> Config | None:  # launched for ``key``, not for ``nearest``
        decision = None if nearest is None else _stored(rt, st, nearest, allowed, launched=False)
        return None if decision is None else st.autotuner.configs[decision.config_index]

    config, how, fields = choose_fallback(rt, st, key, nearest_config,
                                          lambda: first_compiling(st, args, kwargs, [c for _, c in indexed]),
                                          allowed, lambda config: builds(st, args, kwargs, config))
    index = next((i for i, c in indexed if c is config), None)  # the first compiling: a pruned config
    if index is None:  # predicted, or the nearest key's: a declared config
        index = st.autotuner.configs.index(config)
    rt.fallbacks[(st.kernel_id.name, key.text)] = (index, _spec(st, index, config))
    rt.warn_once(("fallback", st.kernel_id.name, key.text), "tunevault: %s; using %s (%s)", message, how, policy)
    rt.events.emit("fallback", kernel=st.kernel_id.name, key=key.to_json(), config=describe_config(config),
                   phase=rt.phase, **fields)
    if policy == "background":
        rt.submit_background(st, args, kwargs, key)
    return config


def tune(rt: Runtime, st: KernelState, args: tuple, kwargs: dict[str, Any], key: TuningKey,
         stock_key: tuple | None = None, indexed: Indexed | None = None, phase: str | None = None) -> Config:
    """Tune under the key's lease, so a key is benchmarked once fleet-wide; returns the config to launch.

    Others wait for the holder's decision and adopt it (policy/lease.py). Called by the miss path
    with the pruned candidates and the miss's phase, and by background tuning (which prunes here,
    off the request path). The tuning's counters and event carry ``phase`` (now's, if not given).
    """
    from tunevault.policy.lease import lease_name, under_lease

    at, phase = st.autotuner, phase or rt.phase
    if indexed is None:  # a background job: the request path sets and clears nargs under the same lock
        with st.lock:
            st.refresh_configs()
            at.nargs = dict(zip(at.arg_names, args, strict=False))
            try:
                indexed = _indexed(at, at.prune_configs(kwargs))
            finally:
                at.nargs = None
    allowed = {i for i, _ in indexed}

    def adopt() -> Config | None:  # another process published it meanwhile
        decision = _stored(rt, st, key, allowed)
        return None if decision is None else _adopt(rt, st, decision, stock_key, args, kwargs, indexed)

    name = lease_name(st.kernel_id.digest, rt.fingerprint.digest, key.text)
    return under_lease(rt, name, f"{st.kernel_id.name} [{key.describe()}]", adopt,
                       lambda: _tune_here(rt, st, args, kwargs, key, stock_key, indexed, phase))


def _tune_here(rt: Runtime, st: KernelState, args: tuple, kwargs: dict[str, Any], key: TuningKey,
               stock_key: tuple | None, indexed: Indexed, phase: str) -> Config:
    """Benchmark the pruned configs, select deterministically, publish; returns the config to launch."""
    from tunevault.core.identity import provenance
    from tunevault.engine.tuner import measure

    at, kid = st.autotuner, st.kernel_id
    started = time.perf_counter()
    verbose = stock.print_enabled()
    if verbose and own_bench(at) is None:  # stock Triton's per-config lines (its own _bench prints them)
        for _i, c in indexed:
            print(f"Autotuning kernel {at.base_fn.__name__} with config {c}")
    results = measure(rt, st, args, kwargs, [(i, c, _spec(st, i, c)) for i, c in indexed], phase)
    if verbose:
        for r in results:
            if r.error:
                print(f"Autotuning failed with {_message(r.error)}")
    try:
        winner, margin = select(results, rt.settings.tolerance, rt.settings.confidence)
    except NoWorkingConfig:
        rt.stats.add(kid.name, phase, "errors")
        first = next((r.error for r in results if r.error), "unknown")
        message = f"{kid.name}: every config failed for key {key.describe()}; first error: {first}"
        log.warning("tunevault: %s", message)  # a tuning's one line, as a successful one has
        rt.events.emit("tuning_failed", kernel=kid.name, key=key.to_json(), seconds=time.perf_counter() - started,
                       configs=len(results), error=first[:400], phase=phase)
        raise TuningError(message) from None
    seconds = time.perf_counter() - started
    config = dict(indexed)[winner.index]
    notes = {**dict(provenance()), **dict(getattr(results, "notes", ()))}  # engine: where/how it was tuned
    decision = Decision(kid, rt.fingerprint, key, winner.index, _spec(st, winner.index, config), tuple(results),
                        margin, seconds, tuple(sorted(notes.items())))
    allowed = {i for i, _ in indexed}
    if winner.index < len(at.configs):
        published = rt.publish(decision)
        # A stored entry this call may not launch still wins the put (first writer): launch what was
        # measured here, never that entry. One naming no declared config is replaced; one this
        # call's pruning excludes stays (another call of the same kernel may launch it).
        index = st.stored_index(published)
        if index is None:
            rt.supersede(published, decision)
        elif index not in allowed:
            rt.decided[decision.store_key] = decision
        else:
            decision = published
        config = dict(indexed)[decision.config_index]
    else:
        rt.warn_once(("pruned", kid.name), "tunevault: %s: early_config_prune returned a config the kernel "
                     "does not declare; its decisions are kept in memory only", kid.name)
    rt.used[(kid.name, key.text)] = decision
    _report_tuning(rt, st, key, decision, results, seconds, phase, args, kwargs)
    at.pre_hook({**dict(zip(at.arg_names, args, strict=False)), **kwargs, **config.all_kwargs()}, reset_only=True)
    if stock_key is not None and _open(rt):
        stock.after_decision(at, stock_key, config, stock.timings_by_config(dict(indexed), results),
                             seconds, fresh=True)
    return config


def _message(error: str) -> str:
    """The exception's own text from a result's ``"TypeName: text"``, as stock prints it (its
    ``str(exc)``); the stored text is cut at 500 characters, so a longer message is cut here too."""
    name, sep, text = error.partition(": ")
    return text if sep and name.isidentifier() else error


def _spec(st: KernelState, index: int, config: Config) -> ConfigSpec:
    from tunevault.core.identity import config_spec

    return st.specs[index] if index < len(st.specs) else config_spec(config)


def _report_tuning(rt: Runtime, st: KernelState, key: TuningKey, decision: Decision, results: list[CandidateResult],
                   seconds: float, phase: str, args: tuple | None = None, kwargs: dict[str, Any] | None = None) -> None:
    name = st.kernel_id.name
    failed = sum(1 for r in results if r.error)
    rt.stats.add(name, phase, "tunings")
    rt.stats.add(name, phase, "tuning_seconds", seconds)
    margin = "alone" if decision.margin is None else f"margin {decision.margin:.1%}"
    log.info("tunevault: tuned %s [%s] in %.2fs: %d configs tried (%d failed), winner #%d %s (%s)", name,
             key.describe(), seconds, len(results), failed, decision.config_index, decision.config.describe(),
             margin)
    rt.events.emit("tuning", kernel=name, key=key.to_json(), seconds=seconds, configs=len(results),
                   failed=failed, winner=decision.config_index, margin=decision.margin, phase=phase,
                   **settle(rt, name, key, decision.config_index, results))
    rt.notify("tuned", st, key, args, kwargs)
