"""Triton's key recipe as straight-line code, made once per kernel and number of positional args.

The hot path spends most of its time building the raw key. Its layout is the same for every call
shape, so that two calls share a raw key exactly when their tuning keys are equal (Triton's key and
tunevault's labelled one), whichever args they pass by position or by keyword:

- one slot per ``key`` arg that is a kernel arg, in ``key=`` order: its value, or ``ABSENT`` where
  the call leaves it out (Triton's key just drops it, which would let ``(M absent, N=5)`` and
  ``(M=5, N absent)`` meet);
- then, for every argument that has a ``dtype``, in Triton's ``{**nargs, **kwargs}`` order, its
  name and its dtype (without names, a ``None`` in one place and a tensor in another would shift
  the dtypes onto other args).

A loop over the arguments with a table of positions costs a loop iteration, a lookup and a method
call per argument; unrolled code for one call shape does the same work with none of that. Like
Triton's own argument binder, the code is generated from the kernel's signature, never from user
input: the only names in it are ``a<i>`` locals and string constants passed through ``repr``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RawKeyFn = Callable[[tuple, dict[str, Any]], tuple]


class _Absent:
    """The value of a key arg that a call leaves out; unequal to anything but itself."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<absent>"


ABSENT = _Absent()

# Exact types whose instances can never have a ``dtype`` attribute (no class attribute, no
# instance dict): skipping them saves a failing ``hasattr`` per scalar argument on the hot path.
NO_DTYPE: frozenset[type] = frozenset({int, float, bool, str, bytes, complex, type(None)})
try:
    from torch import Tensor  # the common case, tested first: ``type(a) is Tensor``
except ImportError:  # pragma: no cover - torch is a dependency; keep the module importable
    Tensor = None  # type: ignore[assignment,misc]


def _kwargs_dtypes(key: list[Any], kwargs: dict[str, Any], argset: frozenset[str]) -> None:
    """Names and dtypes of keyword args that are kernel args, in call order (after the positional ones)."""
    for name, value in kwargs.items():
        t = type(value)
        if t not in NO_DTYPE and name in argset and (t is Tensor or hasattr(value, "dtype")):
            key += (name, value.dtype)


def _guard(value: Any) -> type | None:
    """The exact type a specialised key may assume for an argument like ``value``, or None where
    only the general code can tell whether it has a dtype."""
    t = type(value)
    return t if t is Tensor or t in NO_DTYPE else None


def make_raw_key(n_args: int, arg_names: list[str], keys: list[str],
                 example: tuple[tuple, dict[str, Any]] | None = None) -> RawKeyFn:
    """A function ``(args, kwargs) -> raw key`` for calls with ``n_args`` positional args.

    With ``example`` (a call seen on the miss path), the function first checks, by exact type,
    that a call looks like the example (same keyword names, each argument of the same type, and
    where two or more tensors come by keyword, their order) and then builds the key as one tuple
    with no loop at all; any other call takes the general code. Both build the same key.
    """
    general = _make_general(n_args, arg_names, keys)
    if example is None or len(example[0]) != n_args or n_args > len(arg_names):
        return general
    args, kwargs = example
    guards = [_guard(a) for a in args] + [_guard(v) for n, v in kwargs.items() if n in arg_names]
    if any(g is None for g in guards) or any(not isinstance(n, str) or not n.isidentifier() for n in kwargs):
        return general
    pos = {n: i for i, n in enumerate(arg_names)}
    used = set(keys) | {n for n, v in [*zip(arg_names, args, strict=False), *kwargs.items()] if type(v) is Tensor}
    checks = [f"len(kwargs) == {len(kwargs)}"]
    values = {}  # kernel-arg name -> the local its guard read it into, in Triton's ``_args`` order
    for i, a in enumerate(args):  # a value the key needs is kept by its guard (``:=``), not read twice
        read = f"a{i} := args[{i}]" if arg_names[i] in used else f"args[{i}]"
        checks.append(f"type({read}) is {_type_name(type(a))}")
        values[arg_names[i]] = f"a{i}"
    for j, (n, v) in enumerate(kwargs.items()):
        if n in pos:
            read = f"k{j} := kwargs.get({n!r}, ABSENT)" if n in used else f"kwargs.get({n!r}, ABSENT)"
            checks.append(f"type({read}) is {_type_name(type(v))}")
            values[n] = f"k{j}"
        else:
            checks.append(f"{n!r} in kwargs")
    if sum(type(v) is Tensor for n, v in kwargs.items() if n in pos) > 1:  # their order is in the key
        checks.append(f"tuple(kwargs) == {tuple(kwargs)!r}")
    parts = [values.get(k, "ABSENT") for k in keys if k in pos]
    for n, expr in values.items():
        if type(_value(n, args, kwargs, pos)) is Tensor:
            parts += [repr(n), f"{expr}.dtype"]
    lines = ["def raw_key(args, kwargs):",
             f"    if {' and '.join(checks)}:",
             f"        return ({''.join(p + ', ' for p in parts)})",
             "    return general(args, kwargs)"]
    scope: dict[str, Any] = {"Tensor": Tensor, "general": general, "ABSENT": ABSENT,
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
    n_named = min(n_args, len(arg_names))  # positional args past the signature are no kernel args
    lines = ["def raw_key(args, kwargs):"]
    names = [f"a{i}" for i in range(n_named)]
    if names:
        rest = ", *_" if n_args > n_named else ""
        lines.append(f"    {', '.join(names)}{',' if len(names) == 1 and not rest else ''}{rest} = args")
    slots = [f"a{pos[k]}" if pos[k] < n_args else f"kwargs.get({k!r}, ABSENT)" for k in keys if k in pos]
    lines.append(f"    key = [{', '.join(slots)}]")
    for i, a in enumerate(names):
        lines += [f"    t = type({a})",
                  f"    if t is Tensor or (t not in NO_DTYPE and hasattr({a}, 'dtype')):",
                  f"        key += ({arg_names[i]!r}, {a}.dtype)"]
    if "grid" in pos or "warmup" in pos:  # the launcher's usual pair is no shortcut for this kernel
        lines.append("    kwargs_dtypes(key, kwargs, argset)")
    else:
        lines += ["    if len(kwargs) != 2 or 'grid' not in kwargs or 'warmup' not in kwargs:",
                  "        kwargs_dtypes(key, kwargs, argset)"]
    lines.append("    return tuple(key)")
    scope: dict[str, Any] = {"Tensor": Tensor, "NO_DTYPE": NO_DTYPE, "kwargs_dtypes": _kwargs_dtypes,
                             "argset": frozenset(arg_names), "ABSENT": ABSENT}
    exec(compile("\n".join(lines), f"<tunevault raw key, {n_args} positional args>", "exec"), scope)  # noqa: S102
    return scope["raw_key"]
