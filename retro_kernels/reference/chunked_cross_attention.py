"""Chunked cross-attention, in plain PyTorch: the specification.

This follows the RETRO paper's pseudocode step by step (Borgeaud et al. 2022,
and ../shared/DESIGN.md). It pads, reshapes and copies freely: it is the
oracle that every fused backend is tested against, not a fast path.
Gradients come from PyTorch's autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_softmax(scores: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim; masked keys get no weight, rows with no key get zeros.

    Rows whose every key is masked are given finite scores before the softmax
    (and zeroed after), so that neither the output nor its gradient is NaN.
    """
    if key_mask is None:
        return torch.softmax(scores, dim=-1)
    scores = scores.masked_fill(~key_mask, float("-inf"))
    row_has_key = key_mask.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~row_has_key, 0.0)
    return torch.softmax(scores, dim=-1) * row_has_key


def chunked_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    neighbour_mask: torch.Tensor | None = None,
    scale: float | None = None,
    start_pos: int = 0,
) -> torch.Tensor:
    """q (B, N, Hq, D), k/v (B, L, K, R, Hkv, D) -> (B, N, Hq, D). See DESIGN.md."""
    B, N, Hq, D = q.shape
    _, L, K, R, Hkv, _ = k.shape
    m = chunk_size
    scale = D ** -0.5 if scale is None else scale
    T = start_pos + N  # absolute length of the sequence seen so far

    # 0. Place the queries at their absolute positions start_pos .. T-1
    #    (positions before start_pos are never read for the output).
    h = F.pad(q, (0, 0, 0, 0, start_pos, 0))  # (B, T, Hq, D)

    # 1. Shift: drop the first m-1 positions and pad m-1 at the end, so that
    #    row u*m + i of the shifted sequence is absolute position u*m + m-1 + i.
    h = F.pad(h[:, m - 1 :], (0, 0, 0, 0, 0, m - 1))
    h = h[:, :T] if h.shape[1] > T else h

    # 2. Reshape into attending chunks of m rows: (B, Lc, m, Hq, D).
    Lc = -(-h.shape[1] // m)
    h = F.pad(h, (0, 0, 0, 0, 0, Lc * m - h.shape[1]))
    h = h.view(B, Lc, m, Hq, D)

    # 3. Attending chunk u reads the neighbours of chunk u. Only the first
    #    T // m attending chunks hold a real token; the rest are padding.
    used = min(T // m, Lc)
    h = h[:, :used]
    nk = k[:, :used].reshape(B, used, K * R, Hkv, D)
    nv = v[:, :used].reshape(B, used, K * R, Hkv, D)
    group = Hq // Hkv  # grouped-query heads share one key/value head
    nk = nk.repeat_interleave(group, dim=3)
    nv = nv.repeat_interleave(group, dim=3)

    # 4. One softmax over all K*R neighbour tokens of the chunk.
    scores = torch.einsum("bumhd,bujhd->buhmj", h, nk) * scale
    key_mask = None
    if neighbour_mask is not None:
        key_mask = neighbour_mask[:, :used].reshape(B, used, 1, 1, K * R)
    attn = masked_softmax(scores, key_mask)
    o = torch.einsum("buhmj,bujhd->bumhd", attn, nv)

    # 5. Reshape back, pad m-1 zero rows at the front (tokens t < m-1 see no
    #    complete chunk) and cut to the absolute length; return our tokens.
    o = o.reshape(B, used * m, Hq, D)
    o = F.pad(o, (0, 0, 0, 0, m - 1, 0))
    o = F.pad(o, (0, 0, 0, 0, 0, max(0, T - o.shape[1])))[:, :T]
    return o[:, start_pos:]
