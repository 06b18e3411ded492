"""verify_agreement across a real 4-rank torch.distributed (gloo) job of spawned processes.

Each rank has its own local SQLite store and shares a remote store (an SQLite file here, Redis
in production). Ranks that tuned cold agree by construction; a decision injected into one
rank's local store makes that rank launch another config, and every rank's report names it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from conftest import subprocess_env
from tunevault.store.sqlite import SqliteStore

WORLD = 4
TUNED, INJECTED = 300, 700  # sizes (tuning keys) of the two phases

RANK = r"""
import json, os, sys
import torch, torch.distributed as dist
import tunevault
from conftest import count_launches
from tunevault.demo.kernels import run_scaled_add, scaled_add

rank = int(os.environ["RANK"])
world = int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", init_method=os.environ["TV_INIT"], rank=rank, world_size=world)
tunevault.install(mode="tune")
out = {}
for phase, n in enumerate(json.loads(os.environ["TV_SIZES"])):
    dist.barrier()  # start every phase together, cold
    x = torch.rand(n)
    with count_launches(scaled_add) as c:
        run_scaled_add(x, x)
    out[f"bench{phase}"] = c.count - 1
    report = tunevault.verify_agreement()
    out[f"report{phase}"] = {"ok": report.ok, "mismatches": [
        {"kernel": m.kernel, "key": m.key, "configs": {k: list(v) for k, v in m.configs.items()}}
        for m in report.mismatches]}
dist.destroy_process_group()
print(json.dumps(out))
"""


def run_ranks(code: str, envs: list[dict[str, str]]) -> list[Any]:
    """Run ``code`` as one process per environment (a rank each); each one's last stdout line, as JSON."""
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for env in envs]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=240)
            assert p.returncode == 0, f"rank failed ({p.returncode}):\n{stdout}\n{stderr}"
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def test_four_ranks_agree_and_an_injected_decision_is_reported(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed")
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    import tunevault
    from tunevault.core.identity import config_spec
    from tunevault.demo.kernels import run_scaled_add, scaled_add

    # A real decision for the second phase's key, made here; rank 3's local store gets it with
    # another winner than the shared store has: a stale or tampered local store.
    tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'seed.db'}")
    run_scaled_add(torch.rand(INJECTED), torch.rand(INJECTED))
    (seed,) = SqliteStore(tmp_path / "seed.db").decisions()
    tunevault.uninstall()
    specs = [config_spec(c) for c in scaled_add.configs]
    fleet_choice, stale = (replace(seed, config_index=i, config=specs[i]) for i in (0, 2))
    SqliteStore(tmp_path / "remote.db").put(fleet_choice)
    SqliteStore(tmp_path / "local3.db").put(stale)

    outs = run_ranks(RANK, [subprocess_env(RANK=str(rank), WORLD_SIZE=str(WORLD),
                                           TV_INIT=f"file://{tmp_path / 'rendezvous'}",
                                           TV_SIZES=json.dumps([TUNED, INJECTED]),
                                           TUNEVAULT_STORE=f"sqlite:///{tmp_path / f'local{rank}.db'}",
                                           TUNEVAULT_REMOTE=f"sqlite:///{tmp_path / 'remote.db'}")
                            for rank in range(WORLD)])

    assert sum(o["bench0"] > 0 for o in outs) == 1, "four cold ranks tuned the key once, with no collective"
    assert all(o["report0"] == {"ok": True, "mismatches": []} for o in outs)
    assert all(o["bench1"] == 0 for o in outs)
    (mismatch,) = outs[0]["report1"]["mismatches"]
    assert all(o["report1"] == outs[0]["report1"] and not o["report1"]["ok"] for o in outs)
    assert "scaled_add" in mismatch["kernel"] and f"n={INJECTED}" in mismatch["key"]
    assert mismatch["configs"] == {f"#0 {specs[0].describe()}": [0, 1, 2], f"#2 {specs[2].describe()}": [3]}


FALLBACK_RANK = r"""
import json, os
import torch.distributed as dist
import tunevault
import kernels_predict as kp

dist.init_process_group("gloo", init_method=os.environ["TV_INIT"], rank=int(os.environ["RANK"]), world_size=2)
tunevault.install(mode="tune", on_miss="fallback")
kp.run(120)  # no decision for n=120: a config predicted from this rank's store
report = tunevault.verify_agreement()
dist.destroy_process_group()
print(json.dumps({"ok": report.ok, "configs": [m.configs for m in report.mismatches]}))
"""


def test_ranks_that_fall_back_to_different_configs_disagree(tmp_path: Path) -> None:
    """A fallback recorded nothing for the key it launched (a predicted one) or the nearest key's
    decision (never launched), so two ranks launching different fallbacks for a key agreed."""
    pytest.importorskip("torch.distributed")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    import torch

    import kernels_predict as kp
    from tunevault.core.identity import config_spec, current_fingerprint, kernel_id
    from tunevault.core.kernel_state import KernelState
    from tunevault.core.model import CandidateResult, Decision

    x = torch.empty(100)
    key = KernelState(kp.scale2).labelled_key({"x_ptr": x, "out_ptr": x, "n": 100})
    specs = [config_spec(c) for c in kp.scale2.configs]
    for rank, winner in enumerate((1, 2)):  # each rank's local store names another winner for n=100
        times = [1.0 if i == winner else 2.0 for i in range(len(specs))]
        candidates = tuple(CandidateResult(i, s, (t, t, t)) for i, (s, t) in enumerate(zip(specs, times, strict=True)))
        SqliteStore(tmp_path / f"local{rank}.db").put(Decision(kernel_id(kp.scale2), current_fingerprint(), key,
                                                               winner, specs[winner], candidates))
    envs = [subprocess_env(RANK=str(rank), TV_INIT=f"file://{tmp_path / 'rdv'}",
                           TUNEVAULT_STORE=f"sqlite:///{tmp_path / f'local{rank}.db'}") for rank in range(2)]
    outs = run_ranks(FALLBACK_RANK, envs)
    expected = {"ok": False, "configs": [{f"#1 {specs[1].describe()}": [0], f"#2 {specs[2].describe()}": [1]}]}
    assert outs == [expected, expected]
