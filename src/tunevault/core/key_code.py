"""Triton's key recipe as straight-line code, made once per kernel and number of positional args.

The hot path spends most of its time building the raw key (values of the ``key`` args, then the
dtype of every argument that has one, in Triton's ``{**nargs, **kwargs}`` order). A loop over the
arguments with a table of positions costs a loop iteration, a lookup and a method call per
argument; unrolled code for one call shape does the same work with none of that. Like Triton's own
argument binder, the code is generated from the kernel's signature, never from user input: the
only names in it are ``a<i>`` locals and string constants passed through ``repr``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RawKeyFn = Callable[[tuple, dict[str, Any]], tuple]

# Exact types whose instances can never have a ``dtype`` attribute (no class attribute, no
# instance dict): skipping them saves a failing ``hasattr`` per scalar argument on the hot path.
NO_DTYPE = frozenset({int, float, bool, str, bytes, complex, type(None)})
try:
    from torch import Tensor  # the common case, tested first: ``type(a) is Tensor``
except ImportError:  # pragma: no cover - torch is a dependency; keep the module importable
    Tensor = None  # type: ignore[assignment,misc]


def _kwargs_dtypes(key: list[Any], kwargs: dict[str, Any], argset: frozenset[str]) -> None:
    """Dtypes of keyword args that are kernel args, in call order (after the positional ones)."""
    for name, value in kwargs.items():
        t = type(value)
        if t not in NO_DTYPE and name in argset and (t is Tensor or hasattr(value, "dtype")):
            key.append(value.dtype)


def _guard(value: Any) -> type | None:
    """The exact type a specialised key may assume for an argument like ``value``, or None where
    only the general code can tell whether it has a dtype."""
    t = type(value)
    return t if t is Tensor or t in NO_DTYPE else None


def make_raw_key(n_args: int, arg_names: list[str], keys: list[str],
                 example: tuple[tuple, dict[str, Any]] | None = None) -> RawKeyFn:
    """A function ``(args, kwargs) -> raw key`` for calls with ``n_args`` positional args.

    With ``example`` (a call seen on the miss path), the function first checks, by exact type,
    that a call looks like the example (same keyword names, each argument of the same type) and
    then builds the key as one tuple with no loop at all; any other call takes the general code.
    """
    general = _make_general(n_args, arg_names, keys)
    if example is None or len(example[0]) != n_args:
        return general
    args, kwargs = example
    guards = [_guard(a) for a in args] + [_guard(v) for n, v in kwargs.items() if n in arg_names]
    if any(g is None for g in guards) or any(not isinstance(n, str) or not n.isidentifier() for n in kwargs):
        return general
    pos = {n: i for i, n in enumerate(arg_names)}
    checks = [f"len(kwargs) == {len(kwargs)}"]
    values = {}  # kernel-arg name -> the expression that reads it
    for i, a in enumerate(args):
        checks.append(f"type(args[{i}]) is {_type_name(type(a))}")
        values[arg_names[i]] = f"args[{i}]"
    for n, v in kwargs.items():
        if n in pos:
            checks.append(f"type(kwargs.get({n!r}, MISSING)) is {_type_name(type(v))}")
            values[n] = f"kwargs[{n!r}]"
        else:
            checks.append(f"{n!r} in kwargs")
    parts = [values[k] for k in keys if k in values]
    parts += [f"{expr}.dtype" for n, expr in values.items() if type(_value(n, args, kwargs, pos)) is Tensor]
    lines = ["def raw_key(args, kwargs):",
             f"    if {' and '.join(checks)}:",
             f"        return ({''.join(p + ', ' for p in parts)})",
             "    return general(args, kwargs)"]
    scope: dict[str, Any] = {"Tensor": Tensor, "general": general, "MISSING": object(),
                             **{_type_name(t): t for t in NO_DTYPE}}
    exec(compile("\n".join(lines), f"<tunevault raw key, {n_args} positional args, specialised>", "exec"),
         scope)  # noqa: S102
    return scope["raw_key"]


def _type_name(t: type) -> str:
    return "Tensor" if t is Tensor else f"T_{t.__name__}"


def _value(name: str, args: tuple, kwargs: dict[str, Any], pos: dict[str, int]) -> Any:
    i = pos[name]
    return args[i] if i < len(args) else kwargs[name]


def _make_general(n_args: int, arg_names: list[str], keys: list[str]) -> RawKeyFn:
    pos = {n: i for i, n in enumerate(arg_names)}
    lines = ["def raw_key(args, kwargs):"]
    names = [f"a{i}" for i in range(n_args)]
    if names:
        lines.append(f"    {', '.join(names)}{',' if len(names) == 1 else ''} = args")
    positional = [f"a{pos[k]}" for k in keys if k in pos and pos[k] < n_args]
    lines.append(f"    key = [{', '.join(positional)}]")
    lines.append("    append = key.append")
    for k in keys:  # a key arg passed by keyword; one not passed at all is left out, as Triton does
        if k in pos and pos[k] >= n_args:
            lines += [f"    if {k!r} in kwargs:", f"        append(kwargs[{k!r}])"]
    for a in names:
        lines += [f"    t = type({a})",
                  f"    if t is Tensor or (t not in NO_DTYPE and hasattr({a}, 'dtype')):",
                  f"        append({a}.dtype)"]
    lines += ["    if len(kwargs) != 2 or 'grid' not in kwargs or 'warmup' not in kwargs:",
              "        kwargs_dtypes(key, kwargs, argset)",
              "    return tuple(key)"]
    scope: dict[str, Any] = {"Tensor": Tensor, "NO_DTYPE": NO_DTYPE, "kwargs_dtypes": _kwargs_dtypes,
                             "argset": frozenset(arg_names)}
    exec(compile("\n".join(lines), f"<tunevault raw key, {n_args} positional args>", "exec"), scope)  # noqa: S102
    return scope["raw_key"]
