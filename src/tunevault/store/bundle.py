"""Bundles: portable, read-only, optionally signed files of winning decisions for one fingerprint.

A bundle is what you bake into a container image so a fresh replica never tunes: winners only
(candidates stripped), one fingerprint, a schema version, and an optional HMAC-SHA256 over the
canonical JSON of everything but the signature. With a key configured, a bundle that is unsigned
or whose signature does not verify is rejected whole; without a key its signature is not checked.

It is the same document ``tunevault export`` writes (so ``tunevault import`` reads a bundle too),
plus a ``fingerprint`` header and the optional ``signature``; any export file loads as a bundle.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

from tunevault.core.model import Decision, Fingerprint, InvalidEntry, canonical_json
from tunevault.store.base import Query, Store, StoreUnavailable, log

# The one definition of the export / bundle document's format; the CLI's export and import use it too.
FORMAT = "tunevault-decisions"
SCHEMA = 1
ALGORITHM = "hmac-sha256"
EVERYTHING = Query()


class BundleError(ValueError):
    """A bundle cannot be used at all: unreadable, another format, or its signature fails."""


def winner_only(decision: Decision) -> Decision:
    """The decision without its candidates' timings: what a serving process needs, nothing more."""
    return replace(decision, candidates=())


def _key_bytes(key: str | bytes) -> bytes:
    return key if isinstance(key, bytes) else key.encode()


def signature(document: dict[str, Any], key: str | bytes) -> str:
    """HMAC-SHA256 over the canonical JSON of the document without its signature."""
    body = canonical_json({k: v for k, v in document.items() if k != "signature"})
    return hmac.new(_key_bytes(key), body.encode(), hashlib.sha256).hexdigest()


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
    if key:
        doc["signature"] = {"alg": ALGORITHM, "hmac": signature(doc, key)}
    return doc


def write_bundle(path: str | os.PathLike[str], decisions: Iterable[Decision], fingerprint: Fingerprint,
                 key: str | bytes | None = None) -> int:
    """Write a bundle atomically (temp file + rename); return how many decisions it holds."""
    doc = make_bundle(decisions, fingerprint, key)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
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


def load_bundle(path: str | os.PathLike[str],
                key: str | bytes | None = None) -> tuple[Fingerprint | None, list[Decision]]:
    """Read and check a bundle. Raises BundleError when it cannot be trusted or read at all;
    a malformed or foreign entry inside a good bundle is skipped with a warning."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read tuning bundle {path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BundleError(f"{path} is not a tunevault bundle or export (no \"format\": \"{FORMAT}\")")
    if doc.get("schema") != SCHEMA:
        raise BundleError(f"tuning bundle {path} has schema {doc.get('schema')!r}; this tunevault reads "
                          f"schema {SCHEMA}")
    _check_signature(path, doc, key)
    fingerprint = None
    if doc.get("fingerprint") is not None:
        try:
            fingerprint = Fingerprint.from_json(doc["fingerprint"])
        except InvalidEntry as exc:
            raise BundleError(f"tuning bundle {path} has an invalid fingerprint: {exc}") from exc
    entries = doc.get("decisions")
    if not isinstance(entries, list):
        raise BundleError(f"tuning bundle {path} has no decisions list")
    decisions = []
    for i, entry in enumerate(entries):
        try:
            decision = Decision.from_json(entry)
            if fingerprint is not None and decision.fingerprint != fingerprint:
                raise InvalidEntry("its fingerprint differs from the bundle's")
        except (InvalidEntry, TypeError, ValueError) as exc:
            log.warning("tunevault: ignoring malformed decision #%d in bundle %s: %s", i, path, exc)
            continue
        decisions.append(decision)
    return fingerprint, decisions


def _check_signature(path: str, doc: dict[str, Any], key: str | bytes | None) -> None:
    sig = doc.get("signature")
    if not key:
        if sig is not None:
            log.debug("tunevault: bundle %s is signed but no TUNEVAULT_BUNDLE_KEY is set; not verified", path)
        return
    if not isinstance(sig, dict) or not isinstance(sig.get("hmac"), str):
        raise BundleError(f"tuning bundle {path} is not signed, but TUNEVAULT_BUNDLE_KEY is set; "
                          "refusing it (sign it with `tunevault export --winners-only --sign`)")
    if sig.get("alg") != ALGORITHM:
        raise BundleError(f"tuning bundle {path} is signed with {sig.get('alg')!r}; "
                          f"only {ALGORITHM} is accepted")
    if not hmac.compare_digest(sig["hmac"], signature(doc, key)):
        raise BundleError(f"tuning bundle {path}: signature does not verify (the file was modified after "
                          "signing, or TUNEVAULT_BUNDLE_KEY is not the key it was signed with); refusing it")


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
