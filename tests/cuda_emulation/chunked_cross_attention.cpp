// csrc/cuda/chunked_cross_attention.cu compiled for the CPU emulation (tests only).
#include "cuda_emulation.h"

#include "chunked_cross_attention.cu"  // csrc/cuda, on the include path
