"""The C++ CPU kernels on inputs that are easy to get wrong:

- a huge softmax scale: the backward must be right wherever the forward is (a naive
  backward gives dv 5e11 instead of 3 at scale 1e8, NaN at 1e30);
- non-finite values at masked positions: a masked token takes no part, whatever it
  holds (NaN or inf in a masked k, v, or, for the self-attention, q and dout);
- start_pos near 2^63: positions past 2^63 - 1 must not overflow into garbage rows.
"""
from __future__ import annotations

import pytest
import torch

from retro_kernels import _native
from retro_kernels.ops.chunked_cross_attention import chunked_cross_attention
from retro_kernels.ops.neighbour_cross_attention import neighbour_cross_attention
from retro_kernels.ops.neighbour_self_attention import neighbour_self_attention
from retro_kernels.reference.chunked_cross_attention import chunked_cross_attention as cca_reference
from retro_kernels.reference.neighbour_cross_attention import neighbour_cross_attention as nca_reference
from retro_kernels.reference.neighbour_self_attention import neighbour_self_attention as nsa_reference

CPU_MISSING = _native.missing_reason("cpu")
pytestmark = pytest.mark.skipif(CPU_MISSING is not None, reason=str(CPU_MISSING))


def with_grads(fn, tensors, dout_seed=1, **kw):
    """fn(*leaves, **kw) and the gradients of <out, dout> for every leaf, dout random."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(dout_seed)).to(out.dtype)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


# ---------------------------------------------------------------------------
# Huge scales
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1e4, 1e8, 1e30])
def test_cca_backward_is_right_for_huge_scales(scale):
    """Where the forward is right, so is the backward: compared with the reference in
    float64. Two keys per neighbour are copies of each other, so some rows split their
    weight evenly between two keys however large the scale (not one-hot). Before the
    fix dv was 127 instead of 2 at scale 1e8, NaN at 1e30."""
    g = torch.Generator().manual_seed(0)
    B, N, m, K, R, H, D = 1, 24, 4, 2, 5, 2, 8
    q = torch.randn(B, N, H, D, generator=g)
    k = torch.randn(B, N // m, K, R, H, D, generator=g)
    k[:, :, 1, 0] = k[:, :, 0, 0]  # ties
    v = torch.randn(B, N // m, K, R, H, D, generator=g)
    got = with_grads(chunked_cross_attention, (q, k, v), chunk_size=m, scale=scale, backend="cpu")
    want = with_grads(cca_reference, (q.double(), k.double(), v.double()), chunk_size=m, scale=scale)
    assert_close_at_scale(got, want, scale)


def assert_close_at_scale(got, want, scale):
    """out and dv are sums of probabilities times v and dout: right to fp32 precision.
    dq and dk are scale times products of the score gradient dS: its fp32 rounding
    (eps * |dP|) comes out times the scale, so their error is relative to the larger
    of the two (a dq whose true value is ~0 gets fp32 noise of that size)."""
    names = ("out", "dq", "dk", "dv")
    qk_size = max(want[1].abs().max().item(), want[2].abs().max().item())
    for name, x, y in zip(names, got, want):
        assert torch.isfinite(x).all(), f"{name} is not finite at scale {scale}"
        size = qk_size if name in ("dq", "dk") else y.abs().max().item()
        err = (x.double() - y).abs().max().item()
        assert err <= 1e-5 * size + 1e-6, f"{name} at scale {scale}: error {err:.3g}, size {size:.3g}"


@pytest.mark.parametrize("op", ["self", "cross"])
def test_neighbour_backward_is_right_for_a_huge_scale(op):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 2, 6, 2, 8, generator=g)
    kv_shape = (1, 2, 2, 6, 2, 8) if op == "self" else (1, 2, 5, 2, 8)
    k, v = torch.randn(kv_shape, generator=g), torch.randn(kv_shape, generator=g)
    fn, reference = (neighbour_self_attention, nsa_reference) if op == "self" else \
        (neighbour_cross_attention, nca_reference)
    got = with_grads(fn, (q, k, v), scale=1e8, backend="cpu")
    want = with_grads(reference, (q.double(), k.double(), v.double()), scale=1e8)
    assert_close_at_scale(got, want, 1e8)


# ---------------------------------------------------------------------------
# Masked tokens hold garbage
# ---------------------------------------------------------------------------

def poison(t: torch.Tensor, real: torch.Tensor, value: float) -> torch.Tensor:
    """t with `value` wherever `real` (broadcast over t's trailing dims) is False."""
    real = real.reshape(*real.shape, *([1] * (t.dim() - real.dim())))
    return torch.where(real, t, torch.full_like(t, value))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_cca_masked_keys_take_no_part(value):
    g = torch.Generator().manual_seed(3)
    B, N, m, K, R, H, D = 2, 20, 4, 2, 6, 2, 16
    q = torch.randn(B, N, H, D, generator=g)
    k = torch.randn(B, N // m + 1, K, R, H, D, generator=g)
    v = torch.randn(B, N // m + 1, K, R, H, D, generator=g)
    mask = torch.rand(B, N // m + 1, K, R, generator=g) > 0.4
    mask[0, 1] = False  # a chunk with no real key
    clean = with_grads(chunked_cross_attention, (q, poison(k, mask, 0.0), poison(v, mask, 0.0)),
                       chunk_size=m, neighbour_mask=mask, backend="cpu")
    dirty = with_grads(chunked_cross_attention, (q, poison(k, mask, value), poison(v, mask, value)),
                       chunk_size=m, neighbour_mask=mask, backend="cpu")
    for name, a, b in zip(("out", "dq", "dk", "dv"), clean, dirty):
        assert torch.equal(a, b), f"{name}: a masked {value} took part"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_neighbour_self_attention_padding_takes_no_part(value):
    """A padding token is neither a key nor a query: whatever its q, k, v and dout hold,
    the real tokens' results are the same bits, and the padding rows get zeros."""
    g = torch.Generator().manual_seed(4)
    B, L, K, R, Hq, Hkv, D = 1, 2, 3, 7, 4, 2, 16
    q = torch.randn(B, L, K, R, Hq, D, generator=g)
    k, v = torch.randn(B, L, K, R, Hkv, D, generator=g), torch.randn(B, L, K, R, Hkv, D, generator=g)
    mask = torch.rand(B, L, K, R, generator=g) > 0.3
    mask[0, 1, 2] = False  # an empty neighbour
    runs = []
    for fill in (0.0, value):
        leaves = [poison(t, mask, fill).requires_grad_() for t in (q, k, v)]
        out = neighbour_self_attention(*leaves, neighbour_mask=mask, backend="cpu")
        dout = poison(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)), mask, fill)
        runs.append([out.detach(), *torch.autograd.grad(out, leaves, dout)])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *runs):
        assert torch.equal(a, b), f"{name}: a masked {value} took part"
        assert torch.equal(poison(b, mask, 0.0), b), f"{name}: padding rows are not zero"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_neighbour_cross_attention_masked_chunk_tokens_take_no_part(value):
    g = torch.Generator().manual_seed(6)
    B, L, K, R, M, Hq, Hkv, D = 1, 3, 2, 5, 9, 4, 1, 16
    q = torch.randn(B, L, K, R, Hq, D, generator=g)
    k, v = torch.randn(B, L, M, Hkv, D, generator=g), torch.randn(B, L, M, Hkv, D, generator=g)
    mask = torch.rand(B, L, M, generator=g) > 0.3
    mask[0, 2] = False  # a chunk with no real token
    clean = with_grads(neighbour_cross_attention, (q, poison(k, mask, 0.0), poison(v, mask, 0.0)),
                       chunk_mask=mask, backend="cpu")
    dirty = with_grads(neighbour_cross_attention, (q, poison(k, mask, value), poison(v, mask, value)),
                       chunk_mask=mask, backend="cpu")
    for name, a, b in zip(("out", "dq", "dk", "dv"), clean, dirty):
        assert torch.equal(a, b), f"{name}: a masked {value} took part"
        assert torch.isfinite(b).all(), name


# ---------------------------------------------------------------------------
# start_pos near 2^63
# ---------------------------------------------------------------------------

def cca_by_hand(q, k, v, m, start_pos):
    """The rule of docs/spec.md#the-shift, token by token in float64 with Python integers."""
    B, N, H, D = q.shape
    out = torch.zeros(B, N, H, D, dtype=torch.float64)
    for i in range(N):
        t = start_pos + i
        if t < m - 1:
            continue
        u = (t - (m - 1)) // m
        keys = k[:, u].reshape(B, -1, H, D).double()
        vals = v[:, u].reshape(B, -1, H, D).double()
        s = torch.einsum("bhd,bjhd->bhj", q[:, i].double(), keys) * D ** -0.5
        out[:, i] = torch.einsum("bhj,bjhd->bhd", s.softmax(-1), vals)
    return out


@pytest.mark.parametrize("m, start_pos, N", [
    (2**62, 2**63 - 1, 2),          # the last token sits at position 2^63
    (2**62, 2**63 - 2, 4),          # tokens up to 2^63 + 1
    (2**62 + 7, 2**63 - 3, 5),      # a chunk size that does not divide 2^63
    (5 * 10**18, 5 * 10**18 + 10, 3),
])
def test_cca_positions_near_2_to_the_63(m, start_pos, N):
    g = torch.Generator().manual_seed(7)
    L = (start_pos + N) // m
    q = torch.randn(1, N, 2, 8, generator=g)
    k, v = torch.randn(1, L, 2, 3, 2, 8, generator=g), torch.randn(1, L, 2, 3, 2, 8, generator=g)
    out = chunked_cross_attention(q, k, v, m, start_pos=start_pos, backend="cpu")
    torch.testing.assert_close(out.double(), cca_by_hand(q, k, v, m, start_pos), atol=1e-5, rtol=1e-5)
    # and the backward sends every gradient where the forward read
    got = with_grads(chunked_cross_attention, (q, k, v), chunk_size=m, start_pos=start_pos, backend="cpu")
    want = with_grads(lambda a, b, c: cca_by_hand(a, b, c, m, start_pos), (q.double(), k.double(), v.double()))
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(x.double(), y, atol=1e-5, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------
# Mask layouts: one run of real tokens (read in place) or holes (packed)
# ---------------------------------------------------------------------------

def layout_mask(shape, layout, gen):
    """Bool mask (..., n): "suffix" real tokens then padding (RETRO's neighbours),
    "prefix" padding then real tokens, "holes" random, "mixed" a row of each."""
    *lead, n = shape
    rows = torch.tensor(lead).prod().item() if lead else 1
    pos = torch.arange(n).expand(rows, n)
    cut = torch.randint(1, n + 1, (rows, 1), generator=gen)
    kinds = {"suffix": pos < cut, "prefix": pos >= n - cut, "holes": torch.rand(rows, n, generator=gen) > 0.4}
    if layout == "mixed":
        pick = torch.arange(rows)[:, None] % 3
        m = torch.where(pick == 0, kinds["suffix"], torch.where(pick == 1, kinds["prefix"], kinds["holes"]))
    else:
        m = kinds[layout]
    return m.reshape(shape)


def reference_grads(ref, tensors, dtype, **kw):
    """(fp32 reference, low-precision eager reference or None) outputs and gradients."""
    want32 = with_grads(ref, [t.float() for t in tensors], **kw)
    want_lp = with_grads(ref, tensors, **kw) if dtype != torch.float32 else [None] * 4
    return want32, want_lp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["suffix", "prefix", "holes", "mixed"])
@pytest.mark.parametrize("op", ["cca", "self", "cross"])
def test_mask_layouts_match_reference(op, layout, dtype):
    from tests.tolerances import assert_close_to_reference

    g = torch.Generator().manual_seed(8)
    if op == "cca":
        B, N, m, K, R, Hq, Hkv, D = 2, 21, 4, 2, 7, 4, 2, 16
        L = N // m + 1
        tensors = [torch.randn(B, N, Hq, D, generator=g)] + [torch.randn(B, L, K, R, Hkv, D, generator=g)
                                                             for _ in range(2)]
        # one run across both neighbours too: the first full, the second a suffix
        mask = layout_mask((B, L, K, R), layout, g)
        mask[0, 2, 0] = True
        kw, fn, ref = dict(chunk_size=m, neighbour_mask=mask), chunked_cross_attention, cca_reference
    elif op == "self":
        B, L, K, R, Hq, Hkv, D = 1, 3, 2, 9, 4, 2, 16
        tensors = [torch.randn(B, L, K, R, H, D, generator=g) for H in (Hq, Hkv, Hkv)]
        kw = dict(neighbour_mask=layout_mask((B, L, K, R), layout, g))
        fn, ref = neighbour_self_attention, nsa_reference
    else:
        B, L, K, R, M, Hq, Hkv, D = 1, 3, 2, 5, 11, 4, 1, 16
        tensors = [torch.randn(B, L, K, R, Hq, D, generator=g)] + [torch.randn(B, L, M, Hkv, D, generator=g)
                                                                   for _ in range(2)]
        kw = dict(chunk_mask=layout_mask((B, L, M), layout, g))
        fn, ref = neighbour_cross_attention, nca_reference
    tensors = [t.to(dtype) for t in tensors]
    got = with_grads(fn, tensors, backend="cpu", **kw)
    want32, want_lp = reference_grads(ref, tensors, dtype, **kw)
    for name, x, w32, wlp in zip(("out", "dq", "dk", "dv"), got, want32, want_lp):
        assert x.dtype == dtype
        assert_close_to_reference(f"{op} {layout} {name}", x, w32, wlp, factor=2.0 if name == "out" else 3.0)
