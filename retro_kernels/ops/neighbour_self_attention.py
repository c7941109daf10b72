"""`neighbour_self_attention`: its spec and its public function.

Each neighbour (b, l, k) is its own bidirectional sequence of R tokens. lse row
((l*K + k)*R + r) is token r of neighbour (l, k). Beyond the shared contract,
padding query rows (mask False) output zeros, have lse = +inf, get dq = 0 and
add nothing to dk, dv.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..reference import neighbour_self_attention as reference
from ._op import Op
from .spec import SCALE, OpSpec


def neighbour_self_attention(q: Tensor, k: Tensor, v: Tensor, *, neighbour_mask: Optional[Tensor] = None,
                             scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    """Bidirectional attention within each retrieved neighbour (RETRO's encoder).

    Args:
        q: (B, L, K, R, Hq, D) queries: token r of neighbour k of chunk l
            attends to the tokens of that same neighbour.
        k, v: (B, L, K, R, Hkv, D) keys and values of the same tokens;
            Hq % Hkv == 0 (grouped-query / multi-query attention).
        neighbour_mask: optional bool (B, L, K, R), True where a neighbour
            token is real. Padding tokens take no weight as keys; as queries
            they output zeros (and get zero gradients).
        scale: softmax scale, default D ** -0.5.
        backend: "auto", "reference", "triton", "cpu" or "cuda".

    Returns:
        (B, L, K, R, Hq, D) in q's dtype: token r of neighbour (b, l, k)
        attends, with no causal mask, to the real tokens of that neighbour
        only. Rows that are padding, or see no real key, are zeros.
    """
    return OP(q, k, v, neighbour_mask, backend, scale=scale)


OP = Op(OpSpec(
    name="neighbour_self_attention", q="(B, L, K, R, Hq, D)", kv="(B, L, K, R, Hkv, D)", lse="(B, Hq, L*K*R)",
    mask="neighbour_mask", mask_layout="(B, L, K, R)", scalars=(SCALE,),
    reference=reference.neighbour_self_attention,
))
