"""What the CUDA kernels (csrc/cuda) can run, written once for the three ops.

The kernels are one attention core (csrc/cuda/attention_tiles.cuh): fp16/bf16
products on tensor cores with `mma.sync` (fp32 accumulate), head dims up to 128,
sm_80 or newer: declared once, as `BACKEND` (retro_kernels/backend.py), whose
not_supported_reasons refuses everything else with a reason, so that
`backend="auto"` falls back (to Triton or the reference) instead of raising, and
`backend="cuda"` raises BackendNotSupported saying why. Its `kernels` table names
each op's ops in the extension.
"""
from __future__ import annotations

import torch

from .. import _native
from ..backend import Backend, native_kernels

# Rows (numel / head dim) of one tensor: keeps every kernel's 1-D grid, one program per
# 64 rows or keys of one head and score tile, under 2^31 programs (the launchers check
# the exact count too).
MAX_ROWS = 2**29


def grid_limits(q: torch.Tensor, k: torch.Tensor) -> list[str]:
    """Why the kernels' 1-D grids cannot cover queries q and keys k."""
    reasons = []
    for name, t in (("q", q), ("k", k)):
        rows = t.numel() // max(t.shape[-1], 1)
        if rows > MAX_ROWS:
            reasons.append(f"{name} has {rows} rows (numel / head dim), more than the CUDA kernels' "
                           f"grid takes ({MAX_ROWS})")
    return reasons


def library():
    """torch.ops.retro_kernels_cuda."""
    return _native.load("cuda")


BACKEND = Backend(
    name="cuda",
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16),  # tensor cores; backend="triton" or "reference" run fp32
    kernels=native_kernels(library),  # csrc/cuda/chunked_cross_attention.cu, csrc/cuda/neighbour_attention.cu
    max_head_dim=128,
    min_compute_capability=(8, 0),  # cp.async, bf16 mma
    # known at import, so choosing a backend is plain Python (torch.compile traces it)
    missing=_native.missing_reason("cuda") if torch.cuda.is_available() else "no CUDA device is available",
    limits=grid_limits,
)
