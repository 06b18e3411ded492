"""Marks, in a host's local store, the decisions written there while the fleet's remote was down.

LayeredStore publishes such decisions once the remote answers again. Its list lives in memory,
so a process that exits during the outage would leave its decisions local for good: the host
then launches its own configs while the fleet launches the first writer's. Each one therefore
also leaves a mark in the local store, a long-lived lease named ``unpublished:`` + the key's
store key, whose holder is a small JSON record (the key, and the stale entry it replaced, if
any). The next process on the host to reach the remote publishes what the marks name.

A mark is read as untrusted input (another process, or a file from elsewhere, may hold it):
one that does not parse is ignored.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from tunevault.core.model import Decision
from tunevault.core.untrusted import loads
from tunevault.store.base import Store, key_lease_name, shown

log = logging.getLogger("tunevault")

PREFIX = "unpublished:"
FORMAT = "tunevault-unpublished/1"
TTL_S = 30 * 24 * 3600.0  # an outage longer than this leaves the decision local
MAX_MARKS = 4096  # read per process; more stay local (LayeredStore keeps at most PENDING_CAP anyway)

StoreKey = tuple[str, str, str]


@dataclass(frozen=True)
class Mark:
    """One decision that never reached the remote: its store key, what it replaced, the lease held."""

    store_key: StoreKey
    stale: Decision | None
    name: str
    holder: str


def name_of(store_key: StoreKey) -> str:
    return key_lease_name(PREFIX, *store_key)


def leave(local: Store, store_key: StoreKey, stale: Decision | None) -> Mark | None:
    """Mark ``store_key`` as written locally only; the mark held (this one or an earlier one), or
    None where the local store keeps no leases or cannot write."""
    name = name_of(store_key)
    record = {"format": FORMAT, "store_key": list(store_key), "stale": None if stale is None else stale.to_json()}
    holder = json.dumps(record, sort_keys=True, separators=(",", ":"))
    try:
        if local.try_lease(name, holder, TTL_S):
            return Mark(store_key, stale, name, holder)
        held = local.lease_holder(name)  # another process marked the key first: its mark stands
    except Exception as exc:
        log.debug("tunevault: could not mark %s as unpublished in %s: %s", name, shown(local), exc)
        return None
    return _parse(name, held) if held is not None else None


def found(local: Store) -> list[Mark]:
    """The marks the local store holds (at most MAX_MARKS); none where it keeps no lease list."""
    listing = getattr(local, "leases", None)
    if listing is None:
        return []
    try:
        held: dict[str, str] = listing(PREFIX)
    except Exception as exc:
        log.debug("tunevault: could not read unpublished marks from %s: %s", shown(local), exc)
        return []
    marks = [mark for name, holder in list(held.items())[:MAX_MARKS] if (mark := _parse(name, holder)) is not None]
    return marks


def clear(local: Store, mark: Mark) -> None:
    """The decision reached the remote (or the fleet's replaced it): drop the mark. Best effort."""
    try:
        local.release(mark.name, mark.holder)
    except Exception as exc:
        log.debug("tunevault: could not clear unpublished mark %s: %s", mark.name, exc)


def _parse(name: str, holder: str) -> Mark | None:
    try:
        record = loads(holder, what="unpublished mark")
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            return None
        skey = record.get("store_key")
        if not (isinstance(skey, list) and len(skey) == 3 and all(isinstance(part, str) for part in skey)):
            return None
        store_key: StoreKey = (skey[0], skey[1], skey[2])
        if name_of(store_key) != name:
            return None
        stale = record.get("stale")
        return Mark(store_key, None if stale is None else Decision.from_json(stale), name, holder)
    except Exception as exc:  # whatever the record holds, it costs that mark only
        log.debug("tunevault: ignoring a malformed unpublished mark %s: %s", name, exc)
        return None
