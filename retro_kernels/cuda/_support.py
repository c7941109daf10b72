"""What the CUDA kernels (csrc/cuda) can run, written once for the three ops.

The kernels are one attention core (csrc/cuda/attention_tiles.cuh): fp16/bf16
products on tensor cores with `mma.sync` (fp32 accumulate), head dims up to 128,
sm_80 or newer. `not_supported_reasons` refuses everything else with a reason, so
that `backend="auto"` falls back (to Triton or the reference) instead of raising,
and `backend="cuda"` raises BackendNotSupported saying why.
"""
from __future__ import annotations

import torch

from .. import _native

MAX_HEAD_DIM = 128
DTYPES = (torch.float16, torch.bfloat16)
# Rows (numel / head dim) of one tensor: keeps every kernel's 1-D grid, one program per
# 64 rows or keys of one head and score tile, under 2^31 programs (the launchers check
# the exact count too).
MAX_ROWS = 2**29

# Loaded once, at import, so that choosing a backend is plain Python (torch.compile traces it).
OPS = _native.load("cuda") if torch.cuda.is_available() else None
MISSING = _native.missing_reason("cuda") if torch.cuda.is_available() else "no CUDA device is available"


def device_reasons(q: torch.Tensor) -> list[str]:
    """Why the CUDA kernels cannot run on q's device."""
    if q.device.type != "cuda":
        return [f"the cuda backend needs CUDA tensors, got {q.device.type}"]
    if MISSING:
        return [MISSING]
    if torch.cuda.get_device_capability(q.device)[0] < 8:
        return ["the CUDA kernels need compute capability 8.0 or newer (sm_80+: cp.async, bf16 mma)"]
    return []


def input_reasons(q: torch.Tensor, k: torch.Tensor) -> list[str]:
    """Why the CUDA kernels cannot run an op on queries q and keys k, whatever the device."""
    reasons = []
    if q.dtype not in DTYPES:
        reasons.append(
            f"the CUDA kernels run float16 and bfloat16 on tensor cores, got {q.dtype}; "
            "backend='triton' or 'reference' run it"
        )
    head_dim = q.shape[-1]
    if head_dim > MAX_HEAD_DIM:
        reasons.append(f"head dim {head_dim} > {MAX_HEAD_DIM} does not fit the CUDA kernels' tiles")
    for name, t in (("q", q), ("k", k)):
        rows = t.numel() // max(t.shape[-1], 1)
        if rows > MAX_ROWS:
            reasons.append(f"{name} has {rows} rows (numel / head dim), more than the CUDA kernels' "
                           f"grid takes ({MAX_ROWS})")
    return reasons


def not_supported_reasons(q: torch.Tensor, k: torch.Tensor) -> list[str]:
    """Why the CUDA kernels cannot run an op on queries q and keys k ([] = they can)."""
    return device_reasons(q) + input_reasons(q, k)
