"""Persistence: each key tunes once, is stored, and a restarted process benchmarks nothing.

Benchmarking is counted below the autotuner (``count_launches``): a call that reuses a decision
launches its kernel exactly once; a call that tunes launches it once per benchmark repetition.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import kernels_core as kc
from conftest import count_launches, run_py, subprocess_env

# What a server does, in a fresh interpreter. activate_from_env() is exactly what the .pth startup
# hook runs (test_core_activation.py proves the hook itself on a real pip install).
SERVER = """
import json
import tunevault.integration.activation as activation
activation.activate_from_env()
import torch
import kernels_core as kc
from conftest import count_launches

out = []
for name, n, dtype in {workload!r}:
    kernel, dt = getattr(kc, name), getattr(torch, dtype)
    with count_launches(kernel) as launches:
        if name == "accumulate":
            x = kc.vec(n, dt); acc = torch.zeros_like(x)
            kernel[kc.grid(n)](x, acc, n)
            ok = torch.equal(acc, x)
        else:
            ok = torch.equal(kc.run_unary(kernel, n, dt), kc.expected_unary(n, dt))
    out.append({{"call": [name, n, dtype], "ok": ok, "launches": launches.count,
                "config": kc.decided(kernel)}})
print(json.dumps(out))
"""

WORKLOAD = [("add_one", 40, "float32"), ("add_one", 48, "float32"), ("add_one", 40, "float16"),
            ("accumulate", 40, "float32"), ("pruned", 100, "float32"), ("add_one", 40, "float32")]


def server_code(workload: list[tuple[str, int, str]]) -> str:
    return SERVER.format(workload=workload)


def rows(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as con:
        sql = "SELECT kernel_name, key_text FROM decisions ORDER BY kernel_name, key_text"
        return con.execute(sql).fetchall()


def test_each_key_tunes_once_and_is_stored(tv: Any, sqlite_url: str) -> None:
    for n, dtype, tunes in ((40, torch.float32, True), (40, torch.float32, False), (48, torch.float32, True),
                            (40, torch.float16, True), (48, torch.float32, False)):
        with count_launches(kc.add_one) as launches:
            assert torch.equal(kc.run_unary(kc.add_one, n, dtype), kc.expected_unary(n, dtype))
        assert (launches.count > 1) is tunes, (n, dtype, launches.count)
    keys = [json.loads(k) for _name, k in rows(Path(sqlite_url.removeprefix("sqlite://")))]
    assert sorted(keys) == sorted([
        [["n", 40], ["dtype(x_ptr)", "float32"], ["dtype(out_ptr)", "float32"]],
        [["n", 48], ["dtype(x_ptr)", "float32"], ["dtype(out_ptr)", "float32"]],
        [["n", 40], ["dtype(x_ptr)", "float16"], ["dtype(out_ptr)", "float16"]],
    ])


def test_a_new_runtime_on_the_same_store_benchmarks_nothing(sqlite_url: str) -> None:
    import tunevault

    tunevault.install(mode="tune", store=sqlite_url)
    kc.run_unary(kc.add_one, 40)
    first = kc.decided(kc.add_one)
    tunevault.install(mode="tune", store=sqlite_url)  # a fresh runtime: nothing in memory
    with count_launches(kc.add_one) as launches:
        assert torch.equal(kc.run_unary(kc.add_one, 40), kc.expected_unary(40))
    assert launches.count == 1 and kc.decided(kc.add_one) == first


def test_memory_store_keeps_nothing_after_the_runtime_goes() -> None:
    import tunevault

    for _ in range(2):
        tunevault.install(mode="tune", store="memory://")
        with count_launches(kc.add_one) as launches:
            kc.run_unary(kc.add_one, 40)
        assert launches.count > 1  # tuned both times
        tunevault.uninstall()


def test_restart_reuses_every_decision_with_zero_benchmarks(tmp_path: Path) -> None:
    """The issue's scenario: TUNEVAULT_MODE=tune, default store location, then a restart."""
    env = {"TUNEVAULT_MODE": "tune", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = run_py(server_code(WORKLOAD), **env)
    db = tmp_path / "cache" / "tunevault" / "tunevault.db"  # $XDG_CACHE_HOME/tunevault/tunevault.db
    assert db.is_file()
    assert all(r["ok"] for r in first)
    assert [r["launches"] > 1 for r in first] == [True, True, True, True, True, False]
    assert len(rows(db)) == 5

    second = run_py(server_code(WORKLOAD), **env)
    assert all(r["ok"] for r in second)
    assert [r["launches"] for r in second] == [1] * len(WORKLOAD)  # zero benchmark executions
    assert [r["config"] for r in second] == [r["config"] for r in first]
    assert len(rows(db)) == 5


def test_four_processes_share_one_sqlite_file(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    env = subprocess_env(TUNEVAULT_MODE="tune", TUNEVAULT_STORE=f"sqlite:///{db}",
                         XDG_CACHE_HOME=str(tmp_path / "unused"))
    common = [("add_one", 64, "float32"), ("accumulate", 64, "float32"), ("add_one", 72, "float32")]
    workloads = [common[i % 3:] + common[:i % 3] + [("add_one", 80 + 8 * i, "float32")] for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", server_code(w)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for w in workloads]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr and "[WARNING]" not in stderr and "[ERROR]" not in stderr, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert all(r["ok"] for res in results for r in res)
    assert len(rows(db)) == 3 + 4  # nothing lost: every process's keys are stored
    assert not (tmp_path / "unused").exists()  # TUNEVAULT_STORE wins over the default location

    # Every process launched the one published decision per shared key (first writer wins).
    chosen: dict[tuple[str, int], set[str]] = {}
    for res in results:
        for r in res:
            config = json.dumps(r["config"], sort_keys=True)
            chosen.setdefault((r["call"][0], r["call"][1]), set()).add(config)
    assert all(len(v) == 1 for v in chosen.values()), chosen

    everything = common + [("add_one", 80 + 8 * i, "float32") for i in range(4)]
    after = run_py(server_code(everything), TUNEVAULT_MODE="tune", TUNEVAULT_STORE=f"sqlite:///{db}")
    assert [r["launches"] for r in after] == [1] * len(everything)
    for r in after:
        assert chosen[(r["call"][0], r["call"][1])] == {json.dumps(r["config"], sort_keys=True)}
