"""Issue 14, breakages 1-3, 5 and 6: files from elsewhere never raise into, or stall, a kernel call.

Bundles that are hostile (non-ASCII signature, NaN, 100k-deep nesting), not files at all (a FIFO,
/dev/zero), or signed with an empty key; event and capture sinks that are FIFOs; stored values out
of range. Each test asserts what a user would notice: the call's result, the launches, the one
message, and the CLI's exit status and words (never a traceback).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import kernels_hostile as kh
import tunevault
from conftest import run_py
from hostile import cli, env
from slow_faults import fifo
from tunevault.core.identity import current_fingerprint
from tunevault.integration.triton_adapter import runtime
from tunevault.store.bundle import make_bundle
from tunevault.store.sqlite import SqliteStore

pytestmark = pytest.mark.timeout(240)  # a blocking read or open would otherwise hang the run


@pytest.fixture(scope="module")
def decisions() -> list[Any]:
    """Real decisions for add_one (both sizes) on this machine, tuned once."""
    tunevault.install(mode="tune", store="memory://")
    for n in kh.SIZES:
        kh.call_checked(kh.add_one, n)
    found = sorted(runtime().decided.values(), key=lambda d: d.key.text)
    tunevault.uninstall()
    return found


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level and r.name == "tunevault"]


def serve(tmp_path: Path, **options: Any) -> SqliteStore:
    """Tune mode on a fresh local SQLite store: both sizes right, declared configs only."""
    tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'local.db'}", **options)
    for n in kh.SIZES:
        kh.call_checked(kh.add_one, n)
    store = runtime().store
    assert isinstance(store, SqliteStore), f"the local store was not used: {store!r}"
    assert store.count() == (len(kh.SIZES) if options.get("on_miss", "tune") == "tune" else 0)
    return store


def write_bundle_text(path: Path, decisions: list[Any], key: str | None, edit: Any = None) -> Path:
    doc = make_bundle(decisions, current_fingerprint(), key)
    text = json.dumps(edit(doc) if callable(edit) else doc)
    path.write_text(text)
    return path


HOSTILE_BUNDLES = {
    "non-ascii hmac": lambda doc: {**doc, "signature": {"alg": "hmac-sha256", "hmac": "\u00e9" * 64}},
    "created NaN": lambda doc: {**doc, "created": float("nan")},  # json.dumps writes the token NaN
    "100k-deep extra field": lambda doc: {**doc, "extra": "DEEP"},
}


@pytest.mark.parametrize(("name", "key"), [(name, key) for name in sorted(HOSTILE_BUNDLES) for key in ("s3cret", None)
                                           if (name, key) != ("non-ascii hmac", None)])  # unchecked without a key
def test_hostile_bundle_is_refused_with_one_error_and_the_local_store_serves(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, decisions: list[Any], name: str, key: str | None) -> None:
    path = write_bundle_text(tmp_path / "bundle.json", decisions, key, HOSTILE_BUNDLES[name])
    path.write_text(path.read_text().replace('"DEEP"', "[" * 100_000 + "]" * 100_000))
    caplog.set_level(logging.INFO, logger="tunevault")
    serve(tmp_path, bundles=str(path), bundle_key=key, on_miss="tune")
    errors = messages(caplog, logging.ERROR)
    assert len(errors) == 1 and str(path) in errors[0], errors
    with env(TUNEVAULT_BUNDLE_KEY=key):
        code, _, err = cli("diff", str(path), str(tmp_path / "local.db"))
    assert code == 2 and str(path) in err


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "directory"])
@pytest.mark.parametrize("policy", ["tune", "fallback"])
def test_bundle_path_that_is_not_a_file_is_refused_without_blocking(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str, policy: str) -> None:
    path = {"fifo": lambda: str(fifo(tmp_path / "bundle.fifo")), "/dev/zero": lambda: "/dev/zero",
            "directory": lambda: str(tmp_path)}[kind]()
    serve(tmp_path, bundles=path, on_miss=policy)
    errors = messages(caplog, logging.ERROR)
    assert len(errors) == 1 and path in errors[0] and "not a regular file" in errors[0], errors
    code, _, err = cli("diff", path, str(tmp_path / "local.db"))
    assert code == 2 and "not a regular file" in err


def test_empty_bundle_key_is_a_configuration_error(tmp_path: Path, decisions: list[Any]) -> None:
    with pytest.raises(ValueError, match="TUNEVAULT_BUNDLE_KEY is set but empty"):
        tunevault.install(mode="tune", store="memory://", bundle_key="")
    with env(TUNEVAULT_BUNDLE_KEY=""), pytest.raises(ValueError, match="set but empty"):
        tunevault.install(mode="tune", store="memory://")
    bundle = write_bundle_text(tmp_path / "b.json", decisions, "k")
    with env(TUNEVAULT_BUNDLE_KEY=""):
        for argv in (("import", str(bundle)), ("diff", str(bundle), str(bundle))):
            code, _, err = cli("--store", "memory://", *argv)
            assert code == 2 and "set but empty" in err, err
    found = run_py("import json, tunevault, kernels_hostile as kh\n"
                   "print(json.dumps({'installed': tunevault.installed()}))",
                   TUNEVAULT_MODE="tune", TUNEVAULT_BUNDLE_KEY="")
    assert found == {"installed": False}, "a bad variable leaves tunevault off, with a warning"


def test_with_a_key_an_unsigned_file_is_refused_everywhere(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                           decisions: list[Any]) -> None:
    signed = write_bundle_text(tmp_path / "signed.json", decisions, "k")
    stripped = json.loads(signed.read_text())
    del stripped["signature"]  # a downgrade: the signature simply removed
    stripped["decisions"][0]["config_index"] = 2
    plain = tmp_path / "stripped.json"
    plain.write_text(json.dumps(stripped))
    with env(TUNEVAULT_BUNDLE_KEY="k"):
        code, _, err = cli("--store", f"sqlite:///{tmp_path / 'i.db'}", "import", str(plain))
        assert code == 2 and "is not signed" in err
        assert cli("--store", f"sqlite:///{tmp_path / 'i.db'}", "import", str(signed))[0] == 0
    serve(tmp_path, bundles=str(plain), bundle_key="k")
    errors = messages(caplog, logging.ERROR)
    assert len(errors) == 1 and "is not signed" in errors[0]


@pytest.mark.parametrize("sink", ["events", "capture"])
def test_sink_that_is_a_fifo_is_refused_with_one_warning(tmp_path: Path, sink: str) -> None:
    """A FIFO with no reader: the first tuning (events) and the exit flush (capture) used to block."""
    path = fifo(tmp_path / f"{sink}.fifo")
    code = ("import json, logging, tunevault, kernels_hostile as kh\n"
            "seen = []\n"
            "class H(logging.Handler):\n"
            "    def emit(self, r): seen.append(r.getMessage())\n"
            "logging.getLogger('tunevault').addHandler(H(logging.WARNING))\n"
            f"tunevault.install(mode='tune', store='memory://', {sink}={str(path)!r})\n"
            "for n in kh.SIZES: kh.call_checked(kh.add_one, n)\n"
            "tunevault.uninstall()  # the capture's final flush\n"
            "print(json.dumps(seen))")
    warnings = run_py(code, timeout=120)
    assert len(warnings) == 1 and str(path) in warnings[0] and "FIFO" in warnings[0], warnings


def test_events_to_dev_full_never_fail_a_call(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    serve(tmp_path, events="/dev/full")
    assert any("/dev/full" in m for m in messages(caplog)), "one warning naming the path"


def test_stored_time_out_of_range_is_a_corrupt_entry_not_a_crash(tmp_path: Path, decisions: list[Any]) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = SqliteStore(tmp_path / "s.db")
    store.put(decisions[0])
    store.close()
    doc = decisions[0].to_json()
    doc["provenance"]["time"] = 1e300
    with sqlite3.connect(tmp_path / "s.db") as db:
        db.execute("UPDATE decisions SET payload = ?", (json.dumps(doc),))
    for argv in (("ls",), ("show", "add_one"), ("ls", "--json")):
        code, out, _ = cli("--store", url, *argv)
        assert code in (0, 1) and "1e+300" not in out
    export = tmp_path / "e.json"
    export.write_text(json.dumps({"format": "tunevault-decisions", "schema": 1, "decisions": [doc]}))
    code, out, _ = cli("--store", f"sqlite:///{tmp_path / 'i.db'}", "import", str(export), "--json")
    assert code == 1 and "provenance.time" in json.loads(out)["rejections"][0]["reason"]
    tunevault.install(mode="tune", store=url)
    kh.call_checked(kh.add_one, kh.SIZES[0])  # a miss: tuned again, and the row healed
    assert SqliteStore(tmp_path / "s.db").get(*decisions[0].store_key) is not None


UNCLOSED = {  # ~4 MB each, built in the subprocess; the old pre-check restarted a failed string
    # match at every later quote, taking quadratic time
    "escaped quotes": """'["' + '\\\\"' * 2_000_000""",
    "escaped quotes, then a lone backslash": """'{"k": "' + '\\\\"' * 2_000_000 + '\\\\'""",
    "brackets in the open string": """'["' + '\\\\"[' * 1_400_000""",
}


@pytest.mark.parametrize("name", sorted(UNCLOSED))
def test_an_unclosed_string_of_escaped_quotes_is_refused_promptly(name: str) -> None:
    """A bundle, manifest line or stored row that opens a string and never closes it is refused
    as not JSON; the pre-check scans it once (a subprocess, so a quadratic scan trips the timeout)."""
    code = ("import json; from tunevault.core.untrusted import loads, Refused\n"
            f"text = {UNCLOSED[name]}\n"
            "assert len(text) > 4_000_000 and text.count('\"') > 1_000_000\n"
            "try:\n    loads(text, what='line'); print(json.dumps('parsed'))\n"
            "except Refused as exc:\n    print(json.dumps(str(exc)))")
    assert run_py(code, timeout=60).startswith("line is not JSON")
