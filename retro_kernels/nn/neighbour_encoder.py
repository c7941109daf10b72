"""`NeighbourEncoderLayer`: one block of RETRO's retrieval encoder, on the fused ops."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.neighbour_cross_attention import neighbour_cross_attention
from ..ops.neighbour_self_attention import neighbour_self_attention
from .rotary import RotaryEmbedding


class NeighbourEncoderLayer(nn.Module):
    """Pre-norm encoder block over the retrieved neighbours (docs/spec.md#the-neighbour-encoder).

        x = x + SelfAttention(RMSNorm(x))            within each neighbour, bidirectional
        x = x + CrossAttention(RMSNorm(x), RMSNorm(chunk))   if cross_attention
        x = x + FeedForward(RMSNorm(x))

    Self-attention uses rotary relative positions: the query and the key of
    neighbour token j are both rotated by position j, so the score between
    tokens j and j' depends on j' - j only. Cross-attention uses no
    positions: the chunk activations come from the decoder, which has
    already encoded the order of the chunk's tokens. The chunk activations
    are RMS-normalised (their own norm) before the key/value projections,
    since they are taken from the decoder's un-normalised residual stream.

    Padding rows (neighbour_mask False) are passed through unchanged: the
    self-attention op outputs zeros for them, and the cross-attention and
    feed-forward updates are multiplied by the mask. No NaN arises from a
    fully padded neighbour or a fully masked chunk.

    Args:
        d_model: width of the neighbour token states.
        n_heads: query heads.
        cross_attention: whether this block cross-attends to the chunk
            activations (RETRO: the first encoder layer only).
        n_kv_heads: key/value heads (default n_heads; fewer = grouped-query).
        ff_mult: feed-forward hidden width = ff_mult * d_model.
        head_dim: default d_model // n_heads.
        chunk_dim: width of the chunk activations (the decoder's d_model);
            default d_model.
        rotary_base: base of the rotary frequencies.
        norm_eps: epsilon of the RMS norms.
        backend: passed to the ops ("auto", "reference", "triton", ...).

    forward(x (B, L, K, R, d_model), chunk (B, L, M, chunk_dim) or None,
            neighbour_mask (B, L, K, R) bool or None,
            chunk_mask (B, L, M) bool or None) -> (B, L, K, R, d_model).
    `chunk` is required when cross_attention is True and ignored otherwise.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        cross_attention: bool,
        n_kv_heads: Optional[int] = None,
        ff_mult: int = 4,
        head_dim: Optional[int] = None,
        chunk_dim: Optional[int] = None,
        rotary_base: float = 10000.0,
        norm_eps: float = 1e-6,
        backend: str = "auto",
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        head_dim = d_model // n_heads if head_dim is None else head_dim
        chunk_dim = d_model if chunk_dim is None else chunk_dim
        if n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(
                f"n_heads ({n_heads}) must be a positive multiple of n_kv_heads ({n_kv_heads})"
            )
        if head_dim < 2:
            raise ValueError(f"head_dim must be >= 2, got {head_dim} (d_model={d_model}, n_heads={n_heads})")
        if ff_mult < 1:
            raise ValueError(f"ff_mult must be >= 1, got {ff_mult}")
        self.d_model, self.chunk_dim = d_model, chunk_dim
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.cross_attention = bool(cross_attention)
        self.backend = backend

        # self-attention within each neighbour
        self.self_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.self_q = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.self_k = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.self_v = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.self_out = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.rotary = RotaryEmbedding(head_dim - head_dim % 2, rotary_base)

        # cross-attention to the chunk the neighbours were retrieved for
        if self.cross_attention:
            self.cross_norm = nn.RMSNorm(d_model, eps=norm_eps)
            self.chunk_norm = nn.RMSNorm(chunk_dim, eps=norm_eps)
            self.cross_q = nn.Linear(d_model, n_heads * head_dim, bias=False)
            self.cross_k = nn.Linear(chunk_dim, n_kv_heads * head_dim, bias=False)
            self.cross_v = nn.Linear(chunk_dim, n_kv_heads * head_dim, bias=False)
            self.cross_out = nn.Linear(n_heads * head_dim, d_model, bias=False)

        # feed-forward
        self.ff_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.ff = nn.Sequential(
            nn.Linear(d_model, ff_mult * d_model, bias=False),
            nn.GELU(),
            nn.Linear(ff_mult * d_model, d_model, bias=False),
        )

    def _check_inputs(self, x, chunk):
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must be a (B, L, K, R, d_model={self.d_model}) tensor, got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        if not self.cross_attention:
            return
        if chunk is None:
            raise ValueError("chunk (B, L, M, chunk_dim) is required: this layer has cross_attention=True")
        if not isinstance(chunk, torch.Tensor) or chunk.dim() != 4:
            raise ValueError(
                f"chunk must be a (B, L, M, chunk_dim) tensor, got "
                f"{tuple(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__}"
            )
        B, L = x.shape[:2]
        if tuple(chunk.shape[:2]) != (B, L) or chunk.shape[-1] != self.chunk_dim:
            raise ValueError(
                f"chunk must have shape (B, L, M, chunk_dim) = ({B}, {L}, M, {self.chunk_dim}), "
                f"got {tuple(chunk.shape)}"
            )

    def forward(
        self,
        x: torch.Tensor,
        chunk: Optional[torch.Tensor] = None,
        neighbour_mask: Optional[torch.Tensor] = None,
        chunk_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        self._check_inputs(x, chunk)
        B, L, K, R, _ = x.shape
        hd = self.head_dim  # the head counts from the projections: a tensor-parallel rank holds some heads
        keep = None if neighbour_mask is None else neighbour_mask[..., None].to(x.dtype)

        # -- self-attention within each neighbour, relative positions j' - j
        h = self.self_norm(x)
        q = self.self_q(h).view(B, L, K, R, -1, hd)
        k = self.self_k(h).view(B, L, K, R, -1, hd)
        v = self.self_v(h).view(B, L, K, R, -1, hd)
        positions = torch.arange(R, device=x.device)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        a = neighbour_self_attention(q, k, v, neighbour_mask=neighbour_mask, backend=self.backend)
        x = x + self.self_out(a.reshape(B, L, K, R, -1))  # padding rows: a = 0

        # -- cross-attention to the chunk's own activations (no positions) ---
        if self.cross_attention:
            M = chunk.shape[2]
            h = self.cross_norm(x)
            c = self.chunk_norm(chunk)
            q = self.cross_q(h).view(B, L, K, R, -1, hd)
            k = self.cross_k(c).view(B, L, M, -1, hd)
            v = self.cross_v(c).view(B, L, M, -1, hd)
            a = neighbour_cross_attention(q, k, v, chunk_mask=chunk_mask, backend=self.backend)
            update = self.cross_out(a.reshape(B, L, K, R, -1))
            x = x + (update if keep is None else update * keep)

        # -- feed-forward ---------------------------------------------------
        update = self.ff(self.ff_norm(x))
        return x + (update if keep is None else update * keep)
