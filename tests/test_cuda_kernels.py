"""The CUDA kernels (csrc/cuda) on a real GPU: what the CPU emulation (test_cuda_emulated.py)
cannot show. All tests are marked gpu (skipped without one); with a GPU but no built
extension they fail once, here, with the build hint.

- a grid of more than 65,535 (batch x head) programs: batched decoding at B=4096, H=16;
- tensors on a device other than the current one, and a non-default current stream;
- bitwise-reproducible gradients at a paper-like shape.
"""
from __future__ import annotations

import pytest
import torch

import retro_kernels as rk
from retro_kernels import _native
from retro_kernels.reference.chunked_cross_attention import chunked_cross_attention as reference
from tests import test_chunked_cross_attention as native_cca
from tests.tolerances import assert_close_to_reference

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _built():
    missing = _native.missing_reason("cuda")
    if missing:
        pytest.fail(f"a GPU is here but the CUDA extension is not usable: {missing}")


def test_big_grid_batched_decoding():
    """B * Hq = 65,536 programs (the old kernels' grid y limit was 65,535)."""
    B, Hq, Hkv, D, m, K, R, start_pos = 4096, 16, 4, 64, 4, 2, 8, 7  # token 7 reads chunk 1
    q = torch.randn(B, 1, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, 2, K, R, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = torch.rand(B, 2, K, R, device="cuda") > 0.2
    native_cca.check_against_reference("cuda", q, k, v, m, mask, start_pos)


def _run(q, k, v, m, mask, dout):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = rk.chunked_cross_attention(*leaves, m, neighbour_mask=mask, backend="cuda")
    return [out.detach()] + [g.detach() for g in torch.autograd.grad(out, leaves, dout)]


def test_paper_shape_gradients_are_bitwise_reproducible():
    q, k, v, mask = native_cca.make_inputs(2, 2048, 64, 2, 128, 16, 4, 128, 0, "random", torch.bfloat16, "cuda")
    dout = torch.randn_like(q)
    first, second = _run(q, k, v, 64, mask, dout), _run(q, k, v, 64, mask, dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_current_stream_is_used():
    q, k, v, mask = native_cca.make_inputs(2, 70, 8, 2, 12, 4, 2, 64, 0, "random", torch.float16, "cuda")
    dout = torch.randn_like(q)
    want = _run(q, k, v, 8, mask, dout)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = _run(q, k, v, 8, mask, dout)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_device():
    q, k, v, mask = native_cca.make_inputs(1, 37, 8, 2, 5, 4, 2, 32, 0, "random", torch.float16, "cuda:1")
    with torch.cuda.device(0):
        out = rk.chunked_cross_attention(q, k, v, 8, neighbour_mask=mask, backend="cuda")
    assert out.device == q.device
    want = reference(q.float(), k.float(), v.float(), 8, neighbour_mask=mask)
    want_lp = reference(q, k, v, 8, neighbour_mask=mask)
    assert_close_to_reference("out", out, want, want_lp)
