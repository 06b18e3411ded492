"""GPU suite: tunevault vs stock ``triton.autotune``, side by side in one run, on real kernels.

    PYTHONPATH=src python bench/gpu_suite.py --out OUT_DIR [--quick] [--budget 480]
    PYTHONPATH=src python bench/gpu_suite.py --cpu-smoke --out /tmp/smoke   # plumbing only, no GPU

Parts, in order of importance (each in try/except; parts that no longer fit the time budget
are skipped with a note): 1. hit-path dispatch overhead (bench/dispatch_overhead.py, real
launches); 2. cold tuning wall time per kernel, fresh processes and empty Triton caches, and
the runtime of each side's chosen config measured in one process; 3. GPU memory the serving
process holds after tuning; 4. warm restart: time to first result and keys re-tuned;
5. run-to-run agreement: distinct winners per key over fresh processes. Writes
``results.json`` (after every part) and ``summary.md`` into ``--out``; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SMOKE = os.environ.get("TUNEVAULT_BENCH_SMOKE", "0") == "1"


# ----------------------------------------------------------------------------------------------
# tasks: each runs in a fresh process and returns one JSON document
# ----------------------------------------------------------------------------------------------

def _sync() -> None:
    import torch

    if torch.cuda.is_available() and not SMOKE:
        torch.cuda.synchronize()


def _mem() -> dict[str, int] | None:
    import torch

    if SMOKE or not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {"reserved": torch.cuda.memory_reserved(), "allocated": torch.cuda.memory_allocated(),
            "free": free, "total": total}


def task_tune(spec: dict[str, Any]) -> dict[str, Any]:
    """Launch every workload once (tuning on a miss) in ``spec['mode']``; time, winners, memory."""
    t_import = time.time()
    mode, device = spec["mode"], "cpu" if SMOKE else "cuda"
    counted = {"configs_benchmarked": 0}
    if mode == "tunevault":  # first, as TUNEVAULT_MODE would at Triton's import in a real server
        import tunevault
        from tunevault.policy.settings import Settings

        opts: dict[str, Any] = {"store": spec["store"], "on_miss": "tune"}
        fields = getattr(Settings, "__dataclass_fields__", {})
        features = [f for f in ("isolate",) if f in fields and spec.get(f, True)]
        opts.update({f: True for f in features})
        tunevault.install(mode="tune", **opts)
    import torch
    from triton.runtime.autotuner import Autotuner

    import gpu_kernels as gk

    if mode != "tunevault":
        features = []
        original = Autotuner._bench

        def counting_bench(self: Any, *a: Any, **k: Any) -> Any:
            counted["configs_benchmarked"] += 1
            return original(self, *a, **k)

        Autotuner._bench = counting_bench
        if SMOKE:  # stock cannot benchmark under the interpreter; give it the CPU timer
            from tunevault.engine.timing import cpu_bench

            for kernel in gk.KERNELS.values():
                gk.autotuner_of(kernel).__dict__["do_bench"] = cpu_bench
    if spec.get("lib") == "fla":  # a third-party library's own autotuned kernels, through its ops
        work = [(lab, None, None, launch) for lab, launch in gk.fla_launches(device)]
    else:
        shapes = gk.workloads(spec.get("few", False))
        work = [(gk.label(k, s), k, s, gk.make_launch(k, s, device)) for k, s in shapes]
    _sync()
    mem0, t_ready = _mem(), time.time()
    keys, first = [], None
    for lab, kname, shape, launch in work:
        benched = counted["configs_benchmarked"]
        t = time.perf_counter()
        launch()
        _sync()
        wall = time.perf_counter() - t
        first = first or time.time()
        if kname is None:
            keys.append({"key": lab, "kernel": lab.split("[")[0], "wall_s": wall,
                         "configs_benchmarked": counted["configs_benchmarked"] - benched})
            continue
        at = gk.autotuner_of(gk.KERNELS[kname])
        best = at.best_config
        index = next((i for i, c in enumerate(at.configs) if c is best), None)
        if index is None:
            index = next((i for i, c in enumerate(at.configs) if str(c) == str(best)), -1)
        keys.append({"key": lab, "kernel": kname, "shape": shape, "wall_s": wall, "config_index": index,
                     "config": str(best), "configs_benchmarked": counted["configs_benchmarked"] - benched})
    t_done = time.time()
    out: dict[str, Any] = {"mode": mode, "features": features, "keys": keys,
                           "setup_s": t_ready - t_import, "spawn_to_ready_s": t_ready - spec["t_spawn"],
                           "time_to_first_result_s": first - spec["t_spawn"],
                           "time_to_all_results_s": t_done - spec["t_spawn"],
                           "tuning_wall_s": sum(k["wall_s"] for k in keys)}
    if mode == "tunevault":
        out["release"] = _seal_and_release()
        stats = tunevault.stats()
        out["stats"] = stats
        from tunevault.store.base import open_store

        store = open_store(spec["store"])  # where each tuning's time went, as the engine noted it
        out["stages"] = [{"kernel": d.kernel.name, "key": d.key.describe(), "tuning_s": round(d.tuning_seconds, 3),
                          **dict(d.provenance)} for d in store.decisions()
                         if dict(d.provenance).get("pid") == os.getpid()]  # this run's tunings only
        store.close()
        total = stats.get("kernels", {}).get("total", {}).values()
        out["keys_tuned"] = int(sum(p.get("tunings", 0) for p in total))
        out["benchmark_runs"] = int(sum(p.get("benchmark_runs", 0) for p in total))
    else:
        out.update(counted)
        out["keys_tuned"] = sum(1 for k in keys if k["configs_benchmarked"])
    time.sleep(0.0 if SMOKE else 1.0)
    mem1 = _mem()
    if mem0 and mem1:
        out["mem"] = {"before": mem0, "after": mem1, "reserved_delta": mem1["reserved"] - mem0["reserved"],
                      "driver_used_delta": mem0["free"] - mem1["free"]}
    del torch
    return out


def _seal_and_release() -> dict[str, Any]:
    """End warmup as a server does (``tunevault.seal()``) and time how soon the isolated worker
    exits and the device gets its memory back (driver free memory, device-wide)."""
    import torch

    import tunevault
    from tunevault.engine import isolated

    pid = isolated.worker_pid()
    free0 = torch.cuda.mem_get_info()[0] if not SMOKE else 0
    t0 = time.perf_counter()
    tunevault.seal()
    out: dict[str, Any] = {"worker_pid": pid, "worker_exit_s": None, "memory_released_s": None}
    while time.perf_counter() - t0 < 5.0:
        waited = time.perf_counter() - t0
        if out["worker_exit_s"] is None and (pid is None or not _alive(pid)):
            out["worker_exit_s"] = round(waited, 3)
        freed = (torch.cuda.mem_get_info()[0] - free0) if not SMOKE else 0
        if out["memory_released_s"] is None and freed >= 64 << 20:
            out["memory_released_s"] = round(waited, 3)
        if out["worker_exit_s"] is not None and (pid is None or out["memory_released_s"] is not None):
            break
        time.sleep(0.01)
    time.sleep(0.5)
    out["released_bytes"] = (torch.cuda.mem_get_info()[0] - free0) if not SMOKE else 0
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) holds no device memory
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def task_runtime(spec: dict[str, Any]) -> dict[str, Any]:
    """Runtime of given declared configs per key, interleaved in one process (stock, untouched)."""
    import gpu_kernels as gk

    if SMOKE:
        from tunevault.engine.timing import cpu_bench

        def bench(fn: Any) -> float:
            return cpu_bench(fn, quantiles=(0.5,))[0]
    else:
        import triton.testing

        def bench(fn: Any) -> float:
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    from determinism_gpu import replay_ms

    device, out = "cpu" if SMOKE else "cuda", []
    for item in spec["keys"]:
        at = gk.autotuner_of(gk.KERNELS[item["kernel"]])
        launch = gk.make_launch(item["kernel"], item["shape"], device)
        saved, times = at.configs, {i: [] for i in item["configs"]}
        graph: dict[int, list[float]] = {i: [] for i in item["configs"]}
        try:
            for _round in range(spec.get("rounds", 3)):
                for i in item["configs"]:
                    at.configs = [saved[i]]  # one config: stock launches it without tuning
                    times[i].append(bench(launch))
                    graph[i].append(replay_ms(launch))
        finally:
            at.configs = saved
        out.append({"key": item["key"], "ms": {str(i): sorted(t)[len(t) // 2] for i, t in times.items()},
                    "graph_ms": {str(i): sorted(t)[len(t) // 2] for i, t in graph.items()}})
    return {"keys": out}


def task_dispatch(spec: dict[str, Any]) -> dict[str, Any]:
    import dispatch_overhead

    report = dispatch_overhead.run(rounds=spec["rounds"], sample_ms=spec["sample_ms"], force_cpu=SMOKE)
    for r in report["results"]:
        r.pop("samples_us", None)
    return report


TASKS = {"tune": task_tune, "runtime": task_runtime, "dispatch": task_dispatch}


def task_main(name: str, spec: dict[str, Any]) -> int:
    for p in (str(HERE), str(ROOT / "src")):
        if p not in sys.path:
            sys.path.insert(0, p)
    result = TASKS[name](spec)
    sys.stdout.flush()
    print("\n" + json.dumps(result))
    return 0


# ----------------------------------------------------------------------------------------------
# the suite: runs tasks in fresh processes, within a time budget, one failure at a time
# ----------------------------------------------------------------------------------------------

class Suite:
    def __init__(self, out: Path, quick: bool, budget: float, agreement_runs: int,
                 skip: frozenset[str] = frozenset()) -> None:
        self.out, self.quick, self.budget, self.agreement_runs = out, quick, budget, agreement_runs
        self.skip = skip
        self.t0 = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="tunevault-gpu-suite-"))
        self.n_child = 0
        self.report: dict[str, Any] = {"suite": "gpu_suite", "command": " ".join([sys.executable, *sys.argv]),
                                       "smoke": SMOKE, "quick": quick, "budget_s": budget, "parts": {},
                                       "errors": {}, "skipped": []}
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def save(self) -> None:
        self.report["elapsed_s"] = time.monotonic() - self.t0
        (self.out / "results.json").write_text(json.dumps(self.report, indent=1, default=str) + "\n")

    def part(self, name: str, needs_s: float, fn: Any) -> Any:
        if name in self.skip:
            self.report["skipped"].append(f"{name}: --skip")
            return None
        if self.left() < needs_s:
            self.report["skipped"].append(f"{name}: {self.left():.0f}s of the budget left, "
                                          f"needs ~{needs_s:.0f}s")
            return None
        started = time.monotonic()
        print(f"[gpu_suite] {name} ({self.left():.0f}s of budget left)", file=sys.stderr, flush=True)
        try:
            result = fn()
            self.report["parts"][name] = result
            return result
        except Exception as exc:
            self.report["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
            return None
        finally:
            self.report.setdefault("part_seconds", {})[name] = round(time.monotonic() - started, 1)
            self.save()

    def child(self, task: str, spec: dict[str, Any], cache: str, timeout: float = 300.0) -> dict[str, Any]:
        """Run ``task`` in a fresh interpreter with its own Triton cache dir; its JSON result."""
        self.n_child += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEVAULT_")}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(HERE), env.get("PYTHONPATH", "")])
        env["TRITON_CACHE_DIR"] = str(self.tmp / cache)
        env.pop("TRITON_CACHE_AUTOTUNING", None)  # stock's own result cache stays off: its default
        env["TUNEVAULT_WORKER_IDLE"] = "10"
        if SMOKE:
            env.update(TRITON_INTERPRET="1", TUNEVAULT_BENCH_SMOKE="1", TUNEVAULT_CPU_BENCH_REPS="2")
        spec = {**spec, "t_spawn": time.time()}
        log = self.out / "logs" / f"{self.n_child:02d}-{task}-{spec.get('mode', '')}.log"
        limit = max(5.0, min(timeout, self.left() + 30))
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--task", task, "--spec",
                                   json.dumps(spec)], capture_output=True, text=True, env=env, cwd=str(ROOT),
                                  timeout=limit)
        except subprocess.TimeoutExpired as exc:
            log.write_text(f"TIMEOUT after {limit:.0f}s\n{exc.stdout or ''}\n{exc.stderr or ''}")
            raise RuntimeError(f"{task} ({spec.get('mode', '')}) timed out after {limit:.0f}s; "
                               f"see {log}") from None
        log.write_text(f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-20000:]}\n--- stderr\n"
                       f"{proc.stderr[-20000:]}")
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-6:]
            raise RuntimeError(f"{task} ({spec.get('mode', '')}) exited {proc.returncode}: "
                               + " | ".join(tail))
        return json.loads(proc.stdout.strip().splitlines()[-1])

    # -- parts ---------------------------------------------------------------------------------

    def dispatch(self) -> dict[str, Any]:
        spec = {"rounds": 5 if SMOKE else 101, "sample_ms": 5.0 if SMOKE else 20.0}
        return self.child("dispatch", spec, "dispatch", timeout=180)

    def cold(self, isolate: bool = True) -> dict[str, Any]:
        """Stock and tunevault, each in a fresh process with an empty Triton cache."""
        few = self.quick
        if isolate:
            stock = self.child("tune", {"mode": "stock", "few": few}, "stock")
            spec = {"mode": "tunevault", "few": few, "store": self.store("cold")}
            tv = self.child("tune", spec, "tunevault")
        else:  # stock's cold run is reused: same keys, same fresh-process conditions
            stock = self.report["parts"]["cold_tuning"]["stock"]
            tv = self.child("tune", {"mode": "tunevault", "few": few, "store": self.store("cold-inproc"),
                                     "isolate": False}, "tunevault-inproc")
            tv["mem_vs_stock"] = self.memory({"stock": stock, "tunevault": tv})
        per_kernel: dict[str, dict[str, float]] = {}
        for side, res in (("stock", stock), ("tunevault", tv)):
            for k in res["keys"]:
                per_kernel.setdefault(k["kernel"], {"stock": 0.0, "tunevault": 0.0})[side] += k["wall_s"]
        for v in per_kernel.values():
            v["ratio"] = v["tunevault"] / v["stock"] if v["stock"] else None
        ratio = tv["tuning_wall_s"] / stock["tuning_wall_s"] if stock["tuning_wall_s"] else None
        if not isolate:
            return {"tunevault": tv, "per_kernel_wall_s": per_kernel, "wall_ratio": ratio}
        return {"stock": stock, "tunevault": tv, "per_kernel_wall_s": per_kernel, "wall_ratio": ratio}

    def cold_library(self) -> dict[str, Any]:
        """Cold tuning of flash-linear-attention's own kernels: stock, isolated, in process."""
        stock = self.child("tune", {"mode": "stock", "lib": "fla"}, "stock-fla")
        out: dict[str, Any] = {"stock": stock}
        for name, isolate in (("isolated", True), ("in_process", False)):
            tv = self.child("tune", {"mode": "tunevault", "lib": "fla", "store": self.store(f"fla-{name}"),
                                     "isolate": isolate}, f"tunevault-fla-{name}")
            out[name] = tv
            out[f"{name}_ratio"] = tv["tuning_wall_s"] / stock["tuning_wall_s"] if stock["tuning_wall_s"] else None
        return out

    def store(self, name: str) -> str:
        return f"sqlite:///{self.tmp / (name + '.db')}"

    def runtime(self, cold: dict[str, Any]) -> dict[str, Any]:
        keys = [{"key": s["key"], "kernel": s["kernel"], "shape": s["shape"],
                 "configs": sorted({s["config_index"], t["config_index"]})}
                for s, t in zip(cold["stock"]["keys"], cold["tunevault"]["keys"], strict=True)]
        res = self.child("runtime", {"keys": keys, "rounds": 9}, "stock", timeout=240)
        rows = []
        for s, t, r in zip(cold["stock"]["keys"], cold["tunevault"]["keys"], res["keys"], strict=True):
            ms_s, ms_t = r["ms"][str(s["config_index"])], r["ms"][str(t["config_index"])]
            g_s, g_t = r["graph_ms"][str(s["config_index"])], r["graph_ms"][str(t["config_index"])]
            # A kernel shorter than 0.1 ms runs in a server's CUDA graph: priced by graph replay (inputs
            # warm in L2 after the first launch), as tunevault times it; longer ones by do_bench (L2 flushed).
            short = min(g_s, g_t) < 0.1
            rows.append({"key": s["key"], "stock_config": s["config_index"], "stock_ms": ms_s,
                         "tunevault_config": t["config_index"], "tunevault_ms": ms_t,
                         "stock_graph_ms": g_s, "tunevault_graph_ms": g_t,
                         "slowdown_flushed": ms_t / ms_s - 1, "slowdown_graph": g_t / g_s - 1,
                         "priced_by": "graph replay" if short else "do_bench",
                         "slowdown": (g_t / g_s if short else ms_t / ms_s) - 1})
        return {"keys": rows, "worst_slowdown": max(r["slowdown"] for r in rows),
                "worst_slowdown_flushed": max(r["slowdown_flushed"] for r in rows)}

    def memory(self, cold: dict[str, Any]) -> dict[str, Any]:
        out = {side: cold[side].get("mem") for side in ("stock", "tunevault")}
        if not all(out.values()):
            return {"note": "no CUDA device: nothing measured", **out}
        for what in ("reserved_delta", "driver_used_delta"):
            s, t = out["stock"][what], max(0, out["tunevault"][what])  # the worker gave its context back
            out[what + "_ratio"] = t / s if s > 0 else None
        return out

    def restart(self, cold: dict[str, Any]) -> dict[str, Any]:
        few = self.quick
        tv = self.child("tune", {"mode": "tunevault", "few": few, "store": self.store("cold")}, "tunevault")
        stock = self.child("tune", {"mode": "stock", "few": few}, "stock")
        return {"tunevault": tv, "stock": stock, "cold_first_result_s": {
            side: cold[side]["time_to_first_result_s"] for side in ("stock", "tunevault")}}

    def agreement(self) -> dict[str, Any]:
        winners: dict[str, dict[str, list[int]]] = {"stock": {}, "tunevault": {}}
        runs, per_pair = 0, None
        for i in range(self.agreement_runs):
            if per_pair is not None and self.left() < per_pair * 1.2:
                self.report["skipped"].append(f"agreement: stopped after {runs} runs per side (budget)")
                break
            started = time.monotonic()
            s = self.child("tune", {"mode": "stock", "few": True}, "stock")
            t = self.child("tune", {"mode": "tunevault", "few": True, "store": self.store(f"agree{i}")},
                           "tunevault")
            for side, res in (("stock", s), ("tunevault", t)):
                for k in res["keys"]:
                    winners[side].setdefault(k["key"], []).append(k["config_index"])
            runs += 1
            per_pair = time.monotonic() - started
        distinct = {side: {k: len(set(v)) for k, v in w.items()} for side, w in winners.items()}
        split = {side: sum(1 for n in d.values() if n > 1) for side, d in distinct.items()}
        return {"runs_per_side": runs, "winners": winners, "distinct_winners": distinct,
                "keys_with_disagreement": split}

    def run(self) -> None:
        self.report["env"] = self.env()
        self.save()
        self.part("dispatch", 30, self.dispatch)
        cold = self.part("cold_tuning", 60, self.cold)
        if cold:
            self.part("memory", 0, lambda: self.memory(cold))
            self.part("warm_restart", 30, lambda: self.restart(cold))
            self.part("chosen_runtime", 20, lambda: self.runtime(cold))
            if "isolate" in (cold["tunevault"].get("features") or []):
                self.part("cold_tuning_inprocess", 90, lambda: self.cold(isolate=False))
        else:
            self.report["skipped"].append("memory, warm_restart, chosen_runtime: need cold_tuning")
        if not SMOKE:
            self.part("cold_tuning_library", 90, self.cold_library)
        self.part("agreement", 40, self.agreement)
        shutil.rmtree(self.tmp, ignore_errors=True)
        (self.out / "summary.md").write_text(summary_md(self.report))
        self.save()

    @staticmethod
    def env() -> dict[str, Any]:
        code = ("import json, platform, torch, triton; d = torch.cuda.is_available(); print(json.dumps({"
                "'python': platform.python_version(), 'torch': torch.__version__, "
                "'triton': triton.__version__, 'cuda': torch.version.cuda, "
                "'gpu': torch.cuda.get_device_name() if d and not SMOKE else None}))")
        env = {**os.environ, "SMOKE": "1" if SMOKE else ""}
        proc = subprocess.run([sys.executable, "-c", "import os; SMOKE = bool(os.environ['SMOKE']); " + code],
                              capture_output=True, text=True, timeout=120, env=env)
        ok = proc.returncode == 0
        info = json.loads(proc.stdout.strip().splitlines()[-1]) if ok else {"error": proc.stderr[-500:]}
        return {**info, "cpus": os.cpu_count(), "host": os.uname().nodename}


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------

def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _mib(v: Any) -> str:
    return "-" if v is None else f"{v / 2**20:.0f} MiB"


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(metric, stock, tunevault, tunevault vs stock, target) for every part that ran."""
    parts, rows = report["parts"], []
    for r in (parts.get("dispatch") or {}).get("results", []):
        ov = r["overhead_us"]
        rows.append((f"hit-path overhead, us/launch ({r['case']})", _f(ov["stock"]), _f(ov["tunevault"]),
                     _f(r["ratio"], "{:.2f}x"), "<= 0.30x"))
    cold = parts.get("cold_tuning")
    if cold:
        rows.append(("cold tuning wall, s (all keys)", _f(cold["stock"]["tuning_wall_s"], "{:.1f}"),
                     _f(cold["tunevault"]["tuning_wall_s"], "{:.1f}"), _f(cold["wall_ratio"], "{:.2f}x"),
                     "<= 0.30x isolated, 0.25x in process"))
        for kernel, v in cold["per_kernel_wall_s"].items():
            rows.append((f"  {kernel}", _f(v["stock"], "{:.1f}"), _f(v["tunevault"], "{:.1f}"),
                         _f(v["ratio"], "{:.2f}x"), ""))
        feats = ", ".join(cold["tunevault"].get("features") or []) or "in-process"
        rows.append(("  tunevault tuning ran", "", feats, "", ""))
    inproc = parts.get("cold_tuning_inprocess")
    if inproc and cold:
        rows.append(("cold tuning wall, s (tunevault in-process)",
                     _f(cold["stock"]["tuning_wall_s"], "{:.1f}"),
                     _f(inproc["tunevault"]["tuning_wall_s"], "{:.1f}"), _f(inproc["wall_ratio"], "{:.2f}x"),
                     ""))
        m = inproc["tunevault"].get("mem_vs_stock") or {}
        if m.get("tunevault"):
            rows.append(("GPU memory held after tuning (driver, in-process)",
                         _mib(m["stock"]["driver_used_delta"]), _mib(m["tunevault"]["driver_used_delta"]),
                         _f(m.get("driver_used_delta_ratio"), "{:.2f}x"), ""))
    lib = parts.get("cold_tuning_library")
    if lib:
        stock_s = lib["stock"]["tuning_wall_s"]
        for name in ("isolated", "in_process"):
            rows.append((f"cold tuning wall, s (flash-linear-attention's kernels, {name.replace('_', ' ')})",
                         _f(stock_s, "{:.1f}"), _f(lib[name]["tuning_wall_s"], "{:.1f}"),
                         _f(lib[f"{name}_ratio"], "{:.2f}x"), "<= 0.30x" if name == "isolated" else "<= 0.25x"))
    release = (cold or {}).get("tunevault", {}).get("release") or {}
    if release.get("worker_pid"):
        rows.append(("isolated worker: exit / device memory back after seal(), s", "",
                     f"{_f(release.get('worker_exit_s'))} / {_f(release.get('memory_released_s'))}",
                     _mib(release.get("released_bytes")), "<= 2 s"))
    rt = parts.get("chosen_runtime")
    if rt:
        rows.append(("chosen config runtime vs stock's (worst key; graph replay below 0.1 ms)", "", "",
                     f"{rt['worst_slowdown']:+.1%}", "<= +2%"))
        if "worst_slowdown_flushed" in rt:
            rows.append(("  same, every kernel by do_bench (L2 flushed before each run)", "", "",
                         f"{rt['worst_slowdown_flushed']:+.1%}", ""))
    mem = parts.get("memory")
    if mem and mem.get("stock"):
        for what, name in (("driver_used_delta", "GPU memory held after tuning (driver)"),
                           ("reserved_delta", "GPU memory reserved by torch after tuning")):
            rows.append((name, _mib(mem["stock"][what]), _mib(mem["tunevault"][what]),
                         _f(mem.get(what + "_ratio"), "{:.2f}x"), "lower"))
    rs = parts.get("warm_restart")
    if rs:
        cold_first = rs["cold_first_result_s"]
        cold_note = f"cold {_f(cold_first['stock'], '{:.1f}')} / {_f(cold_first['tunevault'], '{:.1f}')}"
        rows.append(("restart: time to first result, s", _f(rs["stock"]["time_to_first_result_s"], "{:.1f}"),
                     _f(rs["tunevault"]["time_to_first_result_s"], "{:.1f}"), cold_note, ""))
        rows.append(("restart: time to all results, s", _f(rs["stock"]["time_to_all_results_s"], "{:.1f}"),
                     _f(rs["tunevault"]["time_to_all_results_s"], "{:.1f}"), "", ""))
        rows.append(("restart: keys re-tuned / benchmark runs",
                     f"{rs['stock']['keys_tuned']} / {rs['stock'].get('configs_benchmarked', '-')}",
                     f"{rs['tunevault']['keys_tuned']} / {rs['tunevault'].get('benchmark_runs', '-')}", "",
                     "0 / 0"))
    ag = parts.get("agreement")
    if ag:
        n = ag["runs_per_side"]
        total = len(ag["distinct_winners"]["stock"])
        rows.append((f"agreement: keys with >1 winner ({n} fresh runs)",
                     f"{ag['keys_with_disagreement']['stock']}/{total}",
                     f"{ag['keys_with_disagreement']['tunevault']}/{total}", "", "0"))
    return rows


def table(report: dict[str, Any]) -> str:
    env = report.get("env", {})
    head = ("metric", "stock", "tunevault", "tv vs stock", "target")
    rows = [head, *summary_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"tunevault vs stock triton.autotune on {env.get('gpu') or 'CPU (smoke)'}, "
             f"triton {env.get('triton')}, torch {env.get('torch')} ({report.get('elapsed_s', 0):.0f}s)"]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0:
            lines.append("-" * len(lines[-1]))
    for name, err in report["errors"].items():
        lines.append(f"ERROR {name}: {err.splitlines()[0]}")
    for note in report["skipped"]:
        lines.append(f"skipped {note}")
    return "\n".join(lines)


def summary_md(report: dict[str, Any]) -> str:
    env = report.get("env", {})
    out = ["# GPU suite: tunevault vs stock triton.autotune", "",
           f"Device: {env.get('gpu') or 'none (CPU smoke run under the interpreter)'}; "
           f"triton {env.get('triton')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
           f"Python {env.get('python')}, {env.get('cpus')} CPUs.",
           f"Command: `{report['command']}`", "",
           "| metric | stock | tunevault | tunevault vs stock | target |", "|---|---:|---:|---:|---|"]
    out += [f"| {' | '.join(c.strip() or ' ' for c in r)} |" for r in summary_rows(report)]
    if report["errors"] or report["skipped"]:
        out += ["", "Errors and skipped parts:", ""]
        out += [f"- ERROR {k}: {v.splitlines()[0]}" for k, v in report["errors"].items()]
        out += [f"- skipped {s}" for s in report["skipped"]]
    out += ["", "Full data: results.json; child process logs: logs/."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    global SMOKE
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="directory for results.json, summary.md and logs/")
    p.add_argument("--quick", action="store_true", help="one key per kernel, 3 agreement runs")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes and configs under the interpreter")
    p.add_argument("--budget", type=float, default=480.0,
                   help="seconds; parts that no longer fit are skipped")
    p.add_argument("--agreement-runs", type=int, help="fresh processes per side (default 5, quick 3)")
    p.add_argument("--skip", default="", help="comma-separated parts not to run (e.g. agreement,warm_restart)")
    p.add_argument("--task", choices=sorted(TASKS), help=argparse.SUPPRESS)
    p.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.task:
        return task_main(a.task, json.loads(a.spec))
    if not a.out:
        p.error("--out is required")
    if a.cpu_smoke:
        os.environ["TUNEVAULT_BENCH_SMOKE"] = "1"
        SMOKE = True
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = a.agreement_runs or (3 if a.quick or a.cpu_smoke else 5)
    suite = Suite(out, a.quick, a.budget, runs, frozenset(x.strip() for x in a.skip.split(",") if x.strip()))
    try:
        suite.run()
    finally:
        suite.save()
        print(table(suite.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
