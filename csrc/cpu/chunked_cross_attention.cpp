// Chunked cross-attention on the CPU: fused forward and backward.
//
// The shift is folded into the indexing, as in the Triton kernels: absolute
// positions t fall into query chunks c = (t + 1) / m; query chunk 0 (the first
// m-1 tokens) outputs zeros, query chunk c >= 1 reads the K*R keys of the
// neighbours of chunk u = c - 1. The rows of q that a query chunk owns are
// consecutive, so every tile below is a strided view of the inputs: no pad, no
// reshape, no (N x L*K*R) score or mask tensor.
//
// Masked keys are dropped before any arithmetic: the unmasked rows of K and V are
// packed (fp32), so a mask that hides 30% of the neighbour tokens saves 30% of the work.
//
// Forward: one task per (batch, query chunk, query head). For each block of
// up to BLOCK_M query rows: S = Q K^T (BLOCK_M x K*R, a few hundred KB at most),
// softmax over the whole row at once (the row fits, so no online rescaling is
// needed), O = P V, rows scaled by 1/sum. Saves lse (B, Hq, N), natural log of
// the scaled scores; +inf for rows that see no key.
//
// Backward: one task per (batch, query chunk, kv head). It owns the dq rows of
// the chunk for the kv head's query heads and the dk, dv rows of the neighbour
// chunk it reads, so every output element has one writer and a fixed order of
// accumulation: deterministic, whatever the number of threads.
//
// Inputs may be strided; each operand needs a unit stride on the head dim (and k,
// v a (K, R) pair that flattens), otherwise it is made contiguous first.
// fp16/bf16 tiles are converted to fp32 in per-thread scratch; all arithmetic
// is fp32.
#include "common.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace retro_kernels::cpu {
namespace {

constexpr int64_t BLOCK_M = 64;  // query rows per score tile

// Shapes and strides (in elements) of one call.
struct Geometry {
  int64_t B, N, Hq, D, L, K, R, Hkv, group, keys;  // keys = K * R
  int64_t m, start_pos;
  float scale;
  int64_t sq_b, sq_n, sq_h;          // q (and dout: its own strides below)
  int64_t sk_b, sk_l, sk_j, sk_h;    // k, with j = kk * R + r flattened
  int64_t sv_b, sv_l, sv_j, sv_h;    // v
  int64_t sm_b, sm_l, sm_k, sm_r;    // neighbour_mask
  bool has_mask;

  // Rows n0 .. n1-1 of q that query chunk c owns (empty when none is real).
  void query_rows(int64_t c, int64_t& n0, int64_t& n1) const {
    n0 = std::max<int64_t>(c * m - 1 - start_pos, 0);
    n1 = std::min<int64_t>(c * m + m - 1 - start_pos, N);
    if (n1 < n0) n1 = n0;
  }
};

// A tensor that the kernels can address with one stride per dim, unit on the last.
at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// k/v (B, L, K, R, Hkv, D): the K and R dims must flatten to one stride.
at::Tensor flat_keys(const at::Tensor& t) {
  const bool ok = t.stride(5) == 1 && (t.size(2) == 1 || t.stride(2) == t.size(3) * t.stride(3));
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
  TORCH_CHECK(k.size(1) >= (start_pos + q.size(1)) / chunk_size,
              "chunked_cross_attention: k holds too few neighbour chunks");
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->device().is_cpu() && mask->dim() == 4 &&
                    mask->size(0) == k.size(0) && mask->size(1) == k.size(1) &&
                    mask->size(2) == k.size(2) && mask->size(3) == k.size(3),
                "chunked_cross_attention: neighbour_mask must be a CPU bool (B, L, K, R) tensor");
  }
}

// The unmasked keys of neighbour chunk (b, u): their indices j = kk * R + r, in order.
// Returns how many there are (all `keys` without a mask; then `index` is not filled).
int64_t real_keys(const Geometry& g, const bool* mask, int64_t b, int64_t u, int64_t* index) {
  if (!g.has_mask) return g.keys;
  int64_t real = 0;
  const bool* base = mask + b * g.sm_b + u * g.sm_l;
  for (int64_t kk = 0; kk < g.K; ++kk) {
    for (int64_t r = 0; r < g.R; ++r) {
      if (base[kk * g.sm_k + r * g.sm_r]) index[real++] = kk * g.R + r;
    }
  }
  return real;
}

// The rows of K (or V) that the softmax sees, as an fp32 matrix: the tensor's own
// memory (fp32, no key masked), else the unmasked rows packed into `scratch`, so that
// masked keys cost no arithmetic at all (and take exactly zero weight).
template <typename scalar_t>
RowsF32 key_rows(const scalar_t* src, int64_t ld, int64_t keys, int64_t n_real, const int64_t* index,
                 int64_t D, float* scratch) {
  if (n_real == keys) return rows_as_f32(src, keys, D, ld, scratch);
  for (int64_t t = 0; t < n_real; ++t) load_rows(scratch + t * D, src + index[t] * ld, 1, D, ld);
  return {scratch, D};
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

template <typename scalar_t>
void forward_kernel(const Geometry& g, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                    const bool* mask, scalar_t* out, float* lse) {
  const int64_t D = g.D, keys = g.keys;
  const int64_t so_n = g.Hq * D;  // out is contiguous (B, N, Hq, D)
  const int64_t first_chunk = (g.start_pos + 1) / g.m;
  const int64_t n_chunks = (g.start_pos + g.N) / g.m - first_chunk + 1;
  const int64_t tasks = g.B * n_chunks * g.Hq;
  constexpr bool is_f32 = std::is_same_v<scalar_t, float>;

  TaskQueue queue(tasks);
  at::parallel_for(0, queue.workers(), 1, [&](int64_t, int64_t) {
    // per-thread scratch: scores, unmasked-key indices, row statistics, fp32 copies of low-precision tiles
    std::vector<float> scores(BLOCK_M * keys), inv_sum(BLOCK_M);
    std::vector<int64_t> index(keys);
    std::vector<float> q32(is_f32 ? 0 : BLOCK_M * D), o32(is_f32 ? 0 : BLOCK_M * D);
    std::vector<float> k32(keys * D), v32(keys * D);
    // the K and V rows of the next task (none for query chunk 0), loaded while this one runs
    PrefetchQueue prefetch;
    auto prefetch_task = [&](int64_t task) {
      prefetch.clear();
      if (task < 0) return;
      const int64_t c = first_chunk + (task / g.Hq) % n_chunks, b = task / (g.Hq * n_chunks);
      const int64_t hk = (task % g.Hq) / g.group, row_bytes = D * sizeof(scalar_t);
      if (c == 0) return;
      prefetch.add(k + b * g.sk_b + (c - 1) * g.sk_l + hk * g.sk_h, keys, row_bytes, g.sk_j * sizeof(scalar_t));
      prefetch.add(v + b * g.sv_b + (c - 1) * g.sv_l + hk * g.sv_h, keys, row_bytes, g.sv_j * sizeof(scalar_t));
    };
    for (int64_t task = queue.next(), next = queue.next(); task >= 0; task = next, next = queue.next()) {
      prefetch_task(next);
      const int64_t h = task % g.Hq;
      const int64_t c = first_chunk + (task / g.Hq) % n_chunks;
      const int64_t b = task / (g.Hq * n_chunks);
      int64_t n0, n1;
      g.query_rows(c, n0, n1);
      scalar_t* out_rows = out + (b * g.N + n0) * so_n + h * D;
      float* lse_rows = lse + (b * g.Hq + h) * g.N + n0;
      const int64_t u = c - 1;  // the neighbour chunk that query chunk c reads
      if (n1 == n0) continue;
      const int64_t n_real = c > 0 ? real_keys(g, mask, b, u, index.data()) : 0;
      if (n_real == 0) {  // query chunk 0, or every key masked: zeros, lse = +inf
        zero_rows(out_rows, so_n, n1 - n0, D);
        std::fill(lse_rows, lse_rows + (n1 - n0), kInf);
        continue;
      }
      const int64_t hk = h / g.group;
      const RowsF32 K = key_rows(k + b * g.sk_b + u * g.sk_l + hk * g.sk_h, g.sk_j, keys, n_real, index.data(), D, k32.data());
      const RowsF32 V = key_rows(v + b * g.sv_b + u * g.sv_l + hk * g.sv_h, g.sv_j, keys, n_real, index.data(), D, v32.data());

      for (int64_t row = n0; row < n1; row += BLOCK_M) {
        const int64_t rows = std::min(BLOCK_M, n1 - row);
        const RowsF32 Q = rows_as_f32(q + b * g.sq_b + row * g.sq_n + h * g.sq_h, rows, D, g.sq_n, q32.data());
        // S = scale * Q K^T (the scale in the GEMM's epilogue, the same one rounding as in
        // the softmax); P = softmax(S) over the whole row (all K*R keys at once)
        gemm(false, true, rows, n_real, D, g.scale, Q.data, Q.ld, K.data, K.ld, 0.0f, scores.data(), n_real, &prefetch);
        softmax_rows(scores.data(), rows, n_real, nullptr, 1.0f, lse_rows + (row - n0), inv_sum.data());
        // O = P V / sum, straight into out when it is fp32
        scalar_t* o = out_rows + (row - n0) * so_n;
        if constexpr (is_f32) {
          gemm(false, false, rows, D, n_real, 1.0f, scores.data(), n_real, V.data, V.ld, 0.0f, o, so_n, &prefetch);
          scale_rows(o, rows, D, so_n, inv_sum.data());
        } else {
          gemm(false, false, rows, D, n_real, 1.0f, scores.data(), n_real, V.data, V.ld, 0.0f, o32.data(), D, &prefetch);
          scale_rows(o32.data(), rows, D, D, inv_sum.data());
          store_rows(o, so_n, o32.data(), D, rows, D);
        }
      }
    }
  });
}

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cca_forward_cpu", [&] {
    forward_kernel<scalar_t>(g, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                             v.const_data_ptr<scalar_t>(), mask_ptr, out.mutable_data_ptr<scalar_t>(),
                             lse.mutable_data_ptr<float>());
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

template <typename scalar_t>
void backward_kernel(const Geometry& g, const scalar_t* dout, int64_t sdo_b, int64_t sdo_n,
                     int64_t sdo_h, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                     const bool* mask, const scalar_t* out, const float* lse, scalar_t* dq,
                     scalar_t* dk, scalar_t* dv) {
  const int64_t D = g.D, keys = g.keys;
  const int64_t so_n = g.Hq * D;   // out and dq are contiguous (B, N, Hq, D)
  const int64_t sdk_j = g.Hkv * D;  // dk and dv are contiguous (B, L, K*R, Hkv, D)
  // one task per (batch, query chunk c = 0 .. L, kv head): chunk 0 writes the zero rows
  // of dq, chunk c >= 1 the gradients of neighbour chunk c - 1 (zeros if no query reads it)
  const int64_t n_chunks = g.L + 1;
  const int64_t tasks = g.B * n_chunks * g.Hkv;
  constexpr bool is_f32 = std::is_same_v<scalar_t, float>;

  TaskQueue queue(tasks);
  at::parallel_for(0, queue.workers(), 1, [&](int64_t, int64_t) {
    std::vector<float> probs(BLOCK_M * keys), dscores(BLOCK_M * keys), delta(BLOCK_M);
    std::vector<int64_t> index(keys);
    std::vector<float> q32(is_f32 ? 0 : BLOCK_M * D), do32(BLOCK_M * D), o32(BLOCK_M * D);
    std::vector<float> dq32(is_f32 ? 0 : BLOCK_M * D);
    std::vector<float> k32(keys * D), v32(keys * D), dk32(keys * D), dv32(keys * D);
    // the next task's K, V, dK, dV rows and its heads' q, dout, out rows, loaded while this one runs
    PrefetchQueue prefetch;
    auto prefetch_task = [&](int64_t task) {
      prefetch.clear();
      if (task < 0) return;
      const int64_t hk = task % g.Hkv, c = (task / g.Hkv) % n_chunks, b = task / (g.Hkv * n_chunks);
      const int64_t row_bytes = D * sizeof(scalar_t), E = sizeof(scalar_t);
      int64_t n0, n1;
      g.query_rows(c, n0, n1);
      if (c == 0 || n1 == n0) return;
      prefetch.add(k + b * g.sk_b + (c - 1) * g.sk_l + hk * g.sk_h, keys, row_bytes, g.sk_j * E);
      prefetch.add(v + b * g.sv_b + (c - 1) * g.sv_l + hk * g.sv_h, keys, row_bytes, g.sv_j * E);
      for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
        prefetch.add(q + b * g.sq_b + n0 * g.sq_n + h * g.sq_h, n1 - n0, row_bytes, g.sq_n * E);
        prefetch.add(dout + b * sdo_b + n0 * sdo_n + h * sdo_h, n1 - n0, row_bytes, sdo_n * E);
        prefetch.add(out + (b * g.N + n0) * so_n + h * D, n1 - n0, row_bytes, so_n * E);
      }
      prefetch.add(dk + ((b * g.L + c - 1) * keys) * sdk_j + hk * D, keys, row_bytes, sdk_j * E);
      prefetch.add(dv + ((b * g.L + c - 1) * keys) * sdk_j + hk * D, keys, row_bytes, sdk_j * E);
    };
    for (int64_t task = queue.next(), next = queue.next(); task >= 0; task = next, next = queue.next()) {
      prefetch_task(next);
      const int64_t hk = task % g.Hkv;
      const int64_t c = (task / g.Hkv) % n_chunks;
      const int64_t b = task / (g.Hkv * n_chunks);
      const int64_t u = c - 1;
      int64_t n0, n1;
      g.query_rows(c, n0, n1);
      scalar_t* dk_rows = u >= 0 ? dk + ((b * g.L + u) * keys) * sdk_j + hk * D : nullptr;
      scalar_t* dv_rows = u >= 0 ? dv + ((b * g.L + u) * keys) * sdk_j + hk * D : nullptr;
      const int64_t n_real = c > 0 ? real_keys(g, mask, b, u, index.data()) : 0;
      if (n_real == 0 || n1 == n0) {  // nothing flows: zero gradients
        for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h)
          zero_rows(dq + (b * g.N + n0) * so_n + h * D, so_n, n1 - n0, D);
        if (u >= 0) {
          zero_rows(dk_rows, sdk_j, keys, D);
          zero_rows(dv_rows, sdk_j, keys, D);
        }
        continue;
      }
      const RowsF32 K = key_rows(k + b * g.sk_b + u * g.sk_l + hk * g.sk_h, g.sk_j, keys, n_real, index.data(), D, k32.data());
      const RowsF32 V = key_rows(v + b * g.sv_b + u * g.sv_l + hk * g.sv_h, g.sv_j, keys, n_real, index.data(), D, v32.data());
      // dK, dV of the unmasked keys accumulate over the group's heads and the chunk's rows:
      // in place when fp32 and nothing is masked, else in fp32 scratch, scattered at the end
      const bool in_place = is_f32 && n_real == keys;
      float* dK = in_place ? reinterpret_cast<float*>(dk_rows) : dk32.data();
      float* dV = in_place ? reinterpret_cast<float*>(dv_rows) : dv32.data();
      const int64_t ld_kv = in_place ? sdk_j : D;
      float beta = 0.0f;  // the first product overwrites, the rest accumulate

      for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
        for (int64_t row = n0; row < n1; row += BLOCK_M) {
          const int64_t rows = std::min(BLOCK_M, n1 - row);
          const RowsF32 Q = rows_as_f32(q + b * g.sq_b + row * g.sq_n + h * g.sq_h, rows, D, g.sq_n, q32.data());
          const scalar_t* do_src = dout + b * sdo_b + row * sdo_n + h * sdo_h;
          const RowsF32 dO = rows_as_f32(do_src, rows, D, sdo_n, do32.data());
          // delta_i = rowsum(dO * O): the softmax-backward correction
          const RowsF32 O = rows_as_f32(out + (b * g.N + row) * so_n + h * D, rows, D, so_n, o32.data());
          for (int64_t i = 0; i < rows; ++i) delta[i] = dot(dO.data + i * dO.ld, O.data + i * O.ld, D);
          const float* lse_rows = lse + (b * g.Hq + h) * g.N + row;

          // P = exp(scale * Q K^T - lse), recomputed from the forward's statistics
          gemm(false, true, rows, n_real, D, 1.0f, Q.data, Q.ld, K.data, K.ld, 0.0f, probs.data(), n_real, &prefetch);
          probs_from_lse(probs.data(), rows, n_real, nullptr, g.scale, lse_rows);
          // dV += P^T dO
          gemm(true, false, n_real, D, rows, 1.0f, probs.data(), n_real, dO.data, dO.ld, beta, dV, ld_kv, &prefetch);
          // dP = dO V^T; dS = P * (dP - delta)
          gemm(false, true, rows, n_real, D, 1.0f, dO.data, dO.ld, V.data, V.ld, 0.0f, dscores.data(), n_real, &prefetch);
          softmax_grad(dscores.data(), probs.data(), rows, n_real, delta.data());
          // dQ = scale * dS K: each row of dq has this one writer
          scalar_t* dq_rows = dq + (b * g.N + row) * so_n + h * D;
          if constexpr (is_f32) {
            gemm(false, false, rows, D, n_real, g.scale, dscores.data(), n_real, K.data, K.ld, 0.0f, dq_rows, so_n, &prefetch);
          } else {
            gemm(false, false, rows, D, n_real, g.scale, dscores.data(), n_real, K.data, K.ld, 0.0f, dq32.data(), D, &prefetch);
            store_rows(dq_rows, so_n, dq32.data(), D, rows, D);
          }
          // dK += scale * dS^T Q
          gemm(true, false, n_real, D, rows, g.scale, dscores.data(), n_real, Q.data, Q.ld, beta, dK, ld_kv, &prefetch);
          beta = 1.0f;
        }
      }
      if (in_place) continue;
      if (n_real == keys) {
        store_rows(dk_rows, sdk_j, dK, D, keys, D);
        store_rows(dv_rows, sdk_j, dV, D, keys, D);
        continue;
      }
      // scatter the packed rows back; masked keys get zero gradients
      zero_rows(dk_rows, sdk_j, keys, D);
      zero_rows(dv_rows, sdk_j, keys, D);
      for (int64_t t = 0; t < n_real; ++t) {
        store_rows(dk_rows + index[t] * sdk_j, sdk_j, dK + t * D, D, 1, D);
        store_rows(dv_rows + index[t] * sdk_j, sdk_j, dV + t * D, D, 1, D);
      }
    }
  });
}

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
  const at::Tensor q = unit_last(q_in), k = flat_keys(k_in), v = flat_keys(v_in);
  const at::Tensor dout = unit_last(dout_in), out = out_in.contiguous(), lse = lse_in.contiguous();
  const Geometry g = make_geometry(q, k, v, mask, chunk_size, scale, start_pos);
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  if (g.B * g.Hkv * g.D == 0) return {dq, dk, dv};
  const bool* mask_ptr = g.has_mask ? mask->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cca_backward_cpu", [&] {
    backward_kernel<scalar_t>(g, dout.const_data_ptr<scalar_t>(), dout.stride(0), dout.stride(1),
                              dout.stride(2), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                              v.const_data_ptr<scalar_t>(), mask_ptr, out.const_data_ptr<scalar_t>(),
                              lse.const_data_ptr<float>(), dq.mutable_data_ptr<scalar_t>(),
                              dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

std::string gemm_backend() { return gemm_name(); }

// Test-only: c <- alpha * op(a) op(b) + beta * c through gemm(), on the tensors' own
// memory (a, b stored as gemm() reads them; any row strides, unit column strides).
void gemm_for_tests(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool trans_a,
                    bool trans_b, double alpha, double beta) {
  for (const at::Tensor* t : {&a, &b, &c})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 2 &&
                    t->stride(1) == 1,
                "gemm_for_tests: a, b, c must be 2-d fp32 CPU tensors with unit column stride");
  const int64_t M = c.size(0), N = c.size(1), K = trans_a ? a.size(0) : a.size(1);
  TORCH_CHECK((trans_a ? a.size(1) : a.size(0)) == M && (trans_b ? b.size(1) : b.size(0)) == K &&
                  (trans_b ? b.size(0) : b.size(1)) == N,
              "gemm_for_tests: shapes do not match");
  gemm(trans_a, trans_b, M, N, K, static_cast<float>(alpha), a.const_data_ptr<float>(), a.stride(0),
       b.const_data_ptr<float>(), b.stride(0), static_cast<float>(beta), c.mutable_data_ptr<float>(),
       c.stride(0));
}

}  // namespace
}  // namespace retro_kernels::cpu

TORCH_LIBRARY(retro_kernels_cpu, m) {
  m.def("chunked_cross_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? neighbour_mask, "
        "int chunk_size, float scale, int start_pos) -> (Tensor, Tensor)");
  m.def("chunked_cross_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, "
        "Tensor? neighbour_mask, Tensor out, Tensor lse, int chunk_size, float scale, "
        "int start_pos) -> (Tensor, Tensor, Tensor)");
  m.def("gemm_backend() -> str", &retro_kernels::cpu::gemm_backend);
  m.def("gemm_for_tests(Tensor a, Tensor b, Tensor(a!) c, bool trans_a, bool trans_b, float alpha, "
        "float beta) -> ()");
}

TORCH_LIBRARY_IMPL(retro_kernels_cpu, CPU, m) {
  m.impl("chunked_cross_attention_fwd", &retro_kernels::cpu::cca_forward);
  m.impl("chunked_cross_attention_bwd", &retro_kernels::cpu::cca_backward);
  m.impl("gemm_for_tests", &retro_kernels::cpu::gemm_for_tests);
}
