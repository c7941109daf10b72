// A small row-major fp32 GEMM for AVX2 + FMA. The products of the attention kernels
// (a few dozen to a few hundred rows, columns and depth; 64 x 256 x 64 at the paper's
// shapes) are too small for a BLAS to amortise its blocking and packing of both
// operands: on Zen3 MKL reaches ~70-77 GFLOP/s per core on them, this one ~80-88.
//
//   C (M x N, ldc) = alpha * op(A) op(B) + beta * C
//
// The micro-kernel holds an MR x NR = 6 x 16 tile of C in 12 ymm registers. Each
// step of the depth loop loads one row of the B panel (16 floats, two ymm), broadcasts
// the MR values of op(A)'s column k and does 12 FMAs: 2 loads + 6 broadcasts per 12 FMAs,
// so the two FMA pipes, not the loads, set the pace. op(A) is read through two strides
// (a_row between rows, a_k along the depth), which covers A (a_row = lda, a_k = 1) and
// A^T (a_row = 1, a_k = lda) without a copy. op(B) is packed first (a copy of K x N
// floats, against M x N x K FMAs) into contiguous K x NR column panels, transposing
// it on the way when op(B) = B^T; so the kernel sees one layout of B for every case.
//
// Every element of C is one chain of FMAs in depth order 0 .. K-1, then alpha (and
// beta * C): the same bits for the same inputs, whatever the tiling or the thread.
//
// Compiled for AVX2 + FMA through function attributes only (no -march), and called only
// when the running CPU has both (see backend() in common.cpp).
#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <vector>

#define RK_AVX2 __attribute__((target("avx2,fma")))

namespace retro_kernels::cpu {
namespace {

constexpr int64_t MR = 6;   // rows of the C tile: 6 x 2 accumulators + 2 B loads + 1 broadcast <= 16 ymm
constexpr int64_t NR = 16;  // columns of the C tile: two ymm
constexpr int64_t PREFETCH_LINES = 12;  // prefetches of the caller's next operands per tile

// Lane masks for the last columns of a row: lanes < n are on.
RK_AVX2 inline __m256i lanes_below(int64_t n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane);
}

// C[0:ROWS, 0:cols] = alpha * op(A)[0:ROWS, :] panel (+ beta * C), cols <= NR, where
// `panel` is K x NR, contiguous (one packed column panel of B, zero-padded past cols).
// FULL: cols == NR, plain stores; otherwise masked ones (no read or write past column
// cols, which may be the end of an allocation).
template <int ROWS, bool FULL>
RK_AVX2 void micro_kernel(int64_t K, int64_t cols, float alpha, const float* A, int64_t a_row,
                          int64_t a_k, const float* panel, float beta, float* C, int64_t ldc) {
  __m256 acc_lo[ROWS], acc_hi[ROWS];  // fully unrolled below, so these live in registers
#pragma GCC unroll 6
  for (int i = 0; i < ROWS; ++i) acc_lo[i] = acc_hi[i] = _mm256_setzero_ps();

  // depth loop: one rank-1 update of the tile per k
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b_lo = _mm256_loadu_ps(panel + k * NR);
    const __m256 b_hi = _mm256_loadu_ps(panel + k * NR + 8);
    const float* a = A + k * a_k;
#pragma GCC unroll 6
    for (int i = 0; i < ROWS; ++i) {
      const __m256 a_ik = _mm256_broadcast_ss(a + i * a_row);
      acc_lo[i] = _mm256_fmadd_ps(a_ik, b_lo, acc_lo[i]);
      acc_hi[i] = _mm256_fmadd_ps(a_ik, b_hi, acc_hi[i]);
    }
  }

  // epilogue: C = alpha * acc (+ beta * C); with beta == 0, C is never read
  const __m256i mask_lo = FULL ? _mm256_set1_epi32(-1) : lanes_below(cols);
  const __m256i mask_hi = FULL ? _mm256_set1_epi32(-1) : lanes_below(cols - 8);
  const __m256 alpha_v = _mm256_set1_ps(alpha), beta_v = _mm256_set1_ps(beta);
#pragma GCC unroll 6
  for (int i = 0; i < ROWS; ++i) {
    float* c = C + i * ldc;
    __m256 lo = _mm256_mul_ps(alpha_v, acc_lo[i]), hi = _mm256_mul_ps(alpha_v, acc_hi[i]);
    if (FULL) {
      if (beta != 0.0f) {
        lo = _mm256_fmadd_ps(beta_v, _mm256_loadu_ps(c), lo);
        hi = _mm256_fmadd_ps(beta_v, _mm256_loadu_ps(c + 8), hi);
      }
      _mm256_storeu_ps(c, lo);
      _mm256_storeu_ps(c + 8, hi);
    } else {
      if (beta != 0.0f) {
        lo = _mm256_fmadd_ps(beta_v, _mm256_maskload_ps(c, mask_lo), lo);
        hi = _mm256_fmadd_ps(beta_v, _mm256_maskload_ps(c + 8, mask_hi), hi);
      }
      _mm256_maskstore_ps(c, mask_lo, lo);
      _mm256_maskstore_ps(c + 8, mask_hi, hi);
    }
  }
}

// One MR x NR (or smaller) tile, with the row count as a template argument so that the
// accumulators stay in registers.
template <bool FULL>
RK_AVX2 void tile(int64_t rows, int64_t K, int64_t cols, float alpha, const float* A, int64_t a_row,
                  int64_t a_k, const float* panel, float beta, float* C, int64_t ldc) {
  switch (rows) {
    case 6: micro_kernel<6, FULL>(K, cols, alpha, A, a_row, a_k, panel, beta, C, ldc); break;
    case 5: micro_kernel<5, FULL>(K, cols, alpha, A, a_row, a_k, panel, beta, C, ldc); break;
    case 4: micro_kernel<4, FULL>(K, cols, alpha, A, a_row, a_k, panel, beta, C, ldc); break;
    case 3: micro_kernel<3, FULL>(K, cols, alpha, A, a_row, a_k, panel, beta, C, ldc); break;
    case 2: micro_kernel<2, FULL>(K, cols, alpha, A, a_row, a_k, panel, beta, C, ldc); break;
    default: micro_kernel<1, FULL>(K, cols, alpha, A, a_row, a_k, panel, beta, C, ldc); break;
  }
}

// Packing: op(B) (K x N) into column panels of NR, each K x NR contiguous, the last one
// zero-padded. The panel is what the micro-kernel streams through for every row tile,
// so it must stay in L1: rows of B itself are often 2 KB apart (one head of a
// (tokens, heads, dim) tensor), and 2 KB strides fall into only two L1 sets.

// op(B) = B, row-major K x N (ld ldb). Row by row, so that each row of B (often a page
// of its own) is visited once.
RK_AVX2 void pack_b(const float* B, int64_t ldb, int64_t K, int64_t N, float* packed) {
  const int64_t full = N / NR, tail = N - full * NR;
  const __m256i mask_lo = lanes_below(tail), mask_hi = lanes_below(tail - 8);
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    float* dst = packed + k * NR;
    for (int64_t p = 0; p < full; ++p, b += NR, dst += K * NR) {
      _mm256_storeu_ps(dst, _mm256_loadu_ps(b));
      _mm256_storeu_ps(dst + 8, _mm256_loadu_ps(b + 8));
    }
    if (tail > 0) {  // the last, zero-padded panel
      _mm256_storeu_ps(dst, _mm256_maskload_ps(b, mask_lo));
      _mm256_storeu_ps(dst + 8, _mm256_maskload_ps(b + 8, mask_hi));
    }
  }
}

// r[t] <- column t of the 8 x 8 block in r (rows r[0..7]).
RK_AVX2 inline void transpose8x8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// op(B) = B^T, B stored N x K (ld ldb): 8 x 8 blocks transposed in registers, the
// ragged edges element by element.
RK_AVX2 void pack_b_transposed(const float* B, int64_t ldb, int64_t K, int64_t N, float* packed) {
  for (int64_t j0 = 0; j0 < N; j0 += NR, packed += K * NR) {
    const int64_t cols = std::min(NR, N - j0);
    for (int64_t jj = 0; jj < NR; jj += 8) {
      int64_t k = 0;
      if (jj + 8 <= cols) {
        for (; k + 8 <= K; k += 8) {
          __m256 r[8];
#pragma GCC unroll 8
          for (int t = 0; t < 8; ++t) r[t] = _mm256_loadu_ps(B + (j0 + jj + t) * ldb + k);
          transpose8x8(r);
#pragma GCC unroll 8
          for (int t = 0; t < 8; ++t) _mm256_storeu_ps(packed + (k + t) * NR + jj, r[t]);
        }
      }
      for (; k < K; ++k)
        for (int64_t t = jj; t < jj + 8; ++t) packed[k * NR + t] = t < cols ? B[(j0 + t) * ldb + k] : 0.0f;
    }
  }
}

}  // namespace

RK_AVX2 void gemm_avx2(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                       const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                       int64_t ldc, PrefetchQueue* prefetch) {
  // op(B) into column panels (per-thread buffer, reused across calls)
  thread_local std::vector<float> packed;
  const int64_t panels = (N + NR - 1) / NR;
  if (static_cast<int64_t>(packed.size()) < panels * K * NR) packed.resize(panels * K * NR);
  if (trans_b)
    pack_b_transposed(B, ldb, K, N, packed.data());
  else
    pack_b(B, ldb, K, N, packed.data());
  const int64_t a_row = trans_a ? 1 : lda, a_k = trans_a ? lda : 1;

  // Column panels outside, row tiles inside: one K x NR panel of B stays in L1 while
  // the MR-row tiles of op(A) stream past it. Between tiles, a few prefetches of the
  // caller's next operands (see PrefetchQueue in common.h).
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t j = p * NR, cols = std::min(NR, N - j);
    const float* panel = packed.data() + p * K * NR;
    for (int64_t i = 0; i < M; i += MR) {
      const int64_t rows = std::min(MR, M - i);
      const float* a = A + i * a_row;
      if (prefetch != nullptr) prefetch->step(PREFETCH_LINES);
      if (cols == NR)
        tile<true>(rows, K, cols, alpha, a, a_row, a_k, panel, beta, C + i * ldc + j, ldc);
      else
        tile<false>(rows, K, cols, alpha, a, a_row, a_k, panel, beta, C + i * ldc + j, ldc);
    }
  }
}

}  // namespace retro_kernels::cpu

#endif  // x86-64 GCC/Clang
