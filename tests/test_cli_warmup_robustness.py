"""``tunevault warmup`` from the command line when things around it go wrong: a setup fixed between
runs, an unusable store, signals, GPUs that are not there, a manifest still growing, Ctrl-C.

Every test runs the real CLI in subprocesses on real SQLite files, with tests/kernels_shard.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import kernels_shard as ks
from conftest import gone, subprocess_env
from tunevault.store.base import open_store

SIZES = [64, 96, 128, 160]
CLI = [sys.executable, "-m", "tunevault.cli.main"]


def tv(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=180, cwd=cwd,
                          env=env or subprocess_env(TUNEVAULT_CPU_BENCH_REPS="3"))


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "keys.jsonl"
    ks.write_manifest(path, SIZES)
    return path


def wait_for(path: Path, procs: list[subprocess.Popen[str]]) -> None:
    """Until ``path`` exists (a kernel launch hung on purpose); fails if a process ended first."""
    deadline = time.monotonic() + 120
    while not path.exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "never reached the hang"
        time.sleep(0.02)


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def all_gone(pids: list[int]) -> bool:
    """Every one of ``pids`` exits (polled, bounded by a generous deadline that only a bug reaches)."""
    deadline = time.monotonic() + 60
    while not all(gone(p) or _zombie(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str] | int]]:
    """Processes a test starts (Popen objects, or pids of their children); whatever is left of them
    is killed after it, children first."""
    procs: list[subprocess.Popen[str] | int] = []
    yield procs
    for p in procs:
        if isinstance(p, int):
            if not gone(p):
                _kill(p)
            continue
        for pid in children(p.pid):
            _kill(pid)
        if p.poll() is None:
            p.kill()
        p.communicate()


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- 1. no poisoning by a failed setup


def test_a_module_fixed_after_a_failed_warmup_is_tuned_by_the_next_run(tmp_path: Path, manifest: Path) -> None:
    """A typo in the kernel's module makes its keys 'not importable'; once fixed, the next warmup (one
    process or --jobs) tunes them: that failure was this run's setup, not the key's, and is not
    recorded for the fleet."""
    (tmp_path / "fixme_mod.py").write_text("def broken(:\n")
    lines = manifest.read_text().replace("kernels_shard:shard_scale", "fixme_mod:shard_scale")
    fixme = tmp_path / "fixme.jsonl"
    fixme.write_text(lines)
    store = f"sqlite:///{tmp_path / 'poison.db'}"
    env = subprocess_env(TUNEVAULT_CPU_BENCH_REPS="3")

    first = tv("--store", store, "warmup", str(fixme), env=env, cwd=tmp_path)
    assert first.returncode == 1 and f"{len(SIZES)} skipped" in first.stdout, first.stdout + first.stderr

    (tmp_path / "fixme_mod.py").write_text((Path(ks.__file__)).read_text())  # fixed
    again = tv("--store", store, "warmup", str(fixme), "--jobs", "2", env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"warmup: {len(SIZES)} tuned" in again.stdout and "recorded by" not in again.stdout + again.stderr


def test_recorded_failures_are_retried_on_request_and_cleared_by_rm(tmp_path: Path) -> None:
    """A key whose every config failed is recorded for the fleet; ``--retry-failed`` tunes it again
    (and records it afresh); ``rm`` removes the records its filters select with the decisions."""
    path = tmp_path / "bad.jsonl"
    ks.write_manifest(path, [40], kernel=ks.no_config_works)
    store = f"sqlite:///{tmp_path / 'bad.db'}"

    first = tv("--store", store, "warmup", str(path), "--json")
    assert first.returncode == 1 and "every config failed" in first.stdout, first.stderr
    recorded = tv("--store", store, "warmup", str(path), "--json")
    (item,) = json.loads(recorded.stdout)["items"]
    assert item["status"] == "failed" and "recorded by" in item["reason"]

    retried = tv("--store", store, "warmup", str(path), "--retry-failed", "--json")
    (item,) = json.loads(retried.stdout)["items"]
    assert item["status"] == "failed" and "recorded by" not in item["reason"], "tried again"
    assert "recorded by" in json.loads(tv("--store", store, "warmup", str(path), "--json").stdout)["items"][0][
        "reason"], "and recorded again"

    other = tv("--store", store, "rm", "--kernel", "shard_scale")
    assert other.returncode == 0 and "failed-key" not in other.stdout, "another kernel's filter keeps it"
    dry = tv("--store", store, "rm", "--kernel", "no_config", "--dry-run")
    assert "would remove 0 decision(s)" in dry.stdout and "1 failed-key record(s)" in dry.stdout, dry.stdout
    rm = tv("--store", store, "rm", "--kernel", "no_config")
    assert rm.returncode == 0 and "1 failed-key record(s)" in rm.stdout, rm.stdout + rm.stderr
    after = tv("--store", store, "warmup", str(path), "--json")
    assert "recorded by" not in json.loads(after.stdout)["items"][0]["reason"], "tried again"

    rm_all = tv("--store", store, "rm", "--all")  # the record written just now
    assert rm_all.returncode == 0 and "1 failed-key record(s)" in rm_all.stdout, rm_all.stdout + rm_all.stderr


def test_rm_finds_an_aliased_kernels_failure_record_by_either_name(tmp_path: Path) -> None:
    """Warmup names an aliased kernel by the attribute holding it; its decisions carry the jit
    function's name (what ``ls`` shows). ``rm --kernel`` with that name left the record in place."""
    path = tmp_path / "alias.jsonl"
    ks.write_manifest(path, [40], kernel=ks.aliased_no_config_works, name="kernels_shard:aliased_no_config_works")
    store = f"sqlite:///{tmp_path / 'alias.db'}"
    for _run in range(2):  # recorded, then reported from the record
        done = tv("--store", store, "warmup", str(path), "--json")
    assert "recorded by" in json.loads(done.stdout)["items"][0]["reason"], done.stdout + done.stderr
    for name in ("aliased_no_config_works", "_copy_block"):
        dry = tv("--store", store, "rm", "--kernel", name, "--dry-run")
        assert "1 failed-key record(s)" in dry.stdout, (name, dry.stdout + dry.stderr)


# ---------------------------------------------------------------- 2. an unusable store is an error


@pytest.mark.parametrize("url", ["bogus://x", "redis://127.0.0.1:1/0"])
@pytest.mark.parametrize("jobs", [[], ["--jobs", "2"]])
def test_warmup_into_an_unusable_store_fails_instead_of_tuning_into_memory(manifest: Path, url: str,
                                                                             jobs: list[str]) -> None:
    done = tv("--store", url, "warmup", str(manifest), *jobs)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "tuned" not in done.stdout and "tunevault warmup: error:" in done.stderr


def test_jobs_refuse_a_memory_store_and_demo_needs_a_persistent_one(manifest: Path) -> None:
    jobs = tv("--store", "memory://", "warmup", str(manifest), "--jobs", "2")
    assert jobs.returncode == 2 and "a store its processes share" in jobs.stderr, jobs.stdout + jobs.stderr
    demo = tv("--store", "memory://", "demo")
    assert demo.returncode == 2 and "persistent store" in demo.stderr and "cold" not in demo.stdout


# ---------------------------------------------------------------- 3. signals stop every process


def _jobs_on_a_hung_key(tmp_path: Path, manifest: Path, started: list[subprocess.Popen[str] | int],
                        jobs: int = 2) -> tuple[subprocess.Popen[str], list[int]]:
    """``warmup --jobs N`` with one child hung in a key's launch: the parent and its N children."""
    hang = tmp_path / "hung"
    env = subprocess_env(TUNEVAULT_CPU_BENCH_REPS="3", TV_HANG_N=str(SIZES[0]), TV_HANG_FILE=str(hang))
    parent = subprocess.Popen([*CLI, "--store", f"sqlite:///{tmp_path / 'hung.db'}", "warmup", str(manifest),
                               "--jobs", str(jobs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
    started.append(parent)
    wait_for(hang, [parent])
    kids = children(parent.pid)
    started[:0] = kids  # killed first, should the test fail
    assert len(kids) == jobs
    return parent, kids


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_to_jobs_stops_its_children(tmp_path: Path, manifest: Path, signum: int,
                                                      started: list[subprocess.Popen[str] | int]) -> None:
    parent, kids = _jobs_on_a_hung_key(tmp_path, manifest, started)
    parent.send_signal(signum)
    _out, err = parent.communicate(timeout=60)
    assert parent.returncode == 128 + signum and f"stopped by {signal.Signals(signum).name}" in err, err
    assert all_gone(kids), "a child outlived the warmup"


def test_jobs_children_exit_when_their_parent_is_killed(tmp_path: Path, manifest: Path,
                                                        started: list[subprocess.Popen[str] | int]) -> None:
    """SIGKILL cannot be handled: each child sees its stdin (a pipe from the parent) close and exits."""
    parent, kids = _jobs_on_a_hung_key(tmp_path, manifest, started)
    parent.kill()
    parent.communicate(timeout=60)
    assert all_gone(kids), "a child outlived its parent"


def test_ctrl_c_in_a_single_process_warmup_says_interrupted(tmp_path: Path, manifest: Path,
                                                            started: list[subprocess.Popen[str] | int]) -> None:
    hang = tmp_path / "hung"
    env = subprocess_env(TUNEVAULT_CPU_BENCH_REPS="3", TV_HANG_N=str(SIZES[0]), TV_HANG_FILE=str(hang))
    proc = subprocess.Popen([*CLI, "--store", f"sqlite:///{tmp_path / 'int.db'}", "warmup", str(manifest)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    started.append(proc)
    wait_for(hang, [proc])
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "tunevault warmup: interrupted" in err and "Traceback" not in err, err


def test_the_summary_says_when_no_other_worker_took_a_dead_workers_keys(
        tmp_path: Path, manifest: Path, started: list[subprocess.Popen[str] | int]) -> None:
    parent, (child,) = _jobs_on_a_hung_key(tmp_path, manifest, started, jobs=1)
    os.kill(child, signal.SIGKILL)
    _out, err = parent.communicate(timeout=60)
    assert parent.returncode == 1
    assert "no other process was left to take its keys" in err and "went to the others" not in err, err


# ---------------------------------------------------------------- 4. --devices is checked


def test_devices_that_are_not_there_are_refused(tmp_path: Path, manifest: Path) -> None:
    """Under the interpreter no GPU is visible: any --devices is refused, with or without --jobs
    (--devices alone implies --jobs), before any process starts."""
    for argv in (["--jobs", "2", "--devices", "5,6"], ["--devices", "0"]):
        done = tv("--store", f"sqlite:///{tmp_path / 'd.db'}", "warmup", str(manifest), *argv)
        assert done.returncode == 2 and "no GPU visible" in done.stderr, done.stdout + done.stderr
        assert "tuned" not in done.stdout


def test_devices_beyond_the_visible_gpus_are_refused() -> None:
    from tunevault.cli.warmup_jobs import plan

    with pytest.raises(ValueError, match="no GPU 2, 5 here; this process sees 2 GPU"):
        plan("2", "0,2,5", visible=2)
    assert len(plan(None, "0,1", visible=4)) == 2, "--devices alone: one process per GPU listed"


# ---------------------------------------------------------------- 5. one snapshot of a growing manifest


GROW = """
import os
if os.environ.get("TUNEVAULT_WARMUP_WORKER") and os.environ.get("TV_GROW"):
    import time
    time.sleep(0.5)  # the parent has read the manifest by now: the capture appends meanwhile
    try:
        fd = os.open(os.environ["TV_GROW"] + ".done", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pass
    else:
        os.close(fd)
        with open(os.environ["TV_GROW"], "ab") as out, open(os.environ["TV_EXTRA"], "rb") as extra:
            out.write(extra.read())
"""


def test_a_manifest_growing_while_jobs_start_is_read_once_for_all(tmp_path: Path, manifest: Path) -> None:
    """Keys a capture appends while the children start are not counted by some and not others."""
    extra = tmp_path / "extra.jsonl"
    ks.write_manifest(extra, [700, 800], first_seen=len(SIZES))
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(GROW)  # runs first in each child, before it reads the manifest
    env = subprocess_env(TUNEVAULT_CPU_BENCH_REPS="3", TV_GROW=str(manifest), TV_EXTRA=str(extra))
    env["PYTHONPATH"] = os.pathsep.join([str(hooks), env["PYTHONPATH"]])
    done = tv("--store", f"sqlite:///{tmp_path / 'grow.db'}", "warmup", str(manifest), "--jobs", "2", "--json",
              env=env)
    assert (tmp_path / "keys.jsonl.done").exists(), "the manifest did not grow"
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["ok"], done.stderr
    assert report["counts"]["tuned"] == len(SIZES) and len(report["items"]) == len(SIZES)


# ---------------------------------------------------------------- 6. export into a directory


def test_export_into_a_directory_says_so_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    out = tmp_path / "outdir"
    out.mkdir()
    open_store(f"sqlite:///{tmp_path / 'e.db'}").close()  # export reads a store, it does not create one
    done = tv("--store", f"sqlite:///{tmp_path / 'e.db'}", "export", str(out))
    assert done.returncode == 2 and "is a directory" in done.stderr, done.stdout + done.stderr
    assert not list(tmp_path.glob("outdir.tmp*"))


# ---------------------------------------------------------------- 7. an empty allow list, with or without --jobs


@pytest.mark.parametrize("jobs", [[], ["--jobs", "2"]])
def test_an_empty_or_malformed_allow_list_is_refused_in_both_modes(tmp_path: Path, manifest: Path,
                                                                    jobs: list[str]) -> None:
    """``--allow-module "$PREFIX"`` with PREFIX unset, or ``TUNEVAULT_ALLOW_MODULES=`` alike, must not
    import whatever the manifest names: exit 2 before any process starts, and nothing is launched."""
    launches = tmp_path / "launches.log"
    env = subprocess_env(TUNEVAULT_CPU_BENCH_REPS="3", TV_LAUNCH_LOG=str(launches))
    store = f"sqlite:///{tmp_path / 'allow.db'}"
    for argv, extra in ((["--allow-module", ""], {}), (["--allow-module", "kernels_shard", "--allow-module", ".x"], {}),
                        ([], {"TUNEVAULT_ALLOW_MODULES": ""}), ([], {"TUNEVAULT_ALLOW_MODULES": "kernels_shard,"})):
        done = tv("--store", store, "warmup", str(manifest), *argv, *jobs, env={**env, **extra})
        assert done.returncode == 2, done.stdout + done.stderr
        assert "needs module prefixes such as 'mypkg.kernels'" in done.stderr or \
            "needs comma-separated module prefixes" in done.stderr, done.stderr
        assert "tuned" not in done.stdout and not launches.exists()
    allowed = tv("--store", store, "warmup", str(manifest), "--allow-module", "kernels_shard", *jobs, env=env)
    assert allowed.returncode == 0 and f"warmup: {len(SIZES)} tuned" in allowed.stdout, allowed.stdout + allowed.stderr


def test_a_warmup_child_refuses_an_empty_allow_list_from_its_environment(tmp_path: Path, manifest: Path) -> None:
    """The variable is how ``--jobs`` children learn the limit: empty there means refuse, never "any module"."""
    launches = tmp_path / "launches.log"
    env = subprocess_env(TUNEVAULT_CPU_BENCH_REPS="3", TV_LAUNCH_LOG=str(launches), TUNEVAULT_ALLOW_MODULES="")
    done = subprocess.run([sys.executable, "-m", "tunevault.cli.warmup_child", str(manifest),
                           "--store", f"sqlite:///{tmp_path / 'child.db'}"],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 2 and "TUNEVAULT_ALLOW_MODULES needs" in done.stderr, done.stdout + done.stderr
    assert '"t": "item"' not in done.stdout and not launches.exists()
