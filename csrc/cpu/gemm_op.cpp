// retro_kernels_cpu::gemm_choices: what gemm() runs and has chosen (gemm.h), for
// retro_kernels/cpu/gemm.py, which writes the record.
#include "gemm.h"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(retro_kernels_cpu, m) {
  m.def("gemm_choices() -> (int, str, int[], str, float[], float)", &retro_kernels::cpu::gemm_choices);
}
