"""The attention core that the three ops' Triton kernels share.

Every op is the same computation: a program owns one *key set* (CCA: the
K*R tokens of one chunk's neighbours; neighbour self-attention: the R tokens
of one neighbour; neighbour cross-attention: the m tokens of one chunk) for
one key/value head, and the query rows that attend to it (every query head of
that kv head's group). The ops differ only in where those rows and keys live,
so each op's file keeps the address arithmetic (which program owns which key
set, where its rows are) and its launchers; the tile work is here, split the
way the Triton fused-attention tutorial splits `_attn_fwd_inner`,
`_attn_bwd_dkdv` and `_attn_bwd_dq`:

forward
    attend_keys      online softmax of a query tile over every key tile of a key set
    softmax_step     one key tile of it
    finish_rows      normalisation: output rows and their log-sum-exp
both
    head_rows        which query head and row each row of a tile is (heads of a GQA group stacked)
backward (score tiles laid out keys x rows, the way dK and dV accumulate)
    load_row_tile    Q and dO of a row tile, its lse, and delta = rowsum(dO * O)
                     from the tile's own O: no separate pass over dO and O
    score_grads_t    P^T and dS^T of a key tile x row tile
    backward_tile    the dK, dV, dQ parts they give: 5 matmuls in all
    backward_keys    all rows on chip: each key tile's dK, dV are complete
                     (stored), dQ accumulates on chip (one sweep)
    dq_over_keys     dQ of one row tile over the key set (the second sweep,
                     only when neither the rows nor the keys fit one tile)
    backward_sweeps  the whole backward of a key set, rows loaded by the op's own function

A key set is described by a tuple

    keys = (K, V, MASK, n_runs, run_len,
            stride_k_run, stride_k_key, stride_k_d, stride_v_run, stride_v_key, stride_v_d,
            stride_m_run, stride_m_key)

with K, V, MASK pointing at its first key: `n_runs` runs of `run_len` keys
(CCA: K neighbours of R tokens; the neighbour ops: one run), key r of run i
at i * stride_run + r * stride_key. Key tiles never straddle runs, so a tile
is a pointer step: no per-element division. Gradients of keys are described
the same way by grads = (DK, DV, stride_run, stride_key, stride_d).
Offsets are int64 throughout. Scores are kept in log2 units (exp2); the lse
that the forward stores is in natural log, +inf for rows that see no key.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # for the launchers: qk_scale = scale * LOG2E
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def mma(a, b, acc, IEEE_DOT: tl.constexpr):
    """a @ b (+ acc) with fp32 accumulation; exact fp32 products (not TF32) for fp32 inputs."""
    if IEEE_DOT:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


# ---------------------------------------------------------------------------
# Tiles in memory
# ---------------------------------------------------------------------------

@triton.jit
def load_tile(base, rows, row_ok, stride_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row i of the tile at base + rows[i] (int64 element offsets), head dim at stride_d; zeros elsewhere."""
    d = tl.arange(0, BLOCK_D)
    ptrs = (base + rows)[:, None] + d[None, :].to(tl.int64) * stride_d
    return tl.load(ptrs, mask=row_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def store_tile(base, rows, row_ok, stride_d, tile, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store the fp32 tile in base's dtype, where load_tile would have read it."""
    d = tl.arange(0, BLOCK_D)
    ptrs = (base + rows)[:, None] + d[None, :].to(tl.int64) * stride_d
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=row_ok[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit
def head_rows(row_start, h_kv, GROUP: tl.constexpr, ROWS_PER_HEAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows row_start.. of a key set, row = g * ROWS_PER_HEAD + i for the group's query head
    h = h_kv * GROUP + g: (i, h as int64, which rows exist). Divisions by constants, once per tile."""
    row = row_start + tl.arange(0, BLOCK_M)
    return row % ROWS_PER_HEAD, (h_kv * GROUP + row // ROWS_PER_HEAD).to(tl.int64), row < GROUP * ROWS_PER_HEAD


@triton.jit
def n_key_tiles(keys, BLOCK_N: tl.constexpr):
    return keys[3] * tl.cdiv(keys[4], BLOCK_N)


@triton.jit
def key_tile(keys, t, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             HAS_MASK: tl.constexpr):
    """Key tile t of the key set: K and V tiles, which keys are real, and the tile's run and key indices."""
    K, V, MASK, n_runs, run_len, skr, skn, skd, svr, svn, svd, smr, smn = keys
    per_run = tl.cdiv(run_len, BLOCK_N)
    run = (t // per_run).to(tl.int64)
    j = (t % per_run) * BLOCK_N + tl.arange(0, BLOCK_N)
    real = j < tl.where(run < n_runs, run_len, 0)  # a key set with no runs still has a tile 0: all masked
    j64 = j.to(tl.int64)
    k = load_tile(K + run * skr, j64 * skn, real, skd, HEAD_DIM, BLOCK_D)
    v = load_tile(V + run * svr, j64 * svn, real, svd, HEAD_DIM, BLOCK_D)
    if HAS_MASK:
        real = real & (tl.load(MASK + run * smr + j64 * smn, mask=real, other=0) != 0)
    return k, v, real, run, j


@triton.jit
def store_key_grads(grads, keys, run, j, dk, dv, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK and dV of the key tile (run, j) of the key set."""
    DK, DV, stride_run, stride_key, stride_d = grads
    rows = run * stride_run + j.to(tl.int64) * stride_key
    in_set = j < tl.where(run < keys[3], keys[4], 0)
    store_tile(DK, rows, in_set, stride_d, dk, HEAD_DIM, BLOCK_D)
    store_tile(DV, rows, in_set, stride_d, dv, HEAD_DIM, BLOCK_D)


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------

@triton.jit
def softmax_step(acc, m_i, l_i, q, k, v, key_real, qk_scale, IEEE_DOT: tl.constexpr):
    """One key tile of the online softmax: rescale the running sums to the new row maximum."""
    s = mma(q, tl.trans(k), None, IEEE_DOT) * qk_scale  # log2 units
    s = tl.where(key_real[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # rows that have seen no real key yet keep max -inf: subtract 0 instead, no NaN
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_sub[:, None])
    alpha = tl.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = mma(p.to(v.dtype), v, acc * alpha[:, None], IEEE_DOT)
    return acc, m_new, l_i


@triton.jit
def attend_keys(q, keys, qk_scale, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, IEEE_DOT: tl.constexpr):
    """The query tile q attends to every key of the key set, BLOCK_N at a time: (acc, row max, row sum)."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for t in range(0, n_key_tiles(keys, BLOCK_N)):
        k, v, key_real, _, _ = key_tile(keys, t, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_MASK)
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, q, k, v, key_real, qk_scale, IEEE_DOT)
    return acc, m_i, l_i


@triton.jit
def finish_rows(acc, m_i, l_i, row_real):
    """Output rows and lse (natural log); rows that are not real or saw no key: zeros and +inf."""
    has_key = row_real & (l_i > 0.0)
    l_safe = tl.where(has_key, l_i, 1.0)
    out = tl.where(has_key[:, None], acc * (1.0 / l_safe)[:, None], 0.0)
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * _LN2, float("inf"))
    return out, lse


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------

@triton.jit
def load_row_tile(Q, DO, O, LSE, q_rows, do_rows, o_rows, stat, row_real, stride_qd, stride_dod, stride_od,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Q and dO of a row tile, its lse in log2 units, and delta = rowsum(dO * O), the softmax correction."""
    q = load_tile(Q, q_rows, row_real, stride_qd, HEAD_DIM, BLOCK_D)
    do = load_tile(DO, do_rows, row_real, stride_dod, HEAD_DIM, BLOCK_D)
    o = load_tile(O, o_rows, row_real, stride_od, HEAD_DIM, BLOCK_D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse = tl.load(LSE + stat, mask=row_real, other=float("inf"))  # +inf: P = 0 for rows that are not real
    return q, do, lse * _LOG2E, delta


@triton.jit
def score_grads(q, do, lse2, delta, k, v, key_real, qk_scale, IEEE_DOT: tl.constexpr):
    """P = exp2(Q K^T * scale - lse) and dS = P * (dO V^T - delta) of a row tile x key tile (rows
    first, so lse and delta are per-row: a few registers), in the inputs' dtype (only matmul operands)."""
    p = tl.exp2(mma(q, tl.trans(k), None, IEEE_DOT) * qk_scale - lse2[:, None])
    p = tl.where(key_real[None, :], p, 0.0)
    ds = p * (mma(do, tl.trans(v), None, IEEE_DOT) - delta[:, None])
    return p.to(do.dtype), ds.to(q.dtype)


@triton.jit
def score_grads_t(q, do, lse2, delta, k, v, key_real, qk_scale, IEEE_DOT: tl.constexpr):
    """P^T and dS^T of a key tile x row tile (keys first, the way dK and dV accumulate)."""
    pt = tl.exp2(mma(k, tl.trans(q), None, IEEE_DOT) * qk_scale - lse2[None, :])
    pt = tl.where(key_real[:, None], pt, 0.0)
    dst = pt * (mma(v, tl.trans(do), None, IEEE_DOT) - delta[None, :])
    return pt.to(do.dtype), dst.to(q.dtype)


@triton.jit
def backward_tile(dk, dv, q, do, lse2, delta, k, v, key_real, qk_scale,
                  WANT_DQ: tl.constexpr, IEEE_DOT: tl.constexpr):
    """dK, dV plus this key tile x row tile's part of them, dV += P^T dO and dK += dS^T Q,
    and (if WANT_DQ) the tile's dQ = dS K; dK and dQ still lack the softmax scale."""
    pt, dst = score_grads_t(q, do, lse2, delta, k, v, key_real, qk_scale, IEEE_DOT)
    dv = mma(pt, do, dv, IEEE_DOT)
    dk = mma(dst, q, dk, IEEE_DOT)
    if WANT_DQ:
        dq = mma(tl.trans(dst), k, None, IEEE_DOT)
    else:
        dq = 0.0
    return dk, dv, dq


@triton.jit
def backward_keys(dq, q, do, lse2, delta, keys, grads, scale, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  HAS_MASK: tl.constexpr, IEEE_DOT: tl.constexpr):
    """Every query row of the key set is in (q, do): one sweep over the key tiles.

    Each key tile's dV and dK are complete here, so each is stored as soon as
    it is computed; dQ accumulates on chip and is returned.
    """
    DK, DV, stride_run, stride_key, stride_d = grads
    for t in range(0, n_key_tiles(keys, BLOCK_N)):
        k, v, key_real, run, j = key_tile(keys, t, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_MASK)
        p, ds = score_grads(q, do, lse2, delta, k, v, key_real, qk_scale, IEEE_DOT)
        dq = mma(ds, k, dq, IEEE_DOT)
        rows = run * stride_run + j.to(tl.int64) * stride_key
        in_set = j < keys[4]  # run < n_runs: this loop only visits the set's runs
        store_tile(DV, rows, in_set, stride_d, mma(tl.trans(p), do, None, IEEE_DOT), HEAD_DIM, BLOCK_D)
        store_tile(DK, rows, in_set, stride_d, mma(tl.trans(ds), q, None, IEEE_DOT) * scale, HEAD_DIM, BLOCK_D)
    return dq


@triton.jit
def dq_over_keys(q, do, lse2, delta, keys, qk_scale, BLOCK_M: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 HAS_MASK: tl.constexpr, IEEE_DOT: tl.constexpr):
    """dQ = dS K of one row tile over the key set (3 matmuls per key tile: S, dP, dQ)."""
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for t in range(0, n_key_tiles(keys, BLOCK_N)):
        k, v, key_real, _, _ = key_tile(keys, t, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_MASK)
        _, ds = score_grads(q, do, lse2, delta, k, v, key_real, qk_scale, IEEE_DOT)
        dq = mma(ds, k, dq, IEEE_DOT)
    return dq


@triton.jit
def backward_sweeps(keys, grads, rows, DQ, stride_dqd, scale, qk_scale, LOAD_ROWS: tl.constexpr,
                    GROUP: tl.constexpr, ROWS_PER_HEAD: tl.constexpr, R: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    SWEEP: tl.constexpr, DQ_TOO: tl.constexpr, HAS_MASK: tl.constexpr, IEEE_DOT: tl.constexpr):
    """The backward of one key set, its GROUP * ROWS_PER_HEAD query rows loaded by the op's
    LOAD_ROWS(row_start, rows, GROUP, ROWS_PER_HEAD, R, HAS_MASK, HEAD_DIM, BLOCK_M, BLOCK_D)
    -> (dq offsets from DQ, rows to store, Q, dO, lse (log2), delta). The sweeps (_common.backward_plan):

    "rows"  every row on chip: one sweep over the key tiles, dQ accumulates (5 matmuls);
    "keys"  key tiles outside, dK and dV on chip over the row tiles; with DQ_TOO one key tile
            holds every key, so each row tile's dQ is final too (5 matmuls), and the tile runs
            even for a key set with no keys (its dQ rows are zeros); without, dQ is left to
    "dq"    row tiles outside, dQ over every key tile (3 matmuls).
    """
    if SWEEP == "rows":
        dq_rows, dq_ok, q, do, lse2, delta = LOAD_ROWS(0, rows, GROUP, ROWS_PER_HEAD, R, HAS_MASK,
                                                       HEAD_DIM, BLOCK_M, BLOCK_D)
        dq = backward_keys(tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), q, do, lse2, delta, keys, grads,
                           scale, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_MASK, IEEE_DOT)
        store_tile(DQ, dq_rows, dq_ok, stride_dqd, dq * scale, HEAD_DIM, BLOCK_D)
    elif SWEEP == "keys":
        if DQ_TOO:
            n_tiles = 1
        else:
            n_tiles = n_key_tiles(keys, BLOCK_N)
        for t in range(0, n_tiles):
            k, v, key_real, run, j = key_tile(keys, t, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_MASK)
            dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for row_start in range(0, GROUP * ROWS_PER_HEAD, BLOCK_M):
                dq_rows, dq_ok, q, do, lse2, delta = LOAD_ROWS(row_start, rows, GROUP, ROWS_PER_HEAD, R, HAS_MASK,
                                                               HEAD_DIM, BLOCK_M, BLOCK_D)
                dk, dv, dq = backward_tile(dk, dv, q, do, lse2, delta, k, v, key_real, qk_scale, DQ_TOO, IEEE_DOT)
                if DQ_TOO:
                    store_tile(DQ, dq_rows, dq_ok, stride_dqd, dq * scale, HEAD_DIM, BLOCK_D)
            store_key_grads(grads, keys, run, j, dk * scale, dv, HEAD_DIM, BLOCK_D)
    else:
        for row_start in range(0, GROUP * ROWS_PER_HEAD, BLOCK_M):
            dq_rows, dq_ok, q, do, lse2, delta = LOAD_ROWS(row_start, rows, GROUP, ROWS_PER_HEAD, R, HAS_MASK,
                                                           HEAD_DIM, BLOCK_M, BLOCK_D)
            dq = dq_over_keys(q, do, lse2, delta, keys, qk_scale, BLOCK_M, HEAD_DIM, BLOCK_N, BLOCK_D,
                              HAS_MASK, IEEE_DOT)
            store_tile(DQ, dq_rows, dq_ok, stride_dqd, dq * scale, HEAD_DIM, BLOCK_D)
