"""neighbour_cross_attention: every fused backend against the reference, and the op's contract."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import retro_kernels
from retro_kernels import dispatch
from retro_kernels.ops import neighbour_cross_attention as op_module
from retro_kernels.reference.neighbour_cross_attention import neighbour_cross_attention as reference
from tolerances import assert_close_to_reference

OP = "neighbour_cross_attention"
# Every fused backend that exists in this checkout (csrc backends appear once built).
FUSED = dispatch.implemented_backends(OP)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B, L, K, R, M, Hq, Hkv, D, dtype=torch.float32, mask="partial", device=DEVICE):
    q = torch.randn(B, L, K, R, Hq, D, dtype=dtype, device=device)
    k = torch.randn(B, L, M, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(B, L, M, Hkv, D, dtype=dtype, device=device)
    if mask is None:
        m = None
    else:
        m = torch.ones(B, L, M, dtype=torch.bool, device=device)
        if mask == "partial":  # the last chunk holds only some of its M tokens
            m[:, -1, max(1, M // 2):] = False
        elif mask == "empty":  # a chunk with no real token at all
            m[:, -1] = False
        elif mask == "holes":
            m = torch.rand(B, L, M, device=device) > 0.4
    return q, k, v, m


def run(backend, q, k, v, mask, dout, scale=None):
    """Output and (dq, dk, dv) of the op on fresh leaves."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = retro_kernels.neighbour_cross_attention(q, k, v, chunk_mask=mask, scale=scale, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), grads


def skip_unless_supported(backend, q, k, v, mask):
    reasons = dispatch.not_supported_reasons(backend, OP, q=q, k=k, v=v, chunk_mask=mask)
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))


def check_against_reference(backend, q, k, v, mask, scale=None):
    skip_unless_supported(backend, q, k, v, mask)
    dout = torch.randn_like(q)
    out, grads = run(backend, q, k, v, mask, dout, scale)
    f32 = lambda t: t.float()  # noqa: E731
    ref32, ref32_grads = run("reference", f32(q), f32(k), f32(v), mask, f32(dout), scale)
    ref_lp, ref_lp_grads = (None, (None,) * 3)
    if q.dtype != torch.float32:
        ref_lp, ref_lp_grads = run("reference", q, k, v, mask, dout, scale)
    assert out.dtype == q.dtype
    assert_close_to_reference("out", out, ref32, ref_lp)
    for name, g, g32, glp in zip(("dq", "dk", "dv"), grads, ref32_grads, ref_lp_grads):
        assert g.dtype == q.dtype
        assert_close_to_reference(name, g, g32, glp, factor=3.0)
    if mask is not None:  # chunks with no real token: zero output, zero dq
        empty = ~mask.any(-1)
        assert (out[empty] == 0).all()
        assert (grads[0][empty] == 0).all()
    return out, grads


# (B, L, K, R, M, Hq, Hkv, D, mask)
SHAPES = [
    (1, 2, 2, 5, 4, 2, 2, 16, "partial"),  # R not a power of two, a partial last chunk
    (1, 2, 4, 3, 6, 4, 1, 40, "holes"),  # MQA, K = 4, D = 40
    (2, 2, 1, 9, 5, 2, 1, 64, "empty"),  # GQA, K = 1, a chunk with no token
    (1, 1, 2, 40, 70, 2, 1, 16, "partial"),  # several row tiles and key tiles
    (1, 2, 2, 6, 3, 3, 3, 24, None),  # no mask
    (1, 1, 2, 9, 20, 2, 1, 128, "partial"),  # large head dims: smaller tiles
    (1, 2, 1, 5, 18, 2, 2, 256, "holes"),
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:8])) + f"-{s[8]}")
def test_matches_reference(backend, dtype, shape):
    *dims, mask = shape
    check_against_reference(backend, *make_inputs(*dims, dtype=dtype, mask=mask))


@pytest.mark.parametrize("backend", FUSED)
def test_custom_scale(backend):
    check_against_reference(backend, *make_inputs(1, 1, 2, 4, 5, 2, 1, 16), scale=0.37)


@pytest.mark.parametrize("backend", FUSED)
def test_non_contiguous_inputs(backend):
    """Views straight from fused projections, a strided mask and a stride-0 dout."""
    B, L, K, R, M, Hq, Hkv, D = 1, 2, 2, 5, 6, 2, 1, 16
    q = torch.randn(B, L, K, R, Hq * D + 8, device=DEVICE)[..., : Hq * D].view(B, L, K, R, Hq, D)
    kv = torch.randn(B, L, M, 2 * Hkv * D, device=DEVICE)
    k = kv[..., : Hkv * D].view(B, L, M, Hkv, D)
    v = kv[..., Hkv * D :].view(B, L, M, Hkv, D)
    mask = (torch.rand(B, L, 2 * M, device=DEVICE) > 0.3)[..., ::2]
    assert not q.is_contiguous() and not k.is_contiguous() and not mask.is_contiguous()
    skip_unless_supported(backend, q, k, v, mask)
    dout = torch.ones(1, device=DEVICE).expand(q.shape)  # what out.sum().backward() sends
    out, grads = run(backend, q, k, v, mask, dout)
    ref, ref_grads = run("reference", q, k, v, mask, dout)
    assert_close_to_reference("out", out, ref)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close_to_reference(name, g, r)


def test_reference_matches_repeat_and_sdpa():
    """The reference against an independent oracle: repeat the chunk K times, then SDPA."""
    B, L, K, R, M, Hq, Hkv, D = 2, 3, 2, 5, 4, 4, 2, 16
    q, k, v, m = make_inputs(B, L, K, R, M, Hq, Hkv, D, mask="partial", device="cpu")
    out = reference(q, k, v, m)
    group = Hq // Hkv
    # (B, L, K, Hq, R, D) against (B, L, K, Hq, M, D): every neighbour gets its own copy
    qs = q.permute(0, 1, 2, 4, 3, 5)
    ks = k.repeat_interleave(group, dim=3).permute(0, 1, 3, 2, 4)[:, :, None].expand(B, L, K, Hq, M, D)
    vs = v.repeat_interleave(group, dim=3).permute(0, 1, 3, 2, 4)[:, :, None].expand(B, L, K, Hq, M, D)
    attn_mask = m[:, :, None, None, None, :]
    expect = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=attn_mask).permute(0, 1, 2, 4, 3, 5)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 2), L=st.integers(1, 3), K=st.sampled_from([1, 2, 4]), R=st.integers(1, 12),
    M=st.integers(1, 20), Hkv=st.integers(1, 2), group=st.integers(1, 3), D=st.sampled_from([16, 24, 40]),
    mask=st.sampled_from([None, "partial", "empty", "holes"]), seed=st.integers(0, 2**16),
)
def test_hypothesis_random_shapes(backend, B, L, K, R, M, Hkv, group, D, mask, seed):
    torch.manual_seed(seed)
    check_against_reference(backend, *make_inputs(B, L, K, R, M, Hkv * group, Hkv, D, mask=mask))


@pytest.mark.parametrize("backend", FUSED)
def test_backward_is_deterministic(backend):
    q, k, v, m = make_inputs(1, 2, 4, 10, 7, 4, 1, 16)
    skip_unless_supported(backend, q, k, v, m)
    dout = torch.randn_like(q)
    first = run(backend, q, k, v, m, dout)
    second = run(backend, q, k, v, m, dout)
    assert torch.equal(first[0], second[0])
    for g1, g2 in zip(first[1], second[1]):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    q, k, v, m = make_inputs(1, 2, 2, 3, 4, 2, 1, 16)
    skip_unless_supported(backend, q, k, v, m)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(op_module.OP.forward_op, (q, k, v, m, 0.25, backend))
    torch.library.opcheck(op_module.OP.forward_op, (q, k, v, None, 0.25, backend))
    # the backward op has no derivative of its own (no double backward): plain tensors
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = op_module.OP.forward_op(q, k, v, m, 0.25, backend)
    dout = torch.randn_like(out)
    torch.library.opcheck(op_module.OP.backward_op, (dout, q, k, v, m, out, lse, 0.25, backend))


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    q, k, v, m = make_inputs(1, 2, 2, 5, 4, 2, 1, 16)
    skip_unless_supported(backend, q, k, v, m)

    class Block(torch.nn.Module):
        def forward(self, q, k, v, m):
            out = retro_kernels.neighbour_cross_attention(q * 1.5, k, v, chunk_mask=m, backend=backend)
            return out.square().sum()

    block = Block()
    compiled = torch.compile(block, fullgraph=True)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    loss = compiled(*leaves, m)
    grads = torch.autograd.grad(loss, leaves)
    eager_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    eager = block(*eager_leaves, m)
    eager_grads = torch.autograd.grad(eager, eager_leaves)
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_auto_backend_and_explain():
    q, k, v, m = make_inputs(1, 1, 1, 3, 4, 2, 1, 16, device="cpu")
    out = retro_kernels.neighbour_cross_attention(q, k, v, chunk_mask=m)  # auto
    torch.testing.assert_close(out, reference(q, k, v, m))
    reasons = retro_kernels.explain(OP, q=q, k=k, v=v, chunk_mask=m)
    assert reasons["reference"] == []
    with pytest.raises(retro_kernels.BackendNotSupported):
        retro_kernels.neighbour_cross_attention(q, k, v, backend="cuda")  # CPU tensors


def _bad_inputs():
    q, k, v, m = make_inputs(1, 2, 2, 3, 4, 4, 2, 16, device="cpu")
    ok = dict(q=q, k=k, v=v, chunk_mask=m)
    k3 = torch.randn(1, 2, 4, 3, 16)  # 3 kv heads do not divide 4 query heads
    cases = [
        ("^q ", dict(q=q.numpy()), TypeError),
        ("^q ", dict(q=q[0]), ValueError),
        ("^q ", dict(q=q.to(torch.int32)), TypeError),
        ("^k ", dict(k=k.half()), TypeError),
        ("^k ", dict(k=k[None]), ValueError),  # the (B, L, K, R, Hkv, D) layout of self-attention
        ("^k ", dict(k=k[:, :1]), ValueError),
        ("^k ", dict(k=k[..., :8]), ValueError),
        ("^v ", dict(v=v[:, :, :2]), ValueError),
        ("number of query heads", dict(k=k3, v=k3), ValueError),
        ("^chunk_mask ", dict(chunk_mask=m.int()), TypeError),
        ("^chunk_mask ", dict(chunk_mask=m[..., :2]), ValueError),
        ("^chunk_mask ", dict(chunk_mask="all"), TypeError),
        ("^scale ", dict(scale=True), TypeError),
        ("^scale ", dict(scale=float("inf")), ValueError),
        ("^backend ", dict(backend=3), TypeError),
    ]
    return ok, cases


@pytest.mark.parametrize("case", range(len(_bad_inputs()[1])))
def test_bad_input(case):
    ok, cases = _bad_inputs()
    pattern, change, error = cases[case]
    args = {**ok, **change}
    with pytest.raises(error, match=pattern):
        retro_kernels.neighbour_cross_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


# -- GPU: bf16 and paper-sized shapes ---------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [(2, 4, 2, 128, 64, 8, 8, 64), (1, 4, 4, 128, 64, 8, 2, 128), (1, 3, 3, 100, 50, 4, 1, 80),
     (1, 2, 2, 33, 64, 2, 1, 256)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_gpu_large(backend, dtype, shape):
    check_against_reference(backend, *make_inputs(*shape, dtype=dtype, mask="partial", device="cuda"))


# The Triton kernels' ahead-of-time compiles for sm_80/sm_90: tests/test_triton_kernels.py.
