// Block shapes and shared-memory layouts of the CUDA attention kernels (attention_tiles.cuh).
//
// Plain C++ (no CUDA, no torch), so that the launchers, the kernels and the resource report
// (bench/cuda_resources.py compiles a tiny host program against this header) read the same
// numbers.
#pragma once

#include <cstddef>

namespace retro_kernels::cuda {

constexpr int NUM_WARPS = 4;
constexpr int NUM_THREADS = NUM_WARPS * 32;
constexpr int WARP_ROWS = 16;      // rows of one mma.m16n8k16 tile: a warp owns 16 rows of a block tile
constexpr int MAX_HEAD_DIM = 128;  // head dims are padded to 32, 64 or 128 (HEAD_DIM_PADS)
constexpr int VEC = 8;             // 16-bit elements per 16-byte vector (cp.async, ld/st.v4)
constexpr int SMEM_PAD = VEC;      // padding of each shared-memory row (see Tile)

// The three kernels ("passes") of one attention op.
enum class Pass { Forward = 0, BackwardDq = 1, BackwardDkDv = 2 };
constexpr const char* pass_name(Pass pass) {
  return pass == Pass::Forward ? "fwd" : pass == Pass::BackwardDq ? "bwd_dq" : "bwd_dkdv";
}

// Rows of the query tile (BLOCK_M) and key tile (BLOCK_N) that one program works on.
//   Forward, BackwardDq: a program owns BLOCK_M query rows and loops over key tiles of BLOCK_N.
//   BackwardDkDv:        a program owns BLOCK_N keys and loops over query tiles of BLOCK_M.
// The owning side has one 16-row mma tile per warp: NUM_WARPS * WARP_ROWS rows.
template <Pass PASS> struct Blocks;
template <> struct Blocks<Pass::Forward> { static constexpr int M = 64, N = 64; };
template <> struct Blocks<Pass::BackwardDq> { static constexpr int M = 64, N = 32; };
template <> struct Blocks<Pass::BackwardDkDv> { static constexpr int M = 32, N = 64; };
static_assert(Blocks<Pass::Forward>::M == NUM_WARPS * WARP_ROWS, "one 16-row mma tile per warp");
static_assert(Blocks<Pass::BackwardDq>::M == NUM_WARPS * WARP_ROWS, "one 16-row mma tile per warp");
static_assert(Blocks<Pass::BackwardDkDv>::N == NUM_WARPS * WARP_ROWS, "one 16-row mma tile per warp");

// A shared-memory tile of ROWS rows of a D_PAD-wide 16-bit operand. Each row is padded by
// 16 bytes: consecutive rows then start 4 banks apart, so the 8 row addresses of one
// ldmatrix phase hit 8 different groups of 4 banks (no bank conflicts), and every row start
// stays 16-byte aligned for cp.async.
template <int ROWS, int D_PAD>
struct Tile {
  static constexpr int LD = D_PAD + SMEM_PAD;                   // row pitch, elements
  static constexpr size_t BYTES = sizeof(short) * ROWS * LD;   // 16-bit elements
  static_assert((LD * sizeof(short)) % 16 == 0, "rows must stay 16-byte aligned");
};

// Byte offsets of the regions of one program's dynamic shared memory (all 16-byte aligned).
// "x2" regions are double-buffered: the cp.async loads of the next tile fill one stage while
// the current tile is read from the other.
template <Pass PASS, int D_PAD> struct SmemLayout;

// Forward: Q tile (later the output staging tile), K and V tiles x2, key bias x2.
template <int D_PAD>
struct SmemLayout<Pass::Forward, D_PAD> {
  using B = Blocks<Pass::Forward>;
  using Q = Tile<B::M, D_PAD>;
  using K = Tile<B::N, D_PAD>;
  static constexpr size_t q = 0;
  static constexpr size_t k = q + Q::BYTES;           // [2]
  static constexpr size_t v = k + 2 * K::BYTES;       // [2]
  static constexpr size_t bias = v + 2 * K::BYTES;    // [2][B::N] fp32
  static constexpr size_t bytes = bias + 2 * sizeof(float) * B::N;
};

// Backward dq: Q, dO and O tiles (O later the dq staging tile), K and V tiles x2, key bias x2.
template <int D_PAD>
struct SmemLayout<Pass::BackwardDq, D_PAD> {
  using B = Blocks<Pass::BackwardDq>;
  using Q = Tile<B::M, D_PAD>;
  using K = Tile<B::N, D_PAD>;
  static constexpr size_t q = 0;
  static constexpr size_t dout = q + Q::BYTES;
  static constexpr size_t out = dout + Q::BYTES;
  static constexpr size_t k = out + Q::BYTES;         // [2]
  static constexpr size_t v = k + 2 * K::BYTES;       // [2]
  static constexpr size_t bias = v + 2 * K::BYTES;    // [2][B::N] fp32
  static constexpr size_t bytes = bias + 2 * sizeof(float) * B::N;
};

// Backward dk, dv: K and V tiles (later the dk, dv staging tiles), Q and dO tiles x2, the
// query rows' lse (log2 units) and delta x2.
template <int D_PAD>
struct SmemLayout<Pass::BackwardDkDv, D_PAD> {
  using B = Blocks<Pass::BackwardDkDv>;
  using Q = Tile<B::M, D_PAD>;
  using K = Tile<B::N, D_PAD>;
  static constexpr size_t k = 0;
  static constexpr size_t v = k + K::BYTES;
  static constexpr size_t q = v + K::BYTES;           // [2]
  static constexpr size_t dout = q + 2 * Q::BYTES;    // [2]
  static constexpr size_t lse = dout + 2 * Q::BYTES;  // [2][B::M] fp32
  static constexpr size_t delta = lse + 2 * sizeof(float) * B::M;  // [2][B::M] fp32
  static constexpr size_t bytes = delta + 2 * sizeof(float) * B::M;
};

// The occupancy each kernel is compiled for (__launch_bounds__ min blocks): ptxas must fit
// its registers in 65536 / (CTAS * NUM_THREADS) per thread (255 at 2 CTAs). Without it,
// ptxas picked 96 registers and spilled for the dq kernel at D_PAD = 32. The shared memory
// of SmemLayout allows at least this many CTAs on an H100/H200 (228 KB per SM); the resource
// report (bench/cuda_resources.py) checks both.
constexpr int min_ctas_per_sm(Pass pass, int d_pad) {
  if (d_pad <= 32) return 4;
  if (d_pad <= 64) return pass == Pass::Forward ? 2 : 3;
  return 2;
}

// The head-dim paddings that are compiled (the kernels unroll over D_PAD / 16 mma steps).
constexpr int HEAD_DIM_PADS[] = {32, 64, 128};
constexpr int head_dim_pad(int head_dim) { return head_dim <= 32 ? 32 : head_dim <= 64 ? 64 : 128; }

}  // namespace retro_kernels::cuda
