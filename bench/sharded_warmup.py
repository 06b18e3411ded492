"""Sharded warmup: wall time of one warmup process vs N over the same manifest, side by side in one run.

    PYTHONPATH=src python bench/sharded_warmup.py --out OUT_DIR [--jobs 2] [--keys 80] [--budget 900]  # GPUs
    TRITON_INTERPRET=1 PYTHONPATH=src python bench/sharded_warmup.py --cpu --out OUT_DIR        # CPU

Builds one key manifest (without tuning anything: each call is recorded, then launched once with
its first config), then runs ``tunevault warmup MANIFEST --jobs 1`` and ``--jobs N`` alternately,
each on a fresh store and a fresh Triton cache, and reports the wall time of each (the time a
user waits, process start-up included) and their ratio. Then compares the decisions: per key,
the config the N-process run chose vs the single process's, identical or within the tie band
(each run's pick timed within ``tolerance`` of the other run's fastest candidate).

GPU mode: ``bench/gpu_kernels.py`` kernels (matmul, rmsnorm, chunk_fwd_o) over 25 shapes, plus
flash-linear-attention's autotuned kernels when ``fla`` is importable (skipped with a note when
not), then more shapes of the suite's kernels until the manifest holds ``--keys`` keys (default
80; ``--keys 40`` is the first two alone); ``--jobs`` defaults to the number of visible GPUs, one
process per GPU. CPU mode: the demo kernels under the interpreter (34 keys), N processes on the
CPU's cores. Writes ``results.json`` and ``summary.md`` into ``--out``; stops starting runs when
``--budget`` seconds would be exceeded. Each run records, per process, its start-up (spawned to
its first key, with the phases the process reported), its walk over the keys, its tuning time
and its exit (``tunevault warmup --json``'s ``workers``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CPU_WORK = ([("scaled_add", n) for n in range(1500, 7001, 500)]
            + [("row_sum", (r, c)) for r in (16, 32, 48, 64, 80) for c in (64, 128)]
            + [("matmul", (m, n, k)) for m, n, k in ((32, 32, 16), (32, 32, 32), (32, 48, 32), (48, 32, 32),
                                                      (48, 48, 16), (48, 48, 32), (32, 32, 48), (16, 48, 48),
                                                      (16, 32, 32), (32, 16, 32), (48, 16, 48), (16, 16, 64))])
GPU_WORK = ([("matmul", {"M": m, "N": n, "K": k}) for m, n, k in (
    (4096, 4096, 4096), (2048, 2048, 2048), (1024, 1024, 1024), (8192, 1024, 4096), (1024, 8192, 4096),
    (4096, 1024, 1024), (512, 4096, 4096), (256, 4096, 4096), (128, 4096, 4096), (64, 4096, 4096),
    (32, 4096, 4096), (16, 4096, 4096))]
            + [("rmsnorm", {"rows": 8192, "cols": c}) for c in (1024, 2048, 3072, 4096, 5120, 6144, 8192)]
            + [("chunk_fwd_o", {"T": 8192, "H": h, "K": k, "V": v, "BT": bt}) for h, k, v, bt in (
                (16, 64, 128, 64), (16, 64, 128, 32), (8, 64, 128, 64), (32, 64, 128, 64), (16, 128, 128, 64),
                (16, 64, 64, 64))])
# More keys for ``--keys`` past the 40 of GPU_WORK and flash-linear-attention (a real manifest holds
# hundreds): serving-like shapes of the same kernels, interleaved so any prefix mixes the kernels.
_MORE = [
    [("matmul", {"M": m, "N": n, "K": k}) for n, k in ((11008, 4096), (4096, 11008), (6144, 4096))
     for m in (2048, 512, 256, 128, 64, 32, 16, 8)],
    [("rmsnorm", {"rows": 8192, "cols": c}) for c in (512, 768, 1536, 2560, 3584, 5632, 7168)],
    [("rmsnorm_small", {"rows": r, "cols": c}) for c in (2048, 4096) for r in (1, 4, 16, 64)],
    [("chunk_fwd_o", {"T": 8192, "H": h, "K": k, "V": v, "BT": bt}) for h, k, v, bt in (
        (4, 64, 128, 64), (8, 128, 128, 64), (32, 128, 128, 64), (16, 64, 256, 64), (8, 64, 64, 32),
        (32, 64, 64, 64), (64, 64, 128, 64), (16, 128, 64, 32))]]
GPU_MORE = [w for i in range(max(map(len, _MORE))) for w in (group[i] for group in _MORE if i < len(group))]
GPU_KEYS = 80  # default size of the GPU manifest


# --- building the manifest (in a child process: ``--task manifest``) ------------------------------

@contextlib.contextmanager
def recording(lines: dict[tuple[str, str], str]) -> Iterator[None]:
    """Record every autotuned call as a manifest line, then launch it once with its first config."""
    from triton.runtime.autotuner import Autotuner

    from tunevault.capture import manifest as mf
    from tunevault.capture.argspec import CallSpec
    from tunevault.core.identity import kernel_id
    from tunevault.core.kernel_state import KernelState

    original, states = Autotuner.run, {}

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = states.setdefault(id(self), KernelState(self))
        key = state.labelled_key(state.named_args(args, kwargs))
        ident = (kernel_id(self).name, key.text)
        if ident not in lines:
            spec = CallSpec.of(self, args, kwargs).to_json()
            lines[ident] = mf.line(ident[0], key, {"hit": 1}, len(lines), len(lines), os.getpid(),
                                   socket.gethostname(), spec)
        config = self.configs[0]
        cfg = config.all_kwargs()
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(self.arg_names, args, strict=False)), **kwargs, **cfg})
        return self.fn.run(*args, **kwargs, **cfg)

    Autotuner.run = run
    try:
        yield
    finally:
        Autotuner.run = original


def cpu_launches() -> list[tuple[str, Callable[[], Any]]]:
    import torch

    from tunevault.demo import kernels as demo

    out: list[tuple[str, Callable[[], Any]]] = []
    for name, shape in CPU_WORK:
        if name == "scaled_add":
            x = torch.rand(shape)
            out.append((f"scaled_add[n={shape}]", lambda x=x: demo.run_scaled_add(x, x)))
        elif name == "row_sum":
            x = torch.rand(*shape)
            out.append((f"row_sum[{shape}]", lambda x=x: demo.run_row_sum(x)))
        else:
            a, b = torch.rand(shape[0], shape[2]), torch.rand(shape[2], shape[1])  # (M, N, K)
            out.append((f"matmul[{shape}]", lambda a=a, b=b: demo.run_matmul(a, b)))
    return out


def gpu_launches() -> tuple[list[tuple[str, Callable[[], Any]]], list[str]]:
    """GPU_WORK, flash-linear-attention's kernels, then GPU_MORE: the manifest keeps the first ``--keys``."""
    import gpu_kernels as gk

    def launch(kernel: str, shape: dict[str, int]) -> Callable[[], Any]:
        return lambda: gk.make_launch(kernel, shape, "cuda")()  # inputs allocated only if it is recorded

    out = [(gk.label(k, s), launch(k, s)) for k, s in GPU_WORK]
    notes = []
    try:
        out += gk.fla_launches("cuda")
    except ImportError as exc:
        notes.append(f"flash-linear-attention not importable ({exc}): its kernels are not in the manifest")
    return out + [(gk.label(k, s), launch(k, s)) for k, s in GPU_MORE], notes


def task_manifest(out: Path, cpu: bool, keys: int) -> int:
    import torch

    launches, notes = (cpu_launches(), []) if cpu else gpu_launches()
    lines: dict[tuple[str, str], str] = {}
    with recording(lines), torch.no_grad():
        for label, launch in launches:
            if not cpu and len(lines) >= keys:
                break
            try:
                launch()
            except Exception as exc:  # a third-party op that does not run here: leave its keys out
                notes.append(f"{label}: not recorded ({type(exc).__name__}: {str(exc)[:200]})")
    if not cpu and len(lines) < keys:
        notes.append(f"--keys {keys}: the GPU workloads give {len(lines)} keys")
    (out / "manifest.jsonl").write_text("".join(lines.values()))
    kernels = sorted({k for k, _ in lines})
    print(json.dumps({"keys": len(lines), "kernels": kernels, "notes": notes}))
    return 0


def task_referee(out: Path, path: str) -> int:
    """Time each differing key's two picks side by side in this one process (tunevault's careful GPU
    timing, three times): a referee that neither run's screen or device biased."""
    from tunevault.capture import manifest
    from tunevault.capture.argspec import CallSpec
    from tunevault.capture.locate import import_autotuner
    from tunevault.core.identity import config_spec
    from tunevault.engine.inprocess import InProcessSession

    entries = {e.ident: e for e in manifest.read(out / "manifest.jsonl")}
    verdicts = []
    for d in json.loads(Path(path).read_text()):
        entry = entries.get((d["kernel"], d["key_text"]))
        if entry is None or entry.callspec is None:
            verdicts.append({**d, "error": "not in the manifest with a callspec"})
            continue
        at = import_autotuner(d["kernel"])
        args, kwargs = CallSpec.from_json(entry.callspec, untrusted=False).build(at, seed=0)
        picks = [d["one_index"], d["many_index"]]
        session = InProcessSession(at, args, kwargs, {i: at.configs[i] for i in picks},
                                   {i: config_spec(at.configs[i]) for i in picks})
        ratios = []
        for _ in range(3):
            timed = session.time(picks, "full")
            a, b = (timed[i].timings[0] if timed[i].ok else float("inf") for i in picks)
            ratios.append(b / a)
        verdicts.append({**d, "many_vs_one": round(statistics.median(ratios), 4), "ratios": ratios})
    print(json.dumps(verdicts))
    return 0


def referee(out: Path, differences: list[dict[str, Any]], cache: Path, tolerance: float,
            timeout: float) -> list[dict[str, Any]]:
    """The referee's verdict per differing key (within the tie band when the slower pick is within
    ``tolerance`` of the faster), or an error note."""
    if not differences:
        return []
    todo = out / "referee.json"
    todo.write_text(json.dumps(differences))
    env = {**child_env(False, cache), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    done = subprocess.run([sys.executable, __file__, "--task", "referee", "--out", str(out), "--todo", str(todo)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=str(ROOT))
    try:
        verdicts = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return [{"error": done.stderr[-1500:]}]
    for v in verdicts:
        r = v.get("many_vs_one")
        v["tie_band"] = r is not None and max(r, 1 / r) <= 1 + tolerance
    return verdicts


# --- the runs ---------------------------------------------------------------------------------------

def child_env(cpu: bool, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEVAULT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(HERE), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(cache)  # cold: each run compiles as a fresh machine would
    if cpu:
        env["TRITON_INTERPRET"] = "1"
    return env


def run_variant(out: Path, jobs: int, repeat: int, cpu: bool, devices: str | None, timeout: float) -> dict[str, Any]:
    tag = f"r{repeat}-jobs{jobs}"
    store = out / "stores" / f"{tag}.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tunevault.cli.main", "--store", f"sqlite:///{store}", "warmup",
           str(out / "manifest.jsonl"), "--jobs", str(jobs), "--json"]
    if devices:
        cmd += ["--devices", devices]
    print(f"[sharded_warmup] {tag}: {' '.join(cmd[3:])}", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=child_env(cpu, out / "triton-cache" / tag), cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"tag": tag, "jobs": jobs, "repeat": repeat, "error": f"over the budget ({timeout:.0f} s)"}
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # every process of the run, waited for
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    (out / "logs").mkdir(exist_ok=True)
    (out / "logs" / f"{tag}.stderr").write_text(done.stderr)
    try:
        report = json.loads(done.stdout)
    except ValueError:
        return {"tag": tag, "jobs": jobs, "repeat": repeat, "wall_s": wall, "error": done.stderr[-2000:]}
    print(f"[sharded_warmup] {tag}: {wall:.1f} s ({cpu_s / wall:.2f} cores busy), {report['counts']}, per "
          f"process {[w['tuned'] for w in report['workers']]}", flush=True)
    return {"tag": tag, "jobs": jobs, "repeat": repeat, "wall_s": wall, "cpu_s": round(cpu_s, 3),
            "cores_busy": round(cpu_s / wall, 2), "exit_code": done.returncode,
            "counts": report["counts"], "workers": report["workers"], "store": str(store)}


BURN = "import time\nt = time.perf_counter()\nx = 0\nfor i in range(4_000_000): x += i\nprint(time.perf_counter() - t)"


def cores_free(jobs: int) -> float:
    """How many of ``jobs`` CPU-bound processes' worth the machine gives right now (others share it)."""
    def burn(n: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", BURN], stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return max(float(p.communicate()[0]) for p in procs)

    return round(jobs * burn(1) / burn(jobs), 2)


def agreement(one: str, many: str, tolerance: float) -> dict[str, Any]:
    """Per key: the N-process run's config vs the single process's: identical, tied, or different."""
    from tunevault.store.sqlite import SqliteStore

    def by_key(path: str) -> dict[tuple[str, str], Any]:
        store = SqliteStore(path)
        try:
            return {(d.kernel.name, d.key.text): d for d in store.decisions()}
        finally:
            store.close()

    def within(d: Any, index: int) -> bool:
        ok = {r.index: r.timings[0] for r in d.candidates if r.ok}
        return index in ok and ok[index] <= min(ok.values()) * (1.0 + tolerance)

    def evidence(d: Any) -> dict[str, Any]:
        """Why a run chose as it did (kept here: the stores may not come back from a device)."""
        prov = dict(d.provenance)
        ranked = sorted((r for r in d.candidates if r.ok), key=lambda r: r.timings[0])[:8]
        return {"search": prov.get("search"), "selection": prov.get("selection"),
                "candidates": [{"index": r.index, "timings": list(r.timings), "n": r.n, "iqr": r.iqr,
                                "screened": r.screened} for r in ranked]}

    a, b = by_key(one), by_key(many)
    rows = {"identical": 0, "tie_band": 0, "different": 0, "missing": len(a.keys() ^ b.keys())}
    differ = []
    for ident in sorted(a.keys() & b.keys()):
        da, db = a[ident], b[ident]
        if da.config_index == db.config_index:
            rows["identical"] += 1
        elif within(da, db.config_index) and within(db, da.config_index):
            rows["tie_band"] += 1
        else:
            rows["different"] += 1
            differ.append({"kernel": ident[0], "key": da.key.describe(), "key_text": ident[1],
                           "one": da.config.describe(), "many": db.config.describe(),
                           "one_index": da.config_index, "many_index": db.config_index,
                           "one_evidence": evidence(da), "many_evidence": evidence(db)})
    return {**rows, "keys": len(a.keys() & b.keys()), "differences": differ}


def summarize(results: dict[str, Any]) -> str:
    runs = [r for r in results["runs"] if "wall_s" in r and not r.get("error")]
    walls = {j: [r["wall_s"] for r in runs if r["jobs"] == j] for j in (1, results["jobs"])}
    lines = [f"# Sharded warmup ({results['mode']}, {results['keys']} keys, {results['jobs']} processes vs 1)", "",
             "| processes | wall time (median) | runs, s | cores busy (CPU s / wall s) | keys tuned per process "
             "| start-up per process, s | tuning per process, s |",
             "|---|---|---|---|---|---|---|"]
    for j, ws in walls.items():
        per = [[w["tuned"] for w in r["workers"]] for r in runs if r["jobs"] == j]
        busy = ", ".join(str(r.get("cores_busy", "-")) for r in runs if r["jobs"] == j)
        med = f"{statistics.median(ws):.1f} s" if ws else "-"
        startup = [[w.get("startup_s") for w in r["workers"]] for r in runs if r["jobs"] == j]
        tuning = [[w["tuning_s"] for w in r["workers"]] for r in runs if r["jobs"] == j]
        lines.append(f"| {j} | {med} | {', '.join(f'{w:.1f}' for w in ws)} | {busy} | {per} | {startup} "
                     f"| {tuning} |")
    if results.get("ratio") is not None:
        pairs = results["pair_ratios"]
        lines += ["", f"**{results['jobs']} processes / 1 process: {results['ratio']:.2f}x** (medians; target "
                  f"{results['target']:.2f}x). Run by run (the two variants of one repeat ran back to back): "
                  + ", ".join(f"{r:.2f}x" for r in pairs)
                  + (f", median {statistics.median(pairs):.2f}x" if pairs else "")]
    if results.get("cores_free"):
        lines.append(f"- CPU-bound processes' worth the shared machine gave, probed before each repeat "
                     f"(of {results['jobs']}): {', '.join(map(str, results['cores_free']))}")
    for r in results.get("agreement", []):
        lines.append(f"- decisions, repeat {r['repeat']}: {r['identical']}/{r['keys']} identical, {r['tie_band']} "
                     f"within the tie band, {r['different']} different, {r['missing']} on one side only")
        verdicts = [v for v in r.get("referee", []) if "many_vs_one" in v]
        if verdicts:
            tied = sum(v["tie_band"] for v in verdicts)
            each = ", ".join(f"{v['kernel'].rsplit(':', 1)[-1]} {v['many_vs_one']:.3f}" for v in verdicts)
            lines.append(f"  - the {len(verdicts)} different keys timed side by side on one GPU (referee): "
                         f"{tied} within the tie band; {each}")
    lines += [f"- note: {n}" for n in results.get("notes", [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="sharded-warmup-results", help="directory for results.json and summary.md")
    p.add_argument("--cpu", action="store_true", help="demo kernels under TRITON_INTERPRET=1, on CPU cores")
    p.add_argument("--jobs", type=int, help="processes of the sharded run (default: 2 on a CPU, else visible GPUs)")
    p.add_argument("--devices", help="GPUs of the sharded run, e.g. 0,1 (default: all visible)")
    p.add_argument("--repeats", type=int, help="pairs of runs (default 5 on a CPU, 2 on GPUs)")
    p.add_argument("--keys", type=int, default=GPU_KEYS,
                   help=f"GPU mode: keys in the manifest (default {GPU_KEYS}; 40 is GPU_WORK and "
                        "flash-linear-attention alone); the CPU manifest is fixed")
    p.add_argument("--budget", type=float, default=900.0, help="seconds for the whole benchmark")
    p.add_argument("--task", choices=["manifest", "referee"], help=argparse.SUPPRESS)
    p.add_argument("--todo", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    if args.task == "manifest":
        return task_manifest(out, args.cpu, args.keys)
    if args.task == "referee":
        return task_referee(out, args.todo)
    deadline = time.monotonic() + args.budget
    cpu = args.cpu or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    jobs = args.jobs or (2 if cpu else gpu_count())
    task = [sys.executable, __file__, "--task", "manifest", "--out", str(out), "--keys", str(args.keys)] + (
        ["--cpu"] if cpu else [])
    made = subprocess.run(task, capture_output=True, text=True, env=child_env(cpu, out / "triton-cache" / "manifest"),
                          timeout=max(30.0, deadline - time.monotonic()))
    if made.returncode != 0:
        print(made.stdout, made.stderr, file=sys.stderr)
        return 1
    info = json.loads(made.stdout.strip().splitlines()[-1])
    print(f"[sharded_warmup] manifest: {info['keys']} keys of {len(info['kernels'])} kernels", flush=True)
    results: dict[str, Any] = {"mode": "cpu (interpreter)" if cpu else "gpu", "jobs": jobs, "keys": info["keys"],
                               "kernels": info["kernels"], "notes": list(info["notes"]), "runs": [],
                               "target": 0.65 if cpu else 0.55, "ratio": None, "pair_ratios": [],
                               "cores_free": [], "agreement": []}
    if jobs < 2:
        results["notes"].append(f"only {jobs} GPU visible: the sharded run needs 2 or more")
    repeats = args.repeats or (5 if cpu else 2)
    gpus = None if cpu else (args.devices or ",".join(str(i) for i in range(jobs)))  # no GPU probe per run
    last: dict[int, float] = {}
    for repeat in range(repeats):
        pair = {}
        if cpu:
            results["cores_free"].append(cores_free(jobs))
        for j in ((1, jobs) if repeat % 2 == 0 else (jobs, 1)):
            left = deadline - time.monotonic()
            if j in last and left < 1.5 * last[j]:
                results["notes"].append(f"repeat {repeat}, {j} process(es): skipped, {left:.0f} s of budget left")
                continue
            devices = gpus if j > 1 or gpus is None else gpus.split(",")[0]
            run = run_variant(out, j, repeat, cpu, devices, max(10.0, left))
            results["runs"].append(run)
            if "wall_s" in run and not run.get("error"):
                last[j], pair[j] = run["wall_s"], run
        if len(pair) == 2:
            from tunevault.policy.settings import Settings

            tolerance = Settings().tolerance
            agree = agreement(pair[1]["store"], pair[jobs]["store"], tolerance)
            if not cpu and agree["differences"]:
                left = deadline - time.monotonic()
                agree["referee"] = referee(out, agree["differences"], out / "triton-cache" / f"r{repeat}-jobs1",
                                           tolerance, max(30.0, left)) if left > 60 else [
                                               {"error": f"skipped: {left:.0f} s of budget left"}]
            results["agreement"].append({"repeat": repeat, **agree})
            results["pair_ratios"].append(round(pair[jobs]["wall_s"] / pair[1]["wall_s"], 3))
        ok = [r for r in results["runs"] if "wall_s" in r and not r.get("error")]
        one, many = ([r["wall_s"] for r in ok if r["jobs"] == j] for j in (1, jobs))
        if one and many and jobs > 1:
            results["ratio"] = statistics.median(many) / statistics.median(one)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    summary = summarize(results)
    (out / "summary.md").write_text(summary)
    print(summary)
    return 0


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


if __name__ == "__main__":
    sys.exit(main())
