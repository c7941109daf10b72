"""What the CUDA kernels (csrc/cuda) can run, written once for the three ops.

The kernels are one attention core (csrc/cuda/attention_tiles.cuh): fp16/bf16
products on tensor cores with `mma.sync` (fp32 accumulate), head dims up to 128,
sm_80 or newer: declared once, as `BACKEND` (retro_kernels/backend.py), whose
not_supported_reasons refuses everything else with a reason, so that
`backend="auto"` falls back (to Triton or the reference) instead of raising, and
`backend="cuda"` raises BackendNotSupported saying why. Each op's kernels are the
extension's functions <op>_fwd and <op>_bwd.
"""
from __future__ import annotations

import torch

from .. import _native
from ..backend import Backend, extension_functions

# Rows (numel / head dim) of one tensor: keeps every kernel's 1-D grid, one program per
# 64 rows or keys of one head and score tile, under 2^31 programs (the launchers check
# the exact count too).
MAX_ROWS = 2**29

# Loaded once, at import, so that choosing a backend is plain Python (torch.compile traces it).
OPS = _native.load("cuda") if torch.cuda.is_available() else None
MISSING = _native.missing_reason("cuda") if torch.cuda.is_available() else "no CUDA device is available"


def grid_limits(q: torch.Tensor, k: torch.Tensor) -> list[str]:
    """Why the kernels' 1-D grids cannot cover queries q and keys k."""
    reasons = []
    for name, t in (("q", q), ("k", k)):
        rows = t.numel() // max(t.shape[-1], 1)
        if rows > MAX_ROWS:
            reasons.append(f"{name} has {rows} rows (numel / head dim), more than the CUDA kernels' "
                           f"grid takes ({MAX_ROWS})")
    return reasons


BACKEND = Backend(
    name="cuda",
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16),  # tensor cores; backend="triton" or "reference" run fp32
    max_head_dim=128,
    min_compute_capability=(8, 0),  # cp.async, bf16 mma
    missing=MISSING,
    # csrc/cuda/chunked_cross_attention.cu, csrc/cuda/neighbour_attention.cu
    ops=("chunked_cross_attention", "neighbour_self_attention", "neighbour_cross_attention"),
    library=OPS,
    load=extension_functions,
    limits=grid_limits,
)
