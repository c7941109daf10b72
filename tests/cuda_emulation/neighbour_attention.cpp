// csrc/cuda/neighbour_attention.cu compiled for the CPU emulation (tests only).
#include "cuda_emulation.h"

#include "neighbour_attention.cu"  // csrc/cuda, on the include path
