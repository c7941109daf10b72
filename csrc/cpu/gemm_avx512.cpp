// The AVX-512F candidate of gemm() (see gemm.h; the kernel itself: gemm_tiles.h).
//
// An MR x NR = 8 x 32 tile of C in 16 zmm registers (of 32): per depth step 2 loads + 8
// broadcasts per 16 FMAs, twice the work per instruction of the AVX2 kernel. On CPUs
// with two 512-bit FMA pipes (Intel Skylake-SP and later) that is twice the peak; on
// AMD Zen4, which splits each 512-bit FMA in two, the same peak with half the
// instructions (measured there: 0-20% faster than AVX2 on the kernels' tiles). Column
// tails use AVX-512 lane masks; 64 rows (the kernels' row blocks) are 8 whole tiles.
//
// Compiled for AVX-512F through function attributes only (no -march), and called only
// when the running CPU has it (gemm_kind_available in gemm.cpp).
#include "gemm.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define RK_TILE_TARGET __attribute__((target("avx512f,avx2,fma")))
#include "gemm_tiles.h"

namespace retro_kernels::cpu {
namespace {

constexpr int MR = 8;                   // rows of the C tile
constexpr int64_t PREFETCH_LINES = 32;  // per tile (2.7x the AVX2 tile's work, so more lines)

// 16 floats in a zmm register; masks are AVX-512 mask registers.
struct Zmm {
  using reg = __m512;
  using mask = __mmask16;
  static constexpr int64_t kLanes = 16;
  RK_TILE_TARGET static reg zero() { return _mm512_setzero_ps(); }
  RK_TILE_TARGET static reg set1(float x) { return _mm512_set1_ps(x); }
  RK_TILE_TARGET static reg load(const float* p) { return _mm512_loadu_ps(p); }
  RK_TILE_TARGET static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  RK_TILE_TARGET static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  RK_TILE_TARGET static mask lanes(int64_t n) {
    return n >= 16 ? static_cast<mask>(0xFFFF) : n <= 0 ? 0 : static_cast<mask>((1u << n) - 1);
  }
  RK_TILE_TARGET static reg load_masked(mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  RK_TILE_TARGET static void store(float* p, reg r) { _mm512_storeu_ps(p, r); }
  RK_TILE_TARGET static void store_masked(float* p, mask m, reg r) { _mm512_mask_storeu_ps(p, m, r); }
};

}  // namespace

RK_TILE_TARGET void gemm_avx512(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                                const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                                int64_t ldc, PrefetchQueue* prefetch) {
  gemm_tiles<Zmm, MR>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, prefetch, PREFETCH_LINES);
}

}  // namespace retro_kernels::cpu

#endif  // x86-64 GCC/Clang
