"""``tunevault check | warmup | report``: the serving recipe from the command line.

capture (TUNEVAULT_CAPTURE while serving) -> ``warmup MANIFEST`` -> ``check MANIFEST`` (exit 1
if any key has no decision here) -> seal in the server. ``report`` shows what tuning cost.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from tunevault.cli import warmup_jobs
from tunevault.cli.output import print_json, print_table


def register(sub: Any) -> None:
    p = sub.add_parser("check", help="preflight: exit 1 if a captured key has no decision on this machine",
                       description="For every key in MANIFEST, look up a decision for this machine's "
                                   "fingerprint in the store. Exit status 1 if any key has none.")
    p.add_argument("manifest", help="key manifest written by TUNEVAULT_CAPTURE / tunevault.capture()")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("warmup", help="replay a key manifest: tune every captured key not yet decided",
                       description="Import each captured kernel, rebuild its arguments from the captured "
                                   "ArgSpec and run it in tune mode, so its decision lands in the store.")
    p.add_argument("manifest", help="key manifest written by TUNEVAULT_CAPTURE / tunevault.capture()")
    p.add_argument("--device", help="build tensors on this device instead of the captured one (e.g. cuda:0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    warmup_jobs.add_options(p)
    p.set_defaults(func=cmd_warmup)

    p = sub.add_parser("report", help="tuning cost per kernel and a timeline, from events or a manifest",
                       description="Summarise a TUNEVAULT_EVENTS log (tunings, misses, fallbacks, the seal) "
                                   "or a key manifest; --plot draws it to a PNG (needs matplotlib).")
    p.add_argument("path", nargs="?", help="events log or key manifest (default: $TUNEVAULT_EVENTS)")
    p.add_argument("--plot", metavar="OUT.png", help="draw the picture to this file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_report)


def _key(item: Any) -> str:
    return item.key.describe() or "(empty key)"


def cmd_check(args: argparse.Namespace) -> int:
    from tunevault.policy.check import check

    result = check(args.manifest, store=args.store)
    if args.json:
        print_json(result.to_json())
        return 0 if result.ok else 1
    rows = [[i.kernel, _key(i), "yes" if i.decided else "NO", i.config or i.reason] for i in result.items]
    fp = result.fingerprint
    print_table(["kernel", "key", "decided", "config / reason"], rows,
                title=f"{result.store}  [{fp.target} {fp.device} triton {fp.triton}]")
    missing = len(result.missing)
    print(f"{len(result.items) - missing}/{len(result.items)} keys decided"
          + (f"; {missing} missing: run `tunevault warmup {args.manifest}`" if missing else ""))
    return 0 if result.ok else 1


def cmd_warmup(args: argparse.Namespace) -> int:
    if args.jobs is not None:  # N processes share the keys
        return warmup_jobs.run(args)
    import tunevault
    from tunevault.capture.replay import warmup

    tunevault.install(mode="tune", store=args.store, on_miss="tune")
    try:
        with _progress(quiet=args.json) as progress:
            report = warmup(args.manifest, device=args.device, progress=progress)
    finally:
        tunevault.uninstall()
    if args.json:
        print_json(report.to_json())
        return 0 if report.ok else 1
    odd = [i for i in report.items if i.status in ("skipped", "failed")]
    if odd:
        rows = [[i.kernel, _key(i), i.status, i.reason] for i in odd]
        print_table(["kernel", "key", "status", "reason"], rows, title="keys not tuned")
    counts = report.counts()
    print(f"warmup: {counts['tuned']} tuned, {counts['decided']} already decided, "
          f"{counts['skipped']} skipped, {counts['failed']} failed "
          f"({sum(i.seconds for i in report.items):.1f} s tuning)")
    return 0 if report.ok else 1


class _Plain:
    """Progress as one line per key when rich is not installed."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def __call__(self, done: int, total: int, item: Any) -> None:
        if not self.quiet:
            print(f"[{done}/{total}] {item.status:8} {item.kernel} {_key(item)}"
                  + (f"  ({item.reason})" if item.reason else ""), file=sys.stderr, flush=True)


class _Rich:
    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("warmup"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.description}"), console=Console(stderr=True))
        self.task: Any = None

    def __enter__(self) -> Any:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, done: int, total: int, item: Any) -> None:
        if self.task is None:
            self.task = self.progress.add_task("", total=total)
        from tunevault.report import short

        self.progress.update(self.task, completed=done, description=f"{item.status} {short(item.kernel)}")


def _progress(quiet: bool) -> Any:
    if not quiet:
        try:
            return _Rich()
        except ImportError:
            pass
    return _Plain(quiet)


def cmd_report(args: argparse.Namespace) -> int:
    from tunevault import report

    path = args.path or os.environ.get("TUNEVAULT_EVENTS")
    if not path:
        print("tunevault report: give an events log or a manifest (or set TUNEVAULT_EVENTS)", file=sys.stderr)
        return 2
    kind, data = report.load(path)
    if args.json:
        summary = report.summarize_events(data) if kind == "events" else [e.to_json() for e in data]
        print_json({"kind": kind, "summary": summary})
    else:
        headers, rows = report.events_table(data) if kind == "events" else report.manifest_table(data)
        print_table(headers, rows, title=f"{kind}: {path}")
    if args.plot:
        try:
            out = report.plot(kind, data, args.plot)
        except report.PlotUnavailable as exc:
            print(f"tunevault report: {exc}", file=sys.stderr)
            return 2
        if not args.json:
            print(f"picture written to {out}")
    return 0
