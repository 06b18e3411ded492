"""ArgSpec: enough about a call's arguments to rebuild equivalent ones in another process.

Tensors keep shape, stride, dtype and device; small integer tensors (index tensors such as
``cu_seqlens``) keep their values verbatim, larger ones their range, so a replayed kernel
indexes memory the way the captured one did. The values are kept in logical order (what
``tensor.tolist()`` shows) and written back through the captured strides, so a strided view
(``meta[:, 0]``, ``arange(10)[::2]``, a transpose) holds the same value at every element.
Grids are captured per declared config, because a grid is usually a lambda of the
meta-parameters and cannot be serialised.
A CallSpec read from a manifest is checked before anything is allocated (``CallSpec.check``).
A float scalar JSON cannot hold (``-inf`` as a mask value, ``inf``, ``nan``) is written as
``{"kind": "float", "value": "-inf"}``: a reader that predates it refuses the kind rather than
rebuilding something else, and finite floats keep the plain ``scalar`` form older readers know.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict, TypeGuard

from tunevault.core.model import InvalidEntry, JsonScalar

if TYPE_CHECKING:
    import torch
    import triton.language as tl
    from triton.runtime.autotuner import Autotuner, Config

SMALL_INT_TENSOR = 4096
LAUNCH_KWARGS = ("grid", "warmup")
# Bounds on what a manifest may ask a replay to build (manifests come from other machines).
MAX_BYTES_VAR = "TUNEVAULT_REPLAY_MAX_BYTES"
MAX_BYTES = 8 << 30  # all tensors of one rebuilt call together
MAX_RANK, MAX_DIM, MAX_ARGS, MAX_GRIDS = 16, 1 << 48, 1024, 4096
MAX_INT = 1 << 62
NOT_A_SIZE = re.compile(r"seed|philox|rng", re.IGNORECASE)  # integer arguments that index nothing
NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}  # kind "float": the text of each


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise InvalidEntry(what)


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "data_ptr") and hasattr(value, "stride") and hasattr(value, "dtype")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Layout(TypedDict):
    """A tensor ArgSpec's layout fields, as keywords."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    device: str


@dataclass(frozen=True)
class ArgSpec:
    kind: str  # "tensor" | "scalar" | "tl_dtype"
    value: JsonScalar = None
    shape: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    dtype: str = ""
    device: str = ""
    values: tuple[int, ...] | None = None  # small integer tensors, verbatim (logical order, as tolist())
    low: float | None = None
    high: float | None = None

    @classmethod
    def of(cls, value: Any) -> ArgSpec:
        if _is_tensor(value):
            return cls._of_tensor(value)
        if value is None or isinstance(value, bool | int | float | str):
            return cls("scalar", value)
        if type(value).__module__.startswith("triton.language"):
            return cls("tl_dtype", str(value))
        raise TypeError(f"cannot capture an argument of type {type(value).__name__}")

    @classmethod
    def _of_tensor(cls, t: torch.Tensor) -> ArgSpec:
        import torch

        base = _Layout(shape=tuple(t.shape), stride=tuple(t.stride()), dtype=_dtype_name(t.dtype),
                       device=str(t.device))
        is_int = not (t.dtype.is_floating_point or t.dtype.is_complex) and t.dtype != torch.bool
        if is_int and t.numel() > 0:
            flat = t.detach().reshape(-1).to("cpu", torch.int64)
            if t.numel() <= SMALL_INT_TENSOR:
                return cls("tensor", values=tuple(int(v) for v in flat.tolist()), **base)
            return cls("tensor", low=float(flat.min()), high=float(flat.max()), **base)
        return cls("tensor", **base)

    def to_json(self) -> dict[str, Any]:
        if isinstance(self.value, float) and not math.isfinite(self.value):
            return {"kind": "float", "value": repr(self.value)}  # 'inf', '-inf' or 'nan'
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind != "tensor":
            out["value"] = self.value
            return out
        out.update(shape=list(self.shape), stride=list(self.stride), dtype=self.dtype, device=self.device)
        if self.values is not None:
            out["values"] = list(self.values)
        if self.low is not None:
            out.update(low=self.low, high=self.high)
        return out

    @classmethod
    def from_json(cls, data: Any) -> ArgSpec:
        _require(isinstance(data, dict) and data.get("kind") in ("tensor", "scalar", "tl_dtype", "float"),
                 "argspec.kind")
        if data["kind"] == "float":
            text = data.get("value")
            _require(isinstance(text, str) and text in NON_FINITE,
                     f"argspec.value of kind float must be one of {sorted(NON_FINITE)}")
            return cls("scalar", NON_FINITE[text])
        if data["kind"] != "tensor":
            v = data.get("value")
            _require(v is None or isinstance(v, bool | int | float | str), "argspec.value must be a scalar")
            _require(not isinstance(v, int) or -MAX_INT <= v <= MAX_INT, "argspec.value out of range")
            _require(not isinstance(v, str) or len(v) <= 1000, "argspec.value too long")
            return cls(data["kind"], v)
        shape, stride = data.get("shape"), data.get("stride")
        for seq in (shape, stride):
            _require(isinstance(seq, list) and len(seq) <= MAX_RANK
                     and all(_is_int(x) and 0 <= x < MAX_DIM for x in seq), "argspec shape")
        _require(len(shape) == len(stride), "argspec shape and stride differ in rank")
        _require(isinstance(data.get("dtype"), str) and isinstance(data.get("device"), str)
                 and len(data["dtype"]) + len(data["device"]) <= 200, "argspec dtype")
        values = data.get("values")
        _require(values is None or (isinstance(values, list) and len(values) <= SMALL_INT_TENSOR
                                    and all(_is_int(v) and -MAX_INT <= v <= MAX_INT for v in values)),
                 "argspec.values must be at most 4096 integers")
        low, high = data.get("low"), data.get("high")
        _require((low is None) == (high is None), "argspec low/high come together")
        _require(low is None or (_is_number(low) and _is_number(high) and -MAX_INT <= low <= high <= MAX_INT),
                 "argspec low/high must be numbers, low <= high")
        fits = _dtype_range(data["dtype"]) if values or low is not None else None
        if fits is not None:  # a value the dtype cannot hold would be rebuilt wrapped (2**32 + 5 as int32: 5)
            lo, hi = fits
            outside = [v for v in (*(values or ()), *(() if low is None else (low, high))) if not lo <= v <= hi]
            if outside:
                raise InvalidEntry(f"argspec values must fit {data['dtype']} ({lo} to {hi}); got {outside[0]}")
        return cls("tensor", shape=tuple(shape), stride=tuple(stride), dtype=data["dtype"], device=data["device"],
                   values=None if values is None else tuple(values),
                   low=None if low is None else float(low), high=None if high is None else float(high))

    def index_range(self) -> tuple[int, int]:
        """The smallest and largest value a rebuilt tensor holds, as an index it may be (0, -1: no values kept)."""
        if self.values:
            return min(self.values), max(self.values)
        if self.low is not None and self.high is not None:
            return int(self.low), int(self.high)
        return 0, -1

    def storage_size(self) -> int:
        if any(s == 0 for s in self.shape):
            return 0
        return 1 + sum((n - 1) * st for n, st in zip(self.shape, self.stride, strict=True))

    def build(self, device: str | None = None, generators: Generators | None = None, slack: int = 0,
              ) -> torch.Tensor | tl.dtype | JsonScalar:
        """A fresh argument equivalent to the captured one (random data, same layout).

        Data is generated on the target device: filling a large tensor on the host and copying
        it over costs a tuning worker seconds per key. On ``meta`` there is no data and no memory:
        what a compile needs of the argument, nothing a launch would. ``slack``: allocate at least this many
        elements behind the view (an untrusted call indexes up to its largest integer scalar)."""
        if self.kind == "scalar":
            return self.value
        if self.kind == "tl_dtype":
            return _tl_dtype(str(self.value))
        import torch

        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise InvalidEntry(f"unknown dtype {self.dtype!r}")
        dev = torch.device(device or self.device)
        size = max(self.storage_size(), slack)
        if dev.type == "meta":  # layout only (dtype, shape, strides, alignment): enough to compile
            return torch.as_strided(torch.empty(size, dtype=dtype, device=dev), self.shape, self.stride)
        gen = (generators or Generators(0)).on(dev)
        if self.values and len(self.values) == math.prod(self.shape):
            flat = self._verbatim(size, dtype, dev)
        elif self.values is not None or self.low is not None:
            lo = int(self.low if self.low is not None else min(self.values or (0,)))
            hi = int(self.high if self.high is not None else max(self.values or (0,)))
            flat = torch.randint(lo, hi + 1, (size,), generator=gen, device=dev, dtype=torch.int64).to(dtype)
        elif dtype == torch.bool:
            flat = torch.rand(size, generator=gen, device=dev) < 0.5
        elif dtype.is_floating_point:
            native = dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
            flat = torch.randn(size, generator=gen, device=dev, dtype=dtype if native else torch.float32).to(dtype)
        else:
            flat = torch.randint(0, 8, (size,), generator=gen, device=dev, dtype=torch.int64).to(dtype)
        return torch.as_strided(flat, self.shape, self.stride)

    def _verbatim(self, size: int, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
        """Storage of ``size`` elements whose view through the captured strides holds the captured
        values, element for element. Memory the view skips (between the rows of ``meta[:, 0]``) and
        the slack behind it hold the smallest captured value: still an index the call used."""
        import torch

        values = torch.tensor(self.values or (), dtype=torch.int64, device=dev)
        flat = torch.full((size,), int(values.min()), dtype=torch.int64, device=dev)
        positions = torch.as_strided(torch.arange(self.storage_size(), device=dev), self.shape, self.stride)
        flat[positions.reshape(-1)] = values  # overlapping elements (stride 0) were equal when captured
        return flat.to(dtype)


class Generators:
    """One seeded random generator per device, so rebuilt arguments are reproducible anywhere."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.by_device: dict[torch.device, torch.Generator] = {}

    def on(self, device: torch.device) -> torch.Generator:
        import torch

        if device not in self.by_device:
            self.by_device[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.by_device[device]


def _tl_dtype(name: str) -> tl.dtype:
    import triton.language as tl

    for attr in dir(tl):
        obj = getattr(tl, attr)
        if type(obj).__module__.startswith("triton.language") and str(obj) == name and hasattr(obj, "is_fp16"):
            return obj
    raise InvalidEntry(f"unknown triton dtype {name!r}")


def _dtype_range(name: str) -> tuple[int, int] | None:
    """The values a tensor of torch dtype ``name`` holds exactly: 0 and 1 for bool, ``torch.iinfo``
    for an integer dtype; None for a floating, complex or unknown one (``build`` refuses unknown)."""
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or dtype.is_floating_point or dtype.is_complex:
        return None
    if dtype == torch.bool:
        return 0, 1
    try:
        info = torch.iinfo(dtype)
    except TypeError:  # a quantized dtype: no integer range torch reports
        return None
    return int(info.min), int(info.max)


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _launch_meta(autotuner: Autotuner, named: dict[str, Any], config: Config) -> dict[str, Any]:
    """What the grid sees when the autotuner launches ``config``: the call's arguments, the config's,
    and the values of every ``@triton.heuristics`` under the autotuner, applied outermost first as
    ``Heuristics.run`` does (a grid may read them: ``meta["ROWS"]``). Parameters the call left to
    their defaults are there too, as Triton binds them before it calls the grid."""
    import inspect

    from triton.runtime.autotuner import Heuristics

    from tunevault.core.identity import jit_of

    params = inspect.signature(jit_of(autotuner).fn).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    meta = {**defaults, **named, **config.all_kwargs()}
    layer: Any = autotuner.fn
    for _ in range(32):
        if not isinstance(layer, Heuristics):
            break
        for name, heuristic in layer.values.items():
            meta[name] = heuristic({**meta})  # a fresh dict per heuristic, as Triton passes
        layer = layer.fn
    return meta


def constexpr_names(autotuner: Autotuner) -> frozenset[str]:
    """The kernel's ``tl.constexpr`` parameters: compile-time values (block sizes, flags), which
    Triton specialises on rather than passes to the kernel as runtime integers."""
    import inspect

    from tunevault.core.identity import jit_of

    jit = jit_of(autotuner)
    params = getattr(jit, "params", None)  # JITFunction; the interpreter's function has none
    if params is not None:
        return frozenset(p.name for p in params if p.is_constexpr)
    found = set()
    for param in inspect.signature(jit.fn).parameters.values():
        ann = param.annotation  # as Triton reads it: "constexpr" in the annotation's name
        text = ann if isinstance(ann, str) else getattr(ann, "__name__", None) or str(ann)
        if ann is not inspect.Parameter.empty and "constexpr" in text:
            found.add(param.name)
    return frozenset(found)


def max_bytes() -> int:
    """The cap on one rebuilt call's tensors: ``$TUNEVAULT_REPLAY_MAX_BYTES`` (bytes), default 8 GiB."""
    raw = os.environ.get(MAX_BYTES_VAR, "").strip()
    if not raw:
        return MAX_BYTES
    try:
        return int(float(raw))
    except (ValueError, OverflowError):
        raise ValueError(f"{MAX_BYTES_VAR} must be a number of bytes; got {raw!r}") from None


@dataclass(frozen=True)
class CallSpec:
    """A whole call: positional and keyword arguments, and the grid each declared config launches."""

    args: tuple[ArgSpec, ...]
    kwargs: tuple[tuple[str, ArgSpec], ...]
    grids: tuple[tuple[int, ...], ...] = ()  # by declared config index
    untrusted: bool = field(default=False, compare=False, repr=False)  # read from a file: check before building
    genuine: bool = field(default=False, compare=False, repr=False)  # its line's signature verified (``check``)

    @property
    def devices(self) -> list[str]:
        """The devices the call's tensors were captured on, in argument order, each once."""
        return list(dict.fromkeys(a.device for a in (*self.args, *(v for _, v in self.kwargs)) if a.kind == "tensor"))

    @classmethod
    def of(cls, autotuner: Autotuner, args: tuple, kwargs: dict[str, Any]) -> CallSpec:
        named = {**dict(zip(autotuner.arg_names, args, strict=False)),
                 **{k: v for k, v in kwargs.items() if k not in LAUNCH_KWARGS}}
        grid = kwargs.get("grid")
        grids = []
        for config in autotuner.configs:
            g = grid(_launch_meta(autotuner, named, config)) if callable(grid) else grid
            g = tuple(int(x) for x in (g if isinstance(g, tuple | list) else (g,)))
            grids.append(g + (1,) * (3 - len(g)) if len(g) < 3 else g)
        return cls(tuple(ArgSpec.of(a) for a in args),
                   tuple((k, ArgSpec.of(v)) for k, v in kwargs.items() if k not in LAUNCH_KWARGS),
                   tuple(grids))

    def to_json(self) -> dict[str, Any]:
        return {"args": [a.to_json() for a in self.args], "kwargs": {k: v.to_json() for k, v in self.kwargs},
                "grids": [list(g) for g in self.grids]}

    @classmethod
    def from_json(cls, data: Any, untrusted: bool = True, genuine: bool = False) -> CallSpec:
        """``untrusted`` (a manifest from elsewhere): ``build`` first checks sizes (see ``check``);
        ``genuine``: the line's signature verified, so it is a call that really ran."""
        _require(isinstance(data, dict), "callspec must be an object")
        args, kwargs, grids = data.get("args"), data.get("kwargs"), data.get("grids", [])
        _require(isinstance(args, list) and isinstance(kwargs, dict) and isinstance(grids, list), "callspec")
        _require(len(args) + len(kwargs) <= MAX_ARGS and len(grids) <= MAX_GRIDS, "callspec too large")
        for g in grids:
            _require(isinstance(g, list) and len(g) <= 3 and all(_is_int(x) and 0 <= x < 1 << 31 for x in g),
                     "callspec.grids")
        return cls(tuple(ArgSpec.from_json(a) for a in args),
                   tuple((str(k), ArgSpec.from_json(v)) for k, v in kwargs.items()),
                   tuple(tuple(g) for g in grids), untrusted, genuine)

    def check(self, autotuner: Autotuner, limit: int | None = None) -> int:
        """Refuse (InvalidEntry, with the reason) a call that cannot be replayed safely; return the
        slack every rebuilt tensor gets (elements), so a kernel indexing up to a size stays in memory.

        The rule, for each integer argument and each value an integer tensor keeps (``values``, or its
        ``low``/``high`` range: index value ``i`` asks for ``i + 1`` elements); names with ``seed``,
        ``philox`` or ``rng`` index nothing:

        - no larger than the largest tensor argument: it may be a size, stride or offset, so every
          tensor gets at least that many elements (the cost is bounded by the largest tensor);
        - larger than every tensor, a ``tl.constexpr``: a compile-time value (a block size the kernel
          masks, a sentinel), never padded for;
        - larger than every tensor, a runtime integer: a genuine call ran with it and these tensors,
          so it was not an unmasked extent of them (``pad_id=151643`` with 1024-element tensors);
          a forged line may use it as one, so every tensor is padded to it while that fits ``limit``.
          Past ``limit``, a signed line (``genuine``: captured by this fleet) is replayed as captured,
          an unsigned one is refused;
        - negative (an offset or index before a tensor's start, which padding cannot cover), a runtime
          integer or index value whose magnitude is larger than every tensor: refused on an unsigned
          line, replayed as captured on a signed one;
        - a captured grid launches more programs than the largest tensor has elements: refused;
        - its tensors, with the slack, together exceed ``limit`` bytes (``$TUNEVAULT_REPLAY_MAX_BYTES``,
          default 8 GiB): refused."""
        import torch

        named = [*zip(autotuner.arg_names, self.args, strict=False), *self.kwargs]
        tensors = [(name, spec) for name, spec in named if spec.kind == "tensor"]
        if not tensors:
            return 0  # nothing to index into, nothing to allocate
        largest = max(spec.storage_size() for _, spec in tensors)
        constexprs = constexpr_names(autotuner)
        ints = [(name, spec.value) for name, spec in named
                if spec.kind == "scalar" and _is_int(spec.value) and not NOT_A_SIZE.search(name)]
        ranges = [(name, spec.index_range()) for name, spec in tensors if not NOT_A_SIZE.search(name)]
        # (elements every tensor needs for the kernel to stay in its memory, what asks for them): a
        # scalar as an extent, an index tensor's values as indices (constexprs pad only within bounds)
        needs = [*((value, f"{name}={value}") for name, value in ints if value <= largest or name not in constexprs),
                 *((hi + 1, f"{name} holding the index {hi}") for name, (_, hi) in ranges if hi >= 0)]
        slack = max([0, *(need for need, _ in needs if need <= largest)])
        beyond = max([(need, what) for need, what in needs if need > largest], default=None)
        lowest = min([*((value, f"{name}={value}") for name, value in ints if name not in constexprs),
                      *((lo, f"{name} holding the index {lo}") for name, (lo, _) in ranges)], default=None)
        if lowest is not None and -lowest[0] > largest and not self.genuine:
            raise InvalidEntry(
                f"{lowest[1]} is negative past every tensor argument ({largest} elements at most): as an offset "
                "or index the kernel would read or write before its memory; a signed manifest "
                "(TUNEVAULT_BUNDLE_KEY at capture and warmup) is replayed as captured")
        for i, grid in enumerate(self.grids):
            programs = 1
            for n in grid:
                programs *= n
            if programs > max(largest, 1):
                raise InvalidEntry(f"the grid of config #{i} launches {programs} programs, more than the largest "
                                   f"tensor has elements ({largest})")
        limit = max_bytes() if limit is None else limit
        itemsizes = []
        for name, spec in tensors:
            dtype = getattr(torch, spec.dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise InvalidEntry(f"unknown dtype {spec.dtype!r} for {name}")
            itemsizes.append((spec.storage_size(), dtype.itemsize))

        def total(pad: int) -> int:
            return sum(max(size, pad) * item for size, item in itemsizes)

        if total(slack) > limit:
            raise InvalidEntry(f"the rebuilt tensors would take {total(slack)} bytes, over the {limit}-byte cap "
                               f"({MAX_BYTES_VAR})")
        if beyond is not None:
            value, what = beyond
            if total(value) <= limit:
                return value
            if not self.genuine:
                raise InvalidEntry(
                    f"{what} is larger than every tensor argument ({largest} elements at most), and padding "
                    f"them to {value} elements would take {total(value)} bytes, over the {limit}-byte cap "
                    f"({MAX_BYTES_VAR}): were it a size or an index, the kernel would read or write out of bounds; "
                    "a signed manifest (TUNEVAULT_BUNDLE_KEY at capture and warmup) is replayed as captured")
        return slack

    def build(self, autotuner: Autotuner, device: str | None = None, seed: int = 0) -> tuple[tuple, dict[str, Any]]:
        """Rebuild ``(args, kwargs)`` for ``autotuner.run``, with a grid that follows the config."""
        slack = self.check(autotuner) if self.untrusted else 0
        if self.grids and len(self.grids) != len(autotuner.configs):
            raise InvalidEntry(f"the kernel declares {len(autotuner.configs)} configs, and the captured call "
                               f"has a grid for {len(self.grids)}: its configs changed since the capture "
                               "(a library upgrade?); capture its keys again with this version")
        gen = Generators(seed)
        args = tuple(a.build(device, gen, slack) for a in self.args)
        kwargs: dict[str, Any] = {k: v.build(device, gen, slack) for k, v in self.kwargs}
        table = [(c.kwargs, g) for c, g in zip(autotuner.configs, self.grids, strict=False)]

        def grid(meta: dict[str, Any]) -> tuple[int, ...]:
            for cfg, g in table:
                if all(meta.get(k) == v for k, v in cfg.items()):
                    return g
            raise InvalidEntry("replayed launch uses a config with no captured grid")

        kwargs["grid"] = grid
        kwargs["warmup"] = False
        return args, kwargs
