"""``tunevault warmup MANIFEST --jobs N [--devices 0,1]``: N processes share one manifest's keys.

Each child runs the shared warmup (integration/shared_warmup.py) on the same store, pinned to
one GPU through ``CUDA_VISIBLE_DEVICES`` (or, on a CPU, as one more interpreter process); they
divide the keys through the store's leases, so no child waits for another while work is left,
and a child that dies loses its keys to the others when its leases expire. This process only
starts them, shows one progress display for all of them and prints the summary.

Children report on stdout, one ``@tunevault-warmup {json}`` line per event; anything else they
print is ignored, and the tail of their stderr is shown when one fails. Every child reads the
manifest up to the length this process saw (a capture may still append to it), so all count the
same keys. Children exit when this process goes: Ctrl-C, SIGTERM and SIGHUP stop them (SIGKILL
after a grace period), and each child exits when its stdin, a pipe from here, closes.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tunevault.cli.warmup_board import Board, WorkerView, display

MARK = "@tunevault-warmup "
RUN_VAR = "TUNEVAULT_WARMUP_RUN"  # shared_warmup.RUN_VAR, spelled out: this process imports no torch
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")  # unless the user set them
# Each process is an interpreter that imports torch and Triton: more than this is a typo, not a plan
# (--jobs 99999999999999999999 built a list until memory ran out). 256 is 32 per GPU of an 8-GPU host.
MAX_JOBS = 256
STOP_GRACE_S = 5.0  # after SIGTERM, how long children get to exit before SIGKILL


class Stopped(BaseException):
    """SIGTERM or SIGHUP reached this process: stop the children as Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", nargs="?", const="auto", metavar="N",
                        help=f"share the keys among N tuning processes, at most {MAX_JOBS} (default: one "
                             "per visible GPU, or one per CPU core under the interpreter)")
    parser.add_argument("--devices", metavar="0,1,...",
                        help="the GPUs to tune on, as this process sees them (default: all visible); implies "
                             "--jobs, one process per GPU listed unless --jobs says how many")


def plan(jobs: str | None, devices: str | None, visible: int | None = None) -> list[str | None]:
    """Each child's ``CUDA_VISIBLE_DEVICES`` value (None: no GPU), one entry per child.

    ``visible``: how many GPUs this process sees (default: counted without torch). ``--devices``
    naming a GPU that is not there is a ValueError (exit 2): its child would tune nothing."""
    from tunevault.core.machine import gpu_count  # no torch: each child starts that much sooner
    from tunevault.engine.procs import physical_device

    count_visible = gpu_count() if visible is None else visible
    if devices:
        try:
            gpus = [int(d) for d in devices.split(",") if d.strip()]
        except ValueError:
            raise ValueError(f"--devices takes GPU indices such as 0,1; got {devices!r}") from None
        if not gpus or min(gpus) < 0:
            raise ValueError(f"--devices takes GPU indices such as 0,1; got {devices!r}")
        if count_visible == 0:
            raise ValueError(f"--devices {devices}: this machine has no GPU visible here (no CUDA device, "
                             "or Triton's interpreter); leave --devices out to tune on CPU processes")
        missing = sorted({g for g in gpus if g >= count_visible})
        if missing:
            raise ValueError(f"--devices {devices}: no GPU {', '.join(map(str, missing))} here; this process "
                             f"sees {count_visible} GPU(s), numbered 0 to {count_visible - 1}")
    else:
        gpus = list(range(count_visible))
    from tunevault.core.machine import available_cores

    if jobs in (None, "auto"):
        count = len(gpus) or min(available_cores(), MAX_JOBS)  # a 512-core host: 256 interpreters are plenty
    else:
        text = str(jobs).strip()
        # ASCII digits only ('²' passes isdigit, int() refuses it), and few enough that int() converts them.
        count = int(text) if text.isascii() and text.isdigit() and len(text) <= 6 else 0
        if not 1 <= count <= MAX_JOBS:
            raise ValueError(f"--jobs takes a number of processes from 1 to {MAX_JOBS}; got {jobs!r}")
    physical = [physical_device(g) for g in gpus]
    return [physical[i % len(physical)] if physical else None for i in range(count)]


def _child_command(args: argparse.Namespace, gpu: str | None, snapshot: int) -> list[str]:
    cmd = [sys.executable, "-m", "tunevault.cli.warmup_child", args.manifest, "--bytes", str(snapshot),
           "--exit-with-stdin"]
    if args.store:
        cmd += ["--store", args.store]
    if args.retry_before is not None:
        cmd += ["--retry-before", repr(args.retry_before)]
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
           snapshot: int, procs: list[subprocess.Popen[str]], run_dir: str) -> dict[int, deque[str]]:
    """Start every child at once: each one's start-up (interpreter, torch, CUDA) runs in parallel.
    ``run_dir``: where they tell each other the kernel digests they computed in this run."""
    from tunevault.capture.locate import ALLOW_VAR
    from tunevault.cli.warmup_child import SPAWNED_VAR

    base = {**os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), *map(os.path.abspath, args.path),
                                                      os.environ.get("PYTHONPATH", "")] if p),
            RUN_VAR: run_dir}
    base.pop("TUNEVAULT_WARMUP", None)  # they warm up this manifest, not that one (cmd_warmup said so)
    if args.allow_module is not None:  # validated by cmd_warmup, as for a single process
        base[ALLOW_VAR] = ",".join(args.allow_module)
    tails: dict[int, deque[str]] = {}
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
        # stdin: a pipe nobody writes to; it closes when this process exits, however it exits
        proc = subprocess.Popen(_child_command(args, worker.device, snapshot), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        worker.pid, tails[worker.index] = proc.pid, deque(maxlen=30)
        procs.append(proc)
        threading.Thread(target=_read, args=(worker, proc, events, tails[worker.index]), daemon=True).start()
    return tails


def _stop(procs: list[subprocess.Popen[str]], grace_s: float = STOP_GRACE_S) -> None:
    """Terminate every child, then kill those still there after ``grace_s``: stopping never hangs
    on a child stuck in a kernel or a driver call."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def _stop_signals() -> Iterator[list[bool]]:
    """SIGTERM and SIGHUP (systemd, Kubernetes, ``timeout``, a closed terminal) raise Stopped, so
    they take the Ctrl-C path: the children are stopped, not left running. Once the caller sets
    the yielded flag (it is stopping them), a repeated signal does not interrupt that."""
    stopping = [False]

    def raise_stopped(signum: int, _frame: object) -> None:
        if not stopping[0]:
            stopping[0] = True
            raise Stopped(signum)

    wanted = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, raise_stopped) for s in wanted}
    try:
        yield stopping
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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
    snapshot = os.stat(args.manifest).st_size  # what every process reads: the file may still grow
    events: queue.Queue[tuple[WorkerView, dict[str, Any]]] = queue.Queue()
    procs: list[subprocess.Popen[str]] = []
    with _stop_signals() as stopping:
        try:
            tails = _spawn(args, workers, events, snapshot, procs, run_dir)
            spawned_s = time.monotonic() - began
            entries, malformed = read_manifest(args, upto=snapshot)
            board = Board(len(entries), workers, started=began, spawn_s=spawned_s,
                          order={Board.ident(e.kernel, e.key.to_json()): i for i, e in enumerate(entries)})
            _follow(board, events, len(procs), quiet=args.json)
        except (KeyboardInterrupt, Stopped) as exc:
            stopping[0] = True
            _stop(procs)
            print("tunevault warmup: interrupted" if isinstance(exc, KeyboardInterrupt)
                  else f"tunevault warmup: stopped by {signal.Signals(exc.signum).name}", file=sys.stderr)
            return 130 if isinstance(exc, KeyboardInterrupt) else 128 + exc.signum
        except BaseException:
            stopping[0] = True
            _stop(procs)
            raise
    return _summary(args, board, tails, malformed)


def _follow(board: Board, events: queue.Queue[tuple[WorkerView, dict[str, Any]]], running: int, quiet: bool) -> None:
    """Show the children's progress until every one has exited."""
    screen = display(board, quiet=quiet)
    try:
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
    finally:
        screen.close()


def _summary(args: argparse.Namespace, board: Board, tails: dict[int, deque[str]],
             malformed: list[tuple[int, str]]) -> int:
    from tunevault.cli.output import print_json, print_table
    from tunevault.cli.serving_cmds import malformed_json

    dead = [w for w in board.workers if w.exit_code not in (0, 1) or not w.finished]
    for w in dead:
        others = [o for o in board.workers if o is not w and o.exit_code in (0, 1) and o.finished]
        fate = ("its keys went to the others as its leases expired" if others
                else "no other process was left to take its keys; run the warmup again")
        print(f"tunevault warmup: {w.label} (pid {w.pid}) exited with status {w.exit_code}; {fate}. "
              f"Its last messages:\n  " + "\n  ".join(tails[w.index]), file=sys.stderr)
    ok = board.ok and not malformed
    if malformed:
        print("tunevault warmup: malformed line(s) skipped: " + ", ".join(f"{args.manifest}:{n}: {why}"
                                                                         for n, why in malformed[:10]), file=sys.stderr)
    if args.json:
        print_json({**board.to_json(), "ok": ok, "malformed": malformed_json(malformed)})
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
