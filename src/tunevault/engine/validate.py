"""Output validation: a candidate must agree with the first valid config and with itself.

Every tensor argument is snapshotted before the first run and restored before each run, so
every config sees the same inputs and the caller's tensors end as they started. A config is
run twice: runs that differ mean a race ("nondeterministic"); outputs that differ from the
reference config beyond the dtype's tolerance mean a bug in that config ("invalid").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tunevault.engine.failures import raising

if TYPE_CHECKING:
    import torch
    from triton import Config
    from triton.runtime.autotuner import Autotuner

# (rtol, atol) by dtype name; integers and booleans must match exactly.
TOLERANCE = {"float64": (1e-7, 1e-7), "float32": (1e-3, 1e-4), "float16": (1e-2, 1e-3),
             "bfloat16": (5e-2, 1e-2)}
FP8_TOLERANCE = (0.25, 0.1)


def _tensors(named: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in named.items() if hasattr(v, "data_ptr") and hasattr(v, "clone")}


def tolerance(dtype: torch.dtype) -> tuple[float, float] | None:
    name = str(dtype).removeprefix("torch.")
    if name in TOLERANCE:
        return TOLERANCE[name]
    if name.startswith("float8"):
        return FP8_TOLERANCE
    return None


def max_violation(ref: torch.Tensor, out: torch.Tensor) -> float | None:
    """Max abs difference when some element is outside tolerance, else None; NaN only matches NaN."""
    import torch

    if ref.shape != out.shape:
        return float("inf")
    tol = tolerance(ref.dtype)
    if tol is None or ref.is_complex():
        return None if torch.equal(ref, out) else float("inf")
    a, b = ref.double(), out.double()
    nan_a, nan_b = a.isnan(), b.isnan()
    if bool((nan_a != nan_b).any()):
        return float("nan")  # NaN where the other wrote a number
    a, b = a.masked_fill(nan_a, 0.0), b.masked_fill(nan_b, 0.0)
    same_inf = torch.isinf(a) & (a == b)
    diff = (a - b).abs().masked_fill(same_inf, 0.0)
    rtol, atol = tol
    if bool((diff > atol + rtol * a.abs().masked_fill(same_inf, 0.0)).any()):
        return float(diff.max())
    return None


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    import torch

    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return bool(torch.equal(a, b))


class Validator:
    """Checks configs of one call; the first config that passes becomes the reference."""

    def __init__(self, autotuner: Autotuner, args: tuple, kwargs: dict[str, Any]) -> None:
        self.autotuner, self.args, self.kwargs = autotuner, args, kwargs
        named = {**dict(zip(autotuner.arg_names, args, strict=False)), **kwargs}
        self.named = named
        self.tensors = _tensors(named)
        self.snapshot = {k: v.detach().clone() for k, v in self.tensors.items()}
        self.reference: dict[str, torch.Tensor] | None = None
        self.reference_index: int | None = None

    def restore(self) -> None:
        for name, tensor in self.tensors.items():
            tensor.copy_(self.snapshot[name])

    def _run(self, index: int, config: Config, on_launch: Callable[[], None] | None) -> dict[str, torch.Tensor]:
        """One run as stock's call after tuning (the end of ``benchmark()``, then ``run()``): not
        ``_bench``'s, whose ``restore_value`` post_hook would undo the outputs checked here."""
        at = self.autotuner
        self.restore()
        cfg_kwargs = config.all_kwargs()
        full = {**self.named, **cfg_kwargs}

        def launch() -> None:
            at.pre_hook(full, reset_only=True)
            if config.pre_hook is not None:
                config.pre_hook(full)
            if on_launch is not None:
                on_launch()
            at.fn.run(*self.args, **{**self.kwargs, "warmup": False}, **cfg_kwargs)

        raising(launch, index)()  # the config's own errors are told from the validator's
        return {k: v.detach().clone() for k, v in self.tensors.items()}

    def check(self, index: int, config: Config, on_launch: Callable[[], None] | None = None) -> str | None:
        """None when ``config`` is valid; else the reason it is excluded. Exceptions propagate: a
        config's error that stock Triton lets reach the caller as ConfigRaised."""
        try:
            first = self._run(index, config, on_launch)
            second = self._run(index, config, on_launch)
        finally:
            self.restore()
        racy = [n for n in first if not identical(first[n], second[n])]
        if racy:
            return f"nondeterministic: two runs wrote different {', '.join(racy)}"
        if self.reference is None:
            self.reference, self.reference_index = first, index
            return None
        worst: tuple[float, str] | None = None
        for name, ref in self.reference.items():
            bad = max_violation(ref, first[name])
            if bad is not None and (worst is None or bad > worst[0] or math.isnan(bad)):
                worst = (bad, name)
        if worst is None:
            return None
        what = "NaN mismatch" if math.isnan(worst[0]) else f"max abs diff {worst[0]:.3g}"
        return f"invalid: {what} in {worst[1]} vs first config (#{self.reference_index})"
