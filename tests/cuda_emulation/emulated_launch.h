// The launcher side of attention_tiles.cuh, emulated on the CPU (see cuda_emulation.h):
// included by attention_tiles.cuh inside its namespace, in place of the CUDA launch, device
// guard and op library name.

template <Pass PASS, typename T, int D_PAD, typename Problem>
void launch_pass(const typename Problem::Params& p, int64_t programs) {
  const auto kernel = pass_kernel<PASS, T, D_PAD, Problem>();
  emulation::run_grid(programs, SmemLayout<PASS, D_PAD>::bytes, smem, [&] { kernel(p); });
}
using DeviceGuard = emulation::DeviceGuard;
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
#define RETRO_KERNELS_CUDA_LIBRARY(m) TORCH_LIBRARY(retro_kernels_cuda_emulated, m)
#define RETRO_KERNELS_CUDA_LIBRARY_FRAGMENT(m) TORCH_LIBRARY_FRAGMENT(retro_kernels_cuda_emulated, m)
#define RETRO_KERNELS_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(retro_kernels_cuda_emulated, CPU, m)
