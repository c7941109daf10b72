// Building blocks shared by the CPU kernels: the fp32 GEMM (gemm.h), prefetching and
// task queues, the softmax row passes (vectorised, with one exp), 64-byte aligned
// scratch, and fp16/bf16 <-> fp32 row copies. Every kernel is "small dense tiles +
// these": the heavy work (matrix products) goes to gemm().
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <new>
#include <vector>

#include "gemm.h"

namespace retro_kernels::cpu {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Whether the kernels can read `t` in place: unit stride on the head dim (the last) and
// the rows of every other dim at least a head dim apart, so that any row stride is a
// valid GEMM leading dimension. An expanded tensor (stride 0, as autograd hands out for
// the gradient of a mean over tokens) is not: BLAS refuses ld < D and computes nothing.
inline bool rows_in_place(const at::Tensor& t) {
  if (t.stride(-1) != 1) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) < t.size(-1)) return false;
  return true;
}

// Scratch memory aligned to 64 bytes (a cache line, an AVX-512 vector): the same
// alignment in every thread, so a BLAS whose rounding depends on alignment still gives
// every thread the same bits.
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kAlign); }
  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
};
using AlignedFloats = std::vector<float, AlignedAllocator<float>>;

// Prefetching one task ahead. The K and V tiles of a task come from DRAM (the inputs are
// tens of MB), with rows 2 KB apart (one head of a (tokens, heads, dim) layout): each row
// sits in a new page, where the hardware prefetchers stop, so the first pass over a tile
// stalls on every row. A kernel lists the rows of its next task in a PrefetchQueue and
// hands the queue to gemm(), which issues a few of their prefetches per tile it computes:
// the loads overlap arithmetic. (Prefetching a whole tile in one burst stalls just the same.)
class PrefetchQueue {
 public:
  void clear() { n_ = cur_ = 0; row_ = 0; }
  // `rows` rows of `row_bytes` bytes, `stride_bytes` apart (a full queue ignores more).
  void add(const void* p, int64_t rows, int64_t row_bytes, int64_t stride_bytes) {
    if (n_ < kMaxRegions && rows > 0 && row_bytes > 0)
      regions_[n_++] = {static_cast<const char*>(p), rows, row_bytes, stride_bytes};
  }
  // Prefetches about `lines` more cache lines (whole rows) of the queue, into L2.
  void step(int64_t lines) {
    while (lines > 0 && cur_ < n_) {
      const Region& r = regions_[cur_];
      const char* row = r.p + row_ * r.stride;
      for (int64_t b = 0; b < r.row_bytes; b += 64, --lines) __builtin_prefetch(row + b, 0, 2);
      if (++row_ == r.rows) row_ = 0, ++cur_;
    }
  }

 private:
  struct Region {
    const char* p;
    int64_t rows, row_bytes, stride;
  };
  static constexpr int kMaxRegions = 8;
  Region regions_[kMaxRegions];
  int n_ = 0, cur_ = 0;
  int64_t row_ = 0;
};

// Tasks handed out one at a time from a shared counter (dynamic scheduling), for use as
//   TaskQueue queue(tasks);
//   at::parallel_for(0, queue.workers(), 1, [&](int64_t, int64_t) {
//     <per-thread scratch>
//     for (int64_t task = queue.next(); task >= 0; task = queue.next()) { ... }
//   });
// A thread that runs slower (its core shared with another process, a costlier task)
// simply takes fewer tasks. Every task writes only its own outputs, so the results do
// not depend on which thread ran it.
class TaskQueue {
 public:
  explicit TaskQueue(int64_t tasks) : tasks_(tasks) {}
  int64_t workers() const { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks_)); }
  // The next task, or -1 when all are taken.
  int64_t next() {
    const int64_t task = next_.fetch_add(1, std::memory_order_relaxed);
    return task < tasks_ ? task : -1;
  }

 private:
  const int64_t tasks_;
  std::atomic<int64_t> next_{0};
};

// -- softmax passes over a dense score tile S (rows x cols, row-major, ld = cols) --
// S holds scores already scaled (the GEMM's alpha). Masked keys never reach a tile:
// the kernels drop them before any product.

// Forward: S <- exp(S - rowmax), lse[i] = log-sum-exp of row i (natural log),
// inv_sum[i] = 1 / sum_j exp(...).
void softmax_rows(float* S, int64_t rows, int64_t cols, float* lse, float* inv_sum);

// Backward: S <- softmax(S), recomputed from the scores with the forward's passes (max,
// exp, sum), not from the saved lse: for huge scores (a huge scale) lse = max + log(sum)
// rounds log(sum) away, and exp(S - lse) would be off by that factor.
void softmax_probs(float* S, int64_t rows, int64_t cols);

// Backward: dP <- P * (dP - rowsum(P * dP)): the gradient of the scores (before the
// scale). The correction is summed from these very P and dP (not from dO . O, which
// rounds differently): a row whose P is one-hot then gets exactly zero, as it must.
void softmax_grad(float* dP, const float* P, int64_t rows, int64_t cols);

// X[i, :cols] *= factor[i] for a row-major X with leading dim ld.
void scale_rows(float* X, int64_t rows, int64_t cols, int64_t ld, const float* factor);

// -- fp32 <-> storage type rows ---------------------------------------------------------

inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// dst (rows x cols, ld = cols) <- src rows (row stride src_ld, unit column stride).
template <typename scalar_t>
void load_rows(float* dst, const scalar_t* src, int64_t rows, int64_t cols, int64_t src_ld) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* s = src + i * src_ld;
    float* d = dst + i * cols;
    for (int64_t j = 0; j < cols; ++j) d[j] = to_float(s[j]);
  }
}

// dst rows (row stride dst_ld) <- src (rows x cols, ld = src_ld), rounding to scalar_t.
template <typename scalar_t>
void store_rows(scalar_t* dst, int64_t dst_ld, const float* src, int64_t src_ld, int64_t rows,
                int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) dst[i * dst_ld + j] = static_cast<scalar_t>(src[i * src_ld + j]);
  }
}

template <typename scalar_t>
void zero_rows(scalar_t* dst, int64_t dst_ld, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) dst[i * dst_ld + j] = static_cast<scalar_t>(0.0f);
  }
}

// A read-only fp32 matrix of `rows` rows: the tensor's own memory when it is already
// fp32 (ld = its row stride), else a converted copy in `scratch` (ld = cols).
struct RowsF32 {
  const float* data;
  int64_t ld;
};

template <typename scalar_t>
RowsF32 rows_as_f32(const scalar_t* src, int64_t rows, int64_t cols, int64_t src_ld, float* scratch) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    (void)rows; (void)cols; (void)scratch;
    return {src, src_ld};
  } else {
    load_rows(scratch, src, rows, cols, src_ld);
    return {scratch, cols};
  }
}

}  // namespace retro_kernels::cpu
