"""Cold warmup of a key manifest: stock Triton vs tunevault with and without compile ahead, side by side.

    PYTHONPATH=src:bench python bench/warmup_ahead.py --out OUT_DIR [--suite-keys 12] [--budget 560]
    PYTHONPATH=src:bench python bench/warmup_ahead.py --cpu --out OUT_DIR   # smoke test, no GPU

Builds a manifest as ``bench/sharded_warmup.py`` does (the GPU suite's kernels over several
shapes, and flash-linear-attention's autotuned kernels when ``fla`` is importable), keeps every
third-party key and ``--suite-keys`` of the suite's, then runs, each in a fresh process with a
fresh Triton cache and store:

- ``stock``: every key's call rebuilt from the manifest and launched once with stock Triton,
  which tunes it (what a server's warmup does without tunevault);
- ``tunevault warmup MANIFEST --jobs 1`` with ``TUNEVAULT_COMPILE_AHEAD=0`` (each key compiles
  when it is tuned), with compile ahead on (the default on a GPU), and isolated
  (``TUNEVAULT_ISOLATE=1``) with compile ahead on.

Reports each run's wall time (process start-up and imports included, as a user waits for it),
its ratio to stock, where tunevault's tunings spent their time (precompile, timing), the peak
device memory of each process as ``nvidia-smi`` lists it (the compile-ahead helpers and the
isolated worker are labelled ``worker``) and whether the runs chose the same configs (identical
or within the tie band). ``results.json`` and
``summary.md`` go into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import sharded_warmup as sw

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

VARIANTS = {  # name -> extra environment of the tunevault run
    "ahead_off": {"TUNEVAULT_COMPILE_AHEAD": "0"},
    "ahead_on": {},  # the default: on, on a GPU
    "isolated_ahead_on": {"TUNEVAULT_ISOLATE": "1"},
}


def task_stock(manifest: Path) -> int:
    """Launch every key once with stock Triton (tuning on each miss); per-key walls as JSON."""
    import torch

    from tunevault.capture import manifest as mf
    from tunevault.capture.replay import rebuild

    keys = []
    for entry in mf.read(manifest):
        autotuner, args, kwargs = rebuild(entry, "cuda")
        torch.cuda.synchronize()
        started = time.perf_counter()
        autotuner.run(*args, **kwargs)
        torch.cuda.synchronize()
        keys.append({"kernel": entry.kernel, "key": entry.key.text, "wall_s": time.perf_counter() - started,
                     "config": str(autotuner.best_config)})
    print(json.dumps({"keys": keys}))
    return 0


def keep(manifest: Path, suite_keys: int) -> dict[str, int]:
    """Every third-party key, and the first ``suite_keys`` of the suite's (spread over its kernels)."""
    lines = manifest.read_text().splitlines()
    ours = [ln for ln in lines if '"gpu_kernels:' in ln]
    step = max(1, len(ours) // max(1, suite_keys))
    chosen = set(ours[::step][:suite_keys])
    kept = [ln for ln in lines if ln not in ours or ln in chosen]
    manifest.write_text("".join(ln + "\n" for ln in kept))
    return {"suite": sum(1 for ln in kept if ln in chosen), "third_party": len(kept) - len(chosen)}


class DeviceMemory:
    """Peak device memory while a run lasts, per process as ``nvidia-smi`` lists them (labelled
    ``worker`` for ``tunevault.engine.worker`` processes: the helpers, and the isolated worker),
    and in total; nothing without ``nvidia-smi``."""

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}
        self.labels: dict[int, str] = {}
        self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> DeviceMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            try:
                apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                       "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
                used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=5)
            except (OSError, subprocess.SubprocessError):
                return
            self.total = max(self.total, sum(int(x) for x in used.stdout.split() if x.isdigit()))
            for line in apps.stdout.splitlines():
                pid_text, _, mib = line.partition(",")
                if pid_text.strip().isdigit() and mib.strip().isdigit():
                    pid = int(pid_text)
                    self.peaks[pid] = max(self.peaks.get(pid, 0), int(mib))
                    if pid not in self.labels:
                        try:
                            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                        except OSError:
                            cmdline = b""
                        self.labels[pid] = "worker" if b"tunevault.engine.worker" in cmdline else "other"

    def report(self) -> dict[str, Any]:
        return {"total_peak_mib": self.total,
                "per_process_peak_mib": sorted(([self.labels.get(p, "other"), m] for p, m in self.peaks.items()),
                                               key=lambda x: -x[1])}


def run(out: Path, name: str, cmd: list[str], env_extra: dict[str, str], timeout: float,
        cpu: bool = False) -> dict[str, Any]:
    env = sw.child_env(cpu, out / "triton-cache" / name)
    env.update(env_extra)
    print(f"[warmup_ahead] {name}: {' '.join(cmd[2:])} {env_extra}", flush=True)
    started = time.perf_counter()
    memory = DeviceMemory()
    try:
        with memory:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"name": name, "error": f"over the budget ({timeout:.0f} s)"}
    wall = time.perf_counter() - started
    (out / "logs").mkdir(exist_ok=True)
    (out / "logs" / f"{name}.stderr").write_text(done.stderr)
    try:
        text = done.stdout.strip()
        report = json.loads(text if text.startswith("{") else text.splitlines()[-1])
    except (ValueError, IndexError):
        return {"name": name, "wall_s": wall, "error": done.stderr[-2000:]}
    print(f"[warmup_ahead] {name}: {wall:.1f} s", flush=True)
    return {"name": name, "wall_s": wall, "exit_code": done.returncode, "report": report,
            "device_memory": memory.report()}


def stages(store: Path) -> dict[str, float]:
    """Where the run's tunings spent their time, summed over keys, as the engine noted it."""
    from tunevault.store.sqlite import SqliteStore

    s = SqliteStore(str(store))
    try:
        provs = [dict(d.provenance) for d in s.decisions()]
    finally:
        s.close()
    total = {k: round(sum(float(p.get(k) or 0.0) for p in provs), 2)
             for k in ("precompile_s", "timing_s", "worker_open_s")}
    return {**total, "keys": len(provs)}


def summarize(results: dict[str, Any]) -> str:
    stock = next((r for r in results["runs"] if r["name"] == "stock" and "wall_s" in r), None)
    rows = ["| run | wall | vs stock | precompile (sum) | timing (sum) | workers' peak device memory (MiB) |",
            "|---|---:|---:|---:|---:|---|"]
    for r in results["runs"]:
        if "report" not in r:
            rows.append(f"| {r['name']} | {r.get('error', '')[:60]} | | | | |")
            continue
        ratio = f"{r['wall_s'] / stock['wall_s']:.2f}x" if stock else "-"
        st = r.get("stages", {})
        workers = [m for label, m in r.get("device_memory", {}).get("per_process_peak_mib", []) if label == "worker"]
        rows.append(f"| {r['name']} | {r['wall_s']:.1f} s | {ratio} | {st.get('precompile_s', '-')} | "
                    f"{st.get('timing_s', '-')} | {', '.join(map(str, workers)) or '-'} |")
    agree = results.get("agreement")
    extra = [f"\nManifest: {results['keys']}. Decisions, compile ahead on vs off: "
             f"{json.dumps({k: v for k, v in agree.items() if k != 'differences'}) if agree else 'n/a'}"]
    return "\n".join(rows + extra) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="warmup-ahead-results")
    p.add_argument("--suite-keys", type=int, default=12, help="keys of the suite's own kernels kept")
    p.add_argument("--budget", type=float, default=560.0, help="seconds for the whole benchmark")
    p.add_argument("--skip", default="", help="comma-separated runs to leave out (stock, ahead_off, ...)")
    p.add_argument("--cpu", action="store_true",
                   help="smoke test under TRITON_INTERPRET=1: the demo kernels, no stock run (it cannot time there)")
    p.add_argument("--ahead", type=int, help="TUNEVAULT_COMPILE_AHEAD for the runs with compile ahead on "
                   "(default: unset, tunevault's default)")
    p.add_argument("--task", choices=["stock"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.jsonl"
    if args.task == "stock":
        return task_stock(manifest)
    deadline = time.monotonic() + args.budget
    made = subprocess.run([sys.executable, str(HERE / "sharded_warmup.py"), "--task", "manifest", "--out", str(out),
                           "--keys", "40", *(["--cpu"] if args.cpu else [])], capture_output=True, text=True,
                          env=sw.child_env(args.cpu, out / "triton-cache" / "manifest"), timeout=300)
    if made.returncode != 0:
        print(made.stdout, made.stderr, file=sys.stderr)
        return 1
    info = json.loads(made.stdout.strip().splitlines()[-1])
    results: dict[str, Any] = {"keys": keep(manifest, args.suite_keys), "notes": info["notes"], "runs": []}
    skip = set(filter(None, args.skip.split(","))) | ({"stock"} if args.cpu else set())
    order = ["ahead_off", "stock", "ahead_on", "isolated_ahead_on"]
    for name in (n for n in order if n not in skip):
        left = deadline - time.monotonic()
        if left < 30:
            results["runs"].append({"name": name, "error": f"skipped: {left:.0f} s of budget left"})
            continue
        if name == "stock":
            r = run(out, name, [sys.executable, __file__, "--task", "stock", "--out", str(out)], {}, left)
        else:
            store = out / "stores" / f"{name}.db"
            store.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "tunevault.cli.main", "--store", f"sqlite:///{store}", "warmup",
                   str(manifest), "--jobs", "1", "--json", *([] if args.cpu else ["--devices", "0"])]
            extra = dict(VARIANTS[name])
            if args.ahead is not None and "COMPILE_AHEAD" not in str(extra):
                extra["TUNEVAULT_COMPILE_AHEAD"] = str(args.ahead)
            r = run(out, name, cmd, extra, left, args.cpu)
            if "report" in r:
                r["store"], r["stages"] = str(store), stages(store)
                r["report"] = {k: v for k, v in r["report"].items() if k in ("counts", "workers")}
        results["runs"].append(r)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    done = {r["name"]: r for r in results["runs"] if "store" in r}
    if "ahead_off" in done and "ahead_on" in done:
        from tunevault.policy.settings import Settings

        results["agreement"] = sw.agreement(done["ahead_off"]["store"], done["ahead_on"]["store"],
                                            Settings().tolerance)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    summary = summarize(results)
    (out / "summary.md").write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
