"""Activation by environment through the ``tunevault.pth`` startup hook, on real pip installs.

The project is installed both ways (``pip install .`` and ``pip install -e .``) into throwaway
virtual environments that see this interpreter's site-packages (torch, triton) as plain path
entries, so only the hook the install put there runs at startup. The "server" below is unmodified:
it never imports tunevault; it only counts launches below the autotuner to prove benchmarking.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from triton.runtime.autotuner import Autotuner

import kernels_core as kc
from conftest import TESTS, count_launches, subprocess_env

ROOT = TESTS.parent

SERVER = '''
import json, sys
import torch
import kernels_core as kc  # @triton.autotune kernels, defined after the startup hook ran
from conftest import count_launches  # test instrumentation only: counts launches below the autotuner

calls = []
for kernel in (kc.add_one, kc.add_one, kc.accumulate, kc.oversized):
    for n in (40, 48):
        x = kc.vec(n)
        out = torch.zeros_like(x)
        with count_launches(kernel) as launches:
            kernel[kc.grid(n)](x, out, n)
        expected = x if kernel is kc.accumulate else x + 1
        calls.append({"kernel": kernel.base_fn.__name__, "n": n, "launches": launches.count,
                      "ok": torch.equal(out, expected), "config": kc.decided(kernel)})
patched = sys.modules["triton.runtime.autotuner"]
print(json.dumps({"calls": calls, "loader": type(patched.__loader__).__name__,
                  "finders": [type(f).__name__ for f in sys.meta_path]}))
'''

PROBE = '''
import json, sys
print(json.dumps({"tunevault": "tunevault" in sys.modules, "triton": "triton" in sys.modules,
                  "torch": "torch" in sys.modules,
                  "pending": "tunevault.integration.activation" in sys.modules
                             and sys.modules["tunevault.integration.activation"].pending()}))
'''


def purelib(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    proc = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
    return Path(proc.stdout.strip())


def _venv(tmp: Path, project: Path, editable: bool) -> Path:
    """A virtual environment with the project installed, seeing our site-packages as plain paths."""
    venv = tmp / ("venv-editable" if editable else "venv-wheel")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # Plain path lines: the parent's packages import, but its .pth files (an older tunevault's) don't run.
    parents = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (purelib(python) / "parent_env.pth").write_text("\n".join(parents) + "\n")
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q"]
    try:
        import hatchling  # noqa: F401  (the build backend: build offline, without isolation)

        cmd += ["--no-build-isolation", "--no-index"]
    except ImportError:
        pass
    cmd += ["-e", str(project)] if editable else [str(project)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return python


@pytest.fixture(scope="module")
def venvs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("activation")
    project = tmp / "project"
    project.mkdir()
    shutil.copy(ROOT / "pyproject.toml", project)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    readme = ROOT / "README.md"
    # The metadata names a readme; the hook is what is under test here.
    (project / "README.md").write_text(readme.read_text() if readme.exists() else "tunevault\n")
    return {"wheel": _venv(tmp, project, False), "editable": _venv(tmp, project, True)}


def run_in(python: Path, code: str, **env: str) -> tuple[Any, str]:
    """Run ``code`` in the venv with only tests/ on PYTHONPATH; (last stdout line as JSON, stderr)."""
    full = subprocess_env(**env)
    full["PYTHONPATH"] = str(TESTS)
    proc = subprocess.run([str(python), "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_pip_install_adds_a_startup_hook_free_when_unset(venvs: dict[str, Path], kind: str) -> None:
    python = venvs[kind]
    hook = (purelib(python) / "tunevault.pth").read_text().strip().splitlines()
    assert len(hook) == 1 and hook[0].startswith("import os;")
    for env in ({}, {"TUNEVAULT_MODE": ""}, {"TUNEVAULT_MODE": "off"}):
        assert run_in(python, PROBE, **env)[0] == {"tunevault": False, "triton": False, "torch": False,
                                                   "pending": False}
    # Set: tunevault waits for Triton's autotuner instead of importing triton (or torch) at startup.
    assert run_in(python, PROBE, TUNEVAULT_MODE="tune")[0] == {"tunevault": True, "triton": False,
                                                               "torch": False, "pending": True}


def test_server_tunes_once_then_restarts_with_zero_benchmarks(venvs: dict[str, Path], tmp_path: Path) -> None:
    """`pip install -e .` then `TUNEVAULT_MODE=tune python my_server.py`, twice: no code change."""
    env = {"TUNEVAULT_MODE": "tune", "TUNEVAULT_STORE": f"sqlite:///{tmp_path / 'decisions.db'}"}
    first, err1 = run_in(venvs["editable"], SERVER, **env)
    assert all(c["ok"] for c in first["calls"])
    assert [c["launches"] > 1 for c in first["calls"]] == [True, True, False, False, True, True, True, True]
    tuned = [line for line in err1.splitlines() if "tunevault: tuned" in line]
    assert len(tuned) == 6 and all(line.startswith("[INFO]") for line in tuned), err1  # one line per tuning
    assert first["loader"] == "SourceFileLoader" and "_PatchOnImport" not in first["finders"]  # no trace

    second, err2 = run_in(venvs["editable"], SERVER, **env)
    assert all(c["ok"] for c in second["calls"])
    assert [c["launches"] for c in second["calls"]] == [1] * 8  # zero benchmark executions
    assert [c["config"] for c in second["calls"]] == [c["config"] for c in first["calls"]]
    assert "tunevault: tuned" not in err2


def test_first_mode_from_environment(venvs: dict[str, Path], tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    res, err = run_in(venvs["wheel"], SERVER, TUNEVAULT_MODE="first", TUNEVAULT_STORE=f"sqlite:///{db}")
    assert all(c["ok"] for c in res["calls"])
    # Never benchmarks: one launch per call (oversized's config #0 fails in its pre_hook, before any
    # launch; accumulate has reset_to_zero, so its config is tried once through the hooks, then launched).
    assert [c["launches"] for c in res["calls"]] == [1, 1, 1, 1, 2, 2, 1, 1]
    lines = [line for line in err.splitlines() if "[first]" in line]
    assert len(lines) == 3, err  # exactly one line per unique kernel
    assert "add_one: 3 candidate configs, picked #0" in lines[0]
    assert "oversized: 3 candidate configs, picked #1" in lines[2]
    assert not db.exists()  # nothing to store


@pytest.mark.parametrize("env, message", [
    ({"TUNEVAULT_MODE": "turbo"}, "turbo"),
    ({"TUNEVAULT_MODE": "tune", "TUNEVAULT_TOLERANCE": "lots"}, "lots"),
])
def test_bad_environment_warns_and_leaves_triton_stock(venvs: dict[str, Path], env: dict[str, str],
                                                       message: str) -> None:
    code = """
    import json
    from triton.runtime.autotuner import Autotuner
    print(json.dumps(Autotuner.run.__module__))
    """
    module, err = run_in(venvs["wheel"], code, **env)
    assert module == "triton.runtime.autotuner"
    assert "not activated" in err and message in err


def test_explicit_install_or_uninstall_overrides_a_pending_activation() -> None:
    code = """
    import json, sys
    import tunevault
    from tunevault.integration import activation
    out = {"active": activation.activate_from_env(), "triton": "triton" in sys.modules}
    tunevault.install(mode="tune", store="memory://")  # the application's own choice wins
    out["pending_after_install"] = activation.pending()
    from triton.runtime.autotuner import Autotuner
    from tunevault.integration.triton_adapter import runtime
    out["mode"] = runtime().settings.mode
    tunevault.uninstall()
    out["stock"] = Autotuner.run.__module__ == "triton.runtime.autotuner"
    print(json.dumps(out))
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=subprocess_env(TUNEVAULT_MODE="first"), timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"active": True, "triton": False,
                                                         "pending_after_install": False, "mode": "tune",
                                                         "stock": True}


def test_activation_covers_kernels_defined_before_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from tunevault.integration import activation

    assert "triton.runtime.autotuner" in sys.modules and kc.add_one  # defined at this module's import
    monkeypatch.setenv("TUNEVAULT_MODE", "tune")
    monkeypatch.setenv("TUNEVAULT_STORE", "memory://")
    log = logging.getLogger("tunevault")
    monkeypatch.setattr(log, "handlers", [])
    monkeypatch.setattr(log, "level", logging.NOTSET)
    assert activation.activate_from_env() is True and not activation.pending()
    assert activation.activate_from_env() is True  # idempotent (a second site dir's hook)
    assert Autotuner.run.__module__ == "tunevault.integration.triton_adapter"
    with count_launches(kc.add_one) as launches:
        assert torch.equal(kc.run_unary(kc.add_one, 40), kc.expected_unary(40))
    assert launches.count > 1


def test_startup_logging_prints_only_while_the_application_configured_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tunevault.integration.logs import show_logs

    log = logging.getLogger("tunevault")
    monkeypatch.setattr(log, "handlers", [])
    monkeypatch.setattr(log, "filters", [])
    monkeypatch.setattr(log, "level", logging.NOTSET)
    monkeypatch.setenv("TUNEVAULT_LOG_LEVEL", "warning")
    show_logs()
    (handler,) = log.handlers
    handler.stream = stream = io.StringIO()
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    log.warning("shown")
    log.info("below the level")
    monkeypatch.setattr(root, "handlers", [logging.NullHandler()])  # the application set logging up
    log.warning("left to the application's handlers")
    assert stream.getvalue() == "[WARNING] shown\n"


def test_a_misspelled_variable_is_one_warning_however_tunevault_is_switched_on() -> None:
    """Activation by ``TUNEVAULT_MODE`` (and the CLI) never looked for typos: ``TUNEVAULT_ONMISS=error``
    passed silently and the server tuned on every miss. ``install()`` afterwards does not warn again."""
    warning = ("[WARNING] tunevault: ignoring TUNEVAULT_ONMISS: tunevault reads no such variable; "
               "did you mean TUNEVAULT_ON_MISS?")
    code = """
    import sys
    import triton, tunevault
    print("--- activated", tunevault.installed(), file=sys.stderr, flush=True)
    tunevault.install(mode="tune", store="memory://")
    """
    env = subprocess_env(TUNEVAULT_MODE="tune", TUNEVAULT_STORE="memory://", TUNEVAULT_ONMISS="error")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [warning, "--- activated True"]
    cli = subprocess.run([sys.executable, "-m", "tunevault.cli.main", "--store", "memory://", "ls", "--json"],
                         capture_output=True, text=True, env=env, timeout=240)
    assert cli.returncode == 0 and json.loads(cli.stdout) == [], cli.stderr
    assert cli.stderr.splitlines() == [warning]
