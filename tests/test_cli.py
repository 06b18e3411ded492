"""The store commands as a user runs them: real SQLite files, real tuned kernels, a real subprocess."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import count_launches, subprocess_env
from tunevault.cli.main import main
from tunevault.core.model import Fingerprint, TuningKey
from tunevault.demo import kernels
from tunevault.integration.triton_adapter import runtime
from tunevault.store.base import Query, open_store

OTHER_GPU = Fingerprint("3.9.0", "cuda:90", "NVIDIA H100 80GB HBM3", "12.8")


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def tune_two(tv: Any) -> None:
    """Tune two real kernels into the ``tv`` store (tiny inputs: the interpreter is slow)."""
    x, y = torch.randn(64), torch.randn(64)
    torch.testing.assert_close(kernels.run_scaled_add(x, y), 2.0 * x + y)
    m = torch.randn(3, 16)
    torch.testing.assert_close(kernels.run_row_sum(m), m.sum(dim=1))


def test_info_reports_fingerprint_store_and_count(tv: Any, sqlite_url: str, capsys: Any) -> None:
    before = cli_json(capsys, "--store", sqlite_url, "info")
    assert before["fingerprint"]["target"] == "interpreter" and before["interpreter"] is True
    assert len(before["fingerprint"]["digest"]) == 16
    assert before["versions"]["tunevault"] and before["versions"]["triton"]
    assert before["store"] == {"url": sqlite_url, "entries": 0, "this_machine": 0, "damage": []}
    tune_two(tv)
    after = cli_json(capsys, "--store", sqlite_url, "info")
    assert after["store"]["entries"] == 2 and after["store"]["this_machine"] == 2
    code, out, _ = cli(capsys, "--store", sqlite_url, "info")
    assert code == 0 and "2 (2 for this machine)" in out and before["fingerprint"]["digest"] in out


def test_ls_lists_tuned_kernels_and_marks_other_machines(tv: Any, sqlite_url: str, capsys: Any) -> None:
    tune_two(tv)
    store = open_store(sqlite_url)
    mine = next(iter(store.decisions(Query(kernel="scaled_add"))))
    store.put(dataclasses.replace(mine, fingerprint=OTHER_GPU))  # a shared store holds other GPUs' picks
    store.close()

    rows = cli_json(capsys, "--store", sqlite_url, "ls")
    assert len(rows) == 3
    assert {r["kernel"].rsplit(":")[-1] for r in rows} == {"scaled_add", "row_sum"}
    assert sorted(r["this_machine"] for r in rows) == [False, True, True]
    launched = runtime().used  # what the kernels actually ran with is what ls shows
    for r in rows:
        if r["this_machine"]:
            used = launched[(r["kernel"], TuningKey.from_json(r["key"]).text)]
            assert used.config_index == r["config_index"]

    here = cli_json(capsys, "--store", sqlite_url, "ls", "--this-machine")
    assert [r["this_machine"] for r in here] == [True, True]
    elsewhere = cli_json(capsys, "--store", sqlite_url, "ls", "--other-machines")
    assert [(r["this_machine"], r["kernel"].rsplit(":")[-1]) for r in elsewhere] == [(False, "scaled_add")]
    assert len(cli_json(capsys, "--store", sqlite_url, "ls", "--kernel", "row_sum")) == 1
    code, out, _ = cli(capsys, "--store", sqlite_url, "ls")
    assert code == 0 and "scaled_add" in out and "NVIDIA H100" in out and "dtype(x_ptr)=float32" in out


def test_show_prints_every_candidate(tv: Any, sqlite_url: str, capsys: Any) -> None:
    tune_two(tv)
    [entry] = cli_json(capsys, "--store", sqlite_url, "show", "scaled_add")
    decision = entry["decision"]
    assert entry["this_machine"] and decision["kernel"]["name"].endswith(":scaled_add")
    assert sorted(c["index"] for c in decision["candidates"]) == [0, 1, 2]  # three declared configs
    code, out, _ = cli(capsys, "--store", sqlite_url, "show", "scaled_add")
    assert code == 0 and "chosen" in out and "median ms" in out and "BLOCK=64" in out
    code, _, err = cli(capsys, "--store", sqlite_url, "show", "no_such_kernel")
    assert code == 1 and "no decisions" in err


def test_export_import_round_trip_is_used_without_benchmarking(tv: Any, sqlite_url: str, tmp_path: Path,
                                                               capsys: Any) -> None:
    tune_two(tv)
    exported = tmp_path / "decisions.json"
    code, out, _ = cli(capsys, "--store", sqlite_url, "export", str(exported))
    assert code == 0 and "exported 2" in out
    doc = json.loads(exported.read_text())
    assert doc["format"] == "tunevault-decisions" and doc["schema"] == 1 and len(doc["decisions"]) == 2

    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    report = cli_json(capsys, "--store", fresh, "import", str(exported))
    assert (report["added"], report["skipped"], report["rejected"]) == (2, 0, 0)
    again = cli_json(capsys, "--store", fresh, "import", str(exported))
    assert (again["added"], again["skipped_identical"], again["rejected"]) == (0, 2, 0)

    # A server on the importing machine launches the imported choice and benchmarks nothing.
    tv.install(mode="tune", store=fresh)
    x, y = torch.randn(64), torch.randn(64)
    with count_launches(kernels.scaled_add) as launches:
        torch.testing.assert_close(kernels.run_scaled_add(x, y), 2.0 * x + y)
    assert launches.count == 1


def test_import_of_a_winners_only_bundle_counts_the_same_choices_as_identical(tv: Any, sqlite_url: str,
                                                                            tmp_path: Path, capsys: Any) -> None:
    """A bundle strips the timings; the decisions are still the same ones, and a different
    config chosen for a key is still reported as different."""
    tune_two(tv)
    tv.uninstall()
    bundle = tmp_path / "bundle.json"
    assert cli(capsys, "--store", sqlite_url, "export", "--winners-only", str(bundle))[0] == 0
    assert all(e["candidates"] == [] for e in json.loads(bundle.read_text())["decisions"])
    report = cli_json(capsys, "--store", sqlite_url, "import", str(bundle))
    assert (report["added"], report["skipped_identical"], report["skipped_differing"]) == (0, 2, 0)

    store = open_store(sqlite_url)
    decision = next(d for d in store.decisions() if len(d.candidates) > 1)
    other = next(c for c in decision.candidates if c.index != decision.config_index)
    store.delete(Query(kernel=decision.kernel.name))
    store.put(dataclasses.replace(decision, config_index=other.index, config=other.config))
    store.close()
    code, out, _ = cli(capsys, "--store", sqlite_url, "import", str(bundle))
    assert code == 0 and "already present: 1 identical, 1 different, stored one kept" in out


def test_import_rejects_bad_entries_and_keeps_good_ones(tv: Any, sqlite_url: str, tmp_path: Path,
                                                        capsys: Any) -> None:
    tune_two(tv)
    good = tmp_path / "good.json"
    assert cli(capsys, "--store", sqlite_url, "export", str(good))[0] == 0
    doc = json.loads(good.read_text())
    first, second = doc["decisions"]
    wrong_type = {**second, "config_index": "1"}
    swapped = json.loads(json.dumps(second))
    swapped["config"]["kwargs"] = {"ROWS": 64}  # disagrees with its own measurement of that index
    beyond = {**second, "config_index": 99}  # not one of its own candidates (#0-#2)
    doc["decisions"] = [first, wrong_type, swapped, beyond, {"schema": 99}, "not an object"]
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(doc))

    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    code, out, _ = cli(capsys, "--store", fresh, "import", str(tampered), "--json")
    report = json.loads(out)
    assert code == 1  # any rejection fails the command; the valid entries are still imported
    assert (report["added"], report["skipped"], report["rejected"]) == (1, 0, 5)
    assert [r["index"] for r in report["rejections"]] == [1, 2, 3, 4, 5]
    assert "measurement" in report["rejections"][1]["reason"]
    assert "config_index 99 is not one of its own candidates (#0, #1, #2)" in report["rejections"][2]["reason"]
    assert "schema" in report["rejections"][3]["reason"]
    assert open_store(fresh).count() == 1
    code, _, err = cli(capsys, "--store", fresh, "import", str(tampered))  # the text lists every rejection
    assert code == 1 and err.count("rejected entry") == 5

    doc["decisions"] = [0] * 25  # more rejections than a terminal should scroll through
    tampered.write_text(json.dumps(doc))
    code, _, err = cli(capsys, "--store", fresh, "import", str(tampered))
    assert code == 1 and err.count("rejected entry") == 20 and "and 5 more rejected entries" in err

    from tunevault.store.bundle import MAX_ENTRIES

    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps({**doc, "decisions": [0] * (MAX_ENTRIES + 1)}))
    code, _, err = cli(capsys, "--store", fresh, "import", str(huge))
    assert code == 2 and f"more than the {MAX_ENTRIES}" in err  # refused whole, before any entry is read

    for text, message in (("{not json", "not JSON"), ('{"format": "other"}', "not a tunevault export"),
                          ('{"format": "tunevault-decisions", "schema": 2, "decisions": []}', "schema 2"),
                          ('{"format": "tunevault-decisions", "schema": 1, "decisions": {}}', "list")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        code, _, err = cli(capsys, "--store", fresh, "import", str(bad))
        assert code == 2 and str(bad) in err and message in err
    assert open_store(fresh).count() == 1


def test_rm_needs_a_filter_and_removes_what_matches(tv: Any, sqlite_url: str, capsys: Any) -> None:
    tune_two(tv)
    store = open_store(sqlite_url)
    store.put(dataclasses.replace(next(iter(store.decisions())), fingerprint=OTHER_GPU))
    code, _, err = cli(capsys, "--store", sqlite_url, "rm")
    assert code == 2 and "--all" in err and store.count() == 3

    code, out, _ = cli(capsys, "--store", sqlite_url, "rm", "--other-machines")
    assert code == 0 and "removed 1 decision" in out
    code, out, _ = cli(capsys, "--store", sqlite_url, "rm", "--kernel", "row_sum", "--dry-run")
    assert "would remove 1" in out and store.count() == 2
    code, out, _ = cli(capsys, "--store", sqlite_url, "rm", "--kernel", "row_sum")
    assert code == 0 and "removed 1 decision" in out
    assert [d.kernel.name for d in store.decisions()] == ["tunevault.demo.kernels:scaled_add"]
    code, out, _ = cli(capsys, "--store", sqlite_url, "rm", "--all")
    assert "removed 1 decision" in out and store.count() == 0
    store.close()


def test_entry_point_reads_store_from_environment(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    open_store(url).close()  # info reads a store; it does not create one
    proc = subprocess.run([sys.executable, "-m", "tunevault.cli.main", "info", "--json"], capture_output=True,
                          text=True, timeout=120, env=subprocess_env(TUNEVAULT_STORE=url))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["store"]["url"] == url and info["store"]["entries"] == 0


def test_import_checks_a_signed_bundle(tv: Any, sqlite_url: str, tmp_path: Path, capsys: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from tunevault.core.identity import current_fingerprint
    from tunevault.store.bundle import write_bundle

    tune_two(tv)
    store = open_store(sqlite_url)
    bundle = tmp_path / "bundle.json"
    write_bundle(bundle, store.decisions(), current_fingerprint(), key="right key")
    store.close()
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"

    monkeypatch.setenv("TUNEVAULT_BUNDLE_KEY", "wrong key")
    code, _, err = cli(capsys, "--store", fresh, "import", str(bundle))
    assert code == 2 and "signature does not verify" in err and open_store(fresh).count() == 0

    monkeypatch.setenv("TUNEVAULT_BUNDLE_KEY", "right key")
    assert cli_json(capsys, "--store", fresh, "import", str(bundle))["added"] == 2

    doc = json.loads(bundle.read_text())
    doc["decisions"][0]["fingerprint"]["device"] = "NVIDIA H100"  # smuggled under another fingerprint
    del doc["signature"]
    bundle.write_text(json.dumps(doc))
    third = f"sqlite:///{tmp_path / 'third.db'}"
    code, _, err = cli(capsys, "--store", third, "import", str(bundle))  # a downgrade: refused with a key
    assert code == 2 and "is not signed" in err and open_store(third).count() == 0
    monkeypatch.delenv("TUNEVAULT_BUNDLE_KEY")
    code, out, _ = cli(capsys, "--store", third, "import", str(bundle), "--json")
    assert code == 1 and "fingerprint header" in json.loads(out)["rejections"][0]["reason"]
