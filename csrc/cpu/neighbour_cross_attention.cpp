// Neighbour cross-attention on the CPU: fused forward and backward.
//
// The K*R tokens of the K neighbours of chunk l attend to the M tokens of chunk l
// itself: one (K*R) x M score tile per (batch, chunk, head). The chunk's keys and
// values are read once per task and shared by all K neighbours (never repeated K times).
//
// Forward: one task per (batch, chunk, query head): one block_forward over the K*R rows.
// Backward: one task per (batch, chunk, kv head). It owns the dk, dv rows of the chunk
// and the dq rows of the kv head's query heads: one writer per element, fixed order of
// accumulation, deterministic.
//
// Inputs may be strided: the head dim needs unit stride, and q's K and R dims must
// flatten into one row stride; otherwise the tensor is made contiguous first.
#include "block_attention.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace retro_kernels::cpu {
namespace {

at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// q (B, L, K, R, Hq, D): the K*R rows of a chunk must be one strided matrix.
at::Tensor flat_rows(const at::Tensor& t) {
  const bool ok = t.stride(5) == 1 && (t.size(2) == 1 || t.stride(2) == t.size(3) * t.stride(3));
  return ok ? t : t.contiguous();
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "retro_kernels CPU neighbour_cross_attention: q, k, v must be CPU tensors");
  TORCH_CHECK(q.dim() == 6 && k.dim() == 5 && v.sizes() == k.sizes(),
              "neighbour_cross_attention: q must be (B, L, K, R, Hq, D), k and v (B, L, M, Hkv, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "neighbour_cross_attention: q, k, v must share one dtype");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(4) == q.size(5) &&
                  k.size(3) > 0 && q.size(4) % k.size(3) == 0,
              "neighbour_cross_attention: k must match q's (B, L) and head dim, and Hq % Hkv == 0");
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->device().is_cpu() && mask->dim() == 3 &&
                    mask->size(0) == k.size(0) && mask->size(1) == k.size(1) && mask->size(2) == k.size(2),
                "neighbour_cross_attention: chunk_mask must be a CPU bool (B, L, M) tensor");
  }
}

struct Shape {
  int64_t B, L, K, R, Hq, M, Hkv, D, group, rows;  // rows = K * R queries per chunk
  explicit Shape(const at::Tensor& q, const at::Tensor& k)
      : B(q.size(0)), L(q.size(1)), K(q.size(2)), R(q.size(3)), Hq(q.size(4)), M(k.size(2)),
        Hkv(k.size(3)), D(q.size(5)), group(q.size(4) / k.size(3)), rows(q.size(2) * q.size(3)) {}
};

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                           const at::Tensor& v_in, const c10::optional<at::Tensor>& mask,
                                           double scale_in) {
  check_inputs(q_in, k_in, v_in, mask);
  const at::Tensor q = flat_rows(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const Shape s(q, k);
  const float scale = static_cast<float>(scale_in);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({s.B, s.Hq, s.L * s.rows}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const bool has_mask = mask.has_value() && mask->defined();
  const bool* mask_ptr = has_mask ? mask->data_ptr<bool>() : nullptr;
  const int64_t so_r = s.Hq * s.D;  // out is contiguous (B, L, K*R, Hq, D)

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "neighbour_cross_fwd_cpu", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    float* lp = lse.mutable_data_ptr<float>();
    const int64_t tasks = s.B * s.L * s.Hq;
    TaskQueue queue(tasks);
    at::parallel_for(0, queue.workers(), 1, [&](int64_t, int64_t) {
      BlockScratch scratch(s.M, s.D);
      std::vector<float> bias(s.M), k32(s.M * s.D), v32(s.M * s.D);
      for (int64_t task = queue.next(); task >= 0; task = queue.next()) {
        const int64_t h = task % s.Hq;
        const int64_t l = (task / s.Hq) % s.L;
        const int64_t b = task / (s.Hq * s.L);
        const int64_t hk = h / s.group;
        scalar_t* out_rows = op + (b * s.L + l) * s.rows * so_r + h * s.D;
        float* lse_rows = lp + (b * s.Hq + h) * s.L * s.rows + l * s.rows;
        const bool* mrow = has_mask ? mask_ptr + b * mask->stride(0) + l * mask->stride(1) : nullptr;
        if (bias_from_mask(mrow, has_mask ? mask->stride(2) : 0, s.M, bias.data()) == 0) {
          zero_rows(out_rows, so_r, s.rows, s.D);  // every chunk token masked: zeros
          std::fill(lse_rows, lse_rows + s.rows, kInf);
          continue;
        }
        // the chunk's keys and values: read once, shared by the K neighbours' rows
        const RowsF32 K = rows_as_f32(kp + b * k.stride(0) + l * k.stride(1) + hk * k.stride(3), s.M, s.D,
                                      k.stride(2), k32.data());
        const RowsF32 V = rows_as_f32(vp + b * v.stride(0) + l * v.stride(1) + hk * v.stride(3), s.M, s.D,
                                      v.stride(2), v32.data());
        block_forward(qp + b * q.stride(0) + l * q.stride(1) + h * q.stride(4), q.stride(3), s.rows, K, V, s.M,
                      s.D, has_mask ? bias.data() : nullptr, RowValid{}, scale, out_rows, so_r, lse_rows,
                      scratch);
      }
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& mask, const at::Tensor& out_in, const at::Tensor& lse_in, double scale_in) {
  check_inputs(q_in, k_in, v_in, mask);
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes() &&
                  dout_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
              "neighbour_cross_attention backward: dout and out must be like q");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 && lse_in.size(0) == q_in.size(0) &&
                  lse_in.size(1) == q_in.size(4) &&
                  lse_in.size(2) == q_in.size(1) * q_in.size(2) * q_in.size(3),
              "neighbour_cross_attention backward: lse must be fp32 (B, Hq, L*K*R)");
  const at::Tensor q = flat_rows(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const at::Tensor dout = flat_rows(dout_in), out = out_in.contiguous(), lse = lse_in.contiguous();
  const Shape s(q, k);
  const float scale = static_cast<float>(scale_in);
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  if (dk.numel() == 0) return {dq, dk, dv};
  if (dq.numel() == 0) {  // no query: no gradient flows
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const bool has_mask = mask.has_value() && mask->defined();
  const bool* mask_ptr = has_mask ? mask->data_ptr<bool>() : nullptr;
  const int64_t so_r = s.Hq * s.D, skv_r = s.Hkv * s.D;  // dq/out and dk/dv are contiguous

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "neighbour_cross_bwd_cpu", [&] {
    constexpr bool is_f32 = std::is_same_v<scalar_t, float>;
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const scalar_t* dop = dout.const_data_ptr<scalar_t>();
    const scalar_t* op = out.const_data_ptr<scalar_t>();
    const float* lp = lse.const_data_ptr<float>();
    scalar_t* dqp = dq.mutable_data_ptr<scalar_t>();
    scalar_t* dkp = dk.mutable_data_ptr<scalar_t>();
    scalar_t* dvp = dv.mutable_data_ptr<scalar_t>();
    const int64_t tasks = s.B * s.L * s.Hkv;
    TaskQueue queue(tasks);
    at::parallel_for(0, queue.workers(), 1, [&](int64_t, int64_t) {
      BlockScratch scratch(s.M, s.D);
      std::vector<float> bias(s.M), k32(s.M * s.D), v32(s.M * s.D);
      std::vector<float> dk32(is_f32 ? 0 : s.M * s.D), dv32(is_f32 ? 0 : s.M * s.D);
      for (int64_t task = queue.next(); task >= 0; task = queue.next()) {
        const int64_t hk = task % s.Hkv;
        const int64_t l = (task / s.Hkv) % s.L;
        const int64_t b = task / (s.Hkv * s.L);
        scalar_t* dk_rows = dkp + (b * s.L + l) * s.M * skv_r + hk * s.D;
        scalar_t* dv_rows = dvp + (b * s.L + l) * s.M * skv_r + hk * s.D;
        const int64_t q_row0 = (b * s.L + l) * s.rows;  // first query row of the chunk in dq/out
        const bool* mrow = has_mask ? mask_ptr + b * mask->stride(0) + l * mask->stride(1) : nullptr;
        if (bias_from_mask(mrow, has_mask ? mask->stride(2) : 0, s.M, bias.data()) == 0) {
          for (int64_t h = hk * s.group; h < (hk + 1) * s.group; ++h)
            zero_rows(dqp + q_row0 * so_r + h * s.D, so_r, s.rows, s.D);
          zero_rows(dk_rows, skv_r, s.M, s.D);
          zero_rows(dv_rows, skv_r, s.M, s.D);
          continue;
        }
        const RowsF32 K = rows_as_f32(kp + b * k.stride(0) + l * k.stride(1) + hk * k.stride(3), s.M, s.D,
                                      k.stride(2), k32.data());
        const RowsF32 V = rows_as_f32(vp + b * v.stride(0) + l * v.stride(1) + hk * v.stride(3), s.M, s.D,
                                      v.stride(2), v32.data());
        float* dK = is_f32 ? reinterpret_cast<float*>(dk_rows) : dk32.data();
        float* dV = is_f32 ? reinterpret_cast<float*>(dv_rows) : dv32.data();
        const int64_t ld_kv = is_f32 ? skv_r : s.D;
        for (int64_t h = hk * s.group; h < (hk + 1) * s.group; ++h) {
          block_backward(dop + b * dout.stride(0) + l * dout.stride(1) + h * dout.stride(4), dout.stride(3),
                         qp + b * q.stride(0) + l * q.stride(1) + h * q.stride(4), q.stride(3),
                         op + q_row0 * so_r + h * s.D, so_r,
                         lp + (b * s.Hq + h) * s.L * s.rows + l * s.rows, s.rows, K, V, s.M, s.D,
                         has_mask ? bias.data() : nullptr, scale, dqp + q_row0 * so_r + h * s.D, so_r,
                         dK, dV, ld_kv, h > hk * s.group, scratch);
        }
        if constexpr (!is_f32) {
          store_rows(dk_rows, skv_r, dK, s.D, s.M, s.D);
          store_rows(dv_rows, skv_r, dV, s.D, s.M, s.D);
        }
      }
    });
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace retro_kernels::cpu

TORCH_LIBRARY_FRAGMENT(retro_kernels_cpu, m) {
  m.def("neighbour_cross_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? chunk_mask, "
        "float scale) -> (Tensor, Tensor)");
  m.def("neighbour_cross_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, "
        "Tensor? chunk_mask, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(retro_kernels_cpu, CPU, m) {
  m.impl("neighbour_cross_attention_fwd", &retro_kernels::cpu::forward);
  m.impl("neighbour_cross_attention_bwd", &retro_kernels::cpu::backward);
}
