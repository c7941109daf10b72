// The AVX2 + FMA candidate of gemm() (see gemm.h; the kernel itself: gemm_tiles.h).
// On Zen3 it beats MKL on the attention kernels' tiles (~80-88 GFLOP/s per core against
// ~70-77); elsewhere it may not, which is why gemm() measures.
//
// An MR x NR = 6 x 16 tile of C in 12 ymm registers: per depth step 2 loads + 6
// broadcasts per 12 FMAs, so the two FMA pipes, not the loads, set the pace
// (6 x 2 accumulators + 2 B loads + 1 broadcast <= 16 ymm).
//
// Compiled for AVX2 + FMA through function attributes only (no -march), and called only
// when the running CPU has both (gemm_kind_available in gemm.cpp).
#include "gemm.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define RK_TILE_TARGET __attribute__((target("avx2,fma")))
#include "gemm_tiles.h"

namespace retro_kernels::cpu {
namespace {

constexpr int MR = 6;                   // rows of the C tile
constexpr int64_t PREFETCH_LINES = 12;  // prefetches of the caller's next operands per tile

// 8 floats in a ymm register; masks are ymm lane masks.
struct Ymm {
  using reg = __m256;
  using mask = __m256i;
  static constexpr int64_t kLanes = 8;
  RK_TILE_TARGET static reg zero() { return _mm256_setzero_ps(); }
  RK_TILE_TARGET static reg set1(float x) { return _mm256_set1_ps(x); }
  RK_TILE_TARGET static reg load(const float* p) { return _mm256_loadu_ps(p); }
  RK_TILE_TARGET static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  RK_TILE_TARGET static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  RK_TILE_TARGET static mask lanes(int64_t n) { return lanes_below(n); }
  RK_TILE_TARGET static reg load_masked(mask m, const float* p) { return _mm256_maskload_ps(p, m); }
  RK_TILE_TARGET static void store(float* p, reg r) { _mm256_storeu_ps(p, r); }
  RK_TILE_TARGET static void store_masked(float* p, mask m, reg r) { _mm256_maskstore_ps(p, m, r); }
};

}  // namespace

RK_TILE_TARGET void gemm_avx2(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                              const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                              int64_t ldc, PrefetchQueue* prefetch) {
  gemm_tiles<Ymm, MR>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, prefetch, PREFETCH_LINES);
}

}  // namespace retro_kernels::cpu

#endif  // x86-64 GCC/Clang
