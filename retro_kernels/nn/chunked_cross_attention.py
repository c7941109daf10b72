"""`ChunkedCrossAttention`: RETRO's CCA layer (projections around the fused op)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.chunked_cross_attention import chunked_cross_attention
from .rotary import RotaryEmbedding, check_rotary_base


class ChunkedCrossAttention(nn.Module):
    """Decoder tokens attend to the encoded neighbours of their last complete chunk.

    Args:
        d_model: width of the hidden states and of the encoded neighbours.
        n_heads: query heads.
        chunk_size: m.
        n_kv_heads: key/value heads (default n_heads; fewer = grouped-query).
        head_dim: default d_model // n_heads.
        rotary: apply rotary relative positions with the CCA convention of
            docs/spec.md#positions-inside-cca: the query at attending index i is rotated by i + m - 1,
            neighbour token j by j, so the relative position is i - j + m - 1.
        backend: passed to `chunked_cross_attention`.

    forward(hidden (B, N, d_model), neighbours (B, L, K, R, d_model),
            neighbour_mask (B, L, K, R) bool or None, start_pos=0) -> (B, N, d_model).
    The first m-1 tokens of the sequence get exactly zero (no bias), so the
    residual stream passes them unchanged.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        chunk_size: int,
        n_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        rotary: bool = True,
        rotary_base: float = 10000.0,
        backend: str = "auto",
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        head_dim = d_model // n_heads if head_dim is None else head_dim
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        check_rotary_base(rotary_base)  # also when rotary=False: a bad value is a mistake either way
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.chunk_size = chunk_size
        self.backend = backend
        self.to_q = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.to_k = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.to_v = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.to_out = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.rotary = RotaryEmbedding(head_dim - head_dim % 2, rotary_base) if rotary else None

    def forward(self, hidden, neighbours, neighbour_mask=None, start_pos: int = 0):
        B, N, _ = hidden.shape
        if neighbours.dim() != 5 or neighbours.shape[0] != B:
            raise ValueError(
                f"neighbours must be (B, L, K, R, d_model) with B={B}, got {tuple(neighbours.shape)}"
            )
        _, L, K, R, _ = neighbours.shape
        m = self.chunk_size
        q = self.to_q(hidden).view(B, N, -1, self.head_dim)  # -1: the heads this rank holds (tensor parallel)
        k = self.to_k(neighbours).view(B, L, K, R, -1, self.head_dim)
        v = self.to_v(neighbours).view(B, L, K, R, -1, self.head_dim)
        if self.rotary is not None:
            t = torch.arange(start_pos, start_pos + N, device=hidden.device)
            q = self.rotary(q, (t - (m - 1)) % m + (m - 1))  # attending index i, plus m - 1
            k = self.rotary(k, torch.arange(R, device=hidden.device))  # neighbour index j
        out = chunked_cross_attention(
            q, k, v, m, neighbour_mask=neighbour_mask, start_pos=start_pos, backend=self.backend
        )
        return self.to_out(out.reshape(B, N, -1))
