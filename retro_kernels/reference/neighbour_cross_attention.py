"""Neighbour cross-attention, in plain PyTorch: the specification.

At the first layer of RETRO's retrieval encoder, every token of every one of
the K neighbours retrieved for chunk l attends to the M tokens of chunk l
itself (the decoder activations at positions l*M .. l*M+M-1, not shifted).
All K neighbours of a chunk share those keys, so here the K*R neighbour tokens
of a chunk are simply treated as one block of queries against the chunk's M
keys. `chunk_mask` (B, L, M) hides the missing tokens of a partial last chunk;
a hidden token takes no part whatever it holds, and a query whose every key
is hidden outputs zeros. See docs/spec.md#the-neighbour-encoder.

This is the oracle that the fused backends are tested against, not a fast
path. Gradients come from PyTorch's autograd.
"""
from __future__ import annotations

import torch

from .masking import drop_masked, masked_softmax


def neighbour_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q (B, L, K, R, Hq, D), k/v (B, L, M, Hkv, D) -> (B, L, K, R, Hq, D)."""
    B, L, K, R, Hq, D = q.shape
    Hkv = k.shape[-2]
    scale = D ** -0.5 if scale is None else scale

    # 1. The K*R neighbour tokens of chunk l form one block of queries.
    q = q.reshape(B, L, K * R, Hq, D)

    # 2. Hidden chunk tokens take no part, whatever they hold. Grouped-query
    #    heads: each key/value head serves Hq // Hkv query heads.
    k, v = drop_masked(k, chunk_mask), drop_masked(v, chunk_mask)
    group = Hq // Hkv
    k = k.repeat_interleave(group, dim=3)
    v = v.repeat_interleave(group, dim=3)

    # 3. One softmax over the chunk's M tokens: (B, L, Hq, K*R, M).
    scores = torch.einsum("blihd,bljhd->blhij", q, k) * scale
    key_mask = None
    if chunk_mask is not None:
        key_mask = chunk_mask[:, :, None, None, :]  # (B, L, 1, 1, M)
    attn = masked_softmax(scores, key_mask)
    out = torch.einsum("blhij,bljhd->blihd", attn, v)
    return out.reshape(B, L, K, R, Hq, D)
