"""tunevault behaves as the installed Triton's autotuner does, only with managed decisions.

Each test names the root cause it guards (issue 10). Where it can, a test runs the same scenario
on stock Triton and under tunevault and compares what a user would observe.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

import kernels_conformance as kc
from conftest import TESTS, subprocess_env

STOCK_RUN = Autotuner.run


def _fresh(**options: Any) -> Any:
    return triton.autotune(configs=kc.configs(), key=["n"], **options)(kc._Recording(kc.copy_kernel))


def _counting_bench(seen: list[int]) -> Callable[..., list[float]]:
    def do_bench(kernel_call: Callable[[], None], quantiles: Any) -> list[float]:
        kernel_call()
        seen.append(kc.LAUNCHED[-1])
        return [float(kc.LAUNCHED[-1])] * 3  # smaller BLOCK "wins": deterministic
    return do_bench


def _on_both(scenario: Callable[[], Any], sqlite_url: str, mode: str = "tune", **options: Any) -> tuple[Any, Any]:
    """``scenario()`` on stock Triton, then under tunevault: what each observed."""
    import tunevault

    tunevault.uninstall()
    assert Autotuner.run is STOCK_RUN
    kc.clear()
    stock = scenario()
    tunevault.install(mode=mode, store=sqlite_url, **options)
    kc.clear()
    ours = scenario()
    return stock, ours


# 1. A decision is never reused across different pruning.

def test_two_prune_functions_one_jit_function_share_no_decision(tv: Any) -> None:
    kc.clear()
    kc.run(kc.small, 100)
    assert set(kc.LAUNCHED) <= {16, 32} and kc.PRUNED == ["small"]
    kc.clear()
    kc.run(kc.large, 100)  # same JIT function, same key, other pruning: its own prune, its own configs
    assert set(kc.LAUNCHED) <= {64, 128} and kc.PRUNED == ["large"]
    assert tv.stats()["kernels"]["total"]["warmup"]["tunings"] == 2  # each tuned its own key


def test_two_prune_functions_across_processes_sharing_one_sqlite_file(sqlite_url: str) -> None:
    def child(which: str) -> dict[str, Any]:
        out = subprocess.run([sys.executable, str(TESTS / "kernels_conformance.py"), which, "100", sqlite_url],
                             env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = child("small")
    assert set(first["launched"]) <= {16, 32} and first["tunings"] == 1
    second = child("large")  # the store holds a decision for "small" at the same key: not for this kernel
    assert set(second["launched"]) <= {64, 128} and second["pruned"] == ["large"] and second["tunings"] == 1
    again = child("large")  # its own decision now comes from the store, and its prune still runs
    assert set(again["launched"]) <= {64, 128} and again["pruned"] == ["large"] and again["tunings"] == 0


def test_heuristics_edit_retunes(tmp_path: Path, sqlite_url: str) -> None:
    module = tmp_path / "heur_kernel.py"
    template = (TESTS / "kernels_conformance.py").read_text()

    def child(expr: str) -> dict[str, Any]:
        module.write_text(template.replace("plain = _autotuned()",
                                           f"plain = triton.autotune(configs=configs(), key=['n'])("
                                           f"triton.heuristics({{'UNUSED': lambda a: {expr}}})(copy_kernel))"))
        env = subprocess_env(PYTHONPATH=f"{tmp_path}:{subprocess_env()['PYTHONPATH']}")
        out = subprocess.run([sys.executable, str(module), "plain", "100", sqlite_url], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert child("1")["tunings"] == 1
    assert child("1")["tunings"] == 0  # unchanged: the stored decision serves
    assert child("2")["tunings"] == 1  # the heuristic changed: decide again


# 2. first mode prunes, and tries configs as Triton's benchmark would.

def test_first_mode_launches_the_first_config_its_prune_allows() -> None:
    import tunevault

    tunevault.install(mode="first", store="memory://")
    kc.clear()
    kc.run(kc.large, 100)
    assert kc.PRUNED == ["large"] and set(kc.LAUNCHED) == {64}
    seen: list[str] = []
    perf = _fresh(prune_configs_by={"perf_model": lambda **kw: seen.append("perf") or -kw["BLOCK"], "top_k": 2})
    kc.clear()
    kc.run(perf, 100)
    assert seen and set(kc.LAUNCHED) == {128}  # perf_model ranks 128 first


FAILURES: list[str] = []


@triton.autotune(configs=[triton.Config({"BLOCK": 48}), triton.Config({"BLOCK": 32})], key=["n"],
                 post_hook=lambda nargs, exception: exception is not None and FAILURES.append(str(exception)))
@triton.jit
def no_48(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    tl.static_assert(BLOCK != 48, "BLOCK=48 does not build")
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


def test_first_mode_post_hook_sees_a_failing_config() -> None:
    import tunevault

    tunevault.install(mode="first", store="memory://")
    FAILURES.clear()
    x = torch.arange(40, dtype=torch.float32)
    out = torch.empty_like(x)
    no_48[(2,)](x, out, 40)
    assert torch.equal(out, x)
    assert no_48.best_config.kwargs["BLOCK"] == 32 and len(FAILURES) == 1 and "48" in FAILURES[0]


# 3. All configs pruned away: Triton's own error, as stock raises it.

def test_prune_to_nothing_raises_what_stock_raises(sqlite_url: str) -> None:
    def scenario() -> tuple[type, str]:
        kernel = _fresh(prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: []})
        with pytest.raises(Exception) as err:
            kc.run(kernel, 100)
        return type(err.value), str(err.value)

    stock, ours = _on_both(scenario, sqlite_url)
    assert ours == stock


# 4. The autotuner's public state, and cache.clear() meaning "decide again".

def test_public_state_matches_stock(sqlite_url: str) -> None:
    def scenario() -> dict[str, Any]:
        seen: list[int] = []
        kernel = _fresh(do_bench=_counting_bench(seen))
        kc.run(kernel, 100)
        kc.run(kernel, 100)
        kc.run(kernel, 50)
        return {"cache": {k: str(v) for k, v in kernel.cache.items()}, "best": str(kernel.best_config),
                "timings": sorted((str(c), t) for c, t in kernel.configs_timings.items()),
                "bench_time": isinstance(getattr(kernel, "bench_time", None), float), "benchmarked": seen,
                "nargs": kernel.nargs}

    stock, ours = _on_both(scenario, sqlite_url)
    assert ours == stock


def test_cache_clear_decides_again_and_a_hand_written_entry_is_launched(tv: Any) -> None:
    seen: list[int] = []
    kernel = _fresh(do_bench=_counting_bench(seen))
    kc.run(kernel, 100)
    (key, config), = kernel.cache.items()
    assert key == (100, "torch.float32", "torch.float32") and config.kwargs["BLOCK"] == 16
    kernel.cache[key] = kc.configs()[3]  # by hand, as stock honours it
    kc.clear()
    kc.run(kernel, 100)
    assert kc.LAUNCHED == [128]
    kernel.cache.clear()  # decide again: the store answers, nothing is benchmarked
    kc.clear()
    n_bench = len(seen)
    kc.run(kernel, 100)
    assert kc.LAUNCHED == [16] and len(seen) == n_bench and len(kernel.cache) == 1


def test_uninstall_leaves_a_plain_cache_without_tunevault_decisions(tv: Any) -> None:
    kernel = _fresh()
    kernel.cache[(7, "torch.float32", "torch.float32")] = kc.configs()[2]  # written by the user: kept
    kc.run(kernel, 100)
    assert len(kernel.cache) == 2
    tv.uninstall()
    assert type(kernel.cache) is dict and list(kernel.cache) == [(7, "torch.float32", "torch.float32")]


@pytest.mark.parametrize("how", ["uninstall", "reinstall"])
def test_a_tuning_finishing_after_uninstall_or_reinstall_writes_nothing_into_the_process(
        tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture) -> None:
    """A tuning in flight while the runtime is replaced: its call launches its config, but neither
    stock's cache nor the new runtime's learns it (an entry there reads as written by hand, and the
    key would never be decided again), and its lease is released, not left to expire."""
    import sqlite3
    import threading

    import tunevault

    started, go = threading.Event(), threading.Event()

    def do_bench(kernel_call: Callable[[], None], quantiles: Any) -> list[float]:
        started.set()
        go.wait()
        kernel_call()
        return [float(kc.LAUNCHED[-1])] * 3

    old, new = tmp_path / "old.db", tmp_path / "new.db"
    tunevault.install(mode="tune", store=f"sqlite:///{old}")
    kernel = _fresh(do_bench=do_bench)
    tuning = threading.Thread(target=kc.run, args=(kernel, 100))
    tuning.start()
    started.wait()
    if how == "uninstall":
        tunevault.uninstall()
    else:
        tunevault.install(mode="tune", store=f"sqlite:///{new}")
    go.set()
    tuning.join()
    assert dict(kernel.cache) == {}  # stock's plain dict, or the new runtime's: nothing decided there
    with sqlite3.connect(old) as db:
        assert db.execute("SELECT count(*) FROM decisions").fetchone() == (1,)  # a real tuning: published
        assert db.execute("SELECT count(*) FROM leases").fetchone() == (0,)  # released, not left to expire
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    if how == "uninstall":
        tunevault.install(mode="tune", store=f"sqlite:///{new}")
    kc.clear()
    kc.run(kernel, 100)  # undecided in the new store: tuned there
    assert tunevault.stats()["kernels"]["total"]["warmup"]["tunings"] == 1 and kc.LAUNCHED[-1] == 16
    assert list(kernel.cache) == [(100, "torch.float32", "torch.float32")]


# 5. Triton's listener, with the installed version's semantics: a store hit is a cache hit.

@pytest.mark.skipif(not hasattr(triton.knobs.autotuning, "listener"), reason="this Triton has no listener")
def test_listener_sees_fresh_tuning_then_store_hits(sqlite_url: str) -> None:
    import tunevault

    heard: list[dict[str, Any]] = []
    triton.knobs.autotuning.listener = lambda **kw: heard.append(kw)
    try:
        tunevault.install(mode="tune", store=sqlite_url)
        kernel = _fresh(do_bench=_counting_bench([]))
        kc.run(kernel, 100)
        kc.run(kernel, 100)  # in-memory hit: not heard
        kernel.cache.clear()
        kc.run(kernel, 100)  # store hit: a cache hit for the listener
        tunevault.install(mode="tune", store=sqlite_url)  # a "restart" on the same store
        kc.run(kernel, 100)
    finally:
        triton.knobs.autotuning.listener = None
    assert [h["cache_hit"] for h in heard] == [False, True, True]
    assert heard[0]["duration"] > 0 and all(h["duration"] is None for h in heard[1:])
    assert all(h["key"] == (100, "torch.float32", "torch.float32") for h in heard)
    assert all(h["best_config"].kwargs["BLOCK"] == 16 for h in heard)
    assert len(heard[0]["configs_timings"]) == 4 and heard[2]["configs_timings"] == heard[0]["configs_timings"]


# 6. The installed version's pruning rules (fractional top_k, a single survivor).

def test_fractional_top_k_after_early_prune_benchmarks_what_stock_does(sqlite_url: str) -> None:
    def scenario() -> list[int]:
        seen: list[int] = []
        kernel = _fresh(do_bench=_counting_bench(seen),
                        prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: configs[:3],
                                          "perf_model": lambda **kw: kw["BLOCK"], "top_k": 0.5})
        kc.run(kernel, 100)
        return seen

    stock, ours = _on_both(scenario, sqlite_url)
    assert ours == stock


def test_single_surviving_config_is_handled_as_stock_handles_it(sqlite_url: str) -> None:
    def scenario() -> tuple[list[int], list[int]]:
        seen: list[int] = []
        kernel = _fresh(do_bench=_counting_bench(seen),
                        prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: configs[1:2]})
        kc.run(kernel, 100)
        return seen, list(kc.LAUNCHED)

    stock, ours = _on_both(scenario, sqlite_url)
    assert ours == stock


# 7. An Autotuner over something that is not a Triton kernel keeps stock behaviour.

def test_autotuner_over_a_plain_object_runs_stock(tv: Any) -> None:
    launched: list[int] = []

    class Kernel:
        fn = staticmethod(lambda: None)

        def run(self, **kwargs: Any) -> None:
            launched.append(kwargs["BLOCK"])

    tuner = Autotuner(Kernel(), arg_names=[], configs=kc.configs(), key=[], reset_to_zero=None, restore_value=None,
                      do_bench=lambda call, quantiles: (call(), [float(launched[-1])] * 3)[1])
    tuner.run()
    assert launched == [16, 32, 64, 128, 16] and tuner.best_config.kwargs["BLOCK"] == 16


# 8. A meta-parameter the autotuner sets, passed by hand: stock's ValueError in every mode.

def _run_with_block(kernel: Any, n: int, block: int) -> None:
    x = torch.arange(n, dtype=torch.float32)
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, torch.empty_like(x), n, BLOCK=block)


@pytest.mark.parametrize("mode", ["tune", "first"])
def test_passing_an_autotuned_meta_parameter_raises_what_stock_raises(sqlite_url: str, mode: str) -> None:
    def scenario() -> list[Any]:
        # No do_bench of the kernel's own: tunevault's own timer runs (stock raises before it times)
        kernel = _fresh()
        with pytest.raises(Exception) as err:
            _run_with_block(kernel, 100, 32)
        # one config left by the prune: what stock does with it (benchmarked or not) decides the error
        single = _fresh(prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: configs[:1]})
        with pytest.raises(Exception) as single_err:
            _run_with_block(single, 100, 32)
        return [type(err.value), str(err.value), type(single_err.value), list(kc.LAUNCHED)]

    stock, ours = _on_both(scenario, sqlite_url, mode)
    assert stock[0] is ValueError and "Conflicting meta-parameters: BLOCK" in stock[1]
    assert ours == stock


# 9. ``autotuner.configs`` replaced or edited after the first call: decided among what it is now.

def test_replacing_the_configs_list_decides_among_the_new_configs(sqlite_url: str) -> None:
    def scenario() -> tuple[list[int], int, list[int]]:
        seen: list[int] = []
        kernel = _fresh(do_bench=_counting_bench(seen))
        kc.run(kernel, 100)  # BLOCK=16, the first declared, wins
        kernel.configs = [triton.Config({"BLOCK": b}) for b in (128, 64, 32)]
        kernel.cache.clear()
        del seen[:]
        kc.run(kernel, 100)
        timed = sorted(c.kwargs["BLOCK"] for c in kernel.configs_timings)
        return sorted(seen), kernel.best_config.kwargs["BLOCK"], timed

    stock, ours = _on_both(scenario, sqlite_url)
    assert stock == ([32, 64, 128], 32, [32, 64, 128])
    assert ours == stock


@pytest.mark.parametrize("mode", ["tune", "first"])
def test_a_single_config_kernel_follows_its_replaced_configs_list(sqlite_url: str, mode: str) -> None:
    """Stock launches a single-config kernel's ``configs[0]`` as it is at each call, and tunes once
    the list has more: a key decided for the old list is not launched from the hot path."""
    def scenario() -> list[int]:
        kernel = triton.autotune(configs=[triton.Config({"BLOCK": 64})], key=["n"],
                                 do_bench=_counting_bench([]))(kc._Recording(kc.copy_kernel))
        launched = []
        for configs in ([64], [32], [128, 16], [128, 16]):
            if [c.kwargs["BLOCK"] for c in kernel.configs] != configs:
                kernel.configs = [triton.Config({"BLOCK": b}) for b in configs]
            kc.clear()
            kc.run(kernel, 100)
            launched.append(kc.LAUNCHED[-1])
        return launched

    stock, ours = _on_both(scenario, sqlite_url, mode)
    assert stock == [64, 32, 16, 16]  # the smaller BLOCK times faster
    assert ours == (stock if mode == "tune" else [64, 32, 128, 128])  # "first": the first that runs


def test_a_config_edited_in_place_is_not_launched_under_the_old_decision(sqlite_url: str) -> None:
    def scenario() -> tuple[list[int], int]:
        seen: list[int] = []
        kernel = _fresh(do_bench=_counting_bench(seen))
        kc.run(kernel, 100)  # BLOCK=16 (declared #0) wins, and is stored
        kernel.configs[0].kwargs["BLOCK"] = 256  # the same Config object, now another config
        kernel.cache.clear()
        del seen[:]
        kc.run(kernel, 100)
        return sorted(seen), kernel.best_config.kwargs["BLOCK"]

    stock, ours = _on_both(scenario, sqlite_url)
    assert stock == ([32, 64, 128, 256], 32)
    assert ours == stock


# 10. ``autotuner.cache`` assigned, or changed through a reference taken before the first call.

@pytest.mark.parametrize("mode", ["tune", "first"])
def test_the_cache_assigned_or_held_by_reference_is_the_one_launches_follow(sqlite_url: str, mode: str) -> None:
    def scenario() -> list[Any]:
        kernel = _fresh(do_bench=_counting_bench([]))
        held = kernel.cache  # e.g. a registry that clears caches, taken at import
        kc.run(kernel, 100)
        (key, decided), = kernel.cache.items()
        pinned = next(c for c in kernel.configs if c.kwargs["BLOCK"] == 128)
        held[key] = pinned
        kc.clear()
        kc.run(kernel, 100)
        via_reference = list(kc.LAUNCHED)
        other = next(c for c in kernel.configs if c.kwargs["BLOCK"] == 64)
        kernel.cache = {key: other}  # pin by replacing the dict
        kc.clear()
        kc.run(kernel, 100)
        via_assignment = list(kc.LAUNCHED)
        kernel.cache |= {key: pinned}
        kc.clear()
        kc.run(kernel, 100)
        return [held is kernel.cache or "replaced", via_reference, via_assignment, list(kc.LAUNCHED),
                len(kernel.cache)]

    stock, ours = _on_both(scenario, sqlite_url, mode)
    assert stock[1:] == [[128], [64], [128], 1]
    assert ours[1:] == stock[1:]
    import tunevault

    tunevault.uninstall()
    assert "cache" not in Autotuner.__dict__  # stock's class again: no property left behind


# 10b. A copy of an autotuned kernel is a kernel of its own, as in stock.

@pytest.mark.parametrize("mode", ["tune", "first"])
def test_a_copied_kernel_decides_and_launches_on_its_own(sqlite_url: str, mode: str) -> None:
    import copy

    def scenario() -> list[Any]:
        seen: list[Any] = []
        kernel = _fresh(do_bench=_counting_bench([]))
        kc.run(kernel, 100)
        shallow = copy.copy(kernel)  # given its own configs and an empty cache
        shallow.configs = [triton.Config({"BLOCK": b}) for b in (64, 128)]
        shallow.cache = {}
        kc.clear()
        kc.run(shallow, 100)
        seen += [kc.LAUNCHED[-1], shallow.best_config.kwargs["BLOCK"], kernel.best_config.kwargs["BLOCK"],
                 len(shallow.cache), len(kernel.cache)]
        deep = copy.deepcopy(kernel)  # after the first call
        kc.clear()
        kc.run(deep, 50)
        seen.append(kc.LAUNCHED[-1])
        fresh = _fresh(do_bench=_counting_bench([]))
        pinned = copy.deepcopy(fresh)  # before the first call, then a config pinned through its cache
        kc.run(pinned, 70)
        (key, _decided), = pinned.cache.items()
        pinned.cache[key] = pinned.configs[2]
        kc.clear()
        kc.run(pinned, 70)
        seen.append(list(kc.LAUNCHED))  # the pinned config, without benchmarking
        return seen

    stock, ours = _on_both(scenario, sqlite_url, mode)
    assert stock == [64, 64, 16, 1, 1, 16, [64]]  # the last config launched by each call
    assert ours == stock


# 11. configs_timings when early_config_prune makes up Config objects.

def test_configs_timings_map_each_pruned_config_to_its_own_timing(sqlite_url: str) -> None:
    def scenario() -> list[tuple[str, list[float], bool]]:
        made: list[triton.Config] = []

        def prune(configs: list[triton.Config], nargs: dict[str, Any], **kw: Any) -> list[triton.Config]:
            made[:] = [configs[0], triton.Config({"BLOCK": 64}), triton.Config({"BLOCK": 128})]
            return made

        kernel = _fresh(do_bench=_counting_bench([]), prune_configs_by={"early_config_prune": prune})
        kc.run(kernel, 100)
        return sorted((str(c), t, any(c is m for m in made)) for c, t in kernel.configs_timings.items())

    stock, ours = _on_both(scenario, sqlite_url)
    assert sorted(t[0] for _, t, _ in stock) == [16.0, 64.0, 128.0] and all(m for *_, m in stock)
    assert ours == stock


def _scalar_bench(kernel_call: Callable[[], None], quantiles: Any) -> float:
    """A do_bench that returns one number, not quantiles: stock keeps that shape."""
    kernel_call()
    return float(kc.LAUNCHED[-1])


def test_configs_timings_keeps_the_shape_a_benchmarker_returned(sqlite_url: str) -> None:
    def scenario() -> list[tuple[int, Any]]:
        kernel = _fresh(do_bench=_scalar_bench)
        kc.run(kernel, 100)
        return sorted((c.kwargs["BLOCK"], t) for c, t in kernel.configs_timings.items())

    stock, ours = _on_both(scenario, sqlite_url)
    assert stock == [(16, 16.0), (32, 32.0), (64, 64.0), (128, 128.0)]
    assert ours == stock
    import tunevault

    tunevault.uninstall()
    tunevault.install(mode="tune", store=sqlite_url)  # a stored decision read back keeps it too
    assert scenario() == stock


# 12. An Autotuner subclass that measures configs its own way.

class _OwnBench(Autotuner):
    """Times each config as its ``_bench`` says (prefers the largest BLOCK), as stock calls it."""

    calls: list[int] = []

    def _bench(self, *args: Any, config: triton.Config, **meta: Any) -> list[float]:
        _OwnBench.calls.append(config.kwargs["BLOCK"])
        assert self.nargs is not None and "x_ptr" in self.nargs  # stock sets nargs before benchmarking
        return [1000.0 / config.kwargs["BLOCK"]] * 3


class _OwnDoBench(Autotuner):
    """Replaces ``do_bench``, which Triton's own ``_bench`` calls for every config."""

    calls: list[int] = []

    @property
    def do_bench(self) -> Callable[..., list[float]]:
        def bench(kernel_call: Callable[[], None], quantiles: Any) -> list[float]:
            kernel_call()
            _OwnDoBench.calls.append(kc.LAUNCHED[-1])
            return [1000.0 / kc.LAUNCHED[-1]] * 3
        return bench


@pytest.mark.parametrize("subclass", [_OwnBench, _OwnDoBench])
def test_a_subclass_measuring_its_own_way_is_what_decides(sqlite_url: str, subclass: type[Any]) -> None:
    def scenario() -> tuple[list[int], int]:
        subclass.calls = []
        kernel = subclass(kc._Recording(kc.copy_kernel), kc.copy_kernel.arg_names, kc.configs(), ["n"], None, None)
        kc.run(kernel, 100)
        return sorted(subclass.calls), kernel.best_config.kwargs["BLOCK"]

    stock, ours = _on_both(scenario, sqlite_url)
    assert stock == ([16, 32, 64, 128], 128)
    assert ours == stock


def _rejecting_128(kernel_call: Callable[[], None], quantiles: Any) -> list[float]:
    """A validating benchmarker: BLOCK=128 gives wrong results for this caller, so it never wins."""
    kernel_call()
    return [float("inf") if kc.LAUNCHED[-1] == 128 else float(kc.LAUNCHED[-1])] * 3


def _preferring_large(kernel_call: Callable[[], None], quantiles: Any) -> list[float]:
    kernel_call()
    return [1000.0 / kc.LAUNCHED[-1]] * 3


class _RejectingSubclass(Autotuner):
    """The same rejection, as a subclass's ``_bench``: a plain autotuner's decision must not reach it."""

    def _bench(self, *args: Any, config: triton.Config, **meta: Any) -> list[float]:
        return [float("inf") if config.kwargs["BLOCK"] == 128 else float(config.kwargs["BLOCK"])] * 3


@pytest.mark.parametrize("other", ["do_bench", "subclass"])
def test_autotuners_that_measure_differently_share_no_decision(sqlite_url: str, other: str) -> None:
    """Two autotuners over one JIT function, same configs and key, one benchmarking its own way:
    each decides by its own measurement, in this process and through the store."""
    def scenario() -> list[Any]:
        a = _fresh(do_bench=_preferring_large)
        if other == "do_bench":
            b = _fresh(do_bench=_rejecting_128)
        else:
            b = _RejectingSubclass(kc._Recording(kc.copy_kernel), kc.copy_kernel.arg_names, kc.configs(), ["n"],
                                   None, None, do_bench=_preferring_large)
        kc.run(a, 100)
        kc.clear()
        kc.run(b, 100)
        return [a.best_config.kwargs["BLOCK"], b.best_config.kwargs["BLOCK"], sorted(set(kc.LAUNCHED))]

    stock, ours = _on_both(scenario, sqlite_url)
    assert stock[:2] == [128, 16]  # B rejects 128 and launches 16
    assert ours == stock
    import tunevault

    tunevault.uninstall()
    tunevault.install(mode="tune", store=sqlite_url)  # a fresh process's view: the store only
    kc.clear()
    b = _fresh(do_bench=_rejecting_128)
    kc.run(b, 100)
    assert b.best_config.kwargs["BLOCK"] == 16


class _RaisingBench(Autotuner):
    """A subclass whose ``_bench`` has a bug at BLOCK=32: stock's ``benchmark`` does not catch it."""

    def _bench(self, *args: Any, config: triton.Config, **meta: Any) -> list[float]:
        if config.kwargs["BLOCK"] == 32:
            RAISED.append(ZeroDivisionError(f"no timer for BLOCK={config.kwargs['BLOCK']}"))
            raise RAISED[-1]
        return [1.0] * 3


def test_an_error_of_a_subclass_bench_reaches_the_caller_as_in_stock(sqlite_url: str) -> None:
    def scenario() -> list[tuple[str, bool]]:
        RAISED.clear()
        kernel = _RaisingBench(kc._Recording(kc.copy_kernel), kc.copy_kernel.arg_names, kc.configs(), ["n"],
                               None, None)
        seen = []
        for _attempt in range(2):  # nothing is decided: the next call meets the error again
            with pytest.raises(ZeroDivisionError) as err:
                kc.run(kernel, 100)
            seen.append((str(err.value), err.value is RAISED[-1]))
        return seen

    stock, ours = _on_both(scenario, sqlite_url)
    assert stock == [("no timer for BLOCK=32", True)] * 2
    assert ours == stock


# 13. A config's error reaches the caller, as stock's benchmark lets it: only the errors stock's
#    _bench catches (out of resources, a failed compile-time assertion, ptxas) make a config lose.

RAISED: list[Exception] = []
POSTED: list[str] = []


def _bug_at_32(nargs: dict[str, Any]) -> None:
    """A config pre_hook with a bug only BLOCK=32 meets."""
    if nargs["BLOCK"] == 32:
        RAISED.append(KeyError(f"no scale for BLOCK={nargs['BLOCK']}"))
        raise RAISED[-1]


def _post(nargs: dict[str, Any], exception: BaseException | None) -> None:
    if exception is not None:
        POSTED.append(type(exception).__name__)


def _cpu_bench(fn: Callable[[], None], quantiles: Any = None, **_: Any) -> list[float]:
    """A wall-clock do_bench: stock Triton has none under the interpreter."""
    import time

    fn()
    started = time.perf_counter()
    fn()
    return [(time.perf_counter() - started) * 1e3] * 3


def _buggy(where: str, own_bench: bool) -> Any:
    """Two configs, the first broken: in its pre_hook, or in the kernel (tl.arange of 48 is invalid)."""
    options: dict[str, Any] = {"post_hook": _post, "do_bench": _cpu_bench if own_bench else None}
    if where == "hook":
        configs = [triton.Config({"BLOCK": 32}, pre_hook=_bug_at_32), triton.Config({"BLOCK": 16})]
    else:
        configs = [triton.Config({"BLOCK": 48}), triton.Config({"BLOCK": 16})]
    return triton.autotune(configs=configs, key=["n"], **options)(kc.copy_kernel)


@pytest.mark.parametrize("own_bench", [False, True], ids=["triton-bench", "own-bench"])
@pytest.mark.parametrize("where", ["hook", "kernel"])
def test_a_config_error_reaches_the_caller_as_in_stock(where: str, own_bench: bool, sqlite_url: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Autotuner, "do_bench", property(lambda self: self._do_bench or _cpu_bench))

    def scenario() -> dict[str, Any]:
        RAISED.clear()
        POSTED.clear()
        kernel = _buggy(where, own_bench)
        seen = []
        for _attempt in range(2):  # nothing is decided: the next call meets the error again
            with pytest.raises(Exception) as err:
                kc.run(kernel, 100)
            seen.append((type(err.value).__name__, str(err.value), err.value is RAISED[-1] if RAISED else None))
        return {"raised": seen, "post_hook": sorted(set(POSTED)), "cache": dict(kernel.cache),
                "nargs": None if kernel.nargs is None else sorted(kernel.nargs)}  # stock leaves the call's

    stock, ours = _on_both(scenario, sqlite_url)
    expected = ("KeyError", "'no scale for BLOCK=32'", True) if where == "hook" else (
        "InterpreterError", """ValueError("arange's range must be a power of 2")""", None)
    assert stock["raised"] == [expected] * 2 and stock["post_hook"] == ([] if where == "hook" else
                                                                        ["InterpreterError"])
    assert stock["nargs"] == ["n", "out_ptr", "x_ptr"]
    assert ours == stock
    _, validated = _on_both(scenario, sqlite_url, validate=True)  # validation runs every config first
    assert validated["raised"] == stock["raised"] and validated["cache"] == {}
    if where == "hook":  # first mode: a compile error means "does not build", a bug in a hook does not
        _, first = _on_both(scenario, sqlite_url, mode="first")
        assert first["raised"] == stock["raised"]


def test_a_meta_parameter_a_config_sets_raises_what_stock_raises(sqlite_url: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Passing BLOCK, which config #0 tunes: stock raises; config #1 (no BLOCK) is not launched instead."""
    monkeypatch.setattr(Autotuner, "do_bench", property(lambda self: self._do_bench or _cpu_bench))

    def scenario() -> tuple[str, str]:
        kernel = triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({}, num_warps=2)],
                                 key=["n"])(kc.copy_kernel)
        x = torch.arange(100, dtype=torch.float32)
        with pytest.raises(Exception) as err:
            kernel[(4,)](x, torch.empty_like(x), 100, BLOCK=32)
        return type(err.value).__name__, str(err.value)

    stock, ours = _on_both(scenario, sqlite_url)
    assert stock[0] == "ValueError" and "Conflicting meta-parameters: BLOCK" in stock[1]
    assert ours == stock


# 12. A compile-only call (warmup=True) launches nothing real: it never decides a key.

class _Compiling(kc._Recording):
    """Returns which config a compile-only launch built, so a test sees what ``run`` returned."""

    def run(self, *args: Any, **kwargs: Any) -> Any:
        out = super().run(*args, **kwargs)
        return f"built BLOCK={kwargs['BLOCK']}" if kwargs.get("warmup") else out


def test_a_compile_only_call_never_decides_a_key(sqlite_url: str) -> None:
    import tunevault

    timed: list[int] = []

    def do_bench(kernel_call: Callable[[], None], quantiles: Any) -> list[float]:
        before = len(kc.LAUNCHED)
        kernel_call()
        block = kc.LAUNCHED[-1] if len(kc.LAUNCHED) > before else 0  # a compile-only launch runs nothing
        timed.append(block)
        return [float(abs(block - 64))] * 3  # BLOCK=64 wins a real measurement; compile-only ones all tie

    hooks: list[int] = []
    configs = [triton.Config({"BLOCK": b}, pre_hook=lambda nargs: hooks.append(nargs["BLOCK"])) for b in (16, 32, 64)]

    def scenario() -> dict[str, Any]:
        hooks.clear()
        kernel = triton.autotune(configs=configs, key=["n"], do_bench=do_bench)(_Compiling(kc.copy_kernel))
        x = torch.arange(100, dtype=torch.float32)
        ret = kernel.run(x, torch.empty_like(x), 100, grid=(7,), warmup=True)
        return {"ret": ret, "best": kernel.best_config.kwargs, "hooks": list(hooks), "launched": list(kc.LAUNCHED),
                "nargs": kernel.nargs}

    stock, ours = _on_both(scenario, sqlite_url)
    assert ours == stock == {"ret": "built BLOCK=16", "best": {"BLOCK": 16}, "hooks": [16, 32, 64, 16],
                             "launched": [], "nargs": None}
    assert tunevault.stats()["kernels"]["total"]["warmup"].get("tunings", 0) == 0
    from tunevault.store.base import open_store

    store = open_store(sqlite_url)
    try:
        assert store.count() == 0  # nothing published for a later process to launch untuned
    finally:
        store.close()
    tunevault.install(mode="tune", store=sqlite_url)  # a later process on the same store
    timed.clear()
    kernel = triton.autotune(configs=configs, key=["n"], do_bench=do_bench)(_Compiling(kc.copy_kernel))
    x = torch.arange(100, dtype=torch.float32)
    kernel.run(x, torch.empty_like(x), 100, grid=(7,), warmup=True)  # in this process too: still undecided
    kc.clear()
    kc.run(kernel, 100)
    assert timed == [16, 32, 64] and kc.LAUNCHED[-1] == 64  # the first real call tunes, on real launches
