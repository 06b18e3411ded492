"""A Redis URL may carry the server's password: logs, reprs, ``tunevault info`` and the CLI's
reports show it masked (``***``), against a real redis-server started with ``--requirepass``."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

import redis_server
from test_fleet_outage import decision, put_during_a_pause
from tunevault.cli.main import main
from tunevault.store import layered as layered_module
from tunevault.store.base import open_store
from tunevault.store.layered import LayeredStore, describe_layers, open_layered

PASSWORD = "s3cret-Pw"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[redis_server.RedisServer]:
    yield from redis_server.serve(tmp_path, password=PASSWORD)


def tunevault_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "tunevault")


def test_redact_masks_userinfo_and_query_passwords() -> None:
    from tunevault.store.base import redact

    assert redact("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact("rediss://user:p@ss@h/0?deadline=2") == "rediss://user:***@h/0?deadline=2"
    assert redact("unix://u@/tmp/r.sock?db=0&password=pw") == "unix://u@/tmp/r.sock?db=0&password=***"
    assert redact("sqlite:////tmp/a@b:c.db + redis://h:6379/0") == "sqlite:////tmp/a@b:c.db + redis://h:6379/0"


def test_the_remote_password_never_reaches_logs_or_reprs(tmp_path: Path, server: redis_server.RedisServer,
                                                         caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layered_module, "PENDING_CAP", 0)  # the outage also logs "already wait for ..."
    caplog.set_level(logging.DEBUG, logger="tunevault")
    store = open_layered(f"sqlite:///{tmp_path / 'a.db'}", remote=server.url)
    assert isinstance(store, LayeredStore) and store.remote is not None
    try:
        assert store.remote.get(*decision(9).store_key) is None, "the password in the URL authenticates"
        put_during_a_pause(store, server, decision(1))
        store.get(*decision(2).store_key)  # answers again
        shown = [store.url, repr(store), repr(store.remote), *describe_layers(store)]
    finally:
        store.close()
    for bad in (f"redis://:{PASSWORD}@127.0.0.1:99999/0", f"reddis://:{PASSWORD}@127.0.0.1/0"):
        open_layered(f"sqlite:///{tmp_path / 'b.db'}", remote=bad).close()
    logged = tunevault_text(caplog)
    for phrase in ("answers again", "already wait for the remote store", "Port out of range",
                   "unknown store scheme"):
        assert phrase in logged
    assert PASSWORD not in logged + "".join(shown)
    assert logged.count(":***@") >= 4 and all(":***@" in s for s in shown if "redis" in s)


def test_cli_reports_mask_the_store_password(server: redis_server.RedisServer,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store(server.url)
    try:
        store.put(decision(1))
    finally:
        store.close()
    outputs = []
    for argv in (["info", "--json"], ["info"], ["ls"], ["rm", "--all", "--dry-run"], ["rm", "--all"]):
        capsys.readouterr()
        code = main(["--store", server.url, *argv])
        out, err = capsys.readouterr()
        assert code == 0, err
        outputs.append(out + err)
    assert json.loads(outputs[0])["store"]["url"] == server.url.replace(PASSWORD, "***")
    assert "removed 1 decision(s) from redis://:***@127.0.0.1" in outputs[-1]
    assert PASSWORD not in "".join(outputs)


def test_a_warmup_reason_for_an_unusable_store_masks_its_password(caplog: pytest.LogCaptureFixture) -> None:
    """A store the runtime could not open (here a database that is not a number) leaves decisions
    in memory; a warmup's failed reason named that store with its password in clear."""
    from tunevault.core.model import KernelId, TuningKey
    from tunevault.policy.runtime import Runtime
    from tunevault.policy.settings import Settings

    rt = Runtime(Settings.for_install(mode="tune", store=f"redis://:{PASSWORD}@127.0.0.1:6379/abc"))
    rt.store  # noqa: B018  # opening it fails: the runtime keeps decisions in memory
    why = rt.unpublished_why(KernelId("m:k", "0" * 16, "0" * 16, ("n",)), TuningKey((("n", 1),)))
    assert rt.store_fell_back and "***" in why and PASSWORD not in why
    assert PASSWORD not in tunevault_text(caplog)
