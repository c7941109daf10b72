"""`neighbour_cross_attention`: the public op, its custom-op registration and autograd.

The fused backends are registered as two torch custom ops,
`retro_kernels::neighbour_cross_attention_fwd` and `..._bwd`, with fake
(meta) implementations and autograd, so that the op works with autograd,
`torch.compile(fullgraph=True)` and fake tensors. The backend name travels as
a string argument; the custom op calls that backend's module. The reference
backend is plain PyTorch and is differentiated by autograd directly.
The backend is chosen by `dispatch.select_backend`; `dispatch.register_op`
imports the backend modules once, so torch.compile can trace the choice.

Fused-backend contract (`retro_kernels/<backend>/neighbour_cross_attention.py`):

    not_supported_reasons(q, k, v, chunk_mask) -> list[str]

    forward(q, k, v, chunk_mask, scale) -> (out, lse)
        q        (B, L, K, R, Hq, D)  fp32/fp16/bf16, any strides: the tokens
                 of the K neighbours of chunk l
        k, v     (B, L, M, Hkv, D) same dtype, Hq % Hkv == 0: the M tokens of
                 chunk l itself (not shifted). They are shared by all K
                 neighbours of the chunk: a backend reads them once per
                 (batch, chunk, kv head), never repeats them K times.
        chunk_mask  (B, L, M) bool or None (True = real token)
        scale    float, already resolved (default D ** -0.5 is applied by the op)
        out      (B, L, K, R, Hq, D), contiguous, q's dtype. Rows whose every
                 key is masked are zeros.
        lse      (B, Hq, L*K*R) fp32, contiguous: natural-log log-sum-exp of
                 the scaled scores of each query row, row index
                 ((l*K + k)*R + r); +inf for rows with no key.

    backward(dout, q, k, v, chunk_mask, out, lse, scale) -> (dq, dk, dv)
        dout     (B, L, K, R, Hq, D), any strides
        out, lse exactly as returned by the same backend's forward
        dq, dk, dv contiguous, shapes and dtypes of q, k, v.
        Deterministic: no atomics, one owner per output element.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import dispatch
from ._autograd import register_fused_autograd
from .._checks import check_backend, check_neighbour_cross_attention
from ..reference import neighbour_cross_attention as reference

OP = "neighbour_cross_attention"


@torch.library.custom_op("retro_kernels::neighbour_cross_attention_fwd", mutates_args=())
def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    chunk_mask: Optional[Tensor],
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    module = dispatch.load_backend(backend, OP)
    return module.forward(q, k, v, chunk_mask, scale)


@_forward.register_fake
def _forward_fake(q, k, v, chunk_mask, scale, backend):
    B, L, K, R, Hq, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((B, Hq, L * K * R), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("retro_kernels::neighbour_cross_attention_bwd", mutates_args=())
def _backward_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    chunk_mask: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    module = dispatch.load_backend(backend, OP)
    return module.backward(dout, q, k, v, chunk_mask, out, lse, scale)


register_fused_autograd(_forward, _backward_op)

dispatch.register_op(OP)  # import the backends now, so torch.compile can trace the choice


def neighbour_cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    chunk_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """Neighbour tokens attend to the chunk they were retrieved for (RETRO's encoder).

    Args:
        q: (B, L, K, R, Hq, D) queries of the R tokens of each of the K
            neighbours of each of L chunks.
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
    scale = check_neighbour_cross_attention(q, k, v, chunk_mask, scale)
    check_backend(backend, dispatch.BACKENDS)
    name = dispatch.select_backend(
        backend, OP, q.device, q=q, k=k, v=v, chunk_mask=chunk_mask
    )
    if name == "reference":
        return reference.neighbour_cross_attention(
            q, k, v, chunk_mask=chunk_mask, scale=scale
        )
    out, _ = _forward(q, k, v, chunk_mask, scale, name)
    return out
