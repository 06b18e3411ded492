"""Settings from the environment and ``install()`` options, validated in one place.

Every option has an environment variable, so a server can be switched without a code change;
an option given to ``install()`` overrides the variable.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

MODES = ("off", "tune", "first")
ON_MISS = ("tune", "fallback", "error", "background")


def default_store_url() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return "sqlite:///" + str(Path(base, "tunevault", "tunevault.db").absolute())


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")  # set but empty reads as off, as it always has
NUMBERS = ("tolerance", "confidence", "tune_timeout", "config_timeout", "lease_wait", "lease_ttl")
FLAGS = ("isolate", "prestart", "validate")


def _flag(var: str, value: str) -> bool:
    """A boolean variable's value; a word that is neither (``enabled``, ``ture``) is refused rather
    than read as off, which would silently switch the option off."""
    word = value.strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise ValueError(f"{var} must be one of {', '.join(TRUE_WORDS)} (on) or {', '.join(FALSE_WORDS[:-1])} "
                     f"(off); got {value!r}")


def _check_types(settings: Settings) -> None:
    """Options given to ``install()`` are not parsed: a string flag (``isolate="no"``) is truthy, and
    a NaN passes every range check (a lease wait of NaN never ends)."""
    for name in FLAGS:
        value = getattr(settings, name)
        if not isinstance(value, bool):
            raise ValueError(f"tunevault {name} must be True or False; got {value!r}")
    for name in NUMBERS:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"tunevault {name} must be a finite number; got {value!r}")
    for name in TEXTS:
        value = getattr(settings, name)
        if not isinstance(value, str) and (value is not None or name == "store"):
            raise ValueError(f"tunevault {name} must be {TEXTS[name]}; got {value!r} ({_type_name(value)})")
    if not isinstance(settings.bundles, tuple) or not all(isinstance(p, str) for p in settings.bundles):
        raise _bad_bundles(settings.bundles)


def _paths(value: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (value or "").split(",") if p.strip())


# Options naming one text value (a URL, a path or a key): anything else given to ``install()`` is
# refused there, rather than failing later where it is read (a kernel call, or the store opening,
# where any error turns the whole store into memory).
TEXTS = {"store": "a URL or a path", "remote": "a URL", "bundle_key": "text", "capture": "a path",
         "events": "a path", "warmup": "a path"}
PATH_OPTIONS = ("capture", "events", "warmup")  # a path: an os.PathLike is taken as its text


def _type_name(value: object) -> str:
    return type(value).__name__


def _bad_bundles(value: object) -> ValueError:
    return ValueError(f"tunevault bundles must be a path, comma-separated paths or a list of paths; "
                      f"got {value!r} ({_type_name(value)})")


def _bundle_paths(value: object) -> tuple[str, ...]:
    """``bundles`` as given to ``install()``: comma-separated text, one path, or a list of them."""
    if isinstance(value, str):
        return _paths(value)
    if isinstance(value, os.PathLike):
        return (os.fspath(value),)
    if isinstance(value, list | tuple) and all(isinstance(v, str | os.PathLike) for v in value):
        return tuple(str(os.fspath(v)) for v in value)
    raise _bad_bundles(value)


def _text_option(name: str, value: object) -> object:
    """A path option's ``os.PathLike`` as text; a store given as a path is that SQLite file."""
    if not isinstance(value, os.PathLike):
        return value
    path = os.fspath(value)
    if not isinstance(path, str):
        raise ValueError(f"tunevault {name} must be {TEXTS[name]}; got {value!r} ({_type_name(value)})")
    if name == "store":
        return "sqlite:///" + str(Path(path).absolute())
    return path if name in PATH_OPTIONS else value


_warned: set[str] = set()
# Variables whose refused value is never replaced by the default: for a signing key the default is
# "no key", which would switch signature checks off.
MUST_HOLD = frozenset({"TUNEVAULT_BUNDLE_KEY"})


def warn_once(problem: str, message: str) -> None:
    """One warning per problem per process: the startup hook (which some Pythons run twice) and
    ``install()`` may all meet the same bad variable."""
    if problem not in _warned:
        _warned.add(problem)
        logging.getLogger("tunevault").warning("%s", message)


# Every TUNEVAULT_* variable tunevault reads (a typo of one is warned about, not silently ignored).
KNOWN_VARIABLES = frozenset({
    "TUNEVAULT_ALLOW_MODULES", "TUNEVAULT_BENCH_GRAPHS", "TUNEVAULT_BENCH_SMOKE", "TUNEVAULT_BUNDLE",
    "TUNEVAULT_BUNDLE_KEY",
    "TUNEVAULT_CAPTURE", "TUNEVAULT_COMPILE_AHEAD", "TUNEVAULT_CONFIDENCE", "TUNEVAULT_CONFIG_TIMEOUT",
    "TUNEVAULT_CPU_BENCH_REPS", "TUNEVAULT_EVENTS", "TUNEVAULT_FUZZ", "TUNEVAULT_ISOLATE",
    "TUNEVAULT_L2_FLUSH_BYTES", "TUNEVAULT_LEASE_TTL", "TUNEVAULT_LEASE_WAIT", "TUNEVAULT_LOG_LEVEL",
    "TUNEVAULT_MODE", "TUNEVAULT_ON_MISS", "TUNEVAULT_PRESTART", "TUNEVAULT_REMOTE", "TUNEVAULT_REPLAY_MAX_BYTES",
    "TUNEVAULT_STORE", "TUNEVAULT_TOLERANCE", "TUNEVAULT_TUNE_TIMEOUT", "TUNEVAULT_VALIDATE", "TUNEVAULT_WARMUP",
    "TUNEVAULT_WARMUP_RUN", "TUNEVAULT_WARMUP_SPAWNED", "TUNEVAULT_WARMUP_WORKER", "TUNEVAULT_WORKER",
    "TUNEVAULT_WORKER_IDLE",
})


def unknown_variables(env: Mapping[str, str]) -> dict[str, str]:
    """Each ``TUNEVAULT_*`` variable tunevault does not read: ``{variable: warning}``, naming the
    known one it is closest to (a plural ``..._BUNDLES`` for ``..._BUNDLE``)."""
    import difflib

    out = {}
    for var in sorted(k for k in env if k.startswith("TUNEVAULT_") and k not in KNOWN_VARIABLES):
        close = difflib.get_close_matches(var, sorted(KNOWN_VARIABLES), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        out[var] = f"tunevault: ignoring {var}: tunevault reads no such variable{hint}"
    return out


def warn_ignored(problem: str) -> None:
    """The one warning for a malformed variable ``install()`` reads and replaces by its default."""
    warn_once(problem, f"tunevault: ignoring {problem}; using the default")


def warn_unknown_variables(env: Mapping[str, str] | None = None) -> None:
    """One warning per misspelled ``TUNEVAULT_*`` variable per process, however tunevault is
    switched on (``install()``, ``TUNEVAULT_MODE`` or the CLI): a typo must not pass silently."""
    for var, warning in unknown_variables(os.environ if env is None else env).items():
        warn_once(var, warning)


def variable(option: str) -> str:
    """The environment variable of an ``install()`` option (``bundles`` reads ``TUNEVAULT_BUNDLE``)."""
    return "TUNEVAULT_BUNDLE" if option == "bundles" else f"TUNEVAULT_{option.upper()}"


def env_problems(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each ``TUNEVAULT_*`` variable that :meth:`Settings.from_env` refuses, judged alone:
    ``{variable: "TUNEVAULT_MODE='bogus': mode must be one of ..."}``."""
    problems = {}
    for var, value in (os.environ if env is None else env).items():
        if not var.startswith("TUNEVAULT_"):
            continue
        try:
            Settings.from_env({var: value})
        except ValueError as exc:
            why = str(exc).removeprefix("tunevault ")
            problems[var] = why if why.startswith(var) else f"{var}={value!r}: {why}"
    return problems


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
    confidence: float = 0.999  # ties: a config loses one only when this sure it is slower (engine.select)
    tune_timeout: float = 300.0
    config_timeout: float = 60.0  # one config in the isolated worker (compile + run)
    lease_wait: float = 600.0
    lease_ttl: float = 30.0
    warmup: str | None = None  # a key manifest warmed up (keys shared with peers) at the first miss
    # Keys of a warmup that helper processes compile ahead of their tuning (engine/ahead.py); None:
    # 16 on a GPU, none under the interpreter (nothing compiles there); 0: off.
    compile_ahead: int | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        if self.mode not in MODES:
            raise ValueError(f"tunevault mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.on_miss not in ON_MISS:
            raise ValueError(f"tunevault on_miss must be one of {', '.join(ON_MISS)}; got {self.on_miss!r}")
        if not 0.0 <= self.tolerance < 1.0:
            raise ValueError(f"tunevault tolerance must be in [0, 1); got {self.tolerance!r}")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"tunevault confidence must be in [0.5, 1); got {self.confidence!r}")
        if self.tune_timeout <= 0 or self.lease_wait < 0:
            raise ValueError("tunevault tune_timeout must be > 0 and lease_wait >= 0")
        if self.config_timeout <= 0:
            raise ValueError(f"tunevault config_timeout must be > 0; got {self.config_timeout!r}")
        if self.lease_ttl <= 0:
            raise ValueError(f"tunevault lease_ttl must be > 0; got {self.lease_ttl!r}")
        if self.compile_ahead is not None and (isinstance(self.compile_ahead, bool) or not isinstance(
                self.compile_ahead, int) or self.compile_ahead < 0):
            raise ValueError(f"tunevault compile_ahead must be a whole number >= 0; got {self.compile_ahead!r}")
        if self.bundle_key is not None and not self.bundle_key.strip():
            from tunevault.store.bundle import EMPTY_KEY  # an empty key must not mean "no signatures"

            raise ValueError(EMPTY_KEY)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        kw: dict[str, object] = {}
        simple = {"mode": "TUNEVAULT_MODE", "on_miss": "TUNEVAULT_ON_MISS", "store": "TUNEVAULT_STORE",
                  "remote": "TUNEVAULT_REMOTE", "bundle_key": "TUNEVAULT_BUNDLE_KEY",
                  "capture": "TUNEVAULT_CAPTURE", "events": "TUNEVAULT_EVENTS", "warmup": "TUNEVAULT_WARMUP"}
        for name, var in simple.items():
            if e.get(var) or (name == "bundle_key" and var in e):  # an empty key is an error, not "no key"
                kw[name] = e[var].strip().lower() if name in ("mode", "on_miss") else e[var]
        if e.get("TUNEVAULT_BUNDLE"):
            kw["bundles"] = _paths(e["TUNEVAULT_BUNDLE"])
        for name, var in (("isolate", "TUNEVAULT_ISOLATE"), ("validate", "TUNEVAULT_VALIDATE"),
                          ("prestart", "TUNEVAULT_PRESTART")):
            if var in e:
                kw[name] = _flag(var, e[var])
        for name, var in (("tolerance", "TUNEVAULT_TOLERANCE"), ("confidence", "TUNEVAULT_CONFIDENCE"),
                          ("tune_timeout", "TUNEVAULT_TUNE_TIMEOUT"),
                          ("config_timeout", "TUNEVAULT_CONFIG_TIMEOUT"),
                          ("lease_wait", "TUNEVAULT_LEASE_WAIT"), ("lease_ttl", "TUNEVAULT_LEASE_TTL")):
            if e.get(var):
                try:
                    kw[name] = float(e[var])
                except ValueError:
                    raise ValueError(f"{var} must be a number; got {e[var]!r}") from None
        if e.get("TUNEVAULT_COMPILE_AHEAD"):
            value = e["TUNEVAULT_COMPILE_AHEAD"].strip()
            if not value.isdigit():
                raise ValueError(f"TUNEVAULT_COMPILE_AHEAD must be a whole number >= 0; got {value!r}")
            kw["compile_ahead"] = int(value)
        return cls(**kw)  # type: ignore[arg-type]

    def with_options(self, **options: object) -> Settings:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown tunevault option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        given = {k: _text_option(k, v) for k, v in options.items() if v is not None}
        if "bundles" in given:
            given["bundles"] = _bundle_paths(given["bundles"])
        return replace(self, **given)  # type: ignore[arg-type]

    @classmethod
    def for_install(cls, **options: object) -> Settings:
        """``install()``'s settings: its explicit options win and their variables are not even read;
        a bad variable it does read is one warning per process, and its default is used."""
        env = {k: v for k, v in os.environ.items() if k.startswith("TUNEVAULT_")}
        for name, value in options.items():
            if value is not None:
                env.pop(variable(name), None)
        for var, problem in env_problems(env).items():
            if var in MUST_HOLD:
                raise ValueError(problem)
            warn_ignored(problem)
            del env[var]
        warn_unknown_variables(env)
        return cls.from_env(env).with_options(**options)
