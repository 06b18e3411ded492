"""Threads tuning different keys of one kernel never see each other's arguments.

Stock Triton keeps the call's arguments on the shared Autotuner (``self.nargs``), so a second thread
can swap them under the first one's hooks and pruning. Triton's interpreter itself is not thread-safe
(its grid state is global), so the launches below take turns on a lock; everything above the launch
(key, lookup, pruning, hooks, benchmarking loop, store) runs in eight threads at once.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch
import triton

import kernels_core as kc
from conftest import in_fork, in_fork_while_held
from tunevault.core.events import COUNTERS
from tunevault.core.kernel_state import STATE_ATTR


@contextlib.contextmanager
def serialized_launches(*kernels: Any) -> Iterator[None]:
    lock = threading.Lock()
    patched = []
    for kernel in kernels:
        fn = kernel.fn
        while type(fn).__name__ in ("Heuristics", "Autotuner"):
            fn = fn.fn
        original = fn.run

        def run(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            with lock:
                return _original(*args, **kwargs)

        fn.run = run
        patched.append(fn)
    try:
        yield
    finally:
        for fn in patched:
            del fn.run


def test_eight_threads_with_different_keys_get_their_own_results(tv: Any, sqlite_url: str) -> None:
    kc.clear()
    threads_n = 8
    barrier = threading.Barrier(threads_n)
    keep: dict[int, dict[str, torch.Tensor]] = {}  # tensors stay alive: their addresses identify them
    errors: list[BaseException] = []
    ok: dict[int, list[bool]] = {}

    def work(i: int) -> None:
        n = 16 + 8 * i
        t = keep[i] = {"x": kc.vec(n, seed=i), "acc": torch.full((n,), 5.0), "out": torch.zeros(n),
                       "hooked": torch.zeros(n)}
        try:
            barrier.wait()
            results = []
            for round_ in range(3):  # tune once, then hits, all interleaved with the other threads
                t["acc"].fill_(5.0 if round_ == 0 else 0.0)  # tuning resets acc (reset_to_zero); hits don't
                kc.accumulate[kc.grid(n)](t["x"], t["acc"], n)
                results.append(torch.equal(t["acc"], t["x"]))
                kc.pruned[kc.grid(n)](t["x"], t["out"], n)  # early_config_prune sees this thread's args
                results.append(torch.equal(t["out"], t["x"] + 1))
                kc.hooked[kc.grid(n)](t["x"], t["hooked"], n)  # user hooks zero this thread's output
            results.append(torch.equal(t["hooked"], t["x"] * 3))  # zeroed by the last tuning run, then +x, +x
            ok[i] = results
        except BaseException as exc:  # reported below with the thread's number
            errors.append(exc)

    with serialized_launches(kc.accumulate, kc.pruned, kc.hooked):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    assert ok == {i: [True] * 7 for i in range(threads_n)}, ok

    own = {(keep[i]["x"].data_ptr(), 16 + 8 * i) for i in range(threads_n)}
    assert {(ptr, n) for n, ptr, _kw in kc.SEEN["prune"]} <= own  # pruning never saw a foreign tensor
    hooked = {(keep[i]["hooked"].data_ptr(), 16 + 8 * i) for i in range(threads_n)}
    assert {(p, n) for p, n, _b, _r in kc.SEEN["pre"]} <= hooked
    assert {(p, n) for p, n, _b, _e in kc.SEEN["post"]} <= hooked

    from tunevault.store.sqlite import SqliteStore

    store = SqliteStore(sqlite_url.removeprefix("sqlite://"))
    from tunevault.policy.stock import single_pruned_skips_benchmark

    # Every thread's keys, for every kernel, stored; except where pruning leaves one config and this
    # Triton then decides without benchmarking (as stock does): nothing measured, nothing to store.
    alone = sum(1 for i in range(threads_n) if 16 + 8 * i < 32) if single_pruned_skips_benchmark() else 0
    assert store.count() == 3 * threads_n - alone
    store.close()


def test_a_fork_while_another_thread_tunes_a_kernel_leaves_that_kernel_usable_in_the_child(tv: Any) -> None:
    """The kernel's lock is held for a whole tuning; a thread holding it at a fork does not exist in
    the child, whose first miss of that kernel then waited for it forever."""
    parent, tuning, release = os.getpid(), threading.Event(), threading.Event()

    def hold_in_parent(configs: list, nargs: dict, **kwargs: Any) -> list:
        if threading.current_thread().name == "holder" and os.getpid() == parent:
            tuning.set()
            release.wait(120)
        return configs

    kernel = triton.autotune(configs=kc._three(16, 32, 64), key=["n"],
                             prune_configs_by={"early_config_prune": hold_in_parent})(kc.add_one.fn)
    x = kc.vec(40)
    holder = threading.Thread(target=lambda: kernel[kc.grid(40)](x, torch.empty_like(x), 40), name="holder")
    holder.start()
    try:
        assert tuning.wait(120)  # the holder tunes n=40, holding the kernel's lock

        def child() -> dict[str, object]:
            lock = kernel.__dict__[STATE_ATTR].lock
            seen: dict[str, object] = {"free": lock.acquire(blocking=False)}
            if seen["free"]:
                lock.release()
                y, out = kc.vec(24), torch.empty(24)
                kernel[kc.grid(24)](y, out, 24)  # a miss: tuned here
                seen["right"] = bool(torch.equal(out, y + 1))
            return seen

        seen = in_fork(child)
    finally:
        release.set()
        holder.join(timeout=120)
    assert seen == {"free": True, "right": True}


def test_a_fork_while_another_thread_holds_the_runtimes_lock_leaves_it_usable_in_the_child(tv: Any) -> None:
    """The runtime's lock is held while the store opens and for the damage check; a thread holding
    it at a fork does not exist in the child, whose next miss then waited for it forever."""
    from tunevault.integration.triton_adapter import runtime

    rt = runtime()
    assert rt is not None

    def child() -> dict[str, object]:
        free = rt._lock.acquire(blocking=False)
        if free:
            rt._lock.release()
            y, out = kc.vec(24), torch.empty(24)
            kc.add_one[kc.grid(24)](y, out, 24)  # a miss: the store, the runtime's lock
            return {"free": True, "right": bool(torch.equal(out, y + 1))}
        return {"free": False}

    assert in_fork_while_held([rt._lock], child) == {"free": True, "right": True}


def test_a_fork_while_another_thread_counts_or_logs_an_event_leaves_both_usable_in_the_child(tv: Any) -> None:
    """The counters' and the event log's locks are held only for a moment, but a fork in that
    moment left the child's next miss (which counts and logs) waiting forever."""
    from tunevault.integration.triton_adapter import runtime

    rt = runtime()
    assert rt is not None

    def child() -> dict[str, object]:
        seen: dict[str, object] = {}

        def miss() -> None:
            y, out = kc.vec(24), torch.empty(24)
            kc.add_one[kc.grid(24)](y, out, 24)  # a miss: counted, and events logged
            seen["right"] = bool(torch.equal(out, y + 1))

        worker = threading.Thread(target=miss, daemon=True)
        worker.start()
        worker.join(60)  # a deadlocked child must still answer
        return {"returned": not worker.is_alive(), **seen}

    assert in_fork_while_held([rt.stats._lock, rt.events._lock], child) == {"returned": True, "right": True}


def test_a_forked_childs_stats_count_its_own_calls_only(tv: Any) -> None:
    """Summing the workers' stats() must not count the parent's calls again (a forked child's key
    capture writes only the keys it met itself, likewise)."""
    y, out = kc.vec(24), torch.empty(24)
    for _ in range(3):
        kc.add_one[kc.grid(24)](y, out, 24)  # a tuning, then two in-memory hits

    def child() -> dict[str, object]:
        kc.add_one[kc.grid(24)](y, out, 24)
        return tv.stats()["kernels"]["total"]

    assert in_fork(child) == {"warmup": {**dict.fromkeys(COUNTERS, 0), "hits": 1},
                              "serving": dict.fromkeys(COUNTERS, 0)}
    parent = tv.stats()["kernels"]["total"]["warmup"]
    assert parent["hits"] == 2 and parent["tunings"] == 1


def test_threads_meeting_a_new_key_at_once_are_counted_as_one_tuning_and_hits(tv: Any, tmp_path: Any) -> None:
    """The threads that waited on the kernel's lock while one tuned launched the decision without
    being counted: 8 calls read as 1 tuning and 0 hits, in stats() and in the captured manifest."""
    from tunevault.capture import manifest as mf

    threads_n, n = 8, 40
    barrier = threading.Barrier(threads_n)
    y = kc.vec(n)

    def call() -> None:
        out = torch.empty(n)
        barrier.wait()
        kc.add_one[kc.grid(n)](y, out, n)

    with tv.capture(tmp_path / "keys.jsonl"):
        threads = [threading.Thread(target=call) for _ in range(threads_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    counts = tv.stats()["kernels"]["kernels_core:add_one"]["warmup"]
    assert (counts["tunings"], counts["hits"]) == (1, threads_n - 1)
    (entry,) = mf.read(tmp_path / "keys.jsonl")
    assert (entry.count, entry.counts["tuned"], entry.counts["hit"]) == (threads_n, 1, threads_n - 1)
