"""Build retro_kernels, with its optional native extensions from csrc/.

Native extensions (built with ninja through torch's BuildExtension):
  retro_kernels._C_cpu   csrc/cpu/*.cpp   C++ CPU kernels; built whenever torch is importable
  retro_kernels._C_cuda  csrc/cuda/*.cu   CUDA kernels; built when torch has CUDA and nvcc is
                                          found, for TORCH_CUDA_ARCH_LIST (default "8.0;9.0")
RETRO_KERNELS_NO_NATIVE=1 skips both. Without them the package still imports
and works on the reference and Triton backends. Install with
    pip install --no-build-isolation -e .
so that the build sees the torch you already have (and pip never pulls
another one), or build in place with `python setup.py build_ext --inplace`.
MAX_JOBS limits ninja's parallel compile jobs.
"""
import glob
import os

from setuptools import find_packages, setup

# No -march: the .so runs on any x86-64; csrc/cpu/common.cpp picks AVX2 code at load time.
# -fno-trapping-math -fno-math-errno (as PyTorch builds) let GCC vectorise the softmax loops.
CPU_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]


def native_extensions():
    if os.environ.get("RETRO_KERNELS_NO_NATIVE", "0") == "1":
        print("retro_kernels: RETRO_KERNELS_NO_NATIVE=1, skipping the native kernels")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("retro_kernels: torch not importable at build time; skipping native kernels")
        return [], {}
    extensions = []
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    if cpu_sources:
        extensions.append(CppExtension(
            "retro_kernels._C_cpu",
            cpu_sources,
            extra_compile_args={"cxx": CPU_FLAGS},
            extra_link_args=["-fopenmp"],
        ))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if cuda_sources and torch.version.cuda and CUDA_HOME is not None:
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
        why = "torch has no CUDA" if not torch.version.cuda else "nvcc (CUDA_HOME) not found"
        print(f"retro_kernels: {why}; skipping the CUDA kernels")
    if not extensions:
        return [], {}
    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()

setup(
    name="retro_kernels",
    version="0.1.0",
    description="Fused chunked cross-attention and neighbour-encoder kernels for RETRO",
    packages=find_packages(include=["retro_kernels", "retro_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "hypothesis"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
