"""Kernel, config and environment identities, on real Triton kernels under the interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this module

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from tunevault.core.identity import (  # noqa: E402
    _source,
    config_spec,
    current_fingerprint,
    forget_kernel_id,
    json_scalar,
    kernel_id,
    provenance,
)
from tunevault.core.model import ConfigSpec, Fingerprint, canonical_json, digest  # noqa: E402

HELPERS = """
import triton
import triton.language as tl  # noqa: F401  (the interpreter patches it in every helper's globals)

@triton.jit
def twice(x):
    return x * 2
"""

KERNEL = """
import triton
import triton.language as tl
import {helpers} as hm

SCALE = tl.constexpr({scale})


@triton.jit
def helper(x):
    return x + {offset}


@triton.autotune(configs=[triton.Config({{"BLOCK": 16}}, num_warps=1), {extra_config}], key=["n"])
@triton.jit
def kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, hm.twice(helper(x)) * SCALE, mask=mask)
"""


def load(tmp_path: Path, text: str, pad: int = 0):
    """Import ``text`` as a fresh module from its own file (optionally moved down ``pad`` lines)."""
    name = f"tv_mod_{uuid.uuid4().hex[:12]}"
    path = tmp_path / f"{name}.py"
    path.write_text("\n" * pad + textwrap.dedent(text))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def kernel_module(tmp_path, pad=0, helpers=HELPERS, scale=2, offset=1, extra_config=None):
    hm = load(tmp_path, helpers)
    extra_config = extra_config or 'triton.Config({"BLOCK": 32}, num_warps=2)'
    return load(tmp_path, KERNEL.format(helpers=hm.__name__, scale=scale, offset=offset,
                                        extra_config=extra_config), pad=pad)


def run_kernel(autotuner, n=50, block=16):
    """Launch below the Autotuner: its benchmarker needs a GPU driver even under the interpreter."""
    x = torch.arange(n, dtype=torch.float32)
    y = torch.empty_like(x)
    autotuner.fn[(triton.cdiv(n, block),)](x, y, n, BLOCK=block)
    return x, y


def test_moving_the_kernel_down_keeps_its_identity(tmp_path):
    a = kernel_module(tmp_path).kernel
    b = kernel_module(tmp_path, pad=25).kernel
    assert b.base_fn.__code__.co_firstlineno == a.base_fn.__code__.co_firstlineno + 25
    assert kernel_id(a).source_hash == kernel_id(b).source_hash
    assert kernel_id(a).configs_hash == kernel_id(b).configs_hash
    assert kernel_id(a).name.endswith(":kernel") and kernel_id(a).key_names == ("n",)


def test_source_hash_is_the_same_in_another_process(tmp_path):
    mod = kernel_module(tmp_path)
    code = (
        "import importlib.util, json, sys\n"
        "from tunevault.core.identity import kernel_id\n"
        f"h = importlib.util.spec_from_file_location({mod.hm.__name__!r}, {mod.hm.__file__!r})\n"
        "sys.modules[h.name] = m = importlib.util.module_from_spec(h); h.loader.exec_module(m)\n"
        f"s = importlib.util.spec_from_file_location('k', {mod.__file__!r})\n"
        "k = importlib.util.module_from_spec(s); s.loader.exec_module(k)\n"
        "print(json.dumps(kernel_id(k.kernel).to_json()))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    mine = kernel_id(mod.kernel)
    assert (theirs["source_hash"], theirs["configs_hash"]) == (mine.source_hash, mine.configs_hash)


def test_edits_to_the_body_a_helper_or_a_constexpr_change_source_hash(tmp_path):
    base = kernel_id(kernel_module(tmp_path).kernel).source_hash
    edited_helper = kernel_id(kernel_module(tmp_path, offset=3).kernel).source_hash
    edited_module_helper = kernel_id(kernel_module(tmp_path, helpers=HELPERS.replace("* 2", "* 3")).kernel)
    edited_constexpr = kernel_id(kernel_module(tmp_path, scale=4).kernel).source_hash
    assert len({base, edited_helper, edited_module_helper.source_hash, edited_constexpr}) == 4

    body = load(tmp_path, textwrap.dedent(KERNEL).replace("offs < n", "offs < n - 1").format(
        helpers=load(tmp_path, HELPERS).__name__, scale=2, offset=1,
        extra_config='triton.Config({"BLOCK": 32}, num_warps=2)'))
    assert kernel_id(body.kernel).source_hash != base


def test_config_list_edit_changes_configs_hash_only(tmp_path):
    a = kernel_id(kernel_module(tmp_path).kernel)
    b = kernel_id(kernel_module(tmp_path, extra_config='triton.Config({"BLOCK": 32}, num_warps=4)').kernel)
    assert a.source_hash == b.source_hash
    assert a.configs_hash != b.configs_hash
    assert a.digest != b.digest


def test_kernel_still_runs_and_identity_is_cached_off_the_object(tmp_path):
    mod = kernel_module(tmp_path)
    before = kernel_id(mod.kernel)
    x, y = run_kernel(mod.kernel)
    torch.testing.assert_close(y, (x + 1) * 2 * 2)
    assert kernel_id(mod.kernel) is before
    twin = kernel_module(tmp_path)  # a fresh object: computed again, after the interpreter has run
    run_kernel(twin.kernel)
    assert kernel_id(twin.kernel).source_hash == before.source_hash
    assert not any(isinstance(v, type(before)) for v in vars(mod.kernel).values())


def test_heuristics_wrapped_kernel(tmp_path):
    mod = load(tmp_path, """
        import triton
        import triton.language as tl

        @triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 64})], key=["n"])
        @triton.heuristics({"EVEN": lambda args: args["n"] % args["BLOCK"] == 0})
        @triton.jit
        def kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, EVEN: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            if EVEN:
                tl.store(y_ptr + offs, tl.load(x_ptr + offs) + 1)
            else:
                tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)
    """)
    kid = kernel_id(mod.kernel)
    assert kid.name == f"{mod.__name__}:kernel"
    assert kid.key_names == ("n",)
    x, y = run_kernel(mod.kernel, n=40)
    torch.testing.assert_close(y, x + 1)
    assert kernel_id(mod.kernel) == kid


RECIPE_GLOBALS = """
import triton
import triton.language as tl

THRESHOLD = {threshold}


def wide_enough(n):
    return n >= THRESHOLD


def prune(configs, nargs, **kwargs):
    return [c for c in configs if wide_enough(nargs["n"]) or c.kwargs["BLOCK"] == 16]


@triton.autotune(configs=[triton.Config({{"BLOCK": 16}}), triton.Config({{"BLOCK": 64}})], key=["n"],
                 prune_configs_by={{"early_config_prune": prune}})
@triton.heuristics({{"EVEN": lambda args: args["n"] % THRESHOLD == 0}})
@triton.jit
def kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)
"""


def test_globals_read_by_heuristics_and_pruning_are_part_of_the_identity(tmp_path):
    """A threshold global that moves which configs pruning keeps (through a helper function) or what
    a heuristic sets changes the kernel's identity: a decision tuned under the old value is not
    launched under the new one."""
    def source_hash(threshold: int) -> str:  # the same module name each time: only THRESHOLD differs
        folder = tmp_path / uuid.uuid4().hex
        folder.mkdir()
        path = folder / "tv_recipe_globals.py"
        path.write_text(RECIPE_GLOBALS.format(threshold=threshold))
        spec = importlib.util.spec_from_file_location("tv_recipe_globals", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["tv_recipe_globals"] = mod
        try:
            spec.loader.exec_module(mod)
            return kernel_id(mod.kernel).source_hash
        finally:
            del sys.modules["tv_recipe_globals"]

    assert source_hash(32) == source_hash(32)
    assert source_hash(32) != source_hash(4096)


RECIPE_INPUTS = """
import triton
import triton.language as tl
import tv_recipe_settings as S

{prelude}

@triton.autotune(configs=[triton.Config({{"BLOCK": 16}}), triton.Config({{"BLOCK": 32}})], key=["n"],
                 prune_configs_by={{"early_config_prune": {prune}}})
@triton.heuristics({{"K": lambda args: {heuristic}}})
@triton.jit
def kernel(x_ptr, n, BLOCK: tl.constexpr, K: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * K, mask=offs < n)
"""

PRUNE_BY_LIMIT = """
def prune(configs, nargs, **kwargs):
    return [c for c in configs if c.kwargs["BLOCK"] <= {limit}]
"""

CALLABLE_PRUNE = """
class Limit:
    def __init__(self, limit):
        self.limit = limit

    def __call__(self, configs, nargs, **kwargs):
        return [c for c in configs if c.kwargs["BLOCK"] {op} self.limit]

    def prune(self, configs, nargs, **kwargs):
        return [c for c in configs if c.kwargs["BLOCK"] {op} self.limit]
"""


def recipe_source_hash(tmp_path: Path, settings: str, prelude: str, prune: str = "prune",
                       heuristic: str = "1") -> str:
    """The kernel's source hash with a settings module and a kernel module of fixed names: only
    what the texts say differs between two calls."""
    folder = tmp_path / uuid.uuid4().hex
    folder.mkdir()
    (folder / "tv_recipe_settings.py").write_text(textwrap.dedent(settings))
    (folder / "tv_recipe_inputs.py").write_text(RECIPE_INPUTS.format(prelude=textwrap.dedent(prelude),
                                                                     prune=prune, heuristic=heuristic))
    mods = {}
    try:
        for name in ("tv_recipe_settings", "tv_recipe_inputs"):
            spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
            mods[name] = sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mods[name])
        return kernel_id(mods["tv_recipe_inputs"].kernel).source_hash
    finally:
        for name in mods:
            del sys.modules[name]


PRUNE_INPUT_CASES = {
    # a scalar read through a module attribute
    "module_attribute": ("MAXB = {v}", PRUNE_BY_LIMIT.format(limit="S.MAXB"), "prune", "1"),
    # a helper called through a module attribute
    "helper_through_module": ("def limit():\n    return {v}\n", PRUNE_BY_LIMIT.format(limit="S.limit()"),
                               "prune", "1"),
    "global_tuple": ("", "LIMITS = ({v}, 8)\n" + PRUNE_BY_LIMIT.format(limit="LIMITS[0]"), "prune", "1"),
    "global_frozenset": ("", "OK = frozenset({{16, {v}}})\n"
                          "def prune(configs, nargs, **kwargs):\n"
                          "    return [c for c in configs if c.kwargs['BLOCK'] in OK]\n", "prune", "1"),
    "callable_object_state": ("", CALLABLE_PRUNE.format(op="<=") + "prune = Limit({v})\n", "prune", "1"),
    "callable_object_body": ("", CALLABLE_PRUNE.format(op="{op}") + "prune = Limit(16)\n", "prune", "1"),
    "bound_method_self": ("", CALLABLE_PRUNE.format(op="<=") + "prune = Limit({v}).prune\n", "prune", "1"),
    "keyword_only_default": ("", "MAXB = {v}\n"
                              "def prune(configs, nargs, *, limit=MAXB, **kwargs):\n"
                              "    return [c for c in configs if c.kwargs['BLOCK'] <= limit]\n", "prune", "1"),
    "heuristic_global_tuple": ("", "T = ({v},)\n" + PRUNE_BY_LIMIT.format(limit="64"), "prune", "T[0]"),
    "heuristic_module_attribute": ("MAXB = {v}", PRUNE_BY_LIMIT.format(limit="64"), "prune", "S.MAXB"),
}


@pytest.mark.parametrize("case", sorted(PRUNE_INPUT_CASES))
def test_what_a_prune_function_or_heuristic_reads_is_part_of_the_identity(tmp_path, case):
    """A prune function's or a heuristic's real inputs (module attributes, helpers reached through
    a module, containers, a callable object's state and ``__call__`` body, a bound method's ``self``,
    keyword-only defaults) change the identity: a decision made under other inputs is not reused."""
    settings, prelude, prune, heuristic = PRUNE_INPUT_CASES[case]

    def source_hash(v: int, op: str = "<=") -> str:
        fill = {"v": v, "op": op}
        return recipe_source_hash(tmp_path, settings.format(**fill), prelude.format(**fill), prune,
                                  heuristic.format(**fill))

    if case == "callable_object_body":
        assert source_hash(32, "<=") == source_hash(32, "<=")
        assert source_hash(32, "<=") != source_hash(32, "<")
    else:
        assert source_hash(32) == source_hash(32)
        assert source_hash(32) != source_hash(64)


PLAIN_KERNEL = """
import triton
import triton.language as tl

LIMIT = 32


@triton.autotune(configs=[triton.Config({"BLOCK": 16}, num_warps=1), triton.Config({"BLOCK": 32}, num_warps=1)],
                 key=["n"])
@triton.jit
def kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m) * 2, mask=m)


@triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["n"])
@triton.heuristics({"EVEN": lambda args: args["n"] % LIMIT == 0})
@triton.jit
def scalar_heuristic(x_ptr, n, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32) + EVEN)
"""


def test_plain_kernels_keep_the_identity_existing_stores_hold(tmp_path):
    """Identities are store keys: a kernel without pruning, pre_hooks, container-reading heuristics
    or jit options hashes as it always has, so stores made by earlier versions stay valid."""
    path = tmp_path / "tv_plain_kernel.py"
    path.write_text(PLAIN_KERNEL)
    spec = importlib.util.spec_from_file_location("tv_plain_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # a fixed module name: a heuristic's identity names its module
    assert kernel_id(mod.kernel).source_hash == "3c33da3007053730"
    assert kernel_id(mod.kernel).configs_hash == "1c213cf81ad06eee"
    assert kernel_id(mod.scalar_heuristic).source_hash == "d42f74695b99d9ae"


SET_INPUTS = """
import functools
import triton
import triton.language as tl

CONFIGS = [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})]


def by_default(configs, nargs, allowed=frozenset({"a", "b", "c", "d", "e", "f"}), **kwargs):
    return configs


def by_keyword(configs, nargs, dtypes=None, **kwargs):
    return configs


def make_closure():
    allowed = {"float32", "float16", "bfloat16", "int8", "int32", "int64"}

    def prune(configs, nargs, **kwargs):
        return [c for c in configs if str(nargs["x_ptr"].dtype) in allowed] or configs
    return prune


def body(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32))


kernels = [
    triton.autotune(configs=CONFIGS, key=[], prune_configs_by={"early_config_prune": prune})(triton.jit(body))
    for prune in (by_default, functools.partial(by_keyword, dtypes={"float32", "float16", "bfloat16", "int8"}),
                  make_closure())
]
"""


MEMOISING_PRUNE = """
import triton
import triton.language as tl

SEEN = {}  # a cache the prune function fills as the process runs
CALLS = []


def prune(configs, nargs, **kwargs):
    SEEN.setdefault(nargs["n"], len(SEEN))
    CALLS.append(nargs["n"])
    return configs


@triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["n"],
                 prune_configs_by={"early_config_prune": prune})
@triton.jit
def kernel(x_ptr, n, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32), mask=tl.arange(0, BLOCK) < n)
"""


def test_a_cache_a_prune_function_fills_leaves_the_identity_alone(tmp_path):
    """A mutable container (list, dict, set) a prune function reads counts by its type only: its
    contents may be a cache the process fills, and an identity that moved with it made a restarted
    process, whose cache held other calls, tune every key again."""
    import importlib

    path = tmp_path / "tv_memoising_prune.py"
    path.write_text(MEMOISING_PRUNE)
    sys.path.insert(0, str(tmp_path))
    try:
        mod = importlib.import_module("tv_memoising_prune")
        before = kernel_id(mod.kernel).digest
        forget_kernel_id(mod.kernel)
        mod.SEEN.update({40: 0, 48: 1})
        mod.CALLS.extend([40, 48, 40])
        assert kernel_id(mod.kernel).digest == before
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("tv_memoising_prune", None)


def test_sets_a_prune_function_holds_hash_the_same_in_every_process(tmp_path):
    """Sets in a prune function's defaults, a partial's arguments or a closure iterate in an order
    that follows ``PYTHONHASHSEED``: their identity spells them sorted, so a restarted process
    finds its decisions."""
    path = tmp_path / "tv_set_inputs.py"
    path.write_text(SET_INPUTS)
    code = (
        "import importlib.util, json, sys\n"
        "from tunevault.core.identity import kernel_id\n"
        f"s = importlib.util.spec_from_file_location('tv_set_inputs', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m)\n"
        "print(json.dumps([kernel_id(k).source_hash for k in m.kernels]))\n"
    )
    seen = []
    for seed in ("1", "2", "3"):
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
        seen.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert seen[0] == seen[1] == seen[2]
    assert len(set(seen[0])) == 3


PRE_HOOK_KERNEL = """
import triton
import triton.language as tl

SCALE = 2


def zero(nargs):
    nargs["x_ptr"].{body}


@triton.autotune(configs=[triton.Config({{"BLOCK": 16}}, pre_hook={hook}), triton.Config({{"BLOCK": 32}})], key=[])
@triton.jit
def kernel(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.load(x_ptr + tl.arange(0, BLOCK)) + 1)
"""


def test_a_config_pre_hook_is_identified_by_what_it_computes(tmp_path):
    """A config's pre_hook runs before every launch of the config: a changed body, another lambda
    in its place or a global it reads changes the configs' identity, not only a changed name."""
    def configs_hash(body: str = "zero_()", hook: str = "zero") -> str:
        folder = tmp_path / uuid.uuid4().hex
        folder.mkdir()
        (folder / "tv_pre_hook.py").write_text(PRE_HOOK_KERNEL.format(body=body, hook=hook))
        spec = importlib.util.spec_from_file_location("tv_pre_hook", folder / "tv_pre_hook.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        x = torch.ones(32)
        mod.kernel.configs[0].pre_hook({"x_ptr": x})
        mod.kernel.fn[(1,)](x, BLOCK=32)  # the hook and the kernel run as written
        return kernel_id(mod.kernel).configs_hash

    assert configs_hash() == configs_hash()
    assert configs_hash() != configs_hash(body="fill_(1.0)")
    lam = 'lambda nargs: nargs["x_ptr"].{}'
    assert configs_hash(hook=lam.format("zero_()")) == configs_hash(hook=lam.format("zero_()"))
    assert configs_hash(hook=lam.format("zero_()")) != configs_hash(hook=lam.format("mul_(SCALE)"))


JIT_OPTIONS_KERNEL = """
import triton
import triton.language as tl


@triton.jit{helper_options}
def helper(x):
    return x + 1


@triton.autotune(configs=[triton.Config({{"BLOCK": 16}}), triton.Config({{"BLOCK": 32}})], key=["n"])
@triton.jit{kernel_options}
def kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, helper(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)
"""


def test_jit_options_that_change_generated_code_are_part_of_the_identity(tmp_path):
    """``noinline`` on a helper (stock's cache key has it), ``debug``, ``do_not_specialize`` and
    ``do_not_specialize_on_alignment`` on the kernel change the code a config runs as, so a decision
    made without them is not reused; default options add nothing."""
    def source_hash(helper_options: str = "", kernel_options: str = "") -> str:
        mod = load(tmp_path, JIT_OPTIONS_KERNEL.format(helper_options=helper_options, kernel_options=kernel_options))
        x = torch.zeros(20)
        mod.kernel.fn[(2,)](x, 20, BLOCK=16)
        torch.testing.assert_close(x, torch.ones(20))
        return kernel_id(mod.kernel).source_hash

    plain = source_hash()
    assert source_hash("(noinline=False)", "(debug=False)") == plain
    variants = [source_hash("(noinline=True)"), source_hash(kernel_options="(debug=True)"),
                source_hash(kernel_options='(do_not_specialize=["n"])'),
                source_hash(kernel_options='(do_not_specialize_on_alignment=["x_ptr"])')]
    assert len({plain, *variants}) == 5


def test_closure_values_and_mutual_recursion(tmp_path):
    mod = load(tmp_path, """
        import triton
        import triton.language as tl

        @triton.jit
        def ping(x):
            return pong(x)

        @triton.jit
        def pong(x):
            return ping(x)

        def make(scale):
            S = tl.constexpr(scale)

            @triton.autotune(configs=[triton.Config({"BLOCK": 16})], key=[])
            @triton.jit
            def kernel(x_ptr, BLOCK: tl.constexpr):
                tl.store(x_ptr, ping(tl.load(x_ptr)) * S)
            return kernel
    """)
    two, three = kernel_id(mod.make(2)), kernel_id(mod.make(3))
    assert two.source_hash != three.source_hash
    assert two.source_hash == kernel_id(mod.make(2)).source_hash
    assert two.name.endswith(":make.<locals>.kernel")


def test_a_benchmarker_of_its_own_is_part_of_the_identity_and_the_default_adds_nothing(tmp_path):
    """Autotuners that measure differently may decide differently: a ``do_bench`` given to one, or
    an Autotuner subclass (its name and its methods), changes the identity. With Triton's default
    benchmarker the identity is what it always was (existing stores stay valid)."""
    mod = load(tmp_path, """
        import triton
        import triton.language as tl
        from triton.runtime.autotuner import Autotuner

        LIMIT = 64

        def bench_a(kernel_call, quantiles):
            kernel_call()
            return [1.0] * 3

        def bench_b(kernel_call, quantiles):
            kernel_call()
            return [2.0] * 3

        def bench_limited(kernel_call, quantiles):
            kernel_call()
            return [float(LIMIT)] * 3

        class Own(Autotuner):
            def _bench(self, *args, config, **meta):
                return [1.0] * 3

        class OtherOwn(Autotuner):
            def _bench(self, *args, config, **meta):
                return [2.0] * 3

        @triton.jit
        def body(x_ptr, n, BLOCK: tl.constexpr):
            tl.store(x_ptr + tl.program_id(0), BLOCK)

        def configs():
            return [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})]

        plain = triton.autotune(configs(), key=["n"])(body)
        a = triton.autotune(configs(), key=["n"], do_bench=bench_a)(body)
        a2 = triton.autotune(configs(), key=["n"], do_bench=bench_a)(body)
        b = triton.autotune(configs(), key=["n"], do_bench=bench_b)(body)
        limited = triton.autotune(configs(), key=["n"], do_bench=bench_limited)(body)
        own = Own(body, body.arg_names, configs(), ["n"], None, None)
        other_own = OtherOwn(body, body.arg_names, configs(), ["n"], None, None)
    """)
    plain = kernel_id(mod.plain)
    assert plain.source_hash == digest({"kernel": _source(mod.body), "deps": [], "constexprs": []})
    mod.plain.__dict__["do_bench"] = print  # what stock's cached do_bench leaves: not the user's
    forget_kernel_id(mod.plain)
    assert kernel_id(mod.plain) == plain
    hashes = {name: kernel_id(getattr(mod, name)).source_hash for name in ("a", "b", "limited", "own", "other_own")}
    assert len({plain.source_hash, *hashes.values()}) == 6
    assert kernel_id(mod.a2).source_hash == hashes["a"]
    mod.LIMIT = 128  # a global the benchmarker reads
    forget_kernel_id(mod.limited)
    assert kernel_id(mod.limited).source_hash != hashes["limited"]


def _hook(nargs):
    return None


def test_config_spec_serialises_every_value_kind():
    cfg = triton.Config({"DT": tl.float16, "TT": torch.bfloat16, "EVEN": True, "OPT": None, "ALPHA": 0.5,
                         "K": tl.constexpr(8)}, num_warps=2, num_stages=1, pre_hook=_hook)
    spec = config_spec(cfg)
    assert dict(spec.kwargs) == {"DT": "fp16", "TT": "bfloat16", "EVEN": True, "OPT": None, "ALPHA": 0.5,
                                 "K": 8}
    opts = dict(spec.options)
    assert opts["num_warps"] == 2 and opts["num_stages"] == 1 and opts["num_ctas"] == 1
    assert "maxnreg" not in opts and "ir_override" not in opts
    assert spec.pre_hook is not None and spec.pre_hook.startswith(f"{__name__}:_hook@")
    assert ConfigSpec.from_json(json.loads(canonical_json(spec.to_json()))) == spec
    assert dict(config_spec(triton.Config({}, maxnreg=128)).options)["maxnreg"] == 128


def test_json_scalar_is_stable_and_json_safe():
    class Opaque:
        pass

    assert json_scalar(tl.int32) == "int32"
    assert json_scalar(torch.float8_e4m3fn) == "float8_e4m3fn"
    assert json_scalar(float("inf")) == "inf"
    assert json_scalar(Opaque()) == json_scalar(Opaque())  # no address in the spelling
    assert json_scalar((1, 2)) == "(1, 2)"
    canonical_json([json_scalar(v) for v in (float("nan"), Opaque(), tl.float32, 3, "s")])


def test_fingerprint_under_the_interpreter(monkeypatch):
    fp = current_fingerprint(refresh=True)
    assert fp.target == "interpreter" and fp.device == "cpu"
    assert fp.triton == triton.__version__
    assert Fingerprint.from_json(json.loads(canonical_json(fp.to_json()))) == fp
    assert current_fingerprint() is fp

    monkeypatch.setenv("TRITON_DISABLE_LINE_INFO", "1")
    changed = current_fingerprint(refresh=True)
    assert "TRITON_DISABLE_LINE_INFO" in dict(changed.env)
    assert changed.digest != fp.digest
    monkeypatch.delenv("TRITON_DISABLE_LINE_INFO")
    assert current_fingerprint(refresh=True) == fp


@pytest.mark.parametrize("var, value", [("PTXAS_OPTIONS", "-O1"), ("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", "1")])
def test_codegen_variables_outside_tritons_list_are_in_the_fingerprint_when_set(monkeypatch, var, value):
    """Triton makes these compile options or code-generator behaviour, not cache-invalidating
    variables: a decision tuned under them is filed apart; unset, the fingerprint is unchanged.
    (TRITON_DEBUG set after Triton's import changes nothing on releases that read it once then:
    the fresh-process test below covers it.)"""
    monkeypatch.delenv(var, raising=False)
    plain = current_fingerprint(refresh=True)
    assert var not in dict(plain.env)
    monkeypatch.setenv(var, value)
    changed = current_fingerprint(refresh=True)
    assert dict(changed.env)[var] == value and changed.digest != plain.digest
    monkeypatch.delenv(var)
    assert current_fingerprint(refresh=True) == plain


@pytest.mark.parametrize("section, knob, var, value, recorded", [
    ("runtime", "debug", "TRITON_DEBUG", True, "1"),
    ("compilation", "allow_non_constexpr_globals", "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", True, "1"),
    ("nvidia", "ptxas_options", "PTXAS_OPTIONS", "-O1", "-O1")])
def test_a_codegen_knob_set_in_code_is_in_the_fingerprint(monkeypatch, section, knob, var, value, recorded):
    """Triton compiles by its knobs, not the variables: ``triton.knobs.runtime.debug = True`` in a
    program with TRITON_DEBUG unset compiled with debug checks under the fingerprint without them."""
    import triton

    owner = getattr(triton.knobs, section, None)
    if owner is None or not hasattr(owner, knob):
        pytest.skip(f"this Triton has no knobs.{section}.{knob}")
    monkeypatch.delenv(var, raising=False)
    plain = current_fingerprint(refresh=True)
    with owner.scope() if hasattr(owner, "scope") else contextlib.nullcontext():  # Triton's own undo
        monkeypatch.setattr(owner, knob, value)
        changed = current_fingerprint()  # no refresh: the cached fingerprint follows the knob
        assert dict(changed.env).get(var) == recorded and changed.digest != plain.digest
        monkeypatch.undo()
    assert current_fingerprint() == plain


@pytest.mark.parametrize("var, value", [("TRITON_DEBUG", "1"), ("PTXAS_OPTIONS", "-O1")])
def test_the_cli_computes_the_fingerprint_the_runtime_files_decisions_under(tmp_path, var, value):
    """Under the interpreter the CLI computes the fingerprint without torch (core.machine): it left
    these variables out, so `check` called the keys a warmup had just stored missing."""
    code = ("import json, sys; from tunevault.core.machine import this_machine; "
            "from tunevault.core.identity import current_fingerprint; "
            "fp = current_fingerprint(); "
            "print(json.dumps([this_machine().digest, fp.digest, dict(fp.env)]))")
    env = {**os.environ, var: value, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    cli, runtime, recorded = json.loads(out.stdout.splitlines()[-1])
    assert cli == runtime, out.stderr
    assert recorded[var] == value


KNOB_MIDWAY = """
import importlib.util, json, sys
import torch, triton
import tunevault
from tunevault.core.identity import current_fingerprint

tunevault.install("tune", store=sys.argv[1])
spec = importlib.util.spec_from_file_location("tv_knob_kernel", sys.argv[2])
kern = importlib.util.module_from_spec(spec); spec.loader.exec_module(kern)


def call(n):
    x = torch.arange(n, dtype=torch.float32)
    out = torch.empty_like(x)
    kern.kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, out, n, 0)
    torch.testing.assert_close(out, 2 * x + 1)


call(64)
before = current_fingerprint().digest
triton.knobs.language.fp32_default = "ieee"
call(128)
print(json.dumps([before, current_fingerprint().digest]))
"""


def test_the_fingerprint_follows_a_knob_set_after_the_first_tuning(tmp_path, sqlite_url):
    """A process that sets ``knobs.language.fp32_default`` after its first tuning files the later
    decisions under the fingerprint they were made in, not the one of its first miss."""
    (tmp_path / "kern.py").write_text(KERNEL.format(helpers="triton", scale=1, offset=1, extra_config=(
        'triton.Config({"BLOCK": 64}, num_warps=1)')).replace("hm.twice(helper(x))", "helper(x * 2)")
        .replace("def kernel(x_ptr, y_ptr, n,", "def kernel(x_ptr, y_ptr, n, unused,"))
    (tmp_path / "run.py").write_text(KNOB_MIDWAY)
    env = {**os.environ, "TRITON_INTERPRET": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env.pop("TRITON_F32_DEFAULT", None)
    out = subprocess.run([sys.executable, str(tmp_path / "run.py"), sqlite_url, str(tmp_path / "kern.py")],
                         env=env, check=True, capture_output=True, text=True, timeout=240)
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert before != after
    listed = subprocess.run([sys.executable, "-m", "tunevault.cli.main", "--store", sqlite_url, "ls", "--json"],
                            env=env, check=True, capture_output=True, text=True, timeout=240)
    filed = {dict(d["key"])["n"]: d["fingerprint_digest"] for d in json.loads(listed.stdout)}
    assert filed == {64: before, 128: after}


def test_provenance_names_this_process(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    prov = dict(provenance())
    assert prov["pid"] == os.getpid() and prov["rank"] == 3
    assert prov["triton"] == triton.__version__
    assert prov["tunevault"] == getattr(sys.modules["tunevault"], "__version__", prov["tunevault"])
    assert list(dict(provenance())) == sorted(prov)
    canonical_json(prov)


@pytest.mark.parametrize("bad", [object(), 3])
def test_kernel_id_rejects_non_kernels(bad):
    with pytest.raises(TypeError):
        kernel_id(bad)
