"""Bad input says what is wrong: store URLs, damaged SQLite files, entries that point nowhere."""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch

import tunevault
from test_cli import cli, cli_json, tune_two
from tunevault.core.model import TuningKey
from tunevault.demo import kernels
from tunevault.store.base import open_store


def test_sqlite_urls_read_as_sqlalchemy_does(tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = cli_json(capsys, "--store", "sqlite:///rel/tv.db", "info")  # three slashes: relative
    assert relative["store"]["url"] == f"sqlite:///{tmp_path / 'rel' / 'tv.db'}"
    assert (tmp_path / "rel" / "tv.db").exists()
    absolute = cli_json(capsys, "--store", f"sqlite:///{tmp_path / 'abs.db'}", "info")  # four: absolute
    assert absolute["store"]["url"] == f"sqlite:///{tmp_path / 'abs.db'}" and (tmp_path / "abs.db").exists()

    code, _, err = cli(capsys, "--store", "sqlite://host/x.db", "ls")
    assert code == 2 and "sqlite:///relative/path.db" in err and "sqlite:////absolute/path.db" in err

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, _, err = cli(capsys, "--store", f"sqlite:///{blocker}/sub/tv.db", "ls")
    assert code == 2 and f"tuning store {blocker}/sub/tv.db:" in err  # a path, not //tmp/...


def _damage(path: Path) -> None:
    """Overwrite 8 KB in the middle of the file, as a failing disk or a stray write would."""
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything into the main file
    data = bytearray(path.read_bytes())
    middle = len(data) // 2 // 4096 * 4096
    data[middle:middle + 8192] = b"\xde\xad\xbe\xef" * 2048
    path.write_bytes(bytes(data))


def test_damaged_store_is_reported_and_repaired(tv: Any, sqlite_url: str, tmp_path: Path, capsys: Any) -> None:
    tune_two(tv)
    tv.uninstall()
    store = open_store(sqlite_url)
    model = next(iter(store.decisions()))
    for n in range(300):  # a store big enough that 8 KB is a small part of it
        store.put(dataclasses.replace(model, key=TuningKey((("n", 10_000 + n), *model.key.items[1:]))))
    store.close()
    path = Path(sqlite_url.removeprefix("sqlite:///"))
    _damage(path)

    code, _, err = cli(capsys, "--store", sqlite_url, "ls")
    assert code == 1 and "is damaged" in err and "doctor --repair" in err
    code, _, err = cli(capsys, "--store", sqlite_url, "doctor")
    assert code == 1 and "DAMAGED" in err and "still readable" in err

    # At serve time the miss names the damage instead of pretending the store is merely empty.
    tunevault.install(mode="tune", store=sqlite_url, on_miss="error")
    with pytest.raises(tunevault.TuningMiss, match=r"is damaged \(.*\): run `tunevault --store .* doctor`"):
        kernels.run_scaled_add(torch.randn(5), torch.randn(5))
    tunevault.uninstall()

    report = cli_json(capsys, "--store", sqlite_url, "doctor", "--repair")
    assert report["status"] == "repaired" and 0 < report["recovered"] <= 302
    assert Path(report["damaged_copy"]).exists()
    assert cli(capsys, "--store", sqlite_url, "ls")[0] == 0
    assert cli_json(capsys, "--store", sqlite_url, "doctor")["status"] == "sound"
    assert len(cli_json(capsys, "--store", sqlite_url, "ls")) == report["recovered"]


def test_export_from_a_damaged_store_leaves_a_good_export_untouched(tv: Any, sqlite_url: str, tmp_path: Path,
                                                                     capsys: Any) -> None:
    """A damaged file reads as missing rows: exported, they would replace a good FILE with fewer."""
    tune_two(tv)
    tv.uninstall()
    store = open_store(sqlite_url)
    model = next(iter(store.decisions()))
    for n in range(300):
        store.put(dataclasses.replace(model, key=TuningKey((("n", 10_000 + n), *model.key.items[1:]))))
    store.close()
    good, bundle = tmp_path / "good.json", tmp_path / "bundle.json"
    assert cli(capsys, "--store", sqlite_url, "export", str(good))[0] == 0
    assert cli(capsys, "--store", sqlite_url, "export", "--winners-only", str(bundle))[0] == 0
    before = {good: good.read_bytes(), bundle: bundle.read_bytes()}
    _damage(Path(sqlite_url.removeprefix("sqlite:///")))

    for argv in (["export", str(good)], ["export", "--winners-only", str(bundle)], ["export", "-"]):
        code, out, err = cli(capsys, "--store", sqlite_url, *argv)
        assert {f: f.read_bytes() for f in before} == before, argv
        assert code == 1, argv
        assert "is damaged" in err and "doctor --repair" in err and "nothing exported" in err, err
        assert out == "" and "exported" not in err.replace("nothing exported", "")
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".db" and ".db" not in p.name) == \
        ["bundle.json", "good.json"]  # no temp file left beside them


def test_a_stored_decision_naming_an_undeclared_config_gives_a_whole_sentence(
        tv: Any, sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    x, y = torch.randn(64), torch.randn(64)
    kernels.run_scaled_add(x, y)
    tv.uninstall()
    store = open_store(sqlite_url)
    (decision,) = store.decisions()
    store.close()
    other = open_store(f"sqlite:///{tmp_path / 'other.db'}")  # written around import's validation
    other.put(dataclasses.replace(decision, config_index=99))
    other.close()

    tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'other.db'}", on_miss="error")
    caplog.set_level(logging.WARNING, logger="tunevault")
    with pytest.raises(tunevault.TuningMiss) as miss:
        kernels.run_scaled_add(x, y)
    message = str(miss.value)
    assert message.endswith("the decision stored for this very key names no config this kernel declares: ignored")
    assert "differs in" not in message


def test_export_writes_through_a_symlink_and_into_a_fifo(tv: Any, sqlite_url: str, tmp_path: Path,
                                                         capsys: Any) -> None:
    """The rename that makes an export whole replaced whatever the path was: a symlink became a
    regular file (its target kept the old contents), a FIFO was replaced and its reader got nothing."""
    import json
    import os
    import threading

    tune_two(tv)
    tv.uninstall()
    target = tmp_path / "shared" / "real.json"
    target.parent.mkdir()
    target.write_text('{"old": true}')
    target.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    code, _, err = cli(capsys, "--store", sqlite_url, "export", str(link))
    assert code == 0, err
    assert link.is_symlink() and len(json.loads(target.read_text())["decisions"]) == 2
    assert target.stat().st_mode & 0o777 == 0o640, "replacing a file keeps its mode"
    bundle = tmp_path / "bundle-link.json"
    bundle.symlink_to(target)
    code, _, err = cli(capsys, "--store", sqlite_url, "export", "--winners-only", str(bundle))
    assert code == 0 and bundle.is_symlink() and "signature" not in json.loads(target.read_text()), err

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    code, _, err = cli(capsys, "--store", sqlite_url, "export", str(fifo))
    reader.join(30)
    assert code == 0 and fifo.is_fifo() and len(json.loads(got[0])["decisions"]) == 2, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []

    code, _, err = cli(capsys, "--store", sqlite_url, "export", str(tmp_path / "missing" / "x.json"))
    assert code == 2 and f"{tmp_path / 'missing' / 'x.json'}" in err and ".tmp" not in err
