"""Python side of the C++ CPU kernels in csrc/cpu (built into retro_kernels._C_cpu).

`BACKEND` declares what they run, for every op (retro_kernels/backend.py): CPU
tensors, fp32/fp16/bf16, any head dim; its `kernels` table names each op's ops in
the extension. Which GEMM they use on this machine, and which CPU and ISA this is:
retro_kernels/cpu/gemm.py (it runs the ops, so this module does not import it).
"""
from __future__ import annotations

import torch

from .. import _native
from ..backend import Backend, native_kernels


def library():
    """torch.ops.retro_kernels_cpu, compiled first if it compiles on first use."""
    return _native.load("cpu")


BACKEND = Backend(
    name="cpu",
    devices=("cpu",),
    dtypes=(torch.float32, torch.float16, torch.bfloat16),  # fp16/bf16 are computed in fp32
    kernels=native_kernels(library),  # csrc/cpu/chunked_cross_attention.cpp, csrc/cpu/neighbour_attention.cpp
    missing=_native.missing_reason("cpu"),  # known at import, so choosing a backend is plain Python
)
