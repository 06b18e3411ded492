"""What tuning cost and when: tables and a picture from an events log or a key manifest.

The picture answers the serving questions at a glance: which kernels spend tuning time, and
did any tuning happen after the seal (it is drawn in red, right of the dashed seal line)?
matplotlib is an optional extra, imported only to draw, on its Agg canvas (no display).
"""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from tunevault.capture import manifest as mf
from tunevault.core.model import MAX_SECONDS, TIME_RANGE
from tunevault.core.untrusted import lines, loads

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

WARMUP, SERVING, MISS, ERROR, OTHER = "#4C72B0", "#DD4444", "#F0A030", "#8B1A1A", "#999999"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def short(kernel: str) -> str:
    return kernel.rsplit(":", 1)[-1].rsplit(".", 1)[-1]


def load(path: str | os.PathLike[str]) -> tuple[str, Any]:
    """``("events", [event, ...])`` or ``("manifest", [ManifestEntry, ...])``, by the file's content.

    Only a regular file is read, line by line; a line that is not a well-formed event (wrong
    types, times or durations out of range, too deep) is left out, so a table never fails on data.
    An empty file (or one of blank lines) is an events log with no events yet: ``TUNEVAULT_EVENTS``
    names a file before the first event is written to it."""
    rows, blank = [], True
    for _n, text in lines(path):
        blank = blank and text is not None and not text.strip()
        try:
            row = loads(text or b"", what="line")
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    if any(r.get("format") == mf.FORMAT for r in rows):
        return "manifest", mf.read(path)
    events = [r for r in rows if _event_ok(r)]
    if events or blank:
        return "events", sorted(events, key=lambda r: float(r.get("time", 0.0)))
    raise ValueError(f"{os.fspath(path)}: neither a tunevault events log nor a key manifest")


def _event_ok(row: dict[str, Any]) -> bool:
    """The fields the tables and pictures use have the types and ranges they need."""
    def number(name: str, low: float, high: float) -> bool:
        v = row.get(name, low)
        return type(v) in (int, float) and low <= v <= high

    return (isinstance(row.get("event"), str) and number("time", *TIME_RANGE)
            and number("seconds", 0.0, MAX_SECONDS) and isinstance(row.get("kernel", ""), str)
            and isinstance(row.get("phase", "warmup"), str))


# ---------------------------------------------------------------------- tables


PHASES = ("warmup", "serving")  # before and after the seal; any other phase an event names counts as "other"


def phase_of(event: dict[str, Any]) -> str:
    """``warmup`` (also for a log older than phases), ``serving``, or ``other`` for a phase this
    version does not know: counted in its own column rather than dropped from the table."""
    phase = event.get("phase", "warmup")
    return phase if phase in PHASES else "other"


def summarize_events(events: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per kernel: tunings and tuning seconds per phase, misses, fallbacks (predicted ones too),
    errors, and the real regret of predicted configs measured when their key was tuned later."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    regrets: dict[str, list[float]] = defaultdict(list)
    for e in events:
        kind, kernel = e.get("event"), e.get("kernel")
        if not isinstance(kernel, str):
            continue
        row, phase = out[kernel], phase_of(e)
        if kind == "tuning":
            row[f"tunings_{phase}"] += 1
            row[f"seconds_{phase}"] += float(e.get("seconds") or 0.0)
            _settled(e.get("prediction"), row, regrets[kernel])
        elif kind == "miss":
            row["misses"] += 1
            row["errors"] += e.get("policy") == "error"
        elif kind == "fallback":
            row["fallbacks"] += 1
            row["predicted"] += isinstance(e.get("predicted"), dict)
        elif kind == "tuning_failed":  # every config failed: the caller got a TuningError
            row["errors"] += 1
    for kernel, values in regrets.items():
        if values:
            out[kernel].update(regret_median=statistics.median(values), regret_max=max(values),
                               regret_n=len(values))
    return {k: dict(v) for k, v in out.items()}


def _settled(outcome: object, row: dict[str, float], regrets: list[float]) -> None:
    """A tuning event's ``prediction``: the regret of the config a fallback predicted for this key."""
    if not isinstance(outcome, dict):
        return
    value = outcome.get("regret")
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        regrets.append(float(value))
    else:
        row["regret_unmeasured"] += 1


def regret_cell(row: dict[str, float]) -> str:
    """"1.2% / 8.0% (n=5)": median and max regret of predicted configs, and how many were measured."""
    n, unmeasured = int(row.get("regret_n", 0)), int(row.get("regret_unmeasured", 0))
    if not n and not unmeasured:
        return ""
    text = f"{row['regret_median']:.1%} / {row['regret_max']:.1%} (n={n})" if n else "(n=0)"
    return text + (f", {unmeasured} not measured" if unmeasured else "")


def events_table(events: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """One row per kernel; the ``other phase`` columns only when an event names a phase not known here."""
    summary = summarize_events(events)
    phases = [*PHASES, *(["other"] if any("tunings_other" in r for r in summary.values()) else [])]
    label = {"warmup": "warmup", "serving": "serving", "other": "other phase"}
    headers = ["kernel", *(f"tunings ({label[p]})" for p in phases), *(f"tuning s ({label[p]})" for p in phases),
               "misses", "fallbacks", "predicted", "prediction regret (median / max)", "errors"]
    rows = []
    for kernel, r in sorted(summary.items(), key=lambda kv: -_seconds(kv[1])):
        rows.append([kernel, *(int(r.get(f"tunings_{p}", 0)) for p in phases),
                     *(f"{r.get(f'seconds_{p}', 0.0):.2f}" for p in phases),
                     int(r.get("misses", 0)), int(r.get("fallbacks", 0)), int(r.get("predicted", 0)),
                     regret_cell(r), int(r.get("errors", 0))])
    return headers, rows


def manifest_table(entries: list[mf.ManifestEntry]) -> tuple[list[str], list[list[Any]]]:
    headers = ["kernel", "key", "calls", "hit", "tuned", "missed", "processes", "argspec"]
    rows = [[e.kernel, e.key.describe(), e.count, e.counts["hit"], e.counts["tuned"], e.counts["missed"],
             len(e.processes), "yes" if e.callspec is not None else f"no ({e.callspec_error or '?'})"]
            for e in sorted(entries, key=lambda e: (e.kernel, -e.count))]
    return headers, rows


def _seconds(row: dict[str, float]) -> float:
    return sum(row.get(f"seconds_{p}", 0.0) for p in (*PHASES, "other"))


# ---------------------------------------------------------------------- pictures


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable("drawing needs matplotlib: pip install 'tunevault[plot]' "
                               "(from a checkout: pip install -e '.[plot]')") from None
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def picture_path(out: str | os.PathLike[str]) -> str:
    """``out`` as the file a picture is written to; a directory is an IsADirectoryError.

    matplotlib would write ``DIR.png`` beside a directory, and ``NAME.png`` for a name without
    an extension: a file other than the one named. Checked before any work is done.
    """
    path = os.fspath(out)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; give the path of the picture to write, "
                                f"e.g. {os.path.join(path, 'tunevault-report.png')}")
    return path


def save(fig: Figure, out: str | os.PathLike[str]) -> str:
    """Write ``fig`` to exactly ``out`` and return that path: the format is the extension's
    (``.png``, ``.svg``, ``.pdf``...), PNG when there is none; an unknown one is a ValueError."""
    path = picture_path(out)
    fig.savefig(path, format=os.path.splitext(path)[1][1:].lower() or "png")
    return path


def plot_events(events: list[dict[str, Any]], out: str | os.PathLike[str]) -> str:
    """Tuning seconds per kernel (warmup vs serving) and a timeline of tunings and misses with the seal;
    returns the path written."""
    return save(events_figure(events), out)


def events_figure(events: list[dict[str, Any]]) -> Figure:
    """The picture of :func:`plot_events`, as a matplotlib Figure."""
    summary = summarize_events(events)
    kernels = sorted(summary, key=lambda k: _seconds(summary[k]))
    rows = max(1, len(kernels))
    fig = _figure(12, 1.6 + 0.45 * rows)
    bars, line = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
    y = range(len(kernels))
    warm = [summary[k].get("seconds_warmup", 0.0) for k in kernels]
    serve = [summary[k].get("seconds_serving", 0.0) for k in kernels]
    other = [summary[k].get("seconds_other", 0.0) for k in kernels]
    bars.barh(y, warm, color=WARMUP, label="before seal (warmup)")
    bars.barh(y, serve, left=warm, color=SERVING, label="after seal (serving)")
    if any("tunings_other" in summary[k] for k in kernels):  # a phase this version does not know
        bars.barh(y, other, left=[a + b for a, b in zip(warm, serve, strict=True)], color=OTHER,
                  label="other phase")
    for i, k in enumerate(kernels):
        n = int(sum(summary[k].get(f"tunings_{p}", 0) for p in (*PHASES, "other")))
        bars.text(_seconds(summary[k]), i, f" {n} tuning{'s' * (n != 1)}", va="center", fontsize=8)
    bars.set_yticks(list(y), [short(k) for k in kernels])
    bars.set_xlabel("tuning seconds")
    bars.set_title("Where tuning time went")
    bars.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25 if rows < 4 else -0.12), fontsize=8, ncol=2)
    longest = max([_seconds(summary[k]) for k in kernels], default=0.0)
    bars.set_xlim(0, longest * 1.35 if longest > 0 else 1.0)  # no tunings: 0..1 s, not 0..0.001 s
    if longest <= 0:
        bars.text(0.5, 0.5, "no tunings", transform=bars.transAxes, ha="center", va="center", color="grey")
    _timeline(line, events, {k: i for i, k in enumerate(kernels)})
    return fig


def _pid(event: dict[str, Any]) -> int | None:
    """The process an event came from (events carry ``pid``); None for a log without it."""
    pid = event.get("pid")
    return pid if type(pid) is int else None


def _timeline(ax: Axes, events: list[dict[str, Any]], rows: dict[str, int]) -> None:
    t0 = min((float(e["time"]) - float(e.get("seconds") or 0.0) for e in events if "time" in e), default=0.0)
    labelled: set[str] = set()
    # Several processes may share one events file, each sealing once: a seal is a switch of on_miss
    # only when the same process sealed before with another policy.
    sealed: dict[int, object] = {}
    sealers = {_pid(e) for e in events if e.get("event") == "seal"}

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
            color, text = {"warmup": (WARMUP, "tuning before seal"), "serving": (SERVING, "tuning after seal"),
                           "other": (OTHER, "tuning, other phase")}[phase_of(e)]
            ax.broken_barh([(t - secs, max(secs, 1e-3))], (row - 0.35, 0.7), color=color, label=label(text))
        elif kind in ("miss", "fallback") and row is not None:
            error = e.get("policy") == "error"
            if kind == "miss" and not error:
                continue  # its fallback event marks it
            ax.plot([t], [row], marker="x" if error else "o", color=ERROR if error else MISS, linestyle="",
                    label=label("miss -> TuningMiss" if error else "miss -> fallback config"))
        elif kind == "seal":
            pid, on_miss = _pid(e), e.get("on_miss", "?")
            switched = pid in sealed and sealed[pid] != on_miss
            if pid is not None:
                sealed[pid] = on_miss
            ax.axvline(t, color="grey" if switched else "black", linestyle=":" if switched else "--", linewidth=1.2,
                       label=label("on_miss switched" if switched else "seal"))
            who = f"pid {pid}: " if len(sealers) > 1 and pid is not None else ""
            ax.annotate(f"{who}on_miss={on_miss}", (t, 1.0), xycoords=("data", "axes fraction"),
                        rotation=90, va="top", ha="right", fontsize=7)
    ax.set_yticks(list(rows.values()), [short(k) for k in rows])
    ax.set_ylim(-0.7, max(len(rows), 1) - 0.3)
    ax.set_xlabel("seconds since the first event")
    ax.set_title("Timeline: tunings, misses and the seal")
    ax.grid(axis="x", alpha=0.3)
    if labelled:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


def plot_manifest(entries: list[mf.ManifestEntry], out: str | os.PathLike[str], top: int = 30) -> str:
    """Calls per captured key, split by how each was served (hit / tuned / missed); returns the path written."""
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
    return save(fig, out)


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
    """The picture of ``load``'s result, written to ``out``; returns the path written."""
    return plot_events(data, out) if kind == "events" else plot_manifest(data, out)
