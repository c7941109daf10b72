"""neighbour_cross_attention: what is particular to it; every backend against the reference runs in op_harness.

Its cases and mask kinds (a partial last chunk, a chunk with no token), zero rows
for empty chunks, and the reference against repeating the chunk K times and SDPA.
"""
import hypothesis.strategies as st
import torch
import torch.nn.functional as F

from retro_kernels.ops import neighbour_cross_attention as op_module
from retro_kernels.reference.neighbour_cross_attention import neighbour_cross_attention as reference

from op_harness import Case, OpTests


def nca(B, L, K, R, M, Hq, Hkv, D, mask=None, **kw) -> Case:
    return Case(dict(B=B, L=L, K=K, R=R, M=M, Hq=Hq, Hkv=Hkv, D=D), mask, **kw)


def partial_last(shape, device):
    """The last chunk holds only some of its M tokens."""
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    mask[:, -1, max(1, shape[-1] // 2):] = False
    return mask


def empty_last(shape, device):
    """The last chunk has no real token at all."""
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    mask[:, -1] = False
    return mask


NATIVE = ("cpu", "cuda")  # cases chosen for the C++ and CUDA kernels' tiles
# nca(B, L, K, R, M, Hq, Hkv, D, mask)
CASES = {
    "R_not_pow2-partial": nca(1, 2, 2, 5, 4, 2, 2, 16, "partial_last"),
    "mqa-K4-D40": nca(1, 2, 4, 3, 6, 4, 1, 40, "random"),
    "gqa-K1-D64-empty": nca(2, 2, 1, 9, 5, 2, 1, 64, "empty_last"),
    "gqa-4-2": nca(1, 1, 2, 5, 6, 4, 2, 16, "partial_last"),
    "M70-several_tiles": nca(1, 1, 2, 40, 70, 2, 1, 16, "partial_last"),
    "no_mask-D24": nca(1, 2, 2, 6, 3, 3, 3, 24),
    "D128": nca(1, 1, 2, 9, 20, 2, 1, 128, "partial_last"),
    "D256": nca(1, 2, 1, 5, 18, 2, 2, 256, "random"),
    "gqa-D32": nca(1, 2, 2, 7, 5, 4, 2, 32, "random", backends=NATIVE),
    "R70-D80-empty": nca(2, 1, 3, 70, 9, 3, 1, 80, "first", backends=NATIVE),
    "no_mask-M66-D128": nca(1, 2, 1, 5, 66, 2, 2, 128, backends=NATIVE),
    **{"x".join(map(str, s)): nca(*s, "partial_last", gpu=True)
       for s in [(2, 4, 2, 128, 64, 8, 8, 64), (1, 4, 4, 128, 64, 8, 2, 128), (1, 3, 3, 100, 50, 4, 1, 80),
                 (1, 2, 2, 33, 64, 2, 1, 256)]},
    "paper-gqa": nca(2, 4, 2, 128, 64, 8, 2, 64, "random", gpu=True),
}


class TestNeighbourCrossAttention(OpTests):
    OP = op_module.OP
    CASES = CASES
    MASKS = {"partial_last": partial_last, "empty_last": empty_last}
    AWKWARD = {
        "R and M not powers of two": lambda c: c["R"] & (c["R"] - 1) != 0 and c["M"] & (c["M"] - 1) != 0,
        "more than 64 chunk tokens (several key tiles)": lambda c: c["M"] > 64,
        "a partial last chunk": lambda c: c.mask == "partial_last",
        "a chunk with no token": lambda c: c.mask == "empty_last",
    }
    SMALL = nca(1, 2, 2, 3, 4, 2, 1, 16, "partial_last")
    DETERMINISM = (nca(1, 2, 4, 10, 7, 4, 1, 16, "partial_last"),
                   nca(2, 2, 3, 6, 7, 4, 2, 32, "random", backends=NATIVE))

    def random_cases(self):
        def case(B, L, K, R, M, Hkv, group, D, mask):
            return nca(B, L, K, R, M, Hkv * group, Hkv, D, mask)
        return st.builds(case, B=st.integers(1, 2), L=st.integers(1, 3), K=st.sampled_from([1, 2, 4]),
                         R=st.integers(1, 12), M=st.integers(1, 20), Hkv=st.integers(1, 2), group=st.integers(1, 3),
                         D=st.sampled_from([16, 24, 40]),
                         mask=st.sampled_from([None, "partial_last", "empty_last", "random"]))

    def check_particulars(self, mask, out, dq):
        if mask is not None:  # chunks with no real token: zero output, zero dq
            empty = ~mask.any(-1)
            assert (out[empty] == 0).all()
            assert (dq[empty] == 0).all()


TESTS = TestNeighbourCrossAttention()


def test_reference_matches_repeat_and_sdpa():
    """The reference against an independent oracle: repeat the chunk K times, then SDPA."""
    B, L, K, R, M, Hq, Hkv, D = 2, 3, 2, 5, 4, 4, 2, 16
    q, k, v, m = TESTS.inputs(nca(B, L, K, R, M, Hq, Hkv, D, "partial_last"), device="cpu")
    out = reference(q, k, v, m)
    group = Hq // Hkv
    # (B, L, K, Hq, R, D) against (B, L, K, Hq, M, D): every neighbour gets its own copy
    qs = q.permute(0, 1, 2, 4, 3, 5)
    ks = k.repeat_interleave(group, dim=3).permute(0, 1, 3, 2, 4)[:, :, None].expand(B, L, K, Hq, M, D)
    vs = v.repeat_interleave(group, dim=3).permute(0, 1, 3, 2, 4)[:, :, None].expand(B, L, K, Hq, M, D)
    attn_mask = m[:, :, None, None, None, :]
    expect = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=attn_mask).permute(0, 1, 2, 4, 3, 5)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


# The Triton kernels' ahead-of-time compiles for sm_80/sm_90: tests/test_triton_kernels.py.
