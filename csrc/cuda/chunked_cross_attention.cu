// Chunked cross-attention in CUDA: fused forward and backward kernels with their launchers.
//
// Same indexing as the Triton kernels (retro_kernels/triton/chunked_cross_attention.py):
// absolute positions t fall into query chunks c = (t + 1) / m; query chunk 0 (the
// first m-1 tokens) outputs zeros, query chunk c >= 1 reads the K*R keys of the
// neighbours of chunk u = c - 1. Inputs are read through their strides (no copy).
//
// Forward: one block per (query chunk, BLOCK_M rows of it, batch x query head);
// online softmax over the keys in tiles of BLOCK_N; each warp owns ROWS_PER_WARP
// rows of the score tile and of the fp32 output accumulator (in shared memory, so
// rescaling by the running max does not depend on the tensor-core fragment layout).
// Saves lse (B, Hq, N), natural log; +inf for rows with no key.
//
// Backward: one block per (query chunk c = 0 .. L, batch x kv head). It owns the
// dq rows of chunk c for the kv head's query heads and the dk, dv rows of
// neighbour chunk c - 1: no atomics, deterministic. Two sweeps over the m x K*R
// score tile, as in the Triton backward: keys outside (dk, dv), then queries
// outside (dq).
//
// Matrix products: fp16/bf16 tiles use tensor cores through WMMA (16x16x16, fp32
// accumulate; sm_80+); fp32 tiles use plain FMA loops (exact fp32, as the
// tolerances require). Head dims up to 128, padded to a multiple of 16 with zeros.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

namespace retro_kernels::cuda {
namespace {

constexpr int NUM_WARPS = 4;
constexpr int NUM_THREADS = NUM_WARPS * 32;
constexpr int MAX_HEAD_DIM = 128;
constexpr int SKEW_T = 8;  // padding (elements) of 16-bit tiles' rows: fewer bank conflicts,
constexpr int SKEW_F = 4;  // and of fp32 tiles' rows; both keep WMMA's alignment rules
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
constexpr bool kHasTensorCores = false;  // bf16 WMMA needs sm_80; below it, FMA loops
#else
constexpr bool kHasTensorCores = true;
#endif

// -- element conversions (torch builds with __CUDA_NO_HALF_CONVERSIONS__) ----------------
__device__ __forceinline__ float to_f(float x) { return x; }
[[maybe_unused]] __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
[[maybe_unused]] __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// -- tile products on shared memory -----------------------------------------------------
// All matrices are row-major with the given leading dims (in elements); rows, cols
// and kdim are multiples of 16 on the tensor-core path.

template <typename T>
constexpr bool use_wmma() {
  return kHasTensorCores && !std::is_same_v<T, float>;
}

// One warp: C[rows x cols] (= or +=) A[rows x kdim] * B[cols x kdim]^T.
template <typename T>
__device__ void warp_mm_abt(float* C, int ldc, const T* A, int lda, const T* B, int ldb, int rows,
                            int cols, int kdim, bool accumulate) {
  const int lane = threadIdx.x % 32;
  if constexpr (use_wmma<T>()) {
    using namespace nvcuda;
    for (int i0 = 0; i0 < rows; i0 += 16) {
      for (int j0 = 0; j0 < cols; j0 += 16) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        if (accumulate) wmma::load_matrix_sync(acc, C + i0 * ldc + j0, ldc, wmma::mem_row_major);
        else wmma::fill_fragment(acc, 0.0f);
        for (int k0 = 0; k0 < kdim; k0 += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // B^T
          wmma::load_matrix_sync(a, A + i0 * lda + k0, lda);
          wmma::load_matrix_sync(b, B + j0 * ldb + k0, ldb);
          wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(C + i0 * ldc + j0, acc, ldc, wmma::mem_row_major);
      }
    }
  } else {
    for (int idx = lane; idx < rows * cols; idx += 32) {
      const int i = idx / cols, j = idx % cols;
      float acc = accumulate ? C[i * ldc + j] : 0.0f;
      for (int k = 0; k < kdim; ++k) acc = fmaf(to_f(A[i * lda + k]), to_f(B[j * ldb + k]), acc);
      C[i * ldc + j] = acc;
    }
  }
}

// One warp: C[rows x cols] += A[rows x kdim] * B[kdim x cols].
template <typename T>
__device__ void warp_mm_ab(float* C, int ldc, const T* A, int lda, const T* B, int ldb, int rows,
                           int cols, int kdim) {
  const int lane = threadIdx.x % 32;
  if constexpr (use_wmma<T>()) {
    using namespace nvcuda;
    for (int i0 = 0; i0 < rows; i0 += 16) {
      for (int j0 = 0; j0 < cols; j0 += 16) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::load_matrix_sync(acc, C + i0 * ldc + j0, ldc, wmma::mem_row_major);
        for (int k0 = 0; k0 < kdim; k0 += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
          wmma::load_matrix_sync(a, A + i0 * lda + k0, lda);
          wmma::load_matrix_sync(b, B + k0 * ldb + j0, ldb);
          wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(C + i0 * ldc + j0, acc, ldc, wmma::mem_row_major);
      }
    }
  } else {
    for (int idx = lane; idx < rows * cols; idx += 32) {
      const int i = idx / cols, j = idx % cols;
      float acc = C[i * ldc + j];
      for (int k = 0; k < kdim; ++k) acc = fmaf(to_f(A[i * lda + k]), to_f(B[k * ldb + j]), acc);
      C[i * ldc + j] = acc;
    }
  }
}

// The whole block: C[rows x cols] += A^T B with A stored kdim x rows and B kdim x cols.
// Output tiles are split between the warps, so each element has one writer.
template <typename T>
__device__ void block_mm_atb(float* C, int ldc, const T* A, int lda, const T* B, int ldb, int rows,
                             int cols, int kdim) {
  if constexpr (use_wmma<T>()) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int col_tiles = cols / 16;
    for (int f = warp; f < (rows / 16) * col_tiles; f += NUM_WARPS) {
      const int i0 = (f / col_tiles) * 16, j0 = (f % col_tiles) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, C + i0 * ldc + j0, ldc, wmma::mem_row_major);
      for (int k0 = 0; k0 < kdim; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;  // A^T
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, A + k0 * lda + i0, lda);
        wmma::load_matrix_sync(b, B + k0 * ldb + j0, ldb);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(C + i0 * ldc + j0, acc, ldc, wmma::mem_row_major);
    }
  } else {
    for (int idx = threadIdx.x; idx < rows * cols; idx += NUM_THREADS) {
      const int i = idx / cols, j = idx % cols;
      float acc = C[i * ldc + j];
      for (int k = 0; k < kdim; ++k) acc = fmaf(to_f(A[k * lda + i]), to_f(B[k * ldb + j]), acc);
      C[i * ldc + j] = acc;
    }
  }
}

// -- parameters and address arithmetic ------------------------------------------------------

struct Params {
  const void* q; const void* k; const void* v; const uint8_t* mask;
  const void* dout; const float* lse_in; const float* delta;  // backward only
  void* out; float* lse;                                       // forward outputs
  void* dq; void* dk; void* dv;                                // backward outputs (contiguous)
  int64_t sq_b, sq_n, sq_h, sq_d;
  int64_t sk_b, sk_l, sk_k, sk_r, sk_h, sk_d;
  int64_t sv_b, sv_l, sv_k, sv_r, sv_h, sv_d;
  int64_t sm_b, sm_l, sm_k, sm_r;
  int64_t sdo_b, sdo_n, sdo_h, sdo_d;
  int B, N, Hq, Hkv, group, D, d_pad, L, R, keys, m, start_pos, first_chunk, m_blocks;
  float scale, qk_scale;  // qk_scale = scale * log2(e)
};

// Index n in q of row `i` of query chunk c, and whether that row is a real token.
__device__ __forceinline__ bool query_row(const Params& p, int c, int i, int& n) {
  n = c * p.m - 1 + i - p.start_pos;
  return i < p.m && n >= 0 && n < p.N;
}

// Rows [row_start, row_start + rows) of query chunk c, head h -> tile (zeros where not real).
template <typename T>
__device__ void load_query_tile(T* tile, int ld, const void* src, int64_t s_b, int64_t s_n, int64_t s_h,
                                int64_t s_d, const Params& p, int b, int h, int c, int row_start, int rows) {
  const T* base = static_cast<const T*>(src) + b * s_b + h * s_h;
  for (int idx = threadIdx.x; idx < rows * p.d_pad; idx += NUM_THREADS) {
    const int i = idx / p.d_pad, d = idx % p.d_pad;
    int n;
    const bool real = query_row(p, c, row_start + i, n) && d < p.D;
    tile[i * ld + d] = real ? base[n * s_n + d * s_d] : from_f<T>(0.0f);
  }
}

// Keys [key_start, key_start + BLOCK_N) of neighbour chunk u, kv head hk -> tiles, and the
// key bias (0 for a real key, -inf for a masked or out-of-range one).
template <typename T, int BLOCK_N>
__device__ void load_key_tiles(T* k_tile, T* v_tile, float* bias, int ld, const Params& p, int b, int u,
                               int hk, int key_start) {
  const T* kb = static_cast<const T*>(p.k) + b * p.sk_b + u * p.sk_l + hk * p.sk_h;
  const T* vb = static_cast<const T*>(p.v) + b * p.sv_b + u * p.sv_l + hk * p.sv_h;
  for (int idx = threadIdx.x; idx < BLOCK_N * p.d_pad; idx += NUM_THREADS) {
    const int jj = idx / p.d_pad, d = idx % p.d_pad;
    const int j = key_start + jj;
    const bool real = j < p.keys && d < p.D;
    const int kk = j / p.R, r = j % p.R;
    k_tile[jj * ld + d] = real ? kb[kk * p.sk_k + r * p.sk_r + d * p.sk_d] : from_f<T>(0.0f);
    v_tile[jj * ld + d] = real ? vb[kk * p.sv_k + r * p.sv_r + d * p.sv_d] : from_f<T>(0.0f);
  }
  for (int jj = threadIdx.x; jj < BLOCK_N; jj += NUM_THREADS) {
    const int j = key_start + jj;
    bool real = j < p.keys;
    if (real && p.mask != nullptr) {
      real = p.mask[b * p.sm_b + u * p.sm_l + (j / p.R) * p.sm_k + (j % p.R) * p.sm_r] != 0;
    }
    bias[jj] = real ? 0.0f : -INFINITY;
  }
}

// Shared-memory carving: regions rounded up to 128 bytes.
struct Carver {
  size_t offset = 0;
  __host__ __device__ size_t take(size_t bytes) {
    const size_t at = offset;
    offset += (bytes + 127) / 128 * 128;
    return at;
  }
};

// -----------------------------------------------------------------------------------------
// Forward
// -----------------------------------------------------------------------------------------

template <typename T, int BLOCK_M, int BLOCK_N>
struct FwdLayout {
  size_t q, k, v, s, pr, o, bias, m, l, bytes;
  __host__ __device__ explicit FwdLayout(int d_pad) {
    const int ldt = d_pad + SKEW_T, ldo = d_pad + SKEW_F;
    Carver c;
    q = c.take(sizeof(T) * BLOCK_M * ldt);
    k = c.take(sizeof(T) * BLOCK_N * ldt);
    v = c.take(sizeof(T) * BLOCK_N * ldt);
    s = c.take(sizeof(float) * BLOCK_M * (BLOCK_N + SKEW_F));
    pr = c.take(sizeof(T) * BLOCK_M * (BLOCK_N + SKEW_T));
    o = c.take(sizeof(float) * BLOCK_M * ldo);
    bias = c.take(sizeof(float) * BLOCK_N);
    m = c.take(sizeof(float) * BLOCK_M);
    l = c.take(sizeof(float) * BLOCK_M);
    bytes = c.offset;
  }
};

template <typename T, int BLOCK_M, int BLOCK_N>
__global__ void __launch_bounds__(NUM_THREADS) cca_fwd_kernel(const Params p) {
  constexpr int ROWS_PER_WARP = BLOCK_M / NUM_WARPS;
  static_assert(!use_wmma<T>() || ROWS_PER_WARP == 16, "tensor-core tiles need 16 rows per warp");
  extern __shared__ __align__(128) unsigned char smem[];
  const FwdLayout<T, BLOCK_M, BLOCK_N> lay(p.d_pad);
  T* q_s = reinterpret_cast<T*>(smem + lay.q);
  T* k_s = reinterpret_cast<T*>(smem + lay.k);
  T* v_s = reinterpret_cast<T*>(smem + lay.v);
  float* s_s = reinterpret_cast<float*>(smem + lay.s);
  T* p_s = reinterpret_cast<T*>(smem + lay.pr);
  float* o_s = reinterpret_cast<float*>(smem + lay.o);
  float* bias_s = reinterpret_cast<float*>(smem + lay.bias);
  float* m_s = reinterpret_cast<float*>(smem + lay.m);
  float* l_s = reinterpret_cast<float*>(smem + lay.l);
  const int ldt = p.d_pad + SKEW_T, lds = BLOCK_N + SKEW_F, ldp = BLOCK_N + SKEW_T, ldo = p.d_pad + SKEW_F;

  // -- which rows, which head, which neighbours ------------------------------------------
  const int c = p.first_chunk + blockIdx.x / p.m_blocks;
  const int row_start = (blockIdx.x % p.m_blocks) * BLOCK_M;
  const int b = blockIdx.y / p.Hq, h = blockIdx.y % p.Hq, hk = h / p.group;
  const int u = c - 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r0 = warp * ROWS_PER_WARP;  // this warp's rows of the tile

  load_query_tile(q_s, ldt, p.q, p.sq_b, p.sq_n, p.sq_h, p.sq_d, p, b, h, c, row_start, BLOCK_M);
  for (int idx = threadIdx.x; idx < BLOCK_M * ldo; idx += NUM_THREADS) o_s[idx] = 0.0f;
  for (int i = threadIdx.x; i < BLOCK_M; i += NUM_THREADS) { m_s[i] = -INFINITY; l_s[i] = 0.0f; }
  __syncthreads();  // (the key loop may not run: query chunk 0)

  // -- online softmax over the chunk's keys, BLOCK_N at a time -----------------------------
  const int n_keys = c > 0 ? p.keys : 0;  // query chunk 0 reads nothing: zeros
  for (int key_start = 0; key_start < n_keys; key_start += BLOCK_N) {
    __syncthreads();  // the previous tile's k_s, v_s are no longer read
    load_key_tiles<T, BLOCK_N>(k_s, v_s, bias_s, ldt, p, b, u, hk, key_start);
    __syncthreads();

    // scores of this warp's rows (log2 units, so that exp2 can be used)
    warp_mm_abt(s_s + r0 * lds, lds, q_s + r0 * ldt, ldt, k_s, ldt, ROWS_PER_WARP, BLOCK_N, p.d_pad, false);
    __syncwarp();
    for (int i = r0; i < r0 + ROWS_PER_WARP; ++i) {
      float row_max = -INFINITY;
      for (int j = lane; j < BLOCK_N; j += 32) {
        const float s = s_s[i * lds + j] * p.qk_scale + bias_s[j];
        s_s[i * lds + j] = s;
        row_max = fmaxf(row_max, s);
      }
      row_max = warp_max(row_max);
      // rescale the running sums to the new row maximum; rows that have seen no real key
      // yet keep max -inf, and subtract 0 instead to avoid NaN
      const float m_old = m_s[i];
      const float m_new = fmaxf(m_old, row_max);
      const float m_sub = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = exp2f(m_old - m_sub);
      float row_sum = 0.0f;
      for (int j = lane; j < BLOCK_N; j += 32) {
        const float pr = exp2f(s_s[i * lds + j] - m_sub);
        p_s[i * ldp + j] = from_f<T>(pr);
        row_sum += pr;
      }
      row_sum = warp_sum(row_sum);
      for (int d = lane; d < p.d_pad; d += 32) o_s[i * ldo + d] *= alpha;
      __syncwarp();  // every lane has read m_s[i], l_s[i]
      if (lane == 0) {
        l_s[i] = l_s[i] * alpha + row_sum;
        m_s[i] = m_new;
      }
    }
    __syncwarp();
    warp_mm_ab(o_s + r0 * ldo, ldo, p_s + r0 * ldp, ldp, v_s, ldt, ROWS_PER_WARP, p.d_pad, BLOCK_N);
  }
  __syncwarp();

  // -- normalise and store this warp's rows; rows with no real key: zeros, lse = +inf ------
  T* out = static_cast<T*>(p.out);
  for (int i = r0; i < r0 + ROWS_PER_WARP; ++i) {
    int n;
    if (!query_row(p, c, row_start + i, n)) continue;
    const float l = l_s[i];
    const bool has_key = l > 0.0f;
    const float inv = has_key ? 1.0f / l : 0.0f;
    T* out_row = out + ((static_cast<int64_t>(b) * p.N + n) * p.Hq + h) * p.D;  // contiguous
    for (int d = lane; d < p.D; d += 32) out_row[d] = from_f<T>(o_s[i * ldo + d] * inv);
    if (lane == 0) {
      p.lse[(static_cast<int64_t>(b) * p.Hq + h) * p.N + n] =
          has_key ? (m_s[i] + log2f(l)) * LN2 : INFINITY;
    }
  }
}

// -----------------------------------------------------------------------------------------
// Backward
// -----------------------------------------------------------------------------------------

template <typename T, int BLOCK_M, int BLOCK_N>
struct BwdLayout {
  size_t k, v, q, dO, s, dp, pr, ds, acc, bias, lse, delta, bytes;
  __host__ __device__ explicit BwdLayout(int d_pad) {
    const int ldt = d_pad + SKEW_T, ldf = d_pad + SKEW_F;
    Carver c;
    k = c.take(sizeof(T) * BLOCK_N * ldt);
    v = c.take(sizeof(T) * BLOCK_N * ldt);
    q = c.take(sizeof(T) * BLOCK_M * ldt);
    dO = c.take(sizeof(T) * BLOCK_M * ldt);
    s = c.take(sizeof(float) * BLOCK_M * (BLOCK_N + SKEW_F));
    dp = c.take(sizeof(float) * BLOCK_M * (BLOCK_N + SKEW_F));
    pr = c.take(sizeof(T) * BLOCK_M * (BLOCK_N + SKEW_T));
    ds = c.take(sizeof(T) * BLOCK_M * (BLOCK_N + SKEW_T));
    // sweep 1: dk and dv of a key tile (2 x BLOCK_N rows); sweep 2: dq of a row tile
    const int acc_rows = 2 * BLOCK_N > BLOCK_M ? 2 * BLOCK_N : BLOCK_M;
    acc = c.take(sizeof(float) * acc_rows * ldf);
    bias = c.take(sizeof(float) * BLOCK_N);
    lse = c.take(sizeof(float) * BLOCK_M);
    delta = c.take(sizeof(float) * BLOCK_M);
    bytes = c.offset;
  }
};

// For this warp's rows: P = exp2(S * qk_scale + bias - lse) into s_s (fp32) and p_s (T, if
// given); dP = dO V^T; dS = P * (dP - delta) into ds_s (T).
template <typename T, int BLOCK_N>
__device__ void recompute_ds(const Params& p, int r0, int rows, const T* q_s, const T* do_s,
                             const T* k_s, const T* v_s, const float* bias_s, const float* lse_s,
                             const float* delta_s, float* s_s, float* dp_s, T* p_s, T* ds_s, int ldt) {
  const int lane = threadIdx.x % 32, lds = BLOCK_N + SKEW_F, ldp = BLOCK_N + SKEW_T;
  warp_mm_abt(s_s + r0 * lds, lds, q_s + r0 * ldt, ldt, k_s, ldt, rows, BLOCK_N, p.d_pad, false);
  warp_mm_abt(dp_s + r0 * lds, lds, do_s + r0 * ldt, ldt, v_s, ldt, rows, BLOCK_N, p.d_pad, false);
  __syncwarp();
  for (int idx = lane; idx < rows * BLOCK_N; idx += 32) {
    const int i = r0 + idx / BLOCK_N, j = idx % BLOCK_N;
    // masked keys (bias -inf) and rows with no key (lse +inf) get probability 0
    const float pr = exp2f(s_s[i * lds + j] * p.qk_scale + bias_s[j] - lse_s[i]);
    if (p_s != nullptr) p_s[i * ldp + j] = from_f<T>(pr);
    ds_s[i * ldp + j] = from_f<T>(pr * (dp_s[i * lds + j] - delta_s[i]));
  }
}

// Query rows of a tile, with their lse (log2 units; +inf if not real) and delta.
template <typename T>
__device__ void load_row_tiles(const Params& p, int b, int h, int c, int row_start, T* q_s, T* do_s,
                               float* lse_s, float* delta_s, int ldt, int rows) {
  load_query_tile(q_s, ldt, p.q, p.sq_b, p.sq_n, p.sq_h, p.sq_d, p, b, h, c, row_start, rows);
  load_query_tile(do_s, ldt, p.dout, p.sdo_b, p.sdo_n, p.sdo_h, p.sdo_d, p, b, h, c, row_start, rows);
  for (int i = threadIdx.x; i < rows; i += NUM_THREADS) {
    int n;
    const bool real = query_row(p, c, row_start + i, n);
    const int64_t stat = (static_cast<int64_t>(b) * p.Hq + h) * p.N + n;
    lse_s[i] = real ? p.lse_in[stat] * LOG2E : INFINITY;
    delta_s[i] = real ? p.delta[stat] : 0.0f;
  }
}

template <typename T, int BLOCK_M, int BLOCK_N>
__global__ void __launch_bounds__(NUM_THREADS) cca_bwd_kernel(const Params p) {
  constexpr int ROWS_PER_WARP = BLOCK_M / NUM_WARPS;
  static_assert(!use_wmma<T>() || ROWS_PER_WARP == 16, "tensor-core tiles need 16 rows per warp");
  extern __shared__ __align__(128) unsigned char smem[];
  const BwdLayout<T, BLOCK_M, BLOCK_N> lay(p.d_pad);
  T* k_s = reinterpret_cast<T*>(smem + lay.k);
  T* v_s = reinterpret_cast<T*>(smem + lay.v);
  T* q_s = reinterpret_cast<T*>(smem + lay.q);
  T* do_s = reinterpret_cast<T*>(smem + lay.dO);
  float* s_s = reinterpret_cast<float*>(smem + lay.s);
  float* dp_s = reinterpret_cast<float*>(smem + lay.dp);
  T* p_s = reinterpret_cast<T*>(smem + lay.pr);
  T* ds_s = reinterpret_cast<T*>(smem + lay.ds);
  float* acc_s = reinterpret_cast<float*>(smem + lay.acc);
  float* bias_s = reinterpret_cast<float*>(smem + lay.bias);
  float* lse_s = reinterpret_cast<float*>(smem + lay.lse);
  float* delta_s = reinterpret_cast<float*>(smem + lay.delta);
  const int ldt = p.d_pad + SKEW_T, ldf = p.d_pad + SKEW_F, ldp = BLOCK_N + SKEW_T;

  const int c = blockIdx.x;  // query chunk; it reads neighbour chunk u = c - 1
  const int b = blockIdx.y / p.Hkv, hk = blockIdx.y % p.Hkv;
  const int u = c - 1;
  const int r0 = (threadIdx.x / 32) * ROWS_PER_WARP;
  const int n_keys = c > 0 ? p.keys : 0;
  const int64_t kv_row = p.Hkv * p.D;  // dk, dv are contiguous (B, L, K*R, Hkv, D)

  // -- sweep 1: for each key tile, dV = P^T dO and dK = dS^T Q * scale --------------------
  // summed over the group's query heads and the chunk's query rows
  float* dk_s = acc_s;
  float* dv_s = acc_s + BLOCK_N * ldf;
  for (int key_start = 0; key_start < n_keys; key_start += BLOCK_N) {
    __syncthreads();
    load_key_tiles<T, BLOCK_N>(k_s, v_s, bias_s, ldt, p, b, u, hk, key_start);
    for (int idx = threadIdx.x; idx < 2 * BLOCK_N * ldf; idx += NUM_THREADS) acc_s[idx] = 0.0f;
    for (int g = 0; g < p.group; ++g) {
      const int h = hk * p.group + g;
      for (int row_start = 0; row_start < p.m; row_start += BLOCK_M) {
        __syncthreads();  // the previous row tile is no longer read
        load_row_tiles(p, b, h, c, row_start, q_s, do_s, lse_s, delta_s, ldt, BLOCK_M);
        __syncthreads();
        recompute_ds<T, BLOCK_N>(p, r0, ROWS_PER_WARP, q_s, do_s, k_s, v_s, bias_s, lse_s, delta_s,
                                 s_s, dp_s, p_s, ds_s, ldt);
        __syncthreads();  // every row of P and dS is ready
        block_mm_atb(dv_s, ldf, p_s, ldp, do_s, ldt, BLOCK_N, p.d_pad, BLOCK_M);
        block_mm_atb(dk_s, ldf, ds_s, ldp, q_s, ldt, BLOCK_N, p.d_pad, BLOCK_M);
      }
    }
    __syncthreads();
    T* dk = static_cast<T*>(p.dk) + ((static_cast<int64_t>(b) * p.L + u) * p.keys) * kv_row + hk * p.D;
    T* dv = static_cast<T*>(p.dv) + ((static_cast<int64_t>(b) * p.L + u) * p.keys) * kv_row + hk * p.D;
    for (int idx = threadIdx.x; idx < BLOCK_N * p.D; idx += NUM_THREADS) {
      const int jj = idx / p.D, d = idx % p.D;
      const int j = key_start + jj;
      if (j >= p.keys) continue;
      dk[j * kv_row + d] = from_f<T>(dk_s[jj * ldf + d] * p.scale);
      dv[j * kv_row + d] = from_f<T>(dv_s[jj * ldf + d]);
    }
  }

  // -- sweep 2: for each query tile, dQ = dS K * scale -------------------------------------
  float* dq_s = acc_s;
  T* dq = static_cast<T*>(p.dq);
  for (int g = 0; g < p.group; ++g) {
    const int h = hk * p.group + g;
    for (int row_start = 0; row_start < p.m; row_start += BLOCK_M) {
      __syncthreads();
      load_row_tiles(p, b, h, c, row_start, q_s, do_s, lse_s, delta_s, ldt, BLOCK_M);
      for (int idx = threadIdx.x; idx < BLOCK_M * ldf; idx += NUM_THREADS) dq_s[idx] = 0.0f;
      for (int key_start = 0; key_start < n_keys; key_start += BLOCK_N) {
        __syncthreads();
        load_key_tiles<T, BLOCK_N>(k_s, v_s, bias_s, ldt, p, b, u, hk, key_start);
        __syncthreads();
        recompute_ds<T, BLOCK_N>(p, r0, ROWS_PER_WARP, q_s, do_s, k_s, v_s, bias_s, lse_s, delta_s,
                                 s_s, dp_s, nullptr, ds_s, ldt);
        __syncwarp();
        warp_mm_ab(dq_s + r0 * ldf, ldf, ds_s + r0 * ldp, ldp, k_s, ldt, ROWS_PER_WARP, p.d_pad, BLOCK_N);
      }
      __syncthreads();
      for (int idx = threadIdx.x; idx < BLOCK_M * p.D; idx += NUM_THREADS) {
        const int i = idx / p.D, d = idx % p.D;
        int n;
        if (!query_row(p, c, row_start + i, n)) continue;
        dq[((static_cast<int64_t>(b) * p.N + n) * p.Hq + h) * p.D + d] = from_f<T>(dq_s[i * ldf + d] * p.scale);
      }
    }
  }
}

// -----------------------------------------------------------------------------------------
// Launchers
// -----------------------------------------------------------------------------------------

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& mask, int64_t chunk_size, int64_t start_pos) {
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device(),
              "retro_kernels CUDA chunked_cross_attention: q, k, v must be on one CUDA device");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 6 && v.sizes() == k.sizes(),
              "chunked_cross_attention: q must be (B, N, Hq, D), k and v (B, L, K, R, Hkv, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "chunked_cross_attention: q, k, v must share one dtype");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(5) == q.size(3) && k.size(4) > 0 &&
                  q.size(2) % k.size(4) == 0,
              "chunked_cross_attention: k must match q's batch and head dim, and Hq % Hkv == 0");
  TORCH_CHECK(q.size(3) <= MAX_HEAD_DIM, "chunked_cross_attention CUDA: head dim must be <= ", MAX_HEAD_DIM);
  TORCH_CHECK(chunk_size >= 1 && start_pos >= 0, "chunked_cross_attention: bad chunk_size/start_pos");
  TORCH_CHECK(k.size(1) >= (start_pos + q.size(1)) / chunk_size,
              "chunked_cross_attention: k holds too few neighbour chunks");
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->device() == q.device() && mask->dim() == 4 &&
                    mask->size(0) == k.size(0) && mask->size(1) == k.size(1) &&
                    mask->size(2) == k.size(2) && mask->size(3) == k.size(3),
                "chunked_cross_attention: neighbour_mask must be a bool (B, L, K, R) tensor on q's device");
  }
}

Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const c10::optional<at::Tensor>& mask, int64_t chunk_size, double scale, int64_t start_pos) {
  Params p{};
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  p.sq_b = q.stride(0); p.sq_n = q.stride(1); p.sq_h = q.stride(2); p.sq_d = q.stride(3);
  p.sk_b = k.stride(0); p.sk_l = k.stride(1); p.sk_k = k.stride(2); p.sk_r = k.stride(3); p.sk_h = k.stride(4); p.sk_d = k.stride(5);
  p.sv_b = v.stride(0); p.sv_l = v.stride(1); p.sv_k = v.stride(2); p.sv_r = v.stride(3); p.sv_h = v.stride(4); p.sv_d = v.stride(5);
  if (mask.has_value() && mask->defined()) {
    p.mask = static_cast<const uint8_t*>(mask->data_ptr());
    p.sm_b = mask->stride(0); p.sm_l = mask->stride(1); p.sm_k = mask->stride(2); p.sm_r = mask->stride(3);
  }
  p.B = q.size(0); p.N = q.size(1); p.Hq = q.size(2); p.D = q.size(3);
  p.L = k.size(1); p.R = k.size(3); p.Hkv = k.size(4);
  p.keys = k.size(2) * k.size(3);
  p.group = p.Hq / p.Hkv;
  p.d_pad = (p.D + 15) / 16 * 16;
  p.m = chunk_size; p.start_pos = start_pos;
  p.scale = static_cast<float>(scale);
  p.qk_scale = static_cast<float>(scale) * LOG2E;
  return p;
}

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, size_t smem_bytes, const Params& p) {
  if (grid.x == 0 || grid.y == 0) return;
  int device = 0, max_bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(smem_bytes <= static_cast<size_t>(max_bytes), "chunked_cross_attention CUDA: the tiles need ",
              smem_bytes, " bytes of shared memory, this GPU allows ", max_bytes,
              " per block; use a smaller head dim, fp16/bf16, or backend='triton'");
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
  }
  kernel<<<grid, NUM_THREADS, smem_bytes, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Block sizes per storage type: tensor-core tiles need 16 rows per warp; fp32 tiles are
// smaller so that they fit in shared memory.
template <typename T> struct Blocks { static constexpr int FWD_M = 64, FWD_N = 64, BWD_M = 64, BWD_N = 32; };
template <> struct Blocks<float> { static constexpr int FWD_M = 32, FWD_N = 64, BWD_M = 32, BWD_N = 32; };

template <typename T>
void forward_launch(Params& p) {
  using Bl = Blocks<T>;
  p.m_blocks = (p.m + Bl::FWD_M - 1) / Bl::FWD_M;
  p.first_chunk = (p.start_pos + 1) / p.m;
  const int last_chunk = (p.start_pos + p.N) / p.m;
  const dim3 grid((last_chunk - p.first_chunk + 1) * p.m_blocks, p.B * p.Hq);
  const FwdLayout<T, Bl::FWD_M, Bl::FWD_N> lay(p.d_pad);
  launch(cca_fwd_kernel<T, Bl::FWD_M, Bl::FWD_N>, grid, lay.bytes, p);
}

template <typename T>
void backward_launch(const Params& p) {
  using Bl = Blocks<T>;
  // one block per query chunk c = 0 .. L: chunk 0 writes the zero rows of dq, chunk c >= 1
  // the gradients of neighbour chunk c - 1 (zeros if no query reads it)
  const dim3 grid(p.L + 1, p.B * p.Hkv);
  const BwdLayout<T, Bl::BWD_M, Bl::BWD_N> lay(p.d_pad);
  launch(cca_bwd_kernel<T, Bl::BWD_M, Bl::BWD_N>, grid, lay.bytes, p);
}

std::tuple<at::Tensor, at::Tensor> cca_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const c10::optional<at::Tensor>& mask, int64_t chunk_size,
                                               double scale, int64_t start_pos) {
  check_inputs(q, k, v, mask, chunk_size, start_pos);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  Params p = make_params(q, k, v, mask, chunk_size, scale, start_pos);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  switch (q.scalar_type()) {
    case at::kFloat: forward_launch<float>(p); break;
    case at::kHalf: forward_launch<__half>(p); break;
    case at::kBFloat16: forward_launch<__nv_bfloat16>(p); break;
    default: TORCH_CHECK(false, "chunked_cross_attention CUDA: dtype must be float32, float16 or bfloat16");
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cca_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse_in,
    int64_t chunk_size, double scale, int64_t start_pos) {
  check_inputs(q, k, v, mask, chunk_size, start_pos);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type() && dout.device() == q.device() && out.device() == q.device(),
              "chunked_cross_attention backward: dout and out must be like q");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 && lse_in.size(0) == q.size(0) &&
                  lse_in.size(1) == q.size(2) && lse_in.size(2) == q.size(1) && lse_in.device() == q.device(),
              "chunked_cross_attention backward: lse must be fp32 (B, Hq, N) on q's device");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0 && k.numel() == 0) return {dq, dk, dv};
  if (q.numel() == 0 || q.size(1) == 0) {  // no query: no gradient flows
    dq.zero_(); dk.zero_(); dv.zero_();
    return {dq, dk, dv};
  }
  // rowsum(dO * O): the softmax-backward correction of every query row, (B, Hq, N)
  const at::Tensor delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1).transpose(1, 2).contiguous();
  const at::Tensor lse = lse_in.contiguous();
  Params p = make_params(q, k, v, mask, chunk_size, scale, start_pos);
  p.dout = dout.data_ptr();
  p.sdo_b = dout.stride(0); p.sdo_n = dout.stride(1); p.sdo_h = dout.stride(2); p.sdo_d = dout.stride(3);
  p.lse_in = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
  switch (q.scalar_type()) {
    case at::kFloat: backward_launch<float>(p); break;
    case at::kHalf: backward_launch<__half>(p); break;
    case at::kBFloat16: backward_launch<__nv_bfloat16>(p); break;
    default: TORCH_CHECK(false, "chunked_cross_attention CUDA: dtype must be float32, float16 or bfloat16");
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace retro_kernels::cuda

TORCH_LIBRARY(retro_kernels_cuda, m) {
  m.def("chunked_cross_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? neighbour_mask, "
        "int chunk_size, float scale, int start_pos) -> (Tensor, Tensor)");
  m.def("chunked_cross_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, "
        "Tensor? neighbour_mask, Tensor out, Tensor lse, int chunk_size, float scale, "
        "int start_pos) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(retro_kernels_cuda, CUDA, m) {
  m.impl("chunked_cross_attention_fwd", &retro_kernels::cuda::cca_forward);
  m.impl("chunked_cross_attention_bwd", &retro_kernels::cuda::cca_backward);
}
