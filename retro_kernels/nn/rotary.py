"""Rotary position embeddings (GPT-NeoX "rotate half" form).

RETRO's attention uses relative positions. With rotary embeddings a relative
position d(i, j) is obtained by rotating the query by position a and the key
by position b with a - b = d(i, j); see `positions` in each layer.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def check_rotary_base(base) -> float:
    """`base` as a float; a ValueError unless it is a finite number > 0.

    base ** (a negative or NaN power) gives NaN or infinite frequencies, and
    so NaN outputs later instead of an error now.
    """
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not (math.isfinite(base) and base > 0):
        raise ValueError(f"rotary_base must be a finite number > 0, got {base!r}")
    return float(base)


class RotaryEmbedding(nn.Module):
    """Rotates the first `dim` channels of the head dim by integer positions.

    `forward(x, positions)`: x is (..., P, H, D) and positions is (P,) int;
    every head at index p along the P axis is rotated by angle positions[p] * freq.
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"rotary dim must be an even number >= 2, got {dim}")
        check_rotary_base(base)
        self.dim = dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.to(torch.float32)[:, None] * self.inv_freq  # (P, dim/2)
        cos = angles.cos()[:, None, :].to(x.dtype)  # (P, 1, dim/2): broadcast over heads
        sin = angles.sin()[:, None, :].to(x.dtype)
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated
