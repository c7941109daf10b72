// The PTX primitives of attention_tiles.cuh, emulated on the CPU (see cuda_emulation.h).
// Included by attention_tiles.cuh inside its namespace, in place of the inline PTX.

// The kernels' `extern __shared__` buffer (a block-scope extern declaration in this
// namespace names this array); run_grid poisons it before every CTA.
alignas(16) unsigned char smem[emulation::SMEM_BYTES];

inline void cp_async_16(void* dst, const void* src, bool valid) { emulation::queue_copy(dst, src, valid); }
inline void cp_async_commit() { emulation::commit(); }
template <int N>
inline void cp_async_wait() {
  emulation::wait(N);
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) { emulation::ldmatrix(r, row_address, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) {
  emulation::ldmatrix(r, row_address, true);
}

template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
inline void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emulation::mma_16816(c, a, b0, b1, [](uint16_t x) { return __half2float(__ushort_as_half(x)); });
}
template <>
inline void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emulation::mma_16816(c, a, b0, b1, [](uint16_t x) { return __bfloat162float(__ushort_as_bfloat16(x)); });
}
