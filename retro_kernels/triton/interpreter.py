"""Whether the Triton kernels run in Triton's interpreter, and what it cannot run.

On the CPU the kernels run only under the interpreter (TRITON_INTERPRET=1, set before
triton is imported), slowly, for tests; its bf16 arithmetic is wrong, so it is refused
there. This module does not import triton.
"""
from __future__ import annotations

import os

import torch


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
