"""Bad input says what is wrong: store URLs, damaged SQLite files, entries that point nowhere."""

from __future__ import annotations

import dataclasses
import json
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
    open_store("sqlite:///rel/tv.db").close()  # the library creates a store; info only reads one
    assert (tmp_path / "rel" / "tv.db").exists()
    relative = cli_json(capsys, "--store", "sqlite:///rel/tv.db", "info")  # three slashes: relative
    assert relative["store"]["url"] == f"sqlite:///{tmp_path / 'rel' / 'tv.db'}"
    open_store(f"sqlite:///{tmp_path / 'abs.db'}").close()
    absolute = cli_json(capsys, "--store", f"sqlite:///{tmp_path / 'abs.db'}", "info")  # four: absolute
    assert absolute["store"]["url"] == f"sqlite:///{tmp_path / 'abs.db'}"

    code, _, err = cli(capsys, "--store", "sqlite://host/x.db", "ls")
    assert code == 2 and "sqlite:///relative/path.db" in err and "sqlite:////absolute/path.db" in err

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, _, err = cli(capsys, "--store", f"sqlite:///{blocker}/sub/tv.db", "ls")
    assert code == 2 and f"no tuning store at {blocker}/sub/tv.db " in err  # a path, not //tmp/...


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
    assert store.try_lease("unpublished:k", '{"format": "x"}', 3600.0)  # a decision Redis has not got yet
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
    fresh = open_store(sqlite_url)
    assert list(fresh.leases("unpublished:")) == ["unpublished:k"], "a mark for the remote survives the repair"
    fresh.close()
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


def _damage_index(path: Path) -> None:
    """Overwrite the primary key's index page: the file opens, the table reads, COUNT(*) fails."""
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (page,) = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_decisions_1'"
                              ).fetchone()
        (size,) = con.execute("PRAGMA page_size").fetchone()
    data = bytearray(path.read_bytes())
    data[(page - 1) * size:page * size] = b"\xde\xad\xbe\xef" * (size // 4)
    path.write_bytes(bytes(data))


def test_info_on_a_store_that_opens_but_fails_its_first_read_shows_the_rest(
        tv: Any, sqlite_url: str, capsys: Any) -> None:
    """``info`` printed only ``error: ...`` (exit 2) when the store opened and then failed to read."""
    tune_two(tv)
    tv.uninstall()
    _damage_index(Path(sqlite_url.removeprefix("sqlite:///")))
    code, out, err = cli(capsys, "--store", sqlite_url, "info")
    assert code == 1 and out.startswith("versions:") and "fingerprint:" in out
    assert "unavailable: cannot read tuning store" in out and f"tunevault --store {sqlite_url} doctor" in out
    assert "is damaged" in err and "doctor --repair" in err
    report = cli_json_status(capsys, 1, "--store", sqlite_url, "info")
    assert "malformed" in report["store"]["error"] and report["store"]["damage"]

    code, out, err = cli(capsys, "--store", "redis://127.0.0.1:1/0", "info")  # nothing listens on port 1
    assert code == 1 and out.startswith("versions:") and "unavailable: redis store" in out and err == ""


def cli_json_status(capsys: Any, status: int, *argv: str) -> Any:
    code, out, err = cli(capsys, *argv, "--json")
    assert code == status, err
    return json.loads(out)


@pytest.mark.parametrize("argv", [["info"], ["ls"], ["show", "matmul"], ["export", "-"], ["rm", "--all"],
                                  ["check", "MANIFEST"]])
def test_a_reading_command_given_a_path_with_no_store_creates_nothing(argv: list[str], tmp_path: Path,
                                                                      capsys: Any) -> None:
    """A mistyped --store made the folders and an empty database, then reported 0 decisions, exit 0."""
    manifest = tmp_path / "keys.jsonl"
    manifest.write_text(json.dumps({"format": "tunevault-manifest/1", "kernel": "tunevault.demo.kernels:scaled_add",
                                    "key": [["n", 8]]}) + "\n")
    typo = tmp_path / "typo" / "new" / "x.db"
    argv = [str(manifest) if a == "MANIFEST" else a for a in argv]
    code, out, err = cli(capsys, "--store", f"sqlite:///{typo}", *argv)
    assert code == 2 and out == "" and err.strip().splitlines() == [err.strip()]
    assert f"no tuning store at {typo}" in err
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize(("argv", "status"), [(["info"], 0), (["ls"], 0), (["show", "matmul"], 1),
                                             (["export", "-"], 0), (["rm", "--all"], 0), (["check", "MANIFEST"], 1)])
def test_a_reading_command_on_the_absent_default_store_creates_nothing(argv: list[str], status: int, tmp_path: Path,
                                                                       capsys: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With no --store and no TUNEVAULT_STORE, every reading command made the user-cache store file."""
    monkeypatch.delenv("TUNEVAULT_STORE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    manifest = tmp_path / "keys.jsonl"
    manifest.write_text(json.dumps({"format": "tunevault-manifest/1", "kernel": "tunevault.demo.kernels:scaled_add",
                                    "key": [["n", 8]]}) + "\n")
    argv = [str(manifest) if a == "MANIFEST" else a for a in argv]
    code, out, err = cli(capsys, *argv)
    assert code == status, out + err
    assert not (tmp_path / "xdg").exists()
    db = tmp_path / "xdg" / "tunevault" / "tunevault.db"
    if argv[0] == "info":
        assert f"store:       sqlite:///{db}" in out and "entries:     0 (0 for this machine)" in out
    if argv[0] == "ls":
        assert "0 decision(s) in" in out
    if argv[0] == "check":
        assert "0/1 keys decided" in out


def test_doctor_on_a_named_store_that_does_not_exist_is_exit_2(tmp_path: Path, capsys: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """doctor said "no store file yet; nothing to check", exit 0, for a mistyped --store."""
    typo = tmp_path / "typo.db"
    code, out, err = cli(capsys, "--store", f"sqlite:///{typo}", "doctor")
    assert code == 2 and out == "" and err.strip().splitlines() == [err.strip()]
    assert f"no tuning store at {typo}" in err
    assert code == cli(capsys, "--store", f"sqlite:///{typo}", "ls")[0]  # as every other command
    monkeypatch.setenv("TUNEVAULT_STORE", f"sqlite:///{typo}")
    assert cli(capsys, "doctor")[0] == 2
    monkeypatch.delenv("TUNEVAULT_STORE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the default store, absent on a fresh machine
    code, out, _ = cli(capsys, "doctor")
    assert code == 0 and "no store file yet; nothing to check" in out
    assert not (tmp_path / "xdg").exists() and not typo.exists()


def test_doctor_says_a_foreign_sqlite_file_is_not_a_tunevault_store(tmp_path: Path, capsys: Any) -> None:
    """doctor called a file with other tables, or a view named decisions, "sound" (exit 0)."""
    for name, ddl in (("foreign.db", "CREATE TABLE foo (x)"),
                      ("view.db", "CREATE TABLE t (x); CREATE VIEW decisions AS SELECT x FROM t")):
        path = tmp_path / name
        with sqlite3.connect(path) as con:
            con.executescript(ddl)
        con.close()
        code, out, err = cli(capsys, "--store", f"sqlite:///{path}", "doctor")
        assert code == 2 and "sound" not in out
        assert err.startswith(f"tunevault doctor: error: {path} is not a tunevault store: ")
        assert code == cli(capsys, "--store", f"sqlite:///{path}", "ls")[0]  # as every other command
