"""``tunevault warmup MANIFEST --jobs N [--devices 0,1]``: N processes share one manifest's keys.

Each child runs the shared warmup (integration/shared_warmup.py) on the same store, pinned to
one GPU through ``CUDA_VISIBLE_DEVICES`` (or, on a CPU, as one more interpreter process); they
divide the keys through the store's leases, so no child waits for another while work is left,
and a child that dies loses its keys to the others when its leases expire. This process only
starts them, shows one progress display for all of them and prints the summary.

Children report on stdout, one ``@tunevault-warmup {json}`` line per event; anything else they
print is ignored, and the tail of their stderr is shown when one fails.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from typing import Any

from tunevault.cli.warmup_board import Board, WorkerView, display

MARK = "@tunevault-warmup "
RUN_VAR = "TUNEVAULT_WARMUP_RUN"  # shared_warmup.RUN_VAR, spelled out: this process imports no torch
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")  # unless the user set them


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", nargs="?", const="auto", metavar="N",
                        help="share the keys among N tuning processes (default: one per visible GPU, "
                             "or one per CPU core under the interpreter)")
    parser.add_argument("--devices", metavar="0,1,...", help="with --jobs: the GPUs to use (default: all visible)")


def plan(jobs: str | None, devices: str | None) -> list[str | None]:
    """Each child's ``CUDA_VISIBLE_DEVICES`` value (None: no GPU), one entry per child."""
    from tunevault.engine.procs import physical_device

    if devices:
        try:
            gpus = [int(d) for d in devices.split(",") if d.strip()]
        except ValueError:
            raise ValueError(f"--devices takes GPU indices such as 0,1; got {devices!r}") from None
        if not gpus or min(gpus) < 0:
            raise ValueError(f"--devices takes GPU indices such as 0,1; got {devices!r}")
    else:
        from tunevault.core.machine import gpu_count  # no torch: each child starts that much sooner

        gpus = list(range(gpu_count()))
    from tunevault.core.machine import available_cores

    if jobs in (None, "auto"):
        count = len(gpus) or available_cores()
    elif not str(jobs).isdigit() or int(jobs) < 1:
        raise ValueError(f"--jobs takes a positive number of processes; got {jobs!r}")
    else:
        count = int(jobs)
    physical = [physical_device(g) for g in gpus]
    return [physical[i % len(physical)] if physical else None for i in range(count)]


def _child_command(args: argparse.Namespace, gpu: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "tunevault.cli.warmup_child", args.manifest]
    if args.store:
        cmd += ["--store", args.store]
    device = args.device or ("cuda:0" if gpu is not None else None)  # the child sees its GPU as cuda:0
    return cmd + (["--device", device] if device else [])


def _read(worker: WorkerView, proc: subprocess.Popen[str], events: queue.Queue[tuple[WorkerView, dict[str, Any]]],
          tail: deque[str]) -> None:
    def stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line.rstrip("\n"))

    threading.Thread(target=stderr, daemon=True).start()
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(MARK):
            try:
                events.put((worker, json.loads(line[len(MARK):])))
            except ValueError:
                continue
    events.put((worker, {"t": "exit", "code": proc.wait()}))


def _spawn(args: argparse.Namespace, workers: list[WorkerView], events: queue.Queue[tuple[WorkerView, dict[str, Any]]],
           run_dir: str) -> tuple[list[subprocess.Popen[str]], dict[int, deque[str]]]:
    """Start every child at once: each one's start-up (interpreter, torch, CUDA) runs in parallel.
    ``run_dir``: where they tell each other the kernel digests they computed in this run."""
    from tunevault.capture.locate import ALLOW_VAR
    from tunevault.cli.warmup_child import SPAWNED_VAR

    base = {**os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), *map(os.path.abspath, args.path),
                                                      os.environ.get("PYTHONPATH", "")] if p),
            RUN_VAR: run_dir}
    if args.allow_module:
        base[ALLOW_VAR] = ",".join(args.allow_module)
    procs, tails = [], {}
    for worker in workers:
        env = {**base, "TUNEVAULT_WARMUP_WORKER": f"{worker.index}/{len(workers)}"}
        if worker.device is not None:
            env["CUDA_VISIBLE_DEVICES"] = worker.device
        else:  # interpreter processes: split the cores instead of each one threading over all of them
            from tunevault.core.machine import available_cores

            threads = str(max(1, available_cores() // len(workers)))
            env.update({var: env.get(var, threads) for var in THREAD_VARS})
        env[SPAWNED_VAR] = repr(time.time())  # the child measures its start-up from here
        worker.spawned = time.monotonic()
        proc = subprocess.Popen(_child_command(args, worker.device), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        worker.pid, tails[worker.index] = proc.pid, deque(maxlen=30)
        procs.append(proc)
        threading.Thread(target=_read, args=(worker, proc, events, tails[worker.index]), daemon=True).start()
    return procs, tails


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait()


def run(args: argparse.Namespace) -> int:
    """The ``--jobs`` path of ``tunevault warmup``: start the children, follow them, summarise.

    The children start first; the manifest is read here meanwhile, for the progress display and
    its malformed lines (a manifest without a valid key stops them and fails the run, as the
    single-process path does). They inherit the import path and ``--allow-module`` through their
    environment, and each decides on Triton's interpreter itself, as the single-process path does,
    where the check initialises the CUDA driver it needs anyway. A folder private to this run lets
    the children trust each other's digests (never an earlier run's decisions by name alone)."""
    with tempfile.TemporaryDirectory(prefix="tunevault-warmup-") as run_dir:
        return _run(args, run_dir)


def _run(args: argparse.Namespace, run_dir: str) -> int:
    from tunevault.cli.serving_cmds import read_manifest

    began = time.monotonic()
    workers = [WorkerView(i, gpu) for i, gpu in enumerate(plan(args.jobs, args.devices))]
    events: queue.Queue[tuple[WorkerView, dict[str, Any]]] = queue.Queue()
    procs, tails = _spawn(args, workers, events, run_dir)
    spawned_s = time.monotonic() - began
    try:
        entries, malformed = read_manifest(args)
    except BaseException:
        _stop(procs)
        raise
    board = Board(len(entries), workers, started=began, spawn_s=spawned_s)
    screen = display(board, quiet=args.json)
    try:
        running = len(procs)
        while running:
            try:
                worker, msg = events.get(timeout=1.0)
            except queue.Empty:
                screen.update()
                continue
            kind = msg.get("t")
            if kind == "ready":
                worker.ready(msg)
            elif kind == "item":
                screen.update(worker, board.settle(worker, msg))
            elif kind == "tuning":
                worker.current = str(msg.get("what", ""))[:80]
            elif kind == "done":
                worker.finished, worker.done_at = True, time.monotonic()
            elif kind == "exit":
                worker.exit_code, worker.exit_at, running = int(msg["code"]), time.monotonic(), running - 1
            screen.update()
    except KeyboardInterrupt:
        _stop(procs)
        print("tunevault warmup: interrupted", file=sys.stderr)
        return 130
    finally:
        screen.close()
    return _summary(args, board, tails, malformed)


def _summary(args: argparse.Namespace, board: Board, tails: dict[int, deque[str]],
             malformed: list[tuple[int, str]]) -> int:
    from tunevault.cli.output import print_json, print_table

    dead = [w for w in board.workers if w.exit_code not in (0, 1) or not w.finished]
    for w in dead:
        print(f"tunevault warmup: {w.label} (pid {w.pid}) exited with status {w.exit_code}; its keys went to "
              f"the others as its leases expired. Its last messages:\n  " + "\n  ".join(tails[w.index]),
              file=sys.stderr)
    ok = board.ok and not malformed
    if malformed:
        print("tunevault warmup: malformed line(s) skipped: " + ", ".join(f"{args.manifest}:{n}: {why}"
                                                                         for n, why in malformed[:10]), file=sys.stderr)
    if args.json:
        print_json({**board.to_json(), "ok": ok})
        return 0 if ok else 1
    odd = [k for k in board.keys.values() if k.status in ("skipped", "failed")]
    if odd:
        print_table(["kernel", "key", "status", "reason"], [[k.kernel, k.describe, k.status, k.reason] for k in odd],
                    title="keys not tuned")
    c = board.counts()
    unsettled = board.total - board.done
    share = ", ".join(f"{w.label}: {w.tuned}" for w in board.workers)
    print(f"warmup: {c['tuned']} tuned, {c['decided']} already decided, {c['skipped']} skipped, {c['failed']} "
          f"failed" + (f", {unsettled} not settled" if unsettled else "")
          + f" ({len(board.workers)} processes, {board.elapsed():.1f} s; tuned per process: {share})")
    return 0 if ok else 1
