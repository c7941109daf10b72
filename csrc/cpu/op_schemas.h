// The schemas of the native ops, written once for both libraries (retro_kernels_cpu and
// retro_kernels_cuda, which includes this header from here): each op's <op>_fwd and
// <op>_bwd, arguments in the order of the fused-backend contract (retro_kernels/ops/spec.py).
#pragma once

#include <torch/library.h>

namespace retro_kernels {

inline void define_chunked_cross_attention_ops(torch::Library& m) {
  m.def("chunked_cross_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? neighbour_mask, "
        "int chunk_size, float scale, int start_pos) -> (Tensor, Tensor)");
  m.def("chunked_cross_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, "
        "Tensor? neighbour_mask, Tensor out, Tensor lse, int chunk_size, float scale, "
        "int start_pos) -> (Tensor, Tensor, Tensor)");
}

inline void define_neighbour_attention_ops(torch::Library& m) {
  m.def("neighbour_self_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? neighbour_mask, "
        "float scale) -> (Tensor, Tensor)");
  m.def("neighbour_self_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, "
        "Tensor? neighbour_mask, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("neighbour_cross_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? chunk_mask, "
        "float scale) -> (Tensor, Tensor)");
  m.def("neighbour_cross_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, "
        "Tensor? chunk_mask, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
}

}  // namespace retro_kernels
