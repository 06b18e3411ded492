"""The README's first screen: two commands for a fresh machine, the test one exactly as CI runs it."""

from __future__ import annotations

import re
import sys
from typing import Any

import pytest
import torch

from conftest import TESTS
from tunevault.demo import kernels

ROOT = TESTS.parent


def first_screen() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text[:text.index("\n## ")]


def test_first_screen_has_two_commands_and_ci_runs_the_second() -> None:
    screen = first_screen()
    block = re.search(r"```bash\n(.*?)```", screen, re.DOTALL)
    assert block is not None
    demo, tests = [line for line in block.group(1).splitlines() if line.strip()]
    assert demo == "pip install -e . && tunevault demo"
    install, test_command = tests.split(" && ", 1)
    assert install == 'pip install -e ".[test]"'
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert ci.count(test_command) == 2  # on the newest Triton and on the oldest supported
    assert re.search(r"about \d+ minutes on a 2-core CPU", screen)  # how long the suite takes
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in screen  # no 5 GB of CUDA


def test_declared_dependencies_cover_the_cpu_path(tv: Any) -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    x, y = torch.randn(8), torch.randn(8)
    torch.testing.assert_close(kernels.run_scaled_add(x, y), 2.0 * x + y)  # Triton's interpreter ran it
    needed = {name for name in ("triton", "torch", "numpy") if name in sys.modules}
    assert needed == {"triton", "torch", "numpy"} and needed <= declared
