"""Python side of the C++ CPU kernels in csrc/cpu (built into retro_kernels._C_cpu).

`BACKEND` declares what they run, for every op (retro_kernels/backend.py): CPU
tensors, fp32/fp16/bf16, any head dim; each op's kernels are the extension's
functions <op>_fwd and <op>_bwd. Which GEMM they use on this machine, and which CPU
and ISA this is: retro_kernels/cpu/gemm.py (it runs the ops, so this module does not
import it).
"""
from __future__ import annotations

import torch

from .. import _native
from ..backend import Backend, extension_functions

# Loaded once, at import, so that choosing a backend is plain Python (torch.compile traces it).
OPS = _native.load("cpu")
MISSING = _native.missing_reason("cpu")

BACKEND = Backend(
    name="cpu",
    devices=("cpu",),
    dtypes=(torch.float32, torch.float16, torch.bfloat16),  # fp16/bf16 are computed in fp32
    missing=MISSING,
    # csrc/cpu/chunked_cross_attention.cpp, csrc/cpu/neighbour_attention.cpp
    ops=("chunked_cross_attention", "neighbour_self_attention", "neighbour_cross_attention"),
    library=OPS,
    load=extension_functions,
)
