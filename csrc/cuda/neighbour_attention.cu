// The neighbour-encoder attention ops in CUDA: neighbour_self_attention and
// neighbour_cross_attention, fused forward and backward kernels with their launchers.
//
// Both ops are dense attention over "tiles" (score blocks):
//   self-attention   tile (b, l, kk): the R tokens of neighbour kk of chunk l attend to
//                    the same R tokens; padding tokens (mask False) are masked keys and
//                    their query rows output zeros.
//   cross-attention  tile (b, l): the K*R tokens of the K neighbours of chunk l attend
//                    to the M tokens of chunk l (read once per tile, for all K neighbours).
// One kernel pair serves both; only the address arithmetic differs (`self_attention`).
//
// Forward: one block per (tile x query head, BLOCK_M rows), online softmax over key
// tiles of BLOCK_N, fp32 output accumulator in shared memory (as in
// chunked_cross_attention.cu). Saves lse (B, Hq, L*K*R), natural log; +inf for rows
// with no key and for padding rows.
// Backward: one block per (tile, kv head): it owns the tile's dk, dv rows and the dq
// rows of the kv head's query heads; two sweeps (keys outside, then queries outside);
// no atomics, deterministic. Inputs are read through their strides.
#include "attention_tiles.cuh"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

namespace retro_kernels::cuda {
namespace {

struct NParams {
  const void* q; const void* k; const void* v; const uint8_t* mask;
  const void* dout; const float* lse_in; const float* delta;  // backward only
  void* out; float* lse;                                       // forward outputs
  void* dq; void* dk; void* dv;                                // backward outputs (contiguous)
  int64_t sq[6], sdo[6];  // q, dout (B, L, K, R, Hq, D)
  int64_t sk[6], sv[6];   // self: (B, L, K, R, Hkv, D); cross: (B, L, M, Hkv, D) in slots 0..4
  int64_t skd, svd;       // head-dim stride of k and v
  int64_t sm[4];          // mask: self (B, L, K, R); cross (B, L, M)
  int B, L, K, R, M, Hq, Hkv, group, D, d_pad, rows, keys, tiles, m_blocks;
  bool self_attention;
  float scale, qk_scale;  // qk_scale = scale * log2(e)
};

// tile -> (b, l, kk); cross-attention tiles have kk = 0 and span all K neighbours
__device__ __forceinline__ void tile_coords(const NParams& p, int tile, int& b, int& l, int& kk) {
  if (p.self_attention) {
    kk = tile % p.K; l = (tile / p.K) % p.L; b = tile / (p.K * p.L);
  } else {
    kk = 0; l = tile % p.L; b = tile / p.L;
  }
}

// Query row i of the tile, head h, in a (B, L, K, R, H, D) tensor with strides s.
__device__ __forceinline__ int64_t query_offset(const NParams& p, const int64_t* s, int b, int l, int kk,
                                                int i, int h) {
  const int kq = p.self_attention ? kk : i / p.R;
  const int r = p.self_attention ? i : i % p.R;
  return b * s[0] + l * s[1] + kq * s[2] + r * s[3] + h * s[4];
}

__device__ __forceinline__ int64_t key_offset(const NParams& p, const int64_t* s, int b, int l, int kk, int j,
                                              int hk) {
  return p.self_attention ? b * s[0] + l * s[1] + kk * s[2] + j * s[3] + hk * s[4]
                          : b * s[0] + l * s[1] + j * s[2] + hk * s[3];
}

__device__ __forceinline__ bool key_is_real(const NParams& p, int b, int l, int kk, int j) {
  if (j >= p.keys) return false;
  if (p.mask == nullptr) return true;
  const int64_t off = p.self_attention ? b * p.sm[0] + l * p.sm[1] + kk * p.sm[2] + j * p.sm[3]
                                       : b * p.sm[0] + l * p.sm[1] + j * p.sm[2];
  return p.mask[off] != 0;
}

// Self-attention: a padding token's own query row outputs zeros.
__device__ __forceinline__ bool row_is_padding(const NParams& p, int b, int l, int kk, int i) {
  return p.self_attention && p.mask != nullptr &&
         p.mask[b * p.sm[0] + l * p.sm[1] + kk * p.sm[2] + i * p.sm[3]] == 0;
}

// Index of the tile's first query token in the contiguous (B, L*K*R) token order of
// out, dq and (per head) lse.
__device__ __forceinline__ int64_t first_token(const NParams& p, int b, int l, int kk) {
  return ((static_cast<int64_t>(b) * p.L + l) * p.K + kk) * p.R;
}

template <typename T>
__device__ void load_query_rows(T* tile, int ld, const void* src, const int64_t* s, const NParams& p, int b,
                                int l, int kk, int h, int row_start, int rows) {
  const T* base = static_cast<const T*>(src);
  for (int idx = threadIdx.x; idx < rows * p.d_pad; idx += NUM_THREADS) {
    const int i = idx / p.d_pad, d = idx % p.d_pad;
    const int row = row_start + i;
    const bool real = row < p.rows && d < p.D;
    tile[i * ld + d] = real ? base[query_offset(p, s, b, l, kk, row, h) + d * s[5]] : from_f<T>(0.0f);
  }
}

template <typename T, int BLOCK_N>
__device__ void load_key_rows(T* k_tile, T* v_tile, float* bias, int ld, const NParams& p, int b, int l,
                              int kk, int hk, int key_start) {
  const T* kb = static_cast<const T*>(p.k);
  const T* vb = static_cast<const T*>(p.v);
  for (int idx = threadIdx.x; idx < BLOCK_N * p.d_pad; idx += NUM_THREADS) {
    const int jj = idx / p.d_pad, d = idx % p.d_pad;
    const int j = key_start + jj;
    const bool real = j < p.keys && d < p.D;
    k_tile[jj * ld + d] = real ? kb[key_offset(p, p.sk, b, l, kk, j, hk) + d * p.skd] : from_f<T>(0.0f);
    v_tile[jj * ld + d] = real ? vb[key_offset(p, p.sv, b, l, kk, j, hk) + d * p.svd] : from_f<T>(0.0f);
  }
  for (int jj = threadIdx.x; jj < BLOCK_N; jj += NUM_THREADS) {
    bias[jj] = key_is_real(p, b, l, kk, key_start + jj) ? 0.0f : -INFINITY;
  }
}

// -----------------------------------------------------------------------------------------
// Forward
// -----------------------------------------------------------------------------------------

template <typename T, int BLOCK_M, int BLOCK_N>
__global__ void __launch_bounds__(NUM_THREADS) neighbour_fwd_kernel(const NParams p) {
  constexpr int ROWS_PER_WARP = BLOCK_M / NUM_WARPS;
  static_assert(!use_wmma<T>() || ROWS_PER_WARP == 16, "tensor-core tiles need 16 rows per warp");
  extern __shared__ __align__(128) unsigned char smem[];
  const FwdLayout<T, BLOCK_M, BLOCK_N> lay(p.d_pad);
  T* q_s = reinterpret_cast<T*>(smem + lay.q);
  T* k_s = reinterpret_cast<T*>(smem + lay.k);
  T* v_s = reinterpret_cast<T*>(smem + lay.v);
  float* s_s = reinterpret_cast<float*>(smem + lay.s);
  T* p_s = reinterpret_cast<T*>(smem + lay.pr);
  float* o_s = reinterpret_cast<float*>(smem + lay.o);
  float* bias_s = reinterpret_cast<float*>(smem + lay.bias);
  float* m_s = reinterpret_cast<float*>(smem + lay.m);
  float* l_s = reinterpret_cast<float*>(smem + lay.l);
  const int ldt = p.d_pad + SKEW_T, lds = BLOCK_N + SKEW_F, ldp = BLOCK_N + SKEW_T, ldo = p.d_pad + SKEW_F;

  // -- which tile, which head, which rows -----------------------------------------------
  const int tile = blockIdx.x / p.Hq, h = blockIdx.x % p.Hq, hk = h / p.group;
  const int row_start = blockIdx.y * BLOCK_M;
  int b, l, kk;
  tile_coords(p, tile, b, l, kk);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r0 = warp * ROWS_PER_WARP;

  load_query_rows(q_s, ldt, p.q, p.sq, p, b, l, kk, h, row_start, BLOCK_M);
  for (int idx = threadIdx.x; idx < BLOCK_M * ldo; idx += NUM_THREADS) o_s[idx] = 0.0f;
  for (int i = threadIdx.x; i < BLOCK_M; i += NUM_THREADS) { m_s[i] = -INFINITY; l_s[i] = 0.0f; }
  __syncthreads();

  // -- online softmax over the tile's keys, BLOCK_N at a time ------------------------------
  for (int key_start = 0; key_start < p.keys; key_start += BLOCK_N) {
    __syncthreads();  // the previous key tile is no longer read
    load_key_rows<T, BLOCK_N>(k_s, v_s, bias_s, ldt, p, b, l, kk, hk, key_start);
    __syncthreads();
    warp_mm_abt(s_s + r0 * lds, lds, q_s + r0 * ldt, ldt, k_s, ldt, ROWS_PER_WARP, BLOCK_N, p.d_pad, false);
    __syncwarp();
    for (int i = r0; i < r0 + ROWS_PER_WARP; ++i) {
      float row_max = -INFINITY;
      for (int j = lane; j < BLOCK_N; j += 32) {
        const float s = s_s[i * lds + j] * p.qk_scale + bias_s[j];
        s_s[i * lds + j] = s;
        row_max = fmaxf(row_max, s);
      }
      row_max = warp_max(row_max);
      // rows that have seen no real key yet keep max -inf, and subtract 0 to avoid NaN
      const float m_old = m_s[i];
      const float m_new = fmaxf(m_old, row_max);
      const float m_sub = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = exp2f(m_old - m_sub);
      float row_sum = 0.0f;
      for (int j = lane; j < BLOCK_N; j += 32) {
        const float pr = exp2f(s_s[i * lds + j] - m_sub);
        p_s[i * ldp + j] = from_f<T>(pr);
        row_sum += pr;
      }
      row_sum = warp_sum(row_sum);
      for (int d = lane; d < p.d_pad; d += 32) o_s[i * ldo + d] *= alpha;
      __syncwarp();
      if (lane == 0) {
        l_s[i] = l_s[i] * alpha + row_sum;
        m_s[i] = m_new;
      }
    }
    __syncwarp();
    warp_mm_ab(o_s + r0 * ldo, ldo, p_s + r0 * ldp, ldp, v_s, ldt, ROWS_PER_WARP, p.d_pad, BLOCK_N);
  }
  __syncwarp();

  // -- normalise and store; padding rows and rows with no key: zeros, lse = +inf -----------
  T* out = static_cast<T*>(p.out);
  const int64_t t0 = first_token(p, b, l, kk);
  const int64_t tokens = static_cast<int64_t>(p.L) * p.K * p.R;
  for (int i = r0; i < r0 + ROWS_PER_WARP; ++i) {
    const int row = row_start + i;
    if (row >= p.rows) continue;
    const float sum = l_s[i];
    const bool has_key = sum > 0.0f && !row_is_padding(p, b, l, kk, row);
    const float inv = has_key ? 1.0f / sum : 0.0f;
    const int64_t t = t0 + row;
    T* out_row = out + (t * p.Hq + h) * p.D;
    for (int d = lane; d < p.D; d += 32) out_row[d] = from_f<T>(o_s[i * ldo + d] * inv);
    if (lane == 0) {
      p.lse[(static_cast<int64_t>(b) * p.Hq + h) * tokens + (t - b * tokens)] =
          has_key ? (m_s[i] + log2f(sum)) * LN2 : INFINITY;
    }
  }
}

// -----------------------------------------------------------------------------------------
// Backward
// -----------------------------------------------------------------------------------------

// Query rows of a tile with their lse (log2 units; +inf past the tile) and delta.
template <typename T>
__device__ void load_row_tiles(const NParams& p, int b, int l, int kk, int h, int row_start, T* q_s, T* do_s,
                               float* lse_s, float* delta_s, int ldt, int rows) {
  load_query_rows(q_s, ldt, p.q, p.sq, p, b, l, kk, h, row_start, rows);
  load_query_rows(do_s, ldt, p.dout, p.sdo, p, b, l, kk, h, row_start, rows);
  const int64_t tokens = static_cast<int64_t>(p.L) * p.K * p.R;
  const int64_t t0 = first_token(p, b, l, kk) - b * tokens;
  for (int i = threadIdx.x; i < rows; i += NUM_THREADS) {
    const int row = row_start + i;
    const bool real = row < p.rows;
    const int64_t stat = (static_cast<int64_t>(b) * p.Hq + h) * tokens + t0 + row;
    lse_s[i] = real ? p.lse_in[stat] * LOG2E : INFINITY;
    delta_s[i] = real ? p.delta[stat] : 0.0f;
  }
}

template <typename T, int BLOCK_M, int BLOCK_N>
__global__ void __launch_bounds__(NUM_THREADS) neighbour_bwd_kernel(const NParams p) {
  constexpr int ROWS_PER_WARP = BLOCK_M / NUM_WARPS;
  static_assert(!use_wmma<T>() || ROWS_PER_WARP == 16, "tensor-core tiles need 16 rows per warp");
  extern __shared__ __align__(128) unsigned char smem[];
  const BwdLayout<T, BLOCK_M, BLOCK_N> lay(p.d_pad);
  T* k_s = reinterpret_cast<T*>(smem + lay.k);
  T* v_s = reinterpret_cast<T*>(smem + lay.v);
  T* q_s = reinterpret_cast<T*>(smem + lay.q);
  T* do_s = reinterpret_cast<T*>(smem + lay.dO);
  float* s_s = reinterpret_cast<float*>(smem + lay.s);
  float* dp_s = reinterpret_cast<float*>(smem + lay.dp);
  T* p_s = reinterpret_cast<T*>(smem + lay.pr);
  T* ds_s = reinterpret_cast<T*>(smem + lay.ds);
  float* acc_s = reinterpret_cast<float*>(smem + lay.acc);
  float* bias_s = reinterpret_cast<float*>(smem + lay.bias);
  float* lse_s = reinterpret_cast<float*>(smem + lay.lse);
  float* delta_s = reinterpret_cast<float*>(smem + lay.delta);
  const int ldt = p.d_pad + SKEW_T, ldf = p.d_pad + SKEW_F, ldp = BLOCK_N + SKEW_T;

  const int tile = blockIdx.x / p.Hkv, hk = blockIdx.x % p.Hkv;
  int b, l, kk;
  tile_coords(p, tile, b, l, kk);
  const int r0 = (threadIdx.x / 32) * ROWS_PER_WARP;
  const int64_t kv_row = static_cast<int64_t>(p.Hkv) * p.D;  // dk, dv are contiguous
  // first key row of the tile in dk/dv: self (B, L, K, R, ...), cross (B, L, M, ...)
  const int64_t key0 = p.self_attention ? first_token(p, b, l, kk)
                                        : (static_cast<int64_t>(b) * p.L + l) * p.M;

  // -- sweep 1: for each key tile, dV = P^T dO and dK = dS^T Q * scale --------------------
  float* dk_s = acc_s;
  float* dv_s = acc_s + BLOCK_N * ldf;
  for (int key_start = 0; key_start < p.keys; key_start += BLOCK_N) {
    __syncthreads();
    load_key_rows<T, BLOCK_N>(k_s, v_s, bias_s, ldt, p, b, l, kk, hk, key_start);
    for (int idx = threadIdx.x; idx < 2 * BLOCK_N * ldf; idx += NUM_THREADS) acc_s[idx] = 0.0f;
    for (int g = 0; g < p.group; ++g) {
      const int h = hk * p.group + g;
      for (int row_start = 0; row_start < p.rows; row_start += BLOCK_M) {
        __syncthreads();
        load_row_tiles(p, b, l, kk, h, row_start, q_s, do_s, lse_s, delta_s, ldt, BLOCK_M);
        __syncthreads();
        recompute_ds<T, BLOCK_N>(p, r0, ROWS_PER_WARP, q_s, do_s, k_s, v_s, bias_s, lse_s, delta_s,
                                 s_s, dp_s, p_s, ds_s, ldt);
        __syncthreads();
        block_mm_atb(dv_s, ldf, p_s, ldp, do_s, ldt, BLOCK_N, p.d_pad, BLOCK_M);
        block_mm_atb(dk_s, ldf, ds_s, ldp, q_s, ldt, BLOCK_N, p.d_pad, BLOCK_M);
      }
    }
    __syncthreads();
    T* dk = static_cast<T*>(p.dk) + key0 * kv_row + hk * p.D;
    T* dv = static_cast<T*>(p.dv) + key0 * kv_row + hk * p.D;
    for (int idx = threadIdx.x; idx < BLOCK_N * p.D; idx += NUM_THREADS) {
      const int jj = idx / p.D, d = idx % p.D;
      const int j = key_start + jj;
      if (j >= p.keys) continue;
      dk[j * kv_row + d] = from_f<T>(dk_s[jj * ldf + d] * p.scale);
      dv[j * kv_row + d] = from_f<T>(dv_s[jj * ldf + d]);
    }
  }

  // -- sweep 2: for each query tile, dQ = dS K * scale -------------------------------------
  float* dq_s = acc_s;
  T* dq = static_cast<T*>(p.dq);
  const int64_t t0 = first_token(p, b, l, kk);
  for (int g = 0; g < p.group; ++g) {
    const int h = hk * p.group + g;
    for (int row_start = 0; row_start < p.rows; row_start += BLOCK_M) {
      __syncthreads();
      load_row_tiles(p, b, l, kk, h, row_start, q_s, do_s, lse_s, delta_s, ldt, BLOCK_M);
      for (int idx = threadIdx.x; idx < BLOCK_M * ldf; idx += NUM_THREADS) dq_s[idx] = 0.0f;
      for (int key_start = 0; key_start < p.keys; key_start += BLOCK_N) {
        __syncthreads();
        load_key_rows<T, BLOCK_N>(k_s, v_s, bias_s, ldt, p, b, l, kk, hk, key_start);
        __syncthreads();
        recompute_ds<T, BLOCK_N>(p, r0, ROWS_PER_WARP, q_s, do_s, k_s, v_s, bias_s, lse_s, delta_s,
                                 s_s, dp_s, nullptr, ds_s, ldt);
        __syncwarp();
        warp_mm_ab(dq_s + r0 * ldf, ldf, ds_s + r0 * ldp, ldp, k_s, ldt, ROWS_PER_WARP, p.d_pad, BLOCK_N);
      }
      __syncthreads();
      for (int idx = threadIdx.x; idx < BLOCK_M * p.D; idx += NUM_THREADS) {
        const int i = idx / p.D, d = idx % p.D;
        const int row = row_start + i;
        if (row >= p.rows) continue;
        dq[((t0 + row) * p.Hq + h) * p.D + d] = from_f<T>(dq_s[i * ldf + d] * p.scale);
      }
    }
  }
}

// -----------------------------------------------------------------------------------------
// Launchers
// -----------------------------------------------------------------------------------------

void check_inputs(const char* op, bool self_attention, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device(), op,
              " CUDA: q, k, v must be on one CUDA device");
  TORCH_CHECK(q.dim() == 6 && k.dim() == (self_attention ? 6 : 5) && v.sizes() == k.sizes(), op,
              ": q must be (B, L, K, R, Hq, D), k and v ",
              self_attention ? "(B, L, K, R, Hkv, D)" : "(B, L, M, Hkv, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v must share one dtype");
  const int kv_head_dim = self_attention ? 4 : 3;
  const int64_t hkv = k.size(kv_head_dim);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(-1) == q.size(5) && hkv > 0 &&
                  q.size(4) % hkv == 0, op, ": k must match q's (B, L) and head dim, and Hq % Hkv == 0");
  if (self_attention) {
    TORCH_CHECK(k.size(2) == q.size(2) && k.size(3) == q.size(3), op, ": k must match q's (K, R)");
  }
  TORCH_CHECK(q.size(5) <= MAX_HEAD_DIM, op, " CUDA: head dim must be <= ", MAX_HEAD_DIM);
  if (mask.has_value() && mask->defined()) {
    const int64_t want = self_attention ? 4 : 3;
    bool ok = mask->scalar_type() == at::kBool && mask->device() == q.device() && mask->dim() == want;
    for (int d = 0; ok && d < want; ++d) ok = mask->size(d) == k.size(d);
    TORCH_CHECK(ok, op, ": the mask must be a bool ", self_attention ? "(B, L, K, R)" : "(B, L, M)",
                " tensor on q's device");
  }
}

NParams make_params(bool self_attention, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const c10::optional<at::Tensor>& mask, double scale) {
  NParams p{};
  p.self_attention = self_attention;
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  for (int d = 0; d < 6; ++d) p.sq[d] = q.stride(d);
  for (int d = 0; d < k.dim(); ++d) { p.sk[d] = k.stride(d); p.sv[d] = v.stride(d); }
  p.skd = k.stride(-1); p.svd = v.stride(-1);
  if (mask.has_value() && mask->defined()) {
    p.mask = static_cast<const uint8_t*>(mask->data_ptr());
    for (int d = 0; d < mask->dim(); ++d) p.sm[d] = mask->stride(d);
  }
  p.B = q.size(0); p.L = q.size(1); p.K = q.size(2); p.R = q.size(3); p.Hq = q.size(4); p.D = q.size(5);
  p.Hkv = self_attention ? k.size(4) : k.size(3);
  p.M = self_attention ? p.R : k.size(2);
  p.group = p.Hq / p.Hkv;
  p.d_pad = (p.D + 15) / 16 * 16;
  p.rows = self_attention ? p.R : p.K * p.R;
  p.keys = self_attention ? p.R : p.M;
  p.tiles = self_attention ? p.B * p.L * p.K : p.B * p.L;
  p.scale = static_cast<float>(scale);
  p.qk_scale = static_cast<float>(scale) * LOG2E;
  return p;
}

template <typename T>
void forward_launch(NParams& p) {
  using Bl = Blocks<T>;
  p.m_blocks = (p.rows + Bl::FWD_M - 1) / Bl::FWD_M;
  const dim3 grid(p.tiles * p.Hq, p.m_blocks);
  const FwdLayout<T, Bl::FWD_M, Bl::FWD_N> lay(p.d_pad);
  launch(neighbour_fwd_kernel<T, Bl::FWD_M, Bl::FWD_N>, grid, lay.bytes, p);
}

template <typename T>
void backward_launch(const NParams& p) {
  using Bl = Blocks<T>;
  const dim3 grid(p.tiles * p.Hkv, 1);
  const BwdLayout<T, Bl::BWD_M, Bl::BWD_N> lay(p.d_pad);
  launch(neighbour_bwd_kernel<T, Bl::BWD_M, Bl::BWD_N>, grid, lay.bytes, p);
}

std::tuple<at::Tensor, at::Tensor> forward(bool self_attention, const char* op, const at::Tensor& q,
                                           const at::Tensor& k, const at::Tensor& v,
                                           const c10::optional<at::Tensor>& mask, double scale) {
  check_inputs(op, self_attention, q, k, v, mask);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(4), q.size(1) * q.size(2) * q.size(3)},
                             q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  if (k.numel() == 0) {  // no key: zeros, lse = +inf
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  NParams p = make_params(self_attention, q, k, v, mask, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  switch (q.scalar_type()) {
    case at::kFloat: forward_launch<float>(p); break;
    case at::kHalf: forward_launch<__half>(p); break;
    case at::kBFloat16: forward_launch<__nv_bfloat16>(p); break;
    default: TORCH_CHECK(false, op, " CUDA: dtype must be float32, float16 or bfloat16");
  }
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
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0 || k.numel() == 0) {  // nothing flows
    dq.zero_(); dk.zero_(); dv.zero_();
    return {dq, dk, dv};
  }
  // rowsum(dO * O) of every query row, laid out like lse: (B, Hq, L*K*R)
  const int64_t B = q.size(0), Hq = q.size(4), tokens = q.size(1) * q.size(2) * q.size(3);
  const at::Tensor delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1).reshape({B, tokens, Hq})
                               .transpose(1, 2).contiguous();
  const at::Tensor lse = lse_in.contiguous();
  NParams p = make_params(self_attention, q, k, v, mask, scale);
  p.dout = dout.data_ptr();
  for (int d = 0; d < 6; ++d) p.sdo[d] = dout.stride(d);
  p.lse_in = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
  switch (q.scalar_type()) {
    case at::kFloat: backward_launch<float>(p); break;
    case at::kHalf: backward_launch<__half>(p); break;
    case at::kBFloat16: backward_launch<__nv_bfloat16>(p); break;
    default: TORCH_CHECK(false, op, " CUDA: dtype must be float32, float16 or bfloat16");
  }
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

TORCH_LIBRARY_FRAGMENT(retro_kernels_cuda, m) {
  m.def("neighbour_self_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? neighbour_mask, "
        "float scale) -> (Tensor, Tensor)");
  m.def("neighbour_self_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, "
        "Tensor? neighbour_mask, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("neighbour_cross_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? chunk_mask, "
        "float scale) -> (Tensor, Tensor)");
  m.def("neighbour_cross_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, "
        "Tensor? chunk_mask, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(retro_kernels_cuda, CUDA, m) {
  m.impl("neighbour_self_attention_fwd", &retro_kernels::cuda::self_forward);
  m.impl("neighbour_self_attention_bwd", &retro_kernels::cuda::self_backward);
  m.impl("neighbour_cross_attention_fwd", &retro_kernels::cuda::cross_forward);
  m.impl("neighbour_cross_attention_bwd", &retro_kernels::cuda::cross_backward);
}
