// The AVX2 + FMA candidate of gemm() (see gemm.h; packing and the tile loop: gemm_tiles.h).
// On Zen3 it beats MKL on the attention kernels' tiles (~80-88 GFLOP/s per core against
// ~70-77); elsewhere it may not, which is why gemm() measures.
//
// The micro-kernel holds an MR x NR = 6 x 16 tile of C in 12 ymm registers. Each step of
// the depth loop loads one row of the B panel (16 floats, two ymm), broadcasts the MR
// values of op(A)'s column k and does 12 FMAs: 2 loads + 6 broadcasts per 12 FMAs, so
// the two FMA pipes, not the loads, set the pace.
//
// Compiled for AVX2 + FMA through function attributes only (no -march), and called only
// when the running CPU has both (gemm_kind_available in gemm.cpp).
#include "gemm.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define RK_TILE_TARGET __attribute__((target("avx2,fma")))
#include "gemm_tiles.h"

namespace retro_kernels::cpu {
namespace {

constexpr int64_t MR = 6;   // rows of the C tile: 6 x 2 accumulators + 2 B loads + 1 broadcast <= 16 ymm
constexpr int64_t NR = 16;  // columns of the C tile: two ymm
constexpr int64_t PREFETCH_LINES = 12;  // prefetches of the caller's next operands per tile

// C[0:ROWS, 0:cols] = alpha * op(A)[0:ROWS, :] panel (+ beta * C), cols <= NR. FULL:
// cols == NR, plain stores; otherwise masked ones (no read or write past column cols,
// which may be the end of an allocation).
template <int ROWS, bool FULL>
RK_TILE_TARGET void micro_kernel(int64_t K, int64_t cols, float alpha, const float* A, int64_t a_row,
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

// One tile of up to MR rows, the row count a template argument so that the accumulators
// stay in registers.
struct Avx2Tile {
  template <bool FULL>
  RK_TILE_TARGET static void run(int64_t rows, int64_t K, int64_t cols, float alpha, const float* A,
                                 int64_t a_row, int64_t a_k, const float* panel, float beta, float* C,
                                 int64_t ldc) {
    switch (rows) {
      case 6: return micro_kernel<6, FULL>(K, cols, alpha, A, a_row, a_k, panel, beta, C, ldc);
      case 5: return micro_kernel<5, FULL>(K, cols, alpha, A, a_row, a_k, panel, beta, C, ldc);
      case 4: return micro_kernel<4, FULL>(K, cols, alpha, A, a_row, a_k, panel, beta, C, ldc);
      case 3: return micro_kernel<3, FULL>(K, cols, alpha, A, a_row, a_k, panel, beta, C, ldc);
      case 2: return micro_kernel<2, FULL>(K, cols, alpha, A, a_row, a_k, panel, beta, C, ldc);
      default: return micro_kernel<1, FULL>(K, cols, alpha, A, a_row, a_k, panel, beta, C, ldc);
    }
  }
};

}  // namespace

RK_TILE_TARGET void gemm_avx2(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                              const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                              int64_t ldc, PrefetchQueue* prefetch) {
  gemm_tiles<MR, NR, Avx2Tile>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, prefetch,
                               PREFETCH_LINES);
}

}  // namespace retro_kernels::cpu

#endif  // x86-64 GCC/Clang
