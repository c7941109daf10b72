"""Chunked cross-attention on the CPU: the fused C++ kernels of csrc/cpu/chunked_cross_attention.cpp.

Forward: one task per (batch, query chunk, query head), the m x K*R score tile
in dense fp32 blocks of 64 rows, products through the measured CPU GEMM
(csrc/cpu/gemm.h). Backward: one task per (batch, query chunk, kv head), which
owns its dq, dk and dv rows: deterministic, no atomics. Masked neighbour tokens
are dropped before any arithmetic. fp16/bf16 inputs are computed in fp32. Any
start_pos up to 2^63 - 1 is exact (unsigned position arithmetic).

Strided inputs are read in place when the head dim has unit stride (and k, v's
K and R dims flatten); otherwise the kernel makes them contiguous first.
"""
from __future__ import annotations

from . import OPS as _OPS, device_reasons


def not_supported_reasons(q, k, v, neighbour_mask) -> list[str]:
    return device_reasons(q)


def forward(q, k, v, neighbour_mask, chunk_size, scale, start_pos):
    """(out (B, N, Hq, D) in q's dtype, lse (B, Hq, N) fp32; +inf for rows that see no key)."""
    return _OPS.chunked_cross_attention_fwd(q, k, v, neighbour_mask, chunk_size, scale, start_pos)


def backward(dout, q, k, v, neighbour_mask, out, lse, chunk_size, scale, start_pos):
    """(dq, dk, dv), contiguous, in the inputs' dtypes."""
    return _OPS.chunked_cross_attention_bwd(
        dout, q, k, v, neighbour_mask, out, lse, chunk_size, scale, start_pos
    )
