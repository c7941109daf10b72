// A small row-major fp32 GEMM for AVX2 + FMA: the products of the attention kernels
// (a few dozen to a few hundred rows, columns and depth) are too small for a BLAS to
// amortise its packing, so this one reads A and B where they lie.
//
//   C (M x N, ldc) = alpha * op(A) op(B) + beta * C
//
// The micro-kernel holds an MR x NR = 6 x 16 tile of C in 12 ymm registers. Each
// step of the depth loop loads one row of the B panel (16 floats, two ymm), broadcasts
// the MR values of op(A)'s column k and does 12 FMAs: 2 loads + 6 broadcasts per 12 FMAs,
// so the two FMA pipes, not the loads, set the pace. op(A) is read through two strides
// (a_row between rows, a_k along the depth), which covers A (a_row = lda, a_k = 1) and
// A^T (a_row = 1, a_k = lda) without a copy. op(B) = B^T is first transposed into a
// per-thread buffer, so the kernel itself only ever sees a K x N row-major B.
//
// Every element of C is one chain of FMAs in depth order 0 .. K-1, then alpha (and
// beta * C): the same bits for the same inputs, whatever the tiling or the thread.
//
// Compiled for AVX2 + FMA through function attributes only (no -march), and called only
// when the running CPU has both (see use_avx2() in common.cpp).
#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <vector>

#define RK_AVX2 __attribute__((target("avx2,fma")))

namespace retro_kernels::cpu {
namespace {

constexpr int64_t MR = 6;   // rows of the C tile: 6 x 2 accumulators + 2 B loads + 1 broadcast <= 16 ymm
constexpr int64_t NR = 16;  // columns of the C tile: two ymm

// Lane masks for the last columns of a row: lanes < n are on.
RK_AVX2 inline __m256i lanes_below(int64_t n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane);
}

// C[0:ROWS, 0:cols] (= or +=) alpha * op(A)[0:ROWS, :] B[:, 0:cols], cols <= NR.
// FULL: cols == NR, plain loads and stores; otherwise masked ones (no read or write
// past column cols, which may be the end of an allocation).
template <int ROWS, bool FULL>
RK_AVX2 void micro_kernel(int64_t K, int64_t cols, float alpha, const float* A, int64_t a_row,
                          int64_t a_k, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const __m256i mask_lo = FULL ? _mm256_set1_epi32(-1) : lanes_below(cols);
  const __m256i mask_hi = FULL ? _mm256_set1_epi32(-1) : lanes_below(cols - 8);
  __m256 acc_lo[ROWS], acc_hi[ROWS];
#pragma GCC unroll 6
  for (int i = 0; i < ROWS; ++i) acc_lo[i] = acc_hi[i] = _mm256_setzero_ps();

  // depth loop: one rank-1 update of the tile per k
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    const __m256 b_lo = FULL ? _mm256_loadu_ps(b) : _mm256_maskload_ps(b, mask_lo);
    const __m256 b_hi = FULL ? _mm256_loadu_ps(b + 8) : _mm256_maskload_ps(b + 8, mask_hi);
    const float* a = A + k * a_k;
#pragma GCC unroll 6
    for (int i = 0; i < ROWS; ++i) {
      const __m256 a_ik = _mm256_broadcast_ss(a + i * a_row);
      acc_lo[i] = _mm256_fmadd_ps(a_ik, b_lo, acc_lo[i]);
      acc_hi[i] = _mm256_fmadd_ps(a_ik, b_hi, acc_hi[i]);
    }
  }

  // epilogue: C = alpha * acc (+ beta * C); with beta == 0, C is never read
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

// One MR x NR (or narrower) tile, with the row count as a template argument so that the
// accumulators stay in registers.
template <bool FULL>
RK_AVX2 void tile(int64_t rows, int64_t K, int64_t cols, float alpha, const float* A, int64_t a_row,
                  int64_t a_k, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  switch (rows) {
    case 6: micro_kernel<6, FULL>(K, cols, alpha, A, a_row, a_k, B, ldb, beta, C, ldc); break;
    case 5: micro_kernel<5, FULL>(K, cols, alpha, A, a_row, a_k, B, ldb, beta, C, ldc); break;
    case 4: micro_kernel<4, FULL>(K, cols, alpha, A, a_row, a_k, B, ldb, beta, C, ldc); break;
    case 3: micro_kernel<3, FULL>(K, cols, alpha, A, a_row, a_k, B, ldb, beta, C, ldc); break;
    case 2: micro_kernel<2, FULL>(K, cols, alpha, A, a_row, a_k, B, ldb, beta, C, ldc); break;
    default: micro_kernel<1, FULL>(K, cols, alpha, A, a_row, a_k, B, ldb, beta, C, ldc); break;
  }
}

// dst (K x N, ld = N) <- src^T, src being N x K with leading dim lds. In 8 x 8 blocks, so
// that both the reads and the writes touch few cache lines at a time.
RK_AVX2 void transpose(const float* src, int64_t lds, int64_t N, int64_t K, float* dst) {
  constexpr int64_t T = 8;
  for (int64_t j0 = 0; j0 < N; j0 += T) {
    const int64_t j1 = std::min(j0 + T, N);
    for (int64_t k0 = 0; k0 < K; k0 += T) {
      const int64_t k1 = std::min(k0 + T, K);
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t j = j0; j < j1; ++j) dst[k * N + j] = src[j * lds + k];
    }
  }
}

}  // namespace

RK_AVX2 void gemm_avx2(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                       const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                       int64_t ldc) {
  // op(B) = B^T: make it K x N row-major once (per-thread buffer, reused across calls)
  if (trans_b) {
    thread_local std::vector<float> b_t;
    if (static_cast<int64_t>(b_t.size()) < K * N) b_t.resize(K * N);
    transpose(B, ldb, N, K, b_t.data());
    B = b_t.data();
    ldb = N;
  }
  const int64_t a_row = trans_a ? 1 : lda, a_k = trans_a ? lda : 1;

  // Column panels outside, row tiles inside: the K x NR panel of B stays in L1 while
  // the MR-row tiles of op(A) stream past it.
  for (int64_t j = 0; j < N; j += NR) {
    const int64_t cols = std::min(NR, N - j);
    for (int64_t i = 0; i < M; i += MR) {
      const int64_t rows = std::min(MR, M - i);
      const float* a = A + i * a_row;
      if (cols == NR)
        tile<true>(rows, K, cols, alpha, a, a_row, a_k, B + j, ldb, beta, C + i * ldc + j, ldc);
      else
        tile<false>(rows, K, cols, alpha, a, a_row, a_k, B + j, ldb, beta, C + i * ldc + j, ldc);
    }
  }
}

}  // namespace retro_kernels::cpu

#endif  // x86-64 GCC/Clang
