"""Equal-cost configs pick the same winner in every fresh process (ties go to the earliest declared).

Each config's cost is dominated by a fixed 30 ms pause; the processes start together and tune one
at a time. Which config merely *measured* fastest varies from process to process; the choice does
not, as long as the tolerance band covers the timing noise. Under the interpreter on a shared
2-core machine that noise reaches tens of percent (on a GPU, with the default 2%, it is ~1%), so
this test widens the band to 50%.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor

from conftest import run_py

PROCESSES = 8
CODE = r"""
import fcntl, json, os, time
import torch
import tunevault
import kernels_engine as ke
from tunevault.integration.triton_adapter import runtime

# Start together, then tune one at a time once all have imported: eight tunings sharing two
# cores with each other (and with imports) would only add noise.
here = os.environ["TV_DIR"]
open(os.path.join(here, f"ready-{os.getpid()}"), "w").close()
deadline = time.monotonic() + 180
while sum(n.startswith("ready-") for n in os.listdir(here)) < int(os.environ["TV_N"]):
    assert time.monotonic() < deadline, "not every process started"
    time.sleep(0.05)
lock = open(os.path.join(here, "lock"), "w")
fcntl.flock(lock, fcntl.LOCK_EX)
tunevault.install(mode="tune", store="memory://")
x, y = torch.randn(64), torch.randn(64)
assert torch.equal(ke.run_add(ke.add_tied, x, y), x + y)
(decision,) = runtime().used.values()
fastest = min((c for c in decision.candidates if c.ok), key=lambda c: c.timings[0]).index
print(json.dumps({"chosen": decision.config_index, "fastest": fastest, "margin": decision.margin}))
"""


def test_equal_configs_pick_one_winner_in_every_fresh_process() -> None:
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(PROCESSES) as pool:
        env = {"TV_DIR": tmp, "TV_N": str(PROCESSES), "TUNEVAULT_TOLERANCE": "0.5", "TUNEVAULT_CPU_BENCH_REPS": "3"}
        runs = list(pool.map(lambda _: run_py(CODE, **env), range(PROCESSES)))
    assert {r["chosen"] for r in runs} == {0}, runs  # the earliest declared of the tied configs
