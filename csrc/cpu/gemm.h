// The fp32 GEMM under every CPU kernel, and the candidates it chooses from.
//
//   C (M x N, ldc) = alpha * op(A) op(B) + beta * C      (row-major)
//
// Candidates: the AVX2 + FMA micro-kernel (gemm_avx2.cpp), the AVX-512F micro-kernel
// (gemm_avx512.cpp), the BLAS sgemm that libtorch exports (MKL on x86-64 wheels) and
// at::mm. None wins everywhere: on AMD Zen3 the AVX2 kernel beats MKL on the kernels'
// small tiles, on Intel Sapphire Rapids MKL beats it by 1.4x. So gemm() measures: the
// first call of each shape class (transposes and the power-of-two size bucket of M, N
// and K) times every candidate the CPU can run on that very call's operands, interleaved,
// best of several rounds, and keeps the fastest for that class for the life of the
// process. A measurement costs a few milliseconds per class, and a run at the paper's
// shapes sees a dozen (30-50 ms in all), so nothing is cached on disk. RETRO_KERNELS_CPU_GEMM=avx2|avx512|blas|aten
// forces one candidate (=auto, or unset, measures).
//
// Deterministic within a process: a class always uses the candidate it chose, every
// candidate gives the same bits for the same operands (the micro-kernels run one FMA
// chain per element in depth order; the BLAS runs single-threaded on 64-byte aligned
// scratch), so results do not depend on the thread count. Another process may choose
// another candidate and round differently (within fp32 GEMM error).
#pragma once

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace retro_kernels::cpu {

class PrefetchQueue;

// C = alpha * op(A) op(B) + beta * C with op(A) M x K (A stored K x M when trans_a),
// op(B) K x N (B stored N x K when trans_b), unit column strides. With beta == 0, C is
// not read. `prefetch` (optional): rows to prefetch while computing (see PrefetchQueue).
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
          int64_t ldc, PrefetchQueue* prefetch = nullptr);

// The candidates, in the order they are listed and tried.
enum class GemmKind : int8_t { avx2, avx512, blas, aten };
constexpr int kGemmKinds = 4;
const char* gemm_kind_name(GemmKind kind);  // "avx2", "avx512", "blas", "aten"
bool gemm_kind_available(GemmKind kind);    // compiled in and the CPU can run it

// gemm() through one given candidate (tests and the measurement); it must be available.
void gemm_with(GemmKind kind, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
               float alpha, const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
               float* C, int64_t ldc, PrefetchQueue* prefetch = nullptr);

// Throws (one line, naming RETRO_KERNELS_CPU_GEMM and the accepted values) when the
// variable is set to something unknown or to a candidate this CPU cannot run. Every op
// calls it before starting any work.
void check_gemm_config();

// What gemm() runs here and has chosen so far, for retro_kernels/cpu/gemm.py to report:
// (the forced candidate, or -1; the RETRO_KERNELS_CPU_GEMM error, or ""; the candidates
// this CPU can run; the BLAS version, or ""; per measured class one row of 10 numbers:
// trans_a, trans_b, M, N, K, the chosen candidate, each candidate's best time in us
// (< 0: not timed); the milliseconds spent measuring). Candidates are GemmKind values.
using GemmChoices = std::tuple<int64_t, std::string, std::vector<int64_t>, std::string, std::vector<double>, double>;
GemmChoices gemm_choices();

// The micro-kernels behind the first two candidates (same contract, K >= 1); call them
// only on a CPU that has their ISA. Defined on x86-64 with GCC or Clang.
#if defined(__x86_64__) && defined(__GNUC__)
#define RK_HAVE_GEMM_AVX2 1
#define RK_HAVE_GEMM_AVX512 1
void gemm_avx2(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
               int64_t ldc, PrefetchQueue* prefetch);
void gemm_avx512(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                 const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                 int64_t ldc, PrefetchQueue* prefetch);
#endif

}  // namespace retro_kernels::cpu
