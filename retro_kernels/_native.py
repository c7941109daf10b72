"""Loading the native extensions built from csrc/ (see setup.py and docs/native.md).

`retro_kernels._C_cpu` and `retro_kernels._C_cuda` are shared libraries that
register torch ops (namespaces `retro_kernels_cpu`, `retro_kernels_cuda`) when
loaded. They are optional: `load(kind)` returns the op namespace, or None and
`missing_reason(kind)` says why and how to get it.

The C++ CPU kernels also work where no build made them (pip's isolated build,
a wheel without native code, an unbuilt checkout): `load("cpu")` then compiles
csrc/cpu with `torch.utils.cpp_extension.load` (ninja rebuilds only what
changed) into $RETRO_KERNELS_CACHE (default ~/.cache/retro_kernels), one folder
per torch and Python. Nothing compiles before the first call of a CPU kernel.
Processes that start together compile once: the compile holds an flock, which,
unlike torch's own lock file, the OS drops if its holder dies.
RETRO_KERNELS_NO_JIT=1 turns the compile on first use off.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.machinery
import importlib.util
import os
import shlex
import shutil
import sys
import sysconfig
import threading
import time
import warnings
from pathlib import Path

import torch

from . import _native_build

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the retro_kernels checkout "
    "(or `make test`, or `python setup.py build_ext --inplace`), without RETRO_KERNELS_NO_NATIVE=1"
)
_WHAT = {"cpu": "C++ CPU kernels", "cuda": "CUDA kernels"}
_PACKAGE = Path(__file__).resolve().parent
_LIBRARY = "_C_cpu"  # the compiled library's name, in the cache folder as in the package

_lock = threading.RLock()
# kind -> (state, value, where): state "loaded" (value: the op namespace), "pending" (value: the
# cache folder to compile into on first use), "missing" or "failed" (value: why).
_state: dict[str, tuple[str, object, str]] = {}


class FallbackWarning(UserWarning):
    """backend="auto" ran an op on the eager reference because no fused backend could run it."""


def load(kind: str):
    """`torch.ops.retro_kernels_<kind>` (compiling the C++ CPU kernels now if they compile on first
    use; RuntimeError, in one line, if that fails), or None when the library is missing."""
    state, _, _ = _resolve(kind)
    if state == "missing":
        return None
    with _lock:
        state, value, where = _state[kind]
        if state == "pending":
            try:
                _state[kind] = ("loaded", _compile_cpu(value), f"compiled on first use, cached: {value}")
            except RuntimeError as e:
                _state[kind] = ("failed", str(e), where)
            state, value, _ = _state[kind]
    if state == "failed":
        raise RuntimeError(value)
    return value


def missing_reason(kind: str) -> str | None:
    """Why `load(kind)` returns None (None when the extension is loaded or compiles on first use)."""
    state, value, _ = _resolve(kind)
    return value if state in ("missing", "failed") else None


def describe(kind: str) -> dict:
    """For `python -m retro_kernels`: {"state", "where", "reason"}, without compiling anything."""
    state, value, where = _resolve(kind)
    return {"state": state, "where": where, "reason": value if state in ("missing", "failed") else None}


def build(kind: str = "cpu"):
    """Compile now what would compile on first use; the op namespace, or None (see missing_reason)."""
    with contextlib.suppress(RuntimeError):
        return load(kind)


def warn_reference_fallback(op: str, device_type: str, reasons: dict[str, list[str]]) -> None:
    """Say once, per device type and reasons, that backend="auto" fell back to the reference."""
    if torch.compiler.is_compiling():
        return  # dynamo cannot trace warnings.warn; the same call made eagerly warns
    why = "; ".join(f"{backend}: {', '.join(r)}" for backend, r in reasons.items())
    with _lock:
        if (device_type, why) in _warned:
            return
        _warned.add((device_type, why))
    warnings.warn(
        f"retro_kernels: backend='auto' runs {op} on {device_type} tensors with the eager reference, "
        f"slower than a fused backend, because {why} (shown once; backend='reference' chooses it "
        "without this warning)",
        FallbackWarning,
        stacklevel=5,  # the caller of the public op (via select_backend and ops/_op.Op.__call__)
    )


_warned: set[tuple[str, str]] = set()


# Finding and loading a library -------------------------------------------------

def _resolve(kind: str) -> tuple[str, object, str]:
    if kind not in _WHAT:
        raise ValueError(f"kind must be one of {tuple(_WHAT)}, got {kind!r}")
    with _lock:
        if kind not in _state:
            _state[kind] = _find(kind)
        return _state[kind]


def _find(kind: str) -> tuple[str, object, str]:
    module = f"retro_kernels._C_{kind}"
    prebuilt = _prebuilt_library(kind)
    prebuilt_failed = ""
    if prebuilt is not None:
        try:
            torch.ops.load_library(str(prebuilt))  # runs the library's TORCH_LIBRARY registrations
            return "loaded", getattr(torch.ops, f"retro_kernels_{kind}"), f"built ahead of time: {prebuilt}"
        except OSError as e:
            why = (f"the {_WHAT[kind]} extension {module} failed to load ({e}); it may have been built "
                   f"against another torch: rebuild it; {BUILD_HINT}")
            prebuilt_failed = f" (the one built ahead of time failed to load: {prebuilt})"
    elif kind == "cuda" and not torch.version.cuda:
        why = f"torch {torch.__version__} has no CUDA: the CUDA kernels need a CUDA build of torch, and nvcc"
    else:
        why = f"the {_WHAT[kind]} extension {module} is not built; {BUILD_HINT}"
    if kind != "cpu":
        return "missing", why, ""
    cannot = _why_no_compile()
    if cannot:
        return "missing", f"{why}; it cannot be compiled on first use either: {cannot}", ""
    folder = _cache_root() / f"cpu-torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    return "pending", folder, f"compiles on first use into {folder}{prebuilt_failed}"


def _prebuilt_library(kind: str) -> Path | None:
    """This package's own retro_kernels/_C_<kind> library, built by setup.py.

    Looked up next to this file, not through the import system: an editable
    install elsewhere maps the module name to its own checkout's build.
    """
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _PACKAGE / f"_C_{kind}{suffix}"
        if path.is_file():
            return path
    return None


# Compiling csrc/cpu on first use --------------------------------------------------

def _why_no_compile() -> str | None:
    """Why csrc/cpu cannot be compiled on first use here (a sentence), or None."""
    if os.environ.get("RETRO_KERNELS_NO_JIT", "0") == "1":
        return "RETRO_KERNELS_NO_JIT=1 is set"
    if not _cpu_sources():
        return ("its sources (csrc/cpu) are not in this installation; install retro_kernels from its "
                "checkout or from a wheel its setup.py built")
    cxx = os.environ.get("CXX", "c++")
    if not shutil.which(shlex.split(cxx)[0] if cxx.strip() else "c++"):
        return (f"no C++ compiler: `{cxx}` ({'$CXX' if 'CXX' in os.environ else 'or $CXX'}) is not on "
                "PATH; install g++ or clang++ (e.g. `apt install g++`), or set CXX")
    if _ninja_dir() is None:
        return "ninja is not installed: `pip install ninja`"
    return None


def _compile_cpu(folder: Path):
    """torch.ops.retro_kernels_cpu, csrc/cpu compiled into `folder` (once across processes) and loaded."""
    from torch.utils import cpp_extension

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeError(f"cannot create the cache folder {folder} for the C++ CPU kernels ({e}); "
                           "set RETRO_KERNELS_CACHE to a writable folder") from None
    with open(folder / "compile.lock", "a") as lock:
        try:  # released by the OS if this process dies
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.stderr.write(f"retro_kernels: waiting for another process compiling the C++ CPU kernels in {folder}\n")
            fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            (folder / "lock").unlink()  # torch's, left by a compile that was killed: nobody else holds ours
        fresh = not (folder / f"{_LIBRARY}.so").exists()
        if fresh:
            sys.stderr.write(f"retro_kernels: compiling the C++ CPU kernels on first use (a few minutes, once; "
                             f"cached in {folder}) ... ")
            sys.stderr.flush()
        start, path = time.perf_counter(), os.environ.get("PATH", "")
        os.environ["PATH"] = _ninja_dir() + os.pathsep + path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its compiler-version notes would break the one line
                cpp_extension.load(
                    name=_LIBRARY, sources=[str(p) for p in _cpu_sources() if p.suffix == ".cpp"],
                    # -DNDEBUG: as setup.py's builds get it from Python's own CFLAGS
                    extra_cflags=_native_build.CPU_CXX_FLAGS + ["-DNDEBUG"],
                    extra_ldflags=_native_build.CPU_LINK_FLAGS, build_directory=str(folder),
                    is_python_module=False, verbose=False)
        except Exception as e:  # cpp_extension raises RuntimeError/OSError/CalledProcessError
            log = folder / "build.log"
            log.write_text(str(e))
            raise RuntimeError(f"compiling the C++ CPU kernels failed: {_first_error(str(e))} (full log: "
                               f"{log}); set RETRO_KERNELS_NO_JIT=1 to run the reference instead") from None
        finally:
            os.environ["PATH"] = path
            if fresh:
                sys.stderr.write(f"{'done' if (folder / f'{_LIBRARY}.so').exists() else 'failed'} in "
                                 f"{time.perf_counter() - start:.0f} s\n")
    return torch.ops.retro_kernels_cpu


def _cpu_sources() -> list[Path]:
    """csrc/cpu: shipped inside the package (a wheel), or next to it (a checkout, an editable install)."""
    for folder in (_PACKAGE / _native_build.SHIPPED_CPU_SOURCES, _PACKAGE.parent / "csrc" / "cpu"):
        files = _native_build.cpu_source_files(folder)
        if any(p.suffix == ".cpp" for p in files):
            return files
    return []


def _ninja_dir() -> str | None:
    """A folder holding the ninja executable (the pip package's, when it is not on PATH)."""
    found = shutil.which("ninja") or shutil.which("ninja", path=sysconfig.get_path("scripts"))
    if found:
        return os.path.dirname(found)
    if importlib.util.find_spec("ninja") is not None:
        import ninja

        if shutil.which("ninja", path=ninja.BIN_DIR):
            return ninja.BIN_DIR
    return None


def _cache_root() -> Path:
    if os.environ.get("RETRO_KERNELS_CACHE"):
        return Path(os.environ["RETRO_KERNELS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "retro_kernels"


def _first_error(log: str) -> str:
    """The first compiler error line of a build log, else its first line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() and not line.startswith("Error building extension"):
            return line[:300]
    return lines[0][:300] if lines else "no output"
