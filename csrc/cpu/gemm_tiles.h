// The micro-kernel GEMM, written once for both vector ISAs (gemm_avx2.cpp and
// gemm_avx512.cpp instantiate it with their registers): packing op(B) into column
// panels, the micro-kernel, and the loop over panels and row tiles.
//
//   C (M x N, ldc) = alpha * op(A) op(B) + beta * C
//
// The products of the attention kernels (a few dozen to a few hundred rows, columns and
// depth; 64 x 256 x 64 at the paper's shapes) are too small for a BLAS to amortise its
// blocking and packing of both operands. Here op(A) is read in place through two
// strides (a_row between rows, a_k along the depth: A is a_row = lda, a_k = 1, A^T is
// a_row = 1, a_k = lda), and only op(B) is packed (a copy of K x N floats, against
// M x N x K FMAs) into contiguous K x NR column panels, transposed on the way when
// op(B) = B^T, so a micro-kernel sees one layout of B for every case. The panel is what
// the micro-kernel streams through for every row tile, so it must stay in L1: rows of B
// itself are often 2 KB apart (one head of a (tokens, heads, dim) tensor), and 2 KB
// strides fall into only two L1 sets.
//
// Every element of C is one chain of FMAs in depth order 0 .. K-1, then alpha (and
// beta * C): the same bits for the same inputs, whatever the tiling or the thread.
//
// Include this after defining RK_TILE_TARGET (the includer's target attribute, e.g.
// __attribute__((target("avx2,fma")))); everything here has internal linkage, so each
// includer gets its own copy compiled for its own ISA (no -march anywhere).
#pragma once

#ifndef RK_TILE_TARGET
#error "define RK_TILE_TARGET before including gemm_tiles.h"
#endif

#include "common.h"

#include <immintrin.h>

#include <vector>

namespace retro_kernels::cpu {
namespace {

// Lane masks for the last columns of a row: lanes < n are on (none when n <= 0).
RK_TILE_TARGET inline __m256i lanes_below(int64_t n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))), lane);
}

// op(B) = B, row-major K x N (ld ldb), into panels of NR columns, the last zero-padded.
// Row by row, so that each row of B (often a page of its own) is visited once.
template <int64_t NR>
RK_TILE_TARGET void pack_b(const float* B, int64_t ldb, int64_t K, int64_t N, float* packed) {
  static_assert(NR % 8 == 0, "panels are whole ymm vectors");
  const int64_t full = N / NR, tail = N - full * NR;
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    float* dst = packed + k * NR;
    for (int64_t p = 0; p < full; ++p, b += NR, dst += K * NR) {
#pragma GCC unroll 8
      for (int64_t c = 0; c < NR; c += 8) _mm256_storeu_ps(dst + c, _mm256_loadu_ps(b + c));
    }
    if (tail > 0) {  // the last, zero-padded panel: no read past column N
#pragma GCC unroll 8
      for (int64_t c = 0; c < NR; c += 8)
        _mm256_storeu_ps(dst + c, _mm256_maskload_ps(b + c, lanes_below(tail - c)));
    }
  }
}

// r[t] <- column t of the 8 x 8 block in r (rows r[0..7]).
RK_TILE_TARGET inline void transpose8x8(__m256 r[8]) {
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
template <int64_t NR>
RK_TILE_TARGET void pack_b_transposed(const float* B, int64_t ldb, int64_t K, int64_t N, float* packed) {
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

// The micro-kernel, written once for any vector ISA `V` (gemm_avx2.cpp, gemm_avx512.cpp
// define one): C[0:ROWS, 0:cols] = alpha * op(A)[0:ROWS, :] panel (+ beta * C), cols <=
// NR = 2 V::kLanes, from one K x NR panel. It holds the ROWS x NR tile of C in 2 ROWS
// vector registers; each step of the depth loop loads one row of the panel (two
// vectors), broadcasts the ROWS values of op(A)'s column k and does 2 ROWS FMAs.
// FULL: cols == NR, plain stores; otherwise masked ones (no read or write past column
// cols, which may be the end of an allocation). V provides: reg, mask, kLanes, zero(),
// set1(x), load(p), fmadd(a, b, c), mul(a, b), lanes(n) (the mask of lanes < n),
// load_masked(m, p), store(p, r), store_masked(p, m, r).
template <class V, int ROWS, bool FULL>
RK_TILE_TARGET void micro_kernel(int64_t K, int64_t cols, float alpha, const float* A, int64_t a_row,
                                 int64_t a_k, const float* panel, float beta, float* C, int64_t ldc) {
  constexpr int64_t NR = 2 * V::kLanes;
  typename V::reg acc_lo[ROWS], acc_hi[ROWS];  // fully unrolled below, so these live in registers
#pragma GCC unroll 16
  for (int i = 0; i < ROWS; ++i) acc_lo[i] = acc_hi[i] = V::zero();

  // depth loop: one rank-1 update of the tile per k
  for (int64_t k = 0; k < K; ++k) {
    const typename V::reg b_lo = V::load(panel + k * NR), b_hi = V::load(panel + k * NR + V::kLanes);
    const float* a = A + k * a_k;
#pragma GCC unroll 16
    for (int i = 0; i < ROWS; ++i) {
      const typename V::reg a_ik = V::set1(a[i * a_row]);
      acc_lo[i] = V::fmadd(a_ik, b_lo, acc_lo[i]);
      acc_hi[i] = V::fmadd(a_ik, b_hi, acc_hi[i]);
    }
  }

  // epilogue: C = alpha * acc (+ beta * C); with beta == 0, C is never read
  const typename V::mask mask_lo = V::lanes(FULL ? V::kLanes : cols);
  const typename V::mask mask_hi = V::lanes(FULL ? V::kLanes : cols - V::kLanes);
  const typename V::reg alpha_v = V::set1(alpha), beta_v = V::set1(beta);
#pragma GCC unroll 16
  for (int i = 0; i < ROWS; ++i) {
    float* c = C + i * ldc;
    typename V::reg lo = V::mul(alpha_v, acc_lo[i]), hi = V::mul(alpha_v, acc_hi[i]);
    if (FULL) {
      if (beta != 0.0f) {
        lo = V::fmadd(beta_v, V::load(c), lo);
        hi = V::fmadd(beta_v, V::load(c + V::kLanes), hi);
      }
      V::store(c, lo);
      V::store(c + V::kLanes, hi);
    } else {
      if (beta != 0.0f) {
        lo = V::fmadd(beta_v, V::load_masked(mask_lo, c), lo);
        hi = V::fmadd(beta_v, V::load_masked(mask_hi, c + V::kLanes), hi);
      }
      V::store_masked(c, mask_lo, lo);
      V::store_masked(c + V::kLanes, mask_hi, hi);
    }
  }
}

// micro_kernel for `rows` rows (1 .. ROWS), the count a template argument so that the
// accumulators stay in registers.
template <class V, int ROWS, bool FULL>
RK_TILE_TARGET void tile(int64_t rows, int64_t K, int64_t cols, float alpha, const float* A, int64_t a_row,
                         int64_t a_k, const float* panel, float beta, float* C, int64_t ldc) {
  if constexpr (ROWS > 1) {
    if (rows < ROWS) return tile<V, ROWS - 1, FULL>(rows, K, cols, alpha, A, a_row, a_k, panel, beta, C, ldc);
  }
  micro_kernel<V, ROWS, FULL>(K, cols, alpha, A, a_row, a_k, panel, beta, C, ldc);
}

// The whole product: op(B) packed into panels of NR = 2 V::kLanes columns, then MR-row
// tiles. `prefetch_lines`: the caller's next operands to prefetch per tile (see
// PrefetchQueue in common.h).
template <class V, int MR>
RK_TILE_TARGET void gemm_tiles(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                               const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                               int64_t ldc, PrefetchQueue* prefetch, int64_t prefetch_lines) {
  constexpr int64_t NR = 2 * V::kLanes;
  // op(B) into column panels (per-thread buffer, reused across calls)
  thread_local std::vector<float> packed;
  const int64_t panels = (N + NR - 1) / NR;
  if (static_cast<int64_t>(packed.size()) < panels * K * NR) packed.resize(panels * K * NR);
  if (trans_b)
    pack_b_transposed<NR>(B, ldb, K, N, packed.data());
  else
    pack_b<NR>(B, ldb, K, N, packed.data());
  const int64_t a_row = trans_a ? 1 : lda, a_k = trans_a ? lda : 1;

  // Column panels outside, row tiles inside: one K x NR panel of B stays in L1 while
  // the MR-row tiles of op(A) stream past it.
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t j = p * NR, cols = std::min(NR, N - j);
    const float* panel = packed.data() + p * K * NR;
    for (int64_t i = 0; i < M; i += MR) {
      const int64_t rows = std::min<int64_t>(MR, M - i);
      const float* a = A + i * a_row;
      if (prefetch != nullptr) prefetch->step(prefetch_lines);
      if (cols == NR)
        tile<V, MR, true>(rows, K, cols, alpha, a, a_row, a_k, panel, beta, C + i * ldc + j, ldc);
      else
        tile<V, MR, false>(rows, K, cols, alpha, a, a_row, a_k, panel, beta, C + i * ldc + j, ldc);
    }
  }
}

}  // namespace
}  // namespace retro_kernels::cpu
