"""`neighbour_cross_attention`: its spec and its public function.

Every token of the K neighbours of chunk l attends to the M tokens of chunk l
itself (not shifted). Those keys are shared by all K neighbours: a backend
reads them once per (batch, chunk, kv head), never repeats them K times.
lse row ((l*K + k)*R + r) is token r of neighbour (l, k).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..reference import neighbour_cross_attention as reference
from ._op import Op
from .spec import SCALE, OpSpec


def neighbour_cross_attention(q: Tensor, k: Tensor, v: Tensor, *, chunk_mask: Optional[Tensor] = None,
                              scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    """Neighbour tokens attend to the chunk they were retrieved for (RETRO's encoder).

    Args:
        q: (B, L, K, R, Hq, D) queries: token r of neighbour k of chunk l
            attends to the tokens of chunk l.
        k, v: (B, L, M, Hkv, D) keys and values of the M tokens of chunk l
            (its own activations, not shifted); shared by all K neighbours
            of the chunk. Hq % Hkv == 0 (grouped-query / multi-query).
        chunk_mask: optional bool (B, L, M), True where a chunk token is real
            (False for the missing tokens of a partial last chunk).
        scale: softmax scale, default D ** -0.5.
        backend: "auto", "reference", "triton", "cpu" or "cuda".

    Returns:
        (B, L, K, R, Hq, D) in q's dtype: every token of every neighbour of
        chunk l attends to the real tokens of chunk l. Rows of a chunk with
        no real token are zeros.
    """
    return OP(q, k, v, chunk_mask, backend, scale=scale)


OP = Op(OpSpec(
    name="neighbour_cross_attention", q="(B, L, K, R, Hq, D)", kv="(B, L, M, Hkv, D)", lse="(B, Hq, L*K*R)",
    mask="chunk_mask", mask_layout="(B, L, M)", scalars=(SCALE,),
    reference=reference.neighbour_cross_attention,
))
