"""Triton kernels, one file per op (kernel and launcher side by side), and what they support.

`BACKEND` declares it once for every op (retro_kernels/backend.py). On the CPU the
kernels run only under the Triton interpreter (TRITON_INTERPRET=1, set before triton
is imported), slowly, for tests; its bf16 arithmetic is wrong, so it is refused there.
This module does not import triton: without it, dispatch says "triton is not installed".
"""
from __future__ import annotations

import os

import torch

from ..backend import Backend


def interpreting() -> bool:
    """Whether Triton runs its kernels on the CPU, in its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_reasons(q: torch.Tensor, k: torch.Tensor) -> list[str]:
    """Why the interpreter cannot run these CPU tensors (nothing to say of CUDA tensors)."""
    if q.device.type != "cpu":
        return []
    if not interpreting():
        return [f"triton needs CUDA tensors (got {q.device.type}); set TRITON_INTERPRET=1 "
                "before importing triton to run the kernels on the CPU, slowly"]
    if q.dtype == torch.bfloat16:
        return ["bfloat16 arithmetic is wrong under the Triton interpreter; use a GPU"]
    return []


BACKEND = Backend(
    name="triton",
    devices=("cuda", "cpu"),  # cpu: under the interpreter only (interpreter_reasons)
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    max_head_dim=256,
    # the tiles are sized for sm_80 and newer data-centre GPUs: 163 KB of shared memory per block
    min_compute_capability=(8, 0),
    min_shared_memory=163 * 1024,
    limits=interpreter_reasons,
)
