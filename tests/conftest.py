"""Shared test harness: real Triton kernels under the interpreter, real SQLite, real processes."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere
os.environ.setdefault("TUNEVAULT_CPU_BENCH_REPS", "3")

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A new, empty store that exists: the reading commands (ls, info, ...) refuse a path with no store."""
    from tunevault.store.base import open_store

    url = f"sqlite:///{tmp_path / 'tune.db'}"
    open_store(url).close()
    return url


@pytest.fixture
def tv(sqlite_url: str) -> Iterator[Any]:
    """tunevault installed in tune mode on a fresh SQLite store; uninstalled afterwards."""
    import tunevault

    tunevault.install(mode="tune", store=sqlite_url)
    yield tunevault
    tunevault.uninstall()


@pytest.fixture(autouse=True)
def _always_uninstall() -> Iterator[None]:
    yield
    import tunevault

    tunevault.uninstall()


class LaunchCounter:
    """Counts executions of a kernel below the autotuner (the JIT function's own ``run``)."""

    def __init__(self) -> None:
        self.count = 0


@contextlib.contextmanager
def observe_launches(autotuner: Any, observe: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """``observe(kwargs)`` for every execution below the autotuner (the JIT function's own ``run``)."""
    fn = autotuner.fn
    while type(fn).__name__ in ("Heuristics", "Autotuner"):
        fn = fn.fn
    original = fn.run
    had_own = "run" in fn.__dict__  # Triton 3.4's InterpretedFunction sets run per instance

    def observed_run(*args: Any, **kwargs: Any) -> Any:
        observe(kwargs)
        return original(*args, **kwargs)

    fn.run = observed_run
    try:
        yield
    finally:
        if had_own:
            fn.run = original
        else:
            del fn.run  # drop the instance attribute: the class method shows through again


@contextlib.contextmanager
def count_launches(autotuner: Any) -> Iterator[LaunchCounter]:
    counter = LaunchCounter()

    def count(kwargs: dict[str, Any]) -> None:
        counter.count += 1

    with observe_launches(autotuner, count):
        yield counter


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEVAULT_")}
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def gone(pid: int) -> bool:
    """The process ``pid`` has exited (and no other took its number since)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def run_py(code: str, timeout: float = 240, **env: str) -> Any:
    """Run ``code`` in a fresh interpreter; it must print one JSON document as its last line."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(**env))
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def in_fork(child: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``child()``'s JSON-safe result, run in a forked copy of this process (threads and all state
    as a server's ``os.fork()`` leaves them); an exception comes back as ``{"error": ...}``."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read)
            try:
                out = child()
            except BaseException as exc:
                out = {"error": repr(exc)}
            os.write(write, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def in_fork_while_held(locks: Sequence[AbstractContextManager[object]],
                       child: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``in_fork(child)`` while another thread holds ``locks``, as a thread mid-tuning, mid-count or
    opening the store holds them when a server forks."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with contextlib.ExitStack() as stack:
            for lock in locks:
                stack.enter_context(lock)
            holding.set()
            release.wait(120)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(120)
        return in_fork(child)
    finally:
        release.set()
        holder.join()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "determinism: the one-winner-under-noise acceptance test (issue 11)")
