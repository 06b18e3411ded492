"""Issue 14, breakages 7 and 8: a manifest is code, and its arguments are not to be trusted.

Signed manifests (capture signs with the bundle key; check and warmup refuse what does not
verify), ``--allow-module``, an import guard that survives ``SystemExit``, and arguments checked
against each other and a byte cap before anything is allocated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import kernels_hostile as kh
import tunevault
from conftest import subprocess_env
from hostile import cli, env

pytestmark = pytest.mark.timeout(240)
ALLOW = ("--allow-module", "kernels_hostile")


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A manifest captured from real calls, signed with key "k", and the store they were tuned into."""
    where = tmp_path_factory.mktemp("captured")
    url = f"sqlite:///{where / 'tuned.db'}"
    tunevault.install(mode="tune", store=url, capture=str(where / "keys.jsonl"), bundle_key="k")
    for n in kh.SIZES:
        kh.call_checked(kh.add_one, n)
    tunevault.uninstall()  # flushes the capture
    return where / "keys.jsonl", url


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(t) for t in path.read_text().splitlines() if t.strip()]


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((t if isinstance(t, str) else json.dumps(t)) + "\n" for t in lines))
    return path


def test_capture_signs_and_check_warmup_refuse_what_does_not_verify(tmp_path: Path,
                                                                     captured: tuple[Path, str]) -> None:
    manifest, url = captured
    lines = lines_of(manifest)
    assert len(lines) == len(kh.SIZES) and all(ln["signature"]["alg"] == "hmac-sha256" for ln in lines)
    with env(TUNEVAULT_BUNDLE_KEY="k"):
        assert cli("--store", url, "check", str(manifest), *ALLOW)[0] == 0
        tampered = dict(lines[0], kernel="this:s")
        unsigned = {k: v for k, v in lines[0].items() if k != "signature"}
        for name, bad in (("tampered", tampered), ("unsigned", unsigned)):
            path = write_lines(tmp_path / f"{name}.jsonl", [lines[1], bad])
            for command in ("check", "warmup"):
                code, out, err = cli("--store", url, command, str(path))
                assert code == 2 and "refusing the whole manifest" in err and ":2:" in err, err
                assert "Beautiful is better" not in out
    with env(TUNEVAULT_BUNDLE_KEY=None):  # no key: signatures are not checked
        assert cli("--store", url, "check", str(write_lines(tmp_path / "u.jsonl", [unsigned])))[0] == 0


def test_install_bundle_key_verifies_manifests_without_the_variable(tmp_path: Path, captured: tuple[Path, str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """install(bundle_key=...) signs captured lines, so warmup(), check() and TUNEVAULT_WARMUP verify with it
    too: an unsigned manifest naming a planted module is refused before anything is imported."""
    manifest, _url = captured
    (tmp_path / "planted2.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('planted code ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("TUNEVAULT_BUNDLE_KEY", raising=False)
    first = {k: v for k, v in lines_of(manifest)[0].items() if k != "signature"}
    path = write_lines(tmp_path / "m.jsonl", [first | {"kernel": "planted2:add_one"}])
    url = f"sqlite:///{tmp_path / 't.db'}"
    tunevault.install(mode="tune", store=url, bundle_key="k")
    for call in (tunevault.warmup, tunevault.check):
        with pytest.raises(ValueError, match="refusing the whole manifest"):
            call(str(path))
    tunevault.uninstall()
    tunevault.install(mode="tune", store=url, bundle_key="k", warmup=str(path))
    kh.call_checked(kh.add_one, kh.SIZES[0])  # the first miss starts TUNEVAULT_WARMUP's manifest
    tunevault.uninstall()
    assert not (tmp_path / "ran").exists()


def test_allow_module_keeps_a_manifest_from_importing_anything_else(tmp_path: Path, captured: tuple[Path, str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    manifest, url = captured
    (tmp_path / "planted.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('planted code ran')\n"
                                         "print('Beautiful is better than ugly.')\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # as the current folder is, under `python -m`
    first = lines_of(manifest)[0]
    planted = {k: v for k, v in first.items() if k != "signature"} | {"kernel": "planted:add_one"}
    zen = planted | {"kernel": "this:s"}
    path = write_lines(tmp_path / "m.jsonl", [planted, zen, {k: v for k, v in first.items() if k != "signature"}])
    for command in ("check", "warmup"):
        code, out, _ = cli("--store", url, command, str(path), *ALLOW, "--json")
        assert code == 1 and not (tmp_path / "ran").exists() and "Beautiful" not in out
        refused = {i["kernel"]: "not under an allowed prefix" in i["reason"] for i in json.loads(out)["items"]}
        assert refused == {"planted:add_one": True, "this:s": True, "kernels_hostile:add_one": False}, refused


def test_an_empty_allow_list_in_the_environment_imports_nothing(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``TUNEVAULT_ALLOW_MODULES=$PREFIX`` with PREFIX unset: tunevault.warmup(), check() and
    TUNEVAULT_WARMUP skip every line with the reason instead of importing any module."""
    from tunevault.capture.locate import KernelNotFound, import_autotuner

    (tmp_path / "planted3.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('planted code ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for value in ("", " , ", "planted3,"):
        monkeypatch.setenv("TUNEVAULT_ALLOW_MODULES", value)
        with pytest.raises(KernelNotFound, match="TUNEVAULT_ALLOW_MODULES needs comma-separated module prefixes"):
            import_autotuner("planted3:add_one")
    assert not (tmp_path / "ran").exists()


def test_system_exit_from_an_imported_module_does_not_end_warmup(tmp_path: Path, captured: tuple[Path, str]) -> None:
    manifest, url = captured
    first = {k: v for k, v in lines_of(manifest)[0].items() if k != "signature"}
    path = write_lines(tmp_path / "m.jsonl", [first | {"kernel": "unittest.__main__:x"}, first])
    proc = subprocess.run([sys.executable, "-m", "tunevault.cli.main", "--store", url, "warmup", str(path), "--json"],
                          capture_output=True, text=True, timeout=180, env=subprocess_env())
    assert proc.returncode == 1, proc.stderr  # a report, not an abort: one key skipped
    items = {i["kernel"]: i for i in json.loads(proc.stdout[proc.stdout.index("{"):])["items"]}
    exited = items["unittest.__main__:x"]
    assert exited["status"] == "skipped" and "SystemExit" in exited["reason"]
    assert items["kernels_hostile:add_one"]["status"] == "decided"


def callspec_line(captured: tuple[Path, str], edit: Any) -> dict[str, Any]:
    line = {k: v for k, v in lines_of(captured[0])[0].items() if k != "signature"}
    edit(line["callspec"])
    return line


def _huge(spec: dict[str, Any]) -> None:
    for arg in spec["args"][:2]:
        arg.update(shape=[1_200_000_000], stride=[1])  # 2 x 4.8 GB of float32 > the 8 GiB default cap


N_BEYOND = 1 << 40  # padding two tensors to it is far over the byte cap


def _n_beyond_buffers(spec: dict[str, Any], n: int = N_BEYOND) -> None:
    for arg in spec["args"][:2]:
        arg.update(shape=[16], stride=[1])
    spec["args"][2]["value"] = n


def _grid(spec: dict[str, Any]) -> None:
    spec["grids"] = [[1 << 30, 1, 1]] * 3


@pytest.mark.parametrize(("edit", "reason"), [(_huge, "byte cap"), (_n_beyond_buffers, "out of bounds"),
                                              (_grid, "programs")])
def test_arguments_that_cannot_be_real_are_skipped_with_the_reason(tmp_path: Path, captured: tuple[Path, str],
                                                                   edit: Any, reason: str) -> None:
    line = callspec_line(captured, edit)
    line["key"] = [["n", N_BEYOND] if k == "n" and edit is _n_beyond_buffers else [k, v] for k, v in line["key"]]
    path = write_lines(tmp_path / "m.jsonl", [line])
    with kh.launches(kh.add_one) as seen:
        code, out, _ = cli("--store", "memory://", "warmup", str(path), *ALLOW, "--json")
    (item,) = json.loads(out)["items"]
    assert code == 1 and item["status"] == "skipped" and reason in item["reason"], item
    assert seen.seen == [], "nothing launched"


def test_a_size_beyond_the_buffers_is_padded_for_when_the_cap_allows(tmp_path: Path, captured: tuple[Path, str],
                                                                       ) -> None:
    """n=10**6 with 16-element tensors (a forged size, or a value such as a pad id): every tensor is
    rebuilt with 10**6 elements behind it, so the kernel indexing up to n stays in memory."""
    from tunevault.capture.argspec import CallSpec
    from tunevault.capture.locate import import_autotuner

    line = callspec_line(captured, lambda spec: _n_beyond_buffers(spec, 10**6))
    assert CallSpec.from_json(line["callspec"]).check(import_autotuner(line["kernel"])) == 10**6
    line["key"] = [["n", 10**6] if k == "n" else [k, v] for k, v in line["key"]]
    path = write_lines(tmp_path / "m.jsonl", [line])
    with kh.launches(kh.add_one) as seen:
        code, out, _ = cli("--store", "memory://", "warmup", str(path), *ALLOW, "--json")
    (item,) = json.loads(out)["items"]
    assert code == 0 and item["status"] == "tuned", item
    assert seen.seen, "replayed"


@pytest.fixture(scope="module")
def captured_indexed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Unsigned manifest lines captured from genuine calls of ``gather`` (an index tensor) and
    ``shift`` (a runtime offset), by kernel."""
    where = tmp_path_factory.mktemp("indexed")
    tunevault.install(mode="tune", store="memory://", capture=str(where / "keys.jsonl"))
    kh.run_indexed(kh.SIZES[0])
    tunevault.uninstall()  # flushes the capture
    lines = {ln["kernel"]: ln for ln in lines_of(where / "keys.jsonl")}
    assert set(lines) == {"kernels_hostile:gather", "kernels_hostile:shift"} and not any(
        "signature" in ln for ln in lines.values())
    return lines


def _values(spec: dict[str, Any], value: int) -> None:
    spec["args"][2]["values"] = [value] * len(spec["args"][2]["values"])


def _index_range(spec: dict[str, Any]) -> None:
    idx = spec["args"][2]
    del idx["values"]
    idx.update(shape=[5000], low=1_000_000_000, high=2_000_000_000)  # too many values to keep: a range


def _offset(spec: dict[str, Any]) -> None:
    spec["args"][2]["value"] = -2_000_000_000


def warmup_in_a_child(path: Path) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """``tunevault warmup PATH --json`` in its own process: a kernel reading out of bounds crashes
    that process (a negative return code), never the test's."""
    proc = subprocess.run([sys.executable, "-m", "tunevault.cli.main", "--store", "memory://", "warmup", str(path),
                           *ALLOW, "--json"], capture_output=True, text=True, timeout=180, env=subprocess_env())
    assert proc.returncode in (0, 1), f"warmup exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc, json.loads(proc.stdout[proc.stdout.index("{"):])["items"]


@pytest.mark.parametrize(("kernel", "edit", "reason"), [
    ("gather", lambda spec: _values(spec, 2_000_000_000), "idx_ptr holding the index 2000000000 is larger than every"),
    ("gather", lambda spec: _values(spec, -2_000_000_000), "idx_ptr holding the index -2000000000 is negative past"),
    ("gather", _index_range, "idx_ptr holding the index 2000000000 is larger than every"),
    ("shift", _offset, "off=-2000000000 is negative past every tensor argument (64 elements at most)"),
], ids=["values", "negative-values", "range", "negative-offset"])
def test_unsigned_index_values_and_negative_integers_past_the_buffers_are_refused(
        tmp_path: Path, captured_indexed: dict[str, dict[str, Any]], kernel: str, edit: Any, reason: str) -> None:
    """A forged, unsigned line whose index tensor points (or whose offset reaches back) past every
    tensor: skipped with the reason, where the replayed kernel used to read out of bounds (SIGSEGV)."""
    line = json.loads(json.dumps(captured_indexed[f"kernels_hostile:{kernel}"]))
    edit(line["callspec"])
    proc, (item,) = warmup_in_a_child(write_lines(tmp_path / "m.jsonl", [line]))
    assert proc.returncode == 1 and item["status"] == "skipped" and reason in item["reason"], item
    assert "\n" not in item["reason"]


def test_index_values_past_the_buffers_are_padded_for_when_the_cap_allows(
        tmp_path: Path, captured_indexed: dict[str, dict[str, Any]]) -> None:
    """Index values up to 99999 with 64-element tensors: every tensor is rebuilt with 100000 elements
    behind it, so ``src[idx]`` stays in memory and the key is tuned; a signed line may hold a
    negative offset of any size (it is a call that really ran)."""
    from tunevault.capture.argspec import CallSpec
    from tunevault.capture.locate import import_autotuner
    from tunevault.core.model import InvalidEntry

    line = json.loads(json.dumps(captured_indexed["kernels_hostile:gather"]))
    _values(line["callspec"], 99_999)
    assert CallSpec.from_json(line["callspec"]).check(import_autotuner(line["kernel"])) == 100_000
    proc, (item,) = warmup_in_a_child(write_lines(tmp_path / "m.jsonl", [line]))
    assert proc.returncode == 0 and item["status"] == "tuned", item
    shifted = json.loads(json.dumps(captured_indexed["kernels_hostile:shift"]))
    _offset(shifted["callspec"])
    shift = import_autotuner(shifted["kernel"])
    assert CallSpec.from_json(shifted["callspec"], genuine=True).check(shift) == kh.SIZES[0]
    with pytest.raises(InvalidEntry, match="negative past"):
        CallSpec.from_json(shifted["callspec"]).check(shift)


def test_deeply_nested_or_overlong_lines_are_skipped_as_malformed(tmp_path: Path, captured: tuple[Path, str]) -> None:
    manifest, url = captured
    good = {k: v for k, v in lines_of(manifest)[0].items() if k != "signature"}
    deep = '{"format": "tunevault-manifest/1", "kernel": "m:k", "key": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = write_lines(tmp_path / "m.jsonl", [deep, good, "x" * 100, deep[:5000]])
    for command in ("check", "warmup"):
        code, out, _ = cli("--store", url, command, str(path), *ALLOW, "--json")
        result = json.loads(out)  # skipped, never a crash; a preflight then fails on the malformed lines
        assert code == 1 and len(result["items"]) == 1
        assert [m["line"] for m in result["malformed"]] == [1, 3, 4]


def test_a_manifest_past_the_total_cap_is_refused_unread(tmp_path: Path, captured: tuple[Path, str]) -> None:
    """Lines are capped at 16 MiB; the whole manifest (read into memory, as a bundle is) at 256 MiB.
    A sparse file stands in for a huge one: no disk is filled."""
    from tunevault.capture import manifest as mf

    manifest, url = captured
    huge = tmp_path / "huge.jsonl"
    huge.write_bytes(manifest.read_bytes())
    os.truncate(huge, (256 << 20) + 1)
    for command in ("check", "warmup"):
        code, _, err = cli("--store", url, command, str(huge), *ALLOW)
        assert code == 2 and "256 MiB" in err, err
    with pytest.raises(OSError, match="256 MiB"):  # capture stops there too, keeping its counts
        mf.append(huge, [manifest.read_text().splitlines(keepends=True)[0]])
    assert huge.stat().st_size == (256 << 20) + 1
