"""Triton kernels, one file per op (kernel and launcher side by side)."""
