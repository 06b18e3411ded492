"""Bundles: portable, read-only, optionally signed files of winning decisions for one fingerprint.

A bundle is what you bake into a container image so a fresh replica never tunes: winners only
(candidates stripped), one fingerprint, a schema version, and an optional HMAC-SHA256 over the
canonical JSON of everything but the signature. With a key configured, a bundle that is unsigned
or whose signature does not verify is rejected whole; without a key its signature is not checked.

It is the same document ``tunevault export`` writes (so ``tunevault import`` reads a bundle too),
plus a ``fingerprint`` header and the optional ``signature``; any export file loads as a bundle.
A bundle comes from elsewhere: only a regular file of bounded size is read, with bounded nesting,
and whatever it holds, loading raises BundleError (one refusal) and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

from tunevault.core.model import Decision, Fingerprint, InvalidEntry, canonical_json
from tunevault.core.untrusted import MAX_DOCUMENT_BYTES, Refused, loads
from tunevault.core.untrusted import read_document as read_file
from tunevault.store.base import Query, Store, StoreUnavailable, log

# The one definition of the export / bundle document's format; the CLI's export and import use it too.
FORMAT = "tunevault-decisions"
SCHEMA = 1
ALGORITHM = "hmac-sha256"
EVERYTHING = Query()
KEY_VARIABLE = "TUNEVAULT_BUNDLE_KEY"
EMPTY_KEY = (f"{KEY_VARIABLE} is set but empty (an empty secret file?): an empty key would switch signature "
             "checks off; set a real key, or unset it to run without signatures")
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_ENTRIES = 1_000_000  # 10x the largest real store we know of; a bundle holds one fingerprint's winners


class BundleError(ValueError):
    """A bundle cannot be used at all: unreadable, another format, or its signature fails."""


def winner_only(decision: Decision) -> Decision:
    """The decision without its candidates' timings: what a serving process needs, nothing more."""
    return replace(decision, candidates=())


def _signed_body(document: dict[str, Any]) -> bytes:
    body = canonical_json({k: v for k, v in document.items() if k != "signature"})
    return body.encode()  # canonical JSON is ASCII


def signature(document: dict[str, Any], key: str | bytes) -> str:
    """HMAC-SHA256 over the canonical JSON of the document without its signature."""
    return hmac.new(key_bytes(key), _signed_body(document), hashlib.sha256).hexdigest()


def make_bundle(decisions: Iterable[Decision], fingerprint: Fingerprint,
                key: str | bytes | None = None) -> dict[str, Any]:
    """The bundle document for ``decisions`` made under ``fingerprint``; others are left out."""
    chosen = {d.store_key: winner_only(d) for d in decisions if d.fingerprint == fingerprint}
    ordered = sorted(chosen.values(), key=lambda d: (d.kernel.name, d.kernel.digest, d.key.text))
    doc: dict[str, Any] = {
        "format": FORMAT,
        "schema": SCHEMA,
        "created": time.time(),
        "fingerprint": fingerprint.to_json(),
        "decisions": [d.to_json() for d in ordered],
    }
    if key is not None:
        doc["signature"] = {"alg": ALGORITHM, "hmac": signature(doc, key)}
    return doc


def write_bundle(path: str | os.PathLike[str], decisions: Iterable[Decision], fingerprint: Fingerprint,
                 key: str | bytes | None = None) -> int:
    """Write a bundle whole (``core.files.write_text``); return how many decisions it holds."""
    from tunevault.core.files import write_text

    doc = make_bundle(decisions, fingerprint, key)
    write_text(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return len(doc["decisions"])


def pick_fingerprint(store: Store, fingerprint: str | None) -> Fingerprint:
    """The fingerprint to export: ``current`` (default), or one whose digest starts with ``fingerprint``."""
    if fingerprint in (None, "", "current"):
        from tunevault.core.identity import current_fingerprint

        return current_fingerprint()
    seen: dict[str, Fingerprint] = {}
    for d in store.decisions():
        seen.setdefault(d.fingerprint.digest, d.fingerprint)
    matches = [fp for digest, fp in seen.items() if digest.startswith(fingerprint)]
    if len(matches) != 1:
        known = ", ".join(sorted(seen)) or "none"
        raise ValueError(f"fingerprint {fingerprint!r} matches {len(matches)} fingerprints in {store.url} "
                         f"(present: {known})")
    return matches[0]


def export_bundle(store: Store, path: str | os.PathLike[str], fingerprint: str | None = None,
                  key: str | bytes | None = None, query: Query = EVERYTHING) -> int:
    """Write the winners of ``store`` for one fingerprint (current by default) to a bundle file."""
    fp = pick_fingerprint(store, fingerprint)
    query = replace(query, fingerprint_digest=fp.digest)
    return write_bundle(path, store.decisions(query), fp, key)


def key_bytes(key: str | bytes) -> bytes:
    """The HMAC key as bytes; an empty key is a configuration error, never "no key"."""
    raw = key if isinstance(key, bytes) else key.encode("utf-8", "surrogatepass")
    if not raw.strip():
        raise BundleError(EMPTY_KEY)
    return raw


def key_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """``$TUNEVAULT_BUNDLE_KEY``: None when unset; set but empty is a BundleError (a ValueError)."""
    value = (os.environ if env is None else env).get(KEY_VARIABLE)
    if value is None:
        return None
    key_bytes(value)
    return value


def read_document(path: str | os.PathLike[str], key: str | bytes | None = None,
                  ) -> tuple[Fingerprint | None, list[Any]]:
    """An export or bundle file's fingerprint header and raw entries, checked as a whole.

    ``-`` reads standard input. Raises BundleError (and nothing else) when the file cannot be
    read, is not a tunevault document of this schema, or, with a key, is unsigned or does not
    verify. Entries are returned unparsed: each is validated by its reader."""
    where = os.fspath(path)
    try:
        raw = sys.stdin.buffer.read(MAX_DOCUMENT_BYTES + 1) if where == "-" else read_file(where)
        if len(raw) > MAX_DOCUMENT_BYTES:
            raise Refused(f"{where} is larger than the {MAX_DOCUMENT_BYTES} bytes tunevault reads")
        return _checked(where, loads(raw, what=where), key)
    except BundleError:
        raise
    except Exception as exc:  # whatever a hostile file does, it is refused here, named, and nothing else
        raise BundleError(f"cannot read tuning bundle {where}: {exc}") from None


def _checked(where: str, doc: Any, key: str | bytes | None) -> tuple[Fingerprint | None, list[Any]]:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BundleError(f"{where} is not a tunevault export or bundle (no \"format\": \"{FORMAT}\")")
    if doc.get("schema") != SCHEMA:
        raise BundleError(f"tuning bundle {where} has schema {str(doc.get('schema'))[:40]}; this tunevault "
                          f"reads schema {SCHEMA}")
    check_signature(f"tuning bundle {where}", doc, key)
    fingerprint = None
    if doc.get("fingerprint") is not None:
        try:
            fingerprint = Fingerprint.from_json(doc["fingerprint"])
        except InvalidEntry as exc:
            raise BundleError(f"tuning bundle {where} has an invalid fingerprint: {exc}") from None
    entries = doc.get("decisions")
    if not isinstance(entries, list):
        raise BundleError(f"tuning bundle {where} has no decisions list")
    if len(entries) > MAX_ENTRIES:
        raise BundleError(f"tuning bundle {where} holds {len(entries)} entries, more than the {MAX_ENTRIES} "
                          "tunevault reads")
    return fingerprint, entries


def load_bundle(path: str | os.PathLike[str],
                key: str | bytes | None = None) -> tuple[Fingerprint | None, list[Decision]]:
    """Read and check a bundle. Raises BundleError when it cannot be trusted or read at all (and
    nothing else); a malformed or foreign entry inside a good bundle is skipped with a warning."""
    path = os.fspath(path)
    fingerprint, entries = read_document(path, key)
    decisions, bad, first = [], 0, ""
    for i, entry in enumerate(entries):
        try:
            decision = Decision.from_json(entry)
            if fingerprint is not None and decision.fingerprint != fingerprint:
                raise InvalidEntry("its fingerprint differs from the bundle's")
        except Exception as exc:  # one bad entry costs that entry, never the bundle or a kernel call
            bad, first = bad + 1, first or f"#{i}: {str(exc)[:300]}"
            continue
        decisions.append(decision)
    if bad:  # one line, however many: a small file of a million bad entries must not flood the log
        log.warning("tunevault: ignoring %d malformed decision(s) in bundle %s (first %s)", bad, path, first)
    return fingerprint, decisions


def check_signature(what: str, doc: dict[str, Any], key: str | bytes | None,
                    how_to_sign: str = "sign it with `tunevault export --winners-only --sign`") -> None:
    """With a key, ``doc`` must carry a valid signature (BundleError naming ``what`` otherwise);
    without one it is not checked."""
    sig = doc.get("signature")
    if key is None:
        if sig is not None:
            log.debug("tunevault: %s is signed but no TUNEVAULT_BUNDLE_KEY is set; not verified", what)
        return
    secret = key_bytes(key)
    if sig is None:
        raise BundleError(f"{what} is not signed, but TUNEVAULT_BUNDLE_KEY is set; refusing it ({how_to_sign})")
    if not isinstance(sig, dict) or sig.get("alg") != ALGORITHM:
        alg = sig.get("alg") if isinstance(sig, dict) else sig
        raise BundleError(f"{what} is signed with {str(alg)[:40]!r}; only {ALGORITHM} is accepted")
    given = sig.get("hmac")
    if not (isinstance(given, str) and _HEX64.fullmatch(given)):
        raise BundleError(f"{what}: its signature is malformed; refusing it")
    expected = hmac.new(secret, _signed_body(doc), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(given.encode("ascii"), expected.encode("ascii")):
        raise BundleError(f"{what}: signature does not verify (the file was modified after signing, or "
                          "TUNEVAULT_BUNDLE_KEY is not the key it was signed with); refusing it")


class BundleStore:
    """A bundle as a read-only Store: the bottom layer of the layered store."""

    def __init__(self, path: str | os.PathLike[str], key: str | bytes | None = None) -> None:
        self.path = os.fspath(path)
        self.url = "bundle:" + self.path
        self.fingerprint, decisions = load_bundle(self.path, key)
        self._decisions: dict[tuple[str, str, str], Decision] = {}
        for d in decisions:
            self._decisions.setdefault(d.store_key, d)

    def get(self, kernel_digest: str, fingerprint_digest: str, key_text: str) -> Decision | None:
        return self._decisions.get((kernel_digest, fingerprint_digest, key_text))

    def put(self, decision: Decision) -> Decision:
        raise StoreUnavailable(f"tuning bundle {self.path} is read-only")

    def decisions(self, query: Query = EVERYTHING) -> Iterator[Decision]:
        yield from (d for d in self._decisions.values() if query.matches(d))

    def delete(self, query: Query = EVERYTHING) -> int:
        raise StoreUnavailable(f"tuning bundle {self.path} is read-only")

    def count(self) -> int:
        return len(self._decisions)

    def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        raise StoreUnavailable(f"tuning bundle {self.path} holds no leases")

    def release(self, name: str, holder: str) -> None:
        """Nothing to release."""

    def lease_holder(self, name: str) -> str | None:
        return None

    def close(self) -> None:
        """Nothing to close: the file was read whole at open."""

    def __repr__(self) -> str:
        return f"BundleStore({self.path!r}, {len(self._decisions)} decisions)"
