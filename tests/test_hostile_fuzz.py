"""Property-based fuzzing of every reader: SQLite rows, Redis entries, export/bundle files,
manifests, events logs (issue 14, "what done looks like").

Each example is a real tunevault document with hostile mutations (``hostile.mutated``), put
where the reader reads it; then what a user would notice is checked: the kernel call returns
the right result and launches only declared configs (``kernels_hostile.call_checked``), and the
CLI exits with a status and a message, never a traceback (``hostile.cli``). The example budget is
the ``ci`` profile (30 per test, derandomized); ``TUNEVAULT_FUZZ=thorough`` runs 500 each.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kernels_hostile as kh
import tunevault
from hostile import FUZZ, cli, env, mutated
from redis_server import serve
from tunevault.capture.argspec import CallSpec
from tunevault.core.identity import current_fingerprint
from tunevault.integration.triton_adapter import runtime
from tunevault.store.bundle import make_bundle, signature
from tunevault.store.sqlite import SqliteStore

pytestmark = pytest.mark.timeout(600)
N = kh.SIZES[0]
POLICIES = st.sampled_from(["tune", "fallback"])
ALLOW = ("--allow-module", "kernels_hostile")


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One valid document of each kind, from real calls: the seeds every mutation starts from."""
    where = tmp_path_factory.mktemp("valid")
    tunevault.install(mode="tune", store="memory://", capture=str(where / "keys.jsonl"),
                      events=str(where / "events.jsonl"))
    kh.call_checked(kh.add_one, N)
    (decision,) = runtime().decided.values()
    tunevault.uninstall()
    manifest_line = json.loads((where / "keys.jsonl").read_text().splitlines()[0])
    return {"decision": decision, "json": decision.to_json(),
            "bundle": make_bundle([decision], current_fingerprint()),
            "line": manifest_line,
            "event": json.loads((where / "events.jsonl").read_text().splitlines()[0])}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with env(TUNEVAULT_REPLAY_MAX_BYTES=str(64 << 20), TUNEVAULT_BUNDLE_KEY=None):
        yield tmp_path_factory.mktemp("fuzz")


def serve_call(policy: str, **options: Any) -> None:
    """A fresh runtime with ``options``; the call for the stored key must be right and declared."""
    tunevault.install(mode="tune", on_miss=policy, **options)
    try:
        kh.call_checked(kh.add_one, N)
    finally:
        tunevault.uninstall()


@FUZZ
@given(data=st.data(), policy=POLICIES, column=st.sampled_from(["text", "blob", "name"]))
def test_sqlite_rows(valid: dict[str, Any], workdir: Path, data: st.DataObject, policy: str, column: str) -> None:
    text = data.draw(mutated(valid["json"]))
    path = workdir / "rows.db"
    for p in workdir.glob("rows.db*"):
        p.unlink()
    SqliteStore(path).close()
    kd, fd, kt = valid["decision"].store_key
    raw = text.encode("utf-8", "surrogatepass")  # invalid UTF-8 where the text holds a lone surrogate
    name = raw[:200] if column == "name" else valid["decision"].kernel.name.encode()
    as_text = "?" if column == "blob" else "CAST(? AS TEXT)"
    with sqlite3.connect(path) as db:
        db.execute(f"INSERT INTO decisions VALUES (?, ?, ?, CAST(? AS TEXT), {as_text}, ?)",
                   (kd, fd, kt, name, raw, 1.0))
    url = f"sqlite:///{path}"
    serve_call(policy, store=url)
    for argv in (("ls",), ("ls", "--json"), ("show", "add_one"), ("export", "-"), ("info",)):
        cli("--store", url, *argv)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("redis")
    yield from (server.url for server in serve(tmp_path_factory.mktemp("redis")))


@FUZZ
@given(data=st.data(), policy=POLICIES)
def test_redis_entries(valid: dict[str, Any], redis_url: str, data: st.DataObject, policy: str) -> None:
    import redis

    from tunevault.store.redis import INDEXES, entry_key, index_key

    text = data.draw(mutated(valid["json"]))
    kd, fd, kt = valid["decision"].store_key
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.set(entry_key(kd, fd, kt), text.encode("utf-8", "surrogatepass"))
    client.sadd(index_key(kd, fd), entry_key(kd, fd, kt))
    client.sadd(INDEXES, f"{kd}:{fd}")
    client.close()
    serve_call(policy, store="memory://", remote=redis_url)
    for argv in (("ls",), ("show", "add_one"), ("info",)):
        cli("--store", redis_url, *argv)


@FUZZ
@given(data=st.data(), policy=POLICIES, key=st.sampled_from([None, "k"]), signed=st.booleans())
def test_bundle_and_export_files(valid: dict[str, Any], workdir: Path, data: st.DataObject, policy: str,
                                 key: str | None, signed: bool) -> None:
    seed = dict(valid["bundle"])
    if signed:
        seed["signature"] = {"alg": "hmac-sha256", "hmac": signature(seed, "k")}
    path = workdir / "bundle.json"
    path.write_text(data.draw(mutated(seed)), encoding="utf-8", errors="surrogatepass")
    serve_call(policy, store="memory://", bundles=str(path), bundle_key=key)
    with env(TUNEVAULT_BUNDLE_KEY=key):
        cli("--store", "memory://", "import", str(path))
        cli("diff", str(path), str(path), "--json")
        cli("--store", "memory://", "import", "-", stdin=path.read_bytes())


@FUZZ
@given(data=st.data(), key=st.sampled_from([None, "k"]))
def test_manifests(valid: dict[str, Any], workdir: Path, data: st.DataObject, key: str | None) -> None:
    from tunevault.store.bundle import ALGORITHM

    seed = {k: v for k, v in valid["line"].items() if k != "signature"}
    if key is not None:
        seed["signature"] = {"alg": ALGORITHM, "hmac": signature(seed, key)}
    path = workdir / "keys.jsonl"
    path.write_text(json.dumps(seed) + "\n" + data.draw(mutated(seed)) + "\n", encoding="utf-8",
                    errors="surrogatepass")
    with env(TUNEVAULT_BUNDLE_KEY=key), kh.launches(kh.add_one) as seen:
        cli("--store", "memory://", "check", str(path), *ALLOW)
        cli("--store", "memory://", "warmup", str(path), *ALLOW, "--json")
        cli("report", str(path), "--json")
    assert not seen.undeclared(), seen.undeclared()


@FUZZ
@given(data=st.data())
def test_events_logs(valid: dict[str, Any], workdir: Path, data: st.DataObject) -> None:
    path = workdir / "events.jsonl"
    lines = [json.dumps(valid["event"]), data.draw(mutated(valid["event"])), data.draw(mutated(valid["event"]))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    cli("report", str(path))
    cli("report", str(path), "--json")


def test_callspec_of_a_valid_line_rebuilds(valid: dict[str, Any]) -> None:
    """The seed the manifest fuzzing mutates is itself a replayable call (else it fuzzes nothing)."""
    spec = CallSpec.from_json(valid["line"]["callspec"])
    args, kwargs = spec.build(kh.add_one)
    assert args[2] == N and kwargs["grid"]({"BLOCK": 16}) == (3, 1, 1)
