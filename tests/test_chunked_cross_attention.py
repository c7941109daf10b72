"""chunked_cross_attention: what is particular to it; every backend against the reference runs in op_harness.

Its cases (N % m != 0, N < m, start_pos, m = 1, extra chunks, hidden chunks ...),
its mask kinds, decoding token by token, and the reference against the rule of docs/spec.md#the-shift.
"""
import math

import hypothesis.strategies as st
import torch

from retro_kernels.ops import chunked_cross_attention as op_module
from retro_kernels.reference.chunked_cross_attention import chunked_cross_attention as reference

from op_harness import Case, OpTests


def cca(B, N, m, K, R, Hq, Hkv, D, start_pos=0, mask=None, extra_chunks=0, **kw) -> Case:
    """A case of N tokens from start_pos with chunk size m: L = (start_pos + N) // m + extra_chunks."""
    L = (start_pos + N) // m + extra_chunks
    return Case(dict(B=B, N=N, Hq=Hq, Hkv=Hkv, D=D, L=L, K=K, R=R), mask,
                dict(chunk_size=m, start_pos=start_pos), **kw)


def hide_chunk_hidden(shape, device):
    """Random; every key of chunk 0 hidden, and in the last batch only one key of chunk 1 real."""
    mask = torch.rand(shape, device=device) > 0.3
    mask[:, 0] = False
    if shape[1] > 1:
        mask[-1, 1] = False
        mask[-1, 1, -1, -1] = True
    return mask


NATIVE = ("cpu", "cuda")  # cases chosen for the C++ and CUDA kernels' tiles
# cca(B, N, m, K, R, Hq, Hkv, D, start_pos, mask, extra_chunks)
CASES = {
    "N_multiple_of_m": cca(1, 16, 4, 2, 3, 2, 2, 32),
    "N_not_multiple": cca(2, 19, 4, 2, 5, 4, 2, 32, 0, "random"),
    "N_less_than_m": cca(1, 6, 4, 1, 3, 2, 1, 16, 0, None, 1),
    "N_less_than_m_minus_1": cca(1, 2, 4, 1, 3, 2, 2, 16, 0, None, 1),
    "start_pos": cca(1, 11, 4, 2, 4, 2, 2, 32, 7, "random"),
    "K4_R_not_pow2": cca(1, 13, 4, 4, 7, 2, 1, 32, 0, "random"),
    "K1": cca(1, 12, 4, 1, 6, 2, 2, 16),
    "D64": cca(1, 9, 4, 2, 3, 2, 2, 64),
    "D80": cca(1, 10, 4, 2, 3, 2, 1, 80, 0, "random"),
    "D128": cca(1, 9, 4, 2, 3, 1, 1, 128),
    "m1": cca(1, 7, 1, 2, 3, 2, 2, 16, 0, "random"),
    "m64": cca(1, 70, 64, 1, 3, 2, 1, 32, 0, "random"),
    "gqa": cca(1, 12, 4, 2, 3, 4, 2, 32),
    "mqa": cca(1, 12, 4, 2, 3, 4, 1, 32, 0, "random"),
    "chunk_fully_masked": cca(2, 14, 4, 2, 3, 2, 2, 32, 0, "first"),
    "everything_masked": cca(1, 10, 4, 2, 3, 2, 2, 16, 0, "all"),
    "extra_chunks_ignored": cca(1, 9, 4, 2, 3, 2, 2, 16, 0, "random", 3),
    "N%m!=0-gqa-D32": cca(2, 37, 8, 2, 5, 4, 2, 32, 0, "random", 1, backends=NATIVE),
    "N<m": cca(1, 5, 8, 1, 3, 2, 2, 64, 0, None, 1, backends=NATIVE),
    "N<m-start_pos-mqa": cca(1, 6, 8, 2, 3, 2, 1, 64, 9, "random", 1, backends=NATIVE),
    "start_pos-K4-D80-masked-chunk": cca(2, 23, 4, 4, 7, 6, 3, 80, 5, "chunk_hidden", 1, backends=NATIVE),
    "m1-mqa": cca(1, 9, 1, 2, 3, 4, 1, 32, 0, "random", 1, backends=NATIVE),
    "m1-start_pos-D128": cca(1, 9, 1, 1, 6, 2, 2, 128, 2, None, 1, backends=NATIVE),
    "m64-N150": cca(1, 150, 64, 2, 10, 2, 1, 64, 0, "random", 1, backends=NATIVE),
    "m64-start_pos-masked-chunk": cca(1, 70, 64, 1, 9, 2, 2, 80, 61, "chunk_hidden", 1, backends=NATIVE),
    # paper shapes (the cuda kernels refuse D = 256 by name; "auto" runs it)
    **{f"paper-D{D}": cca(2, 2048 - 5, 64, 2, 128, 16, 4, D, 0, "random", gpu=True) for D in (64, 80, 128, 256)},
    "paper-1024": cca(2, 1024, 64, 2, 128, 8, 2, 64, 0, "random", 1, gpu=True),
    "D128-K4-R100": cca(1, 200, 64, 4, 100, 4, 4, 128, 17, "chunk_hidden", 1, gpu=True),
}


class TestChunkedCrossAttention(OpTests):
    OP = op_module.OP
    CASES = CASES
    MASKS = {"chunk_hidden": hide_chunk_hidden}
    AWKWARD = {
        "N % m != 0": lambda c: c["N"] % c.scalars["chunk_size"] != 0,
        "N < m": lambda c: c["N"] < c.scalars["chunk_size"],
        "N < m - 1 (no token reads a chunk)": lambda c: c["N"] < c.scalars["chunk_size"] - 1,
        "start_pos > 0": lambda c: c.scalars["start_pos"] > 0,
        "m = 1": lambda c: c.scalars["chunk_size"] == 1,
        "more chunks than the tokens read": lambda c: c["L"] > (c.scalars["start_pos"] + c["N"]) // c.scalars["chunk_size"],
        "a chunk whose every key is masked": lambda c: c.mask in ("first", "all"),
        "K*R not a power of two": lambda c: (c["K"] * c["R"]) & (c["K"] * c["R"] - 1) != 0,
    }
    SMALL = cca(1, 9, 4, 2, 3, 2, 1, 16, 0, "random")
    DETERMINISM = (cca(2, 19, 4, 2, 5, 4, 2, 32, 0, "random"),
                   cca(2, 70, 8, 2, 12, 4, 2, 64, 0, "random", 1, backends=NATIVE))
    RANDOM_EXAMPLES = 5
    BAD = {"too_few_chunks": (lambda a: a.update(k=a["k"][:, :1], v=a["v"][:, :1], neighbour_mask=None),
                              ValueError, "need L >= 2")}

    def random_cases(self):
        def case(B, N, m, K, R, group, Hkv, D, start_pos, mask):
            return cca(B, N, m, K, R, group * Hkv, Hkv, D, start_pos, mask, 1)
        return st.builds(case, B=st.integers(1, 2), N=st.integers(1, 12), m=st.integers(2, 6), K=st.integers(1, 3),
                         R=st.integers(1, 5), group=st.sampled_from([1, 2]), Hkv=st.integers(1, 2),
                         D=st.sampled_from([16, 24, 48]), start_pos=st.integers(0, 6),
                         mask=st.sampled_from([None, "random", "first"]))

    def test_token_by_token_decoding_equals_full_sequence(self, exact_backend):
        m, N = 4, 13
        q, k, v, mask = self.inputs(cca(2, N, m, 2, 3, 4, 2, 16, 0, "random", 1), device=self.device(exact_backend))
        full = self.call(q, k, v, mask, dict(chunk_size=m), exact_backend)
        steps = [self.call(q[:, t:t + 1], k, v, mask, dict(chunk_size=m, start_pos=t), exact_backend)
                 for t in range(N)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-6, rtol=1e-6)

    def test_zero_rows_and_no_nan(self, exact_backend):
        """The first m-1 tokens and fully masked rows are exactly zero, with finite gradients."""
        m = 4
        q, k, v, mask = self.inputs(cca(1, 12, m, 2, 3, 2, 2, 16, 0, "first"), device=self.device(exact_backend))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = self.call(q, k, v, mask, dict(chunk_size=m), exact_backend)
        assert out[:, : m - 1].abs().max() == 0  # no complete chunk yet
        assert out[:, m - 1 : 2 * m - 1].abs().max() == 0  # chunk 0's neighbours are all masked
        out.sum().backward()
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all()
        assert q.grad[:, : 2 * m - 1].abs().max() == 0


TESTS = TestChunkedCrossAttention()


def make_inputs(B, N, m, K, R, Hq, Hkv, D, start_pos=0, mask=None, dtype=torch.float32, device="cpu",
                extra_chunks=1):
    """q, k, v, neighbour_mask of cca(...) (for the CUDA kernels' own tests, tests/test_cuda_*.py)."""
    return TESTS.inputs(cca(B, N, m, K, R, Hq, Hkv, D, start_pos, mask, extra_chunks), dtype, device)


def check_against_reference(backend, q, k, v, m, neighbour_mask=None, start_pos=0):
    return TESTS.check_against_reference(backend, q, k, v, neighbour_mask, dict(chunk_size=m, start_pos=start_pos))


def test_reference_follows_the_design_rule():
    """Token t: zeros if t < m-1, else softmax over the K*R keys of chunk (t-(m-1))//m."""
    B, N, Hq, Hkv, D, m, K, R, s = 1, 11, 4, 2, 8, 3, 2, 4, 2
    q, k, v, mask = make_inputs(B, N, m, K, R, Hq, Hkv, D, s, "first", device="cpu", extra_chunks=0)
    out = reference(q, k, v, m, neighbour_mask=mask, start_pos=s)
    for n in range(N):
        t = s + n
        for h in range(Hq):
            if t < m - 1:
                assert out[0, n, h].abs().max() == 0
                continue
            u = (t - (m - 1)) // m
            keys = k[0, u, :, :, h // (Hq // Hkv)].reshape(K * R, D)
            vals = v[0, u, :, :, h // (Hq // Hkv)].reshape(K * R, D)
            real = mask[0, u].reshape(K * R)
            if not real.any():
                assert out[0, n, h].abs().max() == 0
                continue
            scores = (keys[real] @ q[0, n, h]) / math.sqrt(D)
            want = torch.softmax(scores, 0) @ vals[real]
            torch.testing.assert_close(out[0, n, h], want, atol=1e-6, rtol=1e-5)


# The Triton kernels' ahead-of-time compiles for sm_80/sm_90: tests/test_triton_kernels.py.
