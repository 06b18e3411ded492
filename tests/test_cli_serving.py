"""``tunevault check`` and ``warmup`` as a new user runs them: from the application's folder, with no GPU."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import subprocess_env
from tunevault.cli.main import main
from tunevault.store.base import open_store

APP_MODULE = "tv_app_kernels"  # the application's own kernels, importable only from its folder
APP_SOURCE = '''
import triton
import triton.language as tl


@triton.autotune(configs=[triton.Config({"BLOCK": 32}), triton.Config({"BLOCK": 64})], key=["n"])
@triton.jit
def twice(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)


def run(x):
    import torch

    out = torch.empty_like(x)
    twice[lambda meta: (triton.cdiv(x.numel(), meta["BLOCK"]),)](x, out, x.numel())
    return out
'''


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An application folder with a kernel module and the manifest its traffic captured."""
    import tunevault

    folder = tmp_path_factory.mktemp("app")
    (folder / f"{APP_MODULE}.py").write_text(APP_SOURCE)
    sys.path.insert(0, str(folder))
    try:
        module = __import__(APP_MODULE)
        tunevault.install(mode="tune", store="memory://")
        with tunevault.capture(folder / "keys.jsonl"):
            x = torch.arange(40, dtype=torch.float32)
            torch.testing.assert_close(module.run(x), 2 * x)
        tunevault.uninstall()
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(APP_MODULE, None)
    yield folder


@pytest.fixture
def fresh_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI edits sys.path as a fresh process would; undo that and forget the app's module."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, APP_MODULE, raising=False)
    yield
    sys.modules.pop(APP_MODULE, None)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def tunevault_script(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """The installed console script (not ``python -m``, which would put the folder on the path itself),
    with no TRITON_INTERPRET: the command must notice there is no GPU."""
    script = shutil.which("tunevault", path=os.path.dirname(sys.executable)) or shutil.which("tunevault")
    assert script, "the tunevault console script is not installed"
    env = subprocess_env()
    env.pop("TRITON_INTERPRET")
    env["PYTHONPATH"] = os.pathsep.join(p for p in env["PYTHONPATH"].split(os.pathsep) if p)
    return subprocess.run([script, *argv], cwd=cwd, capture_output=True, text=True, timeout=240, env=env)


def test_warmup_then_check_from_the_app_folder_without_a_gpu(app: Path, tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'tv.db'}"
    warm = tunevault_script(app, "--store", store, "warmup", "keys.jsonl")
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert "1 tuned, 0 already decided, 0 skipped, 0 failed" in warm.stdout
    assert warm.stderr.count(f"[INFO] tunevault: tuned {APP_MODULE}:twice [n=40") == 1  # as install() logs it
    check = tunevault_script(app, "--store", store, "check", "keys.jsonl", "--json")
    assert check.returncode == 0, check.stdout + check.stderr
    result = json.loads(check.stdout)
    assert result["ok"] and result["decided"] == 1 and result["fingerprint"]["target"] == "interpreter"


def test_a_kernel_module_not_found_says_how_to_fix_it(app: Path, tmp_path: Path, capsys: Any,
                                                     monkeypatch: pytest.MonkeyPatch, fresh_imports: None) -> None:
    store = f"sqlite:///{tmp_path / 'tv.db'}"
    open_store(store).close()  # check reads a store; it does not create one
    monkeypatch.chdir(tmp_path)  # not the application's folder
    code, out, err = run(capsys, "--store", store, "check", str(app / "keys.jsonl"))
    assert code == 1 and "ModuleNotFoundError" in out
    assert f"hint: no module named {APP_MODULE}" in err and "--path DIR" in err

    code, out, err = run(capsys, "--store", store, "warmup", str(app / "keys.jsonl"), "--path", str(app))
    assert code == 0, out + err
    assert "1 tuned" in out and "hint" not in err


def test_manifest_without_a_valid_key_fails_with_line_numbers(app: Path, tmp_path: Path, capsys: Any,
                                                             fresh_imports: None) -> None:
    store = f"sqlite:///{tmp_path / 'tv.db'}"
    open_store(store).close()  # check reads a store; it does not create one
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for command in ("check", "warmup"):
        code, _, err = run(capsys, "--store", store, command, str(empty))
        assert code == 2 and "holds no captured key" in err and "it is empty" in err

    other = tmp_path / "events.jsonl"  # JSON lines, but not a manifest
    other.write_text('{"event": "seal"}\n\n{"event": "tuning"}\nnot json\n')
    code, _, err = run(capsys, "--store", store, "check", str(other))
    assert code == 2 and "3 malformed line(s), no valid one" in err
    assert f"{other}:1: not a tunevault manifest line" in err and f"{other}:4: " in err

    mixed = tmp_path / "mixed.jsonl"
    good = (app / "keys.jsonl").read_text().splitlines()[0]
    mixed.write_text(f"{good}\n{{\"truncated\": \n")
    code, out, err = run(capsys, "--store", store, "check", str(mixed), "--path", str(app), "--json")
    result = json.loads(out)
    assert code == 1 and result["ok"] is False and result["keys"] == 1
    assert [m["line"] for m in result["malformed"]] == [2]
    code, out, err = run(capsys, "--store", store, "check", str(mixed), "--path", str(app))
    assert code == 1 and f"{mixed}:2: " in err and "0/1 keys decided" in out


def test_check_against_a_store_that_cannot_be_read_is_exit_2_not_keys_missing(
        app: Path, capsys: Any, fresh_imports: None) -> None:
    """A deploy gate must tell "store down" from "keys missing": it said "0/1 keys decided; run warmup", exit 1."""
    import tunevault

    down = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    for extra in ((), ("--json",)):
        code, out, err = run(capsys, "--store", down, "check", str(app / "keys.jsonl"), "--path", str(app), *extra)
        assert code == 2 and out == "" and "run `tunevault warmup" not in err
        assert err.strip().splitlines() == [err.strip()]
        assert err.startswith(f"tunevault check: error: the store {down} cannot be read, so no key was checked: ")
    sys.path.insert(0, str(app))
    try:
        result = tunevault.check(app / "keys.jsonl", store=down)
    finally:
        sys.path.remove(str(app))
    assert not result.ok and result.store_error and result.to_json()["store_error"] == result.store_error


def test_checks_missing_hint_repeats_the_store_and_import_options(app: Path, tmp_path: Path, capsys: Any,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 fresh_imports: None) -> None:
    """The hint said `tunevault warmup M` without --store: run as printed, it warmed the default store."""
    import shlex

    folder = tmp_path / "a store"  # a space: the hint must be quoted for a shell
    folder.mkdir()
    store = f"sqlite:///{folder / 'prod.db'}"
    open_store(store).close()
    monkeypatch.chdir(tmp_path)  # not the application's folder: --path is needed
    manifest = str(app / "keys.jsonl")
    code, out, _ = run(capsys, "--store", store, "check", manifest, "--path", str(app),
                       "--allow-module", APP_MODULE)
    assert code == 1
    hint = out.strip().splitlines()[-1].split("run `", 1)[1].rstrip("`")
    argv = shlex.split(hint)
    assert argv == ["tunevault", "--store", store, "warmup", manifest, "--path", str(app),
                    "--allow-module", APP_MODULE]
    code, out, err = run(capsys, *argv[1:])  # the hint, run as printed, fills the store check reads
    assert code == 0 and "1 tuned" in out, out + err
    code, out, _ = run(capsys, "--store", store, "check", manifest, "--path", str(app))
    assert code == 0 and "1/1 keys decided" in out


KNOB_MODULE = '''
import triton
import triton.language as tl

triton.knobs.language.fp32_default = "ieee"  # the library configures Triton as it is imported


@triton.autotune(configs=[triton.Config({"BLOCK": b}) for b in (16, 32)], key=["n"])
@triton.jit
def addk(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)
'''

KNOB_CAPTURE = """
import sys, torch, triton, tunevault
tunevault.install(mode="tune", store="memory://", capture=sys.argv[1])
import tv_knob_kernels as k
x = torch.randn(100)
k.addk[lambda m: (triton.cdiv(100, m["BLOCK"]),)](x, torch.empty_like(x), 100)
"""


def test_check_reads_the_fingerprint_a_kernel_library_sets_at_import(tmp_path: Path) -> None:
    """check computed this machine's fingerprint before it imported the kernels' modules: with a
    library that sets a codegen knob at import, it called keys missing that warmup had just stored
    (and that the server found)."""
    (tmp_path / "tv_knob_kernels.py").write_text(KNOB_MODULE)
    env = subprocess_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{subprocess_env()['PYTHONPATH']}")
    manifest, store = tmp_path / "keys.jsonl", f"sqlite:///{tmp_path / 'tv.db'}"
    subprocess.run([sys.executable, "-c", KNOB_CAPTURE, str(manifest)], check=True, env=env, timeout=240)
    cli = [sys.executable, "-m", "tunevault.cli.main", "--store", store]
    warm = subprocess.run([*cli, "warmup", str(manifest)], capture_output=True, text=True, env=env, timeout=240)
    assert warm.returncode == 0, warm.stderr
    checked = subprocess.run([*cli, "check", str(manifest)], capture_output=True, text=True, env=env, timeout=240)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("forge", ["num_warps=0", "config_index", "extra kwarg"])
def test_a_stored_config_the_kernel_does_not_declare_is_not_decided_and_warmup_replaces_it(
        app: Path, tmp_path: Path, forge: str) -> None:
    """Serving ignores such an entry (a miss: on_miss=error raises), so check must not count it and
    warmup must tune the key again, replacing the entry, rather than call it already decided."""
    db = tmp_path / "tv.db"
    store = f"sqlite:///{db}"
    assert tunevault_script(app, "--store", store, "warmup", "keys.jsonl").returncode == 0
    with sqlite3.connect(db) as conn:
        (payload,) = conn.execute("SELECT payload FROM decisions").fetchone()
        doc = json.loads(payload)
        if forge == "num_warps=0":
            doc["config"]["options"]["num_warps"] = 0
        elif forge == "config_index":
            doc["config_index"] = 10**9
        else:
            doc["config"]["kwargs"]["EVIL"] = 1
        conn.execute("UPDATE decisions SET payload = ?", (json.dumps(doc),))

    check = tunevault_script(app, "--store", store, "check", "keys.jsonl", "--json")
    assert check.returncode == 1, check.stdout + check.stderr
    (item,) = json.loads(check.stdout)["missing"]
    assert "stored config is not one the kernel declares" in item["reason"], item

    warm = tunevault_script(app, "--store", store, "warmup", "keys.jsonl")
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert "1 tuned, 0 already decided" in warm.stdout, warm.stdout
    check = tunevault_script(app, "--store", store, "check", "keys.jsonl", "--json")
    assert check.returncode == 0 and json.loads(check.stdout)["decided"] == 1, check.stdout + check.stderr
