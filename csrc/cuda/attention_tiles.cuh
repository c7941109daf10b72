// Shared pieces of the CUDA attention kernels (chunked_cross_attention.cu,
// neighbour_attention.cu): tile products on shared memory (WMMA on tensor cores for
// fp16/bf16, FMA loops for fp32), warp reductions, shared-memory layouts, the launcher.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

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

// Shared-memory carving: regions rounded up to 128 bytes.
struct Carver {
  size_t offset = 0;
  __host__ __device__ size_t take(size_t bytes) {
    const size_t at = offset;
    offset += (bytes + 127) / 128 * 128;
    return at;
  }
};

// Forward: query tile, key and value tiles, scores, probabilities, fp32 output
// accumulator, key bias, running row max and sum.
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

// Backward: key/value tiles, query/dout tiles, scores and dP (fp32), P and dS (T),
// an fp32 accumulator (dk and dv of a key tile, then dq of a row tile), bias, lse, delta.
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
template <typename T, int BLOCK_N, typename Params>
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

template <typename Kernel, typename Params>
void launch(Kernel kernel, dim3 grid, size_t smem_bytes, const Params& p) {
  if (grid.x == 0 || grid.y == 0) return;
  int device = 0, max_bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(smem_bytes <= static_cast<size_t>(max_bytes), "retro_kernels CUDA: the attention tiles need ",
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

}  // namespace
}  // namespace retro_kernels::cuda
