"""Hostile documents for the fuzz tests and bench/hostile.py, and the checks a user would make.

A hostile document is a valid tunevault document (a decision, a bundle, a manifest line, an
event) with one to three mutations: a value replaced by one of the wrong type, out of range,
NaN/Infinity (as raw JSON tokens), a huge string, a deep nesting, a unicode trick; a key removed,
added or duplicated. :func:`dumps` writes what ``json.dumps`` cannot (raw tokens, duplicate keys).

Fuzz budget: the ``ci`` profile (30 examples per test, derandomized, no example database) runs
by default; ``TUNEVAULT_FUZZ=thorough`` runs 500 examples per test with fresh randomness.
"""

from __future__ import annotations

import copy
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
          HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_QUIET, print_blob=True)
settings.register_profile("thorough", max_examples=500, deadline=None, database=None,
                          suppress_health_check=_QUIET, print_blob=True)
PROFILE = os.environ.get("TUNEVAULT_FUZZ", "ci")
FUZZ = settings(settings.get_profile(PROFILE))


class Raw(str):
    """Written verbatim: ``NaN``, ``1e400``, a 5000-digit integer, ``[[[...]]]`` 100k deep."""


@dataclass
class Doc:
    """A document being mutated, plus extra (duplicate) keys to write into some of its objects."""

    root: Any
    extra: dict[int, list[tuple[str, Any]]] = field(default_factory=dict)


def dumps(doc: Doc) -> str:
    def write(v: Any) -> str:
        if isinstance(v, Raw):
            return str(v)
        if isinstance(v, dict):
            pairs = list(v.items()) + doc.extra.get(id(v), [])
            return "{" + ",".join(json.dumps(str(k)) + ":" + write(x) for k, x in pairs) + "}"
        if isinstance(v, list):
            return "[" + ",".join(write(x) for x in v) + "]"
        return json.dumps(v)  # ensure_ascii: a lone surrogate is written as its \\u escape

    return write(doc.root)


UNICODE_TRICKS = ["\ud800", "x\udfffy", "\u202egnp.lanrek", "a\u0000b", "BLOCK\u200b", "\u0412LOCK", "e\u0301",
                  "\ufeffadd_one", "\U0001f642" * 200, "tests.kernels_hostile:add_one\n", "..", "/etc/passwd"]
RAW_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1" + "0" * 5000, "-0", "1E+308"]


def hostile_values() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from([1e300, -1e300, 5e-324, -0.0, 10**30, -1, 0, 2**31, 2**63, 1000]),
        st.sampled_from(RAW_NUMBERS).map(Raw),
        st.text(max_size=12), st.sampled_from(UNICODE_TRICKS),
        st.lists(st.integers(-5, 5), max_size=4), st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
        st.integers(1_000, 2_000_000).map(lambda n: "x" * n),
        st.integers(65, 150_000).map(lambda d: Raw("[" * d + "]" * d)),
        st.integers(2, 40).map(lambda d: json.loads("[" * d + "1" + "]" * d)),
    )


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


@st.composite
def mutated(draw: st.DrawFn, valid: Any) -> str:
    """``valid`` (a JSON value) with one to three hostile mutations, as JSON text."""
    doc = Doc(copy.deepcopy(valid))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc.root)))
        op = draw(st.sampled_from(["set", "set", "set", "delete", "duplicate", "extra"]))
        value = draw(hostile_values())
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
            parent[draw(st.sampled_from(["zz", "signature", "schema", "format", "__proto__", "kernel"]))] = value
        elif op == "extra" and isinstance(parent, list):
            parent.append(value)
    return dumps(doc)


class Traceback(AssertionError):
    """The CLI let an exception out: a user would have seen a traceback."""


def cli(*argv: str, stdin: str = "") -> tuple[int, str, str]:
    """Run ``tunevault ARGV`` in this process the way a terminal would see it (strict UTF-8 output).

    Returns (exit status, stdout, stderr); any exception escaping ``main`` is a Traceback."""
    import sys

    from tunevault.cli.main import main

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    saved_stdin = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode()), encoding="utf-8")
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException as exc:
        raise Traceback(f"tunevault {' '.join(argv)[:300]} raised {type(exc).__name__}: {str(exc)[:300]}") from exc
    finally:
        sys.stdin = saved_stdin
    assert code in (0, 1, 2), code
    return code, _text(out), _text(err)


def _text(stream: io.TextIOWrapper) -> str:
    buffer = stream.buffer
    assert isinstance(buffer, io.BytesIO)
    return buffer.getvalue().decode("utf-8")


@contextmanager
def env(**values: str | None) -> Iterator[None]:
    """Set (or with None unset) environment variables for the block."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
