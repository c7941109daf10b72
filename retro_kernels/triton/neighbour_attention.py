"""The two neighbour ops in Triton: the address arithmetic and launchers of their kernels.

Both take q laid out (B, L, K, R, Hq, D), token r of neighbour k of chunk l, and
differ only in their key sets (the tile work is in _core.py):

neighbour self-attention  a key set is one neighbour (b, l, k) and one kv head: a run
    of its R keys; its query rows are the R tokens of that neighbour. Padding query
    rows (mask False) store zeros and lse = +inf, get dq = 0 and add nothing to dk, dv.
neighbour cross-attention  a key set is one chunk (b, l) and one kv head: a run of its
    M keys, read straight from (B, L, M, Hkv, D), shared by all K*R neighbour tokens
    of the chunk, its query rows; nothing repeats the keys K times.

So the launchers see keys as (B, L, S, n_keys, Hkv, D) with S = K sets per chunk
(self) or S = 1 (cross, k unsqueezed), and a key set's rows as the ROWS = K/S * R
tokens i = (neighbour - s) * R + r of every query head of the kv head's group, row =
g * ROWS + i (head h = h_kv * group + g): keys and values are read once for the group
and the mask is applied in-kernel; no repeat, no copy of non-contiguous inputs.

Forward: one program per (key set, block of BLOCK_M rows), 1-D grid with the row
blocks of a key set next to each other. Rows with no real key store zeros and
lse = +inf; other rows the natural-log log-sum-exp, layout (B, Hq, L*K*R).

Backward: one program per key set owns every query row and every key of it, so it
writes dq, dk and dv with no atomics: deterministic. delta = rowsum(dO * O) is
computed from the rows the program loads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launch_backward, launch_forward, mask_as_bytes
from ._core import LOG2E, attend_keys, backward_sweeps, finish_rows, head_rows, load_row_tile, load_tile, store_tile


# ---------------------------------------------------------------------------
# Address arithmetic
# ---------------------------------------------------------------------------

@triton.jit
def _key_set(pid, n_sets, sets_per_chunk, n_kv_heads):
    """Key set number pid (int64; numbered (b, h_kv, l, s)): batch, kv head, chunk l, set s of the chunk."""
    bh = pid // n_sets
    t = pid % n_sets
    return bh // n_kv_heads, bh % n_kv_heads, t // sets_per_chunk, t % sets_per_chunk


@triton.jit
def _keys(K, V, MASK, b, l, s, h_kv, n_keys,
          stride_kb, stride_kl, stride_ks, stride_kn, stride_kh, stride_kd,
          stride_vb, stride_vl, stride_vs, stride_vn, stride_vh, stride_vd,
          stride_mb, stride_ml, stride_ms, stride_mn):
    """Key set s of chunk (b, l) and kv head h_kv: one run of n_keys keys."""
    return (K + b * stride_kb + l * stride_kl + s * stride_ks + h_kv * stride_kh,
            V + b * stride_vb + l * stride_vl + s * stride_vs + h_kv * stride_vh,
            MASK + b * stride_mb + l * stride_ml + s * stride_ms, 1, n_keys,
            0, stride_kn, stride_kd, 0, stride_vn, stride_vd, 0, stride_mn)


@triton.jit
def _query_rows(row_start, s, h_kv, mask_base, stride_ms, stride_mn, mask_queries, GROUP: tl.constexpr,
                ROWS: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, HAS_MASK: tl.constexpr):
    """Rows row_start.. of key set s: neighbour kq, token r (int64), head h (int64), rows in range, and
    real rows (with mask_queries, the mask at mask_base, set s's first token, hides padding tokens)."""
    i, h, row_in = head_rows(row_start, h_kv, GROUP, ROWS, BLOCK_M)
    j, r = (i // R).to(tl.int64), (i % R).to(tl.int64)
    real = row_in
    if HAS_MASK:
        if mask_queries != 0:
            real = real & (tl.load(mask_base + j * stride_ms + r * stride_mn, mask=row_in, other=0) != 0)
    return s + j, r, h, row_in, real


@triton.jit
def _load_rows(row_start, rows, GROUP: tl.constexpr, ROWS: tl.constexpr, R: tl.constexpr, HAS_MASK: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):  # core.backward_sweeps' loader
    """A row tile of a key set for the backward: dq offsets, rows to store (padding rows too: their dq
    is zero), Q, dO, lse (log2), delta; Q, DO, O, LSE point at the chunk's first token."""
    (Q, DO, O, LSE, s, h_kv, mask_base, mask_queries, n_lse_rows, stride_qk, stride_qr, stride_qh, stride_qd,
     stride_dok, stride_dor, stride_doh, stride_dod, stride_ok, stride_or, stride_oh, stride_od,
     stride_ms, stride_mn, stride_dqk, stride_dqr, stride_dqh) = rows
    kq, r, h, row_in, real = _query_rows(row_start, s, h_kv, mask_base, stride_ms, stride_mn, mask_queries,
                                         GROUP, ROWS, R, BLOCK_M, HAS_MASK)
    q, do, lse2, delta = load_row_tile(
        Q, DO, O, LSE, kq * stride_qk + r * stride_qr + h * stride_qh,
        kq * stride_dok + r * stride_dor + h * stride_doh, kq * stride_ok + r * stride_or + h * stride_oh,
        h * n_lse_rows + kq * R + r, real, stride_qd, stride_dod, stride_od, HEAD_DIM, BLOCK_D)
    return kq * stride_dqk + r * stride_dqr + h * stride_dqh, row_in, q, do, lse2, delta


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------

@triton.jit
def _fwd_kernel(
    Q, K, V, MASK, OUT, LSE,
    stride_qb, stride_ql, stride_qk, stride_qr, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_ks, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vs, stride_vn, stride_vh, stride_vd,
    stride_mb, stride_ml, stride_ms, stride_mn,
    stride_ob, stride_ol, stride_ok, stride_or, stride_oh, stride_od,
    pid_base, n_sets, sets_per_chunk, n_neighbours, n_keys, n_kv_heads, n_heads, n_lse_rows, mask_queries, qk_scale,
    HEAD_DIM: tl.constexpr, R: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    # -- which key set, which rows ---------------------------------------------
    M_BLOCKS: tl.constexpr = (GROUP * ROWS + BLOCK_M - 1) // BLOCK_M
    pid = pid_base + tl.program_id(0).to(tl.int64)
    b, h_kv, l, s = _key_set(pid // M_BLOCKS, n_sets, sets_per_chunk, n_kv_heads)
    keys = _keys(K, V, MASK, b, l, s, h_kv, n_keys,
                 stride_kb, stride_kl, stride_ks, stride_kn, stride_kh, stride_kd,
                 stride_vb, stride_vl, stride_vs, stride_vn, stride_vh, stride_vd,
                 stride_mb, stride_ml, stride_ms, stride_mn)
    kq, r, h, row_in, row_real = _query_rows((pid % M_BLOCKS) * BLOCK_M, s, h_kv, keys[2], stride_ms, stride_mn,
                                             mask_queries, GROUP, ROWS, R, BLOCK_M, HAS_MASK)
    q = load_tile(Q + b * stride_qb + l * stride_ql, kq * stride_qk + r * stride_qr + h * stride_qh,
                  row_real, stride_qd, HEAD_DIM, BLOCK_D)

    # -- online softmax over the key set; rows that are not real: zeros, lse +inf
    acc, m_i, l_i = attend_keys(q, keys, qk_scale, BLOCK_M, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_MASK, IEEE_DOT)
    out, lse = finish_rows(acc, m_i, l_i, row_real)
    store_tile(OUT + b * stride_ob + l * stride_ol, kq * stride_ok + r * stride_or + h * stride_oh,
               row_in, stride_od, out, HEAD_DIM, BLOCK_D)
    tl.store(LSE + (b * n_heads + h) * n_lse_rows + (l * n_neighbours + kq) * R + r, lse, mask=row_in)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------

@triton.jit
def _bwd_kernel(
    Q, K, V, MASK, DO, O, LSE, DQ, DK, DV,
    stride_qb, stride_ql, stride_qk, stride_qr, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_ks, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vs, stride_vn, stride_vh, stride_vd,
    stride_mb, stride_ml, stride_ms, stride_mn,
    stride_dob, stride_dol, stride_dok, stride_dor, stride_doh, stride_dod,
    stride_ob, stride_ol, stride_ok, stride_or, stride_oh, stride_od,
    stride_dqb, stride_dql, stride_dqk, stride_dqr, stride_dqh, stride_dqd,
    stride_gb, stride_gl, stride_gs, stride_gn, stride_gh, stride_gd,  # dk and dv (same layout)
    pid_base, n_sets, sets_per_chunk, n_neighbours, n_keys, n_kv_heads, n_heads, n_lse_rows, mask_queries,
    scale, qk_scale,
    HEAD_DIM: tl.constexpr, R: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SWEEP: tl.constexpr, DQ_TOO: tl.constexpr, HAS_MASK: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    # -- which key set -----------------------------------------------------------
    b, h_kv, l, s = _key_set(pid_base + tl.program_id(0).to(tl.int64), n_sets, sets_per_chunk, n_kv_heads)
    keys = _keys(K, V, MASK, b, l, s, h_kv, n_keys,
                 stride_kb, stride_kl, stride_ks, stride_kn, stride_kh, stride_kd,
                 stride_vb, stride_vl, stride_vs, stride_vn, stride_vh, stride_vd,
                 stride_mb, stride_ml, stride_ms, stride_mn)
    g_base = b * stride_gb + l * stride_gl + s * stride_gs + h_kv * stride_gh
    rows = (Q + b * stride_qb + l * stride_ql, DO + b * stride_dob + l * stride_dol, O + b * stride_ob + l * stride_ol,
            LSE + b * n_heads * n_lse_rows + l * n_neighbours * R, s, h_kv, keys[2], mask_queries,
            n_lse_rows, stride_qk, stride_qr, stride_qh, stride_qd, stride_dok, stride_dor, stride_doh, stride_dod,
            stride_ok, stride_or, stride_oh, stride_od, stride_ms, stride_mn, stride_dqk, stride_dqr, stride_dqh)
    backward_sweeps(keys, (DK + g_base, DV + g_base, 0, stride_gn, stride_gd), rows,
                    DQ + b * stride_dqb + l * stride_dql, stride_dqd, scale, qk_scale, _load_rows,
                    GROUP, ROWS, R, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, SWEEP, DQ_TOO, HAS_MASK, IEEE_DOT)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------

_KEY = ("R", "ROWS", "n_keys", "GROUP", "mask_queries")  # what the autotuners key on, besides the head dim


def _shape(q, k):
    """(B, L, K, R, Hq, D), sets per chunk S, keys per set, Hkv, group, rows per key set and head."""
    B, L, K, R, Hq, D = q.shape
    S, n_keys, Hkv = k.shape[2:5]
    return (B, L, K, R, Hq, D), S, n_keys, Hkv, Hq // Hkv, K // S * R


def _forward(q, k, v, mask, scale, mask_queries: bool):
    """(out (B, L, K, R, Hq, D), lse (B, Hq, L*K*R) fp32), keys (B, L, S, n_keys, Hkv, D). Any strides."""
    (B, L, K, R, Hq, D), S, n_keys, Hkv, group, rows = _shape(q, k)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, L * K * R), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    mask, mask_strides, has_mask = mask_as_bytes(mask, q, 4)
    launch_forward(_fwd_kernel, q, group * rows, n_keys, B * Hkv * L * S, lambda pid_base: (
        q, k, v, mask, out, lse, *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        pid_base, L * S, S, K, n_keys, Hkv, Hq, L * K * R, int(mask_queries), scale * LOG2E,
    ), dict(R=R, ROWS=rows, GROUP=group, HAS_MASK=has_mask), key=_KEY)
    return out, lse


def _backward(dout, q, k, v, mask, out, lse, scale, mask_queries: bool):
    """(dq, dk, dv), contiguous, in the inputs' dtypes and shapes. Any input strides."""
    (B, L, K, R, Hq, D), S, n_keys, Hkv, group, rows = _shape(q, k)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0:
        return dq, dk, dv
    mask, mask_strides, has_mask = mask_as_bytes(mask, q, 4)
    args = (q, k, v, mask, dout, out, lse, dq, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *dout.stride(), *out.stride(),
            *dq.stride(), *dk.stride())
    launch_backward(_bwd_kernel, q, group * rows, n_keys, 1, B * Hkv * L * S,
                    lambda pid_base: (*args, pid_base, L * S, S, K, n_keys, Hkv, Hq, L * K * R, int(mask_queries),
                                      scale, scale * LOG2E),
                    dict(R=R, ROWS=rows, GROUP=group, HAS_MASK=has_mask), key=_KEY)
    return dq, dk, dv


def self_forward(q, k, v, neighbour_mask, scale):
    """neighbour_self_attention: one key set per neighbour; the mask hides padding keys and queries."""
    return _forward(q, k, v, neighbour_mask, scale, mask_queries=True)


def self_backward(dout, q, k, v, neighbour_mask, out, lse, scale):
    return _backward(dout, q, k, v, neighbour_mask, out, lse, scale, mask_queries=True)


def _one_set(t):
    """A chunk's tensor (B, L, M, ...) as one key set per chunk, (B, L, 1, M, ...); None stays None."""
    return None if t is None else t.unsqueeze(2)


def cross_forward(q, k, v, chunk_mask, scale):
    """neighbour_cross_attention: one key set per chunk, its M tokens; the mask hides chunk keys only."""
    return _forward(q, _one_set(k), _one_set(v), _one_set(chunk_mask), scale, mask_queries=False)


def cross_backward(dout, q, k, v, chunk_mask, out, lse, scale):
    dq, dk, dv = _backward(dout, q, _one_set(k), _one_set(v), _one_set(chunk_mask), out, lse, scale,
                           mask_queries=False)
    return dq, dk.squeeze(2), dv.squeeze(2)
