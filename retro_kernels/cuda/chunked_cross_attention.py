"""Chunked cross-attention in CUDA C++: the kernels of csrc/cuda/chunked_cross_attention.cu.

Forward: one block per (query chunk, 64 rows, batch x query head), online
softmax over key tiles, fp16/bf16 products on tensor cores (WMMA, fp32
accumulate), fp32 products with FMA. Backward: one block per (query chunk,
batch x kv head) owning its dq, dk, dv rows: deterministic, no atomics.
Inputs are read through their strides (no copies). Head dims up to 128, sm_80+.
"""
from __future__ import annotations

import torch

from .. import _native

MAX_HEAD_DIM = 128

# Loaded once, at import, so that choosing a backend is plain Python (torch.compile traces it).
_OPS = _native.load("cuda") if torch.cuda.is_available() else None
_MISSING = _native.missing_reason("cuda") if torch.cuda.is_available() else "no CUDA device"


def not_supported_reasons(q, k, v, neighbour_mask) -> list[str]:
    reasons = []
    if q.device.type != "cuda":
        reasons.append(f"the cuda backend needs CUDA tensors, got {q.device.type}")
    else:
        major, _ = torch.cuda.get_device_capability(q.device)
        if major < 8:
            reasons.append("the CUDA kernels need compute capability 8.0 or newer (sm_80+)")
    if q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} does not fit the CUDA kernels' tiles")
    if q.device.type == "cuda" and _MISSING:
        reasons.append(_MISSING)
    return reasons


def forward(q, k, v, neighbour_mask, chunk_size, scale, start_pos):
    """(out (B, N, Hq, D) in q's dtype, lse (B, Hq, N) fp32; +inf for rows that see no key)."""
    return _OPS.chunked_cross_attention_fwd(q, k, v, neighbour_mask, chunk_size, scale, start_pos)


def backward(dout, q, k, v, neighbour_mask, out, lse, chunk_size, scale, start_pos):
    """(dq, dk, dv), contiguous, in the inputs' dtypes."""
    return _OPS.chunked_cross_attention_bwd(
        dout, q, k, v, neighbour_mask, out, lse, chunk_size, scale, start_pos
    )
