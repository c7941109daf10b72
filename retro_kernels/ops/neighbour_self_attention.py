"""`neighbour_self_attention`: the public op, its custom-op registration and autograd.

The fused backends are registered as two torch custom ops,
`retro_kernels::neighbour_self_attention_fwd` and `..._bwd`, with fake
(meta) implementations and autograd, so that the op works with autograd,
`torch.compile(fullgraph=True)` and fake tensors. The backend name travels as
a string argument; the custom op calls that backend's module. The reference
backend is plain PyTorch and is differentiated by autograd directly.
The backend is chosen by `dispatch.select_backend`; `dispatch.register_op`
imports the backend modules once, so torch.compile can trace the choice.

Fused-backend contract (`retro_kernels/<backend>/neighbour_self_attention.py`):

    not_supported_reasons(q, k, v, neighbour_mask) -> list[str]

    forward(q, k, v, neighbour_mask, scale) -> (out, lse)
        q        (B, L, K, R, Hq, D)  fp32/fp16/bf16, any strides
        k, v     (B, L, K, R, Hkv, D) same dtype, Hq % Hkv == 0
        neighbour_mask  (B, L, K, R) bool or None (True = real token)
        scale    float, already resolved (default D ** -0.5 is applied by the op)
        out      (B, L, K, R, Hq, D), contiguous, q's dtype. Padding query
                 rows (mask False) and rows with no real key are zeros.
        lse      (B, Hq, L*K*R) fp32, contiguous: natural-log log-sum-exp of
                 the scaled scores of each query row, row index
                 ((l*K + k)*R + r); +inf for padding rows and rows with no key.

    backward(dout, q, k, v, neighbour_mask, out, lse, scale) -> (dq, dk, dv)
        dout     (B, L, K, R, Hq, D), any strides
        out, lse exactly as returned by the same backend's forward
        dq, dk, dv contiguous, shapes and dtypes of q, k, v. Padding query
                 rows get dq = 0 and contribute nothing to dk, dv.
        Deterministic: no atomics, one owner per output element.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import dispatch
from ._autograd import register_fused_autograd
from .._checks import check_backend, check_neighbour_self_attention
from ..reference import neighbour_self_attention as reference

OP = "neighbour_self_attention"


@torch.library.custom_op("retro_kernels::neighbour_self_attention_fwd", mutates_args=())
def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    neighbour_mask: Optional[Tensor],
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    module = dispatch.load_backend(backend, OP)
    return module.forward(q, k, v, neighbour_mask, scale)


@_forward.register_fake
def _forward_fake(q, k, v, neighbour_mask, scale, backend):
    B, L, K, R, Hq, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((B, Hq, L * K * R), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("retro_kernels::neighbour_self_attention_bwd", mutates_args=())
def _backward_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    neighbour_mask: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    module = dispatch.load_backend(backend, OP)
    return module.backward(dout, q, k, v, neighbour_mask, out, lse, scale)


register_fused_autograd(_forward, _backward_op)

dispatch.register_op(OP)  # import the backends now, so torch.compile can trace the choice


def neighbour_self_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    neighbour_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """Bidirectional attention within each retrieved neighbour (RETRO's encoder).

    Args:
        q: (B, L, K, R, Hq, D) queries of the R tokens of each of the K
            neighbours of each of L chunks.
        k, v: (B, L, K, R, Hkv, D) keys and values; Hq % Hkv == 0
            (grouped-query / multi-query attention).
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
    scale = check_neighbour_self_attention(q, k, v, neighbour_mask, scale)
    check_backend(backend, dispatch.BACKENDS)
    name = dispatch.select_backend(
        backend, OP, q.device, q=q, k=k, v=v, neighbour_mask=neighbour_mask
    )
    if name == "reference":
        return reference.neighbour_self_attention(
            q, k, v, neighbour_mask=neighbour_mask, scale=scale
        )
    out, _ = _forward(q, k, v, neighbour_mask, scale, name)
    return out
