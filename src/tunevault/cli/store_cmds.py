"""Store commands: ``info ls show export import rm``.

Every command reads the store the global ``--store`` names (else ``$TUNEVAULT_STORE``, else the
user cache SQLite file); the reading ones refuse a named SQLite store that does not exist rather
than create it, and read the default one, before anything created it, as empty. Listings show
decisions of every machine and mark the ones whose fingerprint is this machine's: a shared store
legitimately holds other GPUs' decisions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

from tunevault.cli.output import clean, print_json, print_table
from tunevault.core.model import Decision, Fingerprint, InvalidEntry
from tunevault.store.base import Query, Store, StoreUnavailable, open_store, redact, shown
from tunevault.store.bundle import FORMAT as EXPORT_FORMAT
from tunevault.store.bundle import SCHEMA as EXPORT_SCHEMA
from tunevault.store.memory import MemoryStore

# Applied in order to each exported decision; return a (possibly changed) decision, or None to drop it.
# Another command family adds an export flag with ``sub.choices["export"].add_argument(...)`` and a
# transform here that reads it from ``args`` (e.g. ``--winners-only``).
EXPORT_TRANSFORMS: list[Callable[[argparse.Namespace, Decision], Decision | None]] = []


# ---------------------------------------------------------------------------- shared helpers


def store_url(args: argparse.Namespace) -> str:
    from tunevault.policy.settings import default_store_url

    return getattr(args, "store", None) or os.environ.get("TUNEVAULT_STORE") or default_store_url()


# Commands that only read the store (rm deletes from one that exists): a SQLite file they do not find
# is a mistyped --store, not a new store to create (install(), warmup, import and demo create it).
READING_COMMANDS = frozenset({"info", "ls", "show", "export", "check", "rm"})


def refuse_absent_store(args: argparse.Namespace) -> None:
    """OSError (exit 2) when a reading command names an SQLite store that does not exist: creating
    it (and its folders) would report 0 decisions, exit 0, for a typo in the path."""
    if getattr(args, "command", None) not in READING_COMMANDS:
        return
    if not (getattr(args, "store", None) or os.environ.get("TUNEVAULT_STORE")):
        return  # the default file in the user cache: absent on a fresh machine, not a typo
    url = store_url(args)
    if not url.startswith("sqlite:"):
        return
    from tunevault.store.sqlite_file import path_of_url

    path = path_of_url(url)
    if not os.path.lexists(path):
        raise OSError(f"no tuning store at {path} ({url}): check the path; `tunevault {args.command}` only "
                      "reads a store (tunevault.install(), warmup and import create one)")


def absent_default_store(args: argparse.Namespace) -> bool:
    """A reading command on the default store (no ``--store``, no ``$TUNEVAULT_STORE``) whose file
    does not exist yet: it reads as empty, and no file or folder is created for it."""
    if getattr(args, "command", None) not in READING_COMMANDS:
        return False
    if getattr(args, "store", None) or os.environ.get("TUNEVAULT_STORE"):
        return False
    url = store_url(args)
    if not url.startswith("sqlite:"):
        return False
    from tunevault.store.sqlite_file import path_of_url

    return not os.path.lexists(path_of_url(url))


class AbsentStore(MemoryStore):
    """The default store before install(), warmup, import or demo created it: empty, under its own URL."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url


def open_cli_store(args: argparse.Namespace) -> Store:
    """The store to work on; an unusable one is an OSError, which ``main`` reports with exit 2."""
    refuse_absent_store(args)
    url = store_url(args)
    if absent_default_store(args):
        return AbsentStore(url)
    try:
        return open_store(url)
    except StoreUnavailable as exc:
        raise OSError(f"{exc}{doctor_hint(url, exc)}") from exc


def doctor_hint(url: str, exc: Exception) -> str:
    """``; see `tunevault ... doctor` `` when SQLite says the file is damaged, else ''."""
    return (f"; see `tunevault --store {url} doctor`" if url.startswith("sqlite:")
            and any(w in str(exc) for w in ("malformed", "not a database")) else "")


def this_machine() -> Fingerprint:
    """This machine's fingerprint, as a process tuning here would compute it (interpreter if no GPU)."""
    from tunevault.core import machine

    machine.use_interpreter_if_no_gpu()
    return machine.this_machine()


def machine_label(fp: Fingerprint, here: Fingerprint) -> str:
    if fp.digest == here.digest:
        return "this"
    return f"{fp.device} {fp.target}, triton {fp.triton}"


def when(d: Decision) -> str:
    t = dict(d.provenance).get("time")
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, int | float) else "?"


def _add_filters(p: argparse.ArgumentParser, kernel_positional: bool = False) -> None:
    if kernel_positional:
        p.add_argument("kernel", metavar="KERNEL", help="substring of the kernel's qualified name")
    else:
        p.add_argument("--kernel", metavar="SUBSTR", help="only kernels whose qualified name contains SUBSTR")
    machines = p.add_mutually_exclusive_group()
    machines.add_argument("--this-machine", action="store_true", help="only decisions valid on this machine")
    machines.add_argument("--other-machines", action="store_true",
                          help="only decisions of other fingerprints (other GPUs, Triton versions, ...)")


def select(store: Store, args: argparse.Namespace, here: Fingerprint | None = None,
           strict: bool = False) -> list[Decision]:
    """Decisions matching the common filters, sorted by kernel then key.

    ``strict``: an unreadable store raises StoreUnavailable instead of reading as empty (the
    runtime's miss), for commands that write what they read: an empty read must not replace a file.
    """
    query = Query(kernel=args.kernel)
    if args.this_machine or args.other_machines:
        here = here or this_machine()
        if args.this_machine:
            query = Query(kernel=args.kernel, fingerprint_digest=here.digest)
    listing = getattr(store, "listing", None) if strict else None
    read = listing(query) if listing is not None else store.decisions(query)
    found = [d for d in read
             if not (args.other_machines and here and d.fingerprint.digest == here.digest)]
    return sorted(found, key=lambda d: (d.kernel.name, d.fingerprint.digest, d.key.text))


def summary(d: Decision, here: Fingerprint) -> dict[str, Any]:
    return {
        "kernel": d.kernel.name, "kernel_digest": d.kernel.digest, "key": d.key.to_json(),
        "config_index": d.config_index, "config": d.config.to_json(), "margin": d.margin,
        "fingerprint_digest": d.fingerprint.digest, "this_machine": d.fingerprint.digest == here.digest,
        "time": dict(d.provenance).get("time"), "host": dict(d.provenance).get("host"),
    }


# ---------------------------------------------------------------------------- info ls show


def cmd_info(args: argparse.Namespace) -> int:
    import tunevault
    from tunevault.core import machine

    refuse_absent_store(args)  # a mistyped path is exit 2, not an unavailable store
    here = this_machine()
    torch = machine.torch_build() or {}
    info: dict[str, Any] = {
        "versions": {"tunevault": tunevault.__version__, "triton": machine.triton_version(),
                     "torch": torch.get("__version__"), "python": platform.python_version()},
        "fingerprint": {**here.to_json(), "digest": here.digest},
        "interpreter": here.target == "interpreter",
        "store": {"url": redact(store_url(args))},
    }
    status = 0
    try:
        store = open_cli_store(args)
    except OSError as exc:
        info["store"]["error"] = str(exc)
        status = 1
    else:
        from tunevault.cli.doctor_cmd import store_damage

        info["store"]["url"] = shown(store)
        try:  # a store can open and fail its first read (Redis gone, a damaged page): unavailable, as above
            info["store"].update(entries=store.count(), this_machine=sum(
                1 for _ in store.decisions(Query(fingerprint_digest=here.digest))))
        except (StoreUnavailable, OSError) as exc:
            info["store"]["error"] = f"{exc}{doctor_hint(shown(store), exc)}"
        try:
            info["store"]["damage"] = store_damage(store)
        finally:
            store.close()
        status = 1 if info["store"]["damage"] or "error" in info["store"] else 0
    if args.json:
        print_json(info)
        return status
    v, fp, st = info["versions"], info["fingerprint"], info["store"]
    print("versions:    " + ", ".join(f"{k} {val}" for k, val in v.items()))
    env = ", env " + json.dumps(fp["env"]) if fp["env"] else ""
    print(f"fingerprint: {fp['digest']}  triton {fp['triton']}, target {fp['target']}, "
          f"device {fp['device']}, cuda {fp['cuda']}{env}")
    if info["interpreter"]:
        print("             (no GPU in use: kernels run in Triton's interpreter)")
    print(f"store:       {st['url']}")
    if "error" in st:
        print(f"             unavailable: {st['error']}")
    else:
        print(f"entries:     {st['entries']} ({st['this_machine']} for this machine)")
    from tunevault.cli.doctor_cmd import damaged

    return damaged(st["url"], st.get("damage", [])) or status


def _load(args: argparse.Namespace) -> tuple[Fingerprint, list[Decision], str, list[str]]:
    """This machine, the selected decisions, the store's URL and what its integrity check found."""
    from tunevault.cli.doctor_cmd import store_damage

    here = this_machine()
    store = open_cli_store(args)
    try:
        return here, select(store, args, here), shown(store), store_damage(store)
    finally:
        store.close()


def cmd_ls(args: argparse.Namespace) -> int:
    from tunevault.cli.doctor_cmd import damaged

    here, found, url, damage = _load(args)
    if args.json:
        print_json([summary(d, here) for d in found])
        return damaged(url, damage)
    rows = [[d.kernel.name, d.key.describe(), f"#{d.config_index} {d.config.describe()}",
             machine_label(d.fingerprint, here), when(d)] for d in found]
    print_table(["kernel", "key", "chosen config", "machine", "when"], rows,
                title=f"{len(rows)} decision(s) in {url}")
    return damaged(url, damage)


def cmd_show(args: argparse.Namespace) -> int:
    from tunevault.cli.doctor_cmd import damaged

    here, found, url, damage = _load(args)
    if args.json:
        print_json([{"this_machine": d.fingerprint.digest == here.digest, "decision": d.to_json()}
                    for d in found])
    for d in [] if args.json else found:
        _show_one(d, here)
    if not found:
        print(f"no decisions for kernels matching {args.kernel!r} in {url}", file=sys.stderr)
    return damaged(url, damage) or (0 if found else 1)


def _show_one(d: Decision, here: Fingerprint) -> None:
    print = _print_clean  # noqa: A001 - every line holds text from the store: no control characters
    prov = dict(d.provenance)
    fp = d.fingerprint
    rank = "" if prov.get("rank") is None else f" rank {prov['rank']}"
    print()
    print(f"{d.kernel.name}  [{d.key.describe()}]")
    print(f"  chosen:      #{d.config_index} {d.config.describe()}  ({margin_text(d.margin)})")
    print(f"  tuned:       {when(d)} on {prov.get('host', '?')} pid {prov.get('pid', '?')}{rank}, "
          f"{d.tuning_seconds:.2f} s; tunevault {prov.get('tunevault', '?')}")
    print(f"  valid on:    {machine_label(fp, here)} machine: {fp.device}, {fp.target}, triton {fp.triton}, "
          f"cuda {fp.cuda} (fingerprint {fp.digest})")
    print(f"  kernel:      source {d.kernel.source_hash}, configs {d.kernel.configs_hash} "
          f"(digest {d.kernel.digest})")
    rows = []
    for c in sorted(d.candidates, key=lambda c: c.index):
        times = [f"{t:.4f}" for t in c.timings[:3]] + [""] * (3 - len(c.timings[:3]))
        status = "chosen" if c.index == d.config_index else ("failed: " + c.error if c.error else "")
        status = status or ("screened out" if c.screened else "")
        noise = [str(c.n or ""), "" if c.iqr is None else f"{c.iqr:.4f}", "" if c.slower is None else f"{c.slower:.3f}"]
        rows.append([f"#{c.index}", c.config.describe(), *times, *noise, status])
    if "selection" in prov:  # why the winner won: ties follow the measured noise (engine/select.py)
        print(f"  why:         {prov['selection']}")
    if rows:
        if fp.target == "interpreter":
            print("  (CPU timer: each run is taken over its round's median; times are in ms of the quietest round;"
                  " a screened-out config's median column holds its fastest screen run)")
        print_table(["#", "config", "median ms", "p20 ms", "p80 ms", "runs", "IQR ms", "slower?", ""], rows)


def _print_clean(text: str = "") -> None:
    print(clean(text))


def margin_text(margin: float | None) -> str:
    """The margin to the runner-up, explained when it is negative (a faster config lost a tie)."""
    if margin is None:
        return "alone (nothing to compare)"
    if margin >= 0:
        return f"{margin:+.1%} to the runner-up"
    return (f"{margin:+.1%} to the runner-up: a config {-margin:.1%} faster was within the tie tolerance, "
            f"and ties go to the earliest declared config, so every process picks the same one")


# ---------------------------------------------------------------------------- export import rm


def export_document(decisions: list[Decision], args: argparse.Namespace) -> dict[str, Any]:
    out = []
    for d in decisions:
        kept: Decision | None = d
        for transform in EXPORT_TRANSFORMS:
            if kept is None:
                break
            kept = transform(args, kept)
        if kept is not None:
            out.append(kept.to_json())
    return {"format": EXPORT_FORMAT, "schema": EXPORT_SCHEMA, "decisions": out}


def cmd_export(args: argparse.Namespace) -> int:
    from tunevault.cli.doctor_cmd import damaged, store_damage

    store = open_cli_store(args)
    try:
        # Checked before reading: a damaged file reads as missing rows, and an export of them
        # would replace a good FILE with an incomplete one.
        damage = store_damage(store)
        if damage:
            kept = "" if args.file == "-" else f", {args.file} left as it was"
            return damaged(shown(store), damage, f"; nothing exported{kept}")
        doc = export_document(select(store, args, strict=True), args)
    finally:
        store.close()
    text = json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n"
    if args.file == "-":
        sys.stdout.write(text)
    else:
        if os.path.isdir(args.file):
            raise IsADirectoryError(f"{args.file} is a directory; give the path of the file to write, "
                                    f"e.g. {os.path.join(args.file, 'tunevault-export.json')}")
        from tunevault.core.files import write_text

        write_text(args.file, text)  # whole or not at all, through a symlink, into a FIFO
    print(f"exported {len(doc['decisions'])} decision(s) from {shown(store)} to {args.file}",
          file=sys.stderr if args.file == "-" else sys.stdout)
    return 0


SHOWN_REJECTIONS = 20  # a file of many bad entries must not flood the terminal


def read_document(path: str) -> tuple[list[Any], Fingerprint | None]:
    """An export (or bundle) file's entries and fingerprint header; a file that is not one at all, or
    that is unsigned or fails its signature with ``TUNEVAULT_BUNDLE_KEY`` set, is a ValueError naming it."""
    from tunevault.store.bundle import key_from_env
    from tunevault.store.bundle import read_document as read_checked

    fingerprint, entries = read_checked(path, key_from_env())
    return entries, fingerprint


def parse_entry(entry: Any, fingerprint: Fingerprint | None = None) -> Decision:
    """Validate one entry as strictly as a store read does, plus internal consistency."""
    d = Decision.from_json(entry)
    d.dumps()  # NaN/inf timings cannot be stored: ValueError
    if fingerprint is not None and d.fingerprint != fingerprint:
        raise InvalidEntry("its fingerprint differs from the file's fingerprint header")
    measured = sorted(c.index for c in d.candidates)
    if measured and d.config_index not in measured:
        raise InvalidEntry(f"config_index {d.config_index} is not one of its own candidates "
                           f"(#{', #'.join(map(str, measured))})")
    for c in d.candidates:
        if c.index == d.config_index and c.config != d.config:
            raise InvalidEntry(f"config #{d.config_index} is {d.config.describe()} but its measurement "
                               f"says {c.config.describe()}")
    return d


def cmd_import(args: argparse.Namespace) -> int:
    entries, fingerprint = read_document(args.file)
    added, identical, differing, rejected = 0, 0, 0, []
    store = open_cli_store(args)
    try:
        for i, entry in enumerate(entries):
            try:
                d = parse_entry(entry, fingerprint)
            except (InvalidEntry, ValueError, TypeError) as exc:
                kernel = entry.get("kernel") if isinstance(entry, dict) else None
                name = kernel.get("name") if isinstance(kernel, dict) else None
                rejected.append({"index": i, "kernel": name if isinstance(name, str) else None,
                                 "reason": str(exc)})
                continue
            stored = store.get(*d.store_key)
            if stored is None:
                stored = store.put(d)  # first writer wins: a concurrent writer may have beaten us
                if stored.dumps() == d.dumps():
                    added += 1
                    continue
            if stored.same_choice(d):  # timings may differ: a winners-only bundle carries none
                identical += 1
            else:
                differing += 1
    finally:
        store.close()
    report = {"file": args.file, "store": shown(store), "added": added, "skipped": identical + differing,
              "skipped_identical": identical, "skipped_differing": differing, "rejected": len(rejected),
              "rejections": rejected}
    if args.json:
        print_json(report)
    else:
        print(f"imported {args.file} into {shown(store)}: added {added}, skipped {identical + differing} "
              f"(already present: {identical} identical, {differing} different, stored one kept), "
              f"rejected {len(rejected)}")
        for r in rejected[:SHOWN_REJECTIONS]:
            print(f"  rejected entry {r['index']} ({r['kernel'] or 'unknown kernel'}): {r['reason']}",
                  file=sys.stderr)
        if len(rejected) > SHOWN_REJECTIONS:
            print(f"  ... and {len(rejected) - SHOWN_REJECTIONS} more rejected entries (--json lists all)",
                  file=sys.stderr)
    return 1 if rejected else 0


def cmd_rm(args: argparse.Namespace) -> int:
    if not (args.all or args.kernel or args.this_machine or args.other_machines):
        raise ValueError("give a filter (--kernel, --this-machine, --other-machines) or --all")
    store = open_cli_store(args)
    try:
        records = _failed_records(store, args)
        if args.dry_run:
            found = select(store, args)
            for d in found:
                print(f"would remove {d.kernel.name} [{d.key.describe()}] ({d.fingerprint.digest})")
            print(f"would remove {len(found)} decision(s) from {shown(store)}"
                  + (f" and {len(records)} failed-key record(s)" if records else ""))
            return 0
        if args.other_machines:  # not expressible as one Query: delete each by its exact key
            removed = sum(store.delete(Query(kernel_digest=d.kernel.digest, key_text=d.key.text,
                                             fingerprint_digest=d.fingerprint.digest))
                          for d in select(store, args))
        else:
            here = this_machine().digest if args.this_machine else None
            removed = store.delete(Query(kernel=args.kernel, fingerprint_digest=here))
        for name, text in records.items():
            store.release(name, text)  # only if still that record: a newer one stays
    finally:
        store.close()
    print(f"removed {removed} decision(s) from {shown(store)}"
          + (f" and {len(records)} failed-key record(s)" if records else ""))
    return 0


def _failed_records(store: Store, args: argparse.Namespace) -> dict[str, str]:
    """The fleet's records of keys whose every config failed (policy/shard.py) that ``rm``'s filters
    select, as name -> record: removed with the decisions, so a warmup tunes those keys again."""
    from tunevault.policy.shard import FAILED_PREFIX

    listing = getattr(store, "leases", None)
    records: dict[str, str] = listing(FAILED_PREFIX) if listing is not None else {}
    here = this_machine().digest if args.this_machine or args.other_machines else None
    chosen = {}
    for name, text in records.items():
        fingerprint = name[len(FAILED_PREFIX):].split(":")[1:2]  # failed:KERNEL:FINGERPRINT:KEY
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        names = [record.get(field) for field in ("kernel", "identity")] if isinstance(record, dict) else []
        if args.kernel and not any(isinstance(name, str) and args.kernel in name for name in names):
            continue  # the manifest's name (an alias, as warmup reports it) or the decisions' name
        if args.this_machine and fingerprint != [here]:
            continue
        if args.other_machines and fingerprint == [here]:
            continue
        chosen[name] = text
    return chosen


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def add(name: str, func: Callable[[argparse.Namespace], int], help: str, *, file: bool = False,
            json_flag: bool = True, filters: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if file:
            p.add_argument("file", metavar="FILE.json", help="path, or - for stdin/stdout")
        if filters:
            _add_filters(p, kernel_positional=name == "show")
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=func)
        return p

    add("info", cmd_info, "versions, this machine's fingerprint, store location, entries", filters=False)
    add("ls", cmd_ls, "list decisions: kernel, key, chosen config, machine, when")
    add("show", cmd_show, "a kernel's decisions with every candidate's timings")
    add("export", cmd_export, "write decisions to a JSON file", file=True, json_flag=False)
    add("import", cmd_import, "validate and add the decisions of an export file (first writer wins)",
        file=True, filters=False)
    rm = add("rm", cmd_rm, "remove decisions matching the filters (or --all)", json_flag=False)
    rm.add_argument("--all", action="store_true", help="allow removing without a filter (without one, the "
                    "fleet's records of keys whose every config failed go too)")
    rm.add_argument("--dry-run", action="store_true", help="list what would be removed")
