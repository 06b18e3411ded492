"""``tunevault demo``: tune three real kernels in a fresh process, restart and tune nothing, then serve.

After the warm restart the warm process seals and serves a key warmup never saw: one line says
why it missed, and nothing is benchmarked (the serving contract).

The parent never imports torch or triton: each phase is ``python -m tunevault.demo.run`` in a
new process (a real restart), which picks Triton's interpreter itself when there is no GPU.
Before the cold phase the demo kernels' decisions are deleted from the store, so cold tunes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from typing import Any

from tunevault.cli.output import print_json, print_table

# Variables that would change what the demo shows (where decisions come from, whether it tunes).
# The others (TUNEVAULT_ISOLATE, _TOLERANCE, _EVENTS, _CPU_BENCH_REPS, ...) pass through.
_CHILD_DROPS = ("TUNEVAULT_MODE", "TUNEVAULT_ON_MISS", "TUNEVAULT_STORE", "TUNEVAULT_REMOTE",
                "TUNEVAULT_BUNDLE", "TUNEVAULT_BUNDLE_KEY", "TUNEVAULT_CAPTURE")

# A day per phase: the demo takes seconds; beyond this a number is a typo (and inf overflows the wait).
MAX_TIMEOUT_S = 86400.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="tune real kernels cold, restart warm: 0 benchmark runs",
                       description="Run three autotuned kernels in a fresh process twice against the "
                                   "store: cold (tunes) and warm restart (loads, no benchmarking).")
    p.add_argument("--json", action="store_true", help="print both phases' results as JSON")
    p.add_argument("--timeout", type=float, default=600.0,
                   help=f"seconds allowed per phase, above 0 and at most {MAX_TIMEOUT_S:.0f} (default 600)")
    p.set_defaults(func=cmd_demo)


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _CHILD_DROPS}


def check_timeout(timeout: float) -> float:
    """``timeout`` if it is a usable wait, else ValueError (exit 2) before the store is touched:
    0 or less would clear the demo's decisions and then fail, inf or 1e10 overflow the wait."""
    if not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT_S):
        raise ValueError(f"--timeout takes seconds above 0 and at most {MAX_TIMEOUT_S:.0f}; got {timeout!r}")
    return timeout


def run_phase(phase: str, url: str, timeout: float) -> dict[str, Any]:
    """Run one phase in a fresh interpreter; its last stdout line is its JSON result."""
    cmd = [sys.executable, "-m", "tunevault.demo.run", "--phase", phase, "--store", url]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env())
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"the {phase} phase did not finish within {timeout:.0f} s") from exc
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except ValueError:
        result = None
    if not isinstance(result, dict) or "kernels" not in result:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-20:])
        raise RuntimeError(f"the {phase} phase failed (exit {proc.returncode}):\n{tail}")
    return result


def _bench(row: dict[str, Any]) -> str:
    """Launches counted below the autotuner; an isolated worker's runs are only known to the tuner."""
    counted, reported = row["bench_runs"], row.get("tuner_benchmark_runs", 0)
    return f"{reported} (in worker)" if counted == 0 and reported > 0 else str(counted)


def _benched(row: dict[str, Any]) -> int:
    return max(row["bench_runs"], row.get("tuner_benchmark_runs", 0), row.get("tunings", 0))


def _verdict(cold: dict[str, Any], warm: dict[str, Any]) -> tuple[bool, list[str]]:
    problems = []
    warm_runs = sum(_benched(r) for r in warm["kernels"])
    if warm_runs:
        problems.append(f"warm restart benchmarked ({warm_runs} runs): decisions were not reused")
    for phase in (cold, warm):
        for r in phase["kernels"]:
            if not r["ok"]:
                problems.append(f"{phase['phase']}: {r['kernel']} result differs from torch "
                                f"(max error {r['max_error']:.3g})")
    for c, w in zip(cold["kernels"], warm["kernels"], strict=True):
        if c["config_index"] != w["config_index"]:
            problems.append(f"{c['kernel']}: warm launched config #{w['config_index']}, "
                            f"cold chose #{c['config_index']}")
    if not sum(_benched(r) for r in cold["kernels"]):
        problems.append("cold run did not benchmark: the store still held decisions for the demo kernels")
    serving = warm.get("serving") or {}
    if serving.get("bench_runs", 1) or serving.get("tunings", 1):
        problems.append(f"serving after the seal benchmarked ({serving.get('bench_runs')} runs, "
                        f"{serving.get('tunings')} tunings)")
    if not serving.get("diagnosis") or not serving.get("ok"):
        problems.append("serving an unseen key after the seal gave no one-line diagnosis or a wrong result")
    return not problems, problems


def cmd_demo(args: argparse.Namespace) -> int:
    from tunevault.cli.store_cmds import open_cli_store, store_url
    from tunevault.demo.run import DEMO_MODULE
    from tunevault.policy.settings import env_problems, warn_ignored
    from tunevault.store.base import Query, redact

    check_timeout(args.timeout)
    # The phases' stderr is shown only when one fails: a malformed variable they read (and replace
    # by its default) is said here, once, as install() would say it.
    for problem in env_problems(_child_env()).values():
        warn_ignored(problem)
    if store_url(args).startswith("memory:"):  # each phase is a new process: a restart must find the decisions
        raise ValueError("the demo restarts the process, so it needs a persistent store (sqlite:///... or "
                         "redis://...); memory:// forgets every decision at each restart")
    store = open_cli_store(args)
    url = store.url
    try:
        cleared = store.delete(Query(kernel=DEMO_MODULE))
    finally:
        store.close()
    if not args.json:
        print(f"store: {redact(url)}")
        print(f"cleared {cleared} stored decision(s) of {DEMO_MODULE} so the cold run really tunes")
        print("cold: fresh process, tuning ...", flush=True)
    try:
        cold = run_phase("cold", url, args.timeout)
        if not args.json:
            print("warm: fresh process (a restart), same store ...", flush=True)
        warm = run_phase("warm", url, args.timeout)
    except RuntimeError as exc:
        print(f"tunevault demo: {exc}", file=sys.stderr)
        return 1
    ok, problems = _verdict(cold, warm)
    if args.json:
        print_json({"store": redact(url), "cleared": cleared, "cold": cold, "warm": warm, "ok": ok,
                    "problems": problems})
        return 0 if ok else 1
    _print_report(cold, warm, "tunevault" + (f" --store {args.store}" if args.store else ""))
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    return 0 if ok else 1


def _print_report(cold: dict[str, Any], warm: dict[str, Any], cli: str) -> None:
    rows = []
    for c, w in zip(cold["kernels"], warm["kernels"], strict=True):
        rows.append([c["kernel"], c["key"], f"#{c['config_index']} {c['config']}", _bench(c), _bench(w),
                     f"{c['first_ms']:.0f}", f"{w['first_ms']:.0f}"])
    fp = cold["fingerprint"]
    backend = "Triton interpreter (no GPU)" if cold["interpreter"] else f"{fp['device']} ({fp['target']})"
    print_table(["kernel", "key", "chosen config", "bench cold", "bench warm", "1st ms cold", "1st ms warm"],
                rows, title=f"tunevault demo on {backend}, triton {fp['triton']}")
    print("bench = kernel runs spent benchmarking (counted below the autotuner); "
          "1st ms = time to the first result, tuning included")
    cold_runs = sum(_benched(r) for r in cold["kernels"])
    warm_runs = sum(_benched(r) for r in warm["kernels"])
    cold_ms = sum(r["first_ms"] for r in cold["kernels"])
    warm_ms = sum(r["first_ms"] for r in warm["kernels"])
    speedup = f" ({cold_ms / warm_ms:.0f}x)" if warm_ms > 0 else ""
    print(f"warm restart: {warm_runs} benchmark runs (cold: {cold_runs}); "
          f"time to first results {cold_ms:.0f} ms -> {warm_ms:.0f} ms{speedup}")
    serving = warm.get("serving") or {}
    print("serving: sealed, then scaled_add with float16 inputs, a key warmup never saw:")
    print(f"  {serving.get('diagnosis') or '(no diagnosis)'}")
    print(f"  -> served with {serving.get('served_with') or '?'}: {serving.get('bench_runs')} benchmark runs, "
          f"{serving.get('tunings')} tunings, result {'matches' if serving.get('ok') else 'DIFFERS from'} torch")
    print(f"every candidate's timings: {cli} show matmul; all decisions: {cli} ls")
