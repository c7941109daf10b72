"""neighbour_self_attention in CUDA C++: the kernels of csrc/cuda/neighbour_attention.cu.

Contract: see retro_kernels/ops/neighbour_self_attention.py. Forward: one block per (score
tile x query head, 64 rows), online softmax over key tiles, fp16/bf16
products on tensor cores (WMMA, fp32 accumulate), fp32 products with FMA.
Backward: one block per (score tile, kv head) owning its dq, dk, dv rows:
deterministic, no atomics. Inputs are read through their strides. Head dims
up to 128, sm_80+.
"""
from __future__ import annotations

from .chunked_cross_attention import _MISSING, _OPS, MAX_HEAD_DIM, device_reasons


def not_supported_reasons(q, k, v, neighbour_mask) -> list[str]:
    reasons = device_reasons(q)
    if q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} does not fit the CUDA kernels' tiles")
    if q.device.type == "cuda" and _MISSING:
        reasons.append(_MISSING)
    return reasons


def forward(q, k, v, neighbour_mask, scale):
    """(out (B, L, K, R, Hq, D) in q's dtype, lse (B, Hq, L*K*R) fp32)."""
    return _OPS.neighbour_self_attention_fwd(q, k, v, neighbour_mask, scale)


def backward(dout, q, k, v, neighbour_mask, out, lse, scale):
    """(dq, dk, dv), contiguous, in the inputs' dtypes."""
    return _OPS.neighbour_self_attention_bwd(dout, q, k, v, neighbour_mask, out, lse, scale)
