"""Bundles end to end: tune, ``tunevault export --winners-only --sign``, start a fresh process on
the bundle alone (no benchmarking), refuse a tampered one (and keep working), ``tunevault diff``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import run_py
from tunevault.cli.main import main
from tunevault.store.bundle import load_bundle
from tunevault.store.sqlite import SqliteStore

SIZES = (200, 700)

SERVE = """
import json, logging, sys
import torch, tunevault
from conftest import count_launches
from tunevault.demo.kernels import run_scaled_add, scaled_add

errors = []
class Errors(logging.Handler):
    def emit(self, record):
        errors.append(record.getMessage())
logging.getLogger("tunevault").addHandler(Errors(logging.ERROR))
tunevault.install(mode="tune")
chosen = []
with count_launches(scaled_add) as c:
    for n in SIZES:
        x = torch.rand(n)
        assert torch.allclose(run_scaled_add(x, x), 3 * x)
        chosen.append(scaled_add.best_config.kwargs["BLOCK"])
print(json.dumps({"bench": c.count - len(chosen), "chosen": chosen, "errors": errors}))
""".replace("SIZES", repr(SIZES))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """A store tuned by a real process, and what that process launched (tests only read it)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('tuned') / 'tuned.db'}"
    result = run_py(SERVE, TUNEVAULT_STORE=url)
    assert result["bench"] > 0
    return url, result


def test_signed_bundle_serves_a_fresh_process_without_benchmarking(tmp_path: Path, tuned: tuple[str, dict],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    url, first = tuned
    bundle = tmp_path / "bundle.json"
    monkeypatch.setenv("TUNEVAULT_BUNDLE_KEY", "image-build-secret")
    assert main(["--store", url, "export", "--winners-only", "--sign", str(bundle)]) == 0
    _, decisions = load_bundle(bundle, key="image-build-secret")
    assert len(decisions) == len(SIZES) and all(d.candidates == () for d in decisions)

    served = run_py(SERVE, TUNEVAULT_STORE=f"sqlite:///{tmp_path / 'fresh.db'}", TUNEVAULT_BUNDLE=str(bundle),
                    TUNEVAULT_BUNDLE_KEY="image-build-secret")
    assert served["bench"] == 0, "a process started on the bundle never benchmarks"
    assert served["chosen"] == first["chosen"] and served["errors"] == []


def test_tampered_signed_bundle_is_rejected_and_the_process_keeps_working(
        tmp_path: Path, tuned: tuple[str, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    url, first = tuned
    bundle = tmp_path / "bundle.json"
    monkeypatch.setenv("TUNEVAULT_BUNDLE_KEY", "k")
    assert main(["--store", url, "export", "--winners-only", "--sign", str(bundle)]) == 0
    doc = json.loads(bundle.read_text())
    doc["decisions"][0]["config_index"] = (doc["decisions"][0]["config_index"] + 1) % 3
    bundle.write_text(json.dumps(doc))

    served = run_py(SERVE, TUNEVAULT_STORE=f"sqlite:///{tmp_path / 'fresh.db'}", TUNEVAULT_BUNDLE=str(bundle),
                    TUNEVAULT_BUNDLE_KEY="k")
    (error,) = served["errors"]
    assert str(bundle) in error and "signature does not verify" in error
    assert served["bench"] > 0, "without the bundle the process tunes, as it would with none"


def test_export_winners_only_needs_decisions_for_the_fingerprint(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    SqliteStore(tmp_path / "empty.db").close()  # an empty store: export reads one, it does not create one
    assert main(["--store", url, "export", "--winners-only", str(tmp_path / "b.json")]) == 2
    assert "no decisions for fingerprint" in capsys.readouterr().err
    assert main(["--store", url, "export", "--sign", str(tmp_path / "b.json")]) == 2  # no key anywhere


def test_export_fingerprint_without_winners_only_is_refused(tmp_path: Path, tuned: tuple[str, dict],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Help says --fingerprint works "with --winners-only"; without it, a bundle was written silently."""
    url, _ = tuned
    out = tmp_path / "x.json"
    digest = json.loads(_cli_out(capsys, "--store", url, "ls", "--json"))[0]["fingerprint_digest"]
    capsys.readouterr()
    assert main(["--store", url, "export", "--fingerprint", digest, str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()] and "add --winners-only" in err
    assert not out.exists()
    assert main(["--store", url, "export", "--winners-only", "--fingerprint", digest[:12], str(out)]) == 0
    assert len(load_bundle(out)[1]) == len(SIZES)


def _cli_out(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_check_and_warmup_help_list_every_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    """The footers said nothing of an unreadable store (2) or warmup's Ctrl-C (130)."""
    for command in ("check", "warmup"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "store cannot be opened or read" in text
        assert ("130 on Ctrl-C" in text) == (command == "warmup")


def test_diff_stores_and_bundles(tmp_path: Path, tuned: tuple[str, dict],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = tuned
    bundle = tmp_path / "bundle.json"
    assert main(["--store", url, "export", "--winners-only", str(bundle)]) == 0
    capsys.readouterr()
    assert main(["diff", url, str(bundle)]) == 0
    assert "agree on all 2 key(s)" in capsys.readouterr().out

    other = SqliteStore(tmp_path / "other.db")
    small, large = sorted(SqliteStore(url[len("sqlite://"):]).decisions(), key=lambda d: d.key.items[0][1])
    flipped = (small.config_index + 1) % 3
    other.put(replace(small, config_index=flipped, config=small.candidates[flipped].config))
    assert main(["diff", str(bundle), str(tmp_path / "other.db"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    rows = {(r["status"], r["key"].split()[0]) for r in report["differences"]}
    assert rows == {("differs", f"n={SIZES[0]}"), ("only A", f"n={SIZES[1]}")}
    (differs,) = [r for r in report["differences"] if r["status"] == "differs"]
    assert differs["a"].startswith(f"#{small.config_index} ") and differs["b"].startswith(f"#{flipped} ")
    assert large.key.describe() in {r["key"] for r in report["differences"]}


def test_diff_refuses_a_foreign_or_unreadable_sqlite_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file from elsewhere is opened read-only with its layout checked (a ``decisions`` VIEW could be an
    endless query), and a store that cannot be read is an error, never an empty side that "agrees"."""
    import sqlite3
    from contextlib import closing

    from test_store import make_decision

    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"format": "tunevault-decisions", "schema": 1, "decisions": []}))
    view = tmp_path / "view.db"
    with closing(sqlite3.connect(view)) as db:  # harmless if read: the review's view never ended
        db.executescript("PRAGMA user_version = 1; CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, "
                         "expires REAL NOT NULL); CREATE VIEW decisions(kernel_digest, fingerprint_digest, key_text, "
                         "kernel_name, payload, created) AS SELECT 'k', 'f', 'x', 'n', 'p', 0.0;")
    before = view.read_bytes()
    assert main(["diff", str(view), str(empty)]) == 2
    assert "view" in capsys.readouterr().err
    assert view.read_bytes() == before and not Path(f"{view}-wal").exists()

    damaged = tmp_path / "damaged.db"
    store = SqliteStore(damaged)
    store.put(make_decision(1))
    store.close()
    with closing(sqlite3.connect(damaged)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'decisions'").fetchone()[0]
        page = db.execute("PRAGMA page_size").fetchone()[0]
    with open(damaged, "r+b") as f:  # the schema page stays sound: the file opens, its rows cannot be read
        f.seek((root - 1) * page)
        f.write(b"\xff" * page)
    assert main(["diff", str(damaged), str(empty)]) == 2
    assert "agree" not in capsys.readouterr().out
