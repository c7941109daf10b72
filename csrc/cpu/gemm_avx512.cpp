// The AVX-512F candidate of gemm() (see gemm.h; packing and the tile loop: gemm_tiles.h).
//
// The micro-kernel holds an MR x NR = 8 x 32 tile of C in 16 zmm registers (of 32). Each
// step of the depth loop loads one row of the B panel (32 floats, two zmm), broadcasts
// the MR values of op(A)'s column k and does 16 FMAs: 2 loads + 8 broadcasts per 16 FMAs.
// Against the AVX2 kernel that is twice the work per instruction: on CPUs with two
// 512-bit FMA pipes (Intel Skylake-SP and later) twice the peak; on AMD Zen4, which splits
// each 512-bit FMA in two, the same peak with half the instructions and fewer loads.
// Column tails use AVX-512 lane masks; 64 rows (the kernels' row blocks) are 8 tiles.
//
// Compiled for AVX-512F through function attributes only (no -march), and called only
// when the running CPU has it (gemm_kind_available in gemm.cpp).
#include "gemm.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define RK_TILE_TARGET __attribute__((target("avx512f,avx2,fma")))
#include "gemm_tiles.h"

namespace retro_kernels::cpu {
namespace {

constexpr int64_t MR = 8;   // rows of the C tile: 8 x 2 accumulators
constexpr int64_t NR = 32;  // columns of the C tile: two zmm
constexpr int64_t PREFETCH_LINES = 32;  // per tile (2.7x the AVX2 tile's work, so more lines)

// Lanes < n of a 16-lane vector (none when n <= 0).
RK_TILE_TARGET inline __mmask16 lanes_below16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

// C[0:ROWS, 0:cols] = alpha * op(A)[0:ROWS, :] panel (+ beta * C), cols <= NR. FULL:
// cols == NR, plain stores; otherwise masked ones (no read or write past column cols).
template <int ROWS, bool FULL>
RK_TILE_TARGET void micro_kernel(int64_t K, int64_t cols, float alpha, const float* A, int64_t a_row,
                                 int64_t a_k, const float* panel, float beta, float* C, int64_t ldc) {
  __m512 acc_lo[ROWS], acc_hi[ROWS];  // fully unrolled below, so these live in registers
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) acc_lo[i] = acc_hi[i] = _mm512_setzero_ps();

  // depth loop: one rank-1 update of the tile per k
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b_lo = _mm512_loadu_ps(panel + k * NR);
    const __m512 b_hi = _mm512_loadu_ps(panel + k * NR + 16);
    const float* a = A + k * a_k;
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i) {
      const __m512 a_ik = _mm512_set1_ps(a[i * a_row]);
      acc_lo[i] = _mm512_fmadd_ps(a_ik, b_lo, acc_lo[i]);
      acc_hi[i] = _mm512_fmadd_ps(a_ik, b_hi, acc_hi[i]);
    }
  }

  // epilogue: C = alpha * acc (+ beta * C); with beta == 0, C is never read
  const __mmask16 mask_lo = FULL ? 0xFFFF : lanes_below16(cols);
  const __mmask16 mask_hi = FULL ? 0xFFFF : lanes_below16(cols - 16);
  const __m512 alpha_v = _mm512_set1_ps(alpha), beta_v = _mm512_set1_ps(beta);
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) {
    float* c = C + i * ldc;
    __m512 lo = _mm512_mul_ps(alpha_v, acc_lo[i]), hi = _mm512_mul_ps(alpha_v, acc_hi[i]);
    if (FULL) {
      if (beta != 0.0f) {
        lo = _mm512_fmadd_ps(beta_v, _mm512_loadu_ps(c), lo);
        hi = _mm512_fmadd_ps(beta_v, _mm512_loadu_ps(c + 16), hi);
      }
      _mm512_storeu_ps(c, lo);
      _mm512_storeu_ps(c + 16, hi);
    } else {
      if (beta != 0.0f) {
        lo = _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(mask_lo, c), lo);
        hi = _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(mask_hi, c + 16), hi);
      }
      _mm512_mask_storeu_ps(c, mask_lo, lo);
      _mm512_mask_storeu_ps(c + 16, mask_hi, hi);
    }
  }
}

// One tile of up to MR rows, the row count a template argument so that the accumulators
// stay in registers.
struct Avx512Tile {
  template <bool FULL>
  RK_TILE_TARGET static void run(int64_t rows, int64_t K, int64_t cols, float alpha, const float* A,
                                 int64_t a_row, int64_t a_k, const float* panel, float beta, float* C,
                                 int64_t ldc) {
    switch (rows) {
      case 8: return micro_kernel<8, FULL>(K, cols, alpha, A, a_row, a_k, panel, beta, C, ldc);
      case 7: return micro_kernel<7, FULL>(K, cols, alpha, A, a_row, a_k, panel, beta, C, ldc);
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

RK_TILE_TARGET void gemm_avx512(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                                const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                                int64_t ldc, PrefetchQueue* prefetch) {
  gemm_tiles<MR, NR, Avx512Tile>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, prefetch,
                                 PREFETCH_LINES);
}

}  // namespace retro_kernels::cpu

#endif  // x86-64 GCC/Clang
