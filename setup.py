"""The native part of the retro_kernels build (the metadata is in pyproject.toml).

Native extensions (built with ninja through torch's BuildExtension):
  retro_kernels._C_cpu   csrc/cpu/*.cpp   C++ CPU kernels; built whenever torch is importable
  retro_kernels._C_cuda  csrc/cuda/*.cu   CUDA kernels; built when torch has CUDA and nvcc is
                                          found, for TORCH_CUDA_ARCH_LIST (default "8.0;9.0")
RETRO_KERNELS_NO_NATIVE=1 skips both; RETRO_KERNELS_NO_CUDA=1 skips only the CUDA one.
MAX_JOBS limits ninja's parallel compile jobs.

A build that cannot see torch (pip's default isolated build) makes a package
without native code; its cpu backend compiles csrc/cpu on first use
(retro_kernels/_native.py), from the copy that build_py puts in the package.
`pip install --no-build-isolation .` (or `make`, or `python setup.py
build_ext --inplace` in a checkout) builds them ahead of time against the
torch you have.
"""
import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _build_config():
    """retro_kernels/_native_build.py, read by path: importing the package needs torch."""
    spec = importlib.util.spec_from_file_location("_native_build", ROOT / "retro_kernels" / "_native_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _build_config()


class build_py_with_cpu_sources(build_py):
    """Also copies csrc/cpu into the package, for the build on first use."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install finds csrc/ next to the package
        target = Path(self.build_lib) / "retro_kernels" / BUILD.SHIPPED_CPU_SOURCES
        self.mkpath(str(target))
        for source in BUILD.cpu_source_files(ROOT / "csrc" / "cpu"):
            self.copy_file(str(source), str(target / source.name))


def _find_cuda_home() -> None:
    """Set CUDA_HOME to the toolkit that holds the CUDA runtime, if it is unset.

    torch takes the folder above the `nvcc` on PATH; where that nvcc is a wrapper script
    (e.g. /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc) the link then fails
    with "cannot find -lcudart". The first candidate whose lib/ or lib64/ has libcudart wins.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = ([Path(nvcc).resolve().parent.parent] if nvcc else []) + [Path("/usr/local/cuda")]
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and any(
                any((home / lib).glob("libcudart.so*")) for lib in ("lib64", "lib", "targets/x86_64-linux/lib")):
            os.environ["CUDA_HOME"] = str(home)
            return


def native_extensions():
    if os.environ.get("RETRO_KERNELS_NO_NATIVE", "0") == "1":
        print("retro_kernels: RETRO_KERNELS_NO_NATIVE=1, skipping the native kernels")
        return [], {}
    _find_cuda_home()  # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("retro_kernels: torch not importable at build time; skipping the native kernels "
              "(the cpu backend will compile them on first use)")
        return [], {}
    extensions = []
    cpu_sources = [str(p.relative_to(ROOT)) for p in BUILD.cpu_source_files(ROOT / "csrc" / "cpu")
                   if p.suffix == ".cpp"]
    if cpu_sources:
        extensions.append(CppExtension(
            "retro_kernels._C_cpu",
            cpu_sources,
            # -g0: Python's CFLAGS add -g, which more than doubles the compile time (and the library's size)
            extra_compile_args={"cxx": BUILD.CPU_CXX_FLAGS + ["-g0"]},
            extra_link_args=BUILD.CPU_LINK_FLAGS,
        ))
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    skip_cuda = os.environ.get("RETRO_KERNELS_NO_CUDA", "0") == "1"
    if cuda_sources and not skip_cuda and torch.version.cuda and CUDA_HOME is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        extensions.append(CUDAExtension(
            "retro_kernels._C_cuda",
            cuda_sources,
            extra_compile_args={
                "cxx": ["-O3", "-std=c++20"],
                "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"],
            },
        ))
    elif cuda_sources:
        why = ("RETRO_KERNELS_NO_CUDA=1" if skip_cuda else
               "torch has no CUDA" if not torch.version.cuda else "nvcc (CUDA_HOME) not found")
        print(f"retro_kernels: {why}; skipping the CUDA kernels")
    if not extensions:
        return [], {}
    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": build_py_with_cpu_sources, **cmdclass})
