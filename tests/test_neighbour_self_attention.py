"""neighbour_self_attention: what is particular to it; every backend against the reference runs in op_harness.

Its cases and mask kinds (padding at the end of a neighbour, whole neighbours of
padding), zero padding rows, and the reference against SDPA on each neighbour.
"""
import hypothesis.strategies as st
import torch
import torch.nn.functional as F

from retro_kernels.ops import neighbour_self_attention as op_module
from retro_kernels.reference.neighbour_self_attention import neighbour_self_attention as reference

from op_harness import Case, OpTests


def nsa(B, L, K, R, Hq, Hkv, D, mask=None, **kw) -> Case:
    return Case(dict(B=B, L=L, K=K, R=R, Hq=Hq, Hkv=Hkv, D=D), mask, **kw)


def real_first(shape, device):
    """Real tokens first, then padding: a random length (at least 1) per neighbour."""
    lengths = torch.randint(1, shape[-1] + 1, shape[:-1], device=device)
    return torch.arange(shape[-1], device=device) < lengths[..., None]


def some_all_padding(shape, device):
    """real_first, with the first and the last neighbour entirely padding."""
    mask = real_first(shape, device)
    mask[0, 0, 0] = False
    mask[-1, -1, -1] = False
    return mask


NATIVE = ("cpu", "cuda")  # cases chosen for the C++ and CUDA kernels' tiles
# nsa(B, L, K, R, Hq, Hkv, D, mask)
CASES = {
    "R_not_pow2": nsa(1, 2, 2, 5, 2, 2, 16, "real_first"),
    "mqa-K4-D40": nsa(1, 1, 4, 3, 4, 1, 40, "random"),
    "gqa-K1-D64-padded": nsa(2, 1, 1, 17, 2, 1, 64, "some_all_padding"),
    "gqa-4-2": nsa(1, 1, 2, 5, 4, 2, 16, "real_first"),
    "R70-several_tiles": nsa(1, 1, 2, 70, 2, 1, 16, "real_first"),
    "no_mask-D24": nsa(1, 2, 1, 6, 3, 3, 24),
    "D128": nsa(1, 1, 2, 20, 2, 1, 128, "real_first"),
    "D256": nsa(1, 1, 1, 18, 2, 2, 256, "random"),
    "gqa-D32": nsa(1, 2, 2, 7, 4, 2, 32, "random", backends=NATIVE),
    "R70-D80-padded": nsa(2, 1, 3, 70, 3, 1, 80, "first", backends=NATIVE),
    "no_mask-D128": nsa(1, 2, 1, 5, 2, 2, 128, backends=NATIVE),
    **{"x".join(map(str, s)): nsa(*s, "some_all_padding", gpu=True)
       for s in [(2, 4, 2, 128, 8, 8, 64), (1, 4, 2, 128, 8, 2, 128), (1, 2, 3, 100, 4, 1, 80), (1, 2, 1, 33, 2, 1, 256)]},
    "paper-gqa": nsa(2, 4, 2, 128, 8, 2, 64, "random", gpu=True),
}


class TestNeighbourSelfAttention(OpTests):
    OP = op_module.OP
    CASES = CASES
    MASKS = {"real_first": real_first, "some_all_padding": some_all_padding}
    AWKWARD = {
        "R not a power of two": lambda c: c["R"] & (c["R"] - 1) != 0,
        "more than 64 tokens per neighbour (several tiles)": lambda c: c["R"] > 64,
        "a neighbour that is all padding": lambda c: c.mask == "some_all_padding",
    }
    SMALL = nsa(1, 1, 2, 3, 2, 1, 16, "real_first")
    DETERMINISM = (nsa(1, 1, 2, 20, 4, 1, 16, "real_first"),
                   nsa(2, 2, 3, 6, 4, 2, 32, "random", backends=NATIVE))

    def random_cases(self):
        def case(B, L, K, R, Hkv, group, D, mask):
            return nsa(B, L, K, R, Hkv * group, Hkv, D, mask)
        return st.builds(case, B=st.integers(1, 2), L=st.integers(1, 2), K=st.sampled_from([1, 2, 4]),
                         R=st.integers(1, 20), Hkv=st.integers(1, 2), group=st.integers(1, 3),
                         D=st.sampled_from([16, 24, 40]),
                         mask=st.sampled_from([None, "real_first", "some_all_padding", "random"]))

    def check_particulars(self, mask, out, dq):
        if mask is not None:  # padding rows output zeros and get zero gradients
            assert (out[~mask] == 0).all()
            assert (dq[~mask] == 0).all()


TESTS = TestNeighbourSelfAttention()


def test_reference_matches_sdpa_per_neighbour():
    """The reference against an independent oracle: SDPA on each neighbour separately."""
    B, L, K, R, Hq, Hkv, D = 2, 2, 2, 6, 4, 2, 16
    q, k, v, m = TESTS.inputs(nsa(B, L, K, R, Hq, Hkv, D, "some_all_padding"), device="cpu")
    out = reference(q, k, v, m)
    for b in range(B):
        for l in range(L):
            for kk in range(K):
                keys = m[b, l, kk]
                if not keys.any():
                    assert (out[b, l, kk] == 0).all()
                    continue
                qi = q[b, l, kk].transpose(0, 1)  # (Hq, R, D)
                ki = k[b, l, kk].repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)
                vi = v[b, l, kk].repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)
                expect = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=keys[None, None, :])
                expect = expect.transpose(0, 1) * keys[:, None, None]
                torch.testing.assert_close(out[b, l, kk], expect, atol=1e-5, rtol=1e-5)


# The Triton kernels' ahead-of-time compiles for sm_80/sm_90: tests/test_triton_kernels.py.
