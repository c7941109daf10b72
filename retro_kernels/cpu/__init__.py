"""Python side of the C++ CPU kernels in csrc/cpu (built into retro_kernels._C_cpu)."""
