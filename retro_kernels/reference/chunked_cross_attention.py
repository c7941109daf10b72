"""Chunked cross-attention, in plain PyTorch: the specification.

This follows the RETRO paper's pseudocode step by step (Borgeaud et al. 2022,
and docs/spec.md#chunked-cross-attention). It pads, reshapes and copies freely: it is the
oracle that every fused backend is tested against, not a fast path. Its
memory is O(input) all the same (it is also the fallback path): it builds
only the attending chunks that hold one of the given queries, never the
`start_pos` positions before them. Gradients come from PyTorch's autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .masking import drop_masked, masked_softmax


def chunked_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    neighbour_mask: torch.Tensor | None = None,
    scale: float | None = None,
    start_pos: int = 0,
) -> torch.Tensor:
    """q (B, N, Hq, D), k/v (B, L, K, R, Hkv, D) -> (B, N, Hq, D). See docs/spec.md#the-shift."""
    B, N, Hq, D = q.shape
    _, L, K, R, Hkv, _ = k.shape
    m = chunk_size
    scale = D ** -0.5 if scale is None else scale
    T = start_pos + N  # absolute length of the sequence seen so far

    # 0. Place the queries at their absolute positions start_pos .. T-1, in a
    #    window that starts at the first attending chunk u0 holding one of
    #    them: attending chunk u is positions u*m + m-1 .. u*m + 2m-2, and
    #    nothing before the window is ever read.
    u0 = max(0, start_pos - (m - 1)) // m
    w0 = u0 * m + (m - 1)  # absolute position of the window's first row
    h = q[:, max(0, w0 - start_pos):]  # our tokens before w0 (t < m-1) read no chunk
    h = F.pad(h, (0, 0, 0, 0, max(0, start_pos - w0), 0))  # rows w0 .. start_pos-1: not ours

    # 1-2. The shift is the window's offset: row i is absolute position w0 + i,
    #    i.e. row u*m + i' of the paper's shifted sequence. Reshape into
    #    attending chunks u0 .. u0+Lc-1 of m rows: (B, Lc, m, Hq, D).
    Lc = -(-h.shape[1] // m)
    h = F.pad(h, (0, 0, 0, 0, 0, Lc * m - h.shape[1]))
    h = h.view(B, Lc, m, Hq, D)

    # 3. Attending chunk u reads the neighbours of chunk u. Masked neighbour
    #    tokens take no part, whatever they hold.
    mask = None if neighbour_mask is None else neighbour_mask[:, u0:u0 + Lc].reshape(B, Lc, K * R)
    nk = drop_masked(k[:, u0:u0 + Lc].reshape(B, Lc, K * R, Hkv, D), mask)
    nv = drop_masked(v[:, u0:u0 + Lc].reshape(B, Lc, K * R, Hkv, D), mask)
    group = Hq // Hkv  # grouped-query heads share one key/value head
    nk = nk.repeat_interleave(group, dim=3)
    nv = nv.repeat_interleave(group, dim=3)

    # 4. One softmax over all K*R neighbour tokens of the chunk.
    scores = torch.einsum("bumhd,bujhd->buhmj", h, nk) * scale
    key_mask = None if mask is None else mask.reshape(B, Lc, 1, 1, K * R)
    attn = masked_softmax(scores, key_mask)
    o = torch.einsum("buhmj,bujhd->bumhd", attn, nv)

    # 5. Reshape back, give our tokens before the window (t < m-1: they see
    #    no complete chunk) zero rows, drop the rows that are not ours.
    o = o.reshape(B, Lc * m, Hq, D)
    o = o[:, max(0, start_pos - w0):]
    o = F.pad(o, (0, 0, 0, 0, max(0, w0 - start_pos), 0))
    return o[:, :N]
