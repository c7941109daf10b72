// The neighbour-encoder attention ops in CUDA, neighbour_self_attention and
// neighbour_cross_attention: the address arithmetic of their score tiles and the launchers.
// The kernels are the shared attention core (attention_tiles.cuh).
//
// Both ops are dense attention over score tiles:
//   self-attention   tile (b, l, kk): the R tokens of neighbour kk of chunk l attend to the
//                    same R tokens; padding tokens (mask False) are masked keys and their
//                    query rows output zeros.
//   cross-attention  tile (b, l): the K*R tokens of the K neighbours of chunk l (row i is
//                    neighbour i / R, token i % R) attend to the M tokens of chunk l, read
//                    once per program for all K neighbours.
// One Problem serves both (the host writes cross-attention's k, v in self-attention's shape).
//
//   forward, backward dq: one program per (tile, query head, 64 rows)
//   backward dk/dv:       one program per (tile, kv head, 64 keys), over the rows of every
//                         query head of the kv group
// lse is (B, Hq, L*K*R), natural log, +inf for rows with no key and for padding rows.
#include "attention_tiles.cuh"
#include "../cpu/op_schemas.h"

#include <limits>

namespace retro_kernels::cuda {
namespace {

// The host writes both ops in one shape, so the device code has no branch on the op:
// k, v and the mask get a neighbour axis, a real one for self-attention (B, L, K, R, ...)
// and a zero-stride one of size 1 for cross-attention (B, L, 1, M, ...); a score tile is
// (b, l, kk) with kk < tile_k (K or 1).
struct NeighbourParams {
  AttentionArgs args;
  const void* q; const void* k; const void* v; const uint8_t* mask;
  const uint8_t* row_mask;             // self: the mask (padding query rows); cross: none
  const void* dout; const void* out;   // backward inputs
  void* o;                             // forward output, or dq
  void* dk; void* dv;                  // backward outputs (contiguous)
  int64_t sq[6], sdo[6], sout[6];      // (B, L, K, R, Hq, D)
  int64_t sk[6], sv[6];                // (B, L, tile_k, keys, Hkv, D)
  int64_t sm[4];                       // (B, L, tile_k, keys)
  bool vq, vdo, vout, vk, vv, vo;      // rows can be copied in 16-byte vectors
  int B, L, K, R, Hq, Hkv, group;
  int tile_k;                          // neighbours per score tile: K (self) or 1 (cross)
  int rows, row_div, keys, tiles;      // query rows of a tile (row i: neighbour i / row_div,
                                       // token i % row_div), keys of a tile, tiles
};

struct NeighbourProblem {
  using Params = NeighbourParams;

  template <Pass PASS>
  static int64_t programs(const Params& p) {
    if constexpr (PASS == Pass::BackwardDkDv) return program_count<PASS>(p.tiles, p.keys, p.Hkv);
    else return program_count<PASS>(p.tiles, p.rows, p.Hq);
  }

  template <Pass PASS, typename T>
  __device__ static Program<T> program(const Params& p, int block) {
    Program<T> pr{};
    int h, hk;
    constexpr bool dkdv = PASS == Pass::BackwardDkDv;
    const ProgramIndex at = split_program<PASS>(block, dkdv ? p.keys : p.rows, dkdv ? p.Hkv : p.Hq);
    own<PASS>(pr, at, p.group, h, hk);
    const int tile = at.tile;
    const int kk = tile % p.tile_k, l = (tile / p.tile_k) % p.L, b = tile / (p.tile_k * p.L);
    // the tile's first query token in the (B, L*K*R) token order of out, dq and lse
    const int64_t tokens = static_cast<int64_t>(p.L) * p.K * p.R;
    const int64_t t0 = ((static_cast<int64_t>(b) * p.L + l) * p.K + kk) * p.R;

    // query rows: neighbour kk + i / row_div, token i % row_div (self: row_div = NO_SPLIT)
    pr.rows = Rows{0, p.rows, p.row_div};
    auto query_operand = [&](const void* ptr, const int64_t* s, bool vec) {
      return Operand<T>{static_cast<const T*>(ptr), b * s[0] + l * s[1] + kk * s[2] + h * s[4], s[2], s[3], s[5],
                        vec};
    };
    pr.q = query_operand(p.q, p.sq, p.vq);
    pr.dout = query_operand(p.dout, p.sdo, p.vdo);
    pr.out = query_operand(p.out, p.sout, p.vout);
    pr.q_head = p.sq[4];
    pr.dout_head = p.sdo[4];
    pr.stat = (static_cast<int64_t>(b) * p.Hq + h) * tokens + (t0 - b * tokens);
    pr.stat_head = tokens;

    // keys: the tile's `keys` tokens (self: neighbour kk's R tokens; cross: chunk l's M)
    pr.keys = Rows{0, p.keys, NO_SPLIT};
    auto key_operand = [&](const void* ptr, const int64_t* s, bool vec) {
      return Operand<T>{static_cast<const T*>(ptr), b * s[0] + l * s[1] + kk * s[2] + hk * s[4], 0, s[3], s[5], vec};
    };
    pr.k = key_operand(p.k, p.sk, p.vk);
    pr.v = key_operand(p.v, p.sv, p.vv);
    const int64_t mask_offset = b * p.sm[0] + l * p.sm[1] + kk * p.sm[2];
    pr.key_mask = Mask{p.mask, mask_offset, 0, p.sm[3]};
    pr.row_mask = Mask{p.row_mask, mask_offset, 0, p.sm[3]};  // self: a padding token's row is zero

    // outputs, contiguous: out/dq (B, L, K, R, Hq, D); dk/dv (B, L, tile_k, keys, Hkv, D)
    const int64_t D = p.args.D;
    pr.o = Output<T>{static_cast<T*>(p.o), (t0 * p.Hq + h) * D, p.Hq * D, p.vo};
    const int64_t key0 = ((static_cast<int64_t>(b) * p.L + l) * p.tile_k + kk) * p.keys;
    pr.dk = Output<T>{static_cast<T*>(p.dk), (key0 * p.Hkv + hk) * D, p.Hkv * D, p.vo};
    pr.dv = Output<T>{static_cast<T*>(p.dv), (key0 * p.Hkv + hk) * D, p.Hkv * D, p.vo};
    return pr;
  }
};

// -----------------------------------------------------------------------------------------
// Launchers
// -----------------------------------------------------------------------------------------

void check_inputs(const char* op, bool self_attention, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(on_kernel_device(q) && k.device() == q.device() && v.device() == q.device(), op,
              " CUDA: q, k, v must be on one CUDA device");
  TORCH_CHECK(q.dim() == 6 && k.dim() == (self_attention ? 6 : 5) && v.sizes() == k.sizes(), op,
              ": q must be (B, L, K, R, Hq, D), k and v ",
              self_attention ? "(B, L, K, R, Hkv, D)" : "(B, L, M, Hkv, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v must share one dtype");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              " CUDA: dtype must be float16 or bfloat16, got ", q.scalar_type());
  const int kv_head_dim = self_attention ? 4 : 3;
  const int64_t hkv = k.size(kv_head_dim);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(-1) == q.size(5) && hkv > 0 &&
                  q.size(4) % hkv == 0, op, ": k must match q's (B, L) and head dim, and Hq % Hkv == 0");
  if (self_attention) {
    TORCH_CHECK(k.size(2) == q.size(2) && k.size(3) == q.size(3), op, ": k must match q's (K, R)");
  }
  TORCH_CHECK(q.size(5) >= 1 && q.size(5) <= MAX_HEAD_DIM, op, " CUDA: head dim must be 1..", MAX_HEAD_DIM,
              ", got ", q.size(5));
  TORCH_CHECK(q.size(2) * q.size(3) < NO_SPLIT && k.size(self_attention ? 3 : 2) < NO_SPLIT, op,
              " CUDA: K*R and M must stay below 2^30");
  if (mask.has_value() && mask->defined()) {
    const int64_t want = self_attention ? 4 : 3;
    bool ok = mask->scalar_type() == at::kBool && mask->device() == q.device() && mask->dim() == want;
    for (int d = 0; ok && d < want; ++d) ok = mask->size(d) == k.size(d);
    TORCH_CHECK(ok, op, ": the mask must be a bool ", self_attention ? "(B, L, K, R)" : "(B, L, M)",
                " tensor on q's device");
  }
}

NeighbourParams make_params(bool self_attention, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, double scale) {
  NeighbourParams p{};
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  for (int d = 0; d < 6; ++d) p.sq[d] = q.stride(d);
  // cross-attention's (B, L, M, ...) k, v and mask get a zero-stride neighbour axis
  const int from = self_attention ? 0 : 1;
  for (int d = 0; d < 6; ++d) {
    p.sk[d] = d == 2 && !self_attention ? 0 : k.stride(d < 2 ? d : d - from);
    p.sv[d] = d == 2 && !self_attention ? 0 : v.stride(d < 2 ? d : d - from);
  }
  p.vq = rows_are_vectorizable(q); p.vk = rows_are_vectorizable(k); p.vv = rows_are_vectorizable(v);
  if (mask.has_value() && mask->defined()) {
    p.mask = static_cast<const uint8_t*>(mask->data_ptr());
    for (int d = 0; d < 4; ++d) p.sm[d] = d == 2 && !self_attention ? 0 : mask->stride(d < 2 ? d : d - from);
    p.row_mask = self_attention ? p.mask : nullptr;
  }
  p.B = q.size(0); p.L = q.size(1); p.K = q.size(2); p.R = q.size(3); p.Hq = q.size(4);
  p.Hkv = self_attention ? k.size(4) : k.size(3);
  p.group = p.Hq / p.Hkv;
  p.tile_k = self_attention ? p.K : 1;
  p.rows = self_attention ? p.R : p.K * p.R;
  p.row_div = self_attention ? NO_SPLIT : p.R;
  p.keys = self_attention ? p.R : k.size(2);
  p.tiles = p.B * p.L * p.tile_k;
  p.args.D = q.size(5);
  p.args.scale = static_cast<float>(scale);
  p.args.qk_scale = static_cast<float>(scale) * LOG2E;
  p.vo = q.size(5) % VEC == 0;  // the outputs are ours: contiguous and aligned
  return p;
}

std::tuple<at::Tensor, at::Tensor> forward(bool self_attention, const char* op, const at::Tensor& q,
                                           const at::Tensor& k, const at::Tensor& v,
                                           const c10::optional<at::Tensor>& mask, double scale) {
  check_inputs(op, self_attention, q, k, v, mask);
  const DeviceGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(4), q.size(1) * q.size(2) * q.size(3)},
                             q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  if (k.numel() == 0) {  // an empty problem, no kernel to run: zeros, lse = +inf
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  NeighbourParams p = make_params(self_attention, q, k, v, mask, scale);
  p.o = out.data_ptr();
  p.args.lse = lse.data_ptr<float>();
  run_pass<Pass::Forward, NeighbourProblem>(p, q.scalar_type());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    bool self_attention, const char* op, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const c10::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse_in,
    double scale) {
  check_inputs(op, self_attention, q, k, v, mask);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type() && dout.device() == q.device() && out.device() == q.device(),
              op, " backward: dout and out must be like q");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 && lse_in.size(0) == q.size(0) &&
                  lse_in.size(1) == q.size(4) && lse_in.size(2) == q.size(1) * q.size(2) * q.size(3) &&
                  lse_in.device() == q.device(),
              op, " backward: lse must be fp32 (B, Hq, L*K*R) on q's device");
  const DeviceGuard guard(q.device());
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0 || k.numel() == 0) {  // an empty problem, no kernel to run: nothing flows
    dq.zero_(); dk.zero_(); dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor lse = lse_in.contiguous();
  // rowsum(dO * O) of every query row: written by the dq kernel, read by the dk/dv kernel
  at::Tensor delta = at::empty_like(lse);
  NeighbourParams p = make_params(self_attention, q, k, v, mask, scale);
  p.dout = dout.data_ptr(); p.out = out.data_ptr();
  for (int d = 0; d < 6; ++d) { p.sdo[d] = dout.stride(d); p.sout[d] = out.stride(d); }
  p.vdo = rows_are_vectorizable(dout); p.vout = rows_are_vectorizable(out);
  p.args.lse_in = lse.data_ptr<float>();
  p.args.delta = delta.data_ptr<float>();
  p.o = dq.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
  run_pass<Pass::BackwardDq, NeighbourProblem>(p, q.scalar_type());
  run_pass<Pass::BackwardDkDv, NeighbourProblem>(p, q.scalar_type());
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> self_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const c10::optional<at::Tensor>& mask, double scale) {
  return forward(true, "neighbour_self_attention", q, k, v, mask, scale);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> self_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, double scale) {
  return backward(true, "neighbour_self_attention", dout, q, k, v, mask, out, lse, scale);
}
std::tuple<at::Tensor, at::Tensor> cross_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const c10::optional<at::Tensor>& mask, double scale) {
  return forward(false, "neighbour_cross_attention", q, k, v, mask, scale);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, double scale) {
  return backward(false, "neighbour_cross_attention", dout, q, k, v, mask, out, lse, scale);
}

}  // namespace
}  // namespace retro_kernels::cuda

RETRO_KERNELS_CUDA_LIBRARY_FRAGMENT(m) {
  retro_kernels::define_neighbour_attention_ops(m);
}

RETRO_KERNELS_CUDA_LIBRARY_IMPL(m) {
  m.impl("neighbour_self_attention_fwd", &retro_kernels::cuda::self_forward);
  m.impl("neighbour_self_attention_bwd", &retro_kernels::cuda::self_backward);
  m.impl("neighbour_cross_attention_fwd", &retro_kernels::cuda::cross_forward);
  m.impl("neighbour_cross_attention_bwd", &retro_kernels::cuda::cross_backward);
}
