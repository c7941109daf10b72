// Chunked cross-attention in CUDA: the address arithmetic of its score tiles and the
// launchers. The kernels are the shared attention core (attention_tiles.cuh).
//
// Same indexing as the Triton kernels (retro_kernels/triton/chunked_cross_attention.py):
// absolute positions t fall into query chunks c = (t + 1) / m; query chunk 0 (the first m-1
// tokens) outputs zeros, query chunk c >= 1 attends to the K*R keys of the neighbours of
// chunk u = c - 1. Row i (0 <= i < m) of query chunk c is q's token n = c m - 1 + i - start_pos.
// Key j of chunk u is neighbour j / R, token j % R. Inputs are read through their strides.
//
//   forward, backward dq: one program per (batch, query chunk, query head, 64 rows)
//   backward dk/dv:       one program per (batch, neighbour chunk u, kv head, 64 keys); it
//                         owns those dk, dv rows and loops over the query chunk u + 1 of
//                         every query head of the kv group
// lse is (B, Hq, N), natural log, +inf for rows with no key.
#include "attention_tiles.cuh"
#include "../cpu/op_schemas.h"

namespace retro_kernels::cuda {
namespace {

struct CcaParams {
  AttentionArgs args;
  const void* q; const void* k; const void* v; const uint8_t* mask;
  const void* dout; const void* out;  // backward inputs
  void* o;                            // forward output, or dq
  void* dk; void* dv;                 // backward outputs (contiguous)
  int64_t sq[4], sdo[4], sout[4];     // (B, N, Hq, D)
  int64_t sk[6], sv[6];               // (B, L, K, R, Hkv, D)
  int64_t sm[4];                      // (B, L, K, R)
  bool vq, vdo, vout, vk, vv, vo;     // rows can be copied in 16-byte vectors
  int B, N, Hq, Hkv, group, L, R, keys, m, start_pos;
  int first_chunk, n_chunks;          // the query chunks that hold q's tokens
};

struct CcaProblem {
  using Params = CcaParams;

  // score tiles: (batch, query chunk) forward and for dq; (batch, neighbour chunk u) for dk/dv
  template <Pass PASS>
  static int64_t programs(const Params& p) {
    if constexpr (PASS == Pass::BackwardDkDv) return program_count<PASS>(static_cast<int64_t>(p.B) * p.L, p.keys, p.Hkv);
    else return program_count<PASS>(static_cast<int64_t>(p.B) * p.n_chunks, p.m, p.Hq);
  }

  template <Pass PASS, typename T>
  __device__ static Program<T> program(const Params& p, int block) {
    Program<T> pr{};
    int h, hk;
    constexpr bool dkdv = PASS == Pass::BackwardDkDv;
    const ProgramIndex at = split_program<PASS>(block, dkdv ? p.keys : p.m, dkdv ? p.Hkv : p.Hq);
    own<PASS>(pr, at, p.group, h, hk);
    // dk/dv: the keys of neighbour chunk u = tile % L, read by query chunk c = u + 1
    const int c = dkdv ? at.tile % p.L + 1 : p.first_chunk + at.tile % p.n_chunks;
    const int b = at.tile / (dkdv ? p.L : p.n_chunks);
    // query rows: chunk c's row i is token n0 + i; the real ones are 0 <= n < N
    const int64_t n0 = static_cast<int64_t>(c) * p.m - 1 - p.start_pos;
    const int lo = static_cast<int>(n0 < 0 ? -n0 : 0);
    const int hi = static_cast<int>(n0 + p.m <= p.N ? p.m : p.N - n0);
    pr.rows = Rows{lo, hi > lo ? hi : lo, NO_SPLIT};
    auto query_operand = [&](const void* ptr, const int64_t* s, bool vec) {
      return Operand<T>{static_cast<const T*>(ptr), b * s[0] + n0 * s[1] + h * s[2], 0, s[1], s[3], vec};
    };
    pr.q = query_operand(p.q, p.sq, p.vq);
    pr.dout = query_operand(p.dout, p.sdo, p.vdo);
    pr.out = query_operand(p.out, p.sout, p.vout);
    pr.q_head = p.sq[2];
    pr.dout_head = p.sdo[2];
    pr.stat = (static_cast<int64_t>(b) * p.Hq + h) * p.N + n0;
    pr.stat_head = p.N;
    // keys: the K*R tokens of neighbour chunk u = c - 1 (none for query chunk 0)
    const int64_t u = c - 1;
    pr.keys = Rows{0, c > 0 ? p.keys : 0, p.R};
    auto key_operand = [&](const void* ptr, const int64_t* s, bool vec) {
      return Operand<T>{static_cast<const T*>(ptr), b * s[0] + u * s[1] + hk * s[4], s[2], s[3], s[5], vec};
    };
    pr.k = key_operand(p.k, p.sk, p.vk);
    pr.v = key_operand(p.v, p.sv, p.vv);
    pr.key_mask = Mask{p.mask, b * p.sm[0] + u * p.sm[1], p.sm[2], p.sm[3]};
    pr.row_mask = Mask{nullptr, 0, 0, 0};
    // outputs, contiguous: out/dq (B, N, Hq, D), dk/dv (B, L, K*R, Hkv, D)
    const int64_t D = p.args.D;
    pr.o = Output<T>{static_cast<T*>(p.o), ((static_cast<int64_t>(b) * p.N + n0) * p.Hq + h) * D, p.Hq * D, p.vo};
    const int64_t key0 = (static_cast<int64_t>(b) * p.L + u) * p.keys;
    pr.dk = Output<T>{static_cast<T*>(p.dk), (key0 * p.Hkv + hk) * D, p.Hkv * D, p.vo};
    pr.dv = Output<T>{static_cast<T*>(p.dv), (key0 * p.Hkv + hk) * D, p.Hkv * D, p.vo};
    return pr;
  }
};

// -----------------------------------------------------------------------------------------
// Launchers
// -----------------------------------------------------------------------------------------

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& mask, int64_t chunk_size, int64_t start_pos) {
  TORCH_CHECK(on_kernel_device(q) && k.device() == q.device() && v.device() == q.device(),
              "retro_kernels CUDA chunked_cross_attention: q, k, v must be on one CUDA device");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 6 && v.sizes() == k.sizes(),
              "chunked_cross_attention: q must be (B, N, Hq, D), k and v (B, L, K, R, Hkv, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "chunked_cross_attention: q, k, v must share one dtype");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "chunked_cross_attention CUDA: dtype must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(5) == q.size(3) && k.size(4) > 0 && q.size(2) % k.size(4) == 0,
              "chunked_cross_attention: k must match q's batch and head dim, and Hq % Hkv == 0");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= MAX_HEAD_DIM, "chunked_cross_attention CUDA: head dim must be 1..",
              MAX_HEAD_DIM, ", got ", q.size(3));
  TORCH_CHECK(chunk_size >= 1 && start_pos >= 0, "chunked_cross_attention: bad chunk_size/start_pos");
  TORCH_CHECK(k.size(1) >= (start_pos + q.size(1)) / chunk_size,
              "chunked_cross_attention: k holds too few neighbour chunks");
  TORCH_CHECK(start_pos + q.size(1) + chunk_size < NO_SPLIT && k.size(2) * k.size(3) < NO_SPLIT,
              "chunked_cross_attention CUDA: positions and K*R must stay below 2^30");
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->device() == q.device() && mask->dim() == 4 &&
                    mask->size(0) == k.size(0) && mask->size(1) == k.size(1) && mask->size(2) == k.size(2) &&
                    mask->size(3) == k.size(3),
                "chunked_cross_attention: neighbour_mask must be a bool (B, L, K, R) tensor on q's device");
  }
}

CcaParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const c10::optional<at::Tensor>& mask, int64_t chunk_size, double scale, int64_t start_pos) {
  CcaParams p{};
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  for (int d = 0; d < 4; ++d) p.sq[d] = q.stride(d);
  for (int d = 0; d < 6; ++d) { p.sk[d] = k.stride(d); p.sv[d] = v.stride(d); }
  p.vq = rows_are_vectorizable(q); p.vk = rows_are_vectorizable(k); p.vv = rows_are_vectorizable(v);
  if (mask.has_value() && mask->defined()) {
    p.mask = static_cast<const uint8_t*>(mask->data_ptr());
    for (int d = 0; d < 4; ++d) p.sm[d] = mask->stride(d);
  }
  p.B = q.size(0); p.N = q.size(1); p.Hq = q.size(2);
  p.L = k.size(1); p.R = k.size(3); p.Hkv = k.size(4);
  p.keys = k.size(2) * k.size(3);
  p.group = p.Hq / p.Hkv;
  p.m = chunk_size; p.start_pos = start_pos;
  p.first_chunk = (start_pos + 1) / chunk_size;
  p.n_chunks = (start_pos + q.size(1)) / chunk_size - p.first_chunk + 1;
  p.args.D = q.size(3);
  p.args.scale = static_cast<float>(scale);
  p.args.qk_scale = static_cast<float>(scale) * LOG2E;
  p.vo = q.size(3) % VEC == 0;  // the outputs are ours: contiguous and aligned
  return p;
}

std::tuple<at::Tensor, at::Tensor> cca_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const c10::optional<at::Tensor>& mask, int64_t chunk_size,
                                               double scale, int64_t start_pos) {
  check_inputs(q, k, v, mask, chunk_size, start_pos);
  const DeviceGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  CcaParams p = make_params(q, k, v, mask, chunk_size, scale, start_pos);
  p.o = out.data_ptr();
  p.args.lse = lse.data_ptr<float>();
  run_pass<Pass::Forward, CcaProblem>(p, q.scalar_type());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cca_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse_in,
    int64_t chunk_size, double scale, int64_t start_pos) {
  check_inputs(q, k, v, mask, chunk_size, start_pos);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type() && dout.device() == q.device() && out.device() == q.device(),
              "chunked_cross_attention backward: dout and out must be like q");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 && lse_in.size(0) == q.size(0) &&
                  lse_in.size(1) == q.size(2) && lse_in.size(2) == q.size(1) && lse_in.device() == q.device(),
              "chunked_cross_attention backward: lse must be fp32 (B, Hq, N) on q's device");
  const DeviceGuard guard(q.device());
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0) {  // no query: no gradient flows (an empty problem; no kernel to run)
    dk.zero_(); dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor lse = lse_in.contiguous();
  // rowsum(dO * O) of every query row: written by the dq kernel, read by the dk/dv kernel
  at::Tensor delta = at::empty_like(lse);
  CcaParams p = make_params(q, k, v, mask, chunk_size, scale, start_pos);
  p.dout = dout.data_ptr(); p.out = out.data_ptr();
  for (int d = 0; d < 4; ++d) { p.sdo[d] = dout.stride(d); p.sout[d] = out.stride(d); }
  p.vdo = rows_are_vectorizable(dout); p.vout = rows_are_vectorizable(out);
  p.args.lse_in = lse.data_ptr<float>();
  p.args.delta = delta.data_ptr<float>();
  p.o = dq.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
  run_pass<Pass::BackwardDq, CcaProblem>(p, q.scalar_type());
  run_pass<Pass::BackwardDkDv, CcaProblem>(p, q.scalar_type());
  return {dq, dk, dv};
}

}  // namespace
}  // namespace retro_kernels::cuda

RETRO_KERNELS_CUDA_LIBRARY(m) {
  retro_kernels::define_chunked_cross_attention_ops(m);
}

RETRO_KERNELS_CUDA_LIBRARY_IMPL(m) {
  m.impl("chunked_cross_attention_fwd", &retro_kernels::cuda::cca_forward);
  m.impl("chunked_cross_attention_bwd", &retro_kernels::cuda::cca_backward);
}
