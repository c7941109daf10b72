"""Chunked cross-attention in Triton: fused forward and backward kernels with their launchers.

The shift is folded into the indexing. Group the absolute positions t into
"query chunks" c = (t + 1) // m: query chunk c holds t = c*m - 1 .. c*m + m - 2.
Query chunk 0 holds the first m-1 tokens, which see no complete chunk and
output zeros; query chunk c >= 1 is the paper's attending chunk u = c - 1 and
reads the K*R keys of the neighbours of chunk u. So a program reads q at its
shifted rows and writes the output rows in place: no pad, no reshape, no copy.

Forward: one program per (query chunk, block of BLOCK_M rows of it, batch x
query head); online softmax over the K*R keys in tiles of BLOCK_N; the mask
and grouped-query heads are applied in-kernel. It saves the log-sum-exp of
each row (natural log; +inf for rows with no key) for the backward.

Backward: one program per (query chunk, batch x kv head) owns every query
row of that chunk for the kv head's query heads and every key of that chunk,
so it writes dq, dk and dv with no atomics: deterministic. It makes two
sweeps over the m x K*R score tile: keys outside (dk, dv), then queries
outside (dq).
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
def _query_rows(c, row_start, chunk_size, start_pos, N, BLOCK_M: tl.constexpr):
    """Rows row_start.. of query chunk c: their index n in q and which are real tokens."""
    i = row_start + tl.arange(0, BLOCK_M)  # index within the query chunk
    n = c * chunk_size - 1 + i - start_pos  # absolute position minus start_pos
    real = (i < chunk_size) & (n >= 0) & (n < N)
    return n, real


@triton.jit
def _key_offsets(j, R, stride_k, stride_r):
    """Offset of flattened neighbour token j = k*R + r (any strides: no copy needed)."""
    return (j // R) * stride_k + (j % R) * stride_r


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------

@triton.jit
def _cca_fwd_kernel(
    Q, K, V, MASK, OUT, LSE,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kk, stride_kr, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vk, stride_vr, stride_vh, stride_vd,
    stride_mb, stride_ml, stride_mk, stride_mr,
    stride_ob, stride_on, stride_oh, stride_od,
    N, R, chunk_size, start_pos, first_chunk, n_heads, group, qk_scale,
    HEAD_DIM: tl.constexpr,
    N_KEYS: tl.constexpr,  # K * R, the keys of one chunk
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    M_BLOCKS: tl.constexpr,  # ceil(chunk_size / BLOCK_M)
    HAS_MASK: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    # -- which rows, which head, which neighbours -------------------------
    c = first_chunk + tl.program_id(0) // M_BLOCKS
    row_start = (tl.program_id(0) % M_BLOCKS) * BLOCK_M
    b = (tl.program_id(1) // n_heads).to(tl.int64)
    h = tl.program_id(1) % n_heads
    h_kv = h // group
    u = c - 1  # the neighbour chunk read by query chunk c
    n, row_real = _query_rows(c, row_start, chunk_size, start_pos, N, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_real = d < HEAD_DIM

    q_ptrs = Q + b * stride_qb + n[:, None] * stride_qn + h * stride_qh + d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_real[:, None] & d_real[None, :], other=0.0)
    k_base = K + b * stride_kb + u * stride_kl + h_kv * stride_kh
    v_base = V + b * stride_vb + u * stride_vl + h_kv * stride_vh

    # -- online softmax over the chunk's keys, BLOCK_N at a time ----------
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_keys = tl.where(c > 0, N_KEYS, 0)  # query chunk 0 reads nothing: zeros
    for key_start in range(0, n_keys, BLOCK_N):
        j = key_start + tl.arange(0, BLOCK_N)
        key_real = j < N_KEYS
        kv_mask = key_real[:, None] & d_real[None, :]
        k = tl.load(k_base + _key_offsets(j, R, stride_kk, stride_kr)[:, None] + d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(v_base + _key_offsets(j, R, stride_vk, stride_vr)[:, None] + d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        if HAS_MASK:
            m_ptrs = MASK + b * stride_mb + u * stride_ml + _key_offsets(j, R, stride_mk, stride_mr)
            key_real = key_real & (tl.load(m_ptrs, mask=key_real, other=0) != 0)

        # scores, in log2 units so that exp2 can be used
        s = dot(q, tl.trans(k), IEEE_DOT)
        s = tl.where(key_real[None, :], s * qk_scale, float("-inf"))

        # rescale the running sums to the new row maximum; rows that have seen
        # no real key yet keep max -inf, and subtract 0 instead to avoid NaN
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE_DOT)
        m_i = m_new

    # -- normalise; rows with no real key output zeros and lse = +inf -----
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453,
                   float("inf"))
    o_ptrs = OUT + b * stride_ob + n[:, None] * stride_on + h * stride_oh + d[None, :] * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_real[:, None] & d_real[None, :])
    lse_ptrs = LSE + (b * n_heads + h) * N + n
    tl.store(lse_ptrs, lse, mask=row_real)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------

@triton.jit
def _cca_bwd_kernel(
    Q, K, V, MASK, DO, LSE, DELTA, DQ, DK, DV,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kk, stride_kr, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vk, stride_vr, stride_vh, stride_vd,
    stride_mb, stride_ml, stride_mk, stride_mr,
    stride_dob, stride_don, stride_doh, stride_dod,
    N, R, chunk_size, start_pos, n_chunks, n_heads, n_kv_heads, group, scale, qk_scale,
    HEAD_DIM: tl.constexpr, N_KEYS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    # dq, dk, dv are contiguous: (B, N, Hq, D) and (B, L, K, R, Hkv, D).
    c = tl.program_id(0)  # query chunk; it reads neighbour chunk u = c - 1
    b = (tl.program_id(1) // n_kv_heads).to(tl.int64)
    h_kv = tl.program_id(1) % n_kv_heads
    u = c - 1
    d = tl.arange(0, BLOCK_D)
    d_real = d < HEAD_DIM
    k_base = K + b * stride_kb + u * stride_kl + h_kv * stride_kh
    v_base = V + b * stride_vb + u * stride_vl + h_kv * stride_vh
    n_keys = tl.where(c > 0, N_KEYS, 0)

    # -- sweep 1: for each key tile, dV = P^T dO and dK = dS^T Q * scale --
    # summed over the group's query heads and the chunk's query rows.
    for key_start in range(0, n_keys, BLOCK_N):
        j = key_start + tl.arange(0, BLOCK_N)
        key_real = j < N_KEYS
        kv_mask = key_real[:, None] & d_real[None, :]
        k = tl.load(k_base + _key_offsets(j, R, stride_kk, stride_kr)[:, None] + d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(v_base + _key_offsets(j, R, stride_vk, stride_vr)[:, None] + d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        if HAS_MASK:
            m_ptrs = MASK + b * stride_mb + u * stride_ml + _key_offsets(j, R, stride_mk, stride_mr)
            key_real = key_real & (tl.load(m_ptrs, mask=key_real, other=0) != 0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(0, group):
            h = h_kv * group + g
            for row_start in range(0, chunk_size, BLOCK_M):
                n, row_real = _query_rows(c, row_start, chunk_size, start_pos, N, BLOCK_M)
                row_mask = row_real[:, None] & d_real[None, :]
                q = tl.load(Q + b * stride_qb + n[:, None] * stride_qn + h * stride_qh + d[None, :] * stride_qd,
                            mask=row_mask, other=0.0)
                do = tl.load(DO + b * stride_dob + n[:, None] * stride_don + h * stride_doh + d[None, :] * stride_dod,
                             mask=row_mask, other=0.0)
                stat = (b * n_heads + h) * N + n
                lse = tl.load(LSE + stat, mask=row_real, other=float("inf"))
                delta = tl.load(DELTA + stat, mask=row_real, other=0.0)
                p = recompute_probs(q, k, lse, row_real, key_real, qk_scale, IEEE_DOT)
                dv += dot(tl.trans(p.to(do.dtype)), do, IEEE_DOT)
                dp = dot(do, tl.trans(v), IEEE_DOT)
                ds = p * (dp - delta[:, None])  # dS = P * (dP - rowsum(dO * O))
                dk += dot(tl.trans(ds.to(q.dtype)), q, IEEE_DOT)
        # dk, dv are contiguous (B, L, K*R, Hkv, D)
        kv_out = ((b * n_chunks + u) * N_KEYS + j[:, None]) * n_kv_heads * HEAD_DIM + h_kv * HEAD_DIM + d[None, :]
        tl.store(DK + kv_out, (dk * scale).to(DK.dtype.element_ty), mask=(j < N_KEYS)[:, None] & d_real[None, :])
        tl.store(DV + kv_out, dv.to(DV.dtype.element_ty), mask=(j < N_KEYS)[:, None] & d_real[None, :])

    # -- sweep 2: for each query tile, dQ = dS K * scale -------------------
    for g in range(0, group):
        h = h_kv * group + g
        for row_start in range(0, chunk_size, BLOCK_M):
            n, row_real = _query_rows(c, row_start, chunk_size, start_pos, N, BLOCK_M)
            row_mask = row_real[:, None] & d_real[None, :]
            q = tl.load(Q + b * stride_qb + n[:, None] * stride_qn + h * stride_qh + d[None, :] * stride_qd,
                        mask=row_mask, other=0.0)
            do = tl.load(DO + b * stride_dob + n[:, None] * stride_don + h * stride_doh + d[None, :] * stride_dod,
                         mask=row_mask, other=0.0)
            stat = (b * n_heads + h) * N + n
            lse = tl.load(LSE + stat, mask=row_real, other=float("inf"))
            delta = tl.load(DELTA + stat, mask=row_real, other=0.0)
            dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            for key_start in range(0, n_keys, BLOCK_N):
                j = key_start + tl.arange(0, BLOCK_N)
                key_real = j < N_KEYS
                kv_mask = key_real[:, None] & d_real[None, :]
                k = tl.load(k_base + _key_offsets(j, R, stride_kk, stride_kr)[:, None] + d[None, :] * stride_kd,
                            mask=kv_mask, other=0.0)
                v = tl.load(v_base + _key_offsets(j, R, stride_vk, stride_vr)[:, None] + d[None, :] * stride_vd,
                            mask=kv_mask, other=0.0)
                if HAS_MASK:
                    m_ptrs = MASK + b * stride_mb + u * stride_ml + _key_offsets(j, R, stride_mk, stride_mr)
                    key_real = key_real & (tl.load(m_ptrs, mask=key_real, other=0) != 0)
                p = recompute_probs(q, k, lse, row_real, key_real, qk_scale, IEEE_DOT)
                dp = dot(do, tl.trans(v), IEEE_DOT)
                ds = p * (dp - delta[:, None])
                dq += dot(ds.to(k.dtype), k, IEEE_DOT)
            # dq is contiguous (B, N, Hq, D)
            dq_out = ((b * N + n[:, None]) * n_heads + h) * HEAD_DIM + d[None, :]
            tl.store(DQ + dq_out, (dq * scale).to(DQ.dtype.element_ty), mask=row_mask)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------

def forward(q, k, v, neighbour_mask, chunk_size, scale, start_pos):
    """(out (B, N, Hq, D), lse (B, Hq, N) fp32) for the custom op."""
    B, N, Hq, D = q.shape
    _, L, K, R, Hkv, _ = k.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, N), dtype=torch.float32, device=q.device)
    if B * N * Hq == 0:
        return out, lse
    first_chunk = (start_pos + 1) // chunk_size
    last_chunk = (start_pos + N) // chunk_size
    config = launch_config(chunk_size, D, K * R, q.element_size())
    m_blocks = triton.cdiv(chunk_size, config["BLOCK_M"])
    mask, mask_strides, has_mask = mask_as_bytes(neighbour_mask, q, 4)
    grid = ((last_chunk - first_chunk + 1) * m_blocks, B * Hq)
    _cca_fwd_kernel[grid](
        q, k, v, mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        N, R, chunk_size, start_pos, first_chunk, Hq, Hq // Hkv, scale * LOG2E,
        HEAD_DIM=D, N_KEYS=K * R, M_BLOCKS=m_blocks,
        HAS_MASK=has_mask, IEEE_DOT=q.dtype == torch.float32, **config,
    )
    return out, lse


def backward(dout, q, k, v, neighbour_mask, out, lse, chunk_size, scale, start_pos):
    """(dq, dk, dv), contiguous, in the inputs' dtypes."""
    B, N, Hq, D = q.shape
    _, L, K, R, Hkv, _ = k.shape
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if B * Hkv * D == 0:
        return dq, dk, dv
    # rowsum(dO * O): the softmax-backward correction of every query row
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # (B, Hq, N)
    config = launch_config(chunk_size, D, K * R, q.element_size())
    mask, mask_strides, has_mask = mask_as_bytes(neighbour_mask, q, 4)
    # one program per query chunk c = 0 .. L: chunk 0 writes the zero rows of dq,
    # chunk c >= 1 the gradients of neighbour chunk c - 1 (zeros if no query reads it)
    grid = (L + 1, B * Hkv)
    _cca_bwd_kernel[grid](
        q, k, v, mask, dout, lse, delta, dq, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *dout.stride(),
        N, R, chunk_size, start_pos, L, Hq, Hkv, Hq // Hkv, scale, scale * LOG2E,
        HEAD_DIM=D, N_KEYS=K * R,
        HAS_MASK=has_mask, IEEE_DOT=q.dtype == torch.float32, **config,
    )
    return dq, dk, dv
