"""The isolated worker's lifecycle around a warmup: it learns the kernels' modules while the server
starts, and exits as soon as the warmup ends (real worker subprocesses throughout)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import kernels_engine as ke
import tunevault
from conftest import gone, subprocess_env
from tunevault.capture import manifest as mf
from tunevault.core.events import COUNTERS
from tunevault.core.model import TuningKey
from tunevault.engine import isolated

LEARNED = '''
import os
import triton
import triton.language as tl

if os.environ.get("TUNEVAULT_WORKER") == "1":  # the worker imported this module: say so
    open(os.path.join(os.environ["TV_TEST_GATE_DIR"], f"imported-{__name__}-{os.getpid()}"), "w").close()


@triton.autotune(configs=[triton.Config({"B": 16}), triton.Config({"B": 32})], key=["n"])
@triton.jit
def kernel(x, n, B: tl.constexpr):
    tl.store(x + tl.arange(0, B), 0.0)
'''


def tune_in_worker(sqlite_url: str) -> int:
    tunevault.install(mode="tune", store=sqlite_url, isolate=True, prestart=False)
    x, y = torch.randn(64), torch.randn(64)
    assert torch.equal(ke.run_add(ke.add_equal, x, y), x + y)
    pid = isolated.worker_pid()
    assert pid is not None
    return pid


def test_seal_ends_the_warmup_and_the_idle_worker_with_it(sqlite_url: str) -> None:
    pid = tune_in_worker(sqlite_url)
    tunevault.seal()
    assert isolated.worker_pid() is None and gone(pid)  # not TUNEVAULT_WORKER_IDLE seconds later


def test_installing_again_without_isolation_ends_the_idle_worker(sqlite_url: str) -> None:
    """``install(isolate=False)`` after ``install(isolate=True)`` left the worker (and, on a GPU, its
    CUDA context) alive until its idle timeout, though nothing would use it any more."""
    pid = tune_in_worker(sqlite_url)
    tunevault.install(mode="tune", store=sqlite_url, on_miss="background", prestart=False)
    assert isolated.worker_pid() == pid  # background tuning still uses it
    tunevault.install(mode="tune", store=sqlite_url, isolate=False)
    assert isolated.worker_pid() is None and gone(pid)
    x, y = torch.randn(65), torch.randn(65)
    assert torch.equal(ke.run_add(ke.add_equal, x, y), x + y)  # tuned in this process
    assert isolated.worker_pid() is None


def test_a_worker_busy_at_the_seal_exits_when_its_session_ends(sqlite_url: str,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setenv(ke.GATE_DIR_VAR, str(tmp_path))  # add_gated's config 0 waits for the gate, in the worker
    tunevault.install(mode="tune", store=sqlite_url, isolate=True, prestart=False)
    x, y = torch.randn(64), torch.randn(64)
    tuning = threading.Thread(target=ke.run_add, args=(ke.add_gated, x, y))
    tuning.start()
    while isolated.worker_pid() is None or not isolated._worker.opened:  # type: ignore[union-attr]
        time.sleep(0.02)
    pid = isolated.worker_pid()
    tunevault.seal()
    assert isolated.worker_pid() == pid  # a session is open: the seal does not cut it short
    Path(ke.gate_path()).touch()
    tuning.join(timeout=120)
    assert isolated.worker_pid() is None and gone(pid)  # gone with the session's end


def test_warmup_from_a_manifest_ends_with_the_worker_gone(sqlite_url: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys.jsonl"
    with tunevault.capture(keys):
        tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'first.db'}")
        ke.run_add(ke.add_equal, torch.randn(80), torch.randn(80))
    tunevault.install(mode="tune", store=sqlite_url, isolate=True, prestart=False)
    report = tunevault.warmup(keys)
    assert report.counts()["tuned"] == 1
    assert isolated.worker_pid() is None


SLOW_IMPORT = '''
import os
import time

if os.environ.get("TUNEVAULT_WORKER") != "1":  # the server's import of a large library takes seconds
    time.sleep(1.5)
'''


@pytest.fixture(params=["quick", "slow"])
def learned(request: pytest.FixtureRequest, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A fresh kernel module on sys.path (so also on the worker's), and where the worker says it imported it.
    "slow": the server's import takes long enough for the worker's watch to see it half done."""
    name = f"learned_{os.getpid()}_{time.monotonic_ns()}"
    (tmp_path / f"{name}.py").write_text((SLOW_IMPORT if request.param == "slow" else "") + LEARNED)
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv(ke.GATE_DIR_VAR, str(marks))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marks
    sys.modules.pop(name, None)


def imported_by(marks: Path, name: str, limit: float = 120.0) -> list[int]:
    """Pids of the processes that imported ``name`` as a worker (waits for the first, at most ``limit``)."""
    end = time.monotonic() + limit
    while not list(marks.glob(f"imported-{name}-*")) and time.monotonic() < end:
        time.sleep(0.05)
    return [int(p.name.rsplit("-", 1)[1]) for p in marks.glob(f"imported-{name}-*")]


def test_the_prestarted_worker_imports_kernel_modules_as_the_server_imports_them(
        sqlite_url: str, learned: tuple[str, Path]) -> None:
    import importlib

    name, marks = learned
    tunevault.install(mode="tune", store=sqlite_url, isolate=True)  # prestarts the worker
    importlib.import_module(name)  # the server goes on starting: it imports a library with kernels
    pids = imported_by(marks, name)
    assert pids == [isolated.worker_pid()] and os.getpid() not in pids
    zeros = dict.fromkeys(COUNTERS, 0)  # before any key was tuned: both phases, every counter 0
    assert tunevault.stats()["kernels"] == {"total": {"warmup": zeros, "serving": zeros}}


def test_the_prestarted_worker_imports_the_modules_a_manifest_names(
        sqlite_url: str, learned: tuple[str, Path], tmp_path: Path) -> None:
    name, marks = learned
    keys = tmp_path / "earlier-run.jsonl"
    mf.append(keys, [mf.line(f"{name}:kernel", TuningKey((("n", 16),)), {"hit": 1}, 0.0, 0.0, 1, "host")])
    tunevault.install(mode="tune", store=sqlite_url, isolate=True, capture=str(keys))
    pids = imported_by(marks, name)
    assert pids == [isolated.worker_pid()] and name not in sys.modules  # the server never imported it


def test_the_prestarted_worker_imports_no_manifest_module_the_allow_list_refuses(
        sqlite_url: str, learned: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest is untrusted: with ``$TUNEVAULT_ALLOW_MODULES`` set, the worker imported every
    module it named anyway (the server itself refuses those), running their code."""
    name, marks = learned
    other = f"{name}_allowed"
    (tmp_path / f"{other}.py").write_text(LEARNED)
    keys = tmp_path / "earlier-run.jsonl"
    mf.append(keys, [mf.line(f"{mod}:kernel", TuningKey((("n", 16),)), {"hit": 1}, 0.0, 0.0, 1, "host")
                     for mod in (name, other)])
    monkeypatch.setenv("TUNEVAULT_ALLOW_MODULES", other)
    tunevault.install(mode="tune", store=sqlite_url, isolate=True, capture=str(keys))
    assert imported_by(marks, other) == [isolated.worker_pid()]  # the hints were sent, in order
    assert imported_by(marks, name, limit=0.0) == []
    sys.modules.pop(other, None)


def test_the_prestarted_worker_imports_no_module_of_a_manifest_the_installed_key_refuses(
        sqlite_url: str, learned: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``install(bundle_key=...)`` (no ``$TUNEVAULT_BUNDLE_KEY``) the server refuses an unsigned
    manifest, but the worker read it without a key and imported the modules it named."""
    import importlib

    name, marks = learned
    other = f"{name}_imported"
    (tmp_path / f"{other}.py").write_text(LEARNED)
    keys = tmp_path / "earlier-run.jsonl"
    mf.append(keys, [mf.line(f"{name}:kernel", TuningKey((("n", 16),)), {"hit": 1}, 0.0, 0.0, 1, "host")])
    monkeypatch.delenv("TUNEVAULT_BUNDLE_KEY", raising=False)
    tunevault.install(mode="tune", store=sqlite_url, isolate=True, capture=str(keys), bundle_key="s3cret-key")
    importlib.import_module(other)  # learned after the manifest's hints were sent, so imported after them
    assert imported_by(marks, other) == [isolated.worker_pid()]
    assert imported_by(marks, name, limit=0.0) == []
    sys.modules.pop(other, None)


def test_a_manifest_module_that_raises_system_exit_at_import_leaves_the_prestarted_worker_running(
        sqlite_url: str, learned: tuple[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SystemExit from a hinted import ended the worker (it caught Exception only); the server then
    logged that it "stalled importing" a module "the server imported", and tuned in process."""
    import importlib

    name, marks = learned
    exits = f"{name}_exits"
    (tmp_path / f"{exits}.py").write_text(LEARNED + "\nif os.environ.get('TUNEVAULT_WORKER') == '1':\n"
                                          "    raise SystemExit(3)\n")
    keys = tmp_path / "earlier-run.jsonl"
    mf.append(keys, [mf.line(f"{exits}:kernel", TuningKey((("n", 16),)), {"hit": 1}, 0.0, 0.0, 1, "host")])
    tunevault.install(mode="tune", store=sqlite_url, isolate=True, capture=str(keys))
    pids = imported_by(marks, exits)
    importlib.import_module(name)  # learned after the manifest's hint: imported by the same worker
    assert imported_by(marks, name) == pids == [isolated.worker_pid()]
    assert not [r for r in caplog.records if "importing" in r.getMessage()]


SETS_TRITON_VAR = '''
import os

os.environ["TRITON_TV_TEST_SET_AT_IMPORT"] = "ieee"  # as flash-linear-attention sets TRITON_F32_DEFAULT
'''


def test_a_library_that_sets_a_triton_variable_at_import_keeps_the_prestarted_worker(
        sqlite_url: str, learned: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's import set a TRITON_* variable after the worker started; the worker imported the
    same library and set it too, so it tunes the first key (it was replaced, and the first key of an
    H200 run waited 19 s for a fresh worker to import flash-linear-attention again)."""
    import importlib

    name, marks = learned
    source = marks.parent / f"{name}.py"
    source.write_text(SETS_TRITON_VAR + source.read_text())
    monkeypatch.delenv("TRITON_TV_TEST_SET_AT_IMPORT", raising=False)  # gone again after the test
    tunevault.install(mode="tune", store=sqlite_url, isolate=True)  # prestarts the worker
    module = importlib.import_module(name)
    assert os.environ["TRITON_TV_TEST_SET_AT_IMPORT"] == "ieee"
    (prestarted,) = imported_by(marks, name)
    x = torch.zeros(32)
    module.kernel[(1,)](x, 16)
    (decision,) = tunevault.integration.triton_adapter.runtime().used.values()
    assert dict(decision.provenance)["tuned_in"] == "worker"
    assert isolated.worker_pid() == prestarted  # the same worker


def test_a_fork_leaves_the_parents_worker_to_the_parent_and_the_child_tunes_in_its_own(sqlite_url: str) -> None:
    """A fork while a thread holds the isolated engine (a tuning) copies its lock held by nobody
    there: every isolated tuning of the child waited until its deadline. And the child's copy of
    the worker's input kept the parent's worker from seeing its input close."""
    from conftest import in_fork_while_held

    parent_worker = tune_in_worker(sqlite_url)
    w = isolated._worker
    assert w is not None

    def child() -> dict[str, object]:
        started = time.monotonic()
        x, y = torch.randn(96), torch.randn(96)  # another key: tuned in a worker of the child's own
        right = bool(torch.equal(ke.run_add(ke.add_equal, x, y), x + y))
        mine = isolated.worker_pid()
        return {"right": right, "own_worker": mine not in (None, parent_worker),
                "waited_for_the_deadline": time.monotonic() - started > 60}

    seen = in_fork_while_held([isolated._lock], child)
    assert seen == {"right": True, "own_worker": True, "waited_for_the_deadline": False}

    child_pid = os.fork()  # a child that lives on while the parent closes its worker
    if child_pid == 0:
        time.sleep(30)
        os._exit(0)
    try:
        isolated.retire()  # end of input: the worker exits by itself, not killed after 3 s
        assert w.proc.returncode == 0 and gone(parent_worker)
    finally:
        os.kill(child_pid, 9)
        os.waitpid(child_pid, 0)


def test_a_directory_appended_to_sys_path_is_told_to_the_worker_not_a_reason_to_replace_it(
        sqlite_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A library appending its directory to sys.path while the server runs replaced the worker at
    every later key (about 5 s each on a GPU host): its PYTHONPATH was compared as a whole. The worker
    now appends the new entries and imports a kernel module from them; an entry put first still
    replaces it, since modules it imported may resolve differently there."""
    import importlib

    name, library, marks = f"appended_{os.getpid()}_{time.monotonic_ns()}", tmp_path / "library", tmp_path / "marks"
    library.mkdir()
    marks.mkdir()
    (library / f"{name}.py").write_text(LEARNED)
    monkeypatch.setenv(ke.GATE_DIR_VAR, str(marks))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the original list comes back after the test
    monkeypatch.delitem(sys.modules, name, raising=False)
    pid = tune_in_worker(sqlite_url)
    for n in (301, 302):
        (tmp_path / f"plugin{n}").mkdir()
        sys.path.append(str(tmp_path / f"plugin{n}"))
        x, y = torch.randn(n), torch.randn(n)
        assert torch.equal(ke.run_add(ke.add_equal, x, y), x + y)
        assert isolated.worker_pid() == pid
    sys.path.append(str(library))  # a kernel module the worker can only find in the new entry
    importlib.import_module(name).kernel[(1,)](torch.zeros(32), 16)
    assert imported_by(marks, name) == [pid]
    tuned_in = {dict(d.provenance)["tuned_in"] for d in tunevault.integration.triton_adapter.runtime().used.values()}
    assert tuned_in == {"worker"}

    sys.path.insert(0, str(tmp_path / "plugin301"))  # moved before the others: a fresh worker
    x, y = torch.randn(303), torch.randn(303)
    assert torch.equal(ke.run_add(ke.add_equal, x, y), x + y)
    assert isolated.worker_pid() not in (None, pid)


KILLED_SERVER = """
import sys, threading, time
import torch
import kernels_engine as ke
import tunevault
from tunevault.engine import isolated

tunevault.install(mode="tune", store=sys.argv[1], isolate=True, prestart=False, config_timeout=600,
                  tune_timeout=900)
threading.Thread(target=ke.run_add, args=(ke.add_hang, torch.randn(64), torch.randn(64)), daemon=True).start()
while isolated._worker is None or not isolated._worker.opened:
    time.sleep(0.05)
print(isolated._worker.pid, flush=True)
time.sleep(600)
"""


def running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (an orphan's zombie waits for whoever adopted it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_a_worker_busy_in_a_hung_config_exits_when_its_server_is_killed(sqlite_url: str, tmp_path: Path) -> None:
    """The worker reads its input only between requests, and runs in a session of its own: a
    server killed outright while a config hung in it left it running for good (holding its CUDA
    context on a GPU). It watches its parent and exits."""
    server = subprocess.Popen([sys.executable, "-c", KILLED_SERVER, sqlite_url], stdout=subprocess.PIPE,
                              text=True, env=subprocess_env(**{ke.GATE_DIR_VAR: str(tmp_path)}))
    assert server.stdout is not None
    worker = int(server.stdout.readline())
    try:
        while not (tmp_path / "hanging").exists():  # the config hangs: the worker reads no input now
            assert running(worker)
            time.sleep(0.05)
        server.kill()
        server.wait()
        deadline = time.monotonic() + 60  # generous: it exits within about a second
        while running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(worker)
    finally:
        server.kill()
        server.wait()
        if running(worker):
            os.killpg(worker, signal.SIGKILL)


def test_a_worker_that_exits_when_idle_leaves_no_zombie(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that exits on its idle timeout was reaped only at the next tuning or at exit: it
    stayed a zombie meanwhile."""
    monkeypatch.setenv("TUNEVAULT_WORKER_IDLE", "1")
    pid = tune_in_worker(sqlite_url)
    deadline = time.monotonic() + 60  # it idles out after 1 s
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}")  # reaped, not a zombie


def test_an_allow_list_set_after_the_worker_started_keeps_the_worker(sqlite_url: str) -> None:
    """``warmup --allow-module`` sets ``$TUNEVAULT_ALLOW_MODULES`` after install() prestarted the
    worker: that replaced it (a fresh start, 19 s on an H200 with a large library), though the
    worker never reads the variable."""
    from tunevault.capture.locate import allow_modules

    pid = tune_in_worker(sqlite_url)
    with allow_modules(["kernels_engine"]):
        x, y = torch.randn(96), torch.randn(96)
        assert torch.equal(ke.run_add(ke.add_equal, x, y), x + y)
        assert isolated.worker_pid() == pid
