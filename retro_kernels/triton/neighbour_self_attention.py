"""Neighbour self-attention in Triton: the address arithmetic and launchers of its kernels.

Each neighbour (b, l, k) is an independent bidirectional sequence of R
tokens. A key set is one neighbour and one key/value head: one run of R keys.
Its query rows are the R tokens of every query head of that kv head's group,
row = g * R + r (query head h = h_kv * group + g), so the neighbour's keys and
values are read once for the whole group (grouped-query and multi-query
attention cost no extra key traffic) and the mask is applied in-kernel: no
repeat, no mask materialisation, no copy of non-contiguous inputs. The tile
work is in _core.py.

Forward: one program per (key set, block of BLOCK_M rows), 1-D grid with the
row blocks of a key set next to each other. Padding query rows (mask False)
and rows with no real key store zeros and lse = +inf; other rows store the
natural-log log-sum-exp for the backward, layout (B, Hq, L*K*R).

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
def _key_set(pid, n_neighbours, n_sets, n_kv_heads):
    """Key set number pid (int64; numbered (b, h_kv, l, k)): batch, kv head, chunk l, neighbour k, set l*K + k."""
    s = pid % n_sets
    bh = pid // n_sets
    return bh // n_kv_heads, bh % n_kv_heads, s // n_neighbours, s % n_neighbours, s


@triton.jit
def _neighbour_keys(K, V, MASK, b, l, kk, h_kv, R: tl.constexpr,
                    stride_kb, stride_kl, stride_kk, stride_kr, stride_kh, stride_kd,
                    stride_vb, stride_vl, stride_vk, stride_vr, stride_vh, stride_vd,
                    stride_mb, stride_ml, stride_mk, stride_mr):
    """The key set of neighbour (b, l, k) and kv head h_kv: one run of R keys."""
    return (K + b * stride_kb + l * stride_kl + kk * stride_kk + h_kv * stride_kh,
            V + b * stride_vb + l * stride_vl + kk * stride_vk + h_kv * stride_vh,
            MASK + b * stride_mb + l * stride_ml + kk * stride_mk, 1, R,
            0, stride_kr, stride_kd, 0, stride_vr, stride_vd, 0, stride_mr)


@triton.jit
def _query_rows(row_start, h_kv, mask_base, stride_mr, GROUP: tl.constexpr, R: tl.constexpr,
                BLOCK_M: tl.constexpr, HAS_MASK: tl.constexpr):
    """Rows row_start.. of the key set: token r (int64), head h (int64), rows in range, real (unmasked) rows."""
    r, h, row_in = head_rows(row_start, h_kv, GROUP, R, BLOCK_M)
    r = r.to(tl.int64)
    real = row_in
    if HAS_MASK:
        real = real & (tl.load(mask_base + r * stride_mr, mask=row_in, other=0) != 0)
    return r, h, row_in, real


@triton.jit
def _load_rows(row_start, rows, GROUP: tl.constexpr, R: tl.constexpr, _R: tl.constexpr, HAS_MASK: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):  # core.backward_sweeps' loader
    """A row tile of the neighbour for the backward: dq offsets, rows to store (padding rows too:
    their dq is zero), Q, dO, lse (log2), delta; Q, DO, O point at the neighbour's first token."""
    (Q, DO, O, LSE, lse_base, h_kv, mask_base, n_rows, stride_qr, stride_qh, stride_qd,
     stride_dor, stride_doh, stride_dod, stride_or, stride_oh, stride_od, stride_mr, stride_dqr, stride_dqh) = rows
    r, h, row_in, real = _query_rows(row_start, h_kv, mask_base, stride_mr, GROUP, R, BLOCK_M, HAS_MASK)
    q, do, lse2, delta = load_row_tile(
        Q, DO, O, LSE, r * stride_qr + h * stride_qh, r * stride_dor + h * stride_doh, r * stride_or + h * stride_oh,
        h * n_rows + lse_base + r, real, stride_qd, stride_dod, stride_od, HEAD_DIM, BLOCK_D)
    return r * stride_dqr + h * stride_dqh, row_in, q, do, lse2, delta


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
    pid_base, n_neighbours, n_sets, n_kv_heads, n_heads, qk_scale,
    HEAD_DIM: tl.constexpr, R: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    # -- which key set (neighbour), which rows ---------------------------------
    M_BLOCKS: tl.constexpr = (GROUP * R + BLOCK_M - 1) // BLOCK_M
    pid = pid_base + tl.program_id(0).to(tl.int64)
    b, h_kv, l, kk, s = _key_set(pid // M_BLOCKS, n_neighbours, n_sets, n_kv_heads)
    keys = _neighbour_keys(K, V, MASK, b, l, kk, h_kv, R,
                           stride_kb, stride_kl, stride_kk, stride_kr, stride_kh, stride_kd,
                           stride_vb, stride_vl, stride_vk, stride_vr, stride_vh, stride_vd,
                           stride_mb, stride_ml, stride_mk, stride_mr)
    r, h, row_in, row_real = _query_rows((pid % M_BLOCKS) * BLOCK_M, h_kv, keys[2], stride_mr,
                                         GROUP, R, BLOCK_M, HAS_MASK)
    q = load_tile(Q + b * stride_qb + l * stride_ql + kk * stride_qk, r * stride_qr + h * stride_qh,
                  row_real, stride_qd, HEAD_DIM, BLOCK_D)

    # -- online softmax over the neighbour's keys; padding rows: zeros, lse +inf
    acc, m_i, l_i = attend_keys(q, keys, qk_scale, BLOCK_M, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_MASK, IEEE_DOT)
    out, lse = finish_rows(acc, m_i, l_i, row_real)
    store_tile(OUT + b * stride_ob + l * stride_ol + kk * stride_ok, r * stride_or + h * stride_oh,
               row_in, stride_od, out, HEAD_DIM, BLOCK_D)
    tl.store(LSE + (b * n_heads + h) * (n_sets * R) + s * R + r, lse, mask=row_in)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------

@triton.jit
def _nsa_bwd_kernel(
    Q, K, V, MASK, DO, O, LSE, DQ, DK, DV,
    stride_qb, stride_ql, stride_qk, stride_qr, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kk, stride_kr, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vk, stride_vr, stride_vh, stride_vd,
    stride_mb, stride_ml, stride_mk, stride_mr,
    stride_dob, stride_dol, stride_dok, stride_dor, stride_doh, stride_dod,
    stride_ob, stride_ol, stride_ok, stride_or, stride_oh, stride_od,
    stride_dqb, stride_dql, stride_dqk, stride_dqr, stride_dqh, stride_dqd,
    stride_gb, stride_gl, stride_gk, stride_gr, stride_gh, stride_gd,  # dk and dv (same layout)
    pid_base, n_neighbours, n_sets, n_kv_heads, n_heads, scale, qk_scale,
    HEAD_DIM: tl.constexpr, R: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SWEEP: tl.constexpr, DQ_TOO: tl.constexpr, HAS_MASK: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    # -- which key set (neighbour) ---------------------------------------------
    b, h_kv, l, kk, s = _key_set(pid_base + tl.program_id(0).to(tl.int64), n_neighbours, n_sets, n_kv_heads)
    keys = _neighbour_keys(K, V, MASK, b, l, kk, h_kv, R,
                           stride_kb, stride_kl, stride_kk, stride_kr, stride_kh, stride_kd,
                           stride_vb, stride_vl, stride_vk, stride_vr, stride_vh, stride_vd,
                           stride_mb, stride_ml, stride_mk, stride_mr)
    g_base = b * stride_gb + l * stride_gl + kk * stride_gk + h_kv * stride_gh
    n_rows = n_sets * R
    rows = (Q + b * stride_qb + l * stride_ql + kk * stride_qk, DO + b * stride_dob + l * stride_dol + kk * stride_dok,
            O + b * stride_ob + l * stride_ol + kk * stride_ok, LSE + b * n_heads * n_rows, s * R, h_kv, keys[2],
            n_rows, stride_qr, stride_qh, stride_qd, stride_dor, stride_doh, stride_dod,
            stride_or, stride_oh, stride_od, stride_mr, stride_dqr, stride_dqh)
    backward_sweeps(keys, (DK + g_base, DV + g_base, 0, stride_gr, stride_gd), rows,
                    DQ + b * stride_dqb + l * stride_dql + kk * stride_dqk, stride_dqd, scale, qk_scale, _load_rows,
                    GROUP, R, R, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, SWEEP, DQ_TOO, HAS_MASK, IEEE_DOT)


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
    fixed, configs = forward_tiles(group * R, R, D, q.element_size())
    configs = prune_by_smem(configs, lambda c: forward_smem(fixed, c, q.element_size()), q.device)
    mask, mask_strides, has_mask = mask_as_bytes(neighbour_mask, q, 4)
    n_programs = B * Hkv * L * K * triton.cdiv(group * R, fixed["BLOCK_M"])
    with on_device(q):
        launch(_nsa_fwd_kernel, n_programs, lambda pid_base: (
            q, k, v, mask, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
            pid_base, K, L * K, Hkv, Hq, scale * LOG2E,
        ), dict(fixed, HEAD_DIM=D, R=R, GROUP=group, HAS_MASK=has_mask, IEEE_DOT=q.dtype == torch.float32),
            configs, key=("HEAD_DIM", "R", "GROUP", "HAS_MASK"))
    return out, lse


def backward(dout, q, k, v, neighbour_mask, out, lse, scale):
    """(dq, dk, dv), contiguous, in the inputs' dtypes. Any input strides; all the work is in the kernel."""
    B, L, K, R, Hq, D = q.shape
    Hkv = k.shape[4]
    group = Hq // Hkv
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0:
        return dq, dk, dv
    mask, mask_strides, has_mask = mask_as_bytes(neighbour_mask, q, 4)
    args = (q, k, v, mask, dout, out, lse, dq, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *dout.stride(), *out.stride(),
            *dq.stride(), *dk.stride())
    with on_device(q):
        for fixed, configs in backward_plan(group * R, R, 1, D, q.element_size()):
            launch(_nsa_bwd_kernel, B * Hkv * L * K,
                   lambda pid_base: (*args, pid_base, K, L * K, Hkv, Hq, scale, scale * LOG2E),
                   dict(fixed, HEAD_DIM=D, R=R, GROUP=group, HAS_MASK=has_mask, IEEE_DOT=q.dtype == torch.float32),
                   configs, key=("HEAD_DIM", "R", "GROUP", "HAS_MASK", "SWEEP", "DQ_TOO"))
    return dq, dk, dv
