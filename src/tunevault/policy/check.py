"""Preflight: does the store hold a decision for every captured key, on this machine?

Run before sealing (or before a deploy): a key without a decision here is a key that would
benchmark, fall back or raise at request time. Kernel identity comes from importing the
kernel as it is now, so a changed kernel source shows up as undecided, as it would in serving.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from tunevault.capture import manifest as mf
from tunevault.capture.locate import KernelNotFound, import_autotuner
from tunevault.core.model import UNDECLARED, Fingerprint, KernelId, TuningKey
from tunevault.store.base import StoreUnavailable, redact

if TYPE_CHECKING:
    from triton.runtime.autotuner import Autotuner

    from tunevault.policy.settings import Settings
    from tunevault.store.base import Store


@dataclass
class CheckItem:
    kernel: str
    key: TuningKey
    decided: bool
    reason: str = ""
    config: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "key": self.key.to_json(), "decided": self.decided,
                "reason": self.reason, "config": self.config}


@dataclass
class CheckResult:
    fingerprint: Fingerprint
    store: str
    items: list[CheckItem] = field(default_factory=list)
    # The first read the store failed (Redis down, ...): then "missing" means "not known", not "run warmup".
    store_error: str | None = None

    @property
    def missing(self) -> list[CheckItem]:
        return [i for i in self.items if not i.decided]

    @property
    def ok(self) -> bool:
        return not self.missing and self.store_error is None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "store": self.store, "fingerprint": self.fingerprint.to_json(),
                "fingerprint_digest": self.fingerprint.digest, "keys": len(self.items),
                "store_error": self.store_error,
                "decided": len(self.items) - len(self.missing),
                "missing": [i.to_json() for i in self.missing],
                "items": [i.to_json() for i in self.items]}


def _settings(store: str | None) -> Settings:
    from tunevault.policy.settings import Settings

    adapter = sys.modules.get("tunevault.integration.triton_adapter")  # not imported: nothing installed
    rt = adapter.runtime() if adapter is not None else None
    base = rt.settings if rt is not None and store is None else Settings.from_env()
    if rt is not None:  # install()'s key signs this process's captures: it verifies manifests and bundles
        base = replace(base, bundle_key=rt.settings.bundle_key)
    return base.with_options(store=store)


def check(source: str | os.PathLike[str] | Sequence[mf.ManifestEntry],
          store: str | None = None) -> CheckResult:
    """Which captured keys have a decision for this machine's fingerprint in ``store``.

    ``store`` defaults to the installed runtime's store, else ``$TUNEVAULT_STORE`` / the user cache.
    """
    from tunevault.core.machine import this_machine
    from tunevault.store.layered import open_layered

    settings = _settings(store)  # its bundle_key (install()'s, else $TUNEVAULT_BUNDLE_KEY) verifies the lines
    entries = mf.read(source, key=settings.bundle_key) if isinstance(source, str | os.PathLike) else list(source)
    fp = this_machine()  # without importing torch: a preflight runs no kernel
    from tunevault.core.identity import kernel_id

    result = CheckResult(fp, redact(settings.store))
    opened = open_layered(settings.store, settings.remote, settings.bundles, settings.bundle_key)
    try:
        for entry in entries:
            try:
                item = _check_one(opened, this_machine, entry, kernel_id)
            except StoreUnavailable as exc:
                result.store_error = result.store_error or str(exc)
                item = CheckItem(entry.kernel, entry.key, False, f"store read failed: {exc}")
            result.items.append(item)
    finally:
        opened.close()
    if entries:
        result.fingerprint = this_machine()  # as the kernels' imports left it
    return result


def _check_one(store: Store, machine: Callable[[], Fingerprint], entry: mf.ManifestEntry,
               kernel_id: Callable[[Autotuner], KernelId]) -> CheckItem:
    """Whether ``entry``'s key is decided for this machine. The fingerprint is read after the
    kernel's module is imported: a library may set a codegen knob at import (flash-linear-attention
    sets TRITON_F32_DEFAULT), and a server files its decisions under the fingerprint it has then."""
    try:
        autotuner = import_autotuner(entry.kernel, entry.digest)
    except KernelNotFound as exc:
        return CheckItem(entry.kernel, entry.key, False, f"kernel not importable: {exc}")
    if len(autotuner.configs) <= 1:
        return CheckItem(entry.kernel, entry.key, True, "one config: nothing to tune")
    from tunevault.core.identity import declared_index  # serving's test, without torch (KernelState's needs it)
    kid, fp = kernel_id(autotuner), machine()
    key = entry.key.in_order(list(autotuner.arg_names))  # a manifest may list dtypes in a call's order
    ignored = None
    for text in dict.fromkeys((key.text, entry.key.text)):  # and a store, under the manifest's order
        try:
            decision = store.get(kid.digest, fp.digest, text)
        except StoreUnavailable:
            raise  # the store, not this key: check() says so once
        except Exception as exc:
            return CheckItem(entry.kernel, entry.key, False, f"store read failed: {exc}")
        if decision is None:
            continue
        chosen = f"#{decision.config_index} {decision.config.describe()}"
        # serving ignores it, as a miss: warmup tunes it again
        if declared_index(autotuner.configs, decision.config_index, decision.config) is None:
            ignored = ignored or chosen
            continue
        return CheckItem(entry.kernel, entry.key, True, "", chosen)
    if ignored is not None:
        return CheckItem(entry.kernel, entry.key, False, f"{UNDECLARED} (it names {ignored}); serving ignores "
                         "it: run warmup to tune the key again")
    return CheckItem(entry.kernel, entry.key, False, _why_missing(store, kid, fp, entry.key))


def _why_missing(store: Store, kid: KernelId, fp: Fingerprint, key: TuningKey) -> str:
    """The nearest thing the store does hold: another key, another kernel version, another machine."""
    from tunevault.policy.diagnose import explain_miss, none_here
    from tunevault.store.base import Query

    try:
        others = list(store.decisions(Query(kernel=kid.name)))
    except StoreUnavailable:
        raise
    except Exception:
        others = []
    same = [d.key for d in others if d.kernel.digest == kid.digest and d.fingerprint.digest == fp.digest]
    message, _near = explain_miss(kid.short_name, key, same, none=none_here(kid, fp, others))
    return "no decision; " + message.split("; ", 1)[1]
