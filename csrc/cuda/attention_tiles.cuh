// The attention core shared by chunked_cross_attention.cu and neighbour_attention.cu.
//
// Both ops are dense attention over small score tiles; they differ only in where the rows
// of a tile live. An op describes one program of one kernel as a `Program` (strided
// operands, which rows and keys are real, where the outputs go) and this header owns
// everything else: the three kernels (forward, backward dq, backward dk/dv), their tile
// loops, the PTX primitives and the launcher.
//
// Design (FlashAttention-2 style, fp16/bf16 only):
// - 4 warps per program; the side a program owns (query rows forward and for dq, keys for
//   dk/dv) is one 16-row mma tile per warp, and that warp keeps the tile's accumulators
//   (S, O, dQ, dK, dV) in registers for the whole program.
// - Matrix products are `mma.sync.aligned.m16n8k16` (fp32 accumulate) on fragments loaded
//   from shared memory with `ldmatrix`; the fragment layouts are spelled out below.
// - Global -> shared copies are 16-byte `cp.async` (sm_80+), double-buffered: the next key
//   (or query) tile is in flight while the current one is multiplied. Operands whose rows
//   are not 16-byte aligned (head dim not a multiple of 8, a strided head dim, odd strides)
//   take a scalar path with the same shared-memory result.
// - Rows split in at most two strided axes (e.g. neighbour k, token r): a row index is
//   divided by that axis' length once per thread per tile, then advanced incrementally.
// - Backward: delta = rowsum(dO * O) is computed by the dq kernel from the tiles it loads
//   and stored for the dk/dv kernel; every output element has one writer (no atomics), and
//   every sum runs in a fixed order: results are bitwise reproducible.
//
// RETRO_KERNELS_EMULATION (tests only, see tests/cuda_emulation/) compiles the same
// kernels and launchers as host C++ that runs the kernels on the CPU: the PTX primitives,
// the launch, the device guard and the op library's name are the only things it replaces.
#pragma once

#include "attention_layout.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef RETRO_KERNELS_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <type_traits>

namespace retro_kernels::cuda {
namespace {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
constexpr int NO_SPLIT = 1 << 30;  // Rows::div of a row axis that is a single strided axis

// =========================================================================================
// What an op tells the core about one program
// =========================================================================================

// One strided input read by rows. Row i of this program is at element
//   offset + (i / div) * s_outer + (i % div) * s_inner          (div: the Rows' div)
// and its column d at + d * s_d. `vec`: every row start is 16-byte aligned, s_d == 1 and
// the head dim is a multiple of 8, so rows can be copied in 16-byte vectors.
template <typename T>
struct Operand {
  const T* ptr;
  int64_t offset, s_outer, s_inner, s_d;
  bool vec;
};

// Which rows of a tile are real (lo <= i < hi) and how a row index splits in two axes.
struct Rows {
  int lo, hi, div;
};

// A bool mask over rows, indexed like an Operand (ptr == nullptr: every row is real).
struct Mask {
  const uint8_t* ptr;
  int64_t offset, s_outer, s_inner;
};

// An output written by rows: row i at offset + i * s_row, columns contiguous.
template <typename T>
struct Output {
  T* ptr;
  int64_t offset, s_row;
  bool vec;
};

// One program of one pass. Query rows: q (and dout, out for the backward), `rows`; the lse
// and delta of row i are at index stat + i. Keys: k, v, `keys` (lo = 0), key_mask.
// Forward / dq: the program owns query rows [row_start, row_start + Blocks::M) of one head
// and writes `o` (out or dq). dk/dv: the program owns keys [key_start, key_start + Blocks::N)
// and loops over the `group` query heads that share them (head g's rows: q.offset +
// g * q_head, dout.offset + g * dout_head, stat + g * stat_head).
template <typename T>
struct Program {
  Operand<T> q, dout, out, k, v;
  Rows rows, keys;
  Mask key_mask;
  Mask row_mask;  // forward: query rows that are padding output zeros (self-attention)
  int64_t stat;
  int row_start, key_start;
  int group;
  int64_t q_head, dout_head, stat_head;
  Output<T> o, dk, dv;
};

// The program index of a pass, in the order every op uses:
//   forward, dq: ((tile * Hq + h) * row_blocks + row block), row blocks of Blocks::M rows;
//   dk/dv:       ((tile * Hkv + hk) * key_blocks + key block), key blocks of Blocks::N keys;
// where `tile` is the op's score tile and `extent` its rows (forward, dq) or keys (dk/dv).
// The heads that share a kv head, which read the same keys, get neighbouring programs.
template <Pass PASS>
constexpr int owned_block() {
  return PASS == Pass::BackwardDkDv ? Blocks<PASS>::N : Blocks<PASS>::M;
}
struct ProgramIndex {
  int start;  // first owned row (forward, dq) or key (dk/dv)
  int head;   // query head (forward, dq) or kv head (dk/dv)
  int tile;
};
template <Pass PASS>
__host__ __device__ inline ProgramIndex split_program(int program, int extent, int heads) {
  const int blocks = (extent + owned_block<PASS>() - 1) / owned_block<PASS>();
  return ProgramIndex{(program % blocks) * owned_block<PASS>(), (program / blocks) % heads, program / blocks / heads};
}
template <Pass PASS>
inline int64_t program_count(int64_t tiles, int extent, int heads) {
  return tiles * heads * ((extent + owned_block<PASS>() - 1) / owned_block<PASS>());
}

// A program of `PASS` at `at`: its owned rows or keys, and its query head h and kv head hk
// (for dk/dv, the first query head of the kv group; the program loops over the group).
template <Pass PASS, typename T>
__device__ inline void own(Program<T>& pr, const ProgramIndex& at, int group, int& h, int& hk) {
  if constexpr (PASS == Pass::BackwardDkDv) {
    pr.key_start = at.start;
    pr.group = group;
    hk = at.head;
    h = hk * group;
  } else {
    pr.row_start = at.start;
    h = at.head;
    hk = h / group;
  }
}

// Arguments every op passes to every pass.
struct AttentionArgs {
  int D;                 // head dim
  float scale;           // softmax scale
  float qk_scale;        // scale * log2(e): scores in log2 units, so exp2 can be used
  float* lse;            // forward output (B, Hq, rows), natural log; +inf for rows with no key
  const float* lse_in;   // backward input: the forward's lse
  float* delta;          // backward scratch, laid out like lse: rowsum(dO * O)
};

// =========================================================================================
// PTX primitives
// =========================================================================================

#ifdef RETRO_KERNELS_EMULATION
#include "ptx_primitives.h"  // tests/cuda_emulation/: the same primitives, run on the CPU
#else
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared; with valid == false it writes 16 zero bytes
// and reads nothing (src-size 0).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ldmatrix .x4: four 8x8 matrices of 16-bit elements. Lanes 8i .. 8i+7 give the addresses of
// the 8 rows (16 bytes each) of matrix i. Lane l receives in r[i] the two elements of
// matrix i at row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (lower column in the low half).
// .trans delivers the transpose: r[i] holds rows 2 (l % 4) and 2 (l % 4) + 1 of column l / 4.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row_address)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row_address)));
}

// mma.sync.aligned.m16n8k16.row.col, fp32 accumulate: C[16 x 8] += A[16 x 16] B[16 x 8].
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with g = lane / 4 and
// t = lane % 4; each 32-bit register holds two 16-bit elements, the lower column (A, C) or
// lower row (B) in the low half:
//   A (4 regs): a0 = A[g][2t, 2t+1]      a1 = A[g+8][2t, 2t+1]
//               a2 = A[g][2t+8, 2t+9]    a3 = A[g+8][2t+8, 2t+9]
//   B (2 regs): b0 = B[2t, 2t+1][g]      b1 = B[2t+8, 2t+9][g]
//   C (4 fp32): c0, c1 = C[g][2t, 2t+1]  c2, c3 = C[g+8][2t, 2t+1]
// So a thread holds rows g and g+8 of every 16-row tile, and the 4 threads of a quad
// (lanes 4g .. 4g+3) together hold whole rows: row reductions are two quad shuffles.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif  // RETRO_KERNELS_EMULATION

// -- 16-bit element conversions (torch builds with __CUDA_NO_HALF_CONVERSIONS__) ------------
template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ uint16_t bits(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ uint16_t bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

// Two floats as one 32-bit register of two T, `lo` in the low half (a fragment element pair).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(bits(from_float<T>(lo))) | (static_cast<uint32_t>(bits(from_float<T>(hi))) << 16);
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// =========================================================================================
// Warp-level tile products (each warp: one 16-row tile of C)
// =========================================================================================

// The A fragment of the 16 x 16 block of a row-major shared tile at (row 0, column k0):
// matrix 0 = rows 0-7 / cols 0-7 (a0), 1 = rows 8-15 / cols 0-7 (a1), 2 = rows 0-7 /
// cols 8-15 (a2), 3 = rows 8-15 / cols 8-15 (a3); lane l addresses row l % 16, col (l / 16) 8.
template <int LD, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int k0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(a, tile + (lane % 16) * LD + k0 + (lane / 16) * 8);
}

// C[16 x 8 NT] += A[16 x 16 KS] * B^T, B given by its rows: b_rows[n][k] (row-major, pitch
// LD), i.e. C[i][n] += sum_k A[i][k] b_rows[n][k]. A: fragments in registers (a[ks]) or a
// 16-row shared tile (pitch LD) whose fragments are loaded one k-step at a time.
// B fragments of n-tiles 2p, 2p+1 in one ldmatrix: matrix 0 = b0 of n-tile 2p (rows n
// 0-7, k 0-7), 1 = its b1 (k 8-15), 2 = b0 of n-tile 2p+1 (rows n 8-15), 3 = its b1; lane l
// addresses row n = (l / 16) 8 + l % 8, column k = ((l / 8) % 2) 8.
template <typename T, int NT, int LD>
__device__ __forceinline__ void mma_step_abt(float (&c)[NT][4], const uint32_t (&a)[4], const T* b_rows, int k0) {
  static_assert(NT % 2 == 0, "n-tiles are loaded in pairs");
  const int lane = threadIdx.x % 32;
  const T* b_lane = b_rows + ((lane / 16) * 8 + lane % 8) * LD + ((lane / 8) % 2) * 8 + k0;
#pragma unroll
  for (int p = 0; p < NT / 2; ++p) {
    uint32_t b[4];
    ldmatrix_x4(b, b_lane + p * 16 * LD);
    mma_16816<T>(c[2 * p], a, b[0], b[1]);
    mma_16816<T>(c[2 * p + 1], a, b[2], b[3]);
  }
}
template <typename T, int NT, int KS, int LD>
__device__ __forceinline__ void warp_mma_abt(float (&c)[NT][4], const uint32_t (&a)[KS][4], const T* b_rows) {
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) mma_step_abt<T, NT, LD>(c, a[ks], b_rows, ks * 16);
}
template <typename T, int NT, int KS, int LD>
__device__ __forceinline__ void warp_mma_abt(float (&c)[NT][4], const T* a_tile, const T* b_rows) {
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    uint32_t a[4];
    load_a<LD>(a, a_tile, ks * 16);
    mma_step_abt<T, NT, LD>(c, a, b_rows, ks * 16);
  }
}

// C[16 x 8 NT] += A[16 x 16 KS] * B, B given row-major by k: b_k[k][n] (pitch LD). A is in
// registers (fragments a[ks], e.g. from c_to_a). B fragments of n-tiles 2p, 2p+1 in one
// ldmatrix.trans: matrix 0 = rows k 0-7 / cols n 0-7 (b0 of n-tile 2p), 1 = rows k 8-15 (its
// b1), 2 = rows k 0-7 / cols n 8-15 (b0 of n-tile 2p+1), 3 = rows k 8-15 (its b1); lane l
// addresses row k = ((l / 8) % 2) 8 + l % 8, column n = (l / 16) 8.
template <typename T, int NT, int KS, int LD>
__device__ __forceinline__ void warp_mma_ab(float (&c)[NT][4], const uint32_t (&a)[KS][4], const T* b_k) {
  static_assert(NT % 2 == 0, "n-tiles are loaded in pairs");
  const int lane = threadIdx.x % 32;
  const T* b_lane = b_k + (((lane / 8) % 2) * 8 + lane % 8) * LD + (lane / 16) * 8;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
    for (int p = 0; p < NT / 2; ++p) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_lane + ks * 16 * LD + p * 16);
      mma_16816<T>(c[2 * p], a[ks], b[0], b[1]);
      mma_16816<T>(c[2 * p + 1], a[ks], b[2], b[3]);
    }
  }
}

// Accumulator tiles -> A fragments (rounded to T): the C fragments of n-tiles 2ks and 2ks+1
// are exactly the A fragment of k-step ks (a0 = c[2ks][0,1], a1 = c[2ks][2,3],
// a2 = c[2ks+1][0,1], a3 = c[2ks+1][2,3]), so P and dS never leave registers.
template <typename T, int NT>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[NT / 2][4], const float (&c)[NT][4]) {
#pragma unroll
  for (int ks = 0; ks < NT / 2; ++ks) {
    a[ks][0] = pack2<T>(c[2 * ks][0], c[2 * ks][1]);
    a[ks][1] = pack2<T>(c[2 * ks][2], c[2 * ks][3]);
    a[ks][2] = pack2<T>(c[2 * ks + 1][0], c[2 * ks + 1][1]);
    a[ks][3] = pack2<T>(c[2 * ks + 1][2], c[2 * ks + 1][3]);
  }
}

template <int NT>
__device__ __forceinline__ void zero(float (&c)[NT][4]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.0f;
}

// Column of element e (0..3) of n-tile nt of a C fragment, and which of the thread's two
// rows (g or g+8) it is on.
__device__ __forceinline__ int c_col(int nt, int e) { return nt * 8 + 2 * (threadIdx.x % 4) + (e & 1); }
__device__ __forceinline__ int c_row(int e) { return e >> 1; }

// =========================================================================================
// Global <-> shared tiles
// =========================================================================================

// Row i split into (i / div, i % div): one division when created, then advanced by a fixed
// step with a carry (a division only when the step crosses `div`).
struct RowCursor {
  int outer, inner, div;
  __device__ RowCursor(int i, int d) : outer(i / d), inner(i % d), div(d) {}
  __device__ void advance(int step) {
    inner += step;
    if (inner >= div) {
      outer += inner / div;
      inner %= div;
    }
  }
  template <typename Strided>
  __device__ int64_t offset(const Strided& x) const {
    return x.offset + outer * x.s_outer + inner * x.s_inner;
  }
};

// Each thread handles one 16-byte chunk column of every STEP-th row of a tile.
template <int ROWS, int D_PAD>
struct TileSlots {
  static constexpr int CHUNKS = D_PAD / VEC;       // 16-byte chunks per row
  static constexpr int STEP = NUM_THREADS / CHUNKS;  // rows between one thread's slots
  static constexpr int COUNT = ROWS / STEP;          // slots per thread
  static_assert(NUM_THREADS % CHUNKS == 0 && ROWS % STEP == 0, "tile rows must split evenly");
};

// Rows [row_start, row_start + ROWS) of `src` into a ROWS x D_PAD shared tile (Tile pitch):
// real rows (rows.lo <= i < rows.hi) and columns d < D are copied, the rest is zero. With
// src.vec the copies are cp.async (the caller commits and waits); otherwise plain loads.
template <typename T, int ROWS, int D_PAD>
__device__ void load_tile(T* tile, const Operand<T>& src, const Rows& rows, int row_start, int D) {
  using S = TileSlots<ROWS, D_PAD>;
  constexpr int LD = Tile<ROWS, D_PAD>::LD;
  const int d0 = (threadIdx.x % S::CHUNKS) * VEC;
  int row = threadIdx.x / S::CHUNKS;
  RowCursor at(row_start + row, rows.div);
#pragma unroll
  for (int s = 0; s < S::COUNT; ++s, row += S::STEP, at.advance(S::STEP)) {
    const int i = row_start + row;
    const bool real = i >= rows.lo && i < rows.hi;
    T* dst = tile + row * LD + d0;
    if (src.vec) {
      const bool copy = real && d0 < D;  // D % 8 == 0 on this path: whole chunks
      cp_async_16(dst, copy ? src.ptr + at.offset(src) + d0 : src.ptr, copy);
    } else {
      uint32_t e[VEC];
#pragma unroll
      for (int x = 0; x < VEC; ++x) {
        const int d = d0 + x;
        e[x] = real && d < D ? bits(src.ptr[at.offset(src) + d * src.s_d]) : 0u;
      }
      *reinterpret_cast<uint4*>(dst) =
          make_uint4(e[0] | e[1] << 16, e[2] | e[3] << 16, e[4] | e[5] << 16, e[6] | e[7] << 16);
    }
  }
}

// Rows [row_start, row_start + ROWS) of a shared tile (Tile pitch) to the real rows of `dst`,
// columns d < D; 16-byte stores when dst.vec.
template <typename T, int ROWS, int D_PAD>
__device__ void store_tile(const Output<T>& dst, const T* tile, const Rows& rows, int row_start, int D) {
  using S = TileSlots<ROWS, D_PAD>;
  constexpr int LD = Tile<ROWS, D_PAD>::LD;
  const int d0 = (threadIdx.x % S::CHUNKS) * VEC;
#pragma unroll
  for (int s = 0; s < S::COUNT; ++s) {
    const int row = threadIdx.x / S::CHUNKS + s * S::STEP;
    const int i = row_start + row;
    if (i < rows.lo || i >= rows.hi || d0 >= D) continue;
    T* out = dst.ptr + dst.offset + i * dst.s_row + d0;
    const T* in = tile + row * LD + d0;
    if (dst.vec) {
      *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(in);
    } else {
      for (int x = 0; x < VEC && d0 + x < D; ++x) out[x] = in[x];
    }
  }
}

// Whether row i is real and not masked out (one division per row).
__device__ __forceinline__ bool row_is_real(const Mask& mask, const Rows& rows, int i) {
  if (i < rows.lo || i >= rows.hi) return false;
  if (mask.ptr == nullptr) return true;
  const int64_t at = mask.offset + static_cast<int64_t>(i / rows.div) * mask.s_outer +
                     static_cast<int64_t>(i % rows.div) * mask.s_inner;
  return mask.ptr[at] != 0;
}

// Additive score bias of keys [key_start, key_start + N): 0 for a real key, -inf else.
template <int N>
__device__ void load_key_bias(float* bias, const Mask& mask, const Rows& keys, int key_start) {
  for (int j = threadIdx.x; j < N; j += NUM_THREADS) {
    bias[j] = row_is_real(mask, keys, key_start + j) ? 0.0f : -INFINITY;
  }
}

// -lse (log2 units) and delta of query rows [row_start, row_start + N); rows that are not
// real get -lse = -inf (their probabilities are 0) and delta = 0.
template <int N>
__device__ void load_row_stats(float* neg_lse2, float* delta, const AttentionArgs& a, int64_t stat,
                               const Rows& rows, int row_start) {
  for (int r = threadIdx.x; r < N; r += NUM_THREADS) {
    const int i = row_start + r;
    const bool real = i >= rows.lo && i < rows.hi;
    neg_lse2[r] = real ? -a.lse_in[stat + i] * LOG2E : -INFINITY;
    delta[r] = real ? a.delta[stat + i] : 0.0f;
  }
}

// C fragments (this warp's 16 rows, times `mul`) into rows warp*16.. of a shared tile.
template <typename T, int NT, int LD>
__device__ void stage_rows(T* tile, const float (&c)[NT][4], float mul_g, float mul_g8) {
  const int lane = threadIdx.x % 32;
  T* row_g = tile + ((threadIdx.x / 32) * WARP_ROWS + lane / 4) * LD + 2 * (lane % 4);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    *reinterpret_cast<uint32_t*>(row_g + nt * 8) = pack2<T>(c[nt][0] * mul_g, c[nt][1] * mul_g);
    *reinterpret_cast<uint32_t*>(row_g + 8 * LD + nt * 8) = pack2<T>(c[nt][2] * mul_g8, c[nt][3] * mul_g8);
  }
}

// =========================================================================================
// Forward: O = softmax(Q K^T * scale) V, online over key tiles; lse saved for the backward
// =========================================================================================

// One online-softmax step for the thread's rows g, g+8: raw scores s (Q K^T of one key
// tile) become probabilities relative to the running row max m; the running sum l (this
// thread's columns only; the quad's partial sums are added at the end) and the output o are
// rescaled to the new max. Rows that have seen no real key keep m = -inf and subtract 0.
template <int NT, int DT>
__device__ __forceinline__ void online_softmax_step(float (&s)[NT][4], const float* bias, float qk_scale,
                                                    float (&m)[2], float (&l)[2], float (&o)[DT][4]) {
  float row_max[2] = {m[0], m[1]};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] = fmaf(s[nt][e], qk_scale, bias[c_col(nt, e)]);
      row_max[c_row(e)] = fmaxf(row_max[c_row(e)], s[nt][e]);
    }
  }
  float sub[2], alpha[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_max[r] = quad_max(row_max[r]);
    sub[r] = row_max[r] == -INFINITY ? 0.0f : row_max[r];
    alpha[r] = exp2f(m[r] - sub[r]);  // 0 while the row had no real key (m = -inf)
    m[r] = row_max[r];
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] = exp2f(s[nt][e] - sub[c_row(e)]);
      sum[c_row(e)] += s[nt][e];
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + sum[r];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dt][e] *= alpha[c_row(e)];
  }
}

// The double-buffered main loop of every kernel: step i works on stage i % 2 while step
// i + 1's tiles load into the other stage (last read before the previous barrier).
// `load(step, stage)` issues and commits the copies of a step; `work(step, stage)` uses them.
template <typename Load, typename Work>
__device__ __forceinline__ void double_buffered(int steps, Load&& load, Work&& work) {
  for (int step = 0; step < steps; ++step) {
    const int stage = step % 2;
    if (step + 1 < steps) {
      load(step + 1, 1 - stage);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this step's tiles (and any loaded before the loop) are in shared memory
    work(step, stage);
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
}

template <typename T, int D_PAD, typename Problem>
__global__ void __launch_bounds__(NUM_THREADS, min_ctas_per_sm(Pass::Forward, D_PAD))
attention_fwd_kernel(const typename Problem::Params p) {
  using B = Blocks<Pass::Forward>;
  using L = SmemLayout<Pass::Forward, D_PAD>;
  constexpr int LD = Tile<B::M, D_PAD>::LD;
  constexpr int D_TILES = D_PAD / 8, D_STEPS = D_PAD / 16, N_TILES = B::N / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* const q_s = reinterpret_cast<T*>(smem + L::q);
  T* const k_s = reinterpret_cast<T*>(smem + L::k);
  T* const v_s = reinterpret_cast<T*>(smem + L::v);
  float* const bias_s = reinterpret_cast<float*>(smem + L::bias);
  constexpr int K_STAGE = B::N * LD;  // elements per K or V stage

  const AttentionArgs& a = p.args;
  const Program<T> pr = Problem::template program<Pass::Forward, T>(p, blockIdx.x);
  if (max(pr.rows.lo, pr.row_start) >= min(pr.rows.hi, pr.row_start + B::M)) return;  // no real row
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n_tiles = (pr.keys.hi + B::N - 1) / B::N;

  // -- stage 0: the query tile and the first key tile --------------------------------------
  auto load_keys = [&](int tile, int stage) {
    load_tile<T, B::N, D_PAD>(k_s + stage * K_STAGE, pr.k, pr.keys, tile * B::N, a.D);
    load_tile<T, B::N, D_PAD>(v_s + stage * K_STAGE, pr.v, pr.keys, tile * B::N, a.D);
    load_key_bias<B::N>(bias_s + stage * B::N, pr.key_mask, pr.keys, tile * B::N);
    cp_async_commit();
  };
  if (n_tiles > 0) {
    load_tile<T, B::M, D_PAD>(q_s, pr.q, pr.rows, pr.row_start, a.D);
    load_keys(0, 0);
  }

  // -- online softmax over the key tiles, the next tile in flight --------------------------
  uint32_t q_frag[D_STEPS][4];
  float o[D_TILES][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  zero(o);
  double_buffered(n_tiles, load_keys, [&](int tile, int stage) {
    if (tile == 0) {
#pragma unroll
      for (int ks = 0; ks < D_STEPS; ++ks) load_a<LD>(q_frag[ks], q_s + warp * WARP_ROWS * LD, ks * 16);
    }
    float s[N_TILES][4];
    zero(s);
    warp_mma_abt<T, N_TILES, D_STEPS, LD>(s, q_frag, k_s + stage * K_STAGE);  // S = Q K^T, Q in registers
    online_softmax_step(s, bias_s + stage * B::N, a.qk_scale, m, l, o);
    uint32_t p_frag[N_TILES / 2][4];
    c_to_a<T>(p_frag, s);
    warp_mma_ab<T, D_TILES, N_TILES / 2, LD>(o, p_frag, v_s + stage * K_STAGE);  // O += P V
  });

  // -- normalise; rows with no real key (or padding rows) output zeros and lse = +inf ------
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = quad_sum(l[r]);
    const int i = pr.row_start + warp * WARP_ROWS + lane / 4 + 8 * r;
    const bool has_key = l[r] > 0.0f && row_is_real(pr.row_mask, pr.rows, i);
    inv[r] = has_key ? 1.0f / l[r] : 0.0f;
    if (lane % 4 == 0 && i >= pr.rows.lo && i < pr.rows.hi) {
      a.lse[pr.stat + i] = has_key ? (m[r] + log2f(l[r])) * LN2 : INFINITY;
    }
  }
  stage_rows<T, D_TILES, LD>(q_s, o, inv[0], inv[1]);  // the query tile is no longer read
  __syncthreads();
  store_tile<T, B::M, D_PAD>(pr.o, q_s, pr.rows, pr.row_start, a.D);
}

// =========================================================================================
// Backward. With P = exp2(S * qk_scale - lse2) recomputed from the saved lse:
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  delta = rowsum(dO * O),
//   dQ = dS K * scale,  dK = dS^T Q * scale.
// Kernel 1 (dq) owns query rows: it computes delta, stores it, and accumulates dQ over the
// key tiles. Kernel 2 (dk/dv) owns keys: it accumulates dK and dV over the query tiles of
// every query head of the kv group, reading the stored delta.
// =========================================================================================

// P and dS of one tile from the raw scores s and dP = dO V^T, in place: s <- P, dp <- dS.
// P = exp2(s * qk_scale + row_add[r] + col_add[c]): one of the two is the key bias (0 or
// -inf), the other the row's -lse in log2 units (-inf for rows that are not real), so a
// masked key or an empty row gets probability 0. delta belongs to the query: per fragment
// row in the dq kernel (QUERY_ROWS), per column in the dk/dv kernel.
template <bool QUERY_ROWS, int NT>
__device__ __forceinline__ void probabilities_and_ds(float (&s)[NT][4], float (&dp)[NT][4], float qk_scale,
                                                     const float (&row_add)[2], const float* col_add,
                                                     const float (&row_delta)[2], const float* col_delta) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = c_row(e), c = c_col(nt, e);
      const float prob = exp2f(fmaf(s[nt][e], qk_scale, row_add[r] + col_add[c]));
      const float delta = QUERY_ROWS ? row_delta[r] : col_delta[c];
      s[nt][e] = prob;
      dp[nt][e] = prob * (dp[nt][e] - delta);
    }
  }
}

template <typename T, int D_PAD, typename Problem>
__global__ void __launch_bounds__(NUM_THREADS, min_ctas_per_sm(Pass::BackwardDq, D_PAD))
attention_bwd_dq_kernel(const typename Problem::Params p) {
  using B = Blocks<Pass::BackwardDq>;
  using L = SmemLayout<Pass::BackwardDq, D_PAD>;
  constexpr int LD = Tile<B::M, D_PAD>::LD;
  constexpr int D_TILES = D_PAD / 8, N_TILES = B::N / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* const q_s = reinterpret_cast<T*>(smem + L::q);
  T* const do_s = reinterpret_cast<T*>(smem + L::dout);
  T* const o_s = reinterpret_cast<T*>(smem + L::out);
  T* const k_s = reinterpret_cast<T*>(smem + L::k);
  T* const v_s = reinterpret_cast<T*>(smem + L::v);
  float* const bias_s = reinterpret_cast<float*>(smem + L::bias);
  constexpr int K_STAGE = B::N * LD;

  const AttentionArgs& a = p.args;
  const Program<T> pr = Problem::template program<Pass::BackwardDq, T>(p, blockIdx.x);
  if (max(pr.rows.lo, pr.row_start) >= min(pr.rows.hi, pr.row_start + B::M)) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n_tiles = (pr.keys.hi + B::N - 1) / B::N;
  T* const q_w = q_s + warp * WARP_ROWS * LD;  // this warp's rows
  T* const do_w = do_s + warp * WARP_ROWS * LD;

  // -- group 0: Q, dO, O of the rows; group 1: the first key tile --------------------------
  load_tile<T, B::M, D_PAD>(q_s, pr.q, pr.rows, pr.row_start, a.D);
  load_tile<T, B::M, D_PAD>(do_s, pr.dout, pr.rows, pr.row_start, a.D);
  load_tile<T, B::M, D_PAD>(o_s, pr.out, pr.rows, pr.row_start, a.D);
  cp_async_commit();
  auto load_keys = [&](int tile, int stage) {
    load_tile<T, B::N, D_PAD>(k_s + stage * K_STAGE, pr.k, pr.keys, tile * B::N, a.D);
    load_tile<T, B::N, D_PAD>(v_s + stage * K_STAGE, pr.v, pr.keys, tile * B::N, a.D);
    load_key_bias<B::N>(bias_s + stage * B::N, pr.key_mask, pr.keys, tile * B::N);
    cp_async_commit();
  };
  if (n_tiles > 0) {
    load_keys(0, 0);
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();

  // -- delta = rowsum(dO * O) of the thread's rows g, g+8: the quad splits the columns -----
  float neg_lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp * WARP_ROWS + lane / 4 + 8 * r;
    float acc = 0.0f;
    for (int d = (lane % 4) * VEC; d < D_PAD; d += 4 * VEC) {
#pragma unroll
      for (int x = 0; x < VEC; ++x) acc = fmaf(to_float(do_s[row * LD + d + x]), to_float(o_s[row * LD + d + x]), acc);
    }
    delta[r] = quad_sum(acc);
    const int i = pr.row_start + row;
    const bool real = i >= pr.rows.lo && i < pr.rows.hi;
    neg_lse2[r] = real ? -a.lse_in[pr.stat + i] * LOG2E : -INFINITY;
    if (real && lane % 4 == 0) a.delta[pr.stat + i] = delta[r];
  }

  // -- dQ = sum over key tiles of dS K --------------------------------------------------------
  float dq[D_TILES][4];
  zero(dq);
  double_buffered(n_tiles, load_keys, [&](int, int stage) {
    const T* k_tile = k_s + stage * K_STAGE;
    float s[N_TILES][4], dp[N_TILES][4];
    zero(s);
    zero(dp);
    warp_mma_abt<T, N_TILES, D_PAD / 16, LD>(s, q_w, k_tile);                     // S = Q K^T
    warp_mma_abt<T, N_TILES, D_PAD / 16, LD>(dp, do_w, v_s + stage * K_STAGE);   // dP = dO V^T
    probabilities_and_ds<true>(s, dp, a.qk_scale, neg_lse2, bias_s + stage * B::N, delta, nullptr);
    uint32_t ds_frag[N_TILES / 2][4];
    c_to_a<T>(ds_frag, dp);
    warp_mma_ab<T, D_TILES, N_TILES / 2, LD>(dq, ds_frag, k_tile);               // dQ += dS K
  });

  // -- dq * scale, through the O tile (read only before the loop) -------------------------
  __syncthreads();
  stage_rows<T, D_TILES, LD>(o_s, dq, a.scale, a.scale);
  __syncthreads();
  store_tile<T, B::M, D_PAD>(pr.o, o_s, pr.rows, pr.row_start, a.D);
}

template <typename T, int D_PAD, typename Problem>
__global__ void __launch_bounds__(NUM_THREADS, min_ctas_per_sm(Pass::BackwardDkDv, D_PAD))
attention_bwd_dkdv_kernel(const typename Problem::Params p) {
  using B = Blocks<Pass::BackwardDkDv>;
  using L = SmemLayout<Pass::BackwardDkDv, D_PAD>;
  constexpr int LD = Tile<B::N, D_PAD>::LD;
  constexpr int D_TILES = D_PAD / 8, M_TILES = B::M / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* const k_s = reinterpret_cast<T*>(smem + L::k);
  T* const v_s = reinterpret_cast<T*>(smem + L::v);
  T* const q_s = reinterpret_cast<T*>(smem + L::q);
  T* const do_s = reinterpret_cast<T*>(smem + L::dout);
  float* const neg_lse_s = reinterpret_cast<float*>(smem + L::lse);
  float* const delta_s = reinterpret_cast<float*>(smem + L::delta);
  constexpr int Q_STAGE = B::M * LD;
  const float no_row_delta[2] = {0.0f, 0.0f};  // delta is per column (query row) here

  const AttentionArgs& a = p.args;
  const Program<T> pr = Problem::template program<Pass::BackwardDkDv, T>(p, blockIdx.x);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T* const k_w = k_s + warp * WARP_ROWS * LD;  // this warp's keys
  T* const v_w = v_s + warp * WARP_ROWS * LD;

  // The thread's keys (fragment rows g, g+8): score bias 0 if real, -inf if masked or past
  // the end (their dk, dv come out 0 and are not written).
  float key_bias[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = pr.key_start + warp * WARP_ROWS + lane / 4 + 8 * r;
    key_bias[r] = row_is_real(pr.key_mask, pr.keys, j) ? 0.0f : -INFINITY;
  }

  // Steps: (query head g of the group) x (query tiles of the rows), head-major.
  const int row_tiles = pr.rows.hi > pr.rows.lo ? (pr.rows.hi - pr.rows.lo + B::M - 1) / B::M : 0;
  const int steps = pr.group * row_tiles;
  auto load_rows = [&](int step, int stage) {
    const int g = step / row_tiles, row_start = pr.rows.lo + (step % row_tiles) * B::M;
    Operand<T> q = pr.q, dout = pr.dout;
    q.offset += g * pr.q_head;
    dout.offset += g * pr.dout_head;
    load_tile<T, B::M, D_PAD>(q_s + stage * Q_STAGE, q, pr.rows, row_start, a.D);
    load_tile<T, B::M, D_PAD>(do_s + stage * Q_STAGE, dout, pr.rows, row_start, a.D);
    load_row_stats<B::M>(neg_lse_s + stage * B::M, delta_s + stage * B::M, a, pr.stat + g * pr.stat_head,
                         pr.rows, row_start);
    cp_async_commit();
  };
  if (steps > 0) {
    load_tile<T, B::N, D_PAD>(k_s, pr.k, pr.keys, pr.key_start, a.D);
    load_tile<T, B::N, D_PAD>(v_s, pr.v, pr.keys, pr.key_start, a.D);
    load_rows(0, 0);  // one group with the key tiles
  }

  // -- dV = sum P^T dO, dK = sum dS^T Q over the steps -------------------------------------
  float dk[D_TILES][4], dv[D_TILES][4];
  zero(dk);
  zero(dv);
  double_buffered(steps, load_rows, [&](int, int stage) {
    const T* q_tile = q_s + stage * Q_STAGE;
    const T* do_tile = do_s + stage * Q_STAGE;
    float st[M_TILES][4], dpt[M_TILES][4];  // S^T and dP^T: this warp's keys x the tile's rows
    zero(st);
    zero(dpt);
    warp_mma_abt<T, M_TILES, D_PAD / 16, LD>(st, k_w, q_tile);    // S^T = K Q^T
    warp_mma_abt<T, M_TILES, D_PAD / 16, LD>(dpt, v_w, do_tile);  // dP^T = V dO^T
    probabilities_and_ds<false>(st, dpt, a.qk_scale, key_bias, neg_lse_s + stage * B::M, no_row_delta,
                                delta_s + stage * B::M);
    uint32_t p_frag[M_TILES / 2][4], ds_frag[M_TILES / 2][4];
    c_to_a<T>(p_frag, st);
    c_to_a<T>(ds_frag, dpt);
    warp_mma_ab<T, D_TILES, M_TILES / 2, LD>(dv, p_frag, do_tile);  // dV += P^T dO
    warp_mma_ab<T, D_TILES, M_TILES / 2, LD>(dk, ds_frag, q_tile);  // dK += dS^T Q
  });

  // -- dk * scale and dv through the K, V tiles ----------------------------------------------
  __syncthreads();
  stage_rows<T, D_TILES, LD>(k_s, dk, a.scale, a.scale);
  stage_rows<T, D_TILES, LD>(v_s, dv, 1.0f, 1.0f);
  __syncthreads();
  store_tile<T, B::N, D_PAD>(pr.dk, k_s, pr.keys, pr.key_start, a.D);
  store_tile<T, B::N, D_PAD>(pr.dv, v_s, pr.keys, pr.key_start, a.D);
}

// =========================================================================================
// Launcher
// =========================================================================================

template <Pass PASS, typename T, int D_PAD, typename Problem>
auto pass_kernel() {
  if constexpr (PASS == Pass::Forward) return attention_fwd_kernel<T, D_PAD, Problem>;
  else if constexpr (PASS == Pass::BackwardDq) return attention_bwd_dq_kernel<T, D_PAD, Problem>;
  else return attention_bwd_dkdv_kernel<T, D_PAD, Problem>;
}

#ifdef RETRO_KERNELS_EMULATION
#include "emulated_launch.h"  // tests/cuda_emulation/: the launch, on the CPU
#else
template <Pass PASS, typename T, int D_PAD, typename Problem>
void launch_pass(const typename Problem::Params& p, int64_t programs) {
  const auto kernel = pass_kernel<PASS, T, D_PAD, Problem>();
  constexpr size_t smem_bytes = SmemLayout<PASS, D_PAD>::bytes;
  int device = 0, max_bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(smem_bytes <= static_cast<size_t>(max_bytes), "retro_kernels CUDA: the ", pass_name(PASS),
              " kernel needs ", smem_bytes, " bytes of shared memory per block, this GPU allows ", max_bytes);
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
  }
  kernel<<<static_cast<unsigned>(programs), NUM_THREADS, smem_bytes, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
using DeviceGuard = c10::cuda::CUDAGuard;
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
#define RETRO_KERNELS_CUDA_LIBRARY(m) TORCH_LIBRARY(retro_kernels_cuda, m)
#define RETRO_KERNELS_CUDA_LIBRARY_FRAGMENT(m) TORCH_LIBRARY_FRAGMENT(retro_kernels_cuda, m)
#define RETRO_KERNELS_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(retro_kernels_cuda, CUDA, m)
#endif  // RETRO_KERNELS_EMULATION

// Runs one pass of `Problem` for q's dtype (fp16/bf16) and head dim: one program per block,
// a 1-D grid (2^31 - 1 programs at most; no grid-y limit).
template <Pass PASS, typename Problem>
void run_pass(const typename Problem::Params& p, at::ScalarType dtype) {
  const int64_t programs = Problem::template programs<PASS>(p);
  if (programs == 0) return;
  TORCH_CHECK(programs <= INT32_MAX, "retro_kernels CUDA: ", programs, " programs for the ", pass_name(PASS),
              " kernel exceed the 2^31 - 1 grid limit; split the batch");
  const int d_pad = head_dim_pad(p.args.D);
  auto by_head_dim = [&](auto type_tag) {
    using T = decltype(type_tag);
    if (d_pad == 32) launch_pass<PASS, T, 32, Problem>(p, programs);
    else if (d_pad == 64) launch_pass<PASS, T, 64, Problem>(p, programs);
    else launch_pass<PASS, T, 128, Problem>(p, programs);
  };
  if (dtype == at::kHalf) by_head_dim(__half{});
  else if (dtype == at::kBFloat16) by_head_dim(__nv_bfloat16{});
  else TORCH_CHECK(false, "retro_kernels CUDA: dtype must be float16 or bfloat16, got ", dtype);
}

// -- host-side helpers shared by the launchers ---------------------------------------------

// Whether rows of `t` can be copied in 16-byte vectors: unit stride along the head dim, a
// head dim that is a multiple of 8 and every other stride (and the data pointer) 16-byte
// aligned.
inline bool rows_are_vectorizable(const at::Tensor& t) {
  if (t.size(-1) % VEC != 0 || t.stride(-1) != 1) return false;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % VEC != 0) return false;
  }
  return true;
}

template <typename T>
Operand<T> operand(const at::Tensor& t) {
  return Operand<T>{static_cast<const T*>(t.data_ptr()), 0, 0, 0, t.stride(-1), rows_are_vectorizable(t)};
}

}  // namespace
}  // namespace retro_kernels::cuda
