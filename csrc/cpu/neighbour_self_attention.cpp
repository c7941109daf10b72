// Neighbour self-attention on the CPU: fused forward and backward.
//
// Every token of neighbour (b, l, k) attends, with no causal mask, to the real tokens
// of that neighbour (R x R score tile per head). Padding query rows output zeros.
//
// Forward: one task per (batch, chunk, neighbour, query head): one block_forward.
// Backward: one task per (batch, chunk, neighbour, kv head). It owns the dk, dv rows
// of the neighbour and the dq rows of the kv head's query heads: one writer per
// element, fixed order of accumulation, deterministic.
//
// Inputs may be strided (unit stride on the head dim, else made contiguous first).
#include "block_attention.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace retro_kernels::cpu {
namespace {

at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "retro_kernels CPU neighbour_self_attention: q, k, v must be CPU tensors");
  TORCH_CHECK(q.dim() == 6 && k.dim() == 6 && v.sizes() == k.sizes(),
              "neighbour_self_attention: q must be (B, L, K, R, Hq, D), k and v (B, L, K, R, Hkv, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "neighbour_self_attention: q, k, v must share one dtype");
  for (int d = 0; d < 4; ++d) TORCH_CHECK(k.size(d) == q.size(d), "neighbour_self_attention: k must match q's (B, L, K, R)");
  TORCH_CHECK(k.size(5) == q.size(5) && k.size(4) > 0 && q.size(4) % k.size(4) == 0,
              "neighbour_self_attention: k must match q's head dim, and Hq % Hkv == 0");
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->device().is_cpu() && mask->dim() == 4 &&
                    mask->size(0) == q.size(0) && mask->size(1) == q.size(1) &&
                    mask->size(2) == q.size(2) && mask->size(3) == q.size(3),
                "neighbour_self_attention: neighbour_mask must be a CPU bool (B, L, K, R) tensor");
  }
}

struct Shape {
  int64_t B, L, K, R, Hq, Hkv, D, group;
  explicit Shape(const at::Tensor& q, const at::Tensor& k)
      : B(q.size(0)), L(q.size(1)), K(q.size(2)), R(q.size(3)), Hq(q.size(4)), Hkv(k.size(4)),
        D(q.size(5)), group(q.size(4) / k.size(4)) {}
  // offset of token (b, l, kk, 0) in a tensor with these strides
  static int64_t row0(const at::Tensor& t, int64_t b, int64_t l, int64_t kk) {
    return b * t.stride(0) + l * t.stride(1) + kk * t.stride(2);
  }
};

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                           const at::Tensor& v_in, const c10::optional<at::Tensor>& mask,
                                           double scale_in) {
  check_inputs(q_in, k_in, v_in, mask);
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const Shape s(q, k);
  const float scale = static_cast<float>(scale_in);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({s.B, s.Hq, s.L * s.K * s.R}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const bool has_mask = mask.has_value() && mask->defined();
  const bool* mask_ptr = has_mask ? mask->data_ptr<bool>() : nullptr;
  const int64_t so_r = s.Hq * s.D;  // out is contiguous (B, L, K, R, Hq, D)

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "neighbour_self_fwd_cpu", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    float* lp = lse.mutable_data_ptr<float>();
    const int64_t tasks = s.B * s.L * s.K * s.Hq;
    TaskQueue queue(tasks);
    at::parallel_for(0, queue.workers(), 1, [&](int64_t, int64_t) {
      BlockScratch scratch(s.R, s.D);
      std::vector<float> bias(s.R), k32(s.R * s.D), v32(s.R * s.D);
      for (int64_t task = queue.next(); task >= 0; task = queue.next()) {
        const int64_t h = task % s.Hq;
        const int64_t kk = (task / s.Hq) % s.K;
        const int64_t l = (task / (s.Hq * s.K)) % s.L;
        const int64_t b = task / (s.Hq * s.K * s.L);
        const int64_t hk = h / s.group;
        const bool* mrow = has_mask ? mask_ptr + Shape::row0(*mask, b, l, kk) : nullptr;
        const int64_t mstride = has_mask ? mask->stride(3) : 0;
        scalar_t* out_rows = op + (((b * s.L + l) * s.K + kk) * s.R) * so_r + h * s.D;
        float* lse_rows = lp + (b * s.Hq + h) * s.L * s.K * s.R + (l * s.K + kk) * s.R;
        if (bias_from_mask(mrow, mstride, s.R, bias.data()) == 0) {  // an empty neighbour: zeros
          zero_rows(out_rows, so_r, s.R, s.D);
          std::fill(lse_rows, lse_rows + s.R, kInf);
          continue;
        }
        const RowsF32 K = rows_as_f32(kp + Shape::row0(k, b, l, kk) + hk * k.stride(4), s.R, s.D, k.stride(3), k32.data());
        const RowsF32 V = rows_as_f32(vp + Shape::row0(v, b, l, kk) + hk * v.stride(4), s.R, s.D, v.stride(3), v32.data());
        block_forward(qp + Shape::row0(q, b, l, kk) + h * q.stride(4), q.stride(3), s.R, K, V, s.R, s.D,
                      has_mask ? bias.data() : nullptr, RowValid{mrow, mstride}, scale, out_rows, so_r,
                      lse_rows, scratch);
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
              "neighbour_self_attention backward: dout and out must be like q");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 && lse_in.size(0) == q_in.size(0) &&
                  lse_in.size(1) == q_in.size(4) &&
                  lse_in.size(2) == q_in.size(1) * q_in.size(2) * q_in.size(3),
              "neighbour_self_attention backward: lse must be fp32 (B, Hq, L*K*R)");
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const at::Tensor dout = unit_last(dout_in), out = out_in.contiguous(), lse = lse_in.contiguous();
  const Shape s(q, k);
  const float scale = static_cast<float>(scale_in);
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  if (dq.numel() == 0) return {dq, dk, dv};
  const bool has_mask = mask.has_value() && mask->defined();
  const bool* mask_ptr = has_mask ? mask->data_ptr<bool>() : nullptr;
  const int64_t so_r = s.Hq * s.D, skv_r = s.Hkv * s.D;  // dq/out and dk/dv are contiguous

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "neighbour_self_bwd_cpu", [&] {
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
    const int64_t tasks = s.B * s.L * s.K * s.Hkv;
    TaskQueue queue(tasks);
    at::parallel_for(0, queue.workers(), 1, [&](int64_t, int64_t) {
      BlockScratch scratch(s.R, s.D);
      std::vector<float> bias(s.R), k32(s.R * s.D), v32(s.R * s.D);
      std::vector<float> dk32(is_f32 ? 0 : s.R * s.D), dv32(is_f32 ? 0 : s.R * s.D);
      for (int64_t task = queue.next(); task >= 0; task = queue.next()) {
        const int64_t hk = task % s.Hkv;
        const int64_t kk = (task / s.Hkv) % s.K;
        const int64_t l = (task / (s.Hkv * s.K)) % s.L;
        const int64_t b = task / (s.Hkv * s.K * s.L);
        const int64_t token0 = ((b * s.L + l) * s.K + kk) * s.R;  // row of (b, l, kk, 0) in contiguous outputs
        scalar_t* dk_rows = dkp + token0 * skv_r + hk * s.D;
        scalar_t* dv_rows = dvp + token0 * skv_r + hk * s.D;
        const bool* mrow = has_mask ? mask_ptr + Shape::row0(*mask, b, l, kk) : nullptr;
        const int64_t mstride = has_mask ? mask->stride(3) : 0;
        if (bias_from_mask(mrow, mstride, s.R, bias.data()) == 0) {  // an empty neighbour: no gradient
          for (int64_t h = hk * s.group; h < (hk + 1) * s.group; ++h)
            zero_rows(dqp + token0 * so_r + h * s.D, so_r, s.R, s.D);
          zero_rows(dk_rows, skv_r, s.R, s.D);
          zero_rows(dv_rows, skv_r, s.R, s.D);
          continue;
        }
        const RowsF32 K = rows_as_f32(kp + Shape::row0(k, b, l, kk) + hk * k.stride(4), s.R, s.D, k.stride(3), k32.data());
        const RowsF32 V = rows_as_f32(vp + Shape::row0(v, b, l, kk) + hk * v.stride(4), s.R, s.D, v.stride(3), v32.data());
        float* dK = is_f32 ? reinterpret_cast<float*>(dk_rows) : dk32.data();
        float* dV = is_f32 ? reinterpret_cast<float*>(dv_rows) : dv32.data();
        const int64_t ld_kv = is_f32 ? skv_r : s.D;
        for (int64_t h = hk * s.group; h < (hk + 1) * s.group; ++h) {
          block_backward(dop + Shape::row0(dout, b, l, kk) + h * dout.stride(4), dout.stride(3),
                         qp + Shape::row0(q, b, l, kk) + h * q.stride(4), q.stride(3),
                         op + token0 * so_r + h * s.D, so_r,
                         lp + (b * s.Hq + h) * s.L * s.K * s.R + (l * s.K + kk) * s.R, s.R, K, V, s.R, s.D,
                         has_mask ? bias.data() : nullptr, scale, dqp + token0 * so_r + h * s.D, so_r,
                         dK, dV, ld_kv, h > hk * s.group, scratch);
        }
        if constexpr (!is_f32) {
          store_rows(dk_rows, skv_r, dK, s.D, s.R, s.D);
          store_rows(dv_rows, skv_r, dV, s.D, s.R, s.D);
        }
      }
    });
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace retro_kernels::cpu

TORCH_LIBRARY_FRAGMENT(retro_kernels_cpu, m) {
  m.def("neighbour_self_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? neighbour_mask, "
        "float scale) -> (Tensor, Tensor)");
  m.def("neighbour_self_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, "
        "Tensor? neighbour_mask, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(retro_kernels_cpu, CPU, m) {
  m.impl("neighbour_self_attention_fwd", &retro_kernels::cpu::forward);
  m.impl("neighbour_self_attention_bwd", &retro_kernels::cpu::backward);
}
