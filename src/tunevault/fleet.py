"""Check, at a point the user chooses, that every rank launched the same config for every key.

Agreement is built by the store (one decision per key fleet-wide); this is the audit. It is
never called implicitly, so it adds no collective to any hot path. Ranks exchange a fixed-size
digest first; only when digests differ do they exchange their decisions, as JSON in uint8
tensors (never pickle: ``all_gather_object`` would unpickle whatever a peer sends).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tunevault.core.model import ConfigSpec, canonical_json

if TYPE_CHECKING:
    from types import ModuleType

    import torch
    from torch.distributed import ProcessGroup

log = logging.getLogger("tunevault")


@dataclass(frozen=True)
class Mismatch:
    """One (kernel, key) launched with different configs: ``configs`` maps each config to its ranks."""

    kernel: str
    key: str
    configs: dict[str, tuple[int, ...]]
    missing: tuple[int, ...] = ()  # ranks that never launched this key

    def describe(self) -> str:
        parts = [f"rank{'s' if len(r) > 1 else ''} {','.join(map(str, r))} -> {cfg}"
                 for cfg, r in sorted(self.configs.items(), key=lambda kv: kv[1])]
        return f"{self.kernel} [{self.key}]: " + "; ".join(parts)


@dataclass(frozen=True)
class AgreementReport:
    ok: bool
    rank: int
    world_size: int
    checked: int  # distinct (kernel, key) pairs seen on any rank
    mismatches: tuple[Mismatch, ...] = ()
    # (kernel, key, ranks that never launched it) for keys every other rank agrees on
    partial: tuple[tuple[str, str, tuple[int, ...]], ...] = field(default=())

    def __bool__(self) -> bool:
        return self.ok

    def describe(self) -> str:
        if self.ok:
            return (f"tunevault: {self.world_size} ranks agree on every tuned config "
                    f"({self.checked} kernel/key pairs)")
        lines = [f"tunevault: ranks disagree on {len(self.mismatches)} of {self.checked} kernel/key pairs:"]
        lines += ["  " + m.describe() for m in self.mismatches]
        return "\n".join(lines)


def _entry(index: int, config: ConfigSpec) -> str:
    return f"#{index} {config.describe()}"


def used_decisions() -> dict[tuple[str, str], str]:
    """(kernel name, key text) -> the config this process launched for that key: its decision's
    (stored, tuned or adopted), else the one a fallback launched (predicted, the nearest key's,
    the first that compiles), so ranks that fell back differently for a key disagree."""
    from tunevault.integration.triton_adapter import runtime

    rt = runtime()
    if rt is None:
        return {}
    entries = {k: _entry(*launched) for k, launched in dict(rt.fallbacks).items()}
    # A key decided since its fallback (background tuning) launches its decision now.
    entries.update({k: _entry(d.config_index, d.config) for k, d in dict(rt.used).items()})
    return dict(sorted(entries.items()))


def _describe_key(text: str) -> str:
    try:
        return " ".join(f"{label}={value}" for label, value in json.loads(text))
    except (ValueError, TypeError):
        return text


def _gather_bytes(dist: ModuleType, torch: ModuleType, payload: bytes, group: ProcessGroup | None,
                  device: torch.device) -> list[bytes]:
    """All-gather variable-length bytes: lengths first, then padded uint8 tensors."""
    size = dist.get_world_size(group)
    length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(size)]
    dist.all_gather(lengths, length, group=group)
    longest = max(int(t.item()) for t in lengths)
    mine = torch.zeros(max(1, longest), dtype=torch.uint8, device=device)
    if payload:
        mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    gathered = [torch.zeros_like(mine) for _ in range(size)]
    dist.all_gather(gathered, mine, group=group)
    return [g[: int(n.item())].cpu().numpy().tobytes() for g, n in zip(gathered, lengths, strict=True)]


def _global_ranks(dist: ModuleType, group: ProcessGroup | None, size: int) -> list[int]:
    if group is None:
        return list(range(size))
    try:
        return [dist.get_global_rank(group, i) for i in range(size)]
    except (AttributeError, RuntimeError, ValueError):
        return list(range(size))


def compare(per_rank: list[dict[tuple[str, str], str]], ranks: list[int]) -> tuple[list[Mismatch], list, int]:
    """Mismatches (different configs) and partial keys (launched on some ranks only) across ranks."""
    keys = sorted({k for entries in per_rank for k in entries})
    mismatches, partial = [], []
    for kernel, key in keys:
        by_config: dict[str, list[int]] = {}
        missing = []
        for rank, entries in zip(ranks, per_rank, strict=True):
            cfg = entries.get((kernel, key))
            if cfg is None:
                missing.append(rank)
            else:
                by_config.setdefault(cfg, []).append(rank)
        if len(by_config) > 1:
            configs = {c: tuple(r) for c, r in by_config.items()}
            mismatches.append(Mismatch(kernel, _describe_key(key), configs, tuple(missing)))
        elif missing:
            partial.append((kernel, _describe_key(key), tuple(missing)))
    return mismatches, partial, len(keys)


def _decode(raw: bytes, rank: int) -> dict[tuple[str, str], str]:
    """A peer's entries, validated: a malformed payload counts as a rank that used nothing."""
    try:
        rows = json.loads(raw.decode())
        if not isinstance(rows, list) or not all(
                isinstance(r, list) and len(r) == 3 and all(isinstance(x, str) for x in r) for r in rows):
            raise ValueError("expected a list of [kernel, key, config] strings")
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("tunevault: rank %d sent malformed decisions (%s); ignoring them", rank, exc)
        return {}
    return {(k, key): cfg for k, key, cfg in rows}


def verify_agreement(group: ProcessGroup | None = None) -> AgreementReport:
    """Compare the configs every rank of ``group`` launched; every rank must call it (collective).

    Returns a report (``ok``, ``mismatches`` naming ranks and configs) and logs it: a warning
    on disagreement. Without torch.distributed initialised it checks this process alone.
    """
    import torch
    import torch.distributed as dist

    mine = used_decisions()
    if not (dist.is_available() and dist.is_initialized()):
        report = AgreementReport(True, 0, 1, len(mine))
        log.info("tunevault: verify_agreement: torch.distributed is not initialised; nothing to compare")
        return report
    size, rank = dist.get_world_size(group), dist.get_rank()
    backend = str(dist.get_backend(group)).lower()
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    body = canonical_json([[k, key, cfg] for (k, key), cfg in sorted(mine.items())]).encode()
    digest = torch.tensor(list(hashlib.sha256(body).digest()), dtype=torch.uint8, device=device)
    digests = [torch.zeros_like(digest) for _ in range(size)]
    dist.all_gather(digests, digest, group=group)
    ranks = _global_ranks(dist, group, size)
    if all(torch.equal(d, digests[0]) for d in digests):
        report = AgreementReport(True, rank, size, len(mine))
        log.info("%s", report.describe())
        return report
    raws = _gather_bytes(dist, torch, body, group, device)
    per_rank = [_decode(raw, r) for raw, r in zip(raws, ranks, strict=True)]
    mismatches, partial, checked = compare(per_rank, ranks)
    report = AgreementReport(not mismatches, rank, size, checked, tuple(mismatches), tuple(partial))
    if mismatches:
        log.warning("%s", report.describe())
    else:
        log.info("%s (%d keys were launched on some ranks only)", report.describe(), len(partial))
    return report
