"""`chunked_cross_attention`: its spec and its public function.

Backends get q at the tokens' own positions (not shifted) and apply the m-1
token shift themselves; lse row n is q's token n (+inf for tokens t < m-1 and
rows whose keys are all masked).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .._checks import chunks_needed
from ..reference import chunked_cross_attention as reference
from ._op import Op
from .spec import SCALE, OpSpec, Scalar


def chunked_cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    chunk_size: int,
    *,
    neighbour_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    start_pos: int = 0,
    backend: str = "auto",
) -> Tensor:
    """RETRO's chunked cross-attention, with the m-1 token shift fused in.

    Args:
        q: (B, N, Hq, D) queries of N consecutive tokens, the first at
            absolute position `start_pos`; in sequence order, not shifted.
        k, v: (B, L, K, R, Hkv, D) keys and values of the K encoded
            neighbours (R tokens each) of each of L chunks; Hq % Hkv == 0.
            L must be at least (start_pos + N) // chunk_size; extra chunks
            are ignored.
        chunk_size: m, the number of tokens in a chunk.
        neighbour_mask: optional bool (B, L, K, R), True where a neighbour
            token is real.
        scale: softmax scale, default D ** -0.5.
        start_pos: absolute position of q's first token (incremental decoding).
        backend: "auto", "reference", "triton", "cpu" or "cuda".

    Returns:
        (B, N, Hq, D) in q's dtype. The token at absolute position t gets
        zeros if t < m-1, else attention with one softmax over all K*R
        tokens of the neighbours of chunk (t - (m-1)) // m. Tokens whose
        keys are all masked get zeros.
    """
    return OP(q, k, v, neighbour_mask, backend, chunk_size=chunk_size, scale=scale, start_pos=start_pos)


def _enough_chunks(dims: dict[str, int], scalars: dict[str, object]) -> None:
    """k and v hold the neighbours of every chunk the tokens read."""
    start_pos, chunk_size, L = scalars["start_pos"], scalars["chunk_size"], dims["L"]
    need = chunks_needed(start_pos, dims["N"], chunk_size)
    if L < need:
        raise ValueError(
            f"k and v hold L={L} neighbour chunks, but tokens {start_pos}..{start_pos + dims['N'] - 1} "
            f"with chunk_size={chunk_size} read chunks 0..{need - 1}: need L >= {need}"
        )


OP = Op(OpSpec(
    name="chunked_cross_attention", q="(B, N, Hq, D)", kv="(B, L, K, R, Hkv, D)", lse="(B, Hq, N)",
    mask="neighbour_mask", mask_layout="(B, L, K, R)",
    scalars=(Scalar("chunk_size", int, minimum=1), SCALE, Scalar("start_pos", int, minimum=0)),
    reference=reference.chunked_cross_attention, check=_enough_chunks,
))
