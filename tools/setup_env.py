"""Set up an environment that runs retro_kernels' tests, demo and benchmarks (the Makefile's `setup`).

    python3 tools/setup_env.py --venv .venv          # make's default: a local virtual environment
    python3 tools/setup_env.py --python /path/to/py  # make PYTHON=...: that interpreter, its torch kept

Steps, each skipped when a stamp says it is done for the same inputs:
1. the virtual environment (venv mode);
2. torch, if there is none: the CPU wheel torch==2.13.0 on a machine without
   an NVIDIA GPU (a bare `torch` would pull a CUDA build of several GB), PyPI's
   CUDA build of the same version on one with a GPU. A torch already there is
   never replaced: every later install runs under a constraints file pinning it;
3. `pip install -e .[EXTRAS]` without build isolation, native build skipped;
4. the native kernels, `setup.py build_ext --inplace` (ninja, incremental).
The stamp keys step 3 on pyproject.toml, setup.py and this file, step 4 on
setup.py and csrc/: editing a C++ source rebuilds, nothing else does.
Standard library only: it runs before the environment exists.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_TORCH = "2.13.0"
# Triton for a CPU torch (which does not pin one): the release CI runs the interpreter tests with.
CPU_TRITON = "3.9.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
STAMP_VERSION = 1


def say(message: str) -> None:
    print(f"setup: {message}", flush=True)


def fail(message: str) -> None:
    print(f"setup: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def digest(paths: list[Path], *extra: str) -> str:
    h = hashlib.sha256()
    for text in extra:
        h.update(text.encode() + b"\0")
    for path in paths:
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def native_inputs() -> list[Path]:
    sources = [p for p in sorted((ROOT / "csrc").rglob("*")) if p.is_file()]
    return [ROOT / "setup.py", ROOT / "retro_kernels" / "_native_build.py"] + sources


def run(command: list, log: Path | None = None, env: dict | None = None) -> bool:
    """Run a command from the repository root; its output goes to `log` when given."""
    command = [str(c) for c in command]
    if log is None:
        return subprocess.run(command, cwd=ROOT, env=env).returncode == 0
    with open(log, "w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        return subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode == 0


def output(command: list) -> tuple[int, str]:
    result = subprocess.run(command, capture_output=True, text=True)
    return result.returncode, result.stdout.strip()


def installed_version(python: str, distribution: str) -> str | None:
    code = (f"import importlib.metadata as m, sys\ntry: print(m.version({distribution!r}))\n"
            "except m.PackageNotFoundError: sys.exit(3)")
    status, version = output([python, "-c", code])
    return version if status == 0 else None


def has_nvidia_gpu() -> bool:
    status, listing = output(["nvidia-smi", "-L"]) if shutil.which("nvidia-smi") else (1, "")
    return status == 0 and "GPU" in listing


def check_python(python: str) -> None:
    code = "import sys; print('%d.%d' % sys.version_info[:2]); sys.exit(sys.version_info < (3, 10))"
    status, version = output([python, "-c", code])
    if status != 0:
        fail(f"{python} is Python {version or '?'}: retro_kernels needs Python 3.10 or newer "
             "(make BOOTSTRAP_PYTHON=python3.11, or PYTHON=... for an environment of your own)")


def make_venv(venv: Path) -> str:
    python = venv / "bin" / "python"
    if not python.exists():
        check_python(sys.executable)
        say(f"creating the virtual environment {venv} (Python {platform.python_version()})")
        if not run([sys.executable, "-m", "venv", venv]):
            fail(f"`{sys.executable} -m venv {venv}` failed; on Debian/Ubuntu install python3-venv")
    return str(python)


def install_torch(python: str, log: Path) -> None:
    """torch==2.13.0: the CPU wheel without a GPU, PyPI's CUDA build with one."""
    pip, gpu, linux = [python, "-m", "pip", "install", "-q"], has_nvidia_gpu(), platform.system() == "Linux"
    if gpu or not linux:
        say(f"an NVIDIA GPU is here: installing torch=={CPU_TORCH} with CUDA from PyPI (several GB); to keep a CUDA "
            "torch you already have instead: make ... PYTHON=/path/to/its/python" if gpu else
            f"installing torch=={CPU_TORCH} (on {platform.system()} PyPI's wheel is the CPU build)")
        ok = run(pip + [f"torch=={CPU_TORCH}"], log)
    else:
        say(f"no GPU: installing the CPU build of torch, torch=={CPU_TORCH}+cpu")
        ok = run(pip + [f"torch=={CPU_TORCH}+cpu"], log)
        if not ok:
            say(f"not on the configured indexes; trying PyTorch's CPU index {TORCH_CPU_INDEX}")
            ok = run(pip + [f"torch=={CPU_TORCH}+cpu", "--extra-index-url", TORCH_CPU_INDEX], log)
    if not ok:
        fail(f"installing torch failed (log: {log})")


def write_constraints(python: str, path: Path) -> str:
    """Pin the torch (and triton) in `python`, so that no later install replaces them."""
    torch_version, triton_version = installed_version(python, "torch"), installed_version(python, "triton")
    if not triton_version and ("+cpu" in torch_version or not has_nvidia_gpu()):
        triton_version = CPU_TRITON
    path.write_text(f"torch=={torch_version}\n" + (f"triton=={triton_version}\n" if triton_version else ""))
    return torch_version


def install_package(python: str, extras: str, constraints: Path, log: Path, no_deps: bool) -> None:
    what = "without dependencies" if no_deps else f"with its [{extras}] dependencies"
    say(f"installing retro_kernels (editable) {what}, keeping that torch (log: {log.relative_to(ROOT)})")
    pip = [python, "-m", "pip", "install", "-q", "-c", constraints]
    env = dict(os.environ, RETRO_KERNELS_NO_NATIVE="1")  # the native build is the next step, incremental
    tools = [] if no_deps else ["setuptools>=64", "wheel", "ninja"]
    package = ["--no-deps", "-e", "."] if no_deps else ["-e", f".[{extras}]" if extras else "."]
    ok = (not tools or run(pip + tools, log, env)) and run(
        pip + ["--no-build-isolation", *package], log.with_suffix(".2.log"), env)
    if not ok:
        for name in (log, log.with_suffix(".2.log")):
            if name.exists():
                sys.stderr.write("".join(name.read_text().splitlines(keepends=True)[-30:]))
        fail(f"pip install failed (logs: {log.parent.relative_to(ROOT)}/)")


def build_native(python: str, log: Path) -> None:
    say(f"building the native kernels from csrc/ with ninja (a few minutes the first time; "
        f"log: {log.relative_to(ROOT)})")
    scripts = output([python, "-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])[1]
    env = dict(os.environ, PATH=scripts + os.pathsep + os.environ.get("PATH", ""))  # the venv's ninja
    start = time.perf_counter()
    if not run([python, "setup.py", "build_ext", "--inplace"], log, env):
        sys.stderr.write("".join(log.read_text().splitlines(keepends=True)[-40:]))
        fail(f"building the native kernels failed (log: {log}); RETRO_KERNELS_NO_NATIVE=1 skips them "
             "(the cpu backend then compiles on first use)")
    say(f"native kernels built in {time.perf_counter() - start:.0f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--venv", help="create and use this virtual environment")
    where.add_argument("--python", help="use this interpreter (its torch is kept)")
    p.add_argument("--extras", default="dev", help="extras of retro_kernels to install (default: dev)")
    p.add_argument("--no-deps", action="store_true",
                   help="install nothing but retro_kernels itself (a machine without a package index)")
    args = p.parse_args(argv)

    if args.venv:
        venv = (ROOT / args.venv).resolve()
        python, state_dir = make_venv(venv), venv
    else:
        python = shutil.which(args.python) or args.python
        if not os.path.exists(python):
            fail(f"PYTHON={args.python} is not an interpreter")
        check_python(python)
        python = os.path.abspath(python)
        state_dir = ROOT / "build" / "setup" / hashlib.sha256(python.encode()).hexdigest()[:12]
    state_dir.mkdir(parents=True, exist_ok=True)
    stamp_path = state_dir / "retro_kernels-setup.json"
    stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
    logs = ROOT / "build" / "setup-logs"
    logs.mkdir(parents=True, exist_ok=True)

    torch_version = installed_version(python, "torch")
    if torch_version is None:
        if args.python and has_nvidia_gpu():
            fail(f"{python} has no torch: install the CUDA build you want first (make keeps it)")
        install_torch(python, logs / "torch.log")
    constraints = state_dir / "constraints.txt"
    torch_version = write_constraints(python, constraints)

    deps_key = digest([ROOT / "pyproject.toml", ROOT / "setup.py", Path(__file__).resolve()],
                      str(STAMP_VERSION), python, args.extras, str(args.no_deps), torch_version)
    native_key = digest(native_inputs(), python, torch_version, os.environ.get("RETRO_KERNELS_NO_NATIVE", ""),
                        os.environ.get("RETRO_KERNELS_NO_CUDA", ""))
    if stamp.get("deps") != deps_key:
        install_package(python, args.extras, constraints, logs / "pip.log", args.no_deps)
        stamp = {"deps": deps_key}
        stamp_path.write_text(json.dumps(stamp))
    built = any((ROOT / "retro_kernels").glob("_C_cpu*.so"))  # gone after a `git clean -x`, say
    if stamp.get("native") != native_key or not (built or os.environ.get("RETRO_KERNELS_NO_NATIVE", "0") == "1"):
        build_native(python, logs / "native.log")
        stamp["native"] = native_key
        stamp_path.write_text(json.dumps(stamp))
    say(f"ready: {python} (torch {torch_version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
