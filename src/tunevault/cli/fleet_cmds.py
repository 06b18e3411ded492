"""Fleet commands: ``diff A B``, and ``export --winners-only/--sign/--fingerprint`` (bundles).

``diff`` compares two stores or bundle/export files: which keys chose differently, which exist
on one side only. Bundle export extends the ``export`` command of ``store_cmds`` with flags
instead of adding a second command that writes the same format.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from tunevault.cli.output import print_json, print_table
from tunevault.core.model import Decision
from tunevault.store.base import StoreUnavailable, open_store, shown
from tunevault.store.sqlite import SqliteStore
from tunevault.store.sqlite_file import path_of_url

SQLITE_MAGIC = b"SQLite format 3\x00"


def bundle_key(args: argparse.Namespace) -> str | None:
    """The HMAC key: ``--key-file`` if given, else ``$TUNEVAULT_BUNDLE_KEY``."""
    if getattr(args, "key_file", None):
        from tunevault.core.untrusted import read_document

        key = read_document(args.key_file, limit=1 << 16).decode("utf-8").strip()  # never blocks on a FIFO
        if not key:
            raise ValueError(f"key file {args.key_file} is empty")
        return key
    from tunevault.store.bundle import key_from_env

    return key_from_env()  # set but empty: a configuration error, never "no key"


def load_side(spec: str, key: str | None) -> tuple[str, list[Decision]]:
    """A store URL, an SQLite file, or a bundle/export JSON file, as (label, decisions)."""
    from tunevault.store.bundle import BundleError, load_bundle

    if "://" in spec:
        try:
            # An SQLite file may come from elsewhere: opened mode=ro, its layout checked, nothing created.
            store = SqliteStore(path_of_url(spec), writable=False) if spec.startswith("sqlite:") else open_store(spec)
            try:
                # Unreadable is an error here: read as empty (the runtime's miss), it would "agree".
                return shown(store), store.listing() if isinstance(store, SqliteStore) else list(store.decisions())
            finally:
                store.close()
        except StoreUnavailable as exc:
            raise OSError(str(exc)) from exc
    from tunevault.core.untrusted import head

    if head(spec, len(SQLITE_MAGIC)) == SQLITE_MAGIC:  # a regular file only: never blocks on a FIFO
        return load_side("sqlite:///" + os.path.abspath(spec), key)
    try:
        return spec, load_bundle(spec, key)[1]
    except BundleError as exc:
        raise ValueError(str(exc)) from None


def diff(a: list[Decision], b: list[Decision]) -> list[dict[str, Any]]:
    """Rows for keys that differ: status ``differs``, ``only A`` or ``only B``, sorted by kernel and key."""
    left = {d.store_key: d for d in a}
    right = {d.store_key: d for d in b}
    rows = []
    for skey in sorted(left.keys() | right.keys(), key=lambda k: ((left.get(k) or right[k]).kernel.name, k)):
        da, db = left.get(skey), right.get(skey)
        if da is not None and db is not None and da.same_choice(db):
            continue
        d = da or db
        assert d is not None
        status = "differs" if da is not None and db is not None else ("only A" if db is None else "only B")
        rows.append({"status": status, "kernel": d.kernel.name, "kernel_digest": d.kernel.digest,
                     "key": d.key.describe(), "fingerprint_digest": d.fingerprint.digest,
                     "device": d.fingerprint.device, "a": None if da is None else _config(da),
                     "b": None if db is None else _config(db)})
    return rows


def _config(d: Decision) -> str:
    return f"#{d.config_index} {d.config.describe()}"


def cmd_diff(args: argparse.Namespace) -> int:
    key = bundle_key(args)
    (label_a, a), (label_b, b) = load_side(args.a, key), load_side(args.b, key)
    if args.kernel:
        a, b = ([d for d in side if args.kernel in d.kernel.name] for side in (a, b))
    rows = diff(a, b)
    both = {d.store_key for d in a} & {d.store_key for d in b}
    same = len(both) - sum(r["status"] == "differs" for r in rows)
    if args.json:
        print_json({"a": label_a, "b": label_b, "same": same, "differences": rows})
    elif rows:
        print_table(["", "kernel", "key", "A", "B", "device"],
                    [[r["status"], r["kernel"], r["key"], r["a"] or "-", r["b"] or "-", r["device"]]
                     for r in rows],
                    title=f"A = {label_a}\nB = {label_b}")
        counts = {s: sum(r["status"] == s for r in rows) for s in ("differs", "only A", "only B")}
        print(f"{same} key(s) agree; {counts['differs']} chose differently, {counts['only A']} only in A, "
              f"{counts['only B']} only in B")
    else:
        print(f"{label_a} and {label_b} agree on all {same} key(s)")
    return 1 if rows else 0


def export_bundle_cmd(args: argparse.Namespace) -> int:
    """``export --winners-only`` / ``--sign``: a bundle for one fingerprint (current by default)."""
    from tunevault.cli.doctor_cmd import damaged, store_damage
    from tunevault.cli.store_cmds import open_cli_store, select
    from tunevault.store.bundle import pick_fingerprint, write_bundle

    key = bundle_key(args) if args.sign or args.key_file else None
    if args.sign and not key:
        raise ValueError("--sign needs a key: set TUNEVAULT_BUNDLE_KEY or pass --key-file")
    if args.file == "-":
        raise ValueError("a bundle is written to a file, not stdout")
    store = open_cli_store(args)
    try:
        damage = store_damage(store)  # before reading: damaged pages read as missing decisions
        if damage:
            return damaged(shown(store), damage, f"; nothing exported, {args.file} left as it was")
        if args.fingerprint in (None, "", "current"):
            from tunevault.cli.store_cmds import this_machine

            fp = this_machine()
        else:
            fp = pick_fingerprint(store, args.fingerprint)
        found = [d for d in select(store, args, strict=True) if d.fingerprint == fp]
        url = shown(store)
    finally:
        store.close()
    if not found:
        raise ValueError(f"no decisions for fingerprint {fp.digest} ({fp.device}, {fp.target}, "
                         f"triton {fp.triton}) in {url}; pass --fingerprint DIGEST (`tunevault ls --json` "
                         f"lists each decision's fingerprint_digest)")
    n = write_bundle(args.file, found, fp, key)
    signed = "signed" if key else "unsigned"
    print(f"exported {n} winning decision(s) for {fp.device} {fp.target}, triton {fp.triton} "
          f"(fingerprint {fp.digest}) from {url} to {args.file} ({signed} bundle)")
    return 0


def _extend_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = getattr(sub, "choices", {}).get("export")
    if export is None:
        return
    export.add_argument("--winners-only", action="store_true",
                        help="write a bundle: winning configs only, one fingerprint (see --fingerprint)")
    export.add_argument("--fingerprint", metavar="DIGEST",
                        help="with --winners-only: the fingerprint to export, or a prefix of it (default: this "
                             "machine's; `tunevault ls --json` lists fingerprint_digest); without it: exit 2")
    export.add_argument("--sign", action="store_true",
                        help="sign the bundle with HMAC-SHA256 using $TUNEVAULT_BUNDLE_KEY (or --key-file); "
                             "writes a bundle, as --winners-only")
    export.add_argument("--key-file", metavar="FILE", help="read the signing key from FILE (writes a signed bundle, "
                        "as --winners-only --sign)")
    plain: Callable[[argparse.Namespace], int] = export.get_default("func")

    def run(args: argparse.Namespace) -> int:
        if args.fingerprint is not None and not args.winners_only:  # it silently wrote a bundle
            raise ValueError("--fingerprint picks the machine a bundle is for: add --winners-only "
                             "(a plain export writes every machine's decisions; filter with --this-machine)")
        if args.winners_only or args.sign or args.key_file:
            return export_bundle_cmd(args)
        return plain(args)

    export.set_defaults(func=run)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("diff", help="compare two stores or bundles: keys chosen differently or one-sided",
                       description="Compare decisions in two stores (URL or SQLite file) or bundle/export "
                       "files. Exit status 0 when they agree, 1 when they differ.")
    p.add_argument("a", metavar="A", help="store URL, SQLite file or bundle/export JSON")
    p.add_argument("b", metavar="B", help="store URL, SQLite file or bundle/export JSON")
    p.add_argument("--kernel", metavar="SUBSTR", help="only kernels whose qualified name contains SUBSTR")
    p.add_argument("--key-file", metavar="FILE", help="verify signed bundles with the key in FILE "
                   "(default: $TUNEVAULT_BUNDLE_KEY)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_diff)
    _extend_export(sub)
