"""Predicted fallbacks: a missed key launches the config its decided neighbours' timings favour."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import kernels_predict as kp
import tunevault
from conftest import count_launches
from tunevault import report
from tunevault.core.identity import config_spec, current_fingerprint, describe_config, kernel_id
from tunevault.core.kernel_state import KernelState
from tunevault.core.model import CandidateResult, ConfigSpec, Decision, KernelId, TuningKey
from tunevault.fleet import used_decisions
from tunevault.integration.triton_adapter import runtime
from tunevault.policy import background
from tunevault.policy.fallback import regret
from tunevault.policy.predict import NeighbourTable, predict
from tunevault.store.sqlite import SqliteStore

KERNEL = "kernels_predict:scale2"
BEST_AT_100 = {0: 3.0, 1: 1.0, 2: 1.6, 3: 2.0}  # config 1 wins at n=100
BEST_AT_1000 = {0: 3.0, 1: 1.6, 2: 1.0, 3: 1.3}  # config 2 wins at n=1000


def key_of(n: int, dtype: torch.dtype = torch.float32) -> TuningKey:
    x = torch.empty(n, dtype=dtype)
    return KernelState(kp.scale2).labelled_key({"x_ptr": x, "out_ptr": x, "n": n})


def decided(n: int, times: dict[int, float | str]) -> Decision:
    """A decision as tuning writes it: every candidate's timings (ms) or its error."""
    specs = [config_spec(c) for c in kp.scale2.configs]
    cands = tuple(CandidateResult(i, specs[i], (t, 0.98 * t, 1.02 * t)) if isinstance(t, float)
                  else CandidateResult(i, specs[i], (), t) for i, t in times.items())
    winner = min((c for c in cands if c.ok), key=lambda c: c.timings[0]).index
    return Decision(kernel_id(kp.scale2), current_fingerprint(), key_of(n), winner, specs[winner], cands)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[str]:
    """A real SQLite store holding decisions for n=100 and n=1000; yields its URL."""
    path = tmp_path / "decided.db"
    db = SqliteStore(path)
    for d in (decided(100, BEST_AT_100), decided(1000, BEST_AT_1000)):
        db.put(d)
    db.close()
    yield f"sqlite:///{path}"


def serving(url: str, on_miss: str = "fallback", **options: str) -> None:
    tunevault.install(mode="tune", store=url, **options)
    tunevault.seal(on_miss=on_miss)


def counters() -> dict[str, float]:
    return tunevault.stats()["kernels"][KERNEL]["serving"]


def events(kind: str) -> list[dict]:
    rt = runtime()
    assert rt is not None
    return [e for e in rt.events.recent if e["event"] == kind]


def test_missed_keys_launch_the_nearer_sides_config_without_benchmarking(store: str, caplog) -> None:
    serving(store)
    caplog.set_level(logging.WARNING, logger="tunevault")
    with count_launches(kp.scale2) as launches:
        kp.run(120)
        assert kp.scale2.best_config is kp.scale2.configs[1]
        kp.run(900)
        assert kp.scale2.best_config is kp.scale2.configs[2]
    assert launches.count == 2  # one launch per call: nothing was benchmarked
    stats = counters()
    assert stats["predicted"] == 2 and stats["fallbacks"] == 2
    assert stats["benchmark_runs"] == 0 and stats["tunings"] == 0
    first = next(r.getMessage() for r in caplog.records if "n=120" in r.getMessage())
    assert "nearest decided key differs in n: 100 -> 120" in first  # the diagnosis stays as it was
    assert "using predicted config" in first and "from n=100, n=1000" in first
    fallback = events("fallback")[0]["predicted"]
    assert fallback["config"] == 1 and 0.0 <= fallback["expected_penalty"] < 0.05
    assert [dict(map(tuple, k))["n"] for k in fallback["neighbours"]] == [100, 1000]


def test_a_config_good_on_both_sides_wins_between_them(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    db = SqliteStore(tmp_path / "c.db")
    db.put(decided(100, {0: 3.0, 1: 1.0, 2: 1.8, 3: 1.1}))  # 3 is 10% off the best on both sides
    db.put(decided(1000, {0: 3.0, 1: 1.8, 2: 1.0, 3: 1.1}))
    db.close()
    serving(url)
    with count_launches(kp.scale2) as launches:
        kp.run(316)  # the middle on a log scale: each side's winner is 80% off on the other side
        assert kp.scale2.best_config is kp.scale2.configs[3]
        kp.run(110)  # close to n=100: its winner
        assert kp.scale2.best_config is kp.scale2.configs[1]
    assert launches.count == 2 and counters()["benchmark_runs"] == 0
    assert events("fallback")[0]["predicted"]["expected_penalty"] == pytest.approx(0.1, abs=0.01)


def test_a_dtype_no_decision_has_is_named_and_the_nearest_key_serves(store: str, caplog) -> None:
    serving(store)
    caplog.set_level(logging.WARNING, logger="tunevault")
    with count_launches(kp.scale2) as launches:
        kp.run(120, torch.float16)
    assert launches.count == 1
    # Documented fallback: the nearest decided key as the diagnosis ranks it (n=100: log2 nearer to 120).
    assert kp.scale2.best_config is kp.scale2.configs[1]
    why = "no decided key matches dtype(x_ptr): float32 -> float16, dtype(out_ptr): float32 -> float16"
    assert events("fallback")[0]["not_predicted"] == why and events("fallback")[0]["predicted"] is None
    said = f"using nearest key's config {describe_config(kp.scale2.configs[1])}; no prediction: {why}"
    assert any(said in r.getMessage() for r in caplog.records)
    assert counters()["predicted"] == 0 and counters()["fallbacks"] == 1


def test_the_nearest_decided_key_is_the_nearest_in_size_not_the_first_by_text(tmp_path: Path) -> None:
    """A miss at n=990 named n=100 as its nearest decided key (and the nearest-key fallback
    launched n=100's config): ``[["n",100]`` sorts before ``[["n",980]`` as text."""
    path = tmp_path / "near.db"
    db = SqliteStore(path)
    for d in (decided(100, BEST_AT_100), decided(980, BEST_AT_1000)):
        db.put(d)
    db.close()
    serving(f"sqlite:///{path}", on_miss="error")
    with pytest.raises(tunevault.TuningMiss) as miss:
        kp.run(990)
    assert miss.value.nearest == key_of(980)
    assert str(miss.value).endswith("nearest decided key differs in n: 980 -> 990")  # not "as near" as n=100
    tunevault.seal(on_miss="fallback")
    kp.run(990, torch.float16)  # no decided float16 key: no prediction, the nearest key's config
    assert kp.scale2.best_config is kp.scale2.configs[2]  # n=980's winner, not n=100's (#1)
    assert "nearest decided key differs in n: 980 -> 990, dtype(x_ptr)" in events("miss")[-1]["diagnosis"]


def test_the_nearest_decided_key_shares_the_calls_dtypes_before_its_sizes(tmp_path: Path) -> None:
    """x in float16 at n=1024 and float32 at n=1000 decided, a float32 call at n=1024: the miss named
    a dtype difference (a dtype that was warmed up) and its fallback launched float16's config."""
    path = tmp_path / "dtypes.db"
    db = SqliteStore(path)
    db.put(decided(1000, BEST_AT_1000))
    half_x = TuningKey(tuple((label, "float16" if label == "dtype(x_ptr)" else value)
                             for label, value in key_of(1024).items))  # one element away, a dtype
    db.put(dataclasses.replace(decided(1000, BEST_AT_100), key=half_x))
    db.close()
    serving(f"sqlite:///{path}", on_miss="error")
    with pytest.raises(tunevault.TuningMiss) as miss:
        kp.run(1024)
    assert miss.value.nearest == key_of(1000)
    assert str(miss.value).endswith("nearest decided key differs in n: 1000 -> 1024")


def test_a_value_of_another_json_type_is_named_as_the_difference(tmp_path: Path) -> None:
    """``n=256.0`` where ``n=256`` was decided: Python's ``==`` calls them equal, the key text does
    not, and the diagnosis blamed the store ("names no config this kernel declares")."""
    path = tmp_path / "types.db"
    db = SqliteStore(path)
    db.put(decided(256, BEST_AT_100))
    db.close()
    serving(f"sqlite:///{path}", on_miss="error")
    x = torch.arange(256, dtype=torch.float32)
    with pytest.raises(tunevault.TuningMiss) as miss:
        kp.scale2[(4,)](x, torch.empty_like(x), 256.0)
    assert str(miss.value).endswith("nearest decided key differs in n: 256 -> 256.0")
    assert miss.value.nearest == key_of(256)
    flags = TuningKey((("flag", 1),)).differences(TuningKey((("flag", True),)))
    assert flags == [("flag", True, 1)]


def test_a_predicted_or_nearest_config_that_does_not_build_for_the_call_is_passed_over(store: str) -> None:
    """A neighbour's config may not build at the missed key (on a GPU: a tile that fits in shared
    memory at n=100, not here; ``builds`` is the compile-and-load probe there, which Triton's
    interpreter cannot run). The fallback was launched, failed, and stayed remembered for the key."""
    from tunevault.policy.fallback import choose_fallback

    serving(store)
    rt, st = runtime(), KernelState(kp.scale2)
    assert rt is not None
    configs = kp.scale2.configs
    builds_all = choose_fallback(rt, st, key_of(120), lambda: configs[1], lambda: configs[0])
    assert builds_all[0] is configs[1] and builds_all[2]["predicted"]["config"] == 1  # n=100's winner

    not_one = choose_fallback(rt, st, key_of(120), lambda: configs[1], lambda: configs[0],
                              builds=lambda config: config is not configs[1])
    assert not_one[0] is configs[0], "neither the prediction (#1) nor the nearest key's (#1) builds"
    assert not_one[2]["not_predicted"] == "the predicted config #1 does not build for this call"
    assert not_one[1].startswith("first compiling config")


def test_a_fallback_is_recorded_for_the_key_it_launched_not_for_the_nearest_key(store: str) -> None:
    """``verify_agreement`` compares what each rank launched per key: a fallback recorded the nearest
    key's decision under the nearest key (never launched here) and nothing for the missed key, and
    a predicted fallback recorded nothing, so ranks falling back differently still agreed."""
    serving(store)
    kp.run(120)  # predicted: config 1
    kp.run(120, torch.float16)  # no decided float16 key: the nearest key's (n=100's) config 1
    kp.run(5000, torch.float16)  # the nearest key's (n=1000's) config 2
    launched = {}
    for (_kernel, text), config in used_decisions().items():
        key = dict(json.loads(text))
        launched[key["n"], key["dtype(x_ptr)"]] = config
    entry = {i: f"#{i} {config_spec(kp.scale2.configs[i]).describe()}" for i in (1, 2)}
    # Nothing for n=100 or n=1000: no call launched those keys.
    assert launched == {(120, "float32"): entry[1], (120, "float16"): entry[1], (5000, "float16"): entry[2]}


def test_background_tuning_measures_the_prediction_and_the_report_shows_it(store: str, tmp_path: Path,
                                                                             capsys) -> None:
    log = tmp_path / "events.jsonl"
    serving(store, on_miss="background", events=str(log))
    kp.run(120)  # predicted now, tuned off the request path
    assert background.drain(timeout=180)
    tuning = events("tuning")[0]
    outcome = tuning["prediction"]
    assert outcome["config"] == 1 and outcome["expected_penalty"] is not None
    assert outcome["measured"] is True and isinstance(outcome["regret"], float)
    assert outcome["winner"] == tuning["winner"]
    kp.run(125)  # the new decision reached the neighbour table: n=120 is now the nearest neighbour
    neighbours = [dict(map(tuple, k))["n"] for k in events("fallback")[-1]["predicted"]["neighbours"]]
    assert neighbours[0] == 120
    assert background.drain(timeout=180)
    tunevault.uninstall()

    kind, data = report.load(log)
    row = report.summarize_events(data)[KERNEL]
    assert kind == "events" and row["predicted"] == 2 and row["fallbacks"] == 2 and row["regret_n"] == 2
    from tunevault.cli.main import main

    assert main(["report", str(log)]) == 0
    table = capsys.readouterr().out
    assert "predicted" in table and "(n=2)" in table


# --------------------------------------------------------------- the predictor on its own


KID = KernelId("m:k", "src", "cfg", ("M",))
SPECS = [ConfigSpec((("BLOCK", b),), ()) for b in (16, 32, 64, 128)]


def plain(m: int, times: dict[int, float | str], dtype: str = "float16") -> Decision:
    cands = tuple(CandidateResult(i, SPECS[i], (t,)) if isinstance(t, float) else CandidateResult(i, SPECS[i], (), t)
                  for i, t in times.items())
    winner = min((c for c in cands if c.ok), key=lambda c: c.timings[0]).index
    return Decision(KID, current_fingerprint(), TuningKey((("M", m), ("dtype(a)", dtype))), winner, SPECS[winner],
                    cands)


def at(m: int, dtype: str = "float16") -> TuningKey:
    return TuningKey((("M", m), ("dtype(a)", dtype)))


def test_a_config_that_failed_at_a_neighbour_is_penalised() -> None:
    decisions = [plain(64, {0: 1.0, 1: "OutOfResources", 2: 1.15}), plain(256, {0: 1.6, 1: 1.0, 2: 1.2})]
    prediction = predict(at(128), decisions)
    assert prediction.config_index == 2  # 1 wins above but failed below; 0 is 60% off above
    assert prediction.penalty == pytest.approx(0.175, abs=0.005)
    absent = [plain(64, {0: 1.0, 2: 1.15}), decisions[1]]  # 1 not measured below: scored as the worst there
    assert predict(at(128), absent).config_index == 1


def test_configs_not_declared_or_not_measured_are_never_predicted() -> None:
    forged = ConfigSpec((("BLOCK", 16),), (("num_warps", 32),))
    d = plain(64, {0: 2.0, 1: 1.5})
    d = Decision(KID, d.fingerprint, d.key, 1, SPECS[1],
                 (*d.candidates, CandidateResult(2, forged, (0.5,))))  # a config the kernel does not declare
    assert predict(at(80), [d], declared=SPECS).config_index == 1
    assert predict(at(80), [d]).config_index == 2  # without the declared list it would be taken


def test_neighbours_bracket_the_gap_and_extrapolate_from_one_side() -> None:
    table = NeighbourTable([plain(m, {0: 1.0, 1: 1.1}) for m in (1, 4, 16, 64, 256, 1024)], SPECS)
    inside = table.predict(at(100))
    assert [dict(k.items)["M"] for k in inside.neighbours] == [64, 256, 16, 1024]
    beyond = table.predict(at(4096))
    assert [dict(k.items)["M"] for k in beyond.neighbours] == [1024, 256]
    assert table.predict(at(100, "float32")).unmatched == ("dtype(a): float16 -> float32",)
    assert predict(at(8), []).config_index is None


def test_the_neighbour_table_is_parsed_once_until_a_decision_is_added() -> None:
    from tunevault.policy.fallback import Predictions

    reads: list[int] = []
    decided = [plain(m, {0: 1.0, 1: 1.1}) for m in (16, 256)]

    def listing() -> list[Decision]:
        reads.append(len(decided))
        return list(decided)

    cache = Predictions()
    first = cache.table(KID, listing, SPECS)
    assert cache.table(KID, listing, SPECS) is first and reads == [2]
    decided.append(plain(64, {0: 1.5, 1: 1.0}))
    cache.invalidate(KID.digest)  # what Runtime.publish does
    assert cache.table(KID, listing, SPECS).predict(at(60)).config_index == 1 and reads == [2, 3]


def test_report_summarises_regret_and_counts_what_was_not_measured() -> None:
    def tuning(prediction: object) -> dict:
        return {"event": "tuning", "kernel": "m:k", "phase": "serving", "seconds": 1.0, "prediction": prediction}

    events = [{"event": "fallback", "kernel": "m:k", "phase": "serving", "predicted": {"config": 1}},
              {"event": "fallback", "kernel": "m:k", "phase": "serving", "predicted": None},
              {"event": "fallback", "kernel": "m:k", "phase": "serving"},  # written before predictions existed
              tuning({"regret": 0.01}), tuning({"regret": 0.03}), tuning({"regret": 0.2}),
              tuning({"regret": None, "note": "pruned"}), tuning({"regret": "0.5"}), tuning(None)]
    row = report.summarize_events(events)["m:k"]
    assert (row["fallbacks"], row["predicted"], row["regret_n"], row["regret_unmeasured"]) == (3, 1, 3, 2)
    assert (row["regret_median"], row["regret_max"]) == (0.03, 0.2)
    assert report.regret_cell(row) == "3.0% / 20.0% (n=3), 2 not measured"


def test_regret_is_measured_against_the_tuned_winner_or_says_why_not() -> None:
    results = [CandidateResult(0, SPECS[0], (2.0,)), CandidateResult(1, SPECS[1], (1.6,)),
               CandidateResult(2, SPECS[2], (), "OutOfResources")]
    assert regret(0, 1, results)["regret"] == pytest.approx(0.25)
    assert regret(1, 1, results) == {"config": 1, "winner": 1, "regret": 0.0, "measured": True, "note": ""}
    assert "failed here: OutOfResources" in regret(2, 1, results)["note"]
    missing = regret(3, 1, results)
    assert missing["regret"] is None and missing["measured"] is False
    assert missing["note"] == "the predicted config was not measured (pruned for this key)"
    assert json.dumps(missing)  # goes into the tuning event as is


def test_regret_bench_runs_in_cpu_smoke_mode(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import TESTS, subprocess_env

    script = TESTS.parent / "bench" / "predict_regret.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path), "--budget", "120"],
                          capture_output=True, text=True, timeout=240, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "results.json").read_text())
    measured = {s["name"]: s["kernels"] for s in doc["sweeps"]}
    for name in ("matmul", "rmsnorm"):
        (kernel,) = measured[name]
        assert kernel["keys"] == 4 and set(kernel["summary"]) == {"first", "today", "nearest", "predicted"}
        assert all(row["choices"]["predicted"] in range(kernel["configs"]) for row in kernel["rows"])
    assert "| kernel, sweep | fallback rule | median regret | max regret | keys within 5% |" in (
        tmp_path / "summary.md").read_text()


def test_an_outlier_neighbour_does_not_dominate() -> None:
    # Measured shape (matmul on an H200, M sweep): 1536 is the only key where config 0 wins; every
    # other neighbour says config 1. 1536 is the nearest key to 2048 (log2), and a mean weighted by
    # inverse squared distance followed it (35% off at 2048); the weighted median does not.
    decisions = [plain(1024, {0: 1.26, 1: 1.0, 2: 1.6}), plain(1536, {0: 1.0, 1: 1.19, 2: 1.5}),
                 plain(3072, {0: 1.10, 1: 1.0, 2: 1.6}), plain(4096, {0: 1.10, 1: 1.0, 2: 1.6})]
    prediction = predict(at(2048), decisions)
    assert prediction.config_index == 1
    assert [dict(k.items)["M"] for k in prediction.neighbours][0] == 1536  # the nearest, outvoted
    # One neighbour's catastrophe still counts where it holds the weight: next to 1536, 0 is kept.
    assert predict(at(1600), decisions).config_index == 0


def test_equidistant_neighbours_weigh_the_same_whatever_their_key_text() -> None:
    # log2(1 + M): M=3 sits exactly between M=1 and M=7, and M=0 / M=15 one step further out.
    decisions = [plain(0, {0: 1.0, 1: 1.9, 2: 1.2}), plain(1, {0: 1.0, 1: 1.8, 2: 1.1}),
                 plain(7, {0: 1.8, 1: 1.0, 2: 1.1}), plain(15, {0: 1.9, 1: 1.0, 2: 1.2})]
    table = NeighbourTable(decisions, SPECS)
    from tunevault.policy.predict import coords, neighbours

    (group,) = table.groups.values()
    chosen = neighbours(coords(at(3)), group, per_side=1)
    assert sorted(dict(p.key.items)["M"] for p, _w in chosen) == [1, 7]
    assert [w for _p, w in chosen] == pytest.approx([0.5, 0.5])
    for order in (decisions, decisions[::-1]):  # the compromise, 10% off on both sides, either way round
        prediction = predict(at(3), order)
        assert prediction.config_index == 2 and prediction.penalty == pytest.approx(0.1, abs=0.02)
