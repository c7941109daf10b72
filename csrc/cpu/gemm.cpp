// gemm(): the candidate GEMMs and the per-shape-class choice between them (see gemm.h).
#include "gemm.h"

#include "common.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

// The Fortran BLAS sgemm that PyTorch's own matmul calls, when libtorch exports it
// (x86-64 wheels link MKL, LP64), and MKL's C calls for the per-thread thread count and
// the version (the lower-case names are the Fortran ones, arguments by pointer). Weak:
// when absent the pointers are null and the candidate is not offered.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));
extern "C" int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
extern "C" void MKL_Get_Version_String(char* buffer, int len) __attribute__((weak));

namespace retro_kernels::cpu {
namespace {

constexpr GemmKind kKinds[kGemmKinds] = {GemmKind::avx2, GemmKind::avx512, GemmKind::blas, GemmKind::aten};
constexpr const char* kEnv = "RETRO_KERNELS_CPU_GEMM";

bool cpu_has(const char* feature) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (std::strcmp(feature, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::strcmp(feature, "avx512f") == 0) return __builtin_cpu_supports("avx512f");
#endif
  (void)feature;
  return false;
}

// Why `kind` cannot run here (empty when it can).
std::string unavailable_reason(GemmKind kind) {
  switch (kind) {
    case GemmKind::avx2:
#ifdef RK_HAVE_GEMM_AVX2
      return cpu_has("avx2") ? "" : "this CPU has no AVX2 + FMA";
#else
      return "the AVX2 micro-kernel is built only on x86-64 with GCC or Clang";
#endif
    case GemmKind::avx512:
#ifdef RK_HAVE_GEMM_AVX512
      return cpu_has("avx512f") ? "" : "this CPU has no AVX-512F";
#else
      return "the AVX-512 micro-kernel is built only on x86-64 with GCC or Clang";
#endif
    case GemmKind::blas:
      return sgemm_ != nullptr ? "" : "libtorch exports no BLAS sgemm_";
    default:
      return "";
  }
}

// RETRO_KERNELS_CPU_GEMM, read once: measured (unset, empty, "auto"), forced, or an error.
struct Config {
  bool forced = false;
  GemmKind kind = GemmKind::aten;
  std::string error;
};

const Config& config() {
  static const Config parsed = [] {
    Config c;
    const char* env = std::getenv(kEnv);
    if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return c;
    std::string usable = "auto";
    for (GemmKind kind : kKinds)
      if (gemm_kind_available(kind)) usable += std::string(", ") + gemm_kind_name(kind);
    for (GemmKind kind : kKinds) {
      if (std::strcmp(env, gemm_kind_name(kind)) != 0) continue;
      const std::string why = unavailable_reason(kind);
      if (why.empty()) {
        c.forced = true;
        c.kind = kind;
      } else {
        c.error = std::string(kEnv) + "=" + env + ": " + why + "; use one of: " + usable;
      }
      return c;
    }
    c.error = std::string(kEnv) + " must be one of auto, avx2, avx512, blas, aten (this CPU: " + usable +
              "), got '" + env + "'";
    return c;
  }();
  return parsed;
}

// -- shape classes and their measured choice ---------------------------------------------

constexpr int kBuckets = 12;  // sizes 1, 2, 3-4, 5-8, ..., 513-1024, > 1024
constexpr int kClasses = 4 * kBuckets * kBuckets * kBuckets;

int bucket(int64_t n) { return std::min<int>(std::bit_width(static_cast<uint64_t>(n - 1)), kBuckets - 1); }

int shape_class(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K) {
  return ((((trans_a ? 2 : 0) + (trans_b ? 1 : 0)) * kBuckets + bucket(M)) * kBuckets + bucket(N)) * kBuckets +
         bucket(K);
}

struct Measurement {
  bool trans_a, trans_b;
  int64_t M, N, K;
  GemmKind chosen;
  double best_us[kGemmKinds];  // < 0: not available
};

// choice[c] = 1 + the chosen kind of class c, 0 until measured. Written once, under mutex.
std::atomic<int8_t> g_choice[kClasses];
std::mutex g_mutex;
std::vector<Measurement> g_measurements;
double g_measure_seconds = 0.0;

constexpr int kMinRounds = 5, kMaxRounds = 30;  // interleaved rounds of every candidate
constexpr double kBudgetSeconds = 2e-3;         // per class, after kMinRounds
constexpr double kDropFactor = 3.0;             // a candidate this much slower than the best stops racing

// Times every available candidate on this call's operands (C: scratch, beta = 0), keeps
// the fastest for the call's class. The caller's C is untouched.
GemmKind measure(int cls, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                 const float* A, int64_t lda, const float* B, int64_t ldb) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (const int8_t v = g_choice[cls].load(std::memory_order_acquire)) return static_cast<GemmKind>(v - 1);
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  AlignedFloats C(M * N);
  Measurement m{trans_a, trans_b, M, N, K, GemmKind::aten, {}};
  auto run = [&](GemmKind kind) {
    const auto t0 = clock::now();
    gemm_with(kind, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, 0.0f, C.data(), N);
    return std::chrono::duration<double>(clock::now() - t0).count();
  };
  for (int i = 0; i < kGemmKinds; ++i) {
    m.best_us[i] = -1.0;
    if (gemm_kind_available(kKinds[i])) run(kKinds[i]);  // warm-up: caches, scratch, first-call setup
  }
  double best[kGemmKinds];
  bool racing[kGemmKinds];  // still timed: available, and not hopelessly behind
  for (int i = 0; i < kGemmKinds; ++i) {
    best[i] = std::numeric_limits<double>::infinity();
    racing[i] = gemm_kind_available(kKinds[i]);
  }
  for (int round = 0; round < kMaxRounds; ++round) {
    double leader = std::numeric_limits<double>::infinity();
    for (int i = 0; i < kGemmKinds; ++i) {
      if (racing[i]) best[i] = std::min(best[i], run(kKinds[i]));
      leader = std::min(leader, best[i]);
    }
    for (int i = 0; i < kGemmKinds; ++i) racing[i] = racing[i] && best[i] <= kDropFactor * leader;
    if (round + 1 >= kMinRounds && std::chrono::duration<double>(clock::now() - start).count() > kBudgetSeconds)
      break;
  }
  int fastest = kGemmKinds - 1;  // aten: always there
  for (int i = 0; i < kGemmKinds; ++i) {
    if (best[i] == std::numeric_limits<double>::infinity()) continue;
    m.best_us[i] = 1e6 * best[i];
    if (best[i] < best[fastest]) fastest = i;
  }
  m.chosen = kKinds[fastest];
  g_measurements.push_back(m);
  g_measure_seconds += std::chrono::duration<double>(clock::now() - start).count();
  g_choice[cls].store(static_cast<int8_t>(fastest + 1), std::memory_order_release);
  return m.chosen;
}

GemmKind choose(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                int64_t lda, const float* B, int64_t ldb) {
  const Config& c = config();
  TORCH_CHECK(c.error.empty(), c.error);
  if (c.forced) return c.kind;
  const int cls = shape_class(trans_a, trans_b, M, N, K);
  if (const int8_t v = g_choice[cls].load(std::memory_order_acquire)) return static_cast<GemmKind>(v - 1);
  return measure(cls, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb);
}

// -- the two library candidates ------------------------------------------------------------

at::Tensor view_rows(const float* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
  // A row-major (rows x cols) block with leading dim ld, transposed if asked.
  at::Tensor t = at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
  return trans ? t.t() : t;
}

// MKL on one thread for the scope, whatever the caller's thread count (it would use
// torch's when called outside a parallel region): the same bits for any thread count,
// and no thread pool spun up for a product of a few microseconds.
struct OneMklThread {
  int previous = 0;
  OneMklThread() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~OneMklThread() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous);
  }
};

void gemm_blas(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
               int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  // Column-major BLAS sees our row-major C as C^T = op(B)^T op(A)^T: swap the operands.
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  OneMklThread one_thread;
  sgemm_(&tb, &ta, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
}

void gemm_aten(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
               int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  at::Tensor a = trans_a ? view_rows(A, K, M, lda, true) : view_rows(A, M, K, lda, false);
  at::Tensor b = trans_b ? view_rows(B, N, K, ldb, true) : view_rows(B, K, N, ldb, false);
  at::Tensor c = view_rows(C, M, N, ldc, false);
  OneMklThread one_thread;
  if (beta == 0.0f) {
    at::mm_out(c, a, b);
    if (alpha != 1.0f) c.mul_(alpha);
  } else {
    c.addmm_(a, b, beta, alpha);
  }
}

}  // namespace

const char* gemm_kind_name(GemmKind kind) {
  static const char* const names[kGemmKinds] = {"avx2", "avx512", "blas", "aten"};
  return names[static_cast<int>(kind)];
}

bool gemm_kind_available(GemmKind kind) {
  static const bool available[kGemmKinds] = {unavailable_reason(GemmKind::avx2).empty(),
                                             unavailable_reason(GemmKind::avx512).empty(),
                                             unavailable_reason(GemmKind::blas).empty(), true};
  return available[static_cast<int>(kind)];
}

void check_gemm_config() { TORCH_CHECK(config().error.empty(), config().error); }

void gemm_with(GemmKind kind, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc,
               PrefetchQueue* prefetch) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // C = beta * C (the micro-kernels need K >= 1)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
    return;
  }
  switch (kind) {
#ifdef RK_HAVE_GEMM_AVX2
    case GemmKind::avx2:
      return gemm_avx2(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, prefetch);
#endif
#ifdef RK_HAVE_GEMM_AVX512
    case GemmKind::avx512:
      return gemm_avx512(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, prefetch);
#endif
    case GemmKind::blas:
      return gemm_blas(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    default:
      return gemm_aten(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc, PrefetchQueue* prefetch) {
  if (M == 0 || N == 0 || K == 0) return gemm_with(GemmKind::aten, trans_a, trans_b, M, N, K, alpha, A, lda, B,
                                                   ldb, beta, C, ldc, prefetch);
  const GemmKind kind = choose(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb);
  gemm_with(kind, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, prefetch);
}

GemmChoices gemm_choices() {
  const Config& c = config();
  std::lock_guard<std::mutex> lock(g_mutex);
  std::vector<int64_t> candidates;
  for (int i = 0; i < kGemmKinds; ++i)
    if (gemm_kind_available(kKinds[i])) candidates.push_back(i);
  std::string blas = sgemm_ != nullptr ? "sgemm_ (unknown BLAS)" : "";
  if (MKL_Get_Version_String != nullptr) {
    char version[256] = {};
    MKL_Get_Version_String(version, sizeof(version) - 1);
    blas = version;
  }
  std::vector<double> classes;
  for (const Measurement& m : g_measurements) {
    for (double x : {double(m.trans_a), double(m.trans_b), double(m.M), double(m.N), double(m.K),
                     double(static_cast<int>(m.chosen))})
      classes.push_back(x);
    classes.insert(classes.end(), m.best_us, m.best_us + kGemmKinds);
  }
  return {c.forced ? static_cast<int64_t>(c.kind) : -1, c.error, candidates, blas, classes,
          1e3 * g_measure_seconds};
}

}  // namespace retro_kernels::cpu
