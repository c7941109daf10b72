"""`chunked_cross_attention`: the public op, its custom-op registration and autograd.

The fused backends are registered as two torch custom ops,
`retro_kernels::chunked_cross_attention_fwd` and `..._bwd`, with fake
(meta) implementations and autograd, so that the op works with autograd,
`torch.compile(fullgraph=True)` and fake tensors. The backend name travels as
a string argument; the custom op calls that backend's module. The reference
backend is plain PyTorch and is differentiated by autograd directly.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import dispatch
from ._autograd import register_fused_autograd
from .._checks import check_chunked_cross_attention
from ..reference import chunked_cross_attention as reference

OP = "chunked_cross_attention"
dispatch.register_op(OP)


@torch.library.custom_op("retro_kernels::chunked_cross_attention_fwd", mutates_args=())
def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    neighbour_mask: Optional[Tensor],
    chunk_size: int,
    scale: float,
    start_pos: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    module = dispatch.load_backend(backend, OP)
    return module.forward(q, k, v, neighbour_mask, chunk_size, scale, start_pos)


@_forward.register_fake
def _forward_fake(q, k, v, neighbour_mask, chunk_size, scale, start_pos, backend):
    B, N, Hq, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((B, Hq, N), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("retro_kernels::chunked_cross_attention_bwd", mutates_args=())
def _backward_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    neighbour_mask: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    chunk_size: int,
    scale: float,
    start_pos: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    module = dispatch.load_backend(backend, OP)
    return module.backward(dout, q, k, v, neighbour_mask, out, lse, chunk_size, scale, start_pos)


register_fused_autograd(_forward, _backward_op)


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
    scale = check_chunked_cross_attention(q, k, v, chunk_size, neighbour_mask, scale, start_pos)
    name = dispatch.select_backend(
        backend, OP, q.device, q=q, k=k, v=v, neighbour_mask=neighbour_mask
    )
    if name == "reference":
        return reference.chunked_cross_attention(
            q, k, v, chunk_size, neighbour_mask=neighbour_mask, scale=scale, start_pos=start_pos
        )
    out, _ = _forward(q, k, v, neighbour_mask, chunk_size, scale, start_pos, name)
    return out
