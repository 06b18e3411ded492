"""Hostile documents and the user's view of a command, shared by the fuzz tests and bench/hostile.py.

A hostile document is a valid tunevault document (a decision, a bundle, a manifest line, an
event) with one to three mutations: a value replaced by one of the wrong type, out of range,
NaN/Infinity (raw JSON tokens), a huge string, a deep nesting, a unicode trick; a key removed,
added or duplicated. :func:`dumps` writes what ``json.dumps`` cannot (raw tokens, duplicate keys).
Choices come from a :class:`Chooser`: hypothesis in the tests (so failures shrink), a seeded
``random.Random`` in the bench (no hypothesis needed there).
"""

from __future__ import annotations

import copy
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Chooser(Protocol):
    def choice(self, options: Sequence[T]) -> T: ...

    def randint(self, low: int, high: int) -> int: ...


class Raw(str):
    """Written verbatim: ``NaN``, ``1e400``, a 5000-digit integer, ``[[[...]]]`` 100k deep."""


@dataclass
class Doc:
    """A document being mutated, plus extra (duplicate) keys to write into some of its objects."""

    root: Any
    extra: dict[int, list[tuple[str, Any]]] = field(default_factory=dict)


def dumps(doc: Doc, ascii_only: bool = True) -> str:
    """JSON text; with ``ascii_only=False`` non-ASCII text is written raw (a lone surrogate then
    makes the file invalid UTF-8 once written with ``errors="surrogatepass"``)."""

    def write(v: Any) -> str:
        if isinstance(v, Raw):
            return str(v)
        if isinstance(v, dict):
            pairs = list(v.items()) + doc.extra.get(id(v), [])
            return "{" + ",".join(json.dumps(str(k), ensure_ascii=ascii_only) + ":" + write(x)
                                  for k, x in pairs) + "}"
        if isinstance(v, list):
            return "[" + ",".join(write(x) for x in v) + "]"
        return json.dumps(v, ensure_ascii=ascii_only)

    return write(doc.root)


UNICODE_TRICKS = ["\ud800", "x\udfffy", "\u202egnp.lanrek", "a\u0000b", "BLOCK\u200b", "\u0412LOCK", "e\u0301",
                  "\ufeffadd_one", "\U0001f642" * 200, "kernels_hostile:add_one\n", "..", "/etc/passwd", ""]
RAW_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1" + "0" * 5000, "-0", "1E+308"]
NUMBERS = [1e300, -1e300, 5e-324, -0.0, 10**30, -1, 0, 1, 2, 3, 7, 2**31, 2**63, 2**64 + 1, -(2**70), 1000, 0.5]
EXTRA_KEYS = ["zz", "signature", "schema", "format", "__proto__", "kernel", "config_index", "time"]
CHARS = "abcXYZ019_:.-/ \\\"'\t\u00e9\u4e2d\ud83d\U0001f600\u0000"


def hostile_value(c: Chooser) -> Any:
    kind = c.choice(["none", "bool", "int", "number", "raw", "text", "trick", "list", "dict", "huge", "deep",
                     "nested"])
    if kind == "none":
        return None
    if kind == "bool":
        return c.choice([True, False])
    if kind == "int":
        return c.randint(-(2**70), 2**70)
    if kind == "number":
        return c.choice(NUMBERS)
    if kind == "raw":
        return Raw(c.choice(RAW_NUMBERS))
    if kind == "text":
        return "".join(c.choice(CHARS) for _ in range(c.randint(0, 12)))
    if kind == "trick":
        return c.choice(UNICODE_TRICKS)
    if kind == "list":
        return [c.randint(-5, 5) for _ in range(c.randint(0, 4))]
    if kind == "dict":
        return {c.choice(EXTRA_KEYS): c.randint(-5, 5) for _ in range(c.randint(0, 3))}
    if kind == "huge":
        return "x" * c.randint(1_000, 2_000_000)
    depth = c.randint(65, 150_000) if kind == "deep" else c.randint(2, 40)
    return Raw("[" * depth + "]" * depth) if kind == "deep" else json.loads("[" * depth + "1" + "]" * depth)


def _paths(v: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(v, dict):
        for k, x in v.items():
            out += _paths(x, (*path, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out += _paths(x, (*path, i))
    return out


def _at(root: Any, path: tuple) -> Any:
    for p in path:
        root = root[p]
    return root


def mutate(c: Chooser, valid: Any) -> str:
    """``valid`` (a JSON value) with one to three hostile mutations, as JSON text."""
    doc = Doc(copy.deepcopy(valid))
    for _ in range(c.randint(1, 3)):
        path = c.choice(_paths(doc.root))
        op = c.choice(["set", "set", "set", "delete", "duplicate", "extra"])
        value = hostile_value(c)
        if not path:
            if op == "set":
                doc.root = value
            continue
        parent, last = _at(doc.root, path[:-1]), path[-1]
        if op == "set":
            parent[last] = value
        elif op == "delete":
            del parent[last]
        elif op == "duplicate" and isinstance(parent, dict):
            doc.extra.setdefault(id(parent), []).append((last, value))
        elif op == "extra" and isinstance(parent, dict):
            parent[c.choice(EXTRA_KEYS)] = value
        elif op == "extra" and isinstance(parent, list):
            parent.append(value)
    return dumps(doc, ascii_only=c.choice([True, False]))


class Traceback(AssertionError):
    """The CLI let an exception out: a user would have seen a traceback."""


def cli(*argv: str, stdin: bytes = b"") -> tuple[int, str, str]:
    """Run ``tunevault ARGV`` in this process the way a terminal would see it (strict UTF-8 output).

    Returns (exit status, stdout, stderr); any exception escaping ``main`` is a Traceback."""
    from tunevault.cli.main import main

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    saved_stdin = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException as exc:
        raise Traceback(f"tunevault {' '.join(argv)[:300]} raised {type(exc).__name__}: {str(exc)[:300]}") from exc
    finally:
        sys.stdin = saved_stdin
    if code not in (0, 1, 2):
        raise Traceback(f"tunevault {' '.join(argv)[:300]} exited {code}")
    return code, _text(out), _text(err)


def _text(stream: io.TextIOWrapper) -> str:
    buffer = stream.buffer
    assert isinstance(buffer, io.BytesIO)
    return buffer.getvalue().decode("utf-8")


def _set(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextmanager
def env(**values: str | None) -> Iterator[None]:
    """Set (or with None unset) environment variables for the block."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        _set(values)
        yield
    finally:
        _set(saved)
