"""Modes: install/uninstall restores stock Triton exactly; ``first`` never benchmarks; ``off`` is stock."""

from __future__ import annotations

import logging

import pytest
import torch
from triton.runtime.autotuner import Autotuner

import kernels_core as kc
from conftest import count_launches

STOCK_RUN = Autotuner.run  # captured at import, before any test installs anything


def _tunevault_attrs(kernel: object) -> list[str]:
    return [name for name in vars(kernel) if "tunevault" in name.lower()]


def test_install_then_uninstall_restores_stock_triton_exactly(sqlite_url: str) -> None:
    import tunevault
    from tunevault.integration.triton_adapter import kernel_states

    tunevault.install(mode="tune", store=sqlite_url)
    tunevault.install(mode="tune", store=sqlite_url)  # idempotent: replaces, never double-patches
    assert Autotuner.run is not STOCK_RUN
    assert torch.equal(kc.run_unary(kc.own_bench, 40), kc.expected_unary(40))
    assert _tunevault_attrs(kc.own_bench)  # the adapter did attach its state
    assert len(kc.own_bench.cache) == 1  # the autotuner's public cache, filled as stock fills it

    tunevault.uninstall()
    tunevault.uninstall()  # idempotent
    assert Autotuner.run is STOCK_RUN  # the very function object, not a wrapper
    assert _tunevault_attrs(kc.own_bench) == [] and not kc.own_bench.cache  # tunevault's decisions go too
    assert kernel_states() == [] and not tunevault.installed()

    # Stock Triton runs the kernel again, through its own cache (its own do_bench works here).
    kc.clear()
    assert torch.equal(kc.run_unary(kc.own_bench, 40), kc.expected_unary(40))
    assert len(kc.own_bench.cache) == 1 and kc.SEEN["bench"]  # stock benchmarked with the kernel's do_bench
    assert _tunevault_attrs(kc.own_bench) == []
    kc.own_bench.cache.clear()


def test_install_mode_off_is_stock(sqlite_url: str) -> None:
    import tunevault

    tunevault.install(mode="tune", store=sqlite_url)
    tunevault.install(mode="off")
    assert Autotuner.run is STOCK_RUN and not tunevault.installed()


def test_first_mode_never_benchmarks_and_logs_one_line_per_kernel(caplog: pytest.LogCaptureFixture) -> None:
    import tunevault

    tunevault.install(mode="first", store="memory://")
    kernels = [kc.add_one, kc.picky, kc.heuristic, kc.no_configs, kc.one_config, kc.pruned]
    caplog.set_level(logging.INFO, logger="tunevault")
    for kernel in kernels:
        for n, new_key in ((40, True), (48, True), (40, False)):
            with count_launches(kernel) as launches:
                assert torch.equal(kc.run_unary(kernel, n), kc.expected_unary(n))
            # One launch per call; on a new key picky first tries config #0, which fails to compile.
            assert launches.count == (2 if kernel is kc.picky and new_key else 1)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) == len(kernels), lines
    for kernel, line in zip(kernels, lines, strict=True):
        assert kernel.base_fn.__name__ in line
        assert f"{len(kernel.configs)} candidate configs" in line
    # The picked config is the first that compiles: picky's #0 has a failing static_assert.
    assert "picked #1" in lines[1] and kc.decided(kc.picky)["BLOCK"] == 16
    assert kc.decided(kc.add_one)["BLOCK"] == 16 and "picked #0" in lines[0]
    assert "1 candidate configs" in lines[3]  # Triton substitutes one default config for an empty list
    stats = tunevault.stats()["kernels"]
    assert all(v.get("warmup", {}).get("benchmark_runs", 0) == 0 for v in stats.values())
    # Every call is counted: a new key decided by rule is a miss (it was in no counter), a known key a hit.
    add_one = stats["kernels_core:add_one"]["warmup"]
    assert (add_one["misses"], add_one["hits"], add_one["tunings"]) == (2, 1, 0)


def test_first_mode_with_no_compiling_config_names_the_kernel() -> None:
    import tunevault
    from tunevault import TuningError

    tunevault.install(mode="first", store="memory://")
    with pytest.raises(TuningError, match="hopeless"):
        kc.run_unary(kc.hopeless, 40)


def test_sealing_in_first_mode_says_that_on_miss_does_not_apply(caplog: pytest.LogCaptureFixture) -> None:
    """First mode decides every key by rule, so no key is ever missing: a strict seal must say it
    changes nothing rather than look like protection it is not."""
    import tunevault

    tunevault.install(mode="first", store="memory://")
    caplog.set_level(logging.WARNING, logger="tunevault")
    tunevault.seal(on_miss="error")
    assert any("has no effect in mode 'first'" in r.getMessage() for r in caplog.records)
    assert torch.equal(kc.run_unary(kc.add_one, 40), kc.expected_unary(40))  # decided by rule, not raised


@pytest.mark.parametrize("value", [None, "", "off", " OFF "])
def test_environment_off_or_unset_leaves_triton_untouched(monkeypatch: pytest.MonkeyPatch,
                                                          value: str | None) -> None:
    from tunevault.integration import activation

    if value is None:
        monkeypatch.delenv("TUNEVAULT_MODE", raising=False)
    else:
        monkeypatch.setenv("TUNEVAULT_MODE", value)
    assert activation.activate_from_env() is False
    assert not activation.pending()
    assert torch.equal(kc.run_unary(kc.one_config, 40), kc.expected_unary(40))
    assert Autotuner.run is STOCK_RUN and _tunevault_attrs(kc.one_config) == []
