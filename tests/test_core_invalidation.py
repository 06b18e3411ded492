"""A stored decision is reused only for the same kernel identity and fingerprint, and only if it names
a config the kernel declares. Kernel edits are made to real module files imported by fresh processes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import kernels_core as kc
from conftest import SRC, TESTS, count_launches, run_py

MODULE = '''
import triton
import triton.language as tl
{pad}

@triton.autotune(configs=[triton.Config({{"BLOCK": b}}, num_warps=1) for b in {alpha_blocks}], key=["n"])
@triton.jit
def alpha(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + {alpha_add}, mask=mask)
{pad}

@triton.autotune(configs=[triton.Config({{"BLOCK": b}}, num_warps=1) for b in (16, 32, 64)], key=["n"])
@triton.jit
def beta(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 3, mask=mask)
'''

RUN = """
import json, torch, triton
import tunevault.integration.activation as activation
activation.activate_from_env()
import served_kernels as m
from conftest import count_launches
res = {}
for name, factor, add in (("alpha", 1, ALPHA_ADD), ("beta", 3, 0)):
    kernel = getattr(m, name)
    x = torch.arange(40, dtype=torch.float32); out = torch.empty_like(x)
    with count_launches(kernel) as launches:
        kernel[lambda meta: (triton.cdiv(40, meta["BLOCK"]),)](x, out, 40)
    res[name] = {"launches": launches.count, "ok": torch.equal(out, x * factor + add)}
print(json.dumps(res))
"""


def serve(tmp_path: Path, db: Path, pad: int = 0, alpha_add: int = 1,
          alpha_blocks: tuple[int, ...] = (16, 32, 64), **env: str) -> dict[str, int]:
    """Write the kernel module as it is now, run it in a fresh process; launches per kernel."""
    (tmp_path / "served_kernels.py").write_text(textwrap.dedent(MODULE.format(
        pad="\n" * pad, alpha_add=alpha_add, alpha_blocks=alpha_blocks)))
    res = run_py(RUN.replace("ALPHA_ADD", str(alpha_add)), TUNEVAULT_MODE="tune",
                 TUNEVAULT_STORE=f"sqlite:///{db}",
                 PYTHONPATH=os.pathsep.join([str(tmp_path), str(SRC), str(TESTS)]), **env)
    assert all(r["ok"] for r in res.values()), res
    return {name: r["launches"] for name, r in res.items()}


def test_edits_retune_only_the_edited_kernel(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    assert all(n > 1 for n in serve(tmp_path, db).values())  # both tune
    # alpha's body changes; both kernels move down the file (line numbers are not identity).
    edited = serve(tmp_path, db, pad=7, alpha_add=2)
    assert edited["alpha"] > 1 and edited["beta"] == 1
    moved = serve(tmp_path, db, pad=7, alpha_add=2, alpha_blocks=(16, 32, 64, 128))  # config list edit
    assert moved["alpha"] > 1 and moved["beta"] == 1
    # A cache-invalidating Triton variable changes the fingerprint: decisions are not carried over.
    other = serve(tmp_path, db, pad=7, alpha_add=2, alpha_blocks=(16, 32, 64, 128),
                  TRITON_DEFAULT_FP_FUSION="0")
    assert other["alpha"] > 1 and other["beta"] > 1


def _tuned_decision(sqlite_url: str) -> Any:
    import tunevault
    from tunevault.store.sqlite import SqliteStore

    tunevault.install(mode="tune", store=sqlite_url)
    kc.run_unary(kc.add_one, 40)
    tunevault.uninstall()
    store = SqliteStore(sqlite_url.removeprefix("sqlite://"))
    (decision,) = list(store.decisions())
    store.close()
    return decision


def _serve_with(tmp_path: Path, decision: Any) -> tuple[int, Any]:
    """Install on a store holding only ``decision``; launches of one call, and the stored decisions."""
    import tunevault
    from tunevault.store.sqlite import SqliteStore

    path = tmp_path / f"planted-{decision.config_index}-{decision.fingerprint.digest}.db"
    store = SqliteStore(path)
    store.put(decision)
    store.close()
    tunevault.install(mode="tune", store=f"sqlite:///{path}")
    with count_launches(kc.add_one) as launches:
        assert torch.equal(kc.run_unary(kc.add_one, 40), kc.expected_unary(40))
    return launches.count, path


def test_decision_from_another_fingerprint_is_not_reused(tmp_path: Path, sqlite_url: str) -> None:
    decision = _tuned_decision(sqlite_url)
    assert _serve_with(tmp_path, decision)[0] == 1  # control: the genuine decision is reused
    fp = dataclasses.replace(decision.fingerprint, triton="0.0.0-elsewhere")
    launches, _ = _serve_with(tmp_path, dataclasses.replace(decision, fingerprint=fp))
    assert launches > 1  # re-tuned here


@pytest.mark.parametrize("index, block", [(1, 999), (0, 64), (7, 16)])
def test_decision_naming_an_undeclared_config_is_rejected(tmp_path: Path, sqlite_url: str,
                                                           caplog: pytest.LogCaptureFixture,
                                                           index: int, block: int) -> None:
    from tunevault.core.identity import config_spec

    decision = _tuned_decision(sqlite_url)
    declared = config_spec(kc.add_one.configs[min(index, 2)])
    forged = dataclasses.replace(declared, kwargs=(("BLOCK", block),))
    caplog.set_level(logging.WARNING, logger="tunevault")
    launches, _ = _serve_with(tmp_path, dataclasses.replace(decision, config_index=index, config=forged))
    assert launches > 1  # not trusted: tuned here instead
    from tunevault.integration.triton_adapter import runtime

    (used,) = runtime().used.values()  # the decision launched: measured here, naming what it launched
    assert used.config == config_spec(kc.add_one.best_config) != forged
    assert kc.add_one.configs[used.config_index] is kc.add_one.best_config
    warnings = [r.getMessage() for r in caplog.records if "does not declare" in r.getMessage()]
    assert len(warnings) == 1 and "add_one" in warnings[0] and f"BLOCK={block}" in warnings[0]
