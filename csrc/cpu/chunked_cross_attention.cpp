// Chunked cross-attention on the CPU: fused forward and backward.
//
// The shift is folded into the indexing, as in the Triton kernels: absolute
// positions t fall into query chunks c = (t + 1) / m; query chunk 0 (the first
// m-1 tokens) outputs zeros, query chunk c >= 1 reads the K*R keys of the
// neighbours of chunk u = c - 1. The rows of q that a query chunk owns are
// consecutive, so every tile is a strided view of the inputs: no pad, no
// reshape, no (N x L*K*R) score or mask tensor. Positions are computed in unsigned
// 64-bit arithmetic, exact for any start_pos (up to 2^63 - 1) and N.
//
// Forward: one task per (batch, query chunk, query head): one attend_forward
// (block_attention.h) of the chunk's query rows against the real keys of its
// neighbours. Saves lse (B, Hq, N), natural log of the scaled scores; +inf for
// rows that see no key.
//
// Backward: one task per (batch, query chunk, kv head). It owns the dq rows of
// the chunk for the kv head's query heads and the dk, dv rows of the neighbour
// chunk it reads, so every output element has one writer and a fixed order of
// accumulation: deterministic, whatever the number of threads.
//
// Each task lists the rows of the thread's next task for prefetching (PrefetchQueue):
// the K and V tiles have rows 2 KB apart, one page each, where the hardware prefetchers
// stop. Inputs may be strided; each operand needs a unit stride on the head dim (and k,
// v a (K, R) pair that flattens), otherwise it is made contiguous first. fp16/bf16 tiles
// are converted to fp32 in per-thread scratch; all arithmetic is fp32.
#include "block_attention.h"
#include "op_schemas.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>

namespace retro_kernels::cpu {
namespace {

// Shapes and strides (in elements) of one call.
struct Geometry {
  int64_t B, N, Hq, D, L, K, R, Hkv, group, keys;  // keys = K * R
  int64_t m, start_pos;
  int64_t first_chunk, last_chunk;   // the query chunks that q's tokens fall into
  float scale;
  int64_t sq_b, sq_n, sq_h;          // q (and dout: its own strides below)
  int64_t sk_b, sk_l, sk_j, sk_h;    // k, with j = kk * R + r flattened
  int64_t sv_b, sv_l, sv_j, sv_h;    // v
  int64_t sm_b, sm_l, sm_k, sm_r;    // neighbour_mask
  bool has_mask;

  // Rows n0 .. n1-1 of q that query chunk c owns (empty when none): positions
  // c*m - 1 .. c*m + m - 2 (0 .. m-2 for c = 0). For c in [first_chunk, last_chunk]
  // every value below fits in uint64 and the wrapping differences are exact.
  void query_rows(int64_t c, int64_t& n0, int64_t& n1) const {
    n0 = n1 = 0;
    if (c < first_chunk || c > last_chunk) return;
    const uint64_t sp = start_pos, lo = static_cast<uint64_t>(c) * m;
    n0 = lo >= sp + 1 ? static_cast<int64_t>(lo - 1 - sp) : 0;
    n1 = static_cast<int64_t>(std::min<uint64_t>(lo + m - 1 - sp, N));
  }
  // the real keys of neighbour chunk (b, u): j = kk * R + r (`scratch`: keys entries)
  RealRows real_keys(const bool* mask, int64_t b, int64_t u, int64_t* scratch) const {
    return real_rows(has_mask ? mask + b * sm_b + u * sm_l : nullptr, K, sm_k, R, sm_r, scratch);
  }
};

// The query chunks of tokens start_pos .. start_pos+n-1: first (start_pos + 1) / m,
// last (start_pos + n) / m (unsigned: start_pos + n may pass 2^63).
uint64_t chunk_of_end(int64_t start_pos, int64_t n, int64_t m) {
  return (static_cast<uint64_t>(start_pos) + static_cast<uint64_t>(n)) / static_cast<uint64_t>(m);
}

// A tensor that the kernels can address with one stride per dim, unit on the last.
at::Tensor unit_last(const at::Tensor& t) { return rows_in_place(t) ? t : t.contiguous(); }

// k/v (B, L, K, R, Hkv, D): the K and R dims must flatten to one stride.
at::Tensor flat_keys(const at::Tensor& t) {
  const bool ok = rows_in_place(t) && (t.size(2) == 1 || t.stride(2) == t.size(3) * t.stride(3));
  return ok ? t : t.contiguous();
}

Geometry make_geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const c10::optional<at::Tensor>& mask, int64_t chunk_size, double scale,
                       int64_t start_pos) {
  Geometry g;
  g.B = q.size(0); g.N = q.size(1); g.Hq = q.size(2); g.D = q.size(3);
  g.L = k.size(1); g.K = k.size(2); g.R = k.size(3); g.Hkv = k.size(4);
  g.group = g.Hq / g.Hkv;
  g.keys = g.K * g.R;
  g.m = chunk_size; g.start_pos = start_pos;
  g.first_chunk = static_cast<int64_t>(chunk_of_end(start_pos, 1, chunk_size));
  g.last_chunk = static_cast<int64_t>(chunk_of_end(start_pos, g.N, chunk_size));
  g.scale = static_cast<float>(scale);
  g.sq_b = q.stride(0); g.sq_n = q.stride(1); g.sq_h = q.stride(2);
  g.sk_b = k.stride(0); g.sk_l = k.stride(1); g.sk_j = k.stride(3); g.sk_h = k.stride(4);
  g.sv_b = v.stride(0); g.sv_l = v.stride(1); g.sv_j = v.stride(3); g.sv_h = v.stride(4);
  g.has_mask = mask.has_value() && mask->defined();
  if (g.has_mask) {
    g.sm_b = mask->stride(0); g.sm_l = mask->stride(1); g.sm_k = mask->stride(2); g.sm_r = mask->stride(3);
  } else {
    g.sm_b = g.sm_l = g.sm_k = g.sm_r = 0;
  }
  return g;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& mask, int64_t chunk_size, int64_t start_pos) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "retro_kernels CPU chunked_cross_attention: q, k, v must be CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 6 && v.sizes() == k.sizes(),
              "chunked_cross_attention: q must be (B, N, Hq, D), k and v (B, L, K, R, Hkv, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "chunked_cross_attention: q, k, v must share one dtype");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(5) == q.size(3) && k.size(4) > 0 &&
                  q.size(2) % k.size(4) == 0,
              "chunked_cross_attention: k must match q's batch and head dim, and Hq % Hkv == 0");
  TORCH_CHECK(chunk_size >= 1 && start_pos >= 0, "chunked_cross_attention: bad chunk_size/start_pos");
  TORCH_CHECK(static_cast<uint64_t>(k.size(1)) >= chunk_of_end(start_pos, q.size(1), chunk_size),
              "chunked_cross_attention: k holds too few neighbour chunks");
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->device().is_cpu() && mask->dim() == 4 &&
                    mask->size(0) == k.size(0) && mask->size(1) == k.size(1) &&
                    mask->size(2) == k.size(2) && mask->size(3) == k.size(3),
                "chunked_cross_attention: neighbour_mask must be a CPU bool (B, L, K, R) tensor");
  }
  check_gemm_config();
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

template <typename scalar_t>
struct ForwardWorker {
  const Geometry& g;
  const scalar_t *q, *k, *v;
  const bool* mask;
  scalar_t* out;
  float* lse;
  AttendScratch s;

  // task = (b, query chunk c = first_chunk + i, head h), h fastest
  void decode(int64_t task, int64_t& b, int64_t& c, int64_t& h) const {
    const int64_t n_chunks = g.last_chunk - g.first_chunk + 1;
    h = task % g.Hq;
    c = g.first_chunk + (task / g.Hq) % n_chunks;
    b = task / (g.Hq * n_chunks);
  }

  // the next task's K, V and q rows (none for query chunk 0)
  void prefetch(int64_t task, PrefetchQueue& queue) const {
    int64_t b, c, h, n0, n1;
    decode(task, b, c, h);
    g.query_rows(c, n0, n1);
    if (c == 0 || n1 == n0) return;
    const int64_t hk = h / g.group, E = sizeof(scalar_t), row_bytes = g.D * E;
    queue.add(k + b * g.sk_b + (c - 1) * g.sk_l + hk * g.sk_h, g.keys, row_bytes, g.sk_j * E);
    queue.add(v + b * g.sv_b + (c - 1) * g.sv_l + hk * g.sv_h, g.keys, row_bytes, g.sv_j * E);
    queue.add(q + b * g.sq_b + n0 * g.sq_n + h * g.sq_h, n1 - n0, row_bytes, g.sq_n * E);
  }

  void run(int64_t task, PrefetchQueue& queue) {
    int64_t b, c, h, n0, n1;
    decode(task, b, c, h);
    g.query_rows(c, n0, n1);
    if (n1 == n0) return;
    const int64_t so_n = g.Hq * g.D;  // out is contiguous (B, N, Hq, D)
    scalar_t* out_rows = out + (b * g.N + n0) * so_n + h * g.D;
    float* lse_rows = lse + (b * g.Hq + h) * g.N + n0;
    const int64_t u = c - 1;  // the neighbour chunk that query chunk c reads
    const RealRows real = c > 0 ? g.real_keys(mask, b, u, s.key_index.data()) : RealRows{};
    if (real.count == 0) {  // query chunk 0, or every key masked: zeros, lse = +inf
      zero_rows(out_rows, so_n, n1 - n0, g.D);
      std::fill(lse_rows, lse_rows + (n1 - n0), kInf);
      return;
    }
    const int64_t hk = h / g.group;
    const RowsF32 K = key_rows(k + b * g.sk_b + u * g.sk_l + hk * g.sk_h, g.sk_j, real, g.D, s.k32.data());
    const RowsF32 V = key_rows(v + b * g.sv_b + u * g.sv_l + hk * g.sv_h, g.sv_j, real, g.D, s.v32.data());
    attend_forward(RowSet<const scalar_t>{q + b * g.sq_b + n0 * g.sq_n + h * g.sq_h, g.sq_n}, n1 - n0, K, V, real.count,
                   g.D, g.scale, RowSet<scalar_t>{out_rows, so_n}, RowSet<float>{lse_rows, 1}, s, &queue);
  }
};

std::tuple<at::Tensor, at::Tensor> cca_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                               const at::Tensor& v_in,
                                               const c10::optional<at::Tensor>& mask,
                                               int64_t chunk_size, double scale, int64_t start_pos) {
  check_inputs(q_in, k_in, v_in, mask, chunk_size, start_pos);
  const at::Tensor q = unit_last(q_in), k = flat_keys(k_in), v = flat_keys(v_in);
  const Geometry g = make_geometry(q, k, v, mask, chunk_size, scale, start_pos);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({g.B, g.Hq, g.N}, q.options().dtype(at::kFloat));
  if (g.B * g.N * g.Hq * g.D == 0) return {out, lse};
  const bool* mask_ptr = g.has_mask ? mask->data_ptr<bool>() : nullptr;
  const int64_t tasks = g.B * (g.last_chunk - g.first_chunk + 1) * g.Hq;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cca_forward_cpu", [&] {
    run_tasks(tasks, [&] {
      return ForwardWorker<scalar_t>{g, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                     v.const_data_ptr<scalar_t>(), mask_ptr, out.mutable_data_ptr<scalar_t>(),
                                     lse.mutable_data_ptr<float>(), AttendScratch(g.keys, g.D)};
    });
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

template <typename scalar_t>
struct BackwardWorker {
  const Geometry& g;
  const scalar_t* dout;
  int64_t sdo_b, sdo_n, sdo_h;
  const scalar_t *q, *k, *v;
  const bool* mask;
  scalar_t *dq, *dk, *dv;
  AttendScratch s;

  // task = (b, query chunk c = 0 .. L, kv head hk), hk fastest: chunk 0 writes the zero
  // rows of dq, chunk c >= 1 the gradients of neighbour chunk c - 1 (zeros if no query
  // reads it)
  void decode(int64_t task, int64_t& b, int64_t& c, int64_t& hk) const {
    hk = task % g.Hkv;
    c = (task / g.Hkv) % (g.L + 1);
    b = task / (g.Hkv * (g.L + 1));
  }
  int64_t sdk_j() const { return g.Hkv * g.D; }  // dk and dv are contiguous (B, L, K*R, Hkv, D)
  scalar_t* key_grad_rows(scalar_t* base, int64_t b, int64_t u, int64_t hk) const {
    return base + ((b * g.L + u) * g.keys) * sdk_j() + hk * g.D;
  }

  // the next task's K, V, dK, dV rows and its heads' q and dout rows
  void prefetch(int64_t task, PrefetchQueue& queue) const {
    int64_t b, c, hk, n0, n1;
    decode(task, b, c, hk);
    g.query_rows(c, n0, n1);
    if (c == 0 || n1 == n0) return;
    const int64_t E = sizeof(scalar_t), row_bytes = g.D * E;
    queue.add(k + b * g.sk_b + (c - 1) * g.sk_l + hk * g.sk_h, g.keys, row_bytes, g.sk_j * E);
    queue.add(v + b * g.sv_b + (c - 1) * g.sv_l + hk * g.sv_h, g.keys, row_bytes, g.sv_j * E);
    for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
      queue.add(q + b * g.sq_b + n0 * g.sq_n + h * g.sq_h, n1 - n0, row_bytes, g.sq_n * E);
      queue.add(dout + b * sdo_b + n0 * sdo_n + h * sdo_h, n1 - n0, row_bytes, sdo_n * E);
    }
    queue.add(key_grad_rows(dk, b, c - 1, hk), g.keys, row_bytes, sdk_j() * E);
    queue.add(key_grad_rows(dv, b, c - 1, hk), g.keys, row_bytes, sdk_j() * E);
  }

  void run(int64_t task, PrefetchQueue& queue) {
    int64_t b, c, hk, n0, n1;
    decode(task, b, c, hk);
    g.query_rows(c, n0, n1);
    const int64_t u = c - 1, so_n = g.Hq * g.D;  // dq is contiguous (B, N, Hq, D)
    scalar_t* dk_rows = u >= 0 ? key_grad_rows(dk, b, u, hk) : nullptr;
    scalar_t* dv_rows = u >= 0 ? key_grad_rows(dv, b, u, hk) : nullptr;
    const RealRows real = c > 0 ? g.real_keys(mask, b, u, s.key_index.data()) : RealRows{};
    if (real.count == 0 || n1 == n0) {  // nothing flows: zero gradients
      for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h)
        zero_rows(dq + (b * g.N + n0) * so_n + h * g.D, so_n, n1 - n0, g.D);
      if (u >= 0) {
        zero_rows(dk_rows, sdk_j(), g.keys, g.D);
        zero_rows(dv_rows, sdk_j(), g.keys, g.D);
      }
      return;
    }
    const RowsF32 K = key_rows(k + b * g.sk_b + u * g.sk_l + hk * g.sk_h, g.sk_j, real, g.D, s.k32.data());
    const RowsF32 V = key_rows(v + b * g.sv_b + u * g.sv_l + hk * g.sv_h, g.sv_j, real, g.D, s.v32.data());
    // dK, dV of the real keys accumulate over the group's heads and the chunk's rows
    const KeyGrads grads = key_grads(dk_rows, dv_rows, sdk_j(), real, g.D, s);
    for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
      attend_backward(RowSet<const scalar_t>{q + b * g.sq_b + n0 * g.sq_n + h * g.sq_h, g.sq_n},
                      RowSet<const scalar_t>{dout + b * sdo_b + n0 * sdo_n + h * sdo_h, sdo_n}, n1 - n0, K, V, real.count,
                      g.D, g.scale, RowSet<scalar_t>{dq + (b * g.N + n0) * so_n + h * g.D, so_n}, grads.dK, grads.dV,
                      grads.ld, h > hk * g.group, s, &queue);
    }
    store_key_grads(grads, dk_rows, dv_rows, sdk_j(), g.keys, real, g.D);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> cca_backward(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& mask, const at::Tensor& out_in, const at::Tensor& lse_in,
    int64_t chunk_size, double scale, int64_t start_pos) {
  check_inputs(q_in, k_in, v_in, mask, chunk_size, start_pos);
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes() &&
                  dout_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
              "chunked_cross_attention backward: dout and out must be like q");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 && lse_in.size(0) == q_in.size(0) &&
                  lse_in.size(1) == q_in.size(2) && lse_in.size(2) == q_in.size(1),
              "chunked_cross_attention backward: lse must be fp32 (B, Hq, N)");
  // out and lse are not read: P is recomputed from the scores (see block_attention.h)
  const at::Tensor q = unit_last(q_in), k = flat_keys(k_in), v = flat_keys(v_in), dout = unit_last(dout_in);
  const Geometry g = make_geometry(q, k, v, mask, chunk_size, scale, start_pos);
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  if (g.B * g.Hkv * g.D == 0) return {dq, dk, dv};
  const bool* mask_ptr = g.has_mask ? mask->data_ptr<bool>() : nullptr;
  const int64_t tasks = g.B * (g.L + 1) * g.Hkv;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cca_backward_cpu", [&] {
    run_tasks(tasks, [&] {
      return BackwardWorker<scalar_t>{g, dout.const_data_ptr<scalar_t>(), dout.stride(0), dout.stride(1),
                                      dout.stride(2), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                      v.const_data_ptr<scalar_t>(), mask_ptr, dq.mutable_data_ptr<scalar_t>(),
                                      dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(),
                                      AttendScratch(g.keys, g.D)};
    });
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace retro_kernels::cpu

TORCH_LIBRARY_FRAGMENT(retro_kernels_cpu, m) {
  retro_kernels::define_chunked_cross_attention_ops(m);
}

TORCH_LIBRARY_IMPL(retro_kernels_cpu, CPU, m) {
  m.impl("chunked_cross_attention_fwd", &retro_kernels::cpu::cca_forward);
  m.impl("chunked_cross_attention_bwd", &retro_kernels::cpu::cca_backward);
}
