"""Reading what came from elsewhere, and writing to paths someone else named, without blocking.

Every file tunevault reads (bundles, exports, manifests, events logs) and every path it appends
to (``TUNEVAULT_EVENTS``, ``TUNEVAULT_CAPTURE``) is named by configuration, so it may be a FIFO
with no writer (opening or reading it blocks forever), ``/dev/zero`` (never ends), a huge file,
or a document nested deeper than the interpreter's stack. The helpers here refuse those up front:

- :func:`read_document` reads only regular files, with a size bound, opened ``O_NONBLOCK``;
- :func:`lines` does the same for JSON-lines files, line by line, with a bound per line;
- :func:`loads` parses JSON with a nesting bound, finite numbers, valid Unicode, no duplicate keys;
- :func:`open_sink` opens an append-only sink without blocking and refuses non-regular files.

Each raises :class:`Refused` (a ValueError) with a message naming the path and the reason.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from collections.abc import Iterator
from typing import Any

MAX_DOCUMENT_BYTES = 256 << 20  # a bundle of 100k winners is ~100 MB; /dev/zero is infinite
MAX_DEPTH = 64  # tunevault's own documents nest 6 levels deep
MAX_LINE_BYTES = 16 << 20  # one manifest or events line (a callspec keeps at most 4096 ints per tensor)
# A closed string, else an unclosed one running to the end (its content kept: its brackets count, as
# they always did). Every quote matches, so a quote that never closes is scanned once, not once per
# later quote: ``["\"\"\"...`` took quadratic time (14 s at 80 KB) when a failed match restarted there.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|"(.*)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class Refused(ValueError):
    """A path or document that tunevault will not read or write: the message says why."""


def _open_regular(path: str) -> tuple[int, os.stat_result]:
    """A read descriptor on a regular file: ``O_NONBLOCK`` so a FIFO without a writer opens at once.
    A missing or unreadable file raises the usual OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise Refused(f"{path} is not a regular file ({_kind(info.st_mode)}); refusing to read it")
    return fd, info


def head(path: str | os.PathLike[str], n: int) -> bytes:
    """The first ``n`` bytes of a regular file (to tell an SQLite file from a JSON one)."""
    fd, _info = _open_regular(os.fspath(path))
    try:
        return os.read(fd, n)
    finally:
        os.close(fd)


def read_document(path: str | os.PathLike[str], limit: int = MAX_DOCUMENT_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; never blocks on a FIFO or a device."""
    path = os.fspath(path)
    fd, info = _open_regular(path)
    try:
        if info.st_size > limit:
            raise Refused(f"{path} is {info.st_size} bytes, more than the {limit} bytes tunevault reads")
        chunks, total = [], 0
        while True:  # the size may change under us: read to the bound, not to st_size
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise Refused(f"{path} grew past the {limit} bytes tunevault reads")
        return b"".join(chunks)
    except OSError as exc:
        raise Refused(f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a plain file"


def nesting_problem(text: str, max_depth: int = MAX_DEPTH) -> str | None:
    """Why JSON ``text`` cannot be parsed safely (nested deeper than ``max_depth``, or brackets that
    do not pair up), or None. No recursion and no per-character Python loop: strings and
    non-brackets are removed by regular expressions in linear time (an unclosed string leaves its
    content, whose brackets then count), then innermost pairs are peeled one level per pass."""
    if "[" not in text and "{" not in text:
        return None
    brackets = _NOT_BRACKET.sub("", _STRING.sub(r"\1", text))
    for _ in range(max_depth):
        if not brackets:
            return None
        peeled = brackets.replace("[]", "").replace("{}", "")
        if peeled == brackets:
            return "is not JSON (its brackets do not pair up)"
        brackets = peeled
    return f"nests deeper than {max_depth} levels" if brackets else None


def _no_constant(name: str) -> Any:
    raise Refused(f"{name} is not valid JSON")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Two values for one key: parsers disagree on which one counts, so neither does."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise Refused(f"duplicate key {key[:80]!r} in one object")
        out[key] = value
    return out


def loads(text: str | bytes, max_depth: int = MAX_DEPTH, what: str = "document") -> Any:
    """Strict JSON: bounded nesting, finite numbers only, no duplicate keys, valid UTF-8.

    Raises Refused for anything else, whatever went wrong inside the parser."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        problem = nesting_problem(text, max_depth)
        if problem is not None:
            raise Refused(f"{what} {problem}")
        data = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique)
        problem = plain_problem(data)
        if problem is not None:
            raise Refused(f"{what} {problem}")
        return data
    except Refused:
        raise
    except (ValueError, RecursionError, MemoryError, TypeError) as exc:
        raise Refused(f"{what} is not JSON ({type(exc).__name__}: {str(exc)[:200]})") from None


def plain_problem(data: Any) -> str | None:
    """Why an already depth-checked JSON value cannot be used as is, or None: a number out of range
    (``1e400`` parses as infinity without passing ``parse_constant``) or text with a lone
    surrogate (``"\\ud800"`` parses, but printing it to a UTF-8 terminal raises)."""
    stack = [data]
    while stack:
        v = stack.pop()
        if isinstance(v, float):
            if not math.isfinite(v):
                return "holds a number out of range"
        elif isinstance(v, str):
            if not printable(v):
                return "holds text that is not valid Unicode (a lone surrogate)"
        elif isinstance(v, dict):
            stack.extend(v.values())
            stack.extend(v.keys())
        elif isinstance(v, list):
            stack.extend(v)
    return None


def printable(text: str) -> bool:
    """Text that can be written to a UTF-8 terminal or file (no lone surrogates from ``\\ud800``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def lines(path: str | os.PathLike[str], max_line: int = MAX_LINE_BYTES, limit: int | None = None,
          upto: int | None = None) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, bytes)`` of a regular file, read as it goes; a line longer than ``max_line``
    comes as ``None`` (the caller skips it as malformed) and is not kept in memory. A file of more
    than ``limit`` bytes is refused (Refused) before its first line, or as it grows past it.
    ``upto``: read only the first so many bytes (a snapshot of a file others still append to)."""
    path = os.fspath(path)
    fd, info = _open_regular(path)
    size = info.st_size if upto is None else min(info.st_size, max(0, upto))
    if limit is not None and size > limit:
        os.close(fd)
        raise Refused(f"{path} is {size} bytes, more than the {limit} bytes ({limit >> 20} MiB) "
                      "tunevault reads of it")
    left = -1 if upto is None else max(0, upto)

    def readline(size: int) -> bytes:
        nonlocal left
        if left == 0:
            return b""
        text = fh.readline(size if left < 0 else min(size, left))
        if left > 0:
            left -= len(text)
        if limit is not None and fh.tell() > limit:
            raise Refused(f"{path} grew past the {limit} bytes ({limit >> 20} MiB) tunevault reads of it")
        return text

    with os.fdopen(fd, "rb") as fh:
        number = 0
        while True:
            text = readline(max_line + 1)
            if not text:
                return
            number += 1
            if len(text) <= max_line or text.endswith(b"\n"):
                yield number, text
                continue
            while text and not text.endswith(b"\n"):  # the rest of an overlong line
                text = readline(1 << 20)
            yield number, None


def _is_devnull(info: os.stat_result) -> bool:
    """``/dev/null`` is the one device a sink may be: it never blocks and asks for nothing else."""
    try:
        null = os.stat(os.devnull)
    except OSError:
        return False
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == null.st_rdev


def open_sink(path: str | os.PathLike[str]) -> int:
    """An ``O_APPEND`` descriptor on a regular file, created if missing; never blocks.

    A FIFO with no reader, a device or a socket is refused (``O_NONBLOCK`` makes the open of a
    reader-less FIFO fail at once instead of waiting, and fstat catches the rest)."""
    path = os.fspath(path)
    flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
             | getattr(os, "O_CLOEXEC", 0))
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise Refused(f"{path} is a FIFO with no reader; refusing to write to it") from exc
        raise
    try:
        info = os.fstat(fd)
        if not (stat.S_ISREG(info.st_mode) or _is_devnull(info)):
            raise Refused(f"{path} is not a regular file ({_kind(info.st_mode)}); refusing to write to it")
        os.set_blocking(fd, True)  # a regular file: writes complete (O_NONBLOCK means nothing there)
    except BaseException:
        os.close(fd)
        raise
    return fd
