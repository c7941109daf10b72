// See common.h. The loops here are plain C++ written for the auto-vectoriser
// (`#pragma omp simd`, no branches in the bodies; built with -fno-trapping-math,
// as PyTorch is, without which GCC will not if-convert the selects). On x86-64 with GCC each is
// compiled twice, for baseline x86-64 and for x86-64-v3 (AVX2 + FMA), and the
// loader picks the clone that the running CPU supports: no -march=native.
#include "common.h"

#include <ATen/ATen.h>

#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RK_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RK_SIMD_CLONES
#endif

// The Fortran BLAS sgemm that PyTorch's own matmul calls, when libtorch exports
// it (x86-64 wheels link MKL, LP64). Declared weak: when it is absent the
// pointer is null and we fall back to at::mm on views of the same memory.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

namespace retro_kernels::cpu {

namespace {

enum class GemmBackend { avx2, blas, aten };

// The micro-kernel when the CPU has AVX2 + FMA, else MKL's sgemm when libtorch exports
// it, else at::mm. RETRO_KERNELS_CPU_GEMM=blas / =aten forces one of the other two
// (tests and benchmarks run all of them); =blas without sgemm_ falls back to aten.
GemmBackend backend() {
  static const GemmBackend chosen = [] {
    const char* env = std::getenv("RETRO_KERNELS_CPU_GEMM");
    const bool want_aten = env != nullptr && std::strcmp(env, "aten") == 0;
    const bool want_blas = env != nullptr && std::strcmp(env, "blas") == 0;
    if (want_aten) return GemmBackend::aten;
#ifdef RK_HAVE_GEMM_AVX2
    if (!want_blas && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return GemmBackend::avx2;
#endif
    return sgemm_ != nullptr ? GemmBackend::blas : GemmBackend::aten;
  }();
  return chosen;
}

at::Tensor view_rows(const float* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
  // A row-major (rows x cols) block with leading dim ld, transposed if asked.
  at::Tensor t = at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1},
                               at::TensorOptions().dtype(at::kFloat));
  return trans ? t.t() : t;
}

}  // namespace

const char* gemm_name() {
  switch (backend()) {
    case GemmBackend::avx2: return "avx2 micro-kernel";
    case GemmBackend::blas: return "blas sgemm";
    default: return "aten mm";
  }
}

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
          int64_t ldc, PrefetchQueue* prefetch) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
    return;
  }
#ifdef RK_HAVE_GEMM_AVX2
  if (backend() == GemmBackend::avx2) {
    gemm_avx2(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, prefetch);
    return;
  }
#endif
  if (backend() == GemmBackend::blas) {
    // Column-major BLAS sees our row-major C as C^T = op(B)^T op(A)^T: swap the operands.
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
    sgemm_(&tb, &ta, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
    return;
  }
  at::Tensor a = trans_a ? view_rows(A, K, M, lda, true) : view_rows(A, M, K, lda, false);
  at::Tensor b = trans_b ? view_rows(B, N, K, ldb, true) : view_rows(B, K, N, ldb, false);
  at::Tensor c = view_rows(C, M, N, ldc, false);
  if (beta == 0.0f) {
    at::mm_out(c, a, b);
    if (alpha != 1.0f) c.mul_(alpha);
  } else {
    c.addmm_(a, b, beta, alpha);
  }
}

namespace {

// exp(x) for x <= 88, with exp(x) = 0 for x < -87 (and for x = -inf). Cody-Waite
// reduction x = n ln2 + r, |r| <= ln2/2, then Cephes' degree-6 polynomial for exp(r):
// about 1 ulp, branch-free, so the loops calling it vectorise. The callers pass a score
// minus its row max or its lse (x <= ~0), so there is no upper clamp; one mask serves
// the lower clamp and the zero (GCC then drops the clamp: the lanes it guards are zeroed).
inline float exp_approx(float x) {
  const bool underflow = x < -87.0f;
  const float xc = underflow ? -87.0f : x;
  // round(xc / ln2) with the 1.5 * 2^23 trick (exact for |value| < 2^22, no SSE4.1 needed)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  const float result = p * std::bit_cast<float>(bits);
  return underflow ? 0.0f : result;
}

}  // namespace

RK_SIMD_CLONES
void softmax_rows(float* S, int64_t rows, int64_t cols, const float* key_bias, float scale,
                  float* lse, float* inv_sum) {
  for (int64_t i = 0; i < rows; ++i) {
    float* s = S + i * cols;
    float row_max = -kInf;
    if (key_bias != nullptr) {
#pragma omp simd reduction(max : row_max)
      for (int64_t j = 0; j < cols; ++j) {
        s[j] = s[j] * scale + key_bias[j];
        row_max = s[j] > row_max ? s[j] : row_max;
      }
    } else if (scale != 1.0f) {
#pragma omp simd reduction(max : row_max)
      for (int64_t j = 0; j < cols; ++j) {
        s[j] = s[j] * scale;
        row_max = s[j] > row_max ? s[j] : row_max;
      }
    } else {  // already scaled (the GEMM's alpha): only read the row
#pragma omp simd reduction(max : row_max)
      for (int64_t j = 0; j < cols; ++j) row_max = s[j] > row_max ? s[j] : row_max;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) {
      s[j] = exp_approx(s[j] - row_max);
      sum += s[j];
    }
    lse[i] = row_max + std::log(sum);
    inv_sum[i] = 1.0f / sum;
  }
}

RK_SIMD_CLONES
void probs_from_lse(float* S, int64_t rows, int64_t cols, const float* key_bias, float scale,
                    const float* lse) {
  for (int64_t i = 0; i < rows; ++i) {
    float* s = S + i * cols;
    const float shift = lse[i];
    if (key_bias != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) s[j] = exp_approx(s[j] * scale + key_bias[j] - shift);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) s[j] = exp_approx(s[j] * scale - shift);
    }
  }
}

RK_SIMD_CLONES
void softmax_grad(float* dP, const float* P, int64_t rows, int64_t cols, const float* delta) {
  for (int64_t i = 0; i < rows; ++i) {
    float* g = dP + i * cols;
    const float* p = P + i * cols;
    const float d = delta[i];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) g[j] = p[j] * (g[j] - d);
  }
}

RK_SIMD_CLONES
void scale_rows(float* X, int64_t rows, int64_t cols, int64_t ld, const float* factor) {
  for (int64_t i = 0; i < rows; ++i) {
    float* x = X + i * ld;
    const float f = factor[i];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) x[j] *= f;
  }
}

RK_SIMD_CLONES
float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

}  // namespace retro_kernels::cpu
