"""Neighbour cross-attention in Triton: the address arithmetic and launchers of its kernels.

Every token of the K neighbours of chunk l attends to the same M decoder
tokens of that chunk. A key set is one chunk and one key/value head: one run
of M keys, read straight from (B, L, M, Hkv, D). Its query rows are the K*R
neighbour tokens of every query head of the group, row = g * K*R + k * R + r
(query head h = h_kv * group + g), so nothing repeats the chunk's keys K (or
group) times, and the chunk mask is applied in-kernel. The tile work is in
_core.py.

Forward: one program per (key set, block of BLOCK_M rows), 1-D grid with the
row blocks of a key set next to each other. Rows whose every key is masked
store zeros and lse = +inf; other rows store the natural-log log-sum-exp for
the backward, layout (B, Hq, L*K*R).

Backward: one program per key set owns every query row and every key of it,
so it writes dq, dk and dv with no atomics: deterministic. delta =
rowsum(dO * O) is computed from the rows the program loads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import backward_plan, forward_smem, forward_tiles, launch, mask_as_bytes, on_device, prune_by_smem
from ._core import LOG2E, attend_keys, backward_sweeps, finish_rows, head_rows, load_row_tile, load_tile, store_tile



# ---------------------------------------------------------------------------
# Address arithmetic
# ---------------------------------------------------------------------------

@triton.jit
def _key_set(pid, n_chunks, n_kv_heads):
    """Key set number pid (int64; numbered (b, h_kv, l)): batch, kv head, chunk."""
    bh = pid // n_chunks
    return bh // n_kv_heads, bh % n_kv_heads, pid % n_chunks


@triton.jit
def _chunk_keys(K, V, MASK, b, l, h_kv, M,
                stride_kb, stride_kl, stride_km, stride_kh, stride_kd,
                stride_vb, stride_vl, stride_vm, stride_vh, stride_vd,
                stride_mb, stride_ml, stride_mm):
    """The key set of chunk (b, l) and kv head h_kv: one run of its M tokens."""
    return (K + b * stride_kb + l * stride_kl + h_kv * stride_kh,
            V + b * stride_vb + l * stride_vl + h_kv * stride_vh,
            MASK + b * stride_mb + l * stride_ml, 1, M,
            0, stride_km, stride_kd, 0, stride_vm, stride_vd, 0, stride_mm)


@triton.jit
def _query_rows(row_start, h_kv, R: tl.constexpr, KR: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows row_start.. (row = g * K*R + k * R + r): index i = k * R + r in the chunk, neighbour k, token r
    (all int64), head h, and which rows exist."""
    i, h, real = head_rows(row_start, h_kv, GROUP, KR, BLOCK_M)
    return i.to(tl.int64), (i // R).to(tl.int64), (i % R).to(tl.int64), h, real


@triton.jit
def _load_rows(row_start, rows, GROUP: tl.constexpr, KR: tl.constexpr, R: tl.constexpr, HAS_MASK: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """A row tile of the chunk for the backward: dq offsets, which rows exist, Q, dO, lse (log2), delta;
    Q, DO, O point at the chunk's first neighbour token."""
    (Q, DO, O, LSE, lse_base, h_kv, n_rows, stride_qk, stride_qr, stride_qh, stride_qd,
     stride_dok, stride_dor, stride_doh, stride_dod, stride_ok, stride_or, stride_oh, stride_od,
     stride_dqk, stride_dqr, stride_dqh) = rows
    i, kq, r, h, real = _query_rows(row_start, h_kv, R, KR, GROUP, BLOCK_M)
    q, do, lse2, delta = load_row_tile(
        Q, DO, O, LSE, kq * stride_qk + r * stride_qr + h * stride_qh,
        kq * stride_dok + r * stride_dor + h * stride_doh, kq * stride_ok + r * stride_or + h * stride_oh,
        h * n_rows + lse_base + i, real,
        stride_qd, stride_dod, stride_od, HEAD_DIM, BLOCK_D)
    return kq * stride_dqk + r * stride_dqr + h * stride_dqh, real, q, do, lse2, delta


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------

@triton.jit
def _nca_fwd_kernel(
    Q, K, V, MASK, OUT, LSE,
    stride_qb, stride_ql, stride_qk, stride_qr, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_km, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vm, stride_vh, stride_vd,
    stride_mb, stride_ml, stride_mm,
    stride_ob, stride_ol, stride_ok, stride_or, stride_oh, stride_od,
    pid_base, n_chunks, M, n_kv_heads, n_heads, qk_scale,
    HEAD_DIM: tl.constexpr, R: tl.constexpr, KR: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    # -- which key set (chunk), which rows -------------------------------------
    M_BLOCKS: tl.constexpr = (GROUP * KR + BLOCK_M - 1) // BLOCK_M
    pid = pid_base + tl.program_id(0).to(tl.int64)
    b, h_kv, l = _key_set(pid // M_BLOCKS, n_chunks, n_kv_heads)
    i, kq, r, h, row_real = _query_rows((pid % M_BLOCKS) * BLOCK_M, h_kv, R, KR, GROUP, BLOCK_M)
    q = load_tile(Q + b * stride_qb + l * stride_ql, kq * stride_qk + r * stride_qr + h * stride_qh,
                  row_real, stride_qd, HEAD_DIM, BLOCK_D)

    # -- online softmax over the chunk's keys ----------------------------------
    keys = _chunk_keys(K, V, MASK, b, l, h_kv, M, stride_kb, stride_kl, stride_km, stride_kh, stride_kd,
                       stride_vb, stride_vl, stride_vm, stride_vh, stride_vd, stride_mb, stride_ml, stride_mm)
    acc, m_i, l_i = attend_keys(q, keys, qk_scale, BLOCK_M, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_MASK, IEEE_DOT)
    out, lse = finish_rows(acc, m_i, l_i, row_real)
    store_tile(OUT + b * stride_ob + l * stride_ol, kq * stride_ok + r * stride_or + h * stride_oh,
               row_real, stride_od, out, HEAD_DIM, BLOCK_D)
    tl.store(LSE + (b * n_heads + h) * (n_chunks * KR) + l * KR + i, lse, mask=row_real)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------

@triton.jit
def _nca_bwd_kernel(
    Q, K, V, MASK, DO, O, LSE, DQ, DK, DV,
    stride_qb, stride_ql, stride_qk, stride_qr, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_km, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vm, stride_vh, stride_vd,
    stride_mb, stride_ml, stride_mm,
    stride_dob, stride_dol, stride_dok, stride_dor, stride_doh, stride_dod,
    stride_ob, stride_ol, stride_ok, stride_or, stride_oh, stride_od,
    stride_dqb, stride_dql, stride_dqk, stride_dqr, stride_dqh, stride_dqd,
    stride_gb, stride_gl, stride_gm, stride_gh, stride_gd,  # dk and dv (same layout)
    pid_base, n_chunks, M, n_kv_heads, n_heads, scale, qk_scale,
    HEAD_DIM: tl.constexpr, R: tl.constexpr, KR: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SWEEP: tl.constexpr, DQ_TOO: tl.constexpr, HAS_MASK: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    # -- which key set (chunk) -------------------------------------------------
    b, h_kv, l = _key_set(pid_base + tl.program_id(0).to(tl.int64), n_chunks, n_kv_heads)
    keys = _chunk_keys(K, V, MASK, b, l, h_kv, M, stride_kb, stride_kl, stride_km, stride_kh, stride_kd,
                       stride_vb, stride_vl, stride_vm, stride_vh, stride_vd, stride_mb, stride_ml, stride_mm)
    g_base = b * stride_gb + l * stride_gl + h_kv * stride_gh
    n_rows = n_chunks * KR
    rows = (Q + b * stride_qb + l * stride_ql, DO + b * stride_dob + l * stride_dol, O + b * stride_ob + l * stride_ol,
            LSE + b * n_heads * n_rows, l * KR, h_kv, n_rows,
            stride_qk, stride_qr, stride_qh, stride_qd, stride_dok, stride_dor, stride_doh, stride_dod,
            stride_ok, stride_or, stride_oh, stride_od, stride_dqk, stride_dqr, stride_dqh)
    backward_sweeps(keys, (DK + g_base, DV + g_base, 0, stride_gm, stride_gd), rows,
                    DQ + b * stride_dqb + l * stride_dql, stride_dqd, scale, qk_scale, _load_rows,
                    GROUP, KR, R, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, SWEEP, DQ_TOO, HAS_MASK, IEEE_DOT)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------

def forward(q, k, v, chunk_mask, scale):
    """(out (B, L, K, R, Hq, D), lse (B, Hq, L*K*R) fp32) for the custom op. Any strides."""
    B, L, K, R, Hq, D = q.shape
    M, Hkv = k.shape[2], k.shape[3]
    group = Hq // Hkv
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, L * K * R), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    fixed, configs = forward_tiles(group * K * R, M, D, q.element_size())
    configs = prune_by_smem(configs, lambda c: forward_smem(fixed, c, q.element_size()), q.device)
    mask, mask_strides, has_mask = mask_as_bytes(chunk_mask, q, 3)
    n_programs = B * Hkv * L * triton.cdiv(group * K * R, fixed["BLOCK_M"])
    with on_device(q):
        launch(_nca_fwd_kernel, n_programs, lambda pid_base: (
            q, k, v, mask, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
            pid_base, L, M, Hkv, Hq, scale * LOG2E,
        ), dict(fixed, HEAD_DIM=D, R=R, KR=K * R, GROUP=group, HAS_MASK=has_mask, IEEE_DOT=q.dtype == torch.float32),
            configs, key=("HEAD_DIM", "R", "KR", "M", "GROUP", "HAS_MASK"))
    return out, lse


def backward(dout, q, k, v, chunk_mask, out, lse, scale):
    """(dq, dk, dv), contiguous, in the inputs' dtypes. Any input strides; all the work is in the kernel."""
    B, L, K, R, Hq, D = q.shape
    M, Hkv = k.shape[2], k.shape[3]
    group = Hq // Hkv
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0:
        return dq, dk, dv
    mask, mask_strides, has_mask = mask_as_bytes(chunk_mask, q, 3)
    args = (q, k, v, mask, dout, out, lse, dq, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *dout.stride(), *out.stride(),
            *dq.stride(), *dk.stride())
    with on_device(q):
        for fixed, configs in backward_plan(group * K * R, M, 1, D, q.element_size()):
            launch(_nca_bwd_kernel, B * Hkv * L,
                   lambda pid_base: (*args, pid_base, L, M, Hkv, Hq, scale, scale * LOG2E),
                   dict(fixed, HEAD_DIM=D, R=R, KR=K * R, GROUP=group, HAS_MASK=has_mask,
                        IEEE_DOT=q.dtype == torch.float32),
                   configs, key=("HEAD_DIM", "R", "KR", "M", "GROUP", "HAS_MASK", "SWEEP", "DQ_TOO"))
    return dq, dk, dv
