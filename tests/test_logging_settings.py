"""One line per tuning however tunevault is switched on; explicit options win over the environment."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import subprocess_env
from tunevault.policy import settings as settings_module
from tunevault.policy.settings import Settings, env_problems

IN_CODE = '''
import logging, sys, torch
import tunevault
from tunevault.demo import kernels

def tune(n):
    kernels.run_scaled_add(torch.randn(n), torch.randn(n))
    print(f"--- after n={n}", file=sys.stderr, flush=True)

tunevault.install(store="memory://")
tune(64)  # the application configured no logging: tunevault's own stderr line
logging.basicConfig(level=logging.INFO, format="APP %(levelname)s %(message)s")
tune(65)  # now the application's handler and level decide
logging.getLogger().setLevel(logging.WARNING)
tune(66)  # ... and its WARNING level hides the INFO line
'''


def phases(stderr: str) -> list[str]:
    return stderr.split("--- after n=")


def test_install_in_code_logs_one_line_per_tuning_following_the_app() -> None:
    proc = subprocess.run([sys.executable, "-c", IN_CODE], capture_output=True, text=True, timeout=240,
                          env=subprocess_env(TUNEVAULT_LOG_LEVEL="DEBUG"))
    assert proc.returncode == 0, proc.stderr
    unconfigured, configured, quiet, _ = phases(proc.stderr)
    assert unconfigured.count("[INFO] tunevault: tuned tunevault.demo.kernels:scaled_add [n=64") == 1
    assert "[DEBUG] tunevault" in unconfigured  # TUNEVAULT_LOG_LEVEL applies while the app configured none
    assert configured.count("APP INFO tunevault: tuned tunevault.demo.kernels:scaled_add [n=65") == 1
    assert "[INFO]" not in configured and "[DEBUG]" not in configured and "APP DEBUG" not in configured
    assert "tuned" not in quiet


def test_environment_activation_logs_the_same_line() -> None:
    code = "import torch\nfrom tunevault.demo import kernels\nkernels.run_scaled_add(torch.randn(64), torch.randn(64))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                          env=subprocess_env(TUNEVAULT_MODE="tune", TUNEVAULT_STORE="memory://"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("[INFO] tunevault: tuned tunevault.demo.kernels:scaled_add [n=64") == 1


def test_bad_mode_in_the_environment_is_one_warning_and_install_still_works() -> None:
    code = textwrap.dedent('''
        import json, tunevault
        tunevault.install("tune", store="memory://")  # an explicit argument wins over TUNEVAULT_MODE
        print(json.dumps(tunevault.installed()))
    ''')
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                          env=subprocess_env(TUNEVAULT_MODE="bogus"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) is True
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "[WARNING] tunevault: not activated from environment: TUNEVAULT_MODE='bogus': mode must be one of "
        "off, tune, first; got 'bogus'"]


def test_explicit_options_win_and_a_bad_variable_warns_once(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(settings_module, "_warned", set())
    for var, value in (("TUNEVAULT_MODE", "bogus"), ("TUNEVAULT_ON_MISS", "loud"), ("TUNEVAULT_TOLERANCE", "lots")):
        monkeypatch.setenv(var, value)
    with pytest.raises(ValueError):
        Settings.from_env()
    assert sorted(env_problems()) == ["TUNEVAULT_MODE", "TUNEVAULT_ON_MISS", "TUNEVAULT_TOLERANCE"]
    chosen = Settings.for_install(mode="tune", on_miss="error", tolerance=0.05)
    assert (chosen.mode, chosen.on_miss, chosen.tolerance) == ("tune", "error", 0.05)
    assert caplog.records == []  # every bad variable was overridden: nothing to say

    caplog.set_level(logging.WARNING, logger="tunevault")
    for _ in range(2):
        s = Settings.for_install(mode="first")
        assert (s.mode, s.on_miss, s.tolerance) == ("first", "tune", 0.02)  # the defaults
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["tunevault: ignoring TUNEVAULT_ON_MISS='loud': on_miss must be one of tune, fallback, "
                        "error, background; got 'loud'; using the default",
                        "tunevault: ignoring TUNEVAULT_TOLERANCE must be a number; got 'lots'; using the default"]


def tunes_with_the_default_rounds() -> None:
    """A kernel call is not broken by a bad rounds variable: it tunes with the default number of rounds."""
    import torch

    import kernels_engine as ke
    import tunevault
    from tunevault.engine import timing
    from tunevault.integration.triton_adapter import runtime

    tunevault.install(mode="tune", store="memory://")
    try:
        x, y = torch.randn(64), torch.randn(64)
        assert torch.equal(ke.run_add(ke.add_equal, x, y), x + y)
        (decision,) = runtime().used.values()
        assert {c.n for c in decision.candidates} == {timing.DEFAULT_CPU_REPS}
    finally:
        tunevault.uninstall()


def test_a_bad_cpu_rounds_variable_warns_once_and_tuning_goes_on(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:

    from tunevault.core import env
    from tunevault.engine import timing

    env._ignore.cache_clear()
    caplog.set_level(logging.WARNING, logger="tunevault")
    monkeypatch.setenv("TUNEVAULT_CPU_BENCH_REPS", "lots")
    assert timing.cpu_reps() == timing.cpu_reps() == timing.DEFAULT_CPU_REPS
    monkeypatch.setenv("TUNEVAULT_CPU_BENCH_REPS", "0")
    assert timing.cpu_reps() == timing.DEFAULT_CPU_REPS
    monkeypatch.setenv("TUNEVAULT_CPU_BENCH_REPS", "4")
    assert timing.cpu_reps() == 4
    monkeypatch.setenv("TUNEVAULT_CPU_BENCH_REPS", "lots")
    tunes_with_the_default_rounds()
    assert [r.getMessage() for r in caplog.records] == [
        "tunevault: ignoring TUNEVAULT_CPU_BENCH_REPS='lots': not a positive integer at most 10000; using the "
        "default (15)",
        "tunevault: ignoring TUNEVAULT_CPU_BENCH_REPS='0': not a positive integer at most 10000; using the "
        "default (15)"]


def test_a_malformed_worker_idle_time_is_one_warning_and_the_default(monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """``TUNEVAULT_WORKER_IDLE=soon`` raised a ValueError out of the kernel call when a key was tuned
    in the isolated worker; now the worker idles for the default and tuning goes on there."""
    import torch

    import kernels_engine as ke
    import tunevault
    from tunevault.core import env
    from tunevault.engine import procs
    from tunevault.integration.triton_adapter import runtime

    env._ignore.cache_clear()
    caplog.set_level(logging.WARNING, logger="tunevault")
    for bad in ("soon", "-1", "nan"):
        assert procs.idle_timeout({"TUNEVAULT_WORKER_IDLE": bad}) == procs.DEFAULT_IDLE_S
    assert procs.idle_timeout({"TUNEVAULT_WORKER_IDLE": "2.5"}) == 2.5
    monkeypatch.setenv("TUNEVAULT_WORKER_IDLE", "soon")
    tunevault.install(mode="tune", store="memory://", isolate=True, prestart=False)
    try:
        x, y = torch.randn(64), torch.randn(64)
        assert torch.equal(ke.run_add(ke.add_equal, x, y), x + y)
        (decision,) = runtime().used.values()
        assert dict(decision.provenance)["tuned_in"] == "worker"
    finally:
        tunevault.uninstall()
    assert [r.getMessage() for r in caplog.records] == [
        f"tunevault: ignoring TUNEVAULT_WORKER_IDLE={bad!r}: not a positive number of seconds at most 604800; "
        "using the default (30)" for bad in ("soon", "-1", "nan")]


def test_huge_numbers_in_numeric_variables_warn_and_never_raise(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A 401-digit TUNEVAULT_CPU_BENCH_REPS made math.isfinite raise OverflowError out of the kernel call;
    10**20 rounds passed and would stall it for good; 1e300 seconds overflowed the worker's select."""

    from tunevault.core import env
    from tunevault.engine import gpu_timing, procs, timing

    env._ignore.cache_clear()
    caplog.set_level(logging.WARNING, logger="tunevault")
    huge = "1" + "0" * 400
    for value in (huge, "9" * 5000, str(10**20), "10001"):
        monkeypatch.setenv("TUNEVAULT_CPU_BENCH_REPS", value)
        assert timing.cpu_reps() == timing.DEFAULT_CPU_REPS
    monkeypatch.setenv("TUNEVAULT_CPU_BENCH_REPS", "10000")
    assert timing.cpu_reps() == 10_000
    for value in (huge, "1e300", "1e400"):
        assert procs.idle_timeout({"TUNEVAULT_WORKER_IDLE": value}) == procs.DEFAULT_IDLE_S
    monkeypatch.setenv("TUNEVAULT_L2_FLUSH_BYTES", huge)
    gpu_timing.l2_cache_bytes.cache_clear()
    try:
        assert gpu_timing.l2_cache_bytes(0) == gpu_timing.FALLBACK_L2_BYTES  # no GPU here: the fallback size
    finally:
        gpu_timing.l2_cache_bytes.cache_clear()
    monkeypatch.setenv("TUNEVAULT_CPU_BENCH_REPS", huge)
    tunes_with_the_default_rounds()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 8 and all(m.startswith("tunevault: ignoring TUNEVAULT_") for m in messages)


@pytest.mark.parametrize(("var", "value", "why"), [
    ("TUNEVAULT_LEASE_WAIT", "nan", "lease_wait must be a finite number; got nan"),
    ("TUNEVAULT_TUNE_TIMEOUT", "nan", "tune_timeout must be a finite number; got nan"),
    ("TUNEVAULT_LEASE_TTL", "nan", "lease_ttl must be a finite number; got nan"),
    ("TUNEVAULT_CONFIG_TIMEOUT", "inf", "config_timeout must be a finite number; got inf"),
    ("TUNEVAULT_ISOLATE", "enabled", "TUNEVAULT_ISOLATE must be one of 1, true, yes, on (on) or 0, false, no, "
                                     "off (off); got 'enabled'"),
    ("TUNEVAULT_VALIDATE", "ture", "TUNEVAULT_VALIDATE must be one of 1, true, yes, on (on) or 0, false, no, "
                                   "off (off); got 'ture'"),
])
def test_a_nan_or_a_misspelled_flag_in_the_environment_is_one_warning_and_the_default(
        var: str, value: str, why: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """``TUNEVAULT_LEASE_WAIT=nan`` passed every range check (a lease wait that never ended, polling
    the store thousands of times a second); ``TUNEVAULT_ISOLATE=enabled`` read as off."""
    monkeypatch.setattr(settings_module, "_warned", set())
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match="must be"):
        Settings.from_env()
    problem = why if why.startswith(var) else f"{var}={value!r}: {why}"
    assert env_problems() == {var: problem}
    caplog.set_level(logging.WARNING, logger="tunevault")
    assert Settings.for_install(mode="tune") == Settings(mode="tune")  # every option at its default
    assert [r.getMessage() for r in caplog.records] == [f"tunevault: ignoring {problem}; using the default"]


def test_a_flag_reads_the_documented_words_and_refuses_any_other() -> None:
    for word, on in (("1", True), ("Yes", True), (" on ", True), ("TRUE", True),
                     ("0", False), ("no", False), ("Off", False), ("false", False), ("", False)):
        settings = Settings.from_env({"TUNEVAULT_ISOLATE": word, "TUNEVAULT_PRESTART": word})
        assert settings.isolate is on and settings.prestart is on
    for word in ("0ff", "enabled", "disable", "y"):
        with pytest.raises(ValueError, match="TUNEVAULT_PRESTART must be one of"):
            Settings.from_env({"TUNEVAULT_PRESTART": word})


@pytest.mark.parametrize("option", [{"isolate": "no"}, {"validate": "false"}, {"prestart": 0.0},
                                    {"lease_wait": float("nan")}, {"tune_timeout": float("inf")},
                                    {"lease_ttl": "30"}, {"store": 123}, {"remote": 5}, {"events": 1},
                                    {"capture": 5}, {"bundles": 5}, {"bundles": [b"x.json"]}, {"bundle_key": 7},
                                    {"warmup": 1.5}])
def test_an_install_option_of_the_wrong_type_is_refused(option: dict[str, object]) -> None:
    """``install(isolate="no")`` was stored as the string, which is truthy: isolation switched on;
    ``events=1`` crashed the first kernel call and ``remote=5`` turned the store into memory."""
    (name, value), = option.items()
    with pytest.raises(ValueError, match=f"tunevault {name} must be .*; got {re.escape(repr(value))}"):
        Settings.for_install(mode="tune", **option)


def test_paths_given_as_path_objects_keep_the_sqlite_store(tmp_path: Path, sqlite_url: str) -> None:
    """``install(bundles=Path(...))`` raised inside the store's opening ('PosixPath' object is not
    iterable), and the whole store fell back to memory: nothing tuned persisted."""
    import torch

    import tunevault
    from tunevault.cli.main import main
    from tunevault.demo import kernels
    from tunevault.integration.triton_adapter import runtime
    from tunevault.store.base import open_store

    tunevault.install(mode="tune", store=sqlite_url)
    kernels.run_scaled_add(torch.randn(64), torch.randn(64))
    tunevault.uninstall()
    bundle = tmp_path / "bundle.json"
    assert main(["--store", sqlite_url, "export", "--winners-only", str(bundle)]) == 0
    local, events = tmp_path / "local.db", tmp_path / "events.jsonl"
    for bundles in (bundle, [bundle]):
        local.unlink(missing_ok=True)
        tunevault.install(mode="tune", store=local, bundles=bundles, events=events)
        kernels.run_scaled_add(torch.randn(64), torch.randn(64))  # from the bundle
        kernels.run_scaled_add(torch.randn(65), torch.randn(65))  # tuned, kept in the local file
        rt = runtime()
        assert rt is not None and not rt.store_fell_back
        assert rt.settings.bundles == (str(bundle),) and rt.settings.events == str(events)
        tunevault.uninstall()
        stored = open_store(f"sqlite:///{local}")
        keys = [d.key.text for d in stored.decisions()]
        assert len(keys) == 1 and "65" in keys[0], keys  # the bundle's key was not tuned again
        stored.close()
    assert events.read_text().count('"event"') > 0


def test_a_bad_remote_costs_the_remote_layer_not_the_local_store(sqlite_url: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Any error opening the remote (here a value that is not text) turned the local SQLite store
    into memory with a warning naming only the store."""
    from tunevault.store.layered import open_layered
    from tunevault.store.sqlite import SqliteStore

    caplog.set_level(logging.WARNING, logger="tunevault")
    store = open_layered(sqlite_url, remote=5)  # type: ignore[arg-type]
    assert isinstance(store, SqliteStore)
    store.close()
    assert [r.getMessage().startswith("tunevault: remote store 5 not used") for r in caplog.records] == [True]


def test_a_malformed_l2_flush_size_is_one_warning_and_the_default(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """``TUNEVAULT_L2_FLUSH_BYTES=big`` raised a ValueError out of the GPU timer (every other
    malformed variable is a warning and the default); ``0`` still means no flush."""
    from tunevault.core import env
    from tunevault.engine.gpu_timing import FALLBACK_L2_BYTES, l2_cache_bytes

    env._ignore.cache_clear()
    caplog.set_level(logging.WARNING, logger="tunevault")
    for value, expected in (("big", FALLBACK_L2_BYTES), ("-5", FALLBACK_L2_BYTES), ("0", 0), ("1048576", 1 << 20)):
        monkeypatch.setenv("TUNEVAULT_L2_FLUSH_BYTES", value)
        l2_cache_bytes.cache_clear()
        assert l2_cache_bytes(0) == expected  # no CUDA device here: the default is the fallback size
    assert sum("TUNEVAULT_L2_FLUSH_BYTES" in r.getMessage() for r in caplog.records) == 2
    l2_cache_bytes.cache_clear()


@pytest.mark.parametrize("value", ["²", "-3", "loud", "9" * 5000])
def test_bad_log_level_is_one_warning_in_the_cli_and_the_startup_hook(value: str) -> None:
    # '²' passed str.isdigit() and then int() raised: a traceback in every command and at interpreter start.
    env = subprocess_env(TUNEVAULT_LOG_LEVEL=value)
    cli = subprocess.run([sys.executable, "-m", "tunevault.cli.main", "--store", "memory://", "ls", "--json"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert cli.returncode == 0 and json.loads(cli.stdout) == []
    hook = subprocess.run([sys.executable, "-c", "print('started')"], capture_output=True, text=True,
                          timeout=120, env={**env, "TUNEVAULT_MODE": "tune", "TUNEVAULT_STORE": "memory://"})
    assert hook.returncode == 0 and hook.stdout == "started\n"
    for stderr in (cli.stderr, hook.stderr):
        assert "Traceback" not in stderr
        assert stderr.count("ignoring TUNEVAULT_LOG_LEVEL=") == 1 and "using INFO" in stderr


def test_a_misspelled_variable_name_is_one_warning_naming_the_right_one(monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """``TUNEVAULT_BUNDLES`` (the option is ``bundles``, the variable ``TUNEVAULT_BUNDLE``) was ignored
    without a word, so a sealed server missed every key its bundle held."""
    monkeypatch.setattr(settings_module, "_warned", set())
    monkeypatch.setenv("TUNEVAULT_BUNDLES", "/srv/bundle.json")
    caplog.set_level(logging.WARNING, logger="tunevault")
    Settings.for_install(mode="tune")
    Settings.for_install(mode="tune")
    assert [r.getMessage() for r in caplog.records] == [
        "tunevault: ignoring TUNEVAULT_BUNDLES: tunevault reads no such variable; did you mean TUNEVAULT_BUNDLE?"]


def test_every_variable_the_code_reads_is_known() -> None:
    """A variable added to the code but not to KNOWN_VARIABLES would be warned about as a typo."""
    import re
    from pathlib import Path

    src = Path(settings_module.__file__).parents[1]
    named = {m for path in src.rglob("*.py") for m in re.findall(r"TUNEVAULT_[A-Z0-9_]*[A-Z0-9]", path.read_text())}
    assert named - settings_module.KNOWN_VARIABLES == set()
