// Runs the CUDA kernels of csrc/cuda on the CPU, for tests (tests/test_cuda_emulated.py).
//
// No GPU is needed: the kernel source is compiled as host C++ (RETRO_KERNELS_EMULATION),
// and the few CUDA features it uses are emulated here, one CTA at a time:
// - the 128 threads of a CTA are coroutines on one OS thread (each started on its own stack
//   with makecontext, then switched with _setjmp/_longjmp, which skip the signal-mask system
//   call of swapcontext: build without _FORTIFY_SOURCE), switched at every barrier:
//   __syncthreads (all 128) and the warp-wide collectives (32 lanes), so control flow that
//   would deadlock on a GPU (a barrier some threads never reach) is reported;
// - __shfl_xor_sync, ldmatrix and mma.sync exchange values through per-lane slots between
//   two warp barriers and compute each lane's result from the PTX ISA's fragment tables
//   (emulation/ptx_primitives.h), written independently of how the kernels use them;
// - cp.async poisons its destination (all-ones bytes: NaN in fp16, bf16 and fp32) when it
//   is issued and copies only at the cp.async.wait_group that retires its group, so a read
//   of shared memory that is not yet waited for sees NaN;
// - shared memory is poisoned the same way before every CTA;
// - threads are scheduled greedily (see run_cta): warps drift apart as far as the barriers
//   allow, which turns a missing __syncthreads into a read of poison.
// Each lane runs its scalar code exactly; mma accumulates in fp32 as the tensor cores do
// (the order of the additions may differ from the hardware's).
#pragma once

#ifndef RETRO_KERNELS_EMULATION
#define RETRO_KERNELS_EMULATION 1
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <c10/core/Device.h>

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#define __launch_bounds__(...)

using std::max;
using std::min;

namespace retro_kernels::cuda::emulation {

constexpr int THREADS = 128;
constexpr int WARP = 32;
constexpr size_t SMEM_BYTES = 232448;  // the largest opt-in shared memory of a CTA (H100: 227 KB)
constexpr size_t STACK_BYTES = 256 * 1024;

struct Copy {
  void* dst;
  const void* src;
  bool valid;
};

// What a lane publishes for a warp-wide collective.
struct Slot {
  const void* address;
  uint32_t a[4], b[2];
  float f;
};

struct Thread {
  ucontext_t context;  // its first entry
  jmp_buf jump;        // where it continues
  bool started = false;
  std::unique_ptr<char[]> stack;
  int waiting = -1;  // the barrier it waits at, -1: runnable
  bool done = false;
  std::vector<Copy> open;                 // cp.async copies not yet committed
  std::vector<std::vector<Copy>> groups;  // committed groups not yet waited for
};

struct Cta {
  Thread threads[THREADS];
  int arrived[1 + THREADS / WARP] = {};  // barrier 0: the CTA; 1 + w: warp w
  Slot slots[THREADS];
  jmp_buf scheduler;
  int current = 0;
  const std::function<void()>* kernel = nullptr;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
};

inline Cta* cta = nullptr;
inline uint3 thread_index{0, 0, 0};
inline uint3 block_index{0, 0, 0};
inline std::string failure;  // the first error of the current launch

inline void fail(const std::string& what) {
  if (failure.empty()) {
    failure = "block " + std::to_string(block_index.x) + " thread " + std::to_string(thread_index.x) + ": " + what;
  }
}

inline Thread& me() { return cta->threads[cta->current]; }
inline int lane() { return cta->current % WARP; }
inline int warp_base() { return cta->current - lane(); }

// Arrive at barrier `id` (expected: its number of threads) and wait for the others.
inline void arrive(int id, int expected) {
  if (++cta->arrived[id] == expected) {
    cta->arrived[id] = 0;
    for (Thread& t : cta->threads) {
      if (t.waiting == id) t.waiting = -1;
    }
    return;
  }
  me().waiting = id;
  if (_setjmp(me().jump) == 0) _longjmp(cta->scheduler, 1);
}
inline void sync_cta() { arrive(0, THREADS); }
inline void sync_warp() { arrive(1 + cta->current / WARP, WARP); }

inline bool in_smem(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= cta->smem && c + bytes <= cta->smem + cta->smem_bytes;
}

// -- cp.async ----------------------------------------------------------------------------------
inline void queue_copy(void* dst, const void* src, bool valid) {
  if (!in_smem(dst, 16) || reinterpret_cast<uintptr_t>(dst) % 16 != 0) {
    return fail("cp.async destination outside the dynamic shared memory or not 16-byte aligned");
  }
  if (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0) return fail("cp.async source not 16-byte aligned");
  std::memset(dst, 0xff, 16);  // poison until the copy is waited for
  me().open.push_back(Copy{dst, src, valid});
}
inline void commit() {
  me().groups.push_back(std::move(me().open));
  me().open.clear();
}
inline void wait(int pending) {
  auto& groups = me().groups;
  while (static_cast<int>(groups.size()) > pending) {
    for (const Copy& c : groups.front()) {
      if (c.valid) std::memcpy(c.dst, c.src, 16);
      else std::memset(c.dst, 0, 16);
    }
    groups.erase(groups.begin());
  }
}

// -- the warp collectives ---------------------------------------------------------------------
inline float shfl_xor(unsigned mask, float x, int lane_mask) {
  if (mask != 0xffffffffu) fail("__shfl_xor_sync with a partial mask");
  cta->slots[cta->current].f = x;
  sync_warp();
  const float y = cta->slots[warp_base() + (lane() ^ lane_mask)].f;
  sync_warp();
  return y;
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 (PTX ISA, "Warp-level matrix load
// instruction: ldmatrix"): lanes 8i .. 8i+7 hold the row addresses of matrix i; without
// .trans lane l receives row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 of each matrix; with
// .trans it receives column l / 4, elements of rows 2 (l % 4) and 2 (l % 4) + 1.
inline void ldmatrix(uint32_t (&r)[4], const void* row_address, bool trans) {
  if (!in_smem(row_address, 16) || reinterpret_cast<uintptr_t>(row_address) % 16 != 0) {
    fail("ldmatrix row address outside the dynamic shared memory or not 16-byte aligned");
    row_address = cta->smem;
  }
  cta->slots[cta->current].address = row_address;
  sync_warp();
  const int l = lane(), base = warp_base();
  auto element = [&](int matrix, int row, int col) {
    return static_cast<uint32_t>(static_cast<const uint16_t*>(cta->slots[base + 8 * matrix + row].address)[col]);
  };
  for (int i = 0; i < 4; ++i) {
    r[i] = trans ? element(i, 2 * (l % 4), l / 4) | element(i, 2 * (l % 4) + 1, l / 4) << 16
                 : element(i, l / 4, 2 * (l % 4)) | element(i, l / 4, 2 * (l % 4) + 1) << 16;
  }
  sync_warp();
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 (PTX ISA, "Matrix
// Fragments for mma.m16n8k16 with floating point type"), groupID = lane / 4,
// threadID_in_group = lane % 4, element pairs (i, i+1) packed low half first:
//   A a0..a7: row groupID (+8 for a2, a3, a6, a7), col 2 threadID_in_group + (i & 1)
//             (+8 for a4..a7)
//   B b0..b3: row 2 threadID_in_group + (i & 1) (+8 for b2, b3), col groupID
//   C c0..c3: row groupID (+8 for c2, c3), col 2 threadID_in_group + (i & 1)
template <typename ToFloat>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, ToFloat to_float) {
  Slot& mine = cta->slots[cta->current];
  std::copy(a, a + 4, mine.a);
  mine.b[0] = b0;
  mine.b[1] = b1;
  sync_warp();
  const int base = warp_base(), g = lane() / 4, t = lane() % 4;
  auto half_of = [](uint32_t reg, int k) { return static_cast<uint16_t>(k % 2 ? reg >> 16 : reg & 0xffff); };
  auto A = [&](int row, int k) {  // the owner of A[row][k], and which of its 8 elements it is
    const int owner = (row % 8) * 4 + (k % 8) / 2, ai = (row >= 8 ? 2 : 0) + (k >= 8 ? 4 : 0) + k % 2;
    return to_float(half_of(cta->slots[base + owner].a[ai / 2], ai));
  };
  auto B = [&](int k, int col) {
    const int owner = col * 4 + (k % 8) / 2, bi = (k >= 8 ? 2 : 0) + k % 2;
    return to_float(half_of(cta->slots[base + owner].b[bi / 2], bi));
  };
  float d[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    float acc = c[e];
    for (int k = 0; k < 16; ++k) acc = std::fma(A(row, k), B(k, col), acc);
    d[e] = acc;
  }
  sync_warp();
  std::copy(d, d + 4, c);
}

// -- running a grid ---------------------------------------------------------------------------
inline void thread_entry() {
  (*cta->kernel)();
  if (!me().open.empty() || !me().groups.empty()) fail("a thread exited with cp.async copies in flight");
  me().done = true;
  _longjmp(cta->scheduler, 1);
}

inline void run_cta(Cta& c) {
  std::memset(c.smem, 0xff, c.smem_bytes);  // poison: reads of unwritten shared memory see NaN
  for (int i = 0; i < THREADS; ++i) {
    Thread& t = c.threads[i];
    t.waiting = -1;
    t.done = false;
    t.started = false;
    t.open.clear();
    t.groups.clear();
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = t.stack.get();
    t.context.uc_stack.ss_size = STACK_BYTES;
    t.context.uc_link = nullptr;  // thread_entry never returns
    makecontext(&t.context, thread_entry, 0);
  }
  std::fill(std::begin(c.arrived), std::end(c.arrived), 0);
  // Always resume the first runnable thread, in thread order on even CTAs and in reverse on
  // odd ones: one warp runs as far ahead of the others as the barriers let it, so a missing
  // __syncthreads (e.g. refilling a stage another warp still reads) shows up as poison.
  const bool ascending = block_index.x % 2 == 0;
  for (;;) {
    int next = -1;
    bool all_done = true;
    for (int n = 0; n < THREADS && next < 0; ++n) {
      const int i = ascending ? n : THREADS - 1 - n;
      if (c.threads[i].done) continue;
      all_done = false;
      if (c.threads[i].waiting < 0) next = i;
    }
    if (all_done) return;
    if (next < 0) return fail("deadlock: threads wait at a barrier that the others never reach");
    Thread& t = c.threads[next];
    c.current = next;
    thread_index.x = next;
    if (_setjmp(c.scheduler) == 0) {
      if (t.started) _longjmp(t.jump, 1);
      t.started = true;
      setcontext(&t.context);
    }
  }
}

// Runs `programs` CTAs of NUM_THREADS threads, one after the other; throws on the first error.
inline void run_grid(int64_t programs, size_t smem_bytes, unsigned char* smem,
                     const std::function<void()>& kernel) {
  if (smem_bytes > SMEM_BYTES) throw std::runtime_error("emulated launch: too much shared memory");
  auto c = std::make_unique<Cta>();
  for (Thread& t : c->threads) t.stack = std::make_unique<char[]>(STACK_BYTES);
  c->kernel = &kernel;
  c->smem = smem;
  c->smem_bytes = smem_bytes;
  failure.clear();
  cta = c.get();
  for (int64_t b = 0; b < programs && failure.empty(); ++b) {
    block_index.x = static_cast<unsigned>(b);
    run_cta(*c);
  }
  cta = nullptr;
  if (!failure.empty()) throw std::runtime_error("emulated CUDA kernel: " + failure);
}

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

}  // namespace retro_kernels::cuda::emulation

#define threadIdx (::retro_kernels::cuda::emulation::thread_index)
#define blockIdx (::retro_kernels::cuda::emulation::block_index)

inline void __syncthreads() { ::retro_kernels::cuda::emulation::sync_cta(); }
inline float __shfl_xor_sync(unsigned mask, float x, int lane_mask) {
  return ::retro_kernels::cuda::emulation::shfl_xor(mask, x, lane_mask);
}
