"""What a predicted fallback costs on the miss path: microseconds per prediction, no device.

    PYTHONPATH=src python3 bench/predict_cost.py [--keys 50] [--configs 28] [--json OUT.json]

A kernel with ``--keys`` decided keys (an M sweep, every candidate's timings kept, as tuning
writes them) and one categorical element. Timed side by side in one process, interleaved in
rounds: building the neighbour table (once per kernel, and after a decision is added), one
prediction from the built table (every miss), and the miss diagnosis that the miss path ran
before this change (``diagnose.explain_miss`` over the decided keys), as a yardstick.
Clock: this thread's CPU time (``time.thread_time``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from tunevault.core.model import (  # noqa: E402
    CandidateResult,
    ConfigSpec,
    Decision,
    Fingerprint,
    KernelId,
    TuningKey,
)
from tunevault.policy.diagnose import explain_miss  # noqa: E402
from tunevault.policy.predict import NeighbourTable  # noqa: E402


def decisions(n_keys: int, n_configs: int, seed: int = 0) -> tuple[list[Decision], list[ConfigSpec]]:
    rng = random.Random(seed)
    kid = KernelId("bench:matmul", "src", "cfg", ("M", "N", "K"))
    fp = Fingerprint("3.6.0", "cuda:90", "NVIDIA H200", "12.8")
    specs = [ConfigSpec((("BM", 16 << (i % 4)), ("BN", 32 << (i % 3))), (("num_warps", 4),)) for i in range(n_configs)]
    out = []
    for j in range(n_keys):
        m = max(1, int(2 ** (j * 14 / max(1, n_keys - 1))))
        times = [rng.uniform(1.0, 3.0) for _ in specs]
        cands = tuple(CandidateResult(i, s, (t, 0.98 * t, 1.02 * t)) if rng.random() > 0.05
                      else CandidateResult(i, s, (), "OutOfResources") for i, (s, t) in enumerate(zip(specs, times,
                                                                                                      strict=True)))
        best = min((c for c in cands if c.ok), key=lambda c: c.timings[0])
        key = TuningKey((("M", m), ("N", 4096), ("K", 4096), ("dtype(a)", "float16")))
        out.append(Decision(kid, fp, key, best.index, best.config, cands))
    return out, specs


def per_call_us(fn: Callable[[], Any], seconds: float) -> float:
    """This thread's CPU time per call, so other processes on a shared machine do not count."""
    n, t0 = 0, time.thread_time()
    while True:
        fn()
        n += 1
        elapsed = time.thread_time() - t0
        if elapsed >= seconds:
            return elapsed / n * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=50)
    p.add_argument("--configs", type=int, default=28)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    decided, specs = decisions(args.keys, args.configs)
    keys = [d.key for d in decided]
    misses = [TuningKey((("M", m), ("N", 4096), ("K", 4096), ("dtype(a)", "float16")))
              for m in (3, 100, 777, 5000, 20000)]
    table = NeighbourTable(decided, specs)
    cases: dict[str, Callable[[], Any]] = {
        "table build": lambda: NeighbourTable(decided, specs),
        "prediction": lambda: [table.predict(k) for k in misses],
        "diagnosis (explain_miss)": lambda: [explain_miss("matmul", k, keys) for k in misses],
    }
    per = {"table build": 1, "prediction": len(misses), "diagnosis (explain_miss)": len(misses)}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(args.rounds):
        names = list(cases)
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every round
            samples[name].append(per_call_us(cases[name], 0.05) / per[name])
    result = {name: statistics.median(v) for name, v in samples.items()}
    print(f"{args.keys} decided keys, {args.configs} configs, {args.rounds} rounds (median us per call):")
    for name, us in result.items():
        print(f"  {name:26s} {us:9.1f} us")
    ratio = result["prediction"] / result["diagnosis (explain_miss)"]
    print(f"  prediction / diagnosis: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"keys": args.keys, "configs": args.configs, "us": result,
                                               "prediction_vs_diagnosis": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
