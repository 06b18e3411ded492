"""The wait side of a tuning lease, in one process: another holder (a "remote process") has the
key's lease; the caller adopts the decision it publishes, or tunes itself after ``lease_wait``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import torch

import tunevault
from conftest import count_launches
from tunevault.core.identity import current_fingerprint, kernel_id
from tunevault.core.kernel_state import KernelState
from tunevault.demo.kernels import run_scaled_add, scaled_add
from tunevault.engine.timing import cpu_bench
from tunevault.policy.lease import lease_name
from tunevault.store.sqlite import SqliteStore

N = 400


def key_lease(n: int) -> str:
    x = torch.rand(n)
    key = KernelState(scaled_add).labelled_key({"x_ptr": x, "y_ptr": x, "out_ptr": x, "n": n})
    return lease_name(kernel_id(scaled_add).digest, current_fingerprint().digest, key.text)


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tunevault" and r.levelno == level]


def test_waiter_adopts_the_decision_the_holder_publishes(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    # A decision tuned elsewhere, published by "another process" while this one waits on its lease.
    tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'elsewhere.db'}")
    run_scaled_add(torch.rand(N), torch.rand(N))
    (published,) = SqliteStore(tmp_path / "elsewhere.db").decisions()
    tunevault.uninstall()

    shared = SqliteStore(tmp_path / "shared.db")
    assert shared.try_lease(key_lease(N), "other-host:1:abc", 60)

    def other_process_finishes() -> None:
        time.sleep(0.3)
        shared.put(published)
        shared.release(key_lease(N), "other-host:1:abc")

    tunevault.install(mode="tune", store=shared.url, lease_wait=120)
    finisher = threading.Thread(target=other_process_finishes)
    x = torch.rand(N)
    with caplog.at_level(logging.INFO, logger="tunevault"), count_launches(scaled_add) as launches:
        finisher.start()
        out = run_scaled_add(x, x)
    finisher.join()
    assert torch.allclose(out, 3 * x)
    assert launches.count == 1, "no benchmarking: the holder's decision was adopted"
    assert scaled_add.best_config.kwargs == dict(published.config.kwargs)
    assert any("being tuned by another process" in m for m in messages(caplog, logging.INFO))


def test_waiter_tunes_itself_after_lease_wait(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shared = SqliteStore(tmp_path / "shared.db")
    assert shared.try_lease(key_lease(N), "stuck-host:1:abc", 600)  # alive (renewing) but never finishing
    tunevault.install(mode="tune", store=shared.url, lease_wait=0.2)
    x = torch.rand(N)
    with caplog.at_level(logging.INFO, logger="tunevault"), count_launches(scaled_add) as launches:
        assert torch.allclose(run_scaled_add(x, x), 3 * x)
    assert launches.count > 1, "it benchmarked by itself"
    assert shared.count() == 1
    (warning,) = [m for m in messages(caplog, logging.WARNING) if "no decision after waiting" in m]
    assert "scaled_add" in warning and f"n={N}" in warning


def test_holder_renews_its_lease_while_tuning_and_releases_it(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    shared, name = SqliteStore(tmp_path / "shared.db"), key_lease(N)
    intruder = []

    def slow_bench(fn: object, quantiles: tuple = (0.5, 0.2, 0.8), **kw: object) -> list[float]:
        time.sleep(0.8)  # longer than the lease's ttl: only renewals keep it
        intruder.append(shared.try_lease(name, "intruder", 60))
        return cpu_bench(fn, quantiles)  # type: ignore[arg-type]

    monkeypatch.setattr(scaled_add, "_do_bench", slow_bench)  # as if declared with do_bench=
    tunevault.install(mode="tune", store=shared.url, lease_ttl=0.6)
    x = torch.rand(N)
    assert torch.allclose(run_scaled_add(x, x), 3 * x)
    assert intruder == [False] * len(scaled_add.configs), "nobody could take the lease while it was tuned"
    assert shared.try_lease(name, "next", 60), "released once the decision is published"
