"""The project's vocabulary as immutable, hashable, JSON-serialisable value objects.

Nothing here imports torch or triton: these objects travel through stores, bundles,
manifests and worker pipes, and must be validated on the way back in.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from tunevault.core import untrusted

SCHEMA_VERSION = 1
# Why a stored decision does not decide its key: serving ignores it (core.identity.declared_index).
UNDECLARED = "stored config is not one the kernel declares"
TIME_RANGE = (0.0, 32503680000.0)  # 1970 to 3000: every platform's localtime() takes these
MAX_SECONDS = 1e9  # a tuning that took longer than 30 years is not a measurement

JsonScalar = str | int | float | bool | None


class InvalidEntry(ValueError):
    """A persisted or received object failed validation; callers treat it as a miss."""


class TuningError(RuntimeError):
    """Every config of a kernel failed for a key, or a config raised in the isolated worker an error
    stock Triton would have let reach the caller (the worker cannot send the exception itself).
    Defined here so that a warmup replay, below the policy that raises it, can tell this lasting
    outcome from a failure of its own setup."""


def canonical_json(obj: Any) -> str:
    """One spelling per value, so hashes and store keys are stable across processes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def digest(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise InvalidEntry(what)


def _is_scalar(v: Any) -> bool:
    """JSON scalars that canonical_json can write back (no NaN or infinity)."""
    if isinstance(v, float):
        return math.isfinite(v)
    return v is None or isinstance(v, str | int | bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return _is_scalar(v) and isinstance(v, int | float) and not isinstance(v, bool)


@dataclass(frozen=True)
class ConfigSpec:
    """A triton.Config reduced to what identifies it: meta-parameters and launch options."""

    kwargs: tuple[tuple[str, JsonScalar], ...]
    options: tuple[tuple[str, JsonScalar], ...]
    pre_hook: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kwargs": dict(self.kwargs), "options": dict(self.options), "pre_hook": self.pre_hook}

    @classmethod
    def from_json(cls, data: Any) -> ConfigSpec:
        _require(isinstance(data, dict), "config must be an object")
        kw, opts = data.get("kwargs"), data.get("options")
        _require(isinstance(kw, dict) and isinstance(opts, dict), "config needs kwargs and options objects")
        for k, v in (*kw.items(), *opts.items()):
            _require(isinstance(k, str) and _is_scalar(v), f"config entry {k!r} is not a scalar")
        hook = data.get("pre_hook")
        _require(hook is None or isinstance(hook, str), "config pre_hook must be a name or null")
        return cls(tuple(sorted(kw.items())), tuple(sorted(opts.items())), hook)

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.kwargs]
        parts += [f"{k}={v}" for k, v in self.options if v is not None]
        return " ".join(parts) or "(default)"


@dataclass(frozen=True)
class KernelId:
    """Which kernel: by name, source (with JIT dependencies, not line numbers), configs and key."""

    name: str
    source_hash: str
    configs_hash: str
    key_names: tuple[str, ...]

    @cached_property
    def digest(self) -> str:
        return digest(self.to_json())

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source_hash": self.source_hash,
            "configs_hash": self.configs_hash,
            "key_names": list(self.key_names),
        }

    @classmethod
    def from_json(cls, data: Any) -> KernelId:
        _require(isinstance(data, dict), "kernel must be an object")
        for f in ("name", "source_hash", "configs_hash"):
            _require(isinstance(data.get(f), str), f"kernel.{f} must be a string")
        names = data.get("key_names")
        _require(isinstance(names, list) and all(isinstance(n, str) for n in names), "kernel.key_names")
        return cls(data["name"], data["source_hash"], data["configs_hash"], tuple(names))

    @property
    def short_name(self) -> str:
        return self.name.rsplit(":", 1)[-1].rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Fingerprint:
    """Where a decision is valid: toolchain, device and the env vars that change codegen."""

    triton: str
    target: str
    device: str
    cuda: str
    env: tuple[tuple[str, str], ...] = ()
    schema: int = SCHEMA_VERSION

    @cached_property
    def digest(self) -> str:
        return digest(self.to_json())

    def to_json(self) -> dict[str, Any]:
        return {
            "triton": self.triton,
            "target": self.target,
            "device": self.device,
            "cuda": self.cuda,
            "env": dict(self.env),
            "schema": self.schema,
        }

    def differences(self, here: Fingerprint) -> str:
        """What differs from ``here``, field by field ("triton: 3.6.0 here 3.9.0"; an env variable
        set on one side only counts as a difference), for a miss message."""
        out = [f"{f}: {getattr(self, f)} here {getattr(here, f)}" for f in ("triton", "target", "device", "cuda")
               if getattr(self, f) != getattr(here, f)]
        mine, theirs = dict(self.env), dict(here.env)
        out += [f"{name}={mine.get(name, '(unset)')} here {theirs.get(name, '(unset)')}"
                for name in sorted(mine.keys() | theirs.keys()) if mine.get(name) != theirs.get(name)]
        if self.schema != here.schema:
            out.append(f"schema: {self.schema} here {here.schema}")
        return ", ".join(out)

    @classmethod
    def from_json(cls, data: Any) -> Fingerprint:
        _require(isinstance(data, dict), "fingerprint must be an object")
        for f in ("triton", "target", "device", "cuda"):
            _require(isinstance(data.get(f), str), f"fingerprint.{f} must be a string")
        env = data.get("env", {})
        _require(isinstance(env, dict) and all(isinstance(v, str) for v in env.values()), "fingerprint.env")
        _require(_is_int(data.get("schema")), "fingerprint.schema must be an integer")
        return cls(data["triton"], data["target"], data["device"], data["cuda"],
                   tuple(sorted(env.items())), data["schema"])


@dataclass(frozen=True)
class TuningKey:
    """Triton's tuning key with a label on every element, so misses can be explained."""

    items: tuple[tuple[str, JsonScalar], ...]

    def to_json(self) -> list[list[JsonScalar]]:
        return [[label, value] for label, value in self.items]

    @classmethod
    def from_json(cls, data: Any) -> TuningKey:
        _require(isinstance(data, list), "key must be a list")
        items = []
        for pair in data:
            _require(isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                     and _is_scalar(pair[1]), "key items must be [label, scalar]")
            items.append((pair[0], pair[1]))
        return cls(tuple(items))

    @cached_property
    def text(self) -> str:
        """The stable string a store indexes by."""
        return canonical_json(self.to_json())

    def describe(self) -> str:
        return " ".join(f"{label}={value}" for label, value in self.items)

    def differences(self, other: TuningKey) -> list[tuple[str, JsonScalar, JsonScalar]]:
        """Labelled elements that differ, as (label, other's value, this value). Values differ as the
        key text tells them apart: ``256`` and ``256.0`` (or ``1`` and ``True``) are two keys there,
        though Python's ``==`` says they are equal."""
        mine, theirs = dict(self.items), dict(other.items)
        labels = list(dict.fromkeys([*theirs, *mine]))
        return [(lb, theirs.get(lb), mine.get(lb)) for lb in labels
                if _typed(mine.get(lb)) != _typed(theirs.get(lb))]

    def in_order(self, names: list[str]) -> TuningKey:
        """This key with its dtype elements in the order of ``names`` (its other elements first, as
        they are): the kernel's parameter order makes today's key; a call's order, the key tunevault
        wrote before stop 26, where a call passed tensors by keyword in another order."""
        rank = {name: i for i, name in enumerate(names)}

        def dtype_of(label: str) -> str | None:
            return label[6:-1] if label.startswith("dtype(") and label.endswith(")") else None

        plain = [item for item in self.items if dtype_of(item[0]) is None]
        dtypes = sorted((item for item in self.items if dtype_of(item[0]) is not None),
                        key=lambda item: rank.get(dtype_of(item[0]) or "", len(rank)))
        return TuningKey(tuple(plain + dtypes))


def _typed(value: JsonScalar) -> tuple[type, JsonScalar]:
    return type(value), value


@dataclass(frozen=True)
class CandidateResult:
    """One config's measurement: timings in ms (median, p20, p80) or why it failed.

    ``n`` and ``iqr`` say how noisy the timings were (0 and None when unknown, e.g. a kernel's own
    ``do_bench``); ``screened`` marks timings from the short screen only (the config was judged
    slower there and not timed carefully); ``slower`` is the selection's confidence that this
    config is slower than the fastest. All four are optional in stored JSON, so older entries read.
    ``scalar``: the kernel's own benchmarker returned one number, not a list (``configs_timings``
    then maps the config to that number, as stock's does); optional too.
    """

    index: int
    config: ConfigSpec
    timings: tuple[float, ...] = ()
    error: str | None = None
    n: int = 0
    iqr: float | None = None
    slower: float | None = None
    screened: bool = False
    scalar: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.timings)

    def to_json(self) -> dict[str, Any]:
        out = {"index": self.index, "config": self.config.to_json(), "timings": list(self.timings),
               "error": self.error}
        if self.n:
            out["n"] = self.n
        if self.iqr is not None:
            out["iqr"] = self.iqr
        if self.slower is not None:
            out["slower"] = self.slower
        if self.screened:
            out["screened"] = True
        if self.scalar:
            out["scalar"] = True
        return out

    @classmethod
    def from_json(cls, data: Any) -> CandidateResult:
        _require(isinstance(data, dict) and _is_int(data.get("index")), "candidate.index")
        t = data.get("timings", [])
        _require(isinstance(t, list) and all(_is_number(x) for x in t), "candidate.timings")
        err = data.get("error")
        _require(err is None or isinstance(err, str), "candidate.error")
        n, iqr, slower = data.get("n", 0), data.get("iqr"), data.get("slower")
        _require(_is_int(n) and n >= 0, "candidate.n")
        _require(iqr is None or (_is_number(iqr) and iqr >= 0), "candidate.iqr")
        _require(slower is None or (_is_number(slower) and 0 <= slower <= 1), "candidate.slower")
        screened = data.get("screened", False)
        _require(isinstance(screened, bool), "candidate.screened")
        scalar = data.get("scalar", False)
        _require(isinstance(scalar, bool), "candidate.scalar")
        return cls(data["index"], ConfigSpec.from_json(data.get("config")), tuple(float(x) for x in t), err,
                   n, None if iqr is None else float(iqr), None if slower is None else float(slower), screened,
                   scalar)


@dataclass(frozen=True)
class Decision:
    """The chosen config for (kernel, fingerprint, key), with the evidence for it."""

    kernel: KernelId
    fingerprint: Fingerprint
    key: TuningKey
    config_index: int
    config: ConfigSpec
    candidates: tuple[CandidateResult, ...] = ()
    margin: float | None = None
    tuning_seconds: float = 0.0
    provenance: tuple[tuple[str, JsonScalar], ...] = field(default=())

    @cached_property
    def store_key(self) -> tuple[str, str, str]:
        return (self.kernel.digest, self.fingerprint.digest, self.key.text)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "kernel": self.kernel.to_json(),
            "fingerprint": self.fingerprint.to_json(),
            "key": self.key.to_json(),
            "config_index": self.config_index,
            "config": self.config.to_json(),
            "candidates": [c.to_json() for c in self.candidates],
            "margin": self.margin,
            "tuning_seconds": self.tuning_seconds,
            "provenance": dict(self.provenance),
        }

    def same_choice(self, other: Decision) -> bool:
        """The same decision: the same config (index and values) for the same key, whatever evidence
        either carries (timings, margin, provenance): a winners-only bundle, stripped of its
        timings, still holds the same decisions as the store it came from."""
        return (self.store_key == other.store_key and self.config_index == other.config_index
                and self.config == other.config)

    def dumps(self) -> str:
        return canonical_json(self.to_json())

    @classmethod
    def from_json(cls, data: Any) -> Decision:
        _require(isinstance(data, dict), "decision must be an object")
        _require(data.get("schema") == SCHEMA_VERSION, f"unsupported schema {data.get('schema')!r}")
        idx = data.get("config_index")
        _require(_is_int(idx) and idx >= 0, "config_index")
        cands = data.get("candidates", [])
        _require(isinstance(cands, list), "candidates must be a list")
        margin = data.get("margin")
        _require(margin is None or _is_number(margin), "margin")
        secs = data.get("tuning_seconds", 0.0)
        _require(_is_number(secs), "tuning_seconds")
        _require(0.0 <= secs <= MAX_SECONDS, "tuning_seconds out of range")
        prov = data.get("provenance", {})
        _require(isinstance(prov, dict) and all(_is_scalar(v) for v in prov.values()), "provenance")
        when = prov.get("time")
        _require(when is None or (_is_number(when) and TIME_RANGE[0] <= when <= TIME_RANGE[1]),
                 "provenance.time must be a time between 1970 and 3000")
        return cls(
            kernel=KernelId.from_json(data.get("kernel")),
            fingerprint=Fingerprint.from_json(data.get("fingerprint")),
            key=TuningKey.from_json(data.get("key")),
            config_index=idx,
            config=ConfigSpec.from_json(data.get("config")),
            candidates=tuple(CandidateResult.from_json(c) for c in cands),
            margin=None if margin is None else float(margin),
            tuning_seconds=float(secs),
            provenance=tuple(sorted(prov.items())),
        )

    @classmethod
    def loads(cls, text: str | bytes) -> Decision:
        """Parse a stored entry strictly (bounded nesting, finite numbers, valid Unicode, no
        duplicate keys): whatever the text holds, the only error is InvalidEntry."""
        try:
            return cls.from_json(untrusted.loads(text, what="entry"))
        except InvalidEntry:
            raise
        except Exception as exc:
            raise InvalidEntry(f"not a valid decision: {str(exc)[:300]}") from exc
