"""This machine, cheaply: which backend runs kernels, and the fingerprint decisions are made for.

One rule for every command, the demo and the tests' subprocesses: when ``TRITON_INTERPRET`` is
unset and torch can use no GPU, kernels run in Triton's interpreter (the variable is set before
Triton is imported, because ``@triton.jit`` picks the interpreter when it decorates).

Commands that only read decisions (``tunevault info``, ``ls``, ``show``, ``check``) need this
machine's fingerprint to say which decisions are valid here. Asking torch and Triton costs
seconds (mostly importing torch), so without a GPU the same fingerprint is read from the
installed packages' own files: Triton's ``__version__`` line and torch's generated
``version.py`` (both parsed, never executed). Triton's cache-invalidating environment variables
are asked from Triton itself only when one that could be one is set. With a GPU, the driver
must be asked, through torch and Triton, as a tuning process does.
"""

from __future__ import annotations

import ast
import ctypes
import importlib.util
import math
import os
import re
import sys
from pathlib import Path

from tunevault.core.model import Fingerprint

# Variables Triton reads that never change generated code (so never part of a fingerprint).
_NOT_CODEGEN = frozenset({"TRITON_INTERPRET", "TRITON_CACHE_DIR", "TRITON_HOME"})
# Prefixes of every cache-invalidating variable Triton 3.4-3.9 knows (GetEnv.hpp); with none of
# these set, ``get_cache_invalidating_env_vars()`` is empty and Triton need not be imported.
_CODEGEN_PREFIXES = ("TRITON_", "MLIR_", "LLVM_", "AMDGCN_", "NVPTX_", "DISABLE_", "ENABLE_", "ALLOW_", "USE_")
_VERSION_LINE = re.compile(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", re.MULTILINE)


def interpreter_flag() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def use_interpreter_if_no_gpu() -> bool:
    """Switch on Triton's interpreter when no GPU is usable and the user did not choose; return whether on."""
    if "TRITON_INTERPRET" not in os.environ and not gpu_usable():
        os.environ["TRITON_INTERPRET"] = "1"
    return interpreter_flag()


def gpu_usable() -> bool:
    """Whether torch can put tensors on a GPU here, answered without importing torch when possible.

    A CPU build of torch has no GPU whatever the hardware; a CUDA build has one when the CUDA
    driver reports a device (``cuInit`` and ``cuDeviceGetCount`` create no context and honour
    ``CUDA_VISIBLE_DEVICES``). Anything less certain asks torch itself.
    """
    if "torch" not in sys.modules:
        build = torch_build()
        if build is not None and build.get("cuda") is None and build.get("hip") is None:
            return False
        if build is not None and build.get("hip") is None:
            devices = _cuda_device_count()
            if devices is not None:
                return devices > 0
    import torch

    return bool(torch.cuda.is_available())


def _cuda_device_count() -> int | None:
    """Devices the CUDA driver reports; 0 without a driver; None if the driver could not be asked."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0  # no NVIDIA driver installed: no GPU torch could use
    try:
        if lib.cuInit(0) != 0:  # e.g. CUDA_ERROR_NO_DEVICE (all hidden by CUDA_VISIBLE_DEVICES)
            return 0
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return None
        return count.value
    except (AttributeError, OSError):
        return None


def _package_file(package: str, name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), name)
    return path if path.is_file() else None


def torch_build() -> dict[str, str | None] | None:
    """``__version__``, ``cuda`` and ``hip`` of the installed torch, from its generated ``version.py``.

    Read as literals, never executed; None when it is missing or not the simple file expected.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        v = torch.version
        return {"__version__": str(torch.__version__), "cuda": v.cuda, "hip": getattr(v, "hip", None)}
    path = _package_file("torch", "version.py")
    if path is None:
        return None
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    found: dict[str, str | None] = {}
    for node in tree.body:
        if not isinstance(node, ast.Assign | ast.AnnAssign):
            continue
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else (
            node.target if isinstance(node, ast.AnnAssign) else None)
        if isinstance(target, ast.Name) and target.id in ("__version__", "cuda", "hip") and node.value is not None:
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return None
            if value is not None and not isinstance(value, str):
                return None
            found[target.id] = value
    return found if "__version__" in found and "cuda" in found else None


def triton_version() -> str | None:
    """The installed Triton's ``__version__`` (its ``__init__.py`` line when Triton is not imported)."""
    triton = sys.modules.get("triton")
    if triton is not None:
        return str(triton.__version__)
    path = _package_file("triton", "__init__.py")
    if path is None:
        return None
    try:
        m = _VERSION_LINE.search(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m.group(1) if m else None


# Variables that change generated code outside Triton's own cache-invalidating list: part of the
# fingerprint only where set (an unset environment keeps the fingerprint it always had).
CODEGEN_ENV_VARS = ("TRITON_DEBUG", "PTXAS_OPTIONS", "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS")


def codegen_env() -> tuple[tuple[str, str], ...]:
    """Triton's cache-invalidating variables as Triton normalises them, and CODEGEN_ENV_VARS where
    set: the fingerprint's env part, for this module and ``identity.current_fingerprint`` alike.
    Imports Triton only if one may be set."""
    maybe = [k for k in os.environ if (k.startswith(_CODEGEN_PREFIXES) and k not in _NOT_CODEGEN)
             or k in CODEGEN_ENV_VARS]
    if not maybe and "triton" not in sys.modules:
        return ()
    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars

        env = {str(k): str(v) for k, v in get_cache_invalidating_env_vars().items() if v is not None}
    except Exception:
        return ()
    env.update((name, value) for name in CODEGEN_ENV_VARS if (value := os.environ.get(name)))
    _knobs_set_in_code(env)
    return tuple(sorted(env.items()))


# CODEGEN_ENV_VARS' knobs: (section, attribute, is a flag). Triton reads a knob, not the variable,
# so a program that sets one in code (``triton.knobs.runtime.debug = True``) compiles otherwise.
_CODEGEN_KNOBS = {"TRITON_DEBUG": ("runtime", "debug", True),
                  "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS": ("compilation", "allow_non_constexpr_globals", True),
                  "PTXAS_OPTIONS": ("nvidia", "ptxas_options", False)}
_TRUE = ("1", "true", "yes", "on", "y")  # Triton's env_bool


def _knobs_set_in_code(env: dict[str, str]) -> None:
    """Correct ``env`` where a CODEGEN_ENV_VARS knob says otherwise than its variable (set in code,
    or the variable set after Triton read it at import): the knob's value as the variable would
    spell it, and nothing where the knob is off. Knobs a Triton release lacks are skipped."""
    knobs = getattr(sys.modules.get("triton"), "knobs", None)
    for name, (section, attribute, flag) in _CODEGEN_KNOBS.items():
        try:
            value = getattr(getattr(knobs, section), attribute)
        except AttributeError:
            continue
        said = env.get(name)
        if flag and bool(value) != (said is not None and said.strip().lower() in _TRUE):
            said = "1" if value else None
        elif not flag and (value or None) != ((said or "").strip() or None):
            said = str(value) if value else None
        if said is None:
            env.pop(name, None)
        else:
            env[name] = said


def interpreting() -> bool:
    """Whether kernels run in Triton's interpreter: Triton's own knob once imported, else the variable."""
    triton = sys.modules.get("triton")
    if triton is not None:
        try:
            return bool(triton.knobs.runtime.interpret)
        except AttributeError:
            pass
    return interpreter_flag()


def this_machine() -> Fingerprint:
    """The fingerprint a process tuning here records, as cheaply as possible; changes nothing.

    Equal to ``identity.current_fingerprint()`` in this process; the interpreter is not switched on
    here (commands call :func:`use_interpreter_if_no_gpu` first).
    """
    if interpreting():
        build, triton = torch_build(), triton_version()
        if build is not None and triton is not None:
            hip = build.get("hip")
            cuda = build.get("cuda") or (f"hip-{hip}" if hip else "none")
            return Fingerprint(triton=triton, target="interpreter", device="cpu", cuda=cuda, env=codegen_env())
    from tunevault.core.identity import current_fingerprint

    return current_fingerprint()


# ----------------------------------------------------------------- how many GPUs, without importing torch
# ``tunevault warmup --jobs`` starts one process per GPU: asking torch first (seconds to import a
# CUDA build) would delay every child's start. torch's own answer is NVML's device count taking
# CUDA_VISIBLE_DEVICES into account (torch.cuda.device_count); the same is asked here directly.


def visible_devices_spec(value: str) -> list[str]:
    """The devices a ``CUDA_VISIBLE_DEVICES`` value makes visible, by torch's rules.

    Ordinals are read like ``strtoul`` (``1gpu`` is 1), a negative or unreadable entry ends the
    list, a repeated entry makes it empty; ``GPU-``/``MIG-`` UUID lists stop at the first entry
    without the prefix. ``""`` and ``"-1"`` hide every device."""
    entries = value.split(",")
    if value.startswith(("GPU-", "MIG-")):
        prefix = value[:4]
        found: list[str] = []
        for entry in entries:
            if entry in found:
                return []
            if not entry.startswith(prefix):
                break
            found.append(entry)
        return found
    ordinals: list[str] = []
    for entry in entries:
        m = re.match(r"[+-]?\d+", entry.strip())
        if m is None or int(m.group()) < 0:
            break
        ordinal = str(int(m.group()))
        if ordinal in ordinals:
            return []
        ordinals.append(ordinal)
    return ordinals


def _nvml_device_count() -> int | None:
    """Physical GPUs NVML reports (it ignores CUDA_VISIBLE_DEVICES); None if NVML cannot be asked."""
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        if lib.nvmlInit_v2() != 0:
            return None
        count = ctypes.c_uint(0)
        ok = lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0
        lib.nvmlShutdown()
        return count.value if ok else None
    except (AttributeError, OSError):
        return None


def _smi_device_count() -> int | None:
    """Physical GPUs ``nvidia-smi -L`` lists; None without a working nvidia-smi."""
    import subprocess

    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return sum(1 for line in done.stdout.splitlines() if line.startswith("GPU "))


def available_cores(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The cores this process may use: its cpuset, bounded by a container's CPU quota (a pod
    limited to 4 CPUs on a 128-core host gets 4, not 128), never below 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 2
    quota = cpu_quota(cgroup_root)
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def cpu_quota(cgroup_root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs' worth of time the cgroup allows (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us`` in v1); None when unlimited or unreadable."""
    def read(*parts: str) -> str | None:
        try:
            with open(os.path.join(cgroup_root, *parts)) as f:
                return f.read(256).strip()
        except OSError:
            return None

    v2 = read("cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
    else:
        quota, period = read("cpu", "cpu.cfs_quota_us") or "", read("cpu", "cpu.cfs_period_us") or ""
    try:
        q, p = float(quota), float(period or "100000")
    except ValueError:
        return None  # "max", or nothing there
    return q / p if q > 0 and p > 0 and math.isfinite(q / p) else None


def gpu_count() -> int:
    """GPUs torch would see here (``torch.cuda.device_count()``, 0 when CUDA is unusable), asked
    without importing torch: 0 under the interpreter or with a CPU build of torch; else
    CUDA_VISIBLE_DEVICES (bounded by the physical count, as torch bounds it), NVML, ``nvidia-smi
    -L``, the CUDA driver, and torch itself only when none of them answers (or on ROCm)."""
    if interpreter_flag():
        return 0
    if "torch" not in sys.modules:
        build = torch_build()
        if build is not None and build.get("cuda") is None and build.get("hip") is None:
            return 0
        if build is not None and build.get("hip") is None:
            count = _count_without_torch()
            if count is not None:
                return count
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _count_without_torch() -> int | None:
    physical = _nvml_device_count()
    if physical is None:
        physical = _smi_device_count()
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return physical if physical is not None else _cuda_device_count()
    visible = visible_devices_spec(value)
    if not visible:
        return 0
    if visible[0].startswith("MIG-"):
        return None  # torch asks the CUDA runtime for MIG instances: so do we, through torch
    if physical is None:
        return _cuda_device_count()  # the driver applies CUDA_VISIBLE_DEVICES itself
    if visible[0].startswith("GPU-"):
        return len(visible)
    # an ordinal past the last GPU ends the list, as in torch._device_count_nvml
    return next((i for i, v in enumerate(visible) if int(v) >= physical), len(visible))
