// The neighbour-encoder attentions on the CPU, fused forward and backward, one kernel
// pair for both ops (they differ only in which rows form a tile):
//
//   neighbour_self_attention   tile (b, l, kk): the R tokens of neighbour kk of chunk l
//                              attend, with no causal mask, to the real tokens of that
//                              same neighbour (R x R scores per head). A padding token
//                              takes no part as a key or as a query: it outputs zeros.
//   neighbour_cross_attention  tile (b, l): the K*R tokens of the K neighbours of chunk l
//                              attend to the real ones of the M tokens of chunk l itself
//                              (K*R x M scores per head). The chunk's keys and values are
//                              read once per task and shared by the K neighbours' rows.
//
// Forward: one task per (tile, query head): one attend_forward (block_attention.h).
// Backward: one task per (tile, kv head). It owns the dk, dv rows of the tile and the dq
// rows of the kv head's query heads: one writer per element, fixed order of
// accumulation, deterministic. Each task lists the rows of the thread's next task for
// prefetching (as the chunked cross-attention kernel does).
//
// Inputs may be strided: the head dim needs unit stride, and for the cross-attention q's
// K and R dims must flatten into one row stride; otherwise the tensor is made
// contiguous first.
#include "block_attention.h"
#include "op_schemas.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>

namespace retro_kernels::cpu {
namespace {

// Where the rows of one operand's tiles are: tile (b, l, kk) starts at
// b * s_b + l * s_l + kk * s_k + h * s_h, its rows s_row apart.
struct TileRows {
  int64_t s_b = 0, s_l = 0, s_k = 0, s_row = 0, s_h = 0;
  int64_t at(int64_t b, int64_t l, int64_t kk, int64_t h) const { return b * s_b + l * s_l + kk * s_k + h * s_h; }
};

TileRows tile_rows(const at::Tensor& t, bool per_neighbour) {
  // per_neighbour: (B, L, K, R, H, D), tiles (b, l, kk), rows r; else (B, L, rows, H, D)
  // (or q's (B, L, K, R, H, D) with K and R flattened), tiles (b, l), one row stride
  if (per_neighbour) return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
  if (t.dim() == 6) return {t.stride(0), t.stride(1), 0, t.stride(3), t.stride(4)};
  return {t.stride(0), t.stride(1), 0, t.stride(2), t.stride(3)};
}

// One call of either op.
struct Geometry {
  bool self;                       // neighbour_self_attention (else cross)
  int64_t B, L, Kt;                // tiles (b, l, kk < Kt): Kt = K (self) or 1 (cross)
  int64_t rows, keys;              // query rows and keys per tile: R, R (self); K*R, M (cross)
  int64_t Hq, Hkv, D, group;
  float scale;
  TileRows q, dout, k, v;          // inputs (dout: backward only)
  const bool* mask = nullptr;      // (B, L, K, R) self / (B, L, M) cross; nullptr: none
  TileRows m;                      // mask strides (s_row: along the tile's tokens)

  int64_t tiles() const { return B * L * Kt; }
  void tile(int64_t t, int64_t& b, int64_t& l, int64_t& kk) const {
    kk = t % Kt;
    l = (t / Kt) % L;
    b = t / (Kt * L);
  }
  int64_t first_row(int64_t t) const { return t * rows; }  // in out/dq/lse (contiguous), per batch-major order
  int64_t first_key(int64_t t) const { return t * keys; }  // in dk/dv (contiguous)
  // the tile's real keys (`scratch`: keys entries)
  RealRows real_keys(int64_t b, int64_t l, int64_t kk, int64_t* scratch) const {
    return real_rows(mask == nullptr ? nullptr : mask + m.at(b, l, kk, 0), 1, 0, keys, m.s_row, scratch);
  }
  // the tile's real query rows: all of them (cross), or its real tokens (self: its keys)
  RealRows real_queries(const RealRows& real_keys) const { return self ? real_keys : RealRows{rows, 0, nullptr}; }
  // lse (B, Hq, L*K*R): rows of tile (b, l, kk) for head h
  int64_t lse_row(int64_t b, int64_t l, int64_t kk, int64_t h) const {
    return (b * Hq + h) * (L * Kt * rows) + (l * Kt + kk) * rows;
  }
};

at::Tensor unit_last(const at::Tensor& t) { return rows_in_place(t) ? t : t.contiguous(); }

// q (B, L, K, R, Hq, D) of the cross-attention: the K*R rows of a chunk must be one strided matrix.
at::Tensor flat_rows(const at::Tensor& t) {
  const bool ok = rows_in_place(t) && (t.size(2) == 1 || t.stride(2) == t.size(3) * t.stride(3));
  return ok ? t : t.contiguous();
}

void check_inputs(bool self, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& mask) {
  const char* op = self ? "neighbour_self_attention" : "neighbour_cross_attention";
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "retro_kernels CPU ", op,
              ": q, k, v must be CPU tensors");
  TORCH_CHECK(q.dim() == 6 && k.dim() == (self ? 6 : 5) && v.sizes() == k.sizes(), op,
              self ? ": q must be (B, L, K, R, Hq, D), k and v (B, L, K, R, Hkv, D)"
                   : ": q must be (B, L, K, R, Hq, D), k and v (B, L, M, Hkv, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v must share one dtype");
  const int64_t lead = self ? 4 : 2;  // dims k shares with q
  for (int64_t d = 0; d < lead; ++d) TORCH_CHECK(k.size(d) == q.size(d), op, ": k must match q's leading dims");
  const int64_t hkv = k.size(-2);
  TORCH_CHECK(k.size(-1) == q.size(5) && hkv > 0 && q.size(4) % hkv == 0, op,
              ": k must match q's head dim, and Hq % Hkv == 0");
  if (mask.has_value() && mask->defined()) {
    const int64_t dims = self ? 4 : 3;
    bool ok = mask->scalar_type() == at::kBool && mask->device().is_cpu() && mask->dim() == dims;
    for (int64_t d = 0; ok && d < dims; ++d) ok = mask->size(d) == k.size(d);
    TORCH_CHECK(ok, op, self ? ": neighbour_mask must be a CPU bool (B, L, K, R) tensor"
                             : ": chunk_mask must be a CPU bool (B, L, M) tensor");
  }
  check_gemm_config();
}

Geometry make_geometry(bool self, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const c10::optional<at::Tensor>& mask, double scale) {
  Geometry g;
  g.self = self;
  g.B = q.size(0); g.L = q.size(1); g.Kt = self ? q.size(2) : 1;
  g.rows = self ? q.size(3) : q.size(2) * q.size(3);
  g.keys = self ? k.size(3) : k.size(2);
  g.Hq = q.size(4); g.Hkv = k.size(-2); g.D = q.size(5); g.group = g.Hq / g.Hkv;
  g.scale = static_cast<float>(scale);
  g.q = tile_rows(q, self); g.k = tile_rows(k, self); g.v = tile_rows(v, self);
  if (mask.has_value() && mask->defined()) {
    g.mask = mask->data_ptr<bool>();
    g.m = self ? TileRows{mask->stride(0), mask->stride(1), mask->stride(2), mask->stride(3), 0}
               : TileRows{mask->stride(0), mask->stride(1), 0, mask->stride(2), 0};
  }
  return g;
}

// Rows of a tile that a masked self-attention leaves out: out/dq zeros (and lse +inf).
template <typename scalar_t>
void zero_dropped_rows(const Geometry& g, int64_t b, int64_t l, int64_t kk, scalar_t* rows, int64_t ld,
                       float* lse) {
  const bool* mrow = g.mask + g.m.at(b, l, kk, 0);
  for (int64_t r = 0; r < g.rows; ++r) {
    if (mrow[r * g.m.s_row]) continue;
    zero_rows(rows + r * ld, ld, 1, g.D);
    if (lse != nullptr) lse[r] = kInf;
  }
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

template <typename scalar_t>
struct ForwardWorker {
  const Geometry& g;
  const scalar_t *q, *k, *v;
  scalar_t* out;
  float* lse;
  AttendScratch s;

  // task = (tile, head h), h fastest; the next task's K, V and q rows
  void prefetch(int64_t task, PrefetchQueue& queue) const {
    int64_t b, l, kk;
    const int64_t h = task % g.Hq, hk = h / g.group, E = sizeof(scalar_t), row_bytes = g.D * E;
    g.tile(task / g.Hq, b, l, kk);
    queue.add(k + g.k.at(b, l, kk, hk), g.keys, row_bytes, g.k.s_row * E);
    queue.add(v + g.v.at(b, l, kk, hk), g.keys, row_bytes, g.v.s_row * E);
    queue.add(q + g.q.at(b, l, kk, h), g.rows, row_bytes, g.q.s_row * E);
  }

  void run(int64_t task, PrefetchQueue& queue) {
    int64_t b, l, kk;
    const int64_t h = task % g.Hq, hk = h / g.group, t = task / g.Hq, so_r = g.Hq * g.D;
    g.tile(t, b, l, kk);
    scalar_t* out_rows = out + g.first_row(t) * so_r + h * g.D;  // out is contiguous
    float* lse_rows = lse + g.lse_row(b, l, kk, h);
    const RealRows keys = g.real_keys(b, l, kk, s.key_index.data());
    if (keys.count == 0) {  // no real key: zeros, lse = +inf
      zero_rows(out_rows, so_r, g.rows, g.D);
      std::fill(lse_rows, lse_rows + g.rows, kInf);
      return;
    }
    const RowsF32 K = key_rows(k + g.k.at(b, l, kk, hk), g.k.s_row, keys, g.D, s.k32.data());
    const RowsF32 V = key_rows(v + g.v.at(b, l, kk, hk), g.v.s_row, keys, g.D, s.v32.data());
    const RealRows rows = g.real_queries(keys);
    attend_forward(rows.of(q + g.q.at(b, l, kk, h), g.q.s_row), rows.count, K, V, keys.count, g.D, g.scale,
                   rows.of(out_rows, so_r), rows.of(lse_rows, 1), s, &queue);
    if (rows.count < g.rows) zero_dropped_rows(g, b, l, kk, out_rows, so_r, lse_rows);
  }
};

std::tuple<at::Tensor, at::Tensor> forward(bool self, const at::Tensor& q_in, const at::Tensor& k_in,
                                           const at::Tensor& v_in, const c10::optional<at::Tensor>& mask,
                                           double scale) {
  check_inputs(self, q_in, k_in, v_in, mask);
  const at::Tensor q = self ? unit_last(q_in) : flat_rows(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const Geometry g = make_geometry(self, q, k, v, mask, scale);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({g.B, g.Hq, g.L * g.Kt * g.rows}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "neighbour_attention_fwd_cpu", [&] {
    run_tasks(g.tiles() * g.Hq, [&] {
      return ForwardWorker<scalar_t>{g, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                     v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
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
  const scalar_t *dout, *q, *k, *v;
  scalar_t *dq, *dk, *dv;
  AttendScratch s;

  // task = (tile, kv head hk), hk fastest; the next task's K, V, dK, dV rows and its
  // heads' q and dout rows
  void prefetch(int64_t task, PrefetchQueue& queue) const {
    int64_t b, l, kk;
    const int64_t hk = task % g.Hkv, t = task / g.Hkv, E = sizeof(scalar_t), row_bytes = g.D * E;
    const int64_t skv_r = g.Hkv * g.D;
    g.tile(t, b, l, kk);
    queue.add(k + g.k.at(b, l, kk, hk), g.keys, row_bytes, g.k.s_row * E);
    queue.add(v + g.v.at(b, l, kk, hk), g.keys, row_bytes, g.v.s_row * E);
    for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
      queue.add(q + g.q.at(b, l, kk, h), g.rows, row_bytes, g.q.s_row * E);
      queue.add(dout + g.dout.at(b, l, kk, h), g.rows, row_bytes, g.dout.s_row * E);
    }
    queue.add(dk + g.first_key(t) * skv_r + hk * g.D, g.keys, row_bytes, skv_r * E);
    queue.add(dv + g.first_key(t) * skv_r + hk * g.D, g.keys, row_bytes, skv_r * E);
  }

  void run(int64_t task, PrefetchQueue& queue) {
    int64_t b, l, kk;
    const int64_t hk = task % g.Hkv, t = task / g.Hkv;
    const int64_t so_r = g.Hq * g.D, skv_r = g.Hkv * g.D;  // dq and dk/dv are contiguous
    g.tile(t, b, l, kk);
    scalar_t* dq_rows = dq + g.first_row(t) * so_r;
    scalar_t* dk_rows = dk + g.first_key(t) * skv_r + hk * g.D;
    scalar_t* dv_rows = dv + g.first_key(t) * skv_r + hk * g.D;
    const RealRows keys = g.real_keys(b, l, kk, s.key_index.data());
    if (keys.count == 0) {  // no real key: no gradient
      for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) zero_rows(dq_rows + h * g.D, so_r, g.rows, g.D);
      zero_rows(dk_rows, skv_r, g.keys, g.D);
      zero_rows(dv_rows, skv_r, g.keys, g.D);
      return;
    }
    const RowsF32 K = key_rows(k + g.k.at(b, l, kk, hk), g.k.s_row, keys, g.D, s.k32.data());
    const RowsF32 V = key_rows(v + g.v.at(b, l, kk, hk), g.v.s_row, keys, g.D, s.v32.data());
    const RealRows rows = g.real_queries(keys);
    const KeyGrads grads = key_grads(dk_rows, dv_rows, skv_r, keys, g.D, s);
    for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
      attend_backward(rows.of(q + g.q.at(b, l, kk, h), g.q.s_row), rows.of(dout + g.dout.at(b, l, kk, h), g.dout.s_row),
                      rows.count, K, V, keys.count, g.D, g.scale, rows.of(dq_rows + h * g.D, so_r), grads.dK,
                      grads.dV, grads.ld, h > hk * g.group, s, &queue);
      if (rows.count < g.rows) zero_dropped_rows(g, b, l, kk, dq_rows + h * g.D, so_r, static_cast<float*>(nullptr));
    }
    store_key_grads(grads, dk_rows, dv_rows, skv_r, g.keys, keys, g.D);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(bool self, const at::Tensor& dout_in,
                                                        const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in,
                                                        const c10::optional<at::Tensor>& mask,
                                                        const at::Tensor& out_in, const at::Tensor& lse_in,
                                                        double scale) {
  check_inputs(self, q_in, k_in, v_in, mask);
  const char* op = self ? "neighbour_self_attention" : "neighbour_cross_attention";
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes() &&
                  dout_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
              op, " backward: dout and out must be like q");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 && lse_in.size(0) == q_in.size(0) &&
                  lse_in.size(1) == q_in.size(4) && lse_in.size(2) == q_in.size(1) * q_in.size(2) * q_in.size(3),
              op, " backward: lse must be fp32 (B, Hq, L*K*R)");
  // out and lse are not read: P is recomputed from the scores (see block_attention.h)
  const auto rows_of = [&](const at::Tensor& t) { return self ? unit_last(t) : flat_rows(t); };
  const at::Tensor q = rows_of(q_in), dout = rows_of(dout_in), k = unit_last(k_in), v = unit_last(v_in);
  Geometry g = make_geometry(self, q, k, v, mask, scale);
  g.dout = tile_rows(dout, self);
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  if (dk.numel() == 0) return {dq, dk, dv};
  if (dq.numel() == 0) {  // no query: no gradient flows
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "neighbour_attention_bwd_cpu", [&] {
    run_tasks(g.tiles() * g.Hkv, [&] {
      return BackwardWorker<scalar_t>{g, dout.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                                      k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                                      dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(),
                                      dv.mutable_data_ptr<scalar_t>(), AttendScratch(g.keys, g.D)};
    });
  });
  return {dq, dk, dv};
}

// The registered ops: forward / backward with the op fixed.
template <bool SELF>
std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const c10::optional<at::Tensor>& mask, double scale) {
  return forward(SELF, q, k, v, mask, scale);
}

template <bool SELF>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor& dout, const at::Tensor& q,
                                                           const at::Tensor& k, const at::Tensor& v,
                                                           const c10::optional<at::Tensor>& mask,
                                                           const at::Tensor& out, const at::Tensor& lse, double scale) {
  return backward(SELF, dout, q, k, v, mask, out, lse, scale);
}

}  // namespace
}  // namespace retro_kernels::cpu

TORCH_LIBRARY_FRAGMENT(retro_kernels_cpu, m) {
  retro_kernels::define_neighbour_attention_ops(m);
}

TORCH_LIBRARY_IMPL(retro_kernels_cpu, CPU, m) {
  m.impl("neighbour_self_attention_fwd", &retro_kernels::cpu::forward_op<true>);
  m.impl("neighbour_self_attention_bwd", &retro_kernels::cpu::backward_op<true>);
  m.impl("neighbour_cross_attention_fwd", &retro_kernels::cpu::forward_op<false>);
  m.impl("neighbour_cross_attention_bwd", &retro_kernels::cpu::backward_op<false>);
}
