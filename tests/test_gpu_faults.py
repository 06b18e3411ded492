"""On a GPU: a config that leaves the device unusable loses alone when tuning is isolated.

Skipped without CUDA (CI has none). The suite runs kernels in Triton's interpreter; this test's
process compiles for the GPU instead. On a GPU machine: ``python -m pytest -q tests/test_gpu_faults.py``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import run_py

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SERVER = """
import json, sys
import torch
import tunevault
import kernels_gpu as kg
from tunevault.integration.triton_adapter import runtime

tunevault.install(mode="tune", store=sys.argv[1], isolate=True)
x = torch.randn(int(sys.argv[2]), device="cuda")
right = [bool(torch.equal(kg.run_oob_copy(x), 2 * x)) for _ in range(2)]
(decision,) = runtime().used.values()
print(json.dumps({"right": right, "winner": decision.config_index,
                  "failed": sorted(c.index for c in decision.candidates if c.error is not None),
                  "healthy": torch.ones(10, device="cuda").sum().item() == 10}))
"""


@pytest.mark.parametrize("n", [1 << 16, 1 << 24])  # timed by graph replay / eagerly
def test_an_illegal_memory_access_in_a_batch_fails_only_its_config(sqlite_url: str, n: int) -> None:
    """A sticky error surfaces at the next synchronisation, often in another config's timing, and
    every config after it fails alike: the batch's first reported error was blamed, each new
    worker blamed one more config, and the call raised 'every config failed'."""
    out = run_py(f"import sys; sys.argv[1:] = [{sqlite_url!r}, '{n}']\n" + SERVER, TRITON_INTERPRET="0")
    assert out["failed"] == [2] and out["winner"] != 2, out
    assert out["right"] == [True, True] and out["healthy"], out
