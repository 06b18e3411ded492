"""The store never crashes a kernel call: unusable, corrupt or failing stores degrade with one warning."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest
import torch

import kernels_core as kc
from conftest import count_launches


def store_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def serve_everything() -> None:
    """Two kernels, two keys each, twice: every result right, each key tuned once."""
    for _round in range(2):
        for kernel in (kc.add_one, kc.oversized):
            for n in (40, 48):
                with count_launches(kernel) as launches:
                    assert torch.equal(kc.run_unary(kernel, n), kc.expected_unary(n))
                assert (launches.count > 1) is (_round == 0)


def test_unwritable_location_warns_once_and_works_in_memory(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    import tunevault

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    url = f"sqlite:///{blocker}/sub/tunevault.db"
    caplog.set_level(logging.WARNING, logger="tunevault")
    tunevault.install(mode="tune", store=url)
    serve_everything()
    warnings = store_warnings(caplog)
    assert len(warnings) == 1 and "unusable" in warnings[0] and str(blocker) in warnings[0], warnings


@pytest.mark.parametrize("url", ["sqlite://relative/path.db", "nosuchscheme://x", "no-scheme-at-all"])
def test_malformed_store_url_warns_and_keeps_working(url: str, caplog: pytest.LogCaptureFixture) -> None:
    import tunevault

    caplog.set_level(logging.WARNING, logger="tunevault")
    tunevault.install(mode="tune", store=url)
    serve_everything()
    warnings = store_warnings(caplog)
    assert len(warnings) == 1 and url in warnings[0], warnings


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_store_file_is_a_miss_with_a_warning(tmp_path: Path, sqlite_url: str, damage: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    import tunevault

    path = Path(sqlite_url.removeprefix("sqlite:///"))
    tunevault.install(mode="tune", store=sqlite_url)
    kc.run_unary(kc.add_one, 40)
    tunevault.uninstall()
    data = path.read_bytes()
    for extra in (Path(f"{path}-wal"), Path(f"{path}-shm")):
        extra.unlink(missing_ok=True)
    path.write_bytes(b"\x00garbage, not sqlite\xff" * 64 if damage == "garbage" else data[: len(data) // 3])

    caplog.set_level(logging.WARNING, logger="tunevault")
    tunevault.install(mode="tune", store=sqlite_url)
    serve_everything()
    warnings = store_warnings(caplog)
    assert 1 <= len(warnings) <= 2 and all(str(path) in w for w in warnings), warnings


def test_corrupt_row_is_a_miss_then_heals(sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    import tunevault

    path = sqlite_url.removeprefix("sqlite:///")
    tunevault.install(mode="tune", store=sqlite_url)
    kc.run_unary(kc.add_one, 40)
    tunevault.uninstall()
    with sqlite3.connect(path) as con:
        con.execute("UPDATE decisions SET payload = substr(payload, 1, 40)")  # truncated JSON

    caplog.set_level(logging.WARNING, logger="tunevault")
    tunevault.install(mode="tune", store=sqlite_url)
    with count_launches(kc.add_one) as launches:
        assert torch.equal(kc.run_unary(kc.add_one, 40), kc.expected_unary(40))
    assert launches.count > 1  # a miss: tuned again
    assert any("corrupt" in w for w in store_warnings(caplog))

    tunevault.install(mode="tune", store=sqlite_url)  # the retune replaced the corrupt row
    with count_launches(kc.add_one) as launches:
        kc.run_unary(kc.add_one, 40)
    assert launches.count == 1


def test_store_failing_after_open_never_fails_a_call(sqlite_url: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    import tunevault
    from tunevault.integration.triton_adapter import runtime

    tunevault.install(mode="tune", store=sqlite_url)
    kc.run_unary(kc.add_one, 40)
    runtime().store.close()  # every later read, write or lease now raises inside the store
    caplog.set_level(logging.WARNING, logger="tunevault")
    for n in (48, 56):
        assert torch.equal(kc.run_unary(kc.add_one, n), kc.expected_unary(n))
        assert torch.equal(kc.run_unary(kc.oversized, n), kc.expected_unary(n))
    assert torch.equal(kc.run_unary(kc.add_one, 40), kc.expected_unary(40))
    assert store_warnings(caplog)  # said so, without failing a call
