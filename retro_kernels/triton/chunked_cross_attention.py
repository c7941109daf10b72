"""Chunked cross-attention in Triton: the address arithmetic and launchers of its kernels.

The shift is folded into the indexing. Group the absolute positions t into
"query chunks" c = (t + 1) // m: query chunk c holds t = c*m - 1 .. c*m + m - 2.
Query chunk 0 holds the first m-1 tokens, which see no complete chunk and
output zeros; query chunk c >= 1 is the paper's attending chunk u = c - 1 and
reads the K*R keys of the neighbours of chunk u. So a program reads q at its
shifted rows and writes the output rows in place: no pad, no reshape, no copy.

A key set is (batch, kv head, query chunk c): the K neighbours of chunk c - 1,
each a run of R keys. Its query rows are the m rows of chunk c for every
query head of the kv head's group, row = g * m + i (head h = h_kv * group + g),
so K and V are read once for the whole group. The tile work is in _core.py.

Forward: one program per (key set, block of BLOCK_M rows), 1-D grid with the
row blocks of a key set next to each other; it saves each row's log-sum-exp
(natural log; +inf for rows with no key), layout (B, Hq, N).

Backward: one program per key set, c = 0 .. L, owns every query row and
every key of it, so it writes dq, dk and dv with no atomics: deterministic.
Chunk 0's program writes the zero rows of dq; chunks no query reads get zero
dk, dv. delta = rowsum(dO * O) is computed from the rows the program loads.
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
def _key_set(pid, n_sets, n_kv_heads, first_chunk):
    """Key set number pid (int64; numbered (b, h_kv, c)): its batch (int64), kv head and query chunk."""
    bh = pid // n_sets
    return bh // n_kv_heads, bh % n_kv_heads, (first_chunk + pid % n_sets).to(tl.int32)


@triton.jit
def _query_rows(c, row_start, h_kv, GROUP: tl.constexpr, CHUNK: tl.constexpr, start_pos, N,
                BLOCK_M: tl.constexpr):
    """Rows row_start.. of key set c (row = g * m + i): token index n in q, head h (int64), real tokens."""
    i, h, real = head_rows(row_start, h_kv, GROUP, CHUNK, BLOCK_M)
    n = c * CHUNK - 1 + i - start_pos  # absolute position minus start_pos
    return n.to(tl.int64), h, real & (n >= 0) & (n < N)


@triton.jit
def _neighbour_keys(K, V, MASK, b, c, h_kv, n_neighbours, R,
                    stride_kb, stride_kl, stride_kk, stride_kr, stride_kh, stride_kd,
                    stride_vb, stride_vl, stride_vk, stride_vr, stride_vh, stride_vd,
                    stride_mb, stride_ml, stride_mk, stride_mr):
    """The key set of query chunk c: the K neighbours (runs of R keys) of chunk u = c - 1; no runs for c = 0."""
    u = (c - 1).to(tl.int64)
    return (K + b * stride_kb + u * stride_kl + h_kv * stride_kh,
            V + b * stride_vb + u * stride_vl + h_kv * stride_vh,
            MASK + b * stride_mb + u * stride_ml, tl.minimum(c, 1) * n_neighbours, R,
            stride_kk, stride_kr, stride_kd, stride_vk, stride_vr, stride_vd, stride_mk, stride_mr)


@triton.jit
def _load_rows(row_start, rows, GROUP: tl.constexpr, CHUNK: tl.constexpr, _R: tl.constexpr, _HAS_MASK: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):  # core.backward_sweeps' loader
    """A row tile of query chunk c for the backward: its dq offsets, which rows are real, Q, dO, lse, delta."""
    (Q, DO, O, LSE, b, c, h_kv, N, start_pos, n_heads, stride_qb, stride_qn, stride_qh, stride_qd,
     stride_dob, stride_don, stride_doh, stride_dod, stride_ob, stride_on, stride_oh, stride_od,
     stride_dqn, stride_dqh) = rows
    n, h, real = _query_rows(c, row_start, h_kv, GROUP, CHUNK, start_pos, N, BLOCK_M)
    q, do, lse2, delta = load_row_tile(
        Q + b * stride_qb, DO + b * stride_dob, O + b * stride_ob, LSE,
        n * stride_qn + h * stride_qh, n * stride_don + h * stride_doh, n * stride_on + h * stride_oh,
        (b * n_heads + h) * N + n, real, stride_qd, stride_dod, stride_od, HEAD_DIM, BLOCK_D)
    return n * stride_dqn + h * stride_dqh, real, q, do, lse2, delta


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
    pid_base, N, start_pos, first_chunk, n_chunks, n_kv_heads, n_heads, n_neighbours, R, qk_scale,
    HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    # -- which key set, which rows ------------------------------------------
    M_BLOCKS: tl.constexpr = (GROUP * CHUNK + BLOCK_M - 1) // BLOCK_M
    pid = pid_base + tl.program_id(0).to(tl.int64)
    b, h_kv, c = _key_set(pid // M_BLOCKS, n_chunks, n_kv_heads, first_chunk)
    n, h, row_real = _query_rows(c, (pid % M_BLOCKS) * BLOCK_M, h_kv, GROUP, CHUNK, start_pos, N, BLOCK_M)
    q = load_tile(Q + b * stride_qb, n * stride_qn + h * stride_qh, row_real, stride_qd, HEAD_DIM, BLOCK_D)

    # -- online softmax over the neighbours of chunk c - 1 -------------------
    keys = _neighbour_keys(K, V, MASK, b, c, h_kv, n_neighbours, R,
                           stride_kb, stride_kl, stride_kk, stride_kr, stride_kh, stride_kd,
                           stride_vb, stride_vl, stride_vk, stride_vr, stride_vh, stride_vd,
                           stride_mb, stride_ml, stride_mk, stride_mr)
    acc, m_i, l_i = attend_keys(q, keys, qk_scale, BLOCK_M, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_MASK, IEEE_DOT)

    # -- normalise, store the rows in place and their lse ---------------------
    out, lse = finish_rows(acc, m_i, l_i, row_real)
    store_tile(OUT + b * stride_ob, n * stride_on + h * stride_oh, row_real, stride_od, out, HEAD_DIM, BLOCK_D)
    tl.store(LSE + (b * n_heads + h) * N + n, lse, mask=row_real)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------

@triton.jit
def _cca_bwd_kernel(
    Q, K, V, MASK, DO, O, LSE, DQ, DK, DV,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kk, stride_kr, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vk, stride_vr, stride_vh, stride_vd,
    stride_mb, stride_ml, stride_mk, stride_mr,
    stride_dob, stride_don, stride_doh, stride_dod,
    stride_ob, stride_on, stride_oh, stride_od,
    stride_dqb, stride_dqn, stride_dqh, stride_dqd,
    stride_gb, stride_gl, stride_gk, stride_gr, stride_gh, stride_gd,  # dk and dv (same layout)
    pid_base, N, start_pos, n_chunks, n_kv_heads, n_heads, n_neighbours, R, scale, qk_scale,
    HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SWEEP: tl.constexpr, DQ_TOO: tl.constexpr, HAS_MASK: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    # -- which key set: query chunk c = 0 .. L (chunk 0 has no keys: zero dq rows) ----
    b, h_kv, c = _key_set(pid_base + tl.program_id(0).to(tl.int64), n_chunks + 1, n_kv_heads, 0)
    keys = _neighbour_keys(K, V, MASK, b, c, h_kv, n_neighbours, R,
                           stride_kb, stride_kl, stride_kk, stride_kr, stride_kh, stride_kd,
                           stride_vb, stride_vl, stride_vk, stride_vr, stride_vh, stride_vd,
                           stride_mb, stride_ml, stride_mk, stride_mr)
    g_base = b * stride_gb + (c - 1).to(tl.int64) * stride_gl + h_kv * stride_gh
    rows = (Q, DO, O, LSE, b, c, h_kv, N, start_pos, n_heads, stride_qb, stride_qn, stride_qh, stride_qd,
            stride_dob, stride_don, stride_doh, stride_dod, stride_ob, stride_on, stride_oh, stride_od,
            stride_dqn, stride_dqh)
    backward_sweeps(keys, (DK + g_base, DV + g_base, stride_gk, stride_gr, stride_gd), rows, DQ + b * stride_dqb,
                    stride_dqd, scale, qk_scale, _load_rows, GROUP, CHUNK, 0, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D,
                    SWEEP, DQ_TOO, HAS_MASK, IEEE_DOT)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------

def forward(q, k, v, neighbour_mask, chunk_size, scale, start_pos):
    """(out (B, N, Hq, D), lse (B, Hq, N) fp32) for the custom op. Any input strides."""
    B, N, Hq, D = q.shape
    _, L, K, R, Hkv, _ = k.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, N), dtype=torch.float32, device=q.device)
    if B * N * Hq == 0:
        return out, lse
    first_chunk = (start_pos + 1) // chunk_size
    n_chunks = (start_pos + N) // chunk_size - first_chunk + 1
    group = Hq // Hkv
    mask, mask_strides, has_mask = mask_as_bytes(neighbour_mask, q, 4)
    launch_forward(_cca_fwd_kernel, q, group * chunk_size, R, B * Hkv * n_chunks, lambda pid_base: (
        q, k, v, mask, out, lse, *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        pid_base, N, start_pos, first_chunk, n_chunks, Hkv, Hq, K, R, scale * LOG2E,
    ), dict(CHUNK=chunk_size, GROUP=group, HAS_MASK=has_mask), key=("CHUNK", "GROUP", "n_neighbours", "R"))
    return out, lse


def backward(dout, q, k, v, neighbour_mask, out, lse, chunk_size, scale, start_pos):
    """(dq, dk, dv), contiguous, in the inputs' dtypes. Any input strides; all the work is in the kernel."""
    B, N, Hq, D = q.shape
    _, L, K, R, Hkv, _ = k.shape
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if B * Hkv * D == 0:
        return dq, dk, dv
    group = Hq // Hkv
    mask, mask_strides, has_mask = mask_as_bytes(neighbour_mask, q, 4)
    args = (q, k, v, mask, dout, out, lse, dq, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *dout.stride(), *out.stride(),
            *dq.stride(), *dk.stride())
    # one program per query chunk c = 0 .. L: chunk 0 writes the zero rows of dq,
    # chunk c >= 1 the gradients of neighbour chunk c - 1 (zeros if no query reads it);
    # one launch, or two (dk and dv, then dq) when neither the rows nor the keys fit a tile
    launch_backward(_cca_bwd_kernel, q, group * chunk_size, R, K, B * Hkv * (L + 1),
                    lambda pid_base: (*args, pid_base, N, start_pos, L, Hkv, Hq, K, R, scale, scale * LOG2E),
                    dict(CHUNK=chunk_size, GROUP=group, HAS_MASK=has_mask), key=("CHUNK", "GROUP", "n_neighbours", "R"))
    return dq, dk, dv
