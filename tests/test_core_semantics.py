"""Triton's autotune semantics, preserved: the key, hooks, pruning, do_bench, failures, logs, prints."""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any

import pytest
import torch
import triton.language as tl

import kernels_core as kc
from conftest import count_launches


@pytest.fixture(autouse=True)
def _clear_seen() -> None:
    kc.clear()


def stored(url: str) -> list[dict[str, Any]]:
    with sqlite3.connect(url.removeprefix("sqlite://")) as con:
        return [json.loads(p) for (p,) in con.execute("SELECT payload FROM decisions ORDER BY created")]


def stock_key(kernel: Any, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """Triton's own recipe (Autotuner.run): key args' values, then the dtype of every tensor arg."""
    named = {**dict(zip(kernel.arg_names, args, strict=False)), **kwargs}
    named = {k: v for k, v in named.items() if k in kernel.arg_names}
    return tuple([named[k] for k in kernel.keys if k in named]
                 + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])


def test_key_semantics_match_triton_and_are_stored_labelled_json(tv: Any, sqlite_url: str) -> None:
    calls = [dict(n=20, scale=0.5, flag=True), dict(n=20, scale=0.5, flag=True),
             dict(n=20, scale=0.25, flag=True), dict(n=20, scale=0.5, flag=False),
             dict(n=20, scale=0.5, flag=True, dt=tl.bfloat16), dict(n=20, scale=0.5, flag=True, opt=3),
             dict(n=24, scale=0.5, flag=True), dict(n=24, scale=0.5, flag=True)]
    stock_keys = []
    for call in calls:
        x = kc.vec(call["n"])
        stock_keys.append(stock_key(kc.keyed, (x, x, call["n"], call["scale"], call["flag"], call.get("opt")),
                                    {"DT": call.get("dt", tl.float16)}))
        with count_launches(kc.keyed) as launches:
            out = kc.run_keyed(**call)
        expected = kc.vec(call["n"]) * call["scale"] + (1 if call["flag"] else 0)
        assert torch.allclose(out, expected)
        assert (launches.count > 1) == (stock_keys.count(stock_keys[-1]) == 1)  # tunes iff Triton would
    decisions = stored(sqlite_url)
    assert len(decisions) == len(set(stock_keys)) == 6
    assert decisions[0]["key"] == [["n", 20], ["scale", 0.5], ["flag", True], ["DT", "fp16"], ["opt", None],
                                   ["dtype(x_ptr)", "float32"], ["dtype(out_ptr)", "float32"]]
    assert ["DT", "bf16"] in decisions[3]["key"] and ["opt", 3] in decisions[4]["key"]


def test_reset_to_zero_and_restore_value_keep_results_right(tv: Any) -> None:
    x = kc.vec(40)
    acc = torch.full_like(x, 5.0)
    with count_launches(kc.accumulate) as launches:
        kc.accumulate[kc.grid(40)](x, acc, 40)
    assert launches.count > 1  # benchmarked: without reset_to_zero acc would hold many sums
    assert torch.equal(acc, x)  # Triton semantics: reset before each run and before the real launch

    y = kc.vec(40)
    kc.double_inplace[kc.grid(40)](y, 40)
    assert torch.equal(y, kc.vec(40) * 2)  # restored after each benchmark run: doubled exactly once


def test_user_pre_and_post_hooks_see_the_callers_arguments(tv: Any) -> None:
    x, out = kc.vec(40), torch.full((40,), 9.0)
    kc.hooked[kc.grid(40)](x, out, 40)
    assert torch.equal(out, x)  # the pre hook zeroed out before each run (and reset_only at the end)
    ptr = out.data_ptr()
    runs = [s for s in kc.SEEN["pre"] if not s[3]]
    assert runs and {(p, n) for p, n, _b, _r in kc.SEEN["pre"]} == {(ptr, 40)}
    assert {b for _p, _n, b, _r in runs} == {16, 32}  # every config, with its meta-parameters
    assert [s[3] for s in kc.SEEN["pre"]].count(True) == 1  # Triton's final reset_only call
    assert len(kc.SEEN["post"]) == len(runs) and all(s[3] is None for s in kc.SEEN["post"])
    kc.clear()
    kc.hooked[kc.grid(40)](x, out, 40)  # decided: Triton calls no autotuner hook on a plain launch
    assert kc.SEEN["pre"] == [] and kc.SEEN["post"] == []
    assert torch.equal(out, x * 2)


def test_config_pre_hook_runs_before_every_launch(tv: Any, sqlite_url: str) -> None:
    x, out = kc.vec(40), torch.full((40,), 9.0)
    kc.cfg_hooked[kc.grid(40)](x, out, 40)
    assert torch.equal(out, x)
    assert {b for _p, b in kc.SEEN["cfg_pre"]} == {16, 32}
    kc.clear()
    kc.cfg_hooked[kc.grid(40)](x, out, 40)
    assert kc.SEEN["cfg_pre"] == [(out.data_ptr(), kc.decided(kc.cfg_hooked)["BLOCK"])]
    assert torch.equal(out, x)
    assert stored(sqlite_url)[0]["config"]["pre_hook"].startswith("kernels_core:zero_out@")  # name and what it computes


def test_prune_configs_by_early_prune_perf_model_and_top_k(tv: Any, sqlite_url: str) -> None:
    out = kc.run_unary(kc.pruned, 40)
    assert torch.equal(out, kc.expected_unary(40))
    n, ptr, kwargs = kc.SEEN["prune"][0]
    assert n == 40 and kwargs == ["grid", "warmup"]  # Triton passes nargs and the launch kwargs
    assert kc.SEEN["perf"] == []  # 16 and 32 survive the early prune: no more than top_k, no model
    kc.clear()
    kc.run_unary(kc.pruned, 100)  # 16, 32 and 64 survive; the model keeps the top 2 (64 and 32)
    assert sorted(b for _n, b in kc.SEEN["perf"]) == [16, 32, 64]
    tried = [c["config"]["kwargs"]["BLOCK"] for c in stored(sqlite_url)[1]["candidates"]]
    assert sorted(tried) == [32, 64]


def test_kernel_own_do_bench_is_used(tv: Any) -> None:
    kc.run_unary(kc.own_bench, 40)
    assert len(kc.SEEN["bench"]) == len(kc.own_bench.configs)


def test_heuristics_inside_autotune(tv: Any) -> None:
    for n in (32, 40):  # EVEN is computed per config, after the autotuner adds BLOCK
        assert torch.equal(kc.run_unary(kc.heuristic, n), kc.expected_unary(n))


def test_config_out_of_resources_is_recorded_as_failed(tv: Any, sqlite_url: str) -> None:
    assert torch.equal(kc.run_unary(kc.oversized, 40), kc.expected_unary(40))
    assert kc.decided(kc.oversized)["BLOCK"] != 32
    candidates = stored(sqlite_url)[0]["candidates"]
    failed = [c for c in candidates if c["error"]]
    assert [c["index"] for c in failed] == [0] and "OutOfResources: out of resource" in failed[0]["error"]
    assert all(c["timings"] for c in candidates if not c["error"])


def test_every_config_failing_is_a_clear_error(tv: Any, sqlite_url: str) -> None:
    from tunevault import TuningError

    with pytest.raises(TuningError) as err:
        kc.run_unary(kc.too_large, 40)
    text = str(err.value)
    assert "too_large" in text and "n=40" in text and "out of resource: shared memory" in text
    assert stored(sqlite_url) == []  # no decision stored for a key nothing can run


def test_log_info_per_tuning_debug_per_store_hit(sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """INFO once per tuning, DEBUG for a store hit, and nothing at all on the in-memory hot path."""
    import tunevault

    caplog.set_level(logging.DEBUG, logger="tunevault")
    tunevault.install(mode="tune", store=sqlite_url)
    kc.run_unary(kc.add_one, 40)
    kc.run_unary(kc.add_one, 48)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 2 and all("tuned" in m and "add_one" in m for m in infos)
    assert "n=40" in infos[0] and "n=48" in infos[1]

    caplog.clear()
    for _ in range(3):
        kc.run_unary(kc.add_one, 40)  # in-memory hits: no logging at all
    assert caplog.records == []

    tunevault.install(mode="tune", store=sqlite_url)  # fresh runtime: decisions come from the store
    caplog.clear()
    kc.run_unary(kc.add_one, 40)
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []
    hits = [r.getMessage() for r in caplog.records if "stored decision" in r.getMessage()]
    assert len(hits) == 1 and "add_one" in hits[0] and "n=40" in hits[0]


def test_triton_print_autotuning_is_honoured(tv: Any, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TRITON_PRINT_AUTOTUNING", "1")
    kc.run_unary(kc.add_one, 40)
    kc.run_unary(kc.add_one, 40)
    printed = capsys.readouterr().out
    assert printed.count("Triton autotuning for function add_one") == 1  # once per tuning, as stock
    assert "best config selected: BLOCK: " in printed and "with key as (40, 'torch.float32'" in printed
    assert printed.count("Autotuning kernel add_one with config BLOCK: ") == len(kc.add_one.configs)
    kc.run_unary(kc.oversized, 40)
    from triton.runtime.errors import OutOfResources

    stock_text = str(OutOfResources(262144, 232448, "shared memory"))  # what stock prints: str(exc), no type
    assert f"Autotuning failed with {stock_text}\n" in capsys.readouterr().out  # the config out of resources
    monkeypatch.setenv("TRITON_PRINT_AUTOTUNING", "0")
    kc.run_unary(kc.add_one, 48)
    assert "Triton autotuning" not in capsys.readouterr().out
