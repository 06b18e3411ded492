"""Hostile inputs and slow faults against real kernel calls and the CLI: tried, crashes, stalls, undeclared launches.

Each trial puts one hostile thing where tunevault reads it, then makes the kernel call a server
would make (``tests/kernels_hostile.py``: three declared configs, key ``n``) and the CLI commands
an operator would run on it:

- ``sqlite_row`` / ``redis_entry`` / ``bundle`` / ``manifest`` / ``events``: a real document with
  one to three hostile mutations (``tests/hostile_docs.py``: wrong types, out-of-range numbers,
  NaN/Infinity, huge or 150k-deep values, unicode tricks, duplicate keys), with random on-miss
  policy, bundle key and signature;
- ``faults``: a Redis that trickles valid bytes or never answers, FIFOs and ``/dev/zero`` as
  bundles, sinks and manifests, ``/dev/full``, a dangling symlink store, a read-only or full file
  system (when mounts are allowed), a worker hook forging results, empty or missing keys.

Counted per trial: a **crash** (an exception out of the kernel call, a wrong result, a CLI
traceback, or the trial's process dying), a **stall** (a kernel call slower than the documented
bound for what it waited on plus 3x this machine's clean tuning time plus 1 s, or a trial that
never finished), an **undeclared launch** (a launch matching no declared config). Trials run in
child processes with a watchdog, so a hang is counted, not suffered.

    TRITON_INTERPRET=1 PYTHONPATH=src python bench/hostile.py --out hostile_results [--budget 900] [--seed 0]

Writes ``hostile.json`` and ``hostile.md`` into ``--out``; exit status 1 if any crash, stall or
undeclared launch was counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PLAN = {"sqlite_row": 60, "redis_entry": 40, "bundle": 60, "manifest": 40, "events": 40, "faults": 44}


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEVAULT_")}
    env.setdefault("TRITON_INTERPRET", "1")
    env.setdefault("TUNEVAULT_CPU_BENCH_REPS", "3")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env["TUNEVAULT_REPLAY_MAX_BYTES"] = str(64 << 20)
    return env


def run_category(name: str, count: int, seed: int, work: Path, limit: float) -> list[dict[str, Any]]:
    """Run ``count`` trials of ``name`` in children; restart after a death or a hang, counting it."""
    results: list[dict[str, Any]] = []
    start = 0
    deadline = time.monotonic() + limit
    while start < count and time.monotonic() < deadline:
        cmd = [sys.executable, str(HERE / "hostile_trials.py"), name, str(seed), str(start), str(count),
               str(work / name)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=child_env(),
                                cwd=work)
        seen = start
        try:
            out, _ = proc.communicate(timeout=max(5.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        for text in out.splitlines():
            try:
                row = json.loads(text)
            except ValueError:
                continue
            if isinstance(row, dict) and "trial" in row:
                results.append(row)
                seen = row["trial"] + 1
        if proc.returncode != 0 and seen < count:  # died or hung inside trial `seen`
            why = "hung (killed by the watchdog)" if proc.returncode == -9 else f"exit {proc.returncode}"
            results.append({"category": name, "trial": seen, "crash": f"process {why}",
                            "stall": proc.returncode == -9, "undeclared": 0, "what": "?"})
            seen += 1
        start = seen
        print(f"  {name}: {start}/{count} trials", flush=True)
    return results


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, dict[str, Any]] = {}
    for r in rows:
        c = by.setdefault(r["category"], {"tried": 0, "crashes": 0, "stalls": 0, "undeclared": 0, "worst_s": 0.0,
                                          "worst_over_bound": 0.0})
        c["tried"] += 1
        c["crashes"] += bool(r.get("crash"))
        c["stalls"] += bool(r.get("stall"))
        c["undeclared"] += int(r.get("undeclared") or 0)
        c["worst_s"] = max(c["worst_s"], float(r.get("call_s") or 0.0))
        if r.get("bound_s"):
            c["worst_over_bound"] = max(c["worst_over_bound"], float(r.get("call_s") or 0.0) / r["bound_s"])
    total = {k: sum(c[k] for c in by.values()) for k in ("tried", "crashes", "stalls", "undeclared")}
    return {"total": total, "by_category": by}


def markdown(summary: dict[str, Any], meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    t = summary["total"]
    failures = [r for r in rows if r.get("crash") or r.get("stall") or r.get("undeclared")]
    lines = [f"# Hostile inputs: {t['tried']} tried, {t['crashes']} crashes, {t['stalls']} stalls beyond the bound, "
             f"{t['undeclared']} undeclared launches", "",
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}; {meta['seconds']:.0f} s", "",
             "| category | tried | crashes | stalls | undeclared | slowest call, s | slowest / its bound |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in summary["by_category"].items():
        lines.append(f"| {name} | {c['tried']} | {c['crashes']} | {c['stalls']} | {c['undeclared']} | "
                     f"{c['worst_s']:.2f} | {c['worst_over_bound']:.2f} |")
    faults: dict[str, tuple[float, float]] = {}
    for r in rows:
        if r["category"] == "faults" and r.get("what"):
            worst, bound = faults.get(r["what"], (0.0, 0.0))
            faults[r["what"]] = (max(worst, float(r.get("call_s") or 0.0)), float(r.get("bound_s") or bound))
    if faults:
        lines += ["", "| slow fault | slowest kernel call, s | its bound, s |", "|---|---:|---:|"]
        lines += [f"| {what} | {worst:.2f} | {bound:.1f} |" if bound else f"| {what} | (CLI only) | |"
                  for what, (worst, bound) in faults.items()]
    if failures:
        lines += ["", "First failures:", ""] + [f"- {f['category']} #{f['trial']} ({f.get('what')}): "
                                                f"{f.get('crash') or 'stall' if f.get('stall') else 'undeclared'}"
                                                for f in failures[:20]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", default="hostile_results", help="directory for hostile.json and hostile.md")
    parser.add_argument("--budget", type=float, default=900.0, help="seconds for the whole run (default 900)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every category's trial count")
    parser.add_argument("--only", action="append", choices=sorted(PLAN), help="run only this category (repeatable)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tv-hostile-") as tmp:
        plan = {k: max(1, round(v * args.scale)) for k, v in PLAN.items() if not args.only or k in args.only}
        for i, (name, count) in enumerate(plan.items()):
            left = args.budget - (time.monotonic() - started)
            share = left * count / max(1, sum(list(plan.values())[i:]))
            print(f"{name}: {count} trials (up to {share:.0f} s)", flush=True)
            (Path(tmp) / name).mkdir()
            rows += run_category(name, count, args.seed, Path(tmp), share)
    summary = summarize(rows)
    meta = {"command": "TRITON_INTERPRET=1 PYTHONPATH=src python bench/hostile.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
                       f"{platform.python_version()}", "seconds": time.monotonic() - started}
    (out / "hostile.json").write_text(json.dumps({"meta": meta, "summary": summary, "trials": rows}, indent=1))
    (out / "hostile.md").write_text(markdown(summary, meta, rows))
    print(markdown(summary, meta, rows))
    t = summary["total"]
    return 1 if t["crashes"] or t["stalls"] or t["undeclared"] else 0


if __name__ == "__main__":
    sys.exit(main())
