"""Pieces shared by the Triton kernels of all three ops."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # scores are kept in log2 units so that exp2 can be used


@triton.jit
def dot(a, b, IEEE_DOT: tl.constexpr):
    """a @ b with fp32 accumulation; exact fp32 products (not TF32) for fp32 inputs."""
    if IEEE_DOT:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def recompute_probs(q, k, lse, row_real, key_real, qk_scale, IEEE_DOT: tl.constexpr):
    """P = softmax(Q K^T * scale) of one tile, from the forward's log-sum-exp (natural log)."""
    scores = dot(q, tl.trans(k), IEEE_DOT)
    p = tl.exp2(scores * qk_scale - lse[:, None] * 1.4426950408889634)
    return tl.where(row_real[:, None] & key_real[None, :], p, 0.0)


def launch_config(n_query_rows: int, head_dim: int, n_keys: int, elem_size: int) -> dict:
    """Tile sizes and warps for a forward/backward pair; tl.dot needs every tile dim >= 16.

    Rows and keys are capped by the problem. The backward holds about
    BLOCK_D * (2*BLOCK_M + 3*BLOCK_N) elements of tiles in shared memory; the
    caps keep that under sm_80's 163 KB per block (sm_90: 227 KB), fp32 tiles
    being twice as big as 16-bit ones. The tests compile every kernel for
    sm_80 and sm_90 with these tiles and check the shared memory they need.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    row_bytes = block_d * elem_size
    if row_bytes <= 256:  # 16-bit D <= 128, fp32 D <= 64
        max_m, max_n = 64, 64
    elif row_bytes <= 512:  # 16-bit D = 256, fp32 D = 128
        max_m, max_n = (64, 32) if elem_size == 2 else (32, 32)
    else:  # fp32 D = 256
        max_m, max_n = 32, 16
    block_m = min(max_m, max(16, triton.next_power_of_2(n_query_rows)))
    block_n = min(max_n, max(16, triton.next_power_of_2(n_keys)))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                num_warps=4 if block_d <= 64 else 8)


def mask_as_bytes(mask: torch.Tensor | None, placeholder: torch.Tensor, ndim: int):
    """(tensor, strides, has_mask): the bool mask viewed as bytes (Triton reads bool
    pointers as int8); with no mask, a placeholder that is never read and `ndim` zero strides."""
    if mask is None:
        return placeholder, (0,) * ndim, False
    as_bytes = mask.view(torch.uint8)
    return as_bytes, as_bytes.stride(), True
