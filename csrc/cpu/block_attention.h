// Dense attention of a set of query rows against a set of keys, forward and backward:
// the one routine under all three CPU kernels (chunked_cross_attention.cpp,
// neighbour_attention.cpp), which differ only in how they map tasks onto these sets.
//
// Masked tokens are dropped before any arithmetic: a kernel lists the real rows (an
// index) and the routine packs them, so a masked key or query takes no part whatever it
// holds (NaN included), and a mask that hides 30% of the tokens saves 30% of the work.
// The kept rows form dense fp32 tiles: S = scale * Q K^T (the scale in the GEMM's
// epilogue), one softmax over the whole row (every key of the set fits, so no online
// rescaling), O = P V / sum. Query rows go BLOCK_ROWS at a time.
//
// Backward per block: P recomputed from the scores (softmax_probs: the same passes as
// the forward, not exp(S - lse), which fails for huge scores), dV += P^T dO,
// dP = dO V^T, dS = P * (dP - rowsum(P * dP)), dQ = scale * dS K, dK += scale * dS^T Q.
// dK and dV accumulate over the caller's query rows and heads in a fixed order.
#pragma once

#include "common.h"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace retro_kernels::cpu {

constexpr int64_t BLOCK_ROWS = 64;  // query rows per score tile

// Rows of one operand: row t is at base + (index ? index[t] : t) * ld, unit stride along D.
template <typename T>
struct RowSet {
  T* base;
  int64_t ld;
  const int64_t* index = nullptr;  // nullptr: rows 0, 1, 2, ...
  T* row(int64_t t) const { return base + (index != nullptr ? index[t] : t) * ld; }
};

// The real rows of a tile: `count` of them, either one run first .. first+count-1
// (index nullptr: read in place, no copy; the usual case, padding at the end) or the
// positions index[0 .. count) (packed on reading).
struct RealRows {
  int64_t count = 0, first = 0;
  const int64_t* index = nullptr;
  // the rows of a tensor at `base` (row stride ld) that these select
  template <typename T>
  RowSet<T> of(T* base, int64_t ld) const {
    return {index != nullptr ? base : base + first * ld, ld, index};
  }
};

// The real rows of a mask laid out as (outer, inner) with the given strides, at
// positions o * inner + i; `scratch` (outer * inner) holds their index when they are
// not one run. Without a mask every row is real.
inline RealRows real_rows(const bool* mask, int64_t outer, int64_t outer_stride, int64_t inner,
                          int64_t inner_stride, int64_t* scratch) {
  if (mask == nullptr) return {outer * inner, 0, nullptr};
  int64_t count = 0;
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t i = 0; i < inner; ++i)
      if (mask[o * outer_stride + i * inner_stride]) scratch[count++] = o * inner + i;
  if (count == 0) return {};
  if (scratch[count - 1] - scratch[0] == count - 1) return {count, scratch[0], nullptr};
  return {count, 0, scratch};
}

// Rows first .. first+n-1 of `rows` as an fp32 matrix: the tensor's own memory when it is
// fp32 and not indexed, else a packed (converted) copy in `scratch` (ld = D).
template <typename scalar_t>
RowsF32 gather_rows(const RowSet<const scalar_t>& rows, int64_t first, int64_t n, int64_t D, float* scratch) {
  if (rows.index == nullptr) return rows_as_f32(rows.base + first * rows.ld, n, D, rows.ld, scratch);
  for (int64_t t = 0; t < n; ++t) load_rows(scratch + t * D, rows.row(first + t), 1, D, D);
  return {scratch, D};
}

// rows first .. first+n-1 of `dst` <- src (n x D, ld src_ld), rounded to scalar_t.
template <typename scalar_t>
void scatter_rows(const RowSet<scalar_t>& dst, int64_t first, int64_t n, const float* src, int64_t src_ld,
                  int64_t D) {
  if (dst.index == nullptr) return store_rows(dst.base + first * dst.ld, dst.ld, src, src_ld, n, D);
  for (int64_t t = 0; t < n; ++t) store_rows(dst.row(first + t), dst.ld, src + t * src_ld, src_ld, 1, D);
}

// Per-thread scratch for tasks of up to `keys` keys and head dim D.
struct AttendScratch {
  AlignedFloats scores, dscores, stats, q32, do32, o32, k32, v32, dk32, dv32;
  std::vector<int64_t> key_index;
  AttendScratch(int64_t keys, int64_t D)
      : scores(BLOCK_ROWS * keys), dscores(BLOCK_ROWS * keys), stats(2 * BLOCK_ROWS), q32(BLOCK_ROWS * D),
        do32(BLOCK_ROWS * D), o32(BLOCK_ROWS * D), k32(keys * D), v32(keys * D), dk32(keys * D),
        dv32(keys * D), key_index(keys) {}
};

// The real keys of a task as fp32 rows: the tensor's own memory (fp32, one run), else
// a packed (converted) copy in `scratch`.
template <typename scalar_t>
RowsF32 key_rows(const scalar_t* src, int64_t ld, const RealRows& real, int64_t D, float* scratch) {
  return gather_rows(real.of(src, ld), 0, real.count, D, scratch);
}

// out rows and lse of one head: softmax(scale * Q K^T) V over the n_keys keys, for the
// n_rows rows of q (out and lse indexed like q; lse ld is 1).
template <typename scalar_t>
void attend_forward(const RowSet<const scalar_t>& q, int64_t n_rows, const RowsF32& K, const RowsF32& V,
                    int64_t n_keys, int64_t D, float scale, const RowSet<scalar_t>& out, const RowSet<float>& lse,
                    AttendScratch& s, PrefetchQueue* prefetch) {
  float* scores = s.scores.data();
  float* block_lse = s.stats.data();
  float* inv_sum = s.stats.data() + BLOCK_ROWS;
  // O straight into out when it is fp32 rows at one stride, else staged in fp32
  const bool direct = std::is_same_v<scalar_t, float> && out.index == nullptr;
  for (int64_t row = 0; row < n_rows; row += BLOCK_ROWS) {
    const int64_t n = std::min(BLOCK_ROWS, n_rows - row);
    const RowsF32 Q = gather_rows(q, row, n, D, s.q32.data());
    // S = scale * Q K^T; P = exp(S - max) over the whole row (every key at once)
    gemm(false, true, n, n_keys, D, scale, Q.data, Q.ld, K.data, K.ld, 0.0f, scores, n_keys, prefetch);
    softmax_rows(scores, n, n_keys, block_lse, inv_sum);
    for (int64_t i = 0; i < n; ++i) *lse.row(row + i) = block_lse[i];
    // O = P V / sum
    float* o = direct ? reinterpret_cast<float*>(out.row(row)) : s.o32.data();
    const int64_t ldo = direct ? out.ld : D;
    gemm(false, false, n, D, n_keys, 1.0f, scores, n_keys, V.data, V.ld, 0.0f, o, ldo, prefetch);
    scale_rows(o, n, D, ldo, inv_sum);
    if (!direct) scatter_rows(out, row, n, o, D, D);
  }
}

// One head's share of the backward: writes the dq rows (indexed like q and dout) and adds
// P^T dO to dV and scale * dS^T Q to dK (fp32, n_keys x D, ld ld_kv). `accumulate`
// false: the first product overwrites dK and dV.
template <typename scalar_t>
void attend_backward(const RowSet<const scalar_t>& q, const RowSet<const scalar_t>& dout, int64_t n_rows,
                     const RowsF32& K, const RowsF32& V, int64_t n_keys, int64_t D, float scale,
                     const RowSet<scalar_t>& dq, float* dK, float* dV, int64_t ld_kv, bool accumulate,
                     AttendScratch& s, PrefetchQueue* prefetch) {
  float* probs = s.scores.data();
  float* dscores = s.dscores.data();
  const bool direct = std::is_same_v<scalar_t, float> && dq.index == nullptr;
  for (int64_t row = 0; row < n_rows; row += BLOCK_ROWS) {
    const int64_t n = std::min(BLOCK_ROWS, n_rows - row);
    const float beta = (accumulate || row > 0) ? 1.0f : 0.0f;
    const RowsF32 Q = gather_rows(q, row, n, D, s.q32.data());
    const RowsF32 dO = gather_rows(dout, row, n, D, s.do32.data());
    // P = softmax(scale * Q K^T), recomputed
    gemm(false, true, n, n_keys, D, scale, Q.data, Q.ld, K.data, K.ld, 0.0f, probs, n_keys, prefetch);
    softmax_probs(probs, n, n_keys);
    // dV += P^T dO
    gemm(true, false, n_keys, D, n, 1.0f, probs, n_keys, dO.data, dO.ld, beta, dV, ld_kv, prefetch);
    // dP = dO V^T; dS = P * (dP - rowsum(P * dP))
    gemm(false, true, n, n_keys, D, 1.0f, dO.data, dO.ld, V.data, V.ld, 0.0f, dscores, n_keys, prefetch);
    softmax_grad(dscores, probs, n, n_keys);
    // dQ = scale * dS K: each dq row has this one writer
    float* g = direct ? reinterpret_cast<float*>(dq.row(row)) : s.o32.data();
    const int64_t ldg = direct ? dq.ld : D;
    gemm(false, false, n, D, n_keys, scale, dscores, n_keys, K.data, K.ld, 0.0f, g, ldg, prefetch);
    if (!direct) scatter_rows(dq, row, n, g, D, D);
    // dK += scale * dS^T Q
    gemm(true, false, n_keys, D, n, scale, dscores, n_keys, Q.data, Q.ld, beta, dK, ld_kv, prefetch);
  }
}

// Where a task accumulates dK and dV of its real keys: the outputs themselves when they
// are fp32 and the real keys one run, else fp32 scratch (ld D) that store_key_grads
// writes out.
struct KeyGrads {
  float* dK;
  float* dV;
  int64_t ld;
  bool in_place;
};

template <typename scalar_t>
KeyGrads key_grads(scalar_t* dk_rows, scalar_t* dv_rows, int64_t ld_out, const RealRows& real, int64_t D,
                   AttendScratch& s) {
  if (std::is_same_v<scalar_t, float> && real.index == nullptr) {
    const int64_t first = real.first * ld_out;
    return {reinterpret_cast<float*>(dk_rows + first), reinterpret_cast<float*>(dv_rows + first), ld_out, true};
  }
  return {s.dk32.data(), s.dv32.data(), D, false};
}

// dk, dv rows (ld ld_out) of a task's `keys` keys <- the gradients accumulated for its
// real ones; the others (masked: they took no part) get zeros.
template <typename scalar_t>
void store_key_grads(const KeyGrads& g, scalar_t* dk_rows, scalar_t* dv_rows, int64_t ld_out, int64_t keys,
                     const RealRows& real, int64_t D) {
  for (scalar_t* rows : {dk_rows, dv_rows}) {
    if (real.index != nullptr) {
      zero_rows(rows, ld_out, keys, D);
    } else {  // before and after the run
      zero_rows(rows, ld_out, real.first, D);
      zero_rows(rows + (real.first + real.count) * ld_out, ld_out, keys - real.first - real.count, D);
    }
  }
  if (g.in_place) return;
  scatter_rows(real.of(dk_rows, ld_out), 0, real.count, g.dK, D, D);
  scatter_rows(real.of(dv_rows, ld_out), 0, real.count, g.dV, D, D);
}

// Runs tasks 0 .. tasks-1 on torch's threads, handed out one at a time (TaskQueue), each
// thread with its own Worker (make_worker()): worker.prefetch(task, queue) lists the rows
// of the thread's next task, loaded while worker.run(task, queue) computes this one.
template <class MakeWorker>
void run_tasks(int64_t tasks, const MakeWorker& make_worker) {
  TaskQueue queue(tasks);
  at::parallel_for(0, queue.workers(), 1, [&](int64_t, int64_t) {
    auto worker = make_worker();
    PrefetchQueue prefetch;
    for (int64_t task = queue.next(), next = queue.next(); task >= 0; task = next, next = queue.next()) {
      prefetch.clear();
      if (next >= 0) worker.prefetch(next, prefetch);
      worker.run(task, prefetch);
    }
  });
}

}  // namespace retro_kernels::cpu
