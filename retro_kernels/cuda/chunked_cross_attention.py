"""Chunked cross-attention in CUDA C++: csrc/cuda/chunked_cross_attention.cu.

The shared attention core (csrc/cuda/attention_tiles.cuh): forward, one program
per (query chunk, 64 rows, head), online softmax over key tiles of 64 in
registers (mma.sync, cp.async double buffering); backward, a dq kernel (which
also computes rowsum(dO * O)) and a dk/dv kernel owning 64 keys of a neighbour
chunk for the whole kv group: deterministic, no atomics. fp16/bf16, head dims up
to 128, sm_80+; inputs are read through their strides.
"""
from __future__ import annotations

from . import _support


def not_supported_reasons(q, k, v, neighbour_mask) -> list[str]:
    return _support.not_supported_reasons(q, k)


def forward(q, k, v, neighbour_mask, chunk_size, scale, start_pos):
    """(out (B, N, Hq, D) in q's dtype, lse (B, Hq, N) fp32; +inf for rows that see no key)."""
    return _support.OPS.chunked_cross_attention_fwd(q, k, v, neighbour_mask, chunk_size, scale, start_pos)


def backward(dout, q, k, v, neighbour_mask, out, lse, chunk_size, scale, start_pos):
    """(dq, dk, dv), contiguous, in the inputs' dtypes."""
    return _support.OPS.chunked_cross_attention_bwd(
        dout, q, k, v, neighbour_mask, out, lse, chunk_size, scale, start_pos
    )
