"""Warm a key manifest up in this process, sharing its keys with every process on the same store.

``tunevault.warmup(manifest)`` on each server rank, ``tunevault warmup`` (alone or with
``--jobs N``) and ``TUNEVAULT_WARMUP`` all come here. The keys are divided through the store's
leases (policy/shard.py), never through a collective: ranks that start late or restart join
whatever is left, a rank whose store already holds every key returns at once, and every rank
returns only when every key is settled, with every decision loaded, so all ranks launch the
same configs. With ``TUNEVAULT_REMOTE`` the leases live on Redis: hosts of one fingerprint share
the work; another GPU model's keys (another fingerprint in every lease name) are its own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import sys
from collections.abc import Callable, Sequence

from tunevault.capture import manifest as mf
from tunevault.capture.locate import KernelNotFound, import_autotuner
from tunevault.capture.replay import WarmupItem, WarmupReport, decided, entries, replay_one, replayed_callspec
from tunevault.core.files import write_text
from tunevault.core.kernel_state import KernelState, state_of
from tunevault.core.model import KernelId
from tunevault.engine.ahead import AheadJob
from tunevault.engine.context import sharing_cores
from tunevault.integration.warmup_ahead import AheadPlan, plan_for
from tunevault.policy.lease import lease_name
from tunevault.policy.runtime import Runtime
from tunevault.policy.shard import Sharing, Task, affinity_order, share
from tunevault.store.base import Store

log = logging.getLogger("tunevault")

WORKER_VAR = "TUNEVAULT_WARMUP_WORKER"  # "i/n": set by ``tunevault warmup --jobs`` for its children
RUN_VAR = "TUNEVAULT_WARMUP_RUN"  # a folder private to one ``tunevault warmup --jobs`` run, for its children


class DecidedNames:
    """Which manifest keys a ``--jobs`` child may count as decided without importing their kernel.

    A decision counts only under the digest that a peer of this same run computed for the kernel's
    name, after importing it (``vouch``, a file in the run's folder ``$TUNEVAULT_WARMUP_RUN``): a
    decision under the name alone may be stale (the kernel's source or configs changed since it was
    made, so its digest changed) and only an import can tell. A peer's digest is as good as our own:
    same files, same fingerprint. Without a run folder nothing is trusted; the digest judges."""

    def __init__(self, store: Store, fingerprint: str) -> None:
        self.store, self.fingerprint = store, fingerprint
        self.run_dir = os.environ.get(RUN_VAR) or None
        self.digests: dict[str, str] = {}  # kernel name -> its digest in this run

    def vouch(self, name: str, digest: str) -> None:
        """Tell this run's peers the digest of ``name``, computed here by importing it."""
        if self.run_dir is None or self.digests.get(name) == digest:
            return
        self.digests[name] = digest
        path = self._path(name)
        try:
            write_text(path, digest)  # whole or absent for a peer reading it
        except OSError as exc:  # peers then import the kernel themselves
            log.debug("tunevault warmup: cannot share the digest of %s (%s)", name, exc)

    def __contains__(self, pair: tuple[str, str]) -> bool:
        name, key_text = pair
        digest = self.digests.get(name) or self._vouched(name)
        if digest is None:
            return False
        try:
            return self.store.get(digest, self.fingerprint, key_text) is not None
        except Exception as exc:  # then the key is judged by its digest, after an import
            log.debug("tunevault warmup: cannot read the store (%s)", exc)
            return False

    def _vouched(self, name: str) -> str | None:
        if self.run_dir is None:
            return None
        try:
            with open(self._path(name)) as f:
                text = f.read(65)
        except OSError:
            return None  # no peer has imported it yet
        if not (0 < len(text) <= 64 and text.isascii() and text.isalnum()):
            return None
        self.digests[name] = text
        return text

    def _path(self, name: str) -> str:
        assert self.run_dir is not None
        tag = hashlib.sha256(f"{self.fingerprint}\0{name}".encode()).hexdigest()[:32]  # any name, a safe file name
        return os.path.join(self.run_dir, tag)


class EntryTask:
    """One manifest entry as a shareable task; the kernel is imported once, on first use."""

    def __init__(self, runtime: Runtime, entry: mf.ManifestEntry, device: str | None,
                 names: DecidedNames | None = None) -> None:
        self.runtime, self.entry, self.device, self.names = runtime, entry, device, names
        self.plan: AheadPlan | None = None
        # ``key`` is the key as the manifest spells it (dtypes maybe in a call's order, before stop
        # 26): every item reports it, as replay_one's do, so a --jobs board merges one key per entry.
        # ``stored`` is the key decisions and leases are named by (dtypes in the kernel's order),
        # known once the kernel is imported.
        self.kernel, self.key, self.stored = entry.kernel, entry.key, entry.key
        self.what = f"{entry.kernel} [{entry.key.describe() or 'empty key'}]"
        self._lease: str | WarmupItem | None = None
        self._kernel_id: KernelId | None = None
        self._state: KernelState | None = None  # judges stored decisions as serving does, once imported

    def lease(self) -> str | WarmupItem:
        if self._lease is None:
            self._lease = self._identify()
        return self._lease

    def _identify(self) -> str | WarmupItem:
        try:
            autotuner = import_autotuner(self.kernel, self.entry.digest)
        except KernelNotFound as exc:
            return WarmupItem(self.kernel, self.key, "skipped", f"kernel not importable: {exc}")
        if len(autotuner.configs) <= 1:
            return WarmupItem(self.kernel, self.key, "decided", "one config: nothing to tune")
        self._state = state_of(autotuner)
        self._kernel_id = self._state.kernel_id
        self.stored = self.key.in_order(list(autotuner.arg_names))  # dtypes in the kernel's order
        if self.names is not None:
            self.names.vouch(self.kernel, self._kernel_id.digest)
        return lease_name(self._kernel_id.digest, self.runtime.fingerprint.digest, self.stored.text)

    def decided(self) -> bool:
        """A decision serving would launch is stored (replay.decided: not one naming no declared config)."""
        return self._state is not None and decided(self.runtime, self._state, self.stored, self.key)

    def identity_name(self) -> str | None:
        return None if self._kernel_id is None else self._kernel_id.name

    def decided_by_name(self) -> bool:
        """Decided under the digest a peer of this run found for the kernel (DecidedNames)."""
        if self.names is None or self._lease is not None or self.kernel.partition(":")[0] in sys.modules:
            return False  # names not trusted here, or identified or cheap to identify: the digest decides
        return (self.kernel, self.key.text) in self.names

    def tune(self) -> WarmupItem:
        if self.plan is not None:
            self.plan.before(self)
        return replay_one(self.runtime, self.entry, self.device)

    def ahead_job(self) -> AheadJob | None:
        """What a helper compiles before this key's tuning: every config, where the tuning would
        compile every config (no pruning by the call's arguments) in a fresh process too."""
        from tunevault.engine.ahead import job_for
        from tunevault.engine.isolated import kernel_target

        if self.decided_by_name() or isinstance(self.lease(), WarmupItem) or self.decided():
            return None
        if self.entry.callspec is None or self._kernel_id is None:
            return None
        at = import_autotuner(self.kernel, self.entry.digest)
        if getattr(at, "early_config_prune", None) or getattr(at, "perf_model", None):
            return None  # the pruned set depends on the call: it compiles in the tuning
        callspec = replayed_callspec(at, self.entry)  # the call the tuning replays
        target, _why = kernel_target(at)
        return job_for(target, self._kernel_id.digest, callspec, range(len(at.configs)), self.device)



def participant(env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """This process's (index, count) among the warmup's participants, when it knows them
    (``--jobs`` children, torchrun's RANK / WORLD_SIZE or LOCAL_RANK / LOCAL_WORLD_SIZE)."""
    e = os.environ if env is None else env
    pairs = [tuple(e.get(WORKER_VAR, "").partition("/")[::2]), (e.get("RANK", ""), e.get("WORLD_SIZE", "")),
             (e.get("LOCAL_RANK", ""), e.get("LOCAL_WORLD_SIZE", ""))]
    for index, size in pairs:
        if index.isdigit() and size.isdigit() and int(index) < int(size):
            return int(index), int(size)
    return None


def host_sharers(env: dict[str, str] | None = None) -> int:
    """How many warmup processes share this host's cores: ``--jobs`` children, or torchrun's
    LOCAL_WORLD_SIZE (not WORLD_SIZE: other hosts have their own cores); 1 when unknown."""
    e = os.environ if env is None else env
    for size in (e.get(WORKER_VAR, "").partition("/")[2], e.get("LOCAL_WORLD_SIZE", "")):
        if size.isdigit() and int(size) > 0:
            return int(size)
    return 1


def walk(kernels: Sequence[str], env: dict[str, str] | None = None) -> list[int]:
    """The order this process walks the keys in: its own kernels first when it knows its place
    (policy.shard.affinity_order), else from a random point, so unnumbered peers spread out."""
    me = participant(env)
    if me is not None:
        return affinity_order(kernels, *me)
    n = len(kernels)
    start = random.randrange(n) if n else 0
    return [(start + j) % n for j in range(n)]


def _same_manifest(source: object, pending: str | None) -> bool:
    if pending is None or not isinstance(source, str | os.PathLike):
        return False
    return os.path.abspath(os.fspath(source)) == os.path.abspath(pending)


def warmup(source: str | os.PathLike[str] | Sequence[mf.ManifestEntry], device: str | None = None,
           progress: Callable[[int, int, WarmupItem], None] | None = None,
           started: Callable[[Task], None] | None = None, *,
           read_from: str | os.PathLike[str] | None = None, retry_before: float | None = None) -> WarmupReport:
    """Settle every key of the manifest together with the other processes on the store.

    Returns once every key is decided, skipped or failed (the report says which, and why);
    installs tunevault (tune mode) for the call when it is not installed. ``read_from``: the file
    ``source`` was read from, when the caller read it already (a ``TUNEVAULT_WARMUP`` naming that
    file is then this call, as when ``source`` is the file). ``retry_before``: a wall-clock time;
    keys recorded as failed for the fleet before it are tried again (``tunevault warmup --retry-failed``).
    """
    from tunevault.integration import activation, triton_adapter
    from tunevault.policy.settings import Settings

    installed = triton_adapter.runtime()
    installed_here = installed is None
    settings = Settings.from_env().with_options(mode="tune") if installed is None else installed.settings
    keys = entries(source, settings.bundle_key)  # the key capture signs lines with verifies them too
    if installed_here:
        activation.install(settings)
    runtime = triton_adapter.runtime()
    assert runtime is not None
    if runtime.settings.mode != "tune":
        raise RuntimeError(f"tunevault warmup needs mode 'tune', installed mode is {runtime.settings.mode!r}")
    if _same_manifest(source if read_from is None else read_from, runtime.pending_warmup):
        runtime.take_pending_warmup()  # this call is that warmup
    try:
        # ``--jobs`` children of one run: a kernel a peer imported in this run (its digest in the
        # run's folder) is not imported again just to see its keys decided (~10 s for
        # flash-linear-attention); an earlier run's decisions are judged by digest (DecidedNames).
        names = DecidedNames(runtime.store, runtime.fingerprint.digest) if WORKER_VAR in os.environ else None
        tasks = [EntryTask(runtime, entry, device, names) for entry in keys]
        settings = runtime.settings
        sharing = Sharing(runtime.fingerprint.digest, settings.lease_ttl, settings.lease_wait,
                          order=tuple(walk([t.kernel for t in tasks])), retry_before=retry_before)
        plan = plan_for(settings, [tasks[i] for i in sharing.order] if sharing.order else tasks, host_sharers())
        for task in tasks:
            task.plan = plan
        try:
            # This thread tunes its misses (request threads keep the seal's policy), compiling on its
            # share of the host's cores: the other participants here tune at the same time.
            with runtime.warming(), sharing_cores(host_sharers()):
                items = share(tasks, runtime.store, sharing, runtime.events, progress, started)
        finally:
            if plan is not None:
                plan.close()
    finally:
        if installed_here:
            activation.uninstall()
    return WarmupReport(items)


def install_for_own_manifest(store: str | None) -> None:
    """Install tune mode for ``tunevault warmup``, which warms up the manifest it is given: a
    ``TUNEVAULT_WARMUP`` in the environment is not taken, else the first key's store lookup would
    warm that other manifest up too, nested in this walk and in none of its counts (the command
    says it is ignored: ``ignored_warmup_var``)."""
    from dataclasses import replace

    from tunevault.integration import activation
    from tunevault.policy.settings import Settings

    settings = Settings.for_install(mode="tune", store=store, on_miss="tune")
    activation.install(replace(settings, warmup=None))


def ignored_warmup_var(command: str) -> None:
    """One info line where ``TUNEVAULT_WARMUP`` is set: ``command`` warms up its own manifest instead."""
    pending = os.environ.get("TUNEVAULT_WARMUP")
    if pending:
        log.info("tunevault: TUNEVAULT_WARMUP=%s ignored: %s warms up its own manifest", pending, command)


def warm_up_pending(runtime: Runtime, path: str) -> None:
    """``TUNEVAULT_WARMUP``: run at the process's first store lookup; never raises into the call."""
    from tunevault.integration.triton_adapter import runtime as installed

    if installed() is not runtime:
        return
    if runtime.sealed:
        log.warning("tunevault: TUNEVAULT_WARMUP=%s not run: the process sealed before its first miss", path)
        return
    try:
        report = warmup(path)
    except Exception as exc:
        log.warning("tunevault: TUNEVAULT_WARMUP=%s failed (%s: %s); keys are tuned as they are met",
                    path, type(exc).__name__, exc)
        return
    counts = report.counts()
    log.info("tunevault: warmup of %s: %d tuned here, %d decided, %d skipped, %d failed", path,
             counts["tuned"], counts["decided"], counts["skipped"], counts["failed"])
