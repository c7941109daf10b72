"""neighbour_self_attention in CUDA C++: csrc/cuda/neighbour_attention.cu.

Contract: see retro_kernels/ops/neighbour_self_attention.py. The shared
attention core (csrc/cuda/attention_tiles.cuh) over the R x R score tile of
each neighbour; see retro_kernels/cuda/chunked_cross_attention.py for the kernels.
"""
from __future__ import annotations

from . import _support


def not_supported_reasons(q, k, v, neighbour_mask) -> list[str]:
    return _support.not_supported_reasons(q, k)


def forward(q, k, v, neighbour_mask, scale):
    """(out (B, L, K, R, Hq, D) in q's dtype, lse (B, Hq, L*K*R) fp32)."""
    return _support.OPS.neighbour_self_attention_fwd(q, k, v, neighbour_mask, scale)


def backward(dout, q, k, v, neighbour_mask, out, lse, scale):
    """(dq, dk, dv), contiguous, in the inputs' dtypes."""
    return _support.OPS.neighbour_self_attention_bwd(dout, q, k, v, neighbour_mask, out, lse, scale)
