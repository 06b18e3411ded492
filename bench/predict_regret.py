"""Leave-one-out regret of the config a fallback launches for an unseen key, per rule.

    PYTHONPATH=src python3 bench/predict_regret.py --out OUT_DIR [--budget 230]
    TRITON_INTERPRET=1 PYTHONPATH=src python3 bench/predict_regret.py --smoke --out /tmp/smoke   # CPU plumbing
    PYTHONPATH=src python3 bench/predict_regret.py --reanalyse OUT_DIR/results.json [--out DIR]  # no GPU

Sweeps: an fp16 matmul over M (N=K=4096, 24 configs), an RMSNorm over N (12 configs), and
flash-linear-attention's autotuned l2norm kernels over tokens and width when ``fla`` imports.
Every config of every key is timed (bench/config_timer.py: CUDA-graph replay, interleaved
rounds). Then each key in turn is unseen and all others decided (real Decision objects, winners
by tunevault's select), and each rule's choice is charged its measured regret: its time over
the key's fastest time, minus one. Rules: the first config that runs; what tunevault shipped
before prediction (the diagnosis's nearest key, ties broken by key text); the nearest decided
key by log2 distance; tunevault's predictor (policy/predict.py, called on those decisions).
Writes results.json (after every sweep) and summary.md into --out; prints the table last.
Each row keeps every config's median (``times``), the configs that failed and the key, and
decisions use medians alone (``decide``), so ``--reanalyse`` rebuilds the whole analysis from a
results.json without a GPU: any rule, or a changed predictor, judged on measured data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]
TARGETS = {"median": 0.02, "max": 0.12, "within": 0.85}  # predictor: median/max regret, share within 5%
RULES = ("first", "today", "nearest", "predicted")
RULE_NAMES = {"first": "first declared config (that runs)", "today": "before this change: diagnosis's nearest key",
              "nearest": "nearest decided key, log2 distance", "predicted": "tunevault predictor"}


@dataclass
class Sweep:
    name: str
    title: str
    workloads: list[tuple[str, Callable[[], Any]]]
    weight: float
    measured: dict[int, dict[str, Any]] = field(default_factory=dict)  # id(autotuner) -> {at, entries}
    skipped: list[str] = field(default_factory=list)
    note: str = ""


def coarse_to_fine(n: int) -> list[int]:
    """Ends first, then ever finer midpoints: a sweep cut short by the budget still spans its range."""
    order = list(dict.fromkeys([0, n - 1])) if n else []
    step = 1
    while step * 2 < n:
        step *= 2
    while step >= 1:
        order += [i for i in range(0, n, step) if i not in order]
        step //= 2
    return order


def build_sweeps(smoke: bool) -> list[Sweep]:
    import torch

    import gpu_kernels as gk

    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.float16)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=torch.float32).to(dtype)

    n_k = 32 if smoke else 4096
    shared: dict[str, torch.Tensor] = {}

    def matmul(m: int) -> Callable[[], Any]:
        def run() -> Any:
            if "b" not in shared:
                shared["b"] = rand(n_k, n_k)
            return gk.run_matmul(rand(m, n_k), shared["b"])
        return run

    def rmsnorm(n: int, rows: int) -> Callable[[], Any]:
        return lambda: gk.run_rmsnorm(rand(rows, n), rand(n))

    ms = (1, 4, 16, 32) if smoke else (1, 8, 16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072,
                                       4096, 8192, 16384)
    ns = (16, 32, 64, 128) if smoke else (128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192, 16384)
    rows = 4 if smoke else 8192
    sweeps = [
        Sweep("matmul", f"matmul {str(dtype)[6:]}, N=K={n_k}, M sweep ({len(ms)} keys)",
              [(f"M={m}", matmul(m)) for m in ms], 0.45),
        Sweep("rmsnorm", f"RMSNorm {str(dtype)[6:]}, {rows} rows, N sweep ({len(ns)} keys)",
              [(f"N={n}", rmsnorm(n, rows)) for n in ns], 0.2),
    ]
    try:
        from fla.modules.l2norm import l2norm_fwd
    except Exception as exc:  # not installed here: the part is skipped, with the reason
        sweeps.append(Sweep("fla", "flash-linear-attention l2norm", [], 0.0,
                            note=f"skipped: fla not importable ({type(exc).__name__}: {exc})"))
        return sweeps
    # D <= 512: l2norm_fwd_kernel, key (D, NB) with NB = cdiv(T, 65536) (cdiv(T, 2048) before fla 0.5):
    # tokens in whole multiples of 65536 give one key each. D > 512: l2norm_fwd_kernel1, key D.
    tokens = () if smoke else tuple(65536 * nb for nb in (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24))
    widths = (640, 768, 1024, 1536) if smoke else (640, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288)
    rows_w = 4 if smoke else 8192
    sweeps += [
        Sweep("fla_l2norm_tokens", f"fla l2norm_fwd, D=128, T sweep ({len(tokens)} keys)",
              [(f"T={t}", lambda t=t: l2norm_fwd(rand(t, 128))) for t in tokens], 0.2,
              note="" if tokens else "skipped in smoke mode (needs >= 65536 tokens per key)"),
        Sweep("fla_l2norm_width", f"fla l2norm_fwd, T={rows_w}, D sweep ({len(widths)} keys)",
              [(f"D={d}", lambda d=d: l2norm_fwd(rand(rows_w, d))) for d in widths], 0.15),
    ]
    return sweeps


def measure(sweep: Sweep, deadline: float) -> None:
    from config_timer import record_calls, time_all
    from tunevault.core.kernel_state import KernelState

    for i in coarse_to_fine(len(sweep.workloads)):
        label, workload = sweep.workloads[i]
        if time.monotonic() > deadline:
            sweep.skipped.append(label)
            continue
        started = time.monotonic()
        for call in record_calls(workload):
            state = KernelState(call.autotuner)
            key = state.labelled_key(state.named_args(call.args, call.kwargs))
            group = sweep.measured.setdefault(id(call.autotuner), {"at": call.autotuner, "entries": {}})
            if key.text in group["entries"]:
                continue
            results, method = time_all(call)
            group["entries"][key.text] = (label, key, results)
            ok = [r for r in results if r.ok]
            best = min(ok, key=lambda r: r.timings[0]) if ok else None
            print(f"[{sweep.name}] {label}: {len(results)} configs ({len(results) - len(ok)} failed) in "
                  f"{time.monotonic() - started:.1f}s by {method}; best "
                  + (f"#{best.index} {best.timings[0] * 1e3:.1f} us" if best else "none"), flush=True)


def decide(kid: Any, key: Any, results: list[Any]) -> Any:
    """The decision tuning would store, from each config's median alone: ``select`` then ties by
    tolerance only (no noise estimates), in the GPU path and in re-analysis alike."""
    from tunevault.core.identity import current_fingerprint
    from tunevault.core.model import CandidateResult, Decision
    from tunevault.engine.select import select

    cands = tuple(CandidateResult(r.index, r.config, (r.timings[0],)) if r.ok
                  else CandidateResult(r.index, r.config, (), r.error or "failed") for r in results)
    winner, margin = select(cands, 0.02)
    return Decision(kid, current_fingerprint(), key, winner.index, winner.config, cands, margin)


def choices(key: Any, others: list[Any], specs: list[Any], first: int) -> tuple[dict[str, int], dict[str, Any]]:
    """Each rule's config for ``key`` given the ``others``' decisions, and the predictor's details."""
    from tunevault.policy.diagnose import explain_miss
    from tunevault.policy.predict import NeighbourTable, coords, signature

    by_text = {d.key.text: d for d in others}
    _msg, near = explain_miss("k", key, [d.key for d in others])
    same = [d for d in others if signature(d.key) == signature(key)] or others
    target = coords(key)
    log_near = min(same, key=lambda d: (math.dist(coords(d.key), target) if len(coords(d.key)) == len(target)
                                        else math.inf, d.key.text))
    table = NeighbourTable(others, specs)
    prediction = table.predict(key)
    reps = 200
    t0 = time.perf_counter()
    for _i in range(reps):
        table.predict(key)
    micros = (time.perf_counter() - t0) / reps * 1e6
    fallback = by_text[near.text].config_index if near is not None else first
    picked = {"first": first, "today": fallback, "nearest": log_near.config_index,
              "predicted": fallback if prediction.config_index is None else prediction.config_index}
    detail = {"expected_penalty": prediction.penalty, "predict_us": round(micros, 2),
              "neighbours": [k.describe() for k in prediction.neighbours], "unmatched": list(prediction.unmatched)}
    return picked, detail


def analyse(sweep: Sweep) -> list[dict[str, Any]]:
    from tunevault.core.identity import config_spec, kernel_id

    out = []
    for group in sweep.measured.values():
        at = group["at"]
        kernel = analyse_kernel(getattr(at.base_fn, "__qualname__", str(at)), kernel_id(at),
                                [config_spec(c) for c in at.configs], list(group["entries"].values()))
        if kernel is not None:
            out.append(kernel)
    return out


def analyse_kernel(name: str, kid: Any, specs: list[Any], entries: list[tuple[str, Any, list[Any]]]
                   ) -> dict[str, Any] | None:
    """Leave-one-out over one kernel's keys: ``entries`` are (label, TuningKey, CandidateResults)."""
    entries = [e for e in entries if any(r.ok for r in e[2])]
    if len(entries) < 3:
        return None
    decisions = {key.text: decide(kid, key, results) for _label, key, results in entries}
    rows = []
    for label, key, results in sorted(entries, key=lambda e: _order(e[1])):
        times = {r.index: r.timings[0] for r in results if r.ok}
        best = min(times.values())
        first = min(times)
        others = [d for t, d in decisions.items() if t != key.text]
        picked, detail = choices(key, others, specs, first)
        regret = {rule: (times[c] / best - 1.0) if c in times else math.inf for rule, c in picked.items()}
        rows.append({"key": label, "tuning_key": key.describe(), "key_items": key.to_json(), "best_ms": best,
                     "times": times, "failed": sorted(r.index for r in results if not r.ok),
                     "best_config": min(times, key=times.__getitem__), "choices": picked, "regret": regret,
                     **detail})
    return {"kernel": name, "configs": len(specs), "config_specs": [s.to_json() for s in specs],
            "keys": len(rows), "rows": rows, "summary": summarise(rows)}


def reanalyse(path: Path) -> dict[str, Any]:
    """Every sweep's leave-one-out analysis rebuilt from a results.json's per-config ``times`` and
    ``failed`` (no GPU): the same decisions (``decide``), rules and summary as the run that wrote it."""
    from tunevault.core.model import CandidateResult, ConfigSpec, KernelId, TuningKey

    source = json.loads(path.read_text())
    doc = {**source, "sweeps": [], "reanalysed_from": str(path),
           "command": " ".join([Path(sys.executable).name, *sys.argv])}
    for sweep in source["sweeps"]:
        kernels = []
        for k in sweep["kernels"]:
            if not all("times" in r for r in k["rows"]):
                raise SystemExit(f"{path}: {sweep['name']} rows carry no per-config times (an older run)")
            specs = ([ConfigSpec.from_json(c) for c in k["config_specs"]] if "config_specs" in k
                     else [ConfigSpec((("config", i),), ()) for i in range(k["configs"])])
            entries = []
            for r in k["rows"]:
                key = TuningKey.from_json(r["key_items"]) if "key_items" in r else parse_key(r["tuning_key"])
                results = [CandidateResult(int(i), specs[int(i)], (float(t),)) for i, t in r["times"].items()]
                results += [CandidateResult(i, specs[i], (), "failed") for i in r["failed"]]
                entries.append((r["key"], key, sorted(results, key=lambda c: c.index)))
            kid = KernelId(k["kernel"], "reanalysed", "reanalysed", tuple(lb for lb, _v in entries[0][1].items))
            if (kernel := analyse_kernel(k["kernel"], kid, specs, entries)) is not None:
                kernels.append(kernel)
        doc["sweeps"].append({**sweep, "kernels": kernels})
    return doc


def parse_key(described: str) -> Any:
    """A TuningKey from ``TuningKey.describe()`` (rows written before ``key_items`` was stored)."""
    from tunevault.core.model import TuningKey

    def value(text: str) -> Any:
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return {"True": True, "False": False, "None": None}.get(text, text)

    return TuningKey(tuple((label, value(v)) for label, v in (part.split("=", 1) for part in described.split())))


def _order(key: Any) -> list[tuple[int, float | str]]:
    return [(0, float(v)) if isinstance(v, int | float) and not isinstance(v, bool) else (1, str(v))
            for _label, v in key.items]


def finite(obj: Any) -> Any:
    """JSON without Infinity: a config that failed at a key has regret None (and "failed" in tables)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for rule in RULES:
        values = [r["regret"][rule] for r in rows]
        out[rule] = {"median": statistics.median(values), "max": max(values),
                     "within_5pct": sum(v <= 0.05 for v in values), "keys": len(values)}
    p = out["predicted"]
    p["targets_met"] = bool(p["median"] <= TARGETS["median"] and p["max"] <= TARGETS["max"]
                            and p["within_5pct"] >= TARGETS["within"] * p["keys"])
    p["predict_us_median"] = statistics.median(r["predict_us"] for r in rows)
    return out


def _pct(v: float) -> str:
    return "failed" if math.isinf(v) else f"{v:.1%}"


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# Unseen-key fallback regret (leave-one-out), {doc['device']}", "",
             f"`{doc['command']}`  ", f"Triton {doc['triton']}, torch {doc['torch']}, "
             f"{doc['elapsed_s']:.0f} s of a {doc['budget_s']:.0f} s budget"
             + (" (SMOKE: CPU plumbing only, timings are noise)" if doc["smoke"] else "")
             + (f"; re-analysed from `{doc['reanalysed_from']}`" if doc.get("reanalysed_from") else ""),
             "", "| kernel, sweep | fallback rule | median regret | max regret | keys within 5% |",
             "|---|---|---|---|---|"]
    for sweep in doc["sweeps"]:
        if not sweep["kernels"]:
            lines.append(f"| {sweep['title']} | {sweep.get('note') or 'no kernel with 3+ keys measured'} | | | |")
        for k in sweep["kernels"]:
            head = f"{sweep['title']}: `{k['kernel']}`, {k['configs']} configs"
            for rule in RULES:
                s = k["summary"][rule]
                name = f"**{RULE_NAMES[rule]}**" if rule == "predicted" else RULE_NAMES[rule]
                lines.append(f"| {head} | {name} | {_pct(s['median'])} | {_pct(s['max'])} | "
                             f"{s['within_5pct']} / {s['keys']} |")
                head = ""
        if sweep["skipped"]:
            lines.append(f"| (budget: {len(sweep['skipped'])} keys not measured: {', '.join(sweep['skipped'])}) "
                         "| | | | |")
    lines += ["", "Targets for the predictor: median <= 2%, max <= 12%, >= 85% of keys within 5%.", ""]
    for sweep in doc["sweeps"]:
        for k in sweep["kernels"]:
            p = k["summary"]["predicted"]
            lines.append(f"- {k['kernel']} ({sweep['name']}): targets {'met' if p['targets_met'] else 'NOT met'}; "
                         f"{p['predict_us_median']:.0f} us per prediction")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="directory for results.json and summary.md (required unless --reanalyse)")
    p.add_argument("--budget", type=float, default=230.0, help="seconds for the whole run (measuring stops early)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and configs under TRITON_INTERPRET=1")
    p.add_argument("--only", help="comma-separated sweep names (matmul, rmsnorm, fla_l2norm_tokens, ...)")
    p.add_argument("--reanalyse", metavar="RESULTS_JSON", type=Path,
                   help="no GPU: rebuild every sweep's analysis from a results.json's per-config times")
    args = p.parse_args(argv)
    if args.reanalyse:
        doc = reanalyse(args.reanalyse)
        summary = markdown(doc)
        if args.out:
            out_dir = Path(args.out)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "results.json").write_text(json.dumps(finite(doc), indent=1, default=str))
            (out_dir / "summary.md").write_text(summary)
        print(summary)
        return 0
    if not args.out:
        p.error("--out is required (unless --reanalyse)")
    smoke = args.smoke or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["TUNEVAULT_BENCH_SMOKE"] = "1"  # before gpu_kernels is imported: 2-3 configs per kernel
    started = time.monotonic()
    end = started + args.budget - 5.0
    import torch
    import triton

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cpu (interpreter)" if smoke else torch.cuda.get_device_name()
    doc: dict[str, Any] = {"suite": "predict_regret", "command": " ".join([Path(sys.executable).name, *sys.argv]),
                           "smoke": smoke, "device": device, "host": platform.node(), "triton": triton.__version__,
                           "torch": torch.__version__, "budget_s": args.budget, "sweeps": []}
    print(f"[predict_regret] {device}, triton {triton.__version__}, budget {args.budget:.0f} s", flush=True)
    sweeps = build_sweeps(smoke)
    if args.only:
        sweeps = [s for s in sweeps if s.name in args.only.split(",")]
    for n, sweep in enumerate(sweeps):
        entry: dict[str, Any] = {"name": sweep.name, "title": sweep.title, "note": sweep.note, "kernels": []}
        try:
            if sweep.workloads:
                left = sum(s.weight for s in sweeps[n:]) or 1.0
                measure(sweep, time.monotonic() + (end - time.monotonic()) * sweep.weight / left)
                entry["kernels"] = analyse(sweep)
        except Exception:
            entry["note"] = "failed: " + traceback.format_exc(limit=3)[-600:]
            print(f"[{sweep.name}] {entry['note']}", flush=True)
        entry["skipped"] = sweep.skipped
        sweep.measured.clear()  # drop the recorded tensors before the next sweep
        doc["sweeps"].append(entry)
        doc["elapsed_s"] = time.monotonic() - started
        (out_dir / "results.json").write_text(json.dumps(finite(doc), indent=1, default=str))
    doc["elapsed_s"] = time.monotonic() - started
    summary = markdown(doc)
    (out_dir / "summary.md").write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
