"""Settings from the environment and ``install()`` options, validated in one place.

Every option has an environment variable, so a server can be switched without a code change;
an option given to ``install()`` overrides the variable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

MODES = ("off", "tune", "first")
ON_MISS = ("tune", "fallback", "error", "background")


def default_store_url() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return "sqlite:///" + str(Path(base, "tunevault", "tunevault.db").absolute())  # four slashes: absolute


_ENV = {"mode": "TUNEVAULT_MODE", "on_miss": "TUNEVAULT_ON_MISS", "store": "TUNEVAULT_STORE",
        "remote": "TUNEVAULT_REMOTE", "bundles": "TUNEVAULT_BUNDLE", "bundle_key": "TUNEVAULT_BUNDLE_KEY",
        "capture": "TUNEVAULT_CAPTURE", "events": "TUNEVAULT_EVENTS", "isolate": "TUNEVAULT_ISOLATE",
        "prestart": "TUNEVAULT_PRESTART", "validate": "TUNEVAULT_VALIDATE", "tolerance": "TUNEVAULT_TOLERANCE",
        "tune_timeout": "TUNEVAULT_TUNE_TIMEOUT", "config_timeout": "TUNEVAULT_CONFIG_TIMEOUT",
        "lease_wait": "TUNEVAULT_LEASE_WAIT", "lease_ttl": "TUNEVAULT_LEASE_TTL"}
_FLAGS = ("isolate", "prestart", "validate")  # read when set at all ("" is off)
_NUMBERS = ("tolerance", "tune_timeout", "config_timeout", "lease_wait", "lease_ttl")
_warned: set[str] = set()


def warn_once(problem: str, message: str) -> None:
    """One warning per problem per process: the startup hook (which some Pythons run twice) and
    ``install()`` may all meet the same bad variable."""
    if problem not in _warned:
        _warned.add(problem)
        logging.getLogger("tunevault").warning("%s", message)


def _problem(name: str, value: object) -> str | None:
    """What is wrong with one setting's value, as the end of a sentence; None when it is fine."""
    if name == "mode" and value not in MODES:
        return f"must be one of {', '.join(MODES)}; got {value!r}"
    if name == "on_miss" and value not in ON_MISS:
        return f"must be one of {', '.join(ON_MISS)}; got {value!r}"
    if name == "tolerance" and not (isinstance(value, int | float) and 0.0 <= value < 1.0):
        return f"must be in [0, 1); got {value!r}"
    if name in ("tune_timeout", "config_timeout", "lease_ttl") and not (isinstance(value, int | float)
                                                                        and value > 0):
        return f"must be > 0; got {value!r}"
    if name == "lease_wait" and not (isinstance(value, int | float) and value >= 0):
        return f"must be >= 0; got {value!r}"
    return None


def _given(options: Mapping[str, object]) -> set[str]:
    return {k for k, v in options.items() if v is not None}


def _from_env(env: Mapping[str, str], given: set[str]) -> tuple[dict[str, object], dict[str, str]]:
    """Field values from the variables not overridden by ``given``, and a message per bad variable."""
    values: dict[str, object] = {}
    problems: dict[str, str] = {}
    for name, var in _ENV.items():
        raw = env.get(var)
        if name in given or raw is None or (not raw.strip() and name not in _FLAGS):
            continue
        value: object = raw
        if name in ("mode", "on_miss"):
            value = raw.strip().lower()
        elif name == "bundles":
            value = _paths(raw)
        elif name in _FLAGS:
            value = _flag(raw)
        elif name in _NUMBERS:
            try:
                value = float(raw)
            except ValueError:
                problems[name] = f"{var}={raw!r}: must be a number"
                continue
        problem = _problem(name, value)
        if problem:
            problems[name] = f"{var}={raw!r}: {name} {problem}"
        else:
            values[name] = value
    return values, problems


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _paths(value: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (value or "").split(",") if p.strip())


@dataclass(frozen=True)
class Settings:
    mode: str = "off"
    on_miss: str = "tune"
    store: str = field(default_factory=default_store_url)
    remote: str | None = None
    bundles: tuple[str, ...] = ()
    bundle_key: str | None = None
    capture: str | None = None
    events: str | None = None
    isolate: bool = False
    prestart: bool = True  # start the isolated worker at install, so its start-up overlaps the server's
    validate: bool = False
    tolerance: float = 0.02
    tune_timeout: float = 300.0
    config_timeout: float = 60.0  # one config in the isolated worker (compile + run)
    lease_wait: float = 600.0
    lease_ttl: float = 30.0

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = _problem(f.name, getattr(self, f.name))
            if problem:
                raise ValueError(f"tunevault {f.name} {problem}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **options: object) -> Settings:
        """``TUNEVAULT_*`` with ``options`` on top: a given option wins, its variable is not even read.

        A bad value of a variable that is read is a ValueError naming the variable and its value.
        """
        values, problems = _from_env(os.environ if env is None else env, _given(options))
        if problems:
            raise ValueError("; ".join(problems.values()))
        return cls(**values).with_options(**options)  # type: ignore[arg-type]

    @classmethod
    def for_install(cls, env: Mapping[str, str] | None = None, **options: object) -> Settings:
        """As :meth:`from_env`, but a bad variable is one warning per process and its default is used:
        ``install()``'s explicit arguments must work whatever the environment says."""
        values, problems = _from_env(os.environ if env is None else env, _given(options))
        for problem in problems.values():
            warn_once(problem, f"tunevault: ignoring {problem}; using the default")
        return cls(**values).with_options(**options)  # type: ignore[arg-type]

    def with_options(self, **options: object) -> Settings:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown tunevault option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        given = {k: v for k, v in options.items() if v is not None}
        if isinstance(given.get("bundles"), str):
            given["bundles"] = _paths(given["bundles"])  # type: ignore[arg-type]
        return replace(self, **given)  # type: ignore[arg-type]
