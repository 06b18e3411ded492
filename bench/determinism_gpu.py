"""One winner per key over fresh processes, and its price, measured by CUDA graph replay.

    PYTHONPATH=src:bench python3 bench/determinism_gpu.py --out OUT_DIR [--budget 300] [--runs 5]
    TRITON_INTERPRET=1 PYTHONPATH=src:bench python3 bench/determinism_gpu.py --out /tmp/det --runs 2  # smoke

Issue 11, part 1 on a GPU. Keys: the GPU suite's kernels (24-config matmul, 12-config RMSNorm,
12-config FLA-style chunked kernel) and a 24-config RMSNorm at decode sizes, a few microseconds
a launch (``rmsnorm_small``). Each run is a fresh process with its own store (tunevault) or its
own nothing (stock ``triton.autotune``), tuning every key once; runs alternate stock and
tunevault. Then one more process times *every* config of every key by CUDA graph replay
(N launches per graph, median of interleaved rounds) and reports, per key, the distinct winners
on each side and how much slower than the best each chosen config runs. Targets: 0 keys with
more than one tunevault winner; every tunevault choice within 2% of the best.

All processes share one Triton cache directory (the first run compiles), since compile time is
not what is measured here. Writes ``determinism.json`` and ``determinism.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SMOKE = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def keys() -> list[tuple[str, dict[str, int]]]:
    if SMOKE:
        return [("rmsnorm_small", {"rows": 4, "cols": 64}), ("matmul", {"M": 32, "N": 32, "K": 32})]
    return [("rmsnorm_small", {"rows": 64, "cols": 4096}), ("rmsnorm_small", {"rows": 256, "cols": 4096}),
            ("rmsnorm", {"rows": 8192, "cols": 4096}), ("matmul", {"M": 1024, "N": 1024, "K": 1024}),
            ("chunk_fwd_o", {"T": 8192, "H": 16, "K": 64, "V": 128, "BT": 64})]


def log(msg: str) -> None:
    print(f"[determinism_gpu] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ tasks (fresh processes)

def task_tune(spec: dict[str, Any]) -> dict[str, Any]:
    """Tune every key once (stock or tunevault); the declared index each key launched."""
    if spec["mode"] == "tunevault":
        import tunevault

        tunevault.install(mode="tune", store=spec["store"])
    import torch

    import gpu_kernels as gk

    device = "cpu" if SMOKE else "cuda"
    if spec["mode"] == "stock" and SMOKE:  # stock cannot benchmark under the interpreter
        from tunevault.engine.timing import cpu_bench

        for kernel in gk.KERNELS.values():
            gk.autotuner_of(kernel).__dict__["do_bench"] = cpu_bench
    out = {}
    for kernel, shape in keys():
        launch = gk.make_launch(kernel, shape, device)
        launch()
        if not SMOKE:
            torch.cuda.synchronize()
        at = gk.autotuner_of(gk.KERNELS[kernel])
        out[gk.label(kernel, shape)] = next(i for i, c in enumerate(at.configs) if c is at.best_config)
    notes = {}
    if spec["mode"] == "tunevault":
        from tunevault.integration.triton_adapter import runtime

        notes = {k: dict(d.provenance).get("selection") for (_n, k), d in runtime().used.items()}
    return {"chosen": out, "selection": notes}


def task_verify(spec: dict[str, Any]) -> dict[str, Any]:
    """Every config of every key timed by graph replay, interleaved in rounds: median ms per config."""
    import gpu_kernels as gk

    device = "cpu" if SMOKE else "cuda"
    out, low = {}, {}
    for kernel, shape in keys():
        at = gk.autotuner_of(gk.KERNELS[kernel])
        launch = gk.make_launch(kernel, shape, device)
        saved, times = at.configs, {i: [] for i in range(len(at.configs))}
        fastest: dict[int, list[float]] = {i: [] for i in range(len(at.configs))}
        try:
            for _round in range(spec["rounds"]):
                for i in times:
                    at.configs = [saved[i]]  # one config: stock launches it without tuning
                    try:
                        median, quickest = replay_stats(launch)
                        times[i].append(median)
                        fastest[i].append(quickest)
                    except Exception as exc:  # a config that does not compile for this shape
                        times[i].append(float("inf"))
                        fastest[i].append(float("inf"))
                        log(f"{kernel} config {i}: {type(exc).__name__}")
        finally:
            at.configs = saved
        out[gk.label(kernel, shape)] = {str(i): sorted(t)[len(t) // 2] for i, t in times.items()}
        low[gk.label(kernel, shape)] = {str(i): min(t) for i, t in fastest.items()}
    return {"ms": out, "fastest_ms": low}


def replay_ms(launch: Any) -> float:
    """Per-launch time of ``launch`` replayed from a captured graph of N launches (median of 10)."""
    return replay_stats(launch)[0]


def replay_stats(launch: Any) -> tuple[float, float]:
    """(median, fastest) per-launch time over 10 replays of a captured graph of N launches."""
    if SMOKE:
        from tunevault.engine.timing import cpu_bench

        median, fastest = cpu_bench(launch, quantiles=(0.5, 0.0))
        return median, fastest
    import torch

    launch()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    launch()
    end.record()
    torch.cuda.synchronize()
    n = max(1, min(500, int(2.0 / max(start.elapsed_time(end), 1e-3))))  # graphs of about 2 ms
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _i in range(n):
            launch()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _i in range(10):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / n)
    return sorted(samples)[len(samples) // 2], min(samples)


TASKS = {"tune": task_tune, "verify": task_verify}


# ------------------------------------------------------------------------ driver

def child(task: str, spec: dict[str, Any], env: dict[str, str], timeout: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--task", task, "--spec", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=max(5.0, timeout))
    if proc.returncode != 0:
        raise RuntimeError(f"{task} {spec.get('mode', '')} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out")
    p.add_argument("--budget", type=float, default=300.0, help="seconds for the whole run")
    p.add_argument("--runs", type=int, default=5, help="fresh processes per side")
    p.add_argument("--no-stock", action="store_true", help="tunevault runs only")
    p.add_argument("--task", choices=sorted(TASKS), help=argparse.SUPPRESS)
    p.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for path in (str(HERE), str(ROOT / "src")):
        if path not in sys.path:
            sys.path.insert(0, path)
    if a.task:
        result = TASKS[a.task](json.loads(a.spec))
        print("\n" + json.dumps(result))
        return 0
    if not a.out:
        p.error("--out is required")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="tunevault-determinism-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEVAULT_")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(HERE), env.get("PYTHONPATH", "")]),
               TRITON_CACHE_DIR=str(tmp / "triton-cache"))
    if SMOKE:
        env.update(TUNEVAULT_BENCH_SMOKE="1", TUNEVAULT_CPU_BENCH_REPS="3")
    report: dict[str, Any] = {"script": "determinism_gpu", "command": " ".join([sys.executable, *sys.argv]),
                              "smoke": SMOKE, "runs": {"stock": [], "tunevault": []}, "errors": []}
    sides = ["tunevault"] if a.no_stock else ["stock", "tunevault"]
    verify_reserve = 20.0 if SMOKE else 60.0
    per_run = dict.fromkeys(sides, 0.0)  # each side's last run (the first run of all compiles for both)
    for i in range(a.runs):
        for side in sides:
            left = a.budget - (time.monotonic() - t0) - verify_reserve
            if left < per_run[side] * 1.2 or left <= 0:
                report["errors"].append(f"stopped before {side} run {i + 1}: budget")
                break
            started = time.monotonic()
            log(f"{side} run {i + 1}/{a.runs}")
            try:
                res = child("tune", {"mode": side, "store": f"sqlite:///{tmp / f'{side}{i}.db'}"}, env, left)
                report["runs"][side].append(res)
            except Exception as exc:
                report["errors"].append(f"{side} run {i + 1}: {exc}")
            per_run[side] = time.monotonic() - started
    log("timing every config by graph replay")
    try:
        left = a.budget - (time.monotonic() - t0)
        verified = child("verify", {"rounds": 3 if SMOKE else 5}, env, max(left, 30.0))
        report["replay_ms"], report["replay_fastest_ms"] = verified["ms"], verified["fastest_ms"]
    except Exception as exc:
        report["errors"].append(f"verify: {exc}")
    report["summary"] = summarize(report)
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    (out / "determinism.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "determinism.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    ms, low = report.get("replay_ms", {}), report.get("replay_fastest_ms", {})
    per_key: dict[str, Any] = {}
    for side, runs in report["runs"].items():
        for run in runs:
            for key, index in run["chosen"].items():
                row = per_key.setdefault(key, {}).setdefault(side, {"winners": [], "worst_slowdown": None,
                                                                    "worst_slowdown_fastest": None})
                row["winners"].append(index)
                if low.get(key):
                    slow_low = low[key][str(index)] / min(low[key].values()) - 1.0
                    row["worst_slowdown_fastest"] = max(row["worst_slowdown_fastest"] or 0.0, slow_low)
                times = ms.get(key)
                if times:
                    best = min(times.values())
                    slow = times[str(index)] / best - 1.0 if best > 0 else None
                    if slow is not None:
                        row["worst_slowdown"] = max(row["worst_slowdown"] or 0.0, slow)
    for key, sides in per_key.items():
        for row in sides.values():
            row["distinct"] = len(set(row["winners"]))
        if ms.get(key):
            sides["best_ms"] = min(ms[key].values())
    split = {side: sum(1 for s in per_key.values() if s.get(side, {}).get("distinct", 0) > 1)
             for side in report["runs"]}
    worst = {side: max((s[side]["worst_slowdown"] for s in per_key.values()
                        if side in s and s[side]["worst_slowdown"] is not None), default=None)
             for side in report["runs"]}
    worst_low = {side: max((s[side]["worst_slowdown_fastest"] for s in per_key.values()
                            if side in s and s[side].get("worst_slowdown_fastest") is not None), default=None)
                 for side in report["runs"]}
    return {"per_key": per_key, "keys_with_more_than_one_winner": split, "worst_slowdown_vs_best": worst,
            "worst_slowdown_vs_best_by_fastest_replay": worst_low, "keys": len(per_key)}


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    n = {side: len(runs) for side, runs in report["runs"].items()}
    lines = ["# One winner per key over fresh processes (graph-replay prices)", "",
             f"{'CPU smoke under the interpreter' if report['smoke'] else 'GPU'}; runs per side: {n}; "
             f"{report.get('elapsed_s', 0)} s. Command: `{report['command']}`", "",
             "| key | best ms (graph replay) | stock winners | stock worst vs best | tunevault winners | "
             "tunevault worst vs best |", "|---|---:|---|---:|---|---:|"]

    def cell(row: dict[str, Any] | None) -> tuple[str, str]:
        if not row:
            return "-", "-"
        slow = row["worst_slowdown"]
        return " ".join(f"#{i}" for i in row["winners"]), "-" if slow is None else f"+{slow:.1%}"

    for key, sides in s["per_key"].items():
        best = sides.get("best_ms")
        st, tv = cell(sides.get("stock")), cell(sides.get("tunevault"))
        lines.append(f"| {key} | {'-' if best is None else f'{best:.4f}'} | {st[0]} | {st[1]} | {tv[0]} | {tv[1]} |")
    split, worst = s["keys_with_more_than_one_winner"], s["worst_slowdown_vs_best"]
    lines += ["", f"Keys with more than one winner: {split} of {s['keys']} (target: tunevault 0).",
              "Worst chosen config vs the best config: "
              + ", ".join(f"{k} {'-' if v is None else f'+{v:.1%}'}" for k, v in worst.items())
              + " (target: tunevault <= +2%).",
              "Same, each config priced by its fastest replay instead of the median: "
              + ", ".join(f"{k} {'-' if v is None else f'+{v:.1%}'}"
                          for k, v in s.get("worst_slowdown_vs_best_by_fastest_replay", {}).items()) + "."]
    lines += [f"- {e}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
