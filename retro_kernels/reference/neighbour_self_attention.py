"""Neighbour self-attention, in plain PyTorch: the specification.

RETRO's retrieval encoder runs a small bidirectional transformer over each
retrieved neighbour (R tokens: the neighbour chunk and its continuation) on
its own. Every token of neighbour (b, l, k) attends to every real token of
the same neighbour; padding tokens (neighbour_mask False) take no weight as
keys, and as queries they output zeros (and so get zero gradients), whatever
values they hold.
See docs/spec.md#the-neighbour-encoder.

It repeats the key/value heads for grouped-query attention and builds the
full R x R score tensor: it is the oracle that the fused backends are tested
against, not a fast path. Gradients come from PyTorch's autograd.
"""
from __future__ import annotations

import torch

from .masking import drop_masked, masked_softmax


def neighbour_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    neighbour_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q (B, L, K, R, Hq, D), k/v (B, L, K, R, Hkv, D) -> (B, L, K, R, Hq, D)."""
    Hq, D = q.shape[-2:]
    Hkv = k.shape[-2]
    scale = D ** -0.5 if scale is None else scale

    # 1. Padding tokens take no part, as keys, values or queries, whatever
    #    they hold. Grouped-query heads: each key/value head serves Hq // Hkv query heads.
    q, k, v = (drop_masked(x, neighbour_mask) for x in (q, k, v))
    group = Hq // Hkv
    k = k.repeat_interleave(group, dim=4)
    v = v.repeat_interleave(group, dim=4)

    # 2. Scores between the R tokens of each neighbour: (B, L, K, Hq, R, R).
    scores = torch.einsum("blkihd,blkjhd->blkhij", q, k) * scale

    # 3. Softmax over the neighbour's real tokens; no causal mask.
    key_mask = None
    if neighbour_mask is not None:
        key_mask = neighbour_mask[:, :, :, None, None, :]  # (B, L, K, 1, 1, R)
    attn = masked_softmax(scores, key_mask)
    out = torch.einsum("blkhij,blkjhd->blkihd", attn, v)

    # 4. Padding query rows output zeros.
    return drop_masked(out, neighbour_mask)
