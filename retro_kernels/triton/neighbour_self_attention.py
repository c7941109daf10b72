"""Neighbour self-attention in Triton: fused forward and backward kernels with their launchers.

Each neighbour (b, l, k) is an independent bidirectional sequence of R
tokens. A program works on one neighbour and one key/value head; its query
rows are the R tokens of every query head of that kv head's group, flattened
as row = g * R + r (query head h = h_kv * group + g). So the neighbour's keys
and values are read once for the whole group (grouped-query and multi-query
attention cost no extra key traffic) and the mask is applied in-kernel: no
repeat, no mask materialisation, no copy of non-contiguous inputs.

Forward: one program per (neighbour, block of BLOCK_M rows, batch x kv head);
online softmax over the neighbour's R keys in tiles of BLOCK_N. Padding
query rows (mask False) and rows with no real key store zeros and
lse = +inf; other rows store the natural-log log-sum-exp for the backward.

Backward: one program per (neighbour, batch x kv head) owns every query row
of the group and every key of the neighbour, so it writes dq, dk and dv with
no atomics: deterministic. It makes two sweeps over the (group*R) x R score
tile: keys outside (dk, dv), then queries outside (dq).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import triton_reasons
from ._common import LOG2E, dot, launch_config, mask_as_bytes, recompute_probs



def not_supported_reasons(q, k, v, neighbour_mask) -> list[str]:
    return triton_reasons({"q": q, "k": k, "v": v})


# ---------------------------------------------------------------------------
# Shared address arithmetic
# ---------------------------------------------------------------------------

@triton.jit
def _query_rows(row_start, R, h_kv, group, mask_base, stride_mr,
                BLOCK_M: tl.constexpr, HAS_MASK: tl.constexpr):
    """Rows row_start.. of the group: query head, token index, and which are real tokens."""
    row = row_start + tl.arange(0, BLOCK_M)  # row = g * R + r
    h = h_kv * group + row // R
    r = row % R
    real = row < group * R
    if HAS_MASK:
        real = real & (tl.load(mask_base + r * stride_mr, mask=real, other=0) != 0)
    return h, r, real


@triton.jit
def _real_keys(key_start, R, mask_base, stride_mr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """Keys key_start.. of the neighbour: their index and which are real tokens."""
    j = key_start + tl.arange(0, BLOCK_N)
    real = j < R
    if HAS_MASK:
        real = real & (tl.load(mask_base + j * stride_mr, mask=real, other=0) != 0)
    return j, real




# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------

@triton.jit
def _nsa_fwd_kernel(
    Q, K, V, MASK, OUT, LSE,
    stride_qb, stride_ql, stride_qk, stride_qr, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kk, stride_kr, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vk, stride_vr, stride_vh, stride_vd,
    stride_mb, stride_ml, stride_mk, stride_mr,
    stride_ob, stride_ol, stride_ok, stride_or, stride_oh, stride_od,
    n_neighbours, R, n_rows, n_heads, n_kv_heads, group, qk_scale,
    m_blocks,  # ceil(group * R / BLOCK_M): row blocks per neighbour
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_MASK: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    # -- which neighbour, which rows, which kv head ------------------------
    s = (tl.program_id(0) // m_blocks).to(tl.int64)  # neighbour index l * K + k
    row_start = (tl.program_id(0) % m_blocks) * BLOCK_M
    b = (tl.program_id(1) // n_kv_heads).to(tl.int64)
    h_kv = tl.program_id(1) % n_kv_heads
    l = s // n_neighbours
    kk = s % n_neighbours
    mask_base = MASK + b * stride_mb + l * stride_ml + kk * stride_mk
    h, r, row_real = _query_rows(row_start, R, h_kv, group, mask_base, stride_mr, BLOCK_M, HAS_MASK)
    row_in = row_start + tl.arange(0, BLOCK_M) < group * R
    d = tl.arange(0, BLOCK_D)
    d_real = d < HEAD_DIM

    q_ptrs = (Q + b * stride_qb + l * stride_ql + kk * stride_qk
              + r[:, None] * stride_qr + h[:, None] * stride_qh + d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_real[:, None] & d_real[None, :], other=0.0)
    k_base = K + b * stride_kb + l * stride_kl + kk * stride_kk + h_kv * stride_kh
    v_base = V + b * stride_vb + l * stride_vl + kk * stride_vk + h_kv * stride_vh

    # -- online softmax over the neighbour's keys, BLOCK_N at a time -------
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for key_start in range(0, R, BLOCK_N):
        j, key_real = _real_keys(key_start, R, mask_base, stride_mr, BLOCK_N, HAS_MASK)
        kv_mask = (j < R)[:, None] & d_real[None, :]
        k = tl.load(k_base + j[:, None] * stride_kr + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + j[:, None] * stride_vr + d[None, :] * stride_vd, mask=kv_mask, other=0.0)

        # scores, in log2 units so that exp2 can be used
        scores = dot(q, tl.trans(k), IEEE_DOT)
        scores = tl.where(key_real[None, :], scores * qk_scale, float("-inf"))

        # rescale the running sums to the new row maximum; rows that have seen
        # no real key yet keep max -inf, and subtract 0 instead to avoid NaN
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE_DOT)
        m_i = m_new

    # -- normalise; padding rows and rows with no real key output zeros, lse = +inf
    has_key = row_real & (l_i > 0.0)
    l_safe = tl.where(has_key, l_i, 1.0)
    out = tl.where(has_key[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    o_ptrs = (OUT + b * stride_ob + l * stride_ol + kk * stride_ok
              + r[:, None] * stride_or + h[:, None] * stride_oh + d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_in[:, None] & d_real[None, :])
    lse_ptrs = LSE + (b * n_heads + h) * n_rows + s * R + r
    tl.store(lse_ptrs, lse, mask=row_in)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------

@triton.jit
def _nsa_bwd_kernel(
    Q, K, V, MASK, DO, LSE, DELTA, DQ, DK, DV,
    stride_qb, stride_ql, stride_qk, stride_qr, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kk, stride_kr, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vk, stride_vr, stride_vh, stride_vd,
    stride_mb, stride_ml, stride_mk, stride_mr,
    stride_dob, stride_dol, stride_dok, stride_dor, stride_doh, stride_dod,
    n_neighbours, R, n_rows, n_heads, n_kv_heads, group, scale, qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    # dq, dk, dv are contiguous: (B, L*K, R, Hq, D) and (B, L*K, R, Hkv, D).
    s = tl.program_id(0).to(tl.int64)  # neighbour index l * K + k
    b = (tl.program_id(1) // n_kv_heads).to(tl.int64)
    h_kv = tl.program_id(1) % n_kv_heads
    l = s // n_neighbours
    kk = s % n_neighbours
    n_seq = n_rows // R  # L * K
    mask_base = MASK + b * stride_mb + l * stride_ml + kk * stride_mk
    q_base = Q + b * stride_qb + l * stride_ql + kk * stride_qk
    do_base = DO + b * stride_dob + l * stride_dol + kk * stride_dok
    k_base = K + b * stride_kb + l * stride_kl + kk * stride_kk + h_kv * stride_kh
    v_base = V + b * stride_vb + l * stride_vl + kk * stride_vk + h_kv * stride_vh
    d = tl.arange(0, BLOCK_D)
    d_real = d < HEAD_DIM

    # -- sweep 1: for each key tile, dV = P^T dO and dK = dS^T Q * scale --
    # summed over every query row of the group (all its query heads).
    for key_start in range(0, R, BLOCK_N):
        j, key_real = _real_keys(key_start, R, mask_base, stride_mr, BLOCK_N, HAS_MASK)
        kv_mask = (j < R)[:, None] & d_real[None, :]
        k = tl.load(k_base + j[:, None] * stride_kr + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + j[:, None] * stride_vr + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for row_start in range(0, group * R, BLOCK_M):
            h, r, row_real = _query_rows(row_start, R, h_kv, group, mask_base, stride_mr, BLOCK_M, HAS_MASK)
            row_mask = row_real[:, None] & d_real[None, :]
            q = tl.load(q_base + r[:, None] * stride_qr + h[:, None] * stride_qh + d[None, :] * stride_qd,
                        mask=row_mask, other=0.0)
            do = tl.load(do_base + r[:, None] * stride_dor + h[:, None] * stride_doh + d[None, :] * stride_dod,
                         mask=row_mask, other=0.0)
            stat = (b * n_heads + h) * n_rows + s * R + r
            lse = tl.load(LSE + stat, mask=row_real, other=float("inf"))
            delta = tl.load(DELTA + stat, mask=row_real, other=0.0)
            p = recompute_probs(q, k, lse, row_real, key_real, qk_scale, IEEE_DOT)
            dv += dot(tl.trans(p.to(do.dtype)), do, IEEE_DOT)
            dp = dot(do, tl.trans(v), IEEE_DOT)
            ds = p * (dp - delta[:, None])  # dS = P * (dP - rowsum(dO * O))
            dk += dot(tl.trans(ds.to(q.dtype)), q, IEEE_DOT)
        kv_out = ((b * n_seq + s) * R + j[:, None]) * n_kv_heads * HEAD_DIM + h_kv * HEAD_DIM + d[None, :]
        tl.store(DK + kv_out, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + kv_out, dv.to(DV.dtype.element_ty), mask=kv_mask)

    # -- sweep 2: for each query tile, dQ = dS K * scale -------------------
    for row_start in range(0, group * R, BLOCK_M):
        h, r, row_real = _query_rows(row_start, R, h_kv, group, mask_base, stride_mr, BLOCK_M, HAS_MASK)
        row_mask = row_real[:, None] & d_real[None, :]
        q = tl.load(q_base + r[:, None] * stride_qr + h[:, None] * stride_qh + d[None, :] * stride_qd,
                    mask=row_mask, other=0.0)
        do = tl.load(do_base + r[:, None] * stride_dor + h[:, None] * stride_doh + d[None, :] * stride_dod,
                     mask=row_mask, other=0.0)
        stat = (b * n_heads + h) * n_rows + s * R + r
        lse = tl.load(LSE + stat, mask=row_real, other=float("inf"))
        delta = tl.load(DELTA + stat, mask=row_real, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for key_start in range(0, R, BLOCK_N):
            j, key_real = _real_keys(key_start, R, mask_base, stride_mr, BLOCK_N, HAS_MASK)
            kv_mask = (j < R)[:, None] & d_real[None, :]
            k = tl.load(k_base + j[:, None] * stride_kr + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v = tl.load(v_base + j[:, None] * stride_vr + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            p = recompute_probs(q, k, lse, row_real, key_real, qk_scale, IEEE_DOT)
            dp = dot(do, tl.trans(v), IEEE_DOT)
            ds = p * (dp - delta[:, None])
            dq += dot(ds.to(k.dtype), k, IEEE_DOT)
        # padding rows (p = 0) store zeros
        row_in = row_start + tl.arange(0, BLOCK_M) < group * R
        dq_out = ((b * n_seq + s) * R + r[:, None]) * n_heads * HEAD_DIM + h[:, None] * HEAD_DIM + d[None, :]
        tl.store(DQ + dq_out, (dq * scale).to(DQ.dtype.element_ty), mask=row_in[:, None] & d_real[None, :])


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------

def forward(q, k, v, neighbour_mask, scale):
    """(out (B, L, K, R, Hq, D), lse (B, Hq, L*K*R) fp32) for the custom op. Any strides."""
    B, L, K, R, Hq, D = q.shape
    Hkv = k.shape[4]
    group = Hq // Hkv
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, L * K * R), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    config = launch_config(group * R, D, R, q.element_size())
    m_blocks = triton.cdiv(group * R, config["BLOCK_M"])
    mask, mask_strides, has_mask = mask_as_bytes(neighbour_mask, q, 4)
    grid = (L * K * m_blocks, B * Hkv)
    _nsa_fwd_kernel[grid](
        q, k, v, mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        K, R, L * K * R, Hq, Hkv, group, scale * LOG2E, m_blocks,
        HEAD_DIM=D, HAS_MASK=has_mask, IEEE_DOT=q.dtype == torch.float32, **config,
    )
    return out, lse


def backward(dout, q, k, v, neighbour_mask, out, lse, scale):
    """(dq, dk, dv), contiguous, in the inputs' dtypes. Any input strides."""
    B, L, K, R, Hq, D = q.shape
    Hkv = k.shape[4]
    group = Hq // Hkv
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0:
        return dq, dk, dv
    # rowsum(dO * O): the softmax-backward correction of every query row, (B, Hq, L*K*R)
    delta = (dout.float() * out.float()).sum(-1).reshape(B, L * K * R, Hq).transpose(1, 2).contiguous()
    config = launch_config(group * R, D, R, q.element_size())
    mask, mask_strides, has_mask = mask_as_bytes(neighbour_mask, q, 4)
    grid = (L * K, B * Hkv)
    _nsa_bwd_kernel[grid](
        q, k, v, mask, dout, lse, delta, dq, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *dout.stride(),
        K, R, L * K * R, Hq, Hkv, group, scale, scale * LOG2E,
        HEAD_DIM=D, HAS_MASK=has_mask, IEEE_DOT=q.dtype == torch.float32, **config,
    )
    return dq, dk, dv
