"""Configs chosen without timing, and stock's final launch.

``mode="first"`` launches the first pruned config that builds and runs; a compile-only call
(``warmup=True``) compiles the pruned configs and launches the first that builds; a fallback
probes for the first config that compiles. None of them times anything or stores a decision.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tunevault.core.machine import interpreting
from tunevault.core.model import TuningError
from tunevault.engine.failures import losing_errors
from tunevault.policy import stock
from tunevault.policy.fallback import describe_config

if TYPE_CHECKING:
    from triton import Config
    from triton.runtime.autotuner import Autotuner

    from tunevault.core.kernel_state import KernelState

log = logging.getLogger("tunevault")

Indexed = list[tuple[int, "Config"]]  # (declared index, or len(configs)+j for a config prune made up; the Config)
NOT_LAUNCHED = object()  # a choice made without launching it: the caller launches


def compile_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "this config does not build here" for ``mode="first"`` and the fallback's
    probe: the ones that make a config lose in stock's benchmark, and any compile error."""
    import triton.compiler.errors as ce
    import triton.runtime.errors as re

    # The interpreter has no compile step: a failing static_assert surfaces as InterpreterError.
    names = [(ce, "CompilationError"), (re, "InterpreterError")]
    return losing_errors() + tuple(getattr(m, n) for m, n in names if hasattr(m, n))


def launch(autotuner: Autotuner, args: tuple, kwargs: dict[str, Any], config: Config, cfg_kwargs: dict[str, Any],
           pre_hook: Callable[..., Any] | None) -> Any:
    """Stock's final launch of the decided config: ``best_config``, the config's ``pre_hook``, the run.
    Takes a KernelState hit as it is stored: (config, its launch kwargs, its pre_hook)."""
    autotuner.best_config = config
    if pre_hook is not None:
        pre_hook({**dict(zip(autotuner.arg_names, args, strict=False)), **kwargs, **cfg_kwargs})
    return autotuner.fn.run(*args, **kwargs, **cfg_kwargs)


def compile_only(st: KernelState, args: tuple, kwargs: dict[str, Any], indexed: Indexed) -> tuple[Config, Any]:
    """A compile-only call (``warmup=True``) for an undecided key: its launches only compile, so
    timing them would decide on noise (every config ties, the first wins) and stock would keep that
    choice. Here each pruned config is compiled as stock's benchmark runs it (its hooks, once, not
    timed), and the first that builds is launched, as stock launches its pick, returning what that
    launch returns. Nothing is stored or remembered: the key's first real call decides it."""
    at, losing = st.autotuner, losing_errors()
    chosen = indexed[0][1]
    if len(indexed) > 1 or not stock.single_pruned_skips_benchmark():  # stock benchmarks these
        from tunevault.engine.inprocess import make_kernel_call

        built = None
        for _index, config in indexed:
            try:
                make_kernel_call(at, args, kwargs, at.nargs, config)()
            except losing:  # stock's benchmark gives it inf: it cannot be the pick
                continue
            built = config if built is None else built
        chosen = chosen if built is None else built
        at.pre_hook({**at.nargs, **kwargs, **chosen.all_kwargs()}, reset_only=True)
    return chosen, launch(at, args, kwargs, chosen, chosen.all_kwargs(), chosen.pre_hook)


def first_working(st: KernelState, args: tuple, kwargs: dict[str, Any], indexed: Indexed) -> tuple[Config, Any]:
    """The first pruned config that builds and runs, never timed (``mode="first"``).

    Where the autotuner has hooks (its own pre/post hook, ``reset_to_zero``, ``restore_value``),
    each config is tried once as Triton's benchmark runs it, so a post_hook sees a config's
    failure, and the winner then launches. Without hooks that trial would be the launch itself:
    the launch is the trial, and the kernel runs once.
    """
    at, errors, failures = st.autotuner, compile_errors(), []
    hooked = at.user_defined_pre_hook or at.user_defined_post_hook or at.reset_to_zero or at.restore_value
    chosen, launched = (indexed[0] if len(indexed) == 1 else None), NOT_LAUNCHED
    for index, config in indexed if chosen is None else ():  # a single config is not tried: stock's rule
        try:
            if hooked:
                from tunevault.engine.inprocess import make_kernel_call

                make_kernel_call(at, args, kwargs, at.nargs, config)()
                at.pre_hook({**at.nargs, **kwargs, **config.all_kwargs()}, reset_only=True)
            else:
                launched = launch(at, args, kwargs, config, config.all_kwargs(), config.pre_hook)
        except errors as exc:
            failures.append(f"{type(exc).__name__}: {exc}"[:300])
            continue
        chosen = (index, config)
        break
    if chosen is None:
        raise TuningError(f"{st.kernel_id.name}: no config compiles for this call; errors: {'; '.join(failures)}")
    log_first(st, *chosen)
    return chosen[1], launched


def log_first(st: KernelState, index: int, config: Config) -> None:
    """``mode="first"``'s one line per kernel (the first time it decides a key)."""
    if not st.first_logged:
        st.first_logged = True
        log.info("tunevault[first]: %s: %d candidate configs, picked #%d %s", st.kernel_id.name,
                 len(st.autotuner.configs), index if index < len(st.autotuner.configs) else -1, describe_config(config))


def first_compiling(st: KernelState, args: tuple, kwargs: dict[str, Any], configs: list[Config]) -> Config:
    """First config whose kernel compiles for these arguments, found without launching it."""
    return next((config for config in configs if builds(st, args, kwargs, config)), configs[0])


def builds(st: KernelState, args: tuple, kwargs: dict[str, Any], config: Config) -> bool:
    """Whether ``config`` compiles for these arguments and its module loads on this device, found
    without launching it; True where this cannot be told (the interpreter: the launch decides)."""
    if interpreting():
        return True  # nothing compiles ahead of a launch there
    fn, losing = st.autotuner.fn, compile_errors()
    try:
        kernel = fn.warmup(*args, **{k: v for k, v in kwargs.items() if k != "warmup"}, **config.all_kwargs())
    except losing:
        return False
    except Exception:
        return True  # this Triton cannot compile ahead for these arguments: let the launch decide
    try:
        # Loading the module is where Triton finds a config that compiles but does not fit the
        # device (shared memory, tensor memory): OutOfResources, which warmup alone never raises.
        init = getattr(kernel, "_init_handles", None)
        if callable(init):
            init()
    except losing:
        return False
    return True
