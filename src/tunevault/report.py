"""What tuning cost and when: tables and a picture from an events log or a key manifest.

The picture answers the serving questions at a glance: which kernels spend tuning time, and
did any tuning happen after the seal (it is drawn in red, right of the dashed seal line)?
matplotlib is an optional extra, imported only to draw, on its Agg canvas (no display).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

from tunevault.capture import manifest as mf

WARMUP, SERVING, MISS, ERROR = "#4C72B0", "#DD4444", "#F0A030", "#8B1A1A"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def short(kernel: str) -> str:
    return kernel.rsplit(":", 1)[-1].rsplit(".", 1)[-1]


def load(path: str | os.PathLike[str]) -> tuple[str, Any]:
    """``("events", [event, ...])`` or ``("manifest", [ManifestEntry, ...])``, by the file's content."""
    with open(path, encoding="utf-8") as fh:
        rows = []
        for text in fh:
            try:
                rows.append(json.loads(text))
            except ValueError:
                continue
    rows = [r for r in rows if isinstance(r, dict)]
    if any(r.get("format") == mf.FORMAT for r in rows):
        return "manifest", mf.read(path)
    if any(isinstance(r.get("event"), str) for r in rows):
        return "events", sorted((r for r in rows if isinstance(r.get("event"), str)),
                                key=lambda r: float(r.get("time", 0.0)))
    raise ValueError(f"{os.fspath(path)}: neither a tunevault events log nor a key manifest")


# ---------------------------------------------------------------------- tables


def summarize_events(events: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per kernel: tunings and tuning seconds per phase, misses, fallbacks, errors."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in events:
        kind, kernel = e.get("event"), e.get("kernel")
        if not isinstance(kernel, str):
            continue
        row, phase = out[kernel], e.get("phase", "warmup")
        if kind == "tuning":
            row[f"tunings_{phase}"] += 1
            row[f"seconds_{phase}"] += float(e.get("seconds") or 0.0)
        elif kind == "miss":
            row["misses"] += 1
            row["errors"] += e.get("policy") == "error"
        elif kind == "fallback":
            row["fallbacks"] += 1
    return {k: dict(v) for k, v in out.items()}


def events_table(events: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["kernel", "tunings (warmup)", "tunings (serving)", "tuning s (warmup)", "tuning s (serving)",
               "misses", "fallbacks", "errors"]
    rows = []
    for kernel, r in sorted(summarize_events(events).items(), key=lambda kv: -_seconds(kv[1])):
        rows.append([kernel, int(r.get("tunings_warmup", 0)), int(r.get("tunings_serving", 0)),
                     f"{r.get('seconds_warmup', 0.0):.2f}", f"{r.get('seconds_serving', 0.0):.2f}",
                     int(r.get("misses", 0)), int(r.get("fallbacks", 0)), int(r.get("errors", 0))])
    return headers, rows


def manifest_table(entries: list[mf.ManifestEntry]) -> tuple[list[str], list[list[Any]]]:
    headers = ["kernel", "key", "calls", "hit", "tuned", "missed", "processes", "argspec"]
    rows = [[e.kernel, e.key.describe(), e.count, e.counts["hit"], e.counts["tuned"], e.counts["missed"],
             len(e.processes), "yes" if e.callspec is not None else f"no ({e.callspec_error or '?'})"]
            for e in sorted(entries, key=lambda e: (e.kernel, -e.count))]
    return headers, rows


def _seconds(row: dict[str, float]) -> float:
    return row.get("seconds_warmup", 0.0) + row.get("seconds_serving", 0.0)


# ---------------------------------------------------------------------- pictures


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable("drawing needs matplotlib: pip install 'tunevault[plot]'") from None
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_events(events: list[dict[str, Any]], out: str | os.PathLike[str]) -> str:
    """Tuning seconds per kernel (warmup vs serving) and a timeline of tunings and misses with the seal."""
    events_figure(events).savefig(out)
    return os.fspath(out)


def events_figure(events: list[dict[str, Any]]) -> Any:
    """The picture of :func:`plot_events`, as a matplotlib Figure."""
    summary = summarize_events(events)
    kernels = sorted(summary, key=lambda k: _seconds(summary[k]))
    rows = max(1, len(kernels))
    fig = _figure(12, 1.6 + 0.45 * rows)
    bars, line = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
    y = range(len(kernels))
    warm = [summary[k].get("seconds_warmup", 0.0) for k in kernels]
    serve = [summary[k].get("seconds_serving", 0.0) for k in kernels]
    bars.barh(y, warm, color=WARMUP, label="before seal (warmup)")
    bars.barh(y, serve, left=warm, color=SERVING, label="after seal (serving)")
    for i, k in enumerate(kernels):
        n = int(summary[k].get("tunings_warmup", 0) + summary[k].get("tunings_serving", 0))
        bars.text(warm[i] + serve[i], i, f" {n} tuning{'s' * (n != 1)}", va="center", fontsize=8)
    bars.set_yticks(list(y), [short(k) for k in kernels])
    bars.set_xlabel("tuning seconds")
    bars.set_title("Where tuning time went")
    bars.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25 if rows < 4 else -0.12), fontsize=8, ncol=2)
    longest = max([a + b for a, b in zip(warm, serve, strict=True)], default=0.0)
    bars.set_xlim(0, longest * 1.35 if longest > 0 else 1.0)  # no tunings: 0..1 s, not 0..0.001 s
    if longest <= 0:
        bars.text(0.5, 0.5, "no tunings", transform=bars.transAxes, ha="center", va="center", color="grey")
    _timeline(line, events, {k: i for i, k in enumerate(kernels)})
    return fig


def _timeline(ax: Any, events: list[dict[str, Any]], rows: dict[str, int]) -> None:
    t0 = min((float(e["time"]) - float(e.get("seconds") or 0.0) for e in events if "time" in e), default=0.0)
    labelled: set[str] = set()

    def label(text: str) -> str:
        if text in labelled:
            return "_nolegend_"
        labelled.add(text)
        return text

    for e in events:
        kind, t = e.get("event"), float(e.get("time", t0)) - t0
        row = rows.get(e.get("kernel", ""))
        if kind == "tuning" and row is not None:
            secs = float(e.get("seconds") or 0.0)
            serving = e.get("phase") == "serving"
            ax.broken_barh([(t - secs, max(secs, 1e-3))], (row - 0.35, 0.7),
                           color=SERVING if serving else WARMUP,
                           label=label("tuning after seal" if serving else "tuning before seal"))
        elif kind in ("miss", "fallback") and row is not None:
            error = e.get("policy") == "error"
            if kind == "miss" and not error:
                continue  # its fallback event marks it
            ax.plot([t], [row], marker="x" if error else "o", color=ERROR if error else MISS, linestyle="",
                    label=label("miss -> TuningMiss" if error else "miss -> fallback config"))
        elif kind == "seal":
            first = "seal" not in labelled
            ax.axvline(t, color="black" if first else "grey", linestyle="--" if first else ":", linewidth=1.2,
                       label=label("seal" if first else "on_miss switched"))
            ax.annotate(f"on_miss={e.get('on_miss', '?')}", (t, 1.0), xycoords=("data", "axes fraction"),
                        rotation=90, va="top", ha="right", fontsize=7)
    ax.set_yticks(list(rows.values()), [short(k) for k in rows])
    ax.set_ylim(-0.7, max(len(rows), 1) - 0.3)
    ax.set_xlabel("seconds since the first event")
    ax.set_title("Timeline: tunings, misses and the seal")
    ax.grid(axis="x", alpha=0.3)
    if labelled:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


def plot_manifest(entries: list[mf.ManifestEntry], out: str | os.PathLike[str], top: int = 30) -> str:
    """Calls per captured key, split by how each was served (hit / tuned / missed)."""
    chosen = sorted(entries, key=lambda e: e.count, reverse=True)[:top][::-1]
    fig = _figure(11, 1.6 + 0.4 * max(1, len(chosen)))
    ax = fig.subplots()
    y = list(range(len(chosen)))
    left = [0.0] * len(chosen)
    for outcome, color in (("hit", WARMUP), ("tuned", MISS), ("missed", SERVING)):
        vals = [e.counts[outcome] for e in chosen]
        ax.barh(y, vals, left=left, color=color, label=outcome)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    names = [_key_label(e, entries) for e in chosen]
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("calls")
    ax.set_title(f"Captured keys: {len(entries)} ({sum(e.count for e in entries)} calls)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(out)
    return os.fspath(out)


def _key_label(entry: mf.ManifestEntry, entries: list[mf.ManifestEntry]) -> str:
    """The kernel and the key elements that vary among its keys (all non-dtype ones if none vary)."""
    values: dict[str, set[str]] = defaultdict(set)
    for e in entries:
        if e.kernel == entry.kernel:
            for k, v in e.key.items:
                values[k].add(repr(v))
    varying = [(k, v) for k, v in entry.key.items if len(values[k]) > 1]
    shown = varying or [(k, v) for k, v in entry.key.items if not k.startswith("dtype(")]
    return " ".join([short(entry.kernel)] + [f"{k}={v}" for k, v in shown])


def plot(kind: str, data: Any, out: str | os.PathLike[str]) -> str:
    return plot_events(data, out) if kind == "events" else plot_manifest(data, out)
