"""Loading the native extensions built from csrc/ (see setup.py and docs/native.md).

`retro_kernels._C_cpu` and `retro_kernels._C_cuda` are shared libraries that
register torch ops (namespaces `retro_kernels_cpu`, `retro_kernels_cuda`) when
loaded. They are optional: `load(kind)` returns the op namespace, or None and
`missing_reason(kind)` says why and how to get it.

The C++ CPU kernels also work where no build made them (pip's isolated build,
a wheel without native code, an unbuilt checkout): `load("cpu")` then returns
a namespace that compiles csrc/cpu on first use, with
torch.utils.cpp_extension and ninja, into a cache folder keyed by the sources,
the flags and torch (under $RETRO_KERNELS_CACHE, default
~/.cache/retro_kernels). Processes that start together compile once: the
build holds an flock (released if its process dies), the others wait on it.
RETRO_KERNELS_NO_JIT=1 turns the compile on first use off.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import platform
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

_lock = threading.RLock()
# kind -> (state, value, where): state "loaded" (value: the op namespace), "pending" (value: a
# _CpuBuild to run on first use), "missing" or "failed" (value: why). `where` says where it comes from.
_state: dict[str, tuple[str, object, str]] = {}


class FallbackWarning(UserWarning):
    """backend="auto" ran an op on the eager reference because no fused backend could run it."""


def load(kind: str):
    """`torch.ops.retro_kernels_<kind>` (for "cpu" maybe still to be compiled on first use), else None."""
    state, value, _ = _resolve(kind)
    if state == "loaded":
        return value
    if state == "pending":
        return _CompileOnFirstUse(kind)
    return None


def missing_reason(kind: str) -> str | None:
    """Why `load(kind)` returns None (None when the extension is loaded or compiles on first use)."""
    state, value, _ = _resolve(kind)
    return value if state in ("missing", "failed") else None


def describe(kind: str) -> dict:
    """For `python -m retro_kernels`: {"state", "where", "reason"}, without compiling anything."""
    state, value, where = _resolve(kind)
    return {"state": state, "where": where, "reason": value if isinstance(value, str) else None}


def build(kind: str = "cpu"):
    """Compile now what would compile on first use; the op namespace, or None (see missing_reason)."""
    state, _, _ = _resolve(kind)
    if state == "pending":
        with contextlib.suppress(RuntimeError):
            _compile(kind)
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
            return "loaded", _load_library(kind, prebuilt), f"built ahead of time: {prebuilt}"
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
    plan = _CpuBuild.plan()
    if isinstance(plan, str):
        return "missing", f"{why}; it cannot be compiled on first use either: {plan}", ""
    if plan.done():
        try:
            return "loaded", _load_library(kind, plan.library), f"compiled on first use, cached: {plan.library}"
        except OSError as e:
            return "missing", f"{why}; the copy compiled on first use, {plan.library}, failed to load ({e})", ""
    return "pending", plan, f"compiles on first use into {plan.folder}{prebuilt_failed}"


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


def _load_library(kind: str, path) -> object:
    torch.ops.load_library(str(path))  # runs the library's TORCH_LIBRARY registrations
    return getattr(torch.ops, f"retro_kernels_{kind}")


class _CompileOnFirstUse:
    """Stands for torch.ops.retro_kernels_cpu; looking up an op compiles the library first."""

    def __init__(self, kind: str):
        self._kind = kind

    def __getattr__(self, name: str):
        return getattr(_compile(self._kind), name)

    def __repr__(self) -> str:
        return f"<retro_kernels {_WHAT[self._kind]}, compiled on first use>"


def _compile(kind: str):
    """The op namespace, compiling the library if it is still pending; RuntimeError if that fails."""
    with _lock:
        state, value, where = _state[kind]
        if state == "pending":
            try:
                value.run()
                _state[kind] = ("loaded", _load_library(kind, value.library),
                                f"compiled on first use, cached: {value.library}")
            except (RuntimeError, OSError) as e:
                _state[kind] = ("failed", str(e), where)
            state, value, where = _state[kind]
        if state != "loaded":
            raise RuntimeError(value)
        return value


# Compiling csrc/cpu on first use --------------------------------------------------

class _CpuBuild:
    """csrc/cpu compiled with torch.utils.cpp_extension into a folder keyed by what it depends on."""

    NAME = "_C_cpu"
    # -DNDEBUG: as setup.py's builds get it from Python's own CFLAGS
    CXX_FLAGS = list(_native_build.CPU_CXX_FLAGS) + ["-DNDEBUG"]

    def __init__(self, sources: list[Path], folder: Path, ninja_dir: str):
        self.sources, self.folder, self.ninja_dir = sources, folder, ninja_dir
        self.library = folder / f"{self.NAME}.so"
        self.marker = folder / "built"

    @classmethod
    def plan(cls) -> "_CpuBuild | str":
        """The build to run on first use, or why there can be none (a sentence)."""
        if os.environ.get("RETRO_KERNELS_NO_JIT", "0") == "1":
            return "RETRO_KERNELS_NO_JIT=1 is set"
        files = _cpu_sources()
        if not files:
            return ("its sources (csrc/cpu) are not in this installation; install retro_kernels from its "
                    "checkout or from a wheel its setup.py built")
        cxx = os.environ.get("CXX", "c++")
        if not shutil.which(shlex.split(cxx)[0] if cxx.strip() else "c++"):
            return (f"no C++ compiler: `{cxx}` ({'$CXX' if 'CXX' in os.environ else 'or $CXX'}) is not on "
                    "PATH; install g++ or clang++ (e.g. `apt install g++`), or set CXX")
        ninja_dir = _ninja_dir()
        if ninja_dir is None:
            return "ninja is not installed: `pip install ninja`"
        digest = _native_build.sources_digest(
            files, *cls.CXX_FLAGS, *_native_build.CPU_LINK_FLAGS, torch.__version__,
            sys.version, platform.machine(), cxx,
        )
        py = f"py{sys.version_info.major}{sys.version_info.minor}"
        folder = _cache_root() / f"cpu-torch{torch.__version__}-{py}-{digest[:16]}"
        return cls(files, folder, ninja_dir)

    def done(self) -> bool:
        return self.marker.exists() and self.library.exists()

    def run(self) -> None:
        """Compile and link (once across processes); RuntimeError, in one line, if that fails."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RuntimeError(f"cannot create the cache folder {self.folder} for the C++ CPU kernels ({e}); "
                               "set RETRO_KERNELS_CACHE to a writable folder") from None
        with _exclusive(self.folder / "build.lock",
                        f"retro_kernels: waiting for another process compiling the C++ CPU kernels in "
                        f"{self.folder}\n"):
            if self.done():
                return
            # torch's own lock file, left behind by a compile that was killed: nobody else holds ours
            with contextlib.suppress(FileNotFoundError):
                (self.folder / "lock").unlink()
            sys.stderr.write(f"retro_kernels: compiling the C++ CPU kernels on first use (a few "
                             f"minutes, once; cached in {self.folder}) ... ")
            sys.stderr.flush()
            start = time.perf_counter()
            try:
                self._cpp_extension_load()
            except Exception as e:  # cpp_extension raises RuntimeError/OSError/CalledProcessError
                sys.stderr.write("failed\n")
                log = self.folder / "build.log"
                log.write_text(str(e))
                raise RuntimeError(f"compiling the C++ CPU kernels failed: {_first_error(str(e))} (full log: "
                                   f"{log}); set RETRO_KERNELS_NO_JIT=1 to run the reference instead") from None
            self.marker.write_text(f"torch {torch.__version__}\n" + "".join(f"{p}\n" for p in self.sources))
            sys.stderr.write(f"done in {time.perf_counter() - start:.0f} s\n")

    def _cpp_extension_load(self) -> None:
        from torch.utils import cpp_extension

        path = os.environ.get("PATH", "")
        os.environ["PATH"] = self.ninja_dir + os.pathsep + path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its compiler-version notes would break the one line
                cpp_extension.load(
                    name=self.NAME,
                    sources=[str(p) for p in self.sources if p.suffix == ".cpp"],
                    extra_cflags=self.CXX_FLAGS,
                    extra_ldflags=list(_native_build.CPU_LINK_FLAGS),
                    build_directory=str(self.folder),
                    is_python_module=False,
                    verbose=False,
                )
        finally:
            os.environ["PATH"] = path


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


@contextlib.contextmanager
def _exclusive(path: Path, waiting_message: str):
    """Hold an exclusive flock on `path` (the OS drops it if this process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file still serialises the compile
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.stderr.write(waiting_message)
            sys.stderr.flush()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _first_error(log: str) -> str:
    """The first compiler error line of a build log, else its first line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() and not line.startswith("Error building extension"):
            return line[:300]
    return lines[0][:300] if lines else "no output"
