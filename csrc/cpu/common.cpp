// See common.h. The loops here are plain C++ written for the auto-vectoriser
// (`#pragma omp simd`, no branches in the bodies; built with -fno-trapping-math,
// as PyTorch is, without which GCC will not if-convert the selects). On x86-64 with GCC each is
// compiled twice, for baseline x86-64 and for x86-64-v3 (AVX2 + FMA), and the
// loader picks the clone that the running CPU supports: no -march=native.
#include "common.h"

#include <bit>
#include <cmath>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RK_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RK_SIMD_CLONES
#endif

namespace retro_kernels::cpu {

namespace {

// exp(x) for x <= 88, with exp(x) = 0 for x < -87 (and for x = -inf). Cody-Waite
// reduction x = n ln2 + r, |r| <= ln2/2, then Cephes' degree-6 polynomial for exp(r):
// about 1 ulp, branch-free, so the loops calling it vectorise. The callers pass a score
// minus its row max (x <= 0), so there is no upper clamp; one mask serves
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

// Row i of S: S <- exp(S - max); returns the sum. The one definition of the probabilities
// that the forward and the backward share.
inline float exp_row(float* s, int64_t cols, float& row_max) {
  float max = -kInf;
#pragma omp simd reduction(max : max)
  for (int64_t j = 0; j < cols; ++j) max = s[j] > max ? s[j] : max;
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < cols; ++j) {
    s[j] = exp_approx(s[j] - max);
    sum += s[j];
  }
  row_max = max;
  return sum;
}

}  // namespace

RK_SIMD_CLONES
void softmax_rows(float* S, int64_t rows, int64_t cols, float* lse, float* inv_sum) {
  for (int64_t i = 0; i < rows; ++i) {
    float row_max;
    const float sum = exp_row(S + i * cols, cols, row_max);
    lse[i] = row_max + std::log(sum);
    inv_sum[i] = 1.0f / sum;
  }
}

RK_SIMD_CLONES
void softmax_probs(float* S, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    float* s = S + i * cols;
    float row_max;
    const float inv = 1.0f / exp_row(s, cols, row_max);
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) s[j] *= inv;
  }
}

RK_SIMD_CLONES
void softmax_grad(float* dP, const float* P, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    float* g = dP + i * cols;
    const float* p = P + i * cols;
    float delta = 0.0f;
#pragma omp simd reduction(+ : delta)
    for (int64_t j = 0; j < cols; ++j) delta += p[j] * g[j];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) g[j] = p[j] * (g[j] - delta);
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

}  // namespace retro_kernels::cpu
