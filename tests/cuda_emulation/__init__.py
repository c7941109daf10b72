"""The CUDA kernels of csrc/cuda, compiled as host C++ and run on the CPU (no GPU needed).

The C++ files here compile the same .cu sources with RETRO_KERNELS_EMULATION: the
kernels, the address arithmetic and the launchers are the real ones; the PTX
instructions (mma.sync, ldmatrix, cp.async), the warp shuffles and the barriers are
emulated (cuda_emulation.h). The library registers the same ops as
`torch.ops.retro_kernels_cuda_emulated`, for CPU tensors. It is slow (a few ms per CTA):
tests keep the shapes small. It needs a C++ compiler and the CUDA headers cuda_fp16.h /
cuda_bf16.h (a CUDA toolkit, or the copy that ships with Triton).
"""
from __future__ import annotations

import functools
import glob
import os
import shutil

import torch

EMULATION = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(os.path.dirname(os.path.dirname(EMULATION)), "csrc", "cuda")
NAMESPACE = "retro_kernels_cuda_emulated"


def cuda_include_dir() -> str | None:
    """A directory holding cuda_fp16.h, cuda_bf16.h and vector_types.h, or None."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    candidates += sorted(glob.glob("/usr/local/cuda*/include"))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "include"))
    except ImportError:
        pass
    for d in candidates:
        if all(os.path.exists(os.path.join(d, h)) for h in ("cuda_fp16.h", "cuda_bf16.h", "vector_types.h")):
            return d
    return None


@functools.cache
def load():
    """(the emulated op namespace, None), or (None, why it could not be built)."""
    include = cuda_include_dir()
    if include is None:
        return None, "the CUDA headers cuda_fp16.h/cuda_bf16.h were not found (no CUDA toolkit, no Triton)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return None, "no C++ compiler"
    from torch.utils.cpp_extension import load as load_extension

    load_extension(
        name=NAMESPACE,
        sources=sorted(glob.glob(os.path.join(EMULATION, "*.cpp"))),
        extra_include_paths=[EMULATION, KERNELS, include],
        # no _FORTIFY_SOURCE: its longjmp check rejects the emulator's jumps between stacks
        extra_cflags=["-O2", "-std=c++20", "-U_FORTIFY_SOURCE", "-Wno-unknown-pragmas"],
        is_python_module=False,
        verbose=False,
    )
    return getattr(torch.ops, NAMESPACE), None
