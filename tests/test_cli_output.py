"""The CLI is quick and honest: no torch or Triton for commands that run no kernel, clean output."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import tunevault
from conftest import subprocess_env
from test_cli import cli, cli_json, tune_two
from tunevault import report
from tunevault.store.base import open_store

READERS = '''
import json, sys
from tunevault.cli.main import main

manifest, url = sys.argv[1], sys.argv[2]
imported = {}
for argv in (["--version"], ["info", "--json"], ["ls", "--json"], ["show", "scaled_add"], ["export", "-"],
             ["doctor"], ["rm", "--kernel", "nothing", "--dry-run"], ["check", manifest]):
    status = main(["--store", url, *argv])
    imported[argv[0]] = [status] + sorted(m for m in ("torch", "triton") if m in sys.modules)
from tunevault.core.identity import current_fingerprint  # now torch and Triton may come
print(json.dumps({"imported": imported, "slow_digest": current_fingerprint().digest}))
'''


def test_commands_that_run_no_kernel_import_neither_torch_nor_triton(tv: Any, sqlite_url: str,
                                                                      tmp_path: Path) -> None:
    manifest = tmp_path / "keys.jsonl"
    with tunevault.capture(manifest):
        tune_two(tv)
    tv.uninstall()
    env = subprocess_env()
    env.pop("TRITON_INTERPRET")  # the CLI finds out by itself that there is no GPU
    proc = subprocess.run([sys.executable, "-c", READERS, str(manifest), sqlite_url], capture_output=True,
                          text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    for command in ("--version", "info", "ls", "show", "export", "doctor", "rm"):
        assert result["imported"][command] == [0], (command, result)
    assert result["imported"]["check"][:1] == [0] and "torch" not in result["imported"]["check"]
    listing = json.loads(proc.stdout[proc.stdout.index("\n[") + 1:proc.stdout.index("\n]") + 2])
    assert len(listing) == 2 and all(row["this_machine"] for row in listing)  # same fingerprint as tuning
    assert f'"digest": "{result["slow_digest"]}"' in proc.stdout  # info's cheap one equals torch's and Triton's


def test_version_show_and_broken_pipe(tv: Any, sqlite_url: str, capsys: Any) -> None:
    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out.startswith(f"tunevault {tunevault.__version__} (Triton ") and "torch " in out
    tune_two(tv)
    store = open_store(sqlite_url)
    decision = next(iter(store.decisions()))
    store.delete()
    store.put(dataclasses.replace(decision, margin=-0.014))  # a faster config lost the tie
    store.close()
    code, out, _ = cli(capsys, "--store", sqlite_url, "show", decision.kernel.name)
    assert code == 0 and "rank None" not in out and " pid " in out
    assert "-1.4% to the runner-up: a config 1.4% faster was within the tie tolerance" in out

    proc = subprocess.Popen([sys.executable, "-m", "tunevault.cli.main", "--store", sqlite_url, "show", "scaled"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env())
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # `| head` that has read enough
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Broken pipe" not in err and "BrokenPipeError" not in err and "Traceback" not in err


EVENTS = [
    {"event": "miss", "kernel": "app:attn", "policy": "error", "phase": "serving", "time": 10.0},
    {"event": "fallback", "kernel": "app:norm", "phase": "serving", "time": 11.0},
    {"event": "seal", "on_miss": "fallback", "time": 9.0},
]


def test_report_json_has_integer_counts_and_fixed_keys(tmp_path: Path, capsys: Any) -> None:
    log = tmp_path / "events.jsonl"
    tuning = {"event": "tuning", "kernel": "app:mm", "seconds": 0.5, "phase": "warmup", "time": 8.0}
    log.write_text("".join(json.dumps(e) + "\n" for e in [tuning, *EVENTS]))
    summary = cli_json(capsys, "report", str(log))["summary"]
    assert sorted(summary) == ["app:attn", "app:mm", "app:norm"]
    assert len({tuple(sorted(row)) for row in summary.values()}) == 1  # the same keys for every kernel
    statistics = ("regret_median", "regret_max")  # None where nothing was measured
    for row in summary.values():
        assert all(isinstance(v, int) for k, v in row.items() if not k.startswith("seconds_") and k not in statistics)
        assert {"predicted", "regret_n", "regret_unmeasured", *statistics} <= set(row), "documented, always there"
        assert row["regret_median"] is None and row["regret_max"] is None
    assert summary["app:mm"]["tunings_warmup"] == 1 and summary["app:attn"]["errors"] == 1


def test_report_picture_without_tunings_has_readable_axis_labels() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = report.events_figure(EVENTS)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    bars = fig.axes[0]
    boxes = [t.get_window_extent(canvas.get_renderer()) for t in bars.get_xticklabels() if t.get_text()]
    assert len(boxes) >= 2
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_report_plot_writes_the_file_it_names_and_refuses_a_directory(tmp_path: Path, capsys: Any) -> None:
    """matplotlib appends ``.png`` to a name without an extension, and to a directory's name."""
    pytest.importorskip("matplotlib")
    log = tmp_path / "events.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in EVENTS))
    for name, magic in (("picture", b"\x89PNG"), ("picture.svg", b"<?xml")):
        code, out, _ = cli(capsys, "report", str(log), "--plot", str(tmp_path / name))
        assert code == 0 and out.rstrip().endswith(f"picture written to {tmp_path / name}")
        assert (tmp_path / name).read_bytes().startswith(magic)
    folder = tmp_path / "pictures"
    folder.mkdir()
    code, out, err = cli(capsys, "report", str(log), "--plot", str(folder))
    assert code == 2 and f"{folder} is a directory" in err and str(folder / "tunevault-report.png") in err
    assert out == ""  # refused before the table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl", "picture", "picture.svg", "pictures"]


def test_report_of_an_empty_log_is_no_events_yet_as_for_a_log_holding_only_a_seal(tmp_path: Path,
                                                                                  capsys: Any) -> None:
    """TUNEVAULT_EVENTS names a file before its first event: an empty log is a log, not an error."""
    empty, sealed = tmp_path / "empty.jsonl", tmp_path / "sealed.jsonl"
    empty.write_text("\n")
    sealed.write_text(json.dumps(EVENTS[2]) + "\n")
    for log, note in ((empty, f"no events in {empty} yet: it is empty"),
                      (sealed, f"no tunings, misses or fallbacks in {sealed} yet (1 event(s): seal)")):
        code, out, err = cli(capsys, "report", str(log))
        assert (code, err) == (0, "") and "tunings (warmup)" in out and out.rstrip().endswith(note)
        assert cli_json(capsys, "report", str(log)) == {"kind": "events", "summary": {}}
    (tmp_path / "other.jsonl").write_text('{"not": "an event"}\n')
    code, _, err = cli(capsys, "report", str(tmp_path / "other.jsonl"))
    assert code == 2 and "neither a tunevault events log nor a key manifest" in err


def test_report_counts_a_tuning_of_a_phase_it_does_not_know(tmp_path: Path, capsys: Any) -> None:
    log = tmp_path / "events.jsonl"
    events = [{"event": "tuning", "kernel": "app:mm", "seconds": 0.5, "phase": "warmup", "time": 8.0},
              {"event": "tuning", "kernel": "app:mm", "seconds": 2.0, "phase": "prefill", "time": 9.0}]
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    row = cli_json(capsys, "report", str(log))["summary"]["app:mm"]
    assert (row["tunings_warmup"], row["tunings_serving"], row["tunings_other"]) == (1, 0, 1)
    assert row["seconds_other"] == 2.0
    headers, rows = report.events_table(events)
    assert dict(zip(headers, rows[0], strict=True))["tunings (other phase)"] == 1
    assert dict(zip(headers, rows[0], strict=True))["tuning s (other phase)"] == "2.00"
    assert "tunings (other phase)" not in report.events_table(events[:1])[0]  # only when there is one


def test_report_timeline_calls_a_seal_a_switch_only_when_the_same_process_changes_on_miss() -> None:
    """Processes sharing one events file each seal once: none of those seals is a switch."""
    pytest.importorskip("matplotlib")

    def seal_lines(seals: list[dict[str, Any]]) -> list[tuple[str, str]]:
        fig = report.events_figure([*EVENTS[:2], *seals])
        timeline = fig.axes[1]
        return [(line.get_linestyle(), line.get_label()) for line in timeline.lines  # the seals' lines,
                if line.get_linestyle() in ("--", ":")]                                # not miss markers

    seal, switch = ("--", "seal"), (":", "on_miss switched")
    fleet = [{"event": "seal", "on_miss": "error", "pid": pid, "time": 20.0 + pid} for pid in (101, 102, 103)]
    assert [style for style, _ in seal_lines(fleet)] == ["--"] * 3
    again = {"event": "seal", "on_miss": "fallback", "pid": 102, "time": 30.0}
    assert seal_lines([*fleet, again])[-1] == switch
    no_pid = [{"event": "seal", "on_miss": m, "time": t} for m, t in (("error", 20.0), ("fallback", 21.0))]
    assert seal_lines(no_pid) == [seal, ("--", "_nolegend_")]  # cannot tell processes apart: no switch
    texts = [t.get_text() for t in report.events_figure([*EVENTS[:2], *fleet]).axes[1].texts]
    assert "pid 102: on_miss=error" in texts


def test_text_from_an_imported_file_is_shown_as_text(tmp_path: Path) -> None:
    """Names from a file made elsewhere are neither rich markup (``[/x]`` crashed ls/show/diff with a
    MarkupError, ``[red]`` or ``[link=...]`` changed what the table showed) nor terminal escapes."""
    from test_store import make_decision

    names = ("evil:[/x]", "pkg:[red]forged[/red]", "pkg:[link=https://x.invalid]k[/link]", "pkg:\x1b[2Jclear")
    doc = {"format": "tunevault-decisions", "schema": 1,
           "decisions": [make_decision(i, kernel=name).to_json() for i, name in enumerate(names)]}
    exported = tmp_path / "in.json"
    exported.write_text(json.dumps(doc))
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({**doc, "decisions": []}))
    url = f"sqlite:///{tmp_path / 'tv.db'}"

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tunevault.cli.main", *argv], capture_output=True, text=True,
                              timeout=120, env=subprocess_env(COLUMNS="300"))

    assert run("--store", url, "import", str(exported)).returncode == 0
    for argv, code in ((("--store", url, "ls"), 0), (("--store", url, "show", "pkg"), 0),
                       (("diff", str(exported), str(empty)), 1), (("diff", str(tmp_path / "tv.db"), str(empty)), 1)):
        proc = run(*argv)
        assert proc.returncode == code and "Traceback" not in proc.stderr, (argv, proc.stderr[-600:])
        assert "\x1b" not in proc.stdout
    listing = run("--store", url, "ls").stdout + run("diff", url, str(empty)).stdout
    for shown in ("evil:[/x]", "pkg:[red]forged[/red]", "pkg:[link=https://x.invalid]k[/link]", "pkg:\\x1b[2Jclear"):
        assert shown in listing, (shown, listing)
