"""neighbour_self_attention on the CPU: the fused C++ kernels of csrc/cpu/neighbour_attention.cpp
(shared with the other neighbour op; the block routine in csrc/cpu/block_attention.h).

Contract: see retro_kernels/ops/neighbour_self_attention.py. Forward: one task per score tile
and query head (an R x R tile per neighbour and head), dense fp32 tiles of 64 rows, products through the
measured CPU GEMM (csrc/cpu/gemm.h). Backward: one task per kv head's tile, owning
its dq, dk and dv rows: deterministic, no atomics. Masked tokens are dropped before
any arithmetic, so they take no part whatever they hold. fp16/bf16 inputs are
computed in fp32. Strided inputs are read in place when the head dim has unit
stride, else made contiguous first.
"""
from __future__ import annotations

from . import OPS as _OPS, device_reasons


def not_supported_reasons(q, k, v, neighbour_mask) -> list[str]:
    return device_reasons(q)


def forward(q, k, v, neighbour_mask, scale):
    """(out (B, L, K, R, Hq, D) in q's dtype, lse (B, Hq, L*K*R) fp32)."""
    return _OPS.neighbour_self_attention_fwd(q, k, v, neighbour_mask, scale)


def backward(dout, q, k, v, neighbour_mask, out, lse, scale):
    """(dq, dk, dv), contiguous, in the inputs' dtypes."""
    return _OPS.neighbour_self_attention_bwd(dout, q, k, v, neighbour_mask, out, lse, scale)
