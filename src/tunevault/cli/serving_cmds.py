"""``tunevault check | warmup | report``: the serving recipe from the command line.

capture (TUNEVAULT_CAPTURE while serving) -> ``warmup MANIFEST`` -> ``check MANIFEST`` (exit 1
if any key has no decision here) -> seal in the server. ``report`` shows what tuning cost.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any

from tunevault.cli import warmup_jobs
from tunevault.cli.output import clean, print_json, print_table

if TYPE_CHECKING:
    from rich.progress import TaskID

    from tunevault.capture.manifest import ManifestEntry
    from tunevault.capture.replay import WarmupItem
    from tunevault.policy.check import CheckItem


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="preflight: exit 1 if a captured key has no decision on this machine",
                       description="For every key in MANIFEST, look up a decision for this machine's "
                                   "fingerprint in the store. Exit status 1 if any key has none.")
    p.add_argument("manifest", help="key manifest written by TUNEVAULT_CAPTURE / tunevault.capture()")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _allow_module_flag(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("warmup", help="replay a key manifest: tune every captured key not yet decided",
                       description="Import each captured kernel, rebuild its arguments from the captured "
                                   "ArgSpec and run it in tune mode, so its decision lands in the store.")
    p.add_argument("manifest", help="key manifest written by TUNEVAULT_CAPTURE / tunevault.capture()")
    p.add_argument("--device", help="build tensors on this device instead of the captured one (e.g. cuda:0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--retry-failed", action="store_true",
                   help="tune again the keys recorded in the store as failing with every config (a record "
                        "otherwise stands for an hour, for every process of this machine's fingerprint)")
    _allow_module_flag(p)
    warmup_jobs.add_options(p)
    p.set_defaults(func=cmd_warmup)

    p = sub.add_parser("report", help="tuning cost per kernel and a timeline, from events or a manifest",
                       description="Summarise a TUNEVAULT_EVENTS log (tunings, misses, fallbacks, the seal) "
                                   "or a key manifest; --plot draws it to a PNG (needs matplotlib).")
    p.add_argument("path", nargs="?", help="events log or key manifest (default: $TUNEVAULT_EVENTS)")
    p.add_argument("--plot", metavar="OUT.png", help="draw the picture to exactly this file (PNG, or the format "
                   "its extension names: .svg, .pdf); a directory is refused")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_report)
    _manifest_readers(sub)


def _allow_module_flag(p: argparse.ArgumentParser) -> None:
    """A manifest names modules to import, and importing runs their code: limit which ones."""
    p.add_argument("--allow-module", action="append", metavar="PREFIX",
                   help="import kernels only from modules under PREFIX (repeatable; default: any module, "
                        "or $TUNEVAULT_ALLOW_MODULES); other lines are skipped with the reason")


def check_allow_list(args: argparse.Namespace) -> None:
    """Validate ``--allow-module`` (else ``$TUNEVAULT_ALLOW_MODULES``) once, before anything runs, so
    that single-process and ``--jobs`` runs refuse the same lists (ValueError: exit 2)."""
    from tunevault.capture.locate import allowed_prefixes, parse_prefixes

    if args.allow_module is not None:
        args.allow_module = list(parse_prefixes(args.allow_module))
    else:
        allowed_prefixes()


def _key(item: WarmupItem | CheckItem) -> str:
    return item.key.describe() or "(empty key)"


def cmd_check(args: argparse.Namespace) -> int:
    from tunevault.capture.locate import allow_modules
    from tunevault.cli.doctor_cmd import damaged, store_damage
    from tunevault.cli.store_cmds import absent_default_store, open_cli_store, refuse_absent_store, store_url
    from tunevault.policy.check import check

    check_allow_list(args)
    entries, malformed = load_manifest(args)
    refuse_absent_store(args)  # before check() opens the store, which would create it
    absent = absent_default_store(args)  # reads as empty: check() must not create the default file
    with allow_modules(args.allow_module):
        result = check(entries, store="memory://" if absent else args.store)
    if absent:
        result.store = store_url(args)
    if result.store_error is not None:  # a deploy gate must tell "store down" (2) from "keys missing" (1)
        raise OSError(f"the store {result.store} cannot be read, so no key was checked: {result.store_error}")
    store = open_cli_store(args)
    try:
        damage = store_damage(store)
    finally:
        store.close()
    if args.json:
        ok = result.ok and not malformed and not damage
        print_json({**result.to_json(), "ok": ok, "malformed": malformed_json(malformed), "damage": damage})
        return damaged(result.store, damage) or (0 if ok else 1)
    rows = [[i.kernel, _key(i), "yes" if i.decided else "NO", i.config or i.reason] for i in result.items]
    fp = result.fingerprint
    print_table(["kernel", "key", "decided", "config / reason"], rows,
                title=f"{result.store}  [{fp.target} {fp.device} triton {fp.triton}]")
    missing = len(result.missing)
    print(f"{len(result.items) - missing}/{len(result.items)} keys decided"
          + (f"; {missing} missing: run `{warmup_command(args)}`" if missing else ""))
    _explain(args, [i.reason for i in result.items], malformed)
    return damaged(result.store, damage) or (0 if result.ok and not malformed else 1)


def warmup_command(args: argparse.Namespace) -> str:
    """The warmup that fills what ``check`` found missing, with the options check was given (store,
    import folders, allow list), quoted for a shell: without ``--store`` it would warm another store."""
    argv = ["tunevault", *(["--store", args.store] if args.store else []), "warmup", args.manifest]
    for folder in args.path:
        argv += ["--path", folder]
    for prefix in args.allow_module or []:
        argv += ["--allow-module", prefix]
    return shlex.join(argv)


def probe_store(args: argparse.Namespace) -> None:
    """Open the store and take and release a lease in it, as a warmup will: an unusable store is an
    OSError (exit 2) here, never a run that tunes into memory, saves nothing and reports success."""
    from tunevault.cli.store_cmds import open_cli_store
    from tunevault.policy.lease import new_holder
    from tunevault.store.base import StoreUnavailable

    store = open_cli_store(args)
    try:
        holder = new_holder()
        store.try_lease(f"probe:{holder}", holder, 5.0)
        store.release(f"probe:{holder}", holder)
    except StoreUnavailable as exc:
        raise OSError(f"the store cannot hold this warmup's decisions: {exc}") from exc
    finally:
        store.close()


def cmd_warmup(args: argparse.Namespace) -> int:
    from tunevault.cli.store_cmds import store_url
    from tunevault.integration.shared_warmup import ignored_warmup_var

    args.retry_before = time.time() if args.retry_failed else None  # records from earlier runs are retried
    check_allow_list(args)
    ignored_warmup_var("tunevault warmup")  # its installs (and its --jobs children's) do not take it
    if args.jobs is not None or args.devices:  # N processes share the keys
        if store_url(args).startswith("memory:"):
            raise ValueError("--jobs needs a store its processes share (sqlite:///... or redis://...); "
                             "with memory:// each process would tune every key and nothing would be kept")
        probe_store(args)
        return warmup_jobs.run(args)
    import tunevault
    from tunevault.capture.locate import allow_modules
    from tunevault.integration.shared_warmup import install_for_own_manifest, warmup

    entries, malformed = load_manifest(args)
    probe_store(args)
    install_for_own_manifest(args.store)
    try:
        with allow_modules(args.allow_module), _progress(quiet=args.json) as progress:
            report = warmup(entries, device=args.device, progress=progress, retry_before=args.retry_before)
    finally:
        tunevault.uninstall()
    ok = report.ok and not malformed
    if args.json:
        print_json({**report.to_json(), "ok": ok, "malformed": malformed_json(malformed)})
        return 0 if ok else 1
    odd = [i for i in report.items if i.status in ("skipped", "failed")]
    if odd:
        rows = [[i.kernel, _key(i), i.status, i.reason] for i in odd]
        print_table(["kernel", "key", "status", "reason"], rows, title="keys not tuned")
    counts = report.counts()
    print(f"warmup: {counts['tuned']} tuned, {counts['decided']} already decided, "
          f"{counts['skipped']} skipped, {counts['failed']} failed "
          f"({sum(i.seconds for i in report.items):.1f} s tuning)")
    _explain(args, [i.reason for i in report.items], malformed)
    return 0 if ok else 1


class _Plain:
    """Progress as one line per key when rich is not installed."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __enter__(self) -> _Plain:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __call__(self, done: int, total: int, item: WarmupItem) -> None:
        if not self.quiet:
            print(clean(f"[{done}/{total}] {item.status:8} {item.kernel} {_key(item)}"
                        + (f"  ({item.reason})" if item.reason else "")), file=sys.stderr, flush=True)


class _Rich:
    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("warmup"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.description}", markup=False),  # kernel names from a manifest
                                 console=Console(stderr=True))
        self.task: TaskID | None = None

    def __enter__(self) -> _Rich:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, done: int, total: int, item: WarmupItem) -> None:
        if self.task is None:
            self.task = self.progress.add_task("", total=total)
        from tunevault.report import short

        self.progress.update(self.task, completed=done, description=clean(f"{item.status} {short(item.kernel)}"))


def _progress(quiet: bool) -> _Plain | _Rich:
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
    if args.plot:
        report.picture_path(args.plot)  # a directory: exit 2 before the table, not after it
    kind, data = report.load(path)
    if args.json:
        summary = fixed_keys(report.summarize_events(data)) if kind == "events" else [e.to_json() for e in data]
        print_json({"kind": kind, "summary": summary})
    else:
        headers, rows = report.events_table(data) if kind == "events" else report.manifest_table(data)
        print_table(headers, rows, title=f"{kind}: {path}")
        if kind == "events" and not rows:  # an empty log and one holding only a seal read alike
            kinds = sorted({str(e["event"]) for e in data})
            print(f"no tunings, misses or fallbacks in {path} yet "
                  f"({len(data)} event(s): {', '.join(kinds)})" if data else f"no events in {path} yet: it is empty")
    if args.plot:
        try:
            out = report.plot(kind, data, args.plot)
        except report.PlotUnavailable as exc:
            print(f"tunevault report: {exc}", file=sys.stderr)
            return 2
        if not args.json:
            print(f"picture written to {out}")
    return 0


# ---------------------------------------------------------------------- check and warmup: reading the manifest


def _manifest_readers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """check and warmup import the application's kernels and must not pass on a file that is not a manifest."""
    for name in ("check", "warmup"):
        p = sub.choices[name]
        p.add_argument("--path", action="append", default=[], metavar="DIR",
                       help="also import kernels from DIR (repeatable); the current directory is always searched")
        p.epilog = ("Exit status 1 if any key has no decision here or any line of the manifest is malformed "
                    "(each is listed with its line number), 2 if the manifest holds no valid key or the store "
                    "cannot be opened or read (a --store path that does not exist included)"
                    + ("; warmup also 2 when the store cannot hold decisions or --devices names a GPU not "
                       "visible, and 130 on Ctrl-C." if name == "warmup" else "."))


def load_manifest(args: argparse.Namespace) -> tuple[list[ManifestEntry], list[tuple[int, str]]]:
    """The manifest's entries and malformed lines, after the two things a replay needs first.

    Triton's interpreter is switched on when there is no GPU (before any kernel module imports
    Triton), and the current directory and ``--path`` folders go on the import path, as
    ``python -m`` would put the current directory, so the application's kernels import.
    A manifest without one valid key is a ValueError (exit 2): a preflight must not pass on it.
    """
    from tunevault.core.machine import use_interpreter_if_no_gpu

    use_interpreter_if_no_gpu()
    for folder in [os.getcwd(), *args.path][::-1]:
        folder = os.path.abspath(folder)
        if folder not in sys.path:
            sys.path.insert(0, folder)
    return read_manifest(args)


def read_manifest(args: argparse.Namespace, upto: int | None = None
                  ) -> tuple[list[ManifestEntry], list[tuple[int, str]]]:
    """The manifest's entries and malformed lines; a ValueError (exit 2) when it holds no valid key.

    Reading imports no kernel: ``warmup --jobs`` reads it here while its children start, up to
    ``upto`` bytes, the length its children read too."""
    from tunevault.capture import manifest as mf

    malformed: list[tuple[int, str]] = []
    entries = mf.read(args.manifest, malformed=malformed, upto=upto)
    if not entries:
        what = f"{len(malformed)} malformed line(s), no valid one" if malformed else "it is empty"
        raise ValueError(f"{args.manifest} holds no captured key ({what}); a manifest is written by "
                         f"TUNEVAULT_CAPTURE or tunevault.capture(){_lines(args.manifest, malformed)}")
    return entries, malformed


def _lines(path: str, malformed: list[tuple[int, str]], limit: int = 10) -> str:
    shown = "".join(f"\n  {path}:{n}: {reason}" for n, reason in malformed[:limit])
    more = len(malformed) - limit
    return shown + (f"\n  ... and {more} more malformed line(s)" if more > 0 else "")


def malformed_json(malformed: list[tuple[int, str]]) -> list[dict[str, Any]]:
    return [{"line": n, "reason": reason} for n, reason in malformed]


def _explain(args: argparse.Namespace, reasons: list[str], malformed: list[tuple[int, str]]) -> None:
    """What the user must fix, after the table: malformed lines, kernels whose module did not import."""
    if malformed:
        print(f"FAIL: {args.manifest} has {len(malformed)} malformed line(s){_lines(args.manifest, malformed)}",
              file=sys.stderr)
    missing = sorted({m for r in reasons for m in re.findall(r"No module named '([^']+)'", r)})
    if missing:
        print(f"hint: no module named {', '.join(missing)}: run from the folder the application imports it "
              f"from, or pass --path DIR (searched first: {', '.join([os.getcwd(), *args.path])})",
              file=sys.stderr)


# Counted in every events summary, whatever the log holds (report.summarize_events adds a key only when met).
REPORT_COUNTS = ("tunings_warmup", "tunings_serving", "tunings_other", "misses", "fallbacks", "predicted", "errors",
                 "regret_n", "regret_unmeasured")
REPORT_STATISTICS = ("regret_median", "regret_max")  # of predicted fallbacks' measured regret: None if none


def fixed_keys(summary: dict[str, dict[str, float]]) -> dict[str, dict[str, int | float | None]]:
    """The same keys for every kernel, counts as integers: what a script can rely on.

    A count absent from a kernel's row is 0, a duration (``seconds_*``) 0.0, and a statistic
    (``regret_median``, ``regret_max``) ``None``: there was nothing to measure.
    """
    keys = sorted({*REPORT_COUNTS, *REPORT_STATISTICS, "seconds_warmup", "seconds_serving", "seconds_other",
                   *(k for row in summary.values() for k in row)})

    def value(key: str, row: dict[str, float]) -> int | float | None:
        v = row.get(key)
        if key.startswith("seconds_"):
            return round(float(v or 0.0), 6)
        if key in REPORT_STATISTICS:
            return None if v is None else float(v)
        return int(v or 0)

    return {kernel: {k: value(k, row) for k in keys} for kernel, row in summary.items()}
