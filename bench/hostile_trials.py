"""The child of bench/hostile.py: trials ``start..count-1`` of one category, one JSON line each.

    hostile_trials.py CATEGORY SEED START COUNT WORKDIR

Run with ``tests/`` and ``src/`` on the import path (bench/hostile.py sets it up).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hostile_docs as hd
import kernels_hostile as kh
import slow_faults as sf
import tunevault
from tunevault.integration.triton_adapter import runtime
from tunevault.store.redis import DEADLINE_S

N = kh.SIZES[0]
REDIS_OPS = {"tune": 12, "fallback": 4}  # remote operations a miss may make (docs/robustness.md)
ALLOW = ("--allow-module", "kernels_hostile")


class Trial:
    """What one trial saw; ``row()`` is its JSON line."""

    def __init__(self, category: str, index: int, allowance: float) -> None:
        self.category, self.index, self.allowance = category, index, allowance
        self.crash: str | None = None
        self.stall = False
        self.undeclared = 0
        self.call_s = 0.0
        self.bound_s = 0.0
        self.what = ""

    def call(self, policy: str, external_s: float = 0.0, kernel: Any = None, **options: Any) -> Any:
        """One kernel call in a fresh runtime; returns the runtime's decisions (for checks)."""
        kernel = kernel or kh.add_one
        self.bound_s = external_s + self.allowance
        tunevault.install(mode="tune", on_miss=policy, **options)
        try:
            with kh.launches(kernel) as seen:
                started = time.perf_counter()
                out = kh.run(kernel, N)
                self.call_s = time.perf_counter() - started
            decided = list(runtime().decided.values())
        except Exception as exc:
            self.crash = f"kernel call raised {type(exc).__name__}: {str(exc)[:300]}"
            return []
        finally:
            tunevault.uninstall()
        if not bool((out == kh.expected(N)).all()):
            self.crash = "wrong result"
        self.undeclared += len(seen.undeclared())
        self.stall = self.stall or self.call_s > self.bound_s
        return decided

    def cli(self, *argv: str, stdin: bytes = b"", expect: tuple[int, ...] = (0, 1, 2)) -> None:
        try:
            code, _, _ = hd.cli(*argv, stdin=stdin)
        except hd.Traceback as exc:
            self.crash = self.crash or str(exc)
            return
        if code not in expect:
            self.crash = self.crash or f"tunevault {' '.join(argv)[:200]} exited {code}, expected {expect}"

    def row(self) -> dict[str, Any]:
        return {"category": self.category, "trial": self.index, "what": self.what, "crash": self.crash,
                "stall": self.stall, "undeclared": self.undeclared, "call_s": round(self.call_s, 4),
                "bound_s": round(self.bound_s, 3)}


def seeds(work: Path) -> dict[str, Any]:
    """Valid documents from a real call: a decision, a bundle, a manifest line, an event."""
    from tunevault.core.identity import current_fingerprint
    from tunevault.store.bundle import make_bundle

    tunevault.install(mode="tune", store="memory://", capture=str(work / "seed.jsonl"), events=str(work / "ev.jsonl"))
    kh.call_checked(kh.add_one, N)
    (decision,) = runtime().decided.values()
    tunevault.uninstall()
    return {"decision": decision, "json": decision.to_json(), "bundle": make_bundle([decision], current_fingerprint()),
            "line": json.loads((work / "seed.jsonl").read_text().splitlines()[0]),
            "event": json.loads((work / "ev.jsonl").read_text().splitlines()[0])}


def clean_seconds() -> float:
    """This machine's time for a clean miss (tuning, or a fallback), the larger of the two."""
    worst = 0.0
    for policy in ("tune", "fallback"):
        tunevault.install(mode="tune", store="memory://", on_miss=policy)
        started = time.perf_counter()
        kh.run(kh.add_one, N)
        worst = max(worst, time.perf_counter() - started)
        tunevault.uninstall()
    return worst


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


# -- mutated documents -----------------------------------------------------------------------

def sqlite_row(t: Trial, rng: random.Random, valid: dict[str, Any], work: Path) -> None:
    from tunevault.store.sqlite import SqliteStore

    raw = hd.mutate(rng, valid["json"]).encode("utf-8", "surrogatepass")
    path = work / f"r{t.index}.db"
    SqliteStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO decisions VALUES (?, ?, ?, ?, CAST(? AS TEXT), ?)",
                   (*valid["decision"].store_key, valid["decision"].kernel.name, raw, 1.0))
    url = f"sqlite:///{path}"
    t.call(rng.choice(["tune", "fallback"]), store=url)
    for argv in (("ls",), ("show", "add_one"), ("export", "-")):
        t.cli("--store", url, *argv)


def redis_entry(t: Trial, rng: random.Random, valid: dict[str, Any], work: Path) -> None:
    import redis

    from tunevault.store.redis import INDEXES, entry_key, index_key

    url = REDIS["url"]
    kd, fd, kt = valid["decision"].store_key
    client = redis.Redis.from_url(url)
    client.flushall()
    client.set(entry_key(kd, fd, kt), hd.mutate(rng, valid["json"]).encode("utf-8", "surrogatepass"))
    client.sadd(index_key(kd, fd), entry_key(kd, fd, kt))
    client.sadd(INDEXES, f"{kd}:{fd}")
    client.close()
    policy = rng.choice(["tune", "fallback"])
    t.call(policy, REDIS_OPS[policy] * DEADLINE_S, store="memory://", remote=url)
    for argv in (("ls",), ("show", "add_one")):
        t.cli("--store", url, *argv)


def bundle(t: Trial, rng: random.Random, valid: dict[str, Any], work: Path) -> None:
    from tunevault.store.bundle import signature

    doc, key = dict(valid["bundle"]), rng.choice([None, "k"])
    if rng.random() < 0.5:
        doc["signature"] = {"alg": "hmac-sha256", "hmac": signature(doc, "k")}
    path = write(work / "bundle.json", hd.mutate(rng, doc))
    t.call(rng.choice(["tune", "fallback"]), store="memory://", bundles=str(path), bundle_key=key)
    with hd.env(TUNEVAULT_BUNDLE_KEY=key):
        t.cli("--store", "memory://", "import", str(path))
        t.cli("diff", str(path), str(path))
        t.cli("--store", "memory://", "import", "-", stdin=path.read_bytes())


def manifest(t: Trial, rng: random.Random, valid: dict[str, Any], work: Path) -> None:
    from tunevault.store.bundle import ALGORITHM, signature

    line, key = {k: v for k, v in valid["line"].items() if k != "signature"}, rng.choice([None, "k"])
    if key:
        line["signature"] = {"alg": ALGORITHM, "hmac": signature(line, key)}
    path = write(work / "keys.jsonl", json.dumps(line) + "\n" + hd.mutate(rng, line) + "\n")
    with hd.env(TUNEVAULT_BUNDLE_KEY=key), kh.launches(kh.add_one) as seen:
        t.cli("--store", "memory://", "check", str(path), *ALLOW)
        t.cli("--store", "memory://", "warmup", str(path), *ALLOW, "--json")
    t.undeclared += len(seen.undeclared())


def events(t: Trial, rng: random.Random, valid: dict[str, Any], work: Path) -> None:
    path = write(work / "events.jsonl", "\n".join([json.dumps(valid["event"])] + [hd.mutate(rng, valid["event"])
                                                                                   for _ in range(3)]) + "\n")
    t.cli("report", str(path))
    t.cli("report", str(path), "--json")


# -- slow faults ------------------------------------------------------------------------------

def _fifo(work: Path, name: str) -> str:
    path = work / name
    if path.exists():
        path.unlink()
    return str(sf.fifo(path))


def _redis(server: type, policy: str) -> Callable[[Trial, Path], None]:
    def run(t: Trial, work: Path) -> None:
        with server() as fake:
            t.call(policy, REDIS_OPS[policy] * DEADLINE_S, store="memory://", remote=fake.url)
    return run


def _bundle_path(make: Callable[[Path], str], policy: str) -> Callable[[Trial, Path], None]:
    return lambda t, work: t.call(policy, store=f"sqlite:///{work / 'l.db'}", bundles=make(work))


def _forging(t: Trial, work: Path) -> None:
    """Isolated tuning waits on the worker for at most ``tune_timeout`` (300 s by default)."""
    decided = t.call("tune", 300.0, kernel=kh.forging, store="memory://", isolate=True)
    if any(c.timings and min(c.timings) <= 0 for d in decided for c in d.candidates):
        t.crash = "a forged 0 ms worker result was recorded"


def _read_only(t: Trial, work: Path) -> None:
    src = work / "ro-src"
    src.mkdir(exist_ok=True)
    tunevault.install(mode="tune", store=f"sqlite:///{src / 's.db'}")
    kh.run(kh.add_one, N)
    tunevault.uninstall()
    with sf.read_only_copy(src, work / f"ro{t.index}") as ro:
        t.call("tune", store=f"sqlite:///{ro / 's.db'}")


def _full(t: Trial, work: Path) -> None:
    with sf.small_filesystem(work / f"full{t.index}") as full:
        fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            os.close(fd)
        t.call("tune", store=f"sqlite:///{full / 's.db'}", events=str(full / "e.jsonl"), capture=str(full / "k.jsonl"))


def _dangling(t: Trial, work: Path) -> None:
    link = work / f"link{t.index}.db"
    os.symlink(work / "nowhere" / "t.db", link)
    t.call("tune", store=f"sqlite:///{link}")
    if (work / "nowhere").exists():
        t.crash = "the dangling symlink's target was created"


def _empty_key(t: Trial, work: Path) -> None:
    try:
        tunevault.install(mode="tune", store="memory://", bundle_key="")
        t.crash = "an empty key was accepted"
    except ValueError:
        pass
    finally:
        tunevault.uninstall()
    with hd.env(TUNEVAULT_BUNDLE_KEY=""):
        t.cli("--store", "memory://", "import", str(work / "missing.json"), expect=(2,))


def _cli_on(path: Callable[[Path], str], *argv: str) -> Callable[[Trial, Path], None]:
    return lambda t, work: t.cli(*[a.replace("PATH", path(work)) for a in argv], expect=(2,))


FAULTS: list[tuple[str, Callable[[Trial, Path], None]]] = [
    ("trickling redis, tune", _redis(sf.TrickleServer, "tune")),
    ("trickling redis, fallback", _redis(sf.TrickleServer, "fallback")),
    ("silent redis, tune", _redis(sf.SilentServer, "tune")),
    ("silent redis, fallback", _redis(sf.SilentServer, "fallback")),
    ("FIFO bundle, tune", _bundle_path(lambda w: _fifo(w, "b.fifo"), "tune")),
    ("FIFO bundle, fallback", _bundle_path(lambda w: _fifo(w, "b.fifo"), "fallback")),
    ("/dev/zero bundle", _bundle_path(lambda w: "/dev/zero", "tune")),
    ("directory bundle", _bundle_path(lambda w: str(w), "fallback")),
    ("FIFO events sink", lambda t, w: t.call("tune", store="memory://", events=_fifo(w, "e.fifo"))),
    ("/dev/full events sink", lambda t, w: t.call("tune", store="memory://", events="/dev/full")),
    ("FIFO capture sink", lambda t, w: t.call("tune", store="memory://", capture=_fifo(w, "c.fifo"))),
    ("dangling symlink store", _dangling),
    ("read-only store", _read_only),
    ("full file system", _full),
    ("worker hook forging results", _forging),
    ("empty bundle key", _empty_key),
    ("FIFO manifest, check", _cli_on(lambda w: _fifo(w, "m.fifo"), "--store", "memory://", "check", "PATH")),
    ("/dev/zero manifest, warmup", _cli_on(lambda w: "/dev/zero", "--store", "memory://", "warmup", "PATH")),
    ("FIFO events log, report", _cli_on(lambda w: _fifo(w, "r.fifo"), "report", "PATH")),
    ("/dev/zero import", _cli_on(lambda w: "/dev/zero", "--store", "memory://", "import", "PATH")),
    ("FIFO diff", _cli_on(lambda w: _fifo(w, "d.fifo"), "diff", "PATH", "PATH")),
    ("FIFO store", lambda t, w: t.call("tune", store=f"sqlite:///{_fifo(w, 's.fifo')}")),
]
REDIS: dict[str, str] = {}


def main() -> int:
    category, seed, start, count, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
        Path(sys.argv[5])
    work.mkdir(parents=True, exist_ok=True)
    valid, allowance = seeds(work), 3 * clean_seconds() + 1.0
    server = None
    if category == "redis_entry":
        from redis_server import BINARY, RedisServer

        if BINARY is None:
            return 0
        server = RedisServer(work).start()
        REDIS["url"] = server.url
    documents = {"sqlite_row": sqlite_row, "redis_entry": redis_entry, "bundle": bundle, "manifest": manifest,
                 "events": events}
    try:
        for i in range(start, count):
            t = Trial(category, i, allowance)
            rng = random.Random(f"{seed}:{category}:{i}")
            trial_dir = work / f"t{i}"
            trial_dir.mkdir(exist_ok=True)
            try:
                if category == "faults":
                    t.what, run = FAULTS[i % len(FAULTS)]
                    run(t, trial_dir)
                else:
                    documents[category](t, rng, valid, trial_dir)
            except sf.Unavailable as exc:
                t.what += f" (not set up: {exc})"
            except Exception as exc:  # the trial's own set-up or a check raised: report it as a crash
                t.crash = t.crash or f"{type(exc).__name__}: {exc}"[:300] + " " + traceback.format_exc(limit=3)[-300:]
            finally:
                tunevault.uninstall()
                shutil.rmtree(trial_dir, ignore_errors=True)
            print(json.dumps(t.row()), flush=True)
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
