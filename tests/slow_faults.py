"""Slow faults on loopback and in the file system, for the hostile-input tests and bench/hostile.py.

- :class:`TrickleServer` speaks valid RESP, one byte every ``delay`` seconds: every read of a
  client with a per-read socket timeout succeeds, so only a deadline on the whole operation ends it.
- :class:`SilentServer` accepts connections and never answers (a hung server, a black hole).
- :func:`fifo` makes a FIFO nobody writes to or reads from; ``/dev/zero`` never ends.
- :func:`small_filesystem` and :func:`read_only_copy` mount a full tmpfs or a read-only bind
  mount where the machine allows it (root with mount rights), else they skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path


class _Server:
    """A loopback listener whose connections are handled on daemon threads."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.commands = 0
        self._closed = threading.Event()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self._open.append(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._closed.set()
        for s in [self.sock, *self._open]:
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SilentServer(_Server):
    """Accepts, reads whatever comes, never writes a byte."""

    def serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while conn.recv(1 << 16):
                self.commands += 1


def _bulk(value: bytes | None) -> bytes:
    return b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value)


def reply(command: list[bytes]) -> bytes:
    """A plausible reply to each command tunevault's redis store sends."""
    name = command[0].upper() if command else b""
    if name == b"PING":
        return b"+PONG\r\n"
    if name in (b"GET",):
        return _bulk(None)
    if name == b"MGET":
        return b"*%d\r\n" % (len(command) - 1) + _bulk(None) * (len(command) - 1)
    if name == b"SMEMBERS":
        return b"*0\r\n"
    if name in (b"SADD", b"SREM", b"DEL", b"SCARD", b"EVALSHA", b"EVAL", b"PEXPIRE"):
        return b":1\r\n"
    return b"+OK\r\n"


def commands(buffer: bytearray) -> Iterator[list[bytes]]:
    """Complete RESP arrays from the front of ``buffer`` (consumed as they are parsed)."""
    while buffer.startswith(b"*"):
        try:
            end = buffer.index(b"\r\n")
            count, at, parts = int(buffer[1:end]), end + 2, []
            for _ in range(count):
                end = buffer.index(b"\r\n", at)
                size = int(buffer[at + 1:end])
                parts.append(bytes(buffer[end + 2:end + 2 + size]))
                at = end + 2 + size + 2
                if at > len(buffer):
                    return
        except ValueError:
            return
        del buffer[:at]
        yield parts


class TrickleServer(_Server):
    """Answers every command correctly, one byte every ``delay`` seconds."""

    def __init__(self, delay: float = 0.3) -> None:
        self.delay = delay
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        buffer = bytearray()
        with contextlib.suppress(OSError):
            while not self._closed.is_set():
                chunk = conn.recv(1 << 16)
                if not chunk:
                    return
                buffer += chunk
                for command in commands(buffer):
                    self.commands += 1
                    for byte in reply(command):
                        conn.sendall(bytes([byte]))
                        time.sleep(self.delay)


def fifo(path: Path) -> Path:
    """A FIFO with no writer and no reader: opening it blocking would wait forever."""
    os.mkfifo(path)
    return path


class Unavailable(RuntimeError):
    """This machine cannot set the fault up (no mount rights); a test skips, the bench says so."""


def _skip(reason: str) -> None:
    if not os.environ.get("PYTEST_CURRENT_TEST"):  # bench/hostile.py
        raise Unavailable(reason)
    import pytest

    pytest.skip(reason)


def _run(*cmd: str) -> bool:
    return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0


@contextlib.contextmanager
def small_filesystem(where: Path, size_kb: int = 64) -> Iterator[Path]:
    """A tmpfs of ``size_kb`` at ``where`` (a real ENOSPC when full), or skip."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount") or not _run("mount", "-t", "tmpfs", "-o",
                                                                   f"size={size_kb}k", "tmpfs", str(where)):
        _skip("cannot mount a small tmpfs here (needs root with mount rights)")
    try:
        yield where
    finally:
        _run("umount", "-l", str(where))


@contextlib.contextmanager
def read_only_copy(source: Path, where: Path) -> Iterator[Path]:
    """``source`` seen read-only at ``where``: a read-only bind mount as root, else chmod."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        for p in source.iterdir():
            shutil.copy2(p, where / p.name)
        where.chmod(0o555)
        try:
            yield where
        finally:
            where.chmod(0o755)
        return
    if not (shutil.which("mount") and _run("mount", "--bind", str(source), str(where))):
        _skip("cannot bind-mount here")
    try:
        if not _run("mount", "-o", "remount,bind,ro", str(where)):
            _skip("cannot remount read-only here")
        yield where
    finally:
        _run("umount", "-l", str(where))
