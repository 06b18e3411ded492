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
import threading
from collections import deque
from typing import Any

from tunevault.cli.warmup_board import Board, WorkerView, display

MARK = "@tunevault-warmup "
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")  # unless the user set them


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", nargs="?", const="auto", metavar="N",
                        help="share the keys among N tuning processes (default: one per visible GPU, "
                             "or one per CPU core under the interpreter)")
    parser.add_argument("--devices", metavar="0,1,...", help="with --jobs: the GPUs to use (default: all visible)")


def _gpu_count() -> int:
    """Visible GPUs; none under the interpreter (decided from the variable: importing Triton here
    would delay every child's start)."""
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


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
        gpus = list(range(_gpu_count()))
    if jobs in (None, "auto"):
        count = len(gpus) or os.cpu_count() or 1
    elif not str(jobs).isdigit() or int(jobs) < 1:
        raise ValueError(f"--jobs takes a positive number of processes; got {jobs!r}")
    else:
        count = int(jobs)
    physical = [physical_device(g) for g in gpus]
    return [physical[i % len(physical)] if physical else None for i in range(count)]


def _child_command(args: argparse.Namespace, gpu: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "tunevault.cli.warmup_jobs", args.manifest]
    if args.store:
        cmd += ["--store", args.store]
    device = args.device or ("cuda:0" if gpu is not None else None)  # the child sees its GPU as cuda:0
    return cmd + (["--device", device] if device else [])


def _read(worker: WorkerView, proc: subprocess.Popen[str], events: queue.Queue[Any], tail: deque[str]) -> None:
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


def run(args: argparse.Namespace) -> int:
    """The ``--jobs`` path of ``tunevault warmup``: start the children, follow them, summarise.

    The manifest is read here as the single-process path reads it (interpreter switch, import
    path, malformed lines fail the run); the children inherit the import path, the interpreter
    and ``--allow-module`` through their environment."""
    from tunevault.capture.locate import ALLOW_VAR
    from tunevault.cli.serving_cmds import load_manifest

    entries, malformed = load_manifest(args)
    total = len(entries)
    gpus = plan(args.jobs, args.devices)
    board = Board(total, [WorkerView(i, gpu) for i, gpu in enumerate(gpus)])
    events: queue.Queue[Any] = queue.Queue()
    procs, tails = [], {}
    for worker, gpu in zip(board.workers, gpus, strict=True):
        env = {**os.environ, "TUNEVAULT_WARMUP_WORKER": f"{worker.index}/{len(gpus)}",
               "PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), *map(os.path.abspath, args.path),
                                                         os.environ.get("PYTHONPATH", "")] if p)}
        if args.allow_module:
            env[ALLOW_VAR] = ",".join(args.allow_module)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        else:  # interpreter processes: split the cores instead of each one threading over all of them
            threads = str(max(1, (os.cpu_count() or 1) // len(gpus)))
            env.update({var: env.get(var, threads) for var in THREAD_VARS})
        proc = subprocess.Popen(_child_command(args, gpu), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        worker.pid, tails[worker.index] = proc.pid, deque(maxlen=30)
        procs.append(proc)
        threading.Thread(target=_read, args=(worker, proc, events, tails[worker.index]), daemon=True).start()
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
            if kind == "item":
                screen.update(worker, board.settle(worker, msg))
            elif kind == "tuning":
                worker.current = str(msg.get("what", ""))[:80]
            elif kind == "done":
                worker.finished = True
            elif kind == "exit":
                worker.exit_code, running = int(msg["code"]), running - 1
            screen.update()
    except KeyboardInterrupt:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
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


def child_main(argv: list[str] | None = None) -> int:
    """One worker: warm the manifest up on the store, reporting each key as a marked JSON line."""
    p = argparse.ArgumentParser(prog="tunevault-warmup-worker")
    p.add_argument("manifest")
    p.add_argument("--store")
    p.add_argument("--device")
    args = p.parse_args(argv)
    import logging

    import tunevault

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    from tunevault.integration.shared_warmup import warmup

    lock = threading.Lock()

    def say(**msg: Any) -> None:
        with lock:
            sys.stdout.write(MARK + json.dumps(msg, default=str) + "\n")
            sys.stdout.flush()

    tunevault.install(mode="tune", store=args.store, on_miss="tune")
    try:
        report = warmup(args.manifest, device=args.device,
                        progress=lambda done, total, item: say(t="item", **item.to_json()),
                        started=lambda task: say(t="tuning", what=task.what))
    finally:
        tunevault.uninstall()
    say(t="done", ok=report.ok, counts=report.counts())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(child_main())
