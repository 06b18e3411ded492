"""Threads tuning different keys of one kernel never see each other's arguments.

Stock Triton keeps the call's arguments on the shared Autotuner (``self.nargs``), so a second thread
can swap them under the first one's hooks and pruning. Triton's interpreter itself is not thread-safe
(its grid state is global), so the launches below take turns on a lock; everything above the launch
(key, lookup, pruning, hooks, benchmarking loop, store) runs in eight threads at once.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

import kernels_core as kc


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
    assert store.count() == 3 * threads_n  # every thread's keys, for every kernel, stored
    store.close()
