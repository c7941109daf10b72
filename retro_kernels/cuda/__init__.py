"""Python side of the CUDA kernels in csrc/cuda (built into retro_kernels._C_cuda)."""
