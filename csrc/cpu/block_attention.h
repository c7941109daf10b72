// Dense attention of one block of query rows against one block of keys, forward and
// backward, for the neighbour-encoder kernels (each op maps its tasks onto blocks).
//
// A block: `rows` query rows (row stride ldq, unit stride on the head dim), `keys`
// key/value rows already as fp32 matrices, an optional key bias (0 / -inf), and
// optional per-row validity (padding query rows output zeros, lse = +inf, and so get
// zero gradients and contribute nothing to dk, dv). The score tile is processed
// BLOCK_ROWS rows at a time; every row sees all its keys at once.
#pragma once

#include "common.h"

#include <algorithm>
#include <vector>

namespace retro_kernels::cpu {

constexpr int64_t BLOCK_ROWS = 64;

// Per-thread scratch, sized once per parallel_for chunk.
struct BlockScratch {
  std::vector<float> scores, dscores, inv_sum, delta, q32, do32, o32, out32;
  BlockScratch(int64_t keys, int64_t D)
      : scores(BLOCK_ROWS * keys), dscores(BLOCK_ROWS * keys), inv_sum(BLOCK_ROWS), delta(BLOCK_ROWS),
        q32(BLOCK_ROWS * D), do32(BLOCK_ROWS * D), o32(BLOCK_ROWS * D), out32(BLOCK_ROWS * D) {}
};

// Row validity: nullptr (all rows real) or a bool per row with a stride.
struct RowValid {
  const bool* base = nullptr;
  int64_t stride = 0;
  bool operator()(int64_t i) const { return base == nullptr || base[i * stride]; }
};

// out rows (ldo, in scalar_t) and lse[0 .. rows) for one head: softmax(scale * Q K^T + bias) V.
// At least one key must be unmasked.
template <typename scalar_t>
void block_forward(const scalar_t* q, int64_t ldq, int64_t rows, const RowsF32& K, const RowsF32& V,
                   int64_t keys, int64_t D, const float* bias, RowValid valid, float scale,
                   scalar_t* out, int64_t ldo, float* lse, BlockScratch& s) {
  for (int64_t row = 0; row < rows; row += BLOCK_ROWS) {
    const int64_t n = std::min(BLOCK_ROWS, rows - row);
    const RowsF32 Q = rows_as_f32(q + row * ldq, n, D, ldq, s.q32.data());
    // S = Q K^T; P = softmax(scale * S + bias) over all keys of the row at once
    gemm(false, true, n, keys, D, 1.0f, Q.data, Q.ld, K.data, K.ld, 0.0f, s.scores.data(), keys);
    softmax_rows(s.scores.data(), n, keys, bias, scale, lse + row, s.inv_sum.data());
    // O = P V / sum; padding rows: zeros and lse = +inf (so the backward gives them nothing)
    for (int64_t i = 0; i < n; ++i) {
      if (!valid(row + i)) {
        s.inv_sum[i] = 0.0f;
        lse[row + i] = kInf;
      }
    }
    gemm(false, false, n, D, keys, 1.0f, s.scores.data(), keys, V.data, V.ld, 0.0f, s.out32.data(), D);
    scale_rows(s.out32.data(), n, D, D, s.inv_sum.data());
    store_rows(out + row * ldo, ldo, s.out32.data(), D, n, D);
  }
}

// One head's share of the backward: writes dq rows (lddq, scalar_t) and adds P^T dO to dV
// and scale * dS^T Q to dK (fp32, ld_kv). `accumulate` false: the first contribution
// overwrites dK and dV.
template <typename scalar_t>
void block_backward(const scalar_t* dout, int64_t lddo, const scalar_t* q, int64_t ldq,
                    const scalar_t* out, int64_t ldo, const float* lse, int64_t rows, const RowsF32& K,
                    const RowsF32& V, int64_t keys, int64_t D, const float* bias, float scale,
                    scalar_t* dq, int64_t lddq, float* dK, float* dV, int64_t ld_kv, bool accumulate,
                    BlockScratch& s) {
  for (int64_t row = 0; row < rows; row += BLOCK_ROWS) {
    const int64_t n = std::min(BLOCK_ROWS, rows - row);
    const float beta = (accumulate || row > 0) ? 1.0f : 0.0f;
    const RowsF32 Q = rows_as_f32(q + row * ldq, n, D, ldq, s.q32.data());
    const RowsF32 dO = rows_as_f32(dout + row * lddo, n, D, lddo, s.do32.data());
    const RowsF32 O = rows_as_f32(out + row * ldo, n, D, ldo, s.o32.data());
    // delta_i = rowsum(dO * O): the softmax-backward correction
    for (int64_t i = 0; i < n; ++i) s.delta[i] = dot(dO.data + i * dO.ld, O.data + i * O.ld, D);
    // P = exp(scale * Q K^T + bias - lse), recomputed (padding rows: lse = +inf, P = 0)
    gemm(false, true, n, keys, D, 1.0f, Q.data, Q.ld, K.data, K.ld, 0.0f, s.scores.data(), keys);
    probs_from_lse(s.scores.data(), n, keys, bias, scale, lse + row);
    // dV += P^T dO
    gemm(true, false, keys, D, n, 1.0f, s.scores.data(), keys, dO.data, dO.ld, beta, dV, ld_kv);
    // dP = dO V^T; dS = P * (dP - delta)
    gemm(false, true, n, keys, D, 1.0f, dO.data, dO.ld, V.data, V.ld, 0.0f, s.dscores.data(), keys);
    softmax_grad(s.dscores.data(), s.scores.data(), n, keys, s.delta.data());
    // dQ = scale * dS K
    gemm(false, false, n, D, keys, scale, s.dscores.data(), keys, K.data, K.ld, 0.0f, s.out32.data(), D);
    store_rows(dq + row * lddq, lddq, s.out32.data(), D, n, D);
    // dK += scale * dS^T Q
    gemm(true, false, keys, D, n, scale, s.dscores.data(), keys, Q.data, Q.ld, beta, dK, ld_kv);
  }
}

// Key bias from a bool mask row (stride in elements): 0 for a real key, -inf for a masked one.
// Returns the number of real keys; without a mask returns `keys` and leaves bias alone.
inline int64_t bias_from_mask(const bool* mask, int64_t stride, int64_t keys, float* bias) {
  if (mask == nullptr) return keys;
  int64_t real = 0;
  for (int64_t j = 0; j < keys; ++j) {
    const bool ok = mask[j * stride];
    bias[j] = ok ? 0.0f : -kInf;
    real += ok;
  }
  return real;
}

}  // namespace retro_kernels::cpu
