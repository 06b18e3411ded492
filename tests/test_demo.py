"""``tunevault demo`` end to end: real processes, real kernels, a real SQLite store."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import torch

from conftest import subprocess_env
from tunevault.cli.demo_cmd import _benched, _print_report, _verdict
from tunevault.cli.main import main
from tunevault.demo import kernels
from tunevault.store.base import Query, open_store


def demo(store: str, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    e = subprocess_env(**{"TUNEVAULT_CPU_BENCH_REPS": "2", **env})  # the demo passes it to its phases
    if "TRITON_INTERPRET" not in env:
        e.pop("TRITON_INTERPRET")  # the demo must pick the interpreter itself when there is no GPU
    cmd = [sys.executable, "-m", "tunevault.cli.main", "--store", store, "demo", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=e)


def test_warm_restart_runs_no_benchmarks_then_serving_is_sealed(tv: Any, sqlite_url: str, capsys: Any) -> None:
    # A stale decision for one demo key is already stored: the demo must clear it so cold really tunes.
    x, y = torch.randn(1000, generator=torch.Generator().manual_seed(0)), torch.randn(1000)
    kernels.run_scaled_add(x, y)
    tv.uninstall()

    proc = demo(sqlite_url, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    cold, warm = result["cold"], result["warm"]
    assert result["cleared"] == 1 and result["ok"] and result["problems"] == []
    assert cold["interpreter"] == warm["interpreter"] == (not torch.cuda.is_available())
    assert cold["pid"] != warm["pid"]  # two fresh processes: a real restart
    assert [k["kernel"] for k in cold["kernels"]] == ["scaled_add", "row_sum", "matmul"]
    for c, w in zip(cold["kernels"], warm["kernels"], strict=True):
        assert c["bench_runs"] > 0 and c["tunings"] == 1
        assert w["bench_runs"] == 0 and w["tunings"] == 0 and w["launches"] == w["calls"]
        assert c["ok"] and w["ok"]
        assert (w["key"], w["config_index"]) == (c["key"], c["config_index"])

    store = open_store(sqlite_url)
    assert len(list(store.decisions(Query(kernel="tunevault.demo.kernels")))) == 3  # nothing stored at serve time
    store.close()

    # The serving contract, on the same screen: sealed, an unseen key (float16) is served without
    # benchmarking, and one line says why it missed.
    serving = warm["serving"]
    assert serving["bench_runs"] == 0 and serving["tunings"] == 0 and serving["fallbacks"] == 1 and serving["ok"]
    assert serving["diagnosis"].startswith("scaled_add: no decision for n=1000 dtype(x_ptr)=float16")
    assert "nearest decided key differs in dtype(x_ptr): float32 -> float16" in serving["diagnosis"]
    _print_report(cold, warm, "tunevault")
    screen = capsys.readouterr().out
    assert "warm restart: 0 benchmark runs" in screen
    assert f"a key warmup never saw:\n  {serving['diagnosis']}\n" in screen
    assert f"-> served with nearest key's config {serving['served_with'].split(' config ')[1]}: 0 benchmark " \
           "runs, 0 tunings, result matches torch" in screen
    assert "None" not in serving["served_with"]  # BLOCK=256 num_warps=4, not Triton's repr

    # Had the store forgotten (memory://, a wiped cache), the restart would have tuned like the cold
    # run did: the demo must fail then, naming it.
    ok, problems = _verdict(cold, {**cold, "phase": "warm", "serving": serving})
    cold_runs = sum(_benched(r) for r in cold["kernels"])
    assert not ok and problems == [f"warm restart benchmarked ({cold_runs} runs): decisions were not reused"]


@pytest.mark.parametrize("timeout", ["inf", "1e10", "-1", "0", "nan"])
def test_unusable_timeout_is_refused_before_the_store_is_touched(timeout: str, sqlite_url: str,
                                                                  capsys: Any) -> None:
    # inf and 1e10 overflowed the wait (a traceback); 0 and -1 cleared the decisions, then failed.
    code = main(["--store", sqlite_url, "demo", f"--timeout={timeout}"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()] and "--timeout takes seconds above 0" in err


def test_a_malformed_variable_the_phases_read_is_one_warning(sqlite_url: str) -> None:
    """The phases' stderr is shown only when one fails: ``TUNEVAULT_TOLERANCE=abc`` (each phase
    tuned with the default) passed without a word, exit 0."""
    proc = demo(sqlite_url, TUNEVAULT_TOLERANCE="abc")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["[WARNING] tunevault: ignoring TUNEVAULT_TOLERANCE must be a number; "
                                        "got 'abc'; using the default"]
