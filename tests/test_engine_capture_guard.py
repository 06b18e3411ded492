"""Never benchmark inside a CUDA graph capture: the miss path's decision, through the probe seam.

A CPU has no CUDA graphs, so the test drives the policy through the seam it is given: the
engine's capture probe (``engine.graphs.CaptureProbe``, installed with ``use_probe``). The
probe here is a real predicate, a flag the test raises while it "captures"; kernels, store,
background thread and isolated worker are all real. ``bench/capture_guard.py`` does the same
with ``torch.cuda.graph`` on a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import kernels_engine as ke
import tunevault
from test_engine_background import count_executions
from tunevault.engine import graphs
from tunevault.engine.graphs import FlagProbe
from tunevault.integration.triton_adapter import runtime
from tunevault.policy import background


@pytest.fixture
def probe() -> Iterator[FlagProbe]:
    flag = FlagProbe()
    previous = graphs.use_probe(flag)
    yield flag
    graphs.use_probe(previous)
    background.drain(timeout=60)


def counters(name: str) -> dict[str, float]:
    return tunevault.stats()["kernels"][name]["warmup"]


def test_a_miss_during_capture_launches_the_fallback_and_is_tuned_once_capture_ends(
        sqlite_url: str, probe: FlagProbe) -> None:
    tunevault.install(mode="tune", store=sqlite_url)  # tune on a miss, not sealed
    name = "kernels_engine:add_delayed"
    x, y = torch.randn(64), torch.randn(64)
    probe.capturing.set()
    with count_executions(ke.add_delayed) as launches:
        assert torch.equal(ke.run_add(ke.add_delayed, x, y), x + y)
    assert launches == [1]  # the fallback, launched once: nothing benchmarked inside the capture
    assert ke.add_delayed.best_config is ke.add_delayed.configs[0]  # no key decided: the first that compiles
    stats = counters(name)
    assert stats["capture_fallbacks"] == 1 and stats["benchmark_runs"] == 0 and stats["tunings"] == 0
    assert [e["event"] for e in runtime().events.recent if e["event"] == "capture_fallback"] == ["capture_fallback"]
    assert background.pending() == 1

    asked = probe.asked
    while probe.asked < asked + 3:  # the background tuner has looked three times...
        time.sleep(0.01)
    assert background.pending() == 1 and counters(name)["tunings"] == 0  # ...and waited each time

    probe.capturing.clear()
    assert background.drain(timeout=180)
    assert counters(name)["tunings"] == 1
    with count_executions(ke.add_delayed) as launches:
        assert torch.equal(ke.run_add(ke.add_delayed, x, y), x + y)
    assert launches == [1]
    assert ke.add_delayed.best_config.kwargs["DELAY"] == 10  # the tuned config, not the fallback


def test_outside_a_capture_the_miss_is_tuned_on_the_spot(sqlite_url: str, probe: FlagProbe) -> None:
    tunevault.install(mode="tune", store=sqlite_url)
    x, y = torch.randn(64), torch.randn(64)
    assert torch.equal(ke.run_add(ke.add_delayed, x, y), x + y)
    stats = counters("kernels_engine:add_delayed")
    assert stats["capture_fallbacks"] == 0 and stats["tunings"] == 1 and probe.asked >= 1
    assert ke.add_delayed.best_config.kwargs["DELAY"] == 10


def test_the_torch_probe_never_initialises_cuda() -> None:
    probe = graphs.TorchCaptureProbe()
    assert not probe.here() and not probe.anywhere()
    assert not torch.cuda.is_initialized()
    assert graphs.wait_until_quiet(timeout=0)  # nothing was ever captured: no wait at all


def test_a_background_miss_during_capture_is_held_until_the_capture_ends(sqlite_url: str, probe: FlagProbe) -> None:
    """Sealed with ``on_miss="background"``: a miss inside a capture must not read the request's
    tensors (their copies would be recorded into the graph, and the job would tune on memory that
    never held the request's values): it is served like tune mode's capture miss."""
    tunevault.install(mode="tune", store=sqlite_url)
    tunevault.seal(on_miss="background")
    name = "kernels_engine:add_delayed"
    x, y = torch.randn(64), torch.randn(64)
    probe.capturing.set()
    with count_executions(ke.add_delayed) as launches:
        assert torch.equal(ke.run_add(ke.add_delayed, x, y), x + y)
    assert launches == [1]
    serving = tunevault.stats()["kernels"][name]["serving"]
    assert serving["capture_fallbacks"] == 1 and serving["benchmark_runs"] == 0
    asked = probe.asked
    while probe.asked < asked + 3:  # the job waits for the capture to end...
        time.sleep(0.01)
    assert background.pending() == 1 and tunevault.stats()["kernels"][name]["serving"]["tunings"] == 0
    probe.capturing.clear()
    assert background.drain(timeout=180)  # ...then tunes the key
    assert tunevault.stats()["kernels"][name]["serving"]["tunings"] == 1


def test_a_pending_warmup_manifest_does_not_start_inside_a_capture(sqlite_url: str, probe: FlagProbe,
                                                                    tmp_path: Path) -> None:
    """``TUNEVAULT_WARMUP`` runs at the first miss, but not inside a capture: replaying the manifest
    there would allocate arguments and record launches into the user's graph."""
    import kernels_shard as ks

    manifest = tmp_path / "keys.jsonl"
    ks.write_manifest(manifest, [64, 93])
    tunevault.install(mode="tune", store=sqlite_url, warmup=str(manifest))
    x, y = torch.randn(64), torch.randn(64)
    probe.capturing.set()
    ke.run_add(ke.add_delayed, x, y)
    rt = runtime()
    assert rt is not None and rt.pending_warmup == str(manifest)  # not taken, not run
    assert "kernels_shard:shard_scale" not in tunevault.stats()["kernels"]
    probe.capturing.clear()
    ke.run_add(ke.add_delayed, torch.randn(128), torch.randn(128))  # the first miss after the capture
    assert rt.pending_warmup is None
    assert tunevault.stats()["kernels"]["kernels_shard:shard_scale"]["warmup"]["tunings"] == 2
