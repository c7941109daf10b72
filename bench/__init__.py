"""retro_kernels' benchmark suite: python -m bench --help. See docs/benchmarks.md."""
