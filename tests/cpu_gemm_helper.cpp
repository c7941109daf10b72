// For tests/test_native_cpu_gemm.py only: gemm() of csrc/cpu/gemm.h called directly, compiled
// with csrc/cpu/gemm*.cpp into the library retro_kernels_gemm_test (not the shipped one).
#include "gemm.h"

#include <torch/library.h>

namespace {

using retro_kernels::cpu::GemmKind;

// c <- alpha * op(a) op(b) + beta * c through gemm() (backend "auto") or one candidate
// ("avx2", "avx512", "blas", "aten"), on the tensors' own memory (any row strides, unit
// column strides).
void gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool trans_a, bool trans_b,
          double alpha, double beta, c10::string_view backend) {
  namespace cpu = retro_kernels::cpu;
  for (const at::Tensor* t : {&a, &b, &c})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 2 && t->stride(1) == 1,
                "a, b, c must be 2-d fp32 CPU tensors with unit column stride");
  const int64_t M = c.size(0), N = c.size(1), K = trans_a ? a.size(0) : a.size(1);
  TORCH_CHECK((trans_a ? a.size(1) : a.size(0)) == M && (trans_b ? b.size(1) : b.size(0)) == K &&
                  (trans_b ? b.size(0) : b.size(1)) == N, "shapes do not match");
  const float* A = a.const_data_ptr<float>();
  const float* B = b.const_data_ptr<float>();
  float* C = c.mutable_data_ptr<float>();
  if (backend == "auto") {
    cpu::check_gemm_config();
    return cpu::gemm(trans_a, trans_b, M, N, K, float(alpha), A, a.stride(0), B, b.stride(0), float(beta), C,
                     c.stride(0));
  }
  for (GemmKind kind : {GemmKind::avx2, GemmKind::avx512, GemmKind::blas, GemmKind::aten}) {
    if (backend != cpu::gemm_kind_name(kind)) continue;
    TORCH_CHECK(cpu::gemm_kind_available(kind), "backend ", backend, " cannot run on this CPU");
    return cpu::gemm_with(kind, trans_a, trans_b, M, N, K, float(alpha), A, a.stride(0), B, b.stride(0),
                          float(beta), C, c.stride(0));
  }
  TORCH_CHECK(false, "backend must be auto, avx2, avx512, blas or aten, got '", backend, "'");
}

}  // namespace

TORCH_LIBRARY(retro_kernels_gemm_test, m) {
  m.def("gemm(Tensor a, Tensor b, Tensor(a!) c, bool trans_a, bool trans_b, float alpha, float beta, "
        "str backend) -> ()");
}

TORCH_LIBRARY_IMPL(retro_kernels_gemm_test, CPU, m) { m.impl("gemm", &gemm); }
