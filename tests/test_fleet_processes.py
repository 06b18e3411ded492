"""Real processes sharing a store: each key is benchmarked once in total, everyone launches the
same configs, a dead Redis or a dead lease holder stops nobody.

Benchmark executions are counted below the autotuner in every child (``count_launches``), minus
the user's own calls; the children start together behind a file barrier to force the race.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import redis_server
from conftest import subprocess_env
from tunevault.store.sqlite import SqliteStore

SIZES = (200, 500, 900)

CHILD = r"""
import json, logging, os, sys, time
from pathlib import Path

import torch
import tunevault
from conftest import count_launches
from tunevault.demo.kernels import run_scaled_add, scaled_add

class Count(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.remote = 0
    def emit(self, record):
        self.remote += "remote store unusable" in record.getMessage()

counter = Count()
logging.getLogger("tunevault").addHandler(counter)
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
def bench(fn, quantiles=None, **kw):  # as if passed do_bench=: every process, one identity
    if os.environ.get("TV_HANG"):  # this process hangs while benchmarking
        Path(os.environ["TV_HANG"]).touch()
        time.sleep(3600)
    from tunevault.engine.timing import cpu_bench
    return cpu_bench(fn, quantiles or (0.5, 0.2, 0.8), reps=2)
if os.environ.get("TV_OWN_BENCH"):  # both sides: a benchmarker of its own is part of the identity
    scaled_add._do_bench = bench
tunevault.install(mode="tune")

def barrier(name):
    Path(os.environ["TV_DIR"], f"{name}.{os.getpid()}").touch()
    while not Path(os.environ["TV_DIR"], f"go.{name}").exists():
        time.sleep(0.01)

def run(sizes):
    chosen = []
    with count_launches(scaled_add) as c:
        for n in sizes:
            x, y = torch.rand(n), torch.rand(n)
            assert torch.allclose(run_scaled_add(x, y), 2 * x + y)
            chosen.append(scaled_add.best_config.kwargs["BLOCK"])
    return c.count - len(sizes), chosen

out = {"pid": os.getpid()}
for phase, sizes in enumerate(json.loads(os.environ["TV_PHASES"])):
    if os.environ.get("TV_DIR"):
        barrier(f"phase{phase}")
    out[f"bench{phase}"], out[f"chosen{phase}"] = run(sizes)
out["remote_warnings"] = counter.remote
print(json.dumps(out))
"""


def spawn(tmp_path: Path, phases: list[list[int]], **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env(TV_PHASES=json.dumps(phases), TUNEVAULT_MODE="tune",
                                                          TV_DIR=str(tmp_path), **env))


def release(tmp_path: Path, phase: int, n: int, before: Any = None, timeout: float = 240) -> None:
    """Wait until ``n`` children reach the barrier, call ``before()``, then let them all go at once."""
    deadline = time.monotonic() + timeout
    while len(list(tmp_path.glob(f"phase{phase}.*"))) < n:
        assert time.monotonic() < deadline, f"children never reached phase {phase}"
        time.sleep(0.02)
    if before is not None:
        before()
    (tmp_path / f"go.phase{phase}").touch()


def results(procs: list[subprocess.Popen[str]], timeout: float = 240) -> list[dict[str, Any]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"child failed ({p.returncode}):\n{stdout}\n{stderr}"
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def run_fleet(tmp_path: Path, n: int, phases: list[list[int]], env_for: Any) -> list[dict[str, Any]]:
    procs = [spawn(tmp_path, phases, **env_for(i)) for i in range(n)]
    try:
        for phase in range(len(phases)):
            release(tmp_path, phase, n)
        return results(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="module")
def one_process_benchmarks(tmp_path_factory: pytest.TempPathFactory) -> int:
    """Benchmark executions of one cold process tuning SIZES alone: the fleet's budget."""
    d = tmp_path_factory.mktemp("alone")
    (solo,) = run_fleet(d, 1, [list(SIZES)], lambda i: {"TUNEVAULT_STORE": f"sqlite:///{d / 'solo.db'}"})
    assert solo["bench0"] > 0
    return solo["bench0"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[redis_server.RedisServer]:
    yield from redis_server.serve(tmp_path)


def test_four_cold_processes_on_one_sqlite_file_tune_once(tmp_path: Path,
                                                          one_process_benchmarks: int) -> None:
    db = tmp_path / "shared.db"
    fleet = run_fleet(tmp_path, 4, [list(SIZES)], lambda i: {"TUNEVAULT_STORE": f"sqlite:///{db}"})
    assert sum(r["bench0"] for r in fleet) == one_process_benchmarks
    assert len({json.dumps(r["chosen0"]) for r in fleet}) == 1, fleet
    assert SqliteStore(db).count() == len(SIZES)


def test_four_cold_processes_sharing_redis_tune_once(tmp_path: Path, server: redis_server.RedisServer,
                                                      one_process_benchmarks: int) -> None:
    fleet = run_fleet(tmp_path, 4, [list(SIZES)], lambda i: {
        "TUNEVAULT_STORE": f"sqlite:///{tmp_path / f'local{i}.db'}", "TUNEVAULT_REMOTE": server.url})
    assert sum(r["bench0"] for r in fleet) == one_process_benchmarks
    assert len({json.dumps(r["chosen0"]) for r in fleet}) == 1, fleet
    for i in range(4):  # every host keeps a local copy: it restarts without the network
        assert SqliteStore(tmp_path / f"local{i}.db").count() == len(SIZES)


def test_processes_keep_serving_when_redis_dies_mid_run(tmp_path: Path,
                                                        server: redis_server.RedisServer) -> None:
    phases = [[300], [300, 600, 1100]]
    procs = [spawn(tmp_path, phases, TUNEVAULT_STORE=f"sqlite:///{tmp_path / f'local{i}.db'}",
                   TUNEVAULT_REMOTE=server.url) for i in range(2)]
    try:
        release(tmp_path, 0, 2)
        release(tmp_path, 1, 2, before=server.kill)  # both finished phase 0 through Redis; now it dies
        fleet = results(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sum(r["bench0"] > 0 for r in fleet) == 1, "before the failure the key was tuned once"
    assert fleet[0]["chosen0"] == fleet[1]["chosen0"]
    for i, r in enumerate(fleet):
        assert r["chosen1"][0] == r["chosen0"][0], "a decided key keeps its config"
        assert r["remote_warnings"] == 1, "one warning per process, not one per call"
        assert SqliteStore(tmp_path / f"local{i}.db").count() == 3, "new decisions land in the local store"


def test_lease_holder_killed_another_process_takes_over(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    marker = tmp_path / "holder-benchmarking"
    holder = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=subprocess_env(TV_PHASES="[[300]]", TUNEVAULT_MODE="tune",
                                                            TUNEVAULT_STORE=db, TUNEVAULT_LEASE_TTL="1",
                                                            TV_HANG=str(marker), TV_OWN_BENCH="1"))
    waiter = None
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert holder.poll() is None, holder.communicate()
            assert time.monotonic() < deadline, "the holder never started benchmarking"
            time.sleep(0.02)
        waiter = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env=subprocess_env(TV_PHASES="[[300]]", TUNEVAULT_MODE="tune",
                                                     TUNEVAULT_STORE=db, TV_OWN_BENCH="1"))
        assert waiter.stderr is not None
        seen = []
        for line in waiter.stderr:  # the waiter found the key leased and is waiting for its decision
            seen.append(line)
            if "is being tuned by another process" in line:
                break
        else:
            pytest.fail("the waiter never waited:\n" + "".join(seen))
        os.kill(holder.pid, signal.SIGKILL)  # dies holding the lease, without releasing it
        holder.wait()
        stdout, stderr = waiter.communicate(timeout=240)
        assert waiter.returncode == 0, stderr
    finally:
        for p in (holder, waiter):
            if p is not None and p.poll() is None:
                p.kill()
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["bench0"] > 0, "the waiter took the expired lease over and tuned the key itself"
    (d,) = SqliteStore(tmp_path / "shared.db").decisions()
    assert dict(d.provenance)["pid"] == result["pid"]


EXITS_WHILE_TUNING = r"""
import json, os, sys, threading, time
from pathlib import Path

import torch
import tunevault
from tunevault.demo.kernels import run_scaled_add, scaled_add
from tunevault.store.sqlite import SqliteStore

def bench(fn, quantiles=None, **kw):  # background tuning stops here for good, holding the key's lease
    Path(os.environ["TV_HANG"]).touch()
    threading.Event().wait()
scaled_add._do_bench = bench
tunevault.install(on_miss="background", prestart=False)
x = torch.rand(300)
assert torch.allclose(run_scaled_add(x, x), 3 * x)  # a fallback config; the key tunes in the background
deadline = time.monotonic() + 240
while not Path(os.environ["TV_HANG"]).exists() and time.monotonic() < deadline:
    time.sleep(0.01)
print(json.dumps(SqliteStore(os.environ["TV_DB"]).leases("tune:")), flush=True)
sys.exit(0)  # a clean exit: the daemon tuning thread is dropped mid-benchmark
"""


def test_a_process_exiting_mid_tuning_releases_its_lease(tmp_path: Path) -> None:
    """The lease of a key tuned in the background when the process exits (sys.exit) is released at
    exit, so the next process tunes it at once; it used to stay until lease_ttl (here 600 s) ran out."""
    path = tmp_path / "shared.db"
    run = subprocess.run([sys.executable, "-c", EXITS_WHILE_TUNING], capture_output=True, text=True, timeout=300,
                         env=subprocess_env(TUNEVAULT_STORE=f"sqlite:///{path}", TUNEVAULT_LEASE_TTL="600",
                                            TV_DB=str(path), TV_HANG=str(tmp_path / "benchmarking")))
    assert run.returncode == 0, run.stderr
    held = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(held) == 1, f"the process held the key's lease while it tuned: {held}"
    shared = SqliteStore(path)
    assert shared.leases("tune:") == {}, "released when the process exited"
    (name,) = held
    assert shared.try_lease(name, "next process", 60), "the next process takes the key's lease at once"
    shared.close()
