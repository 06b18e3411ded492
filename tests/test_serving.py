"""The serving contract: seal, on-miss policies, miss diagnosis, warmup replay, preflight, report."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

import tunevault
from conftest import count_launches, subprocess_env
from kernels_serving import add_wide, chunk_cumsum, run_wide, serve
from tunevault.core.events import COUNTERS
from tunevault.core.identity import config_spec, current_fingerprint, kernel_id
from tunevault.core.kernel_state import KernelState
from tunevault.core.model import CandidateResult, Decision
from tunevault.store.base import open_store
from tunevault.store.sqlite import SqliteStore

TRAFFIC = ([10], [20, 5], [50, 64, 3], [9, 2], [33])  # max lengths -> BT 16, 32, 64, 16, 64


def autotuner():
    return chunk_cumsum.fn  # under the heuristics


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunevault.cli.main", *args], capture_output=True, text=True,
                          timeout=240, env=subprocess_env())


def warm_float16(tv) -> None:
    for lens in TRAFFIC:
        out, ref = serve(lens, dtype=torch.float16)
        torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)


def test_sealed_error_names_the_dtype_that_differs(tv) -> None:
    warm_float16(tv)
    tv.seal(on_miss="error")
    with pytest.raises(tunevault.TuningMiss) as info:
        serve([50, 64, 3], dtype=torch.float32)
    text = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert text.startswith("chunk_cumsum: no decision for B=1 H=2 BT=64 REVERSE=False dtype(g)=float32")
    assert "nearest decided key differs in dtype(g): float16 -> float32" in text
    assert dict(info.value.nearest.items)["dtype(g)"] == "float16"
    serving = tv.stats()["kernels"]["kernels_serving:chunk_cumsum"]["serving"]
    assert serving["errors"] == 1 and serving["tunings"] == 0 and serving["benchmark_runs"] == 0


def test_sealed_fallback_never_benchmarks_and_warns_once(tv, caplog) -> None:
    warm_float16(tv)
    tv.seal(on_miss="fallback")
    caplog.set_level(logging.WARNING, logger="tunevault")
    with count_launches(autotuner()) as launches:
        for lens in TRAFFIC:
            out, ref = serve(lens, dtype=torch.float32)
            torch.testing.assert_close(out, ref)
    assert launches.count == len(TRAFFIC)  # one launch per call: nothing was benchmarked
    warnings = [r.getMessage() for r in caplog.records if "no decision for" in r.getMessage()]
    assert len(warnings) == 3  # once per (kernel, key): BT 16, 32, 64
    assert all("nearest decided key differs in dtype(g): float16 -> float32" in w for w in warnings)
    serving = tv.stats()["kernels"]["kernels_serving:chunk_cumsum"]["serving"]
    assert serving["fallbacks"] == 3 and serving["tunings"] == 0 and serving["benchmark_runs"] == 0
    assert serving["hits"] == 0 and serving["fallback_hits"] == 2, "calls of a fallen-back key are not hits"


def test_a_stored_decision_this_calls_pruning_excludes_is_explained_as_such(tmp_path: Path) -> None:
    """A decision tuned for WIDE calls names a config pruning drops for narrow ones (WIDE is not in
    the key): the miss said the stored decision "names no config this kernel declares", with no
    nearest key."""
    x = torch.empty(256)
    key = KernelState(add_wide).labelled_key({"x_ptr": x, "out_ptr": x, "n": 256})
    specs = [config_spec(c) for c in add_wide.configs]
    db = SqliteStore(tmp_path / "wide.db")
    db.put(Decision(kernel_id(add_wide), current_fingerprint(), key, 2, specs[2],
                    tuple(CandidateResult(i, s, (3.0 - i, 2.9 - i, 3.1 - i)) for i, s in enumerate(specs))))
    db.close()
    tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'wide.db'}")
    tunevault.seal(on_miss="error")
    with pytest.raises(tunevault.TuningMiss) as miss:
        run_wide(256, 0)
    assert str(miss.value).endswith("; the decision stored for this very key names config #2, which "
                                    "prune_configs excludes for these arguments")
    assert miss.value.nearest == key
    run_wide(256, 1)  # a WIDE call launches the stored decision
    assert add_wide.best_config is add_wide.configs[2]


@pytest.mark.parametrize("elsewhere", ["source", "fingerprint"])
def test_a_miss_with_nothing_decided_here_says_what_the_store_holds_instead(tmp_path: Path, elsewhere: str) -> None:
    """A library upgrade (the kernel's source changed) or a toolchain difference (TRITON_DEBUG set
    in one environment only) left every key missed with "no key of this kernel is decided for this
    machine", while `tunevault check` named the cause."""
    import dataclasses

    x = torch.empty(256)
    key = KernelState(add_wide).labelled_key({"x_ptr": x, "out_ptr": x, "n": 256})
    specs = [config_spec(c) for c in add_wide.configs]
    kid, fp = kernel_id(add_wide), current_fingerprint()
    if elsewhere == "source":
        kid = dataclasses.replace(kid, source_hash="0" * len(kid.source_hash))
    else:
        fp = dataclasses.replace(fp, env=(*fp.env, ("TRITON_DEBUG", "1")))
    db = SqliteStore(tmp_path / "other.db")
    db.put(Decision(kid, fp, key, 0, specs[0], tuple(CandidateResult(i, s, (1.0,) * 3) for i, s in enumerate(specs))))
    db.close()
    tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'other.db'}")
    tunevault.seal(on_miss="error")
    with pytest.raises(tunevault.TuningMiss) as miss:
        run_wide(256, 1)
    expected = {"source": "decisions exist for another version of this kernel (source or configs changed)",
                "fingerprint": "fingerprint differs: TRITON_DEBUG=1 here (unset)"}[elsewhere]
    assert "no key of this kernel is decided for this machine" in str(miss.value)
    assert expected in str(miss.value)


def test_on_miss_option_and_env_variable(sqlite_url: str) -> None:
    tunevault.install(mode="tune", store=sqlite_url, on_miss="error")
    with pytest.raises(tunevault.TuningMiss, match="no key of this kernel is decided"):
        serve([10])
    code = ("import json, torch, tunevault, kernels_serving as k\n"
            "tunevault.install()  # settings from TUNEVAULT_*\n"
            "try:\n    k.serve([10]); print(json.dumps('served'))\n"
            "except tunevault.TuningMiss as e: print(json.dumps(str(e)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                          env=subprocess_env(TUNEVAULT_ON_MISS="error", TUNEVAULT_STORE=sqlite_url))
    assert "chunk_cumsum: no decision for B=1 H=2 BT=16" in json.loads(proc.stdout.splitlines()[-1])


def test_stats_split_hits_at_the_seal(tv) -> None:
    serve([10])  # tunes
    for _ in range(3):
        serve([12])  # in-memory hits before the seal
    tv.seal("error")
    for _ in range(2):
        serve([10])
    kernel = tv.stats()["kernels"]["kernels_serving:chunk_cumsum"]
    assert kernel["warmup"]["hits"] == 3 and kernel["warmup"]["tunings"] == 1
    assert kernel["serving"]["hits"] == 2 and kernel["serving"]["tunings"] == 0
    assert tv.stats()["kernels"]["total"]["serving"]["hits"] == 2


def test_a_seal_while_a_warmup_miss_tunes_leaves_that_tuning_a_warmup_one(tmp_path: Path) -> None:
    """A tuning counts (stats, its event) in the phase of the miss that started it, not the phase
    when it is reported: a seal() from another thread meanwhile made it a serving tuning."""
    import threading

    import kernels_conformance as kc

    started, go = threading.Event(), threading.Event()

    def do_bench(kernel_call, quantiles):
        started.set()
        go.wait()
        kernel_call()
        return [float(kc.LAUNCHED[-1])] * 3

    events = tmp_path / "events.jsonl"
    tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'tune.db'}", events=str(events))
    kernel = triton.autotune(configs=kc.configs(), key=["n"], do_bench=do_bench)(kc._Recording(kc.copy_kernel))
    tuning = threading.Thread(target=kc.run, args=(kernel, 100))
    tuning.start()
    started.wait()
    tunevault.seal("fallback")
    go.set()
    tuning.join()
    total = tunevault.stats()["kernels"]["total"]
    assert total["warmup"]["tunings"] == 1 and total["warmup"]["benchmark_runs"] > 0
    assert total["serving"]["tunings"] == 0 and total["serving"]["benchmark_runs"] == 0
    tunevault.uninstall()
    phases = [(e["event"], e.get("phase")) for e in map(json.loads, events.read_text().splitlines())]
    assert ("tuning", "warmup") in phases and ("tuning", "serving") not in phases


def test_stats_has_both_phases_and_every_counter_before_the_seal(tv) -> None:
    """``stats()["kernels"][k]["serving"]["tunings"]`` was a KeyError until a call after the seal."""
    serve([10])  # tunes, before any seal
    stats = tv.stats()["kernels"]
    for name in ("kernels_serving:chunk_cumsum", "total"):
        assert set(stats[name]) == {"warmup", "serving"}
        assert set(stats[name]["warmup"]) == set(COUNTERS) == set(stats[name]["serving"])
        assert stats[name]["serving"] == dict.fromkeys(COUNTERS, 0) and stats[name]["warmup"]["tunings"] == 1


def test_capture_check_warmup_check_then_serve_sealed_with_error(tmp_path: Path, capsys) -> None:
    from tunevault.cli.main import main

    manifest, traffic_db, fresh_db = tmp_path / "keys.jsonl", tmp_path / "a.db", tmp_path / "fresh.db"
    tunevault.install(mode="tune", store=f"sqlite:///{traffic_db}")
    with tunevault.capture(manifest):
        for lens in TRAFFIC:
            serve(lens)
    tunevault.uninstall()
    fresh = f"sqlite:///{fresh_db}"
    open_store(fresh).close()  # a new empty store: check reads one, it does not create one

    assert main(["--store", fresh, "check", str(manifest), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["keys"] == 3 and len(result["missing"]) == 3
    assert sorted(dict(map(tuple, m["key"]))["BT"] for m in result["missing"]) == [16, 32, 64]

    warm = cli("--store", fresh, "warmup", str(manifest))  # a fresh process replays the keys
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert "3 tuned, 0 already decided, 0 skipped, 0 failed" in warm.stdout

    after = tunevault.check(manifest, store=fresh)
    assert after.ok and len(after.items) == 3
    assert main(["--store", fresh, "check", str(manifest)]) == 0
    assert "3/3 keys decided" in capsys.readouterr().out

    tunevault.install(mode="tune", store=fresh, on_miss="error")
    tunevault.seal("error")
    with count_launches(autotuner()) as launches:
        for lens in TRAFFIC:
            out, ref = serve(lens)
            torch.testing.assert_close(out, ref)
    assert launches.count == len(TRAFFIC)
    serving = tunevault.stats()["kernels"]["kernels_serving:chunk_cumsum"]["serving"]
    assert serving["errors"] == 0 and serving["tunings"] == 0 and serving["benchmark_runs"] == 0
    assert serving["hits"] == len(TRAFFIC)

    again = tunevault.warmup(manifest)  # installed: replays into the installed store, decides nothing new
    assert again.counts() == {"tuned": 0, "decided": 3, "skipped": 0, "failed": 0}


def test_events_report_table_and_picture(tmp_path: Path, capsys) -> None:
    from tunevault.cli.main import main

    events, png = tmp_path / "events.jsonl", tmp_path / "report.png"
    tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'e.db'}", events=str(events))
    from tunevault.demo.kernels import run_scaled_add

    serve([10], dtype=torch.float16)
    run_scaled_add(torch.randn(100), torch.randn(100))
    tunevault.seal("fallback")
    serve([10], dtype=torch.float32)
    tunevault.seal("error")
    with pytest.raises(tunevault.TuningMiss):
        serve([40])
    counted = tunevault.stats()["kernels"]["kernels_serving:chunk_cumsum"]
    tunevault.uninstall()
    kinds = [json.loads(line)["event"] for line in events.read_text().splitlines()]
    assert kinds.count("tuning") == 2 and "fallback" in kinds and kinds.count("seal") == 2
    assert kinds.count("miss") == 4, "every miss is a line: the two that tuned, the fallback, the error"

    assert main(["report", str(events), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "kernels_serving:chunk_cumsum" in out and "tunevault.demo.kernels:scaled_add" in out
    import matplotlib.image

    assert png.stat().st_size > 20_000
    pixels = matplotlib.image.imread(png)
    colours = {tuple(p) for p in (pixels[..., :3] * 255).astype(int).reshape(-1, 3)[::7].tolist()}
    assert len(colours) > 20  # bars, markers, text: a picture, not a blank canvas

    assert main(["report", str(events), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["kernels_serving:chunk_cumsum"]["errors"] == 1
    assert summary["kernels_serving:chunk_cumsum"]["fallbacks"] == 1
    assert summary["kernels_serving:chunk_cumsum"]["misses"] == sum(p["misses"] for p in counted.values()) == 3


def test_a_tuning_where_every_config_fails_is_a_warning_and_an_event(tmp_path: Path, caplog, capsys) -> None:
    """Counted as an error in stats(), and the caller gets a TuningError; it used to leave no log
    line and no event, so the report left the kernel out."""
    import kernels_shard as ks
    from tunevault.cli.main import main

    events = tmp_path / "events.jsonl"
    tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'e.db'}", events=str(events))
    x = torch.ones(8)
    caplog.set_level(logging.WARNING, logger="tunevault")
    with pytest.raises(tunevault.TuningError):
        ks.no_config_works[(1,)](x, torch.empty_like(x), 8)
    tunevault.uninstall()
    failed = [r.getMessage() for r in caplog.records if "every config failed" in r.getMessage()]
    assert len(failed) == 1 and "kernels_shard:no_config_works" in failed[0] and "OutOfResources" in failed[0]
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert [e["event"] for e in lines] == ["miss", "tuning_failed"]
    assert lines[1]["configs"] == 2 and "OutOfResources" in lines[1]["error"]
    assert main(["report", str(events), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["kernels_shard:no_config_works"]["errors"] == 1


def test_report_without_matplotlib_says_what_to_install(tmp_path: Path, monkeypatch, capsys) -> None:
    from tunevault.cli.main import main

    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps({"event": "tuning", "time": 1.0, "kernel": "m:k", "seconds": 0.5,
                                  "phase": "warmup"}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["report", str(events), "--plot", str(tmp_path / "x.png")]) == 2
    assert "pip install 'tunevault[plot]' (from a checkout: pip install -e '.[plot]')" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_a_warmup_never_unseals_request_threads_and_a_seal_meanwhile_stands(tv, tmp_path: Path) -> None:
    """``tunevault.warmup()`` tunes its own keys on its own thread; a request thread's miss keeps
    the seal's policy meanwhile, and a seal made during the warmup is still in force after it."""
    import threading

    import kernels_shard as ks

    manifest = tmp_path / "keys.jsonl"
    ks.write_manifest(manifest, [64, 93, 122])
    seen: list[str] = []

    def request_miss() -> None:
        try:
            serve([50, 64, 3], dtype=torch.float32)
            seen.append("launched")
        except tunevault.TuningMiss:
            seen.append("TuningMiss")

    def progress(done: int, total: int, item: object) -> None:
        if done == 1:
            tv.seal(on_miss="error")  # an operator seals while the warmup still runs
            thread = threading.Thread(target=request_miss)
            thread.start()
            thread.join()

    report = tv.warmup(str(manifest), progress=progress)
    assert report.ok and report.counts()["tuned"] == 3  # the warmup's keys are tuned after the seal too
    assert seen == ["TuningMiss"]  # the request thread's miss did not tune
    stats = tv.stats()
    assert stats["sealed"] and stats["on_miss"] == "error"
    assert stats["kernels"]["kernels_shard:shard_scale"]["warmup"]["tunings"] == 3
    assert stats["kernels"]["kernels_shard:shard_scale"]["serving"] == dict.fromkeys(COUNTERS, 0)
    with pytest.raises(tunevault.TuningMiss):
        serve([9, 2], dtype=torch.float32)


def test_a_warmup_tunes_a_key_this_process_served_with_a_fallback(tv, sqlite_url: str, tmp_path: Path) -> None:
    """docs/serving.md: a key that fell back is tuned later in the same process by the next
    ``tunevault.warmup()``. The fallback sat in the autotuner's ``cache`` too, where the miss path
    found it first: the warmup reported "the call ran but no decision was stored"."""
    import kernels_shard as ks

    manifest = tmp_path / "keys.jsonl"
    ks.write_manifest(manifest, [93])
    tv.seal(on_miss="fallback")
    x = torch.ones(93)
    out = torch.empty_like(x)
    ks.shard_scale[lambda meta: (triton.cdiv(93, meta["BLOCK"]),)](x, out, 93)
    assert tv.stats()["kernels"]["kernels_shard:shard_scale"]["serving"]["fallbacks"] == 1
    report = tv.warmup(str(manifest))
    assert report.ok and report.counts()["tuned"] == 1, report.to_json()
    stored = SqliteStore(sqlite_url.removeprefix("sqlite:///")).decisions()
    decided = [d for d in stored if d.kernel.name == "kernels_shard:shard_scale"]
    assert len(decided) == 1
    ks.shard_scale[lambda meta: (triton.cdiv(93, meta["BLOCK"]),)](x, out, 93)
    assert ks.shard_scale.best_config is ks.shard_scale.configs[decided[0].config_index], "the decision launches"
    torch.testing.assert_close(out, x * 2)


def test_installing_again_after_the_seal_stays_sealed(tv, sqlite_url: str, caplog) -> None:
    """A plugin calling ``install()`` again (say, to add an events file) must not reopen tuning on
    the request path; ``uninstall()`` first does."""
    warm_float16(tv)
    tv.seal(on_miss="error")
    caplog.set_level(logging.WARNING, logger="tunevault")
    tv.install(mode="tune", store=sqlite_url)
    assert tv.stats()["sealed"] and tv.stats()["on_miss"] == "error"
    assert any("installed again after seal()" in r.getMessage() for r in caplog.records)
    with count_launches(autotuner()) as launches, pytest.raises(tunevault.TuningMiss):
        serve([50, 64, 3], dtype=torch.float32)
    assert launches.count == 0
    tv.uninstall()
    tv.install(mode="tune", store=sqlite_url)
    assert not tv.stats()["sealed"]


def test_decisions_stored_before_keys_were_in_parameter_order_are_still_found(tmp_path: Path) -> None:
    """Before stop 26 a key listed tensor dtypes in the call's order. A store (and a manifest)
    written then holds a call passing ``out_ptr=`` before ``x_ptr=`` under that order: the server
    now computes the key in parameter order, missed it, and explained the miss as "this very key"."""
    import kernels_core as kc

    x, out = kc.vec(40), torch.empty(40)
    today = KernelState(kc.add_one).labelled_key({"out_ptr": out, "x_ptr": x, "n": 40})
    earlier = today.in_order(["out_ptr", "x_ptr"])
    assert earlier != today and earlier.items[0] == ("n", 40)
    specs = [config_spec(c) for c in kc.add_one.configs]
    db = SqliteStore(tmp_path / "old.db")
    db.put(Decision(kernel_id(kc.add_one), current_fingerprint(), earlier, 1, specs[1],
                    tuple(CandidateResult(i, s, (3.0 - i, 2.9 - i, 3.1 - i)) for i, s in enumerate(specs[:2]))))
    db.close()
    tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'old.db'}")
    tunevault.seal(on_miss="error")
    kc.add_one[kc.grid(40)](out_ptr=out, x_ptr=x, n=40)  # no TuningMiss: the earlier key is found
    assert kc.add_one.best_config is kc.add_one.configs[1] and torch.equal(out, x + 1)
    tunevault.uninstall()
    stored = {d.key for d in SqliteStore(tmp_path / "old.db").decisions()}
    assert stored == {earlier, today}, "and published under today's key"

    # A manifest of then, against a store of then: the preflight and a warmup agree with the server.
    from tunevault.capture import manifest as mf
    from tunevault.capture.argspec import CallSpec
    from tunevault.policy.check import check

    spec = CallSpec.of(kc.add_one, (), {"out_ptr": out, "x_ptr": x, "n": 40, "grid": kc.grid(40)}).to_json()
    mf.append(tmp_path / "keys.jsonl", [mf.line("kernels_core:add_one", earlier, {"hit": 1}, 1, 1, 1, "h", spec)])
    db = SqliteStore(tmp_path / "then.db")
    db.put(Decision(kernel_id(kc.add_one), current_fingerprint(), earlier, 1, specs[1]))
    db.close()
    assert check(tmp_path / "keys.jsonl", store=f"sqlite:///{tmp_path / 'then.db'}").ok
    tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'then.db'}")
    assert tunevault.warmup(str(tmp_path / "keys.jsonl")).counts()["decided"] == 1
