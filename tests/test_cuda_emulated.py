"""The CUDA kernels (csrc/cuda) against the reference, run on the CPU by the emulation of
tests/cuda_emulation/: the real kernel and launcher source, with mma.sync, ldmatrix,
cp.async, shuffles and barriers emulated (a cp.async destination reads NaN until its
group is waited for; a barrier that not every thread reaches is reported).

The `cuda` backend is pointed at the emulated ops for CPU tensors, so the public ops,
their autograd and the backend's argument checks run exactly as on a GPU. Shapes are
small (the emulation takes milliseconds per CTA) but cover every path: several key and
row tiles, N % m != 0, N < m, start_pos, GQA/MQA, masks that hide a chunk or
everything, head dims 16..128 that are not powers of two, the scalar (unaligned) path.
What it cannot show: timing, races between warps that the barriers do not order, and the
hardware's own rounding inside mma.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import retro_kernels as rk
from retro_kernels import dispatch
from retro_kernels.backend import native_kernels
from retro_kernels.cuda import _support
from tests import cuda_emulation
from tests import test_chunked_cross_attention as native_cca
from tests import test_neighbour_cross_attention, test_neighbour_self_attention
from op_harness import Case

OPS, MISSING = cuda_emulation.load()


def test_emulation_is_built_in_ci():
    """CI has nvcc and a C++ compiler: the emulated kernels must build there, never skip."""
    if os.environ.get("CI", "").lower() != "true":
        pytest.skip("only enforced in CI (CI=true)")
    assert MISSING is None, MISSING


@pytest.fixture
def emulated_cuda(monkeypatch):
    """backend="cuda" runs the emulated kernels on CPU tensors."""
    if OPS is None:
        pytest.skip(MISSING)
    emulated = dataclasses.replace(_support.BACKEND, devices=("cpu",), missing=None,
                                   kernels=native_kernels(lambda: OPS))
    monkeypatch.setitem(dispatch.DECLARED, "cuda", emulated)
    return OPS


LOW_PRECISION = [torch.float16, torch.bfloat16]

# (B, N, m, K, R, Hq, Hkv, D, start_pos, mask)
CCA_CASES = [
    pytest.param(1, 11, 4, 2, 5, 4, 2, 32, 0, "random", id="N%m!=0-gqa"),
    pytest.param(1, 3, 8, 1, 3, 2, 1, 16, 0, None, id="N<m-1-only-zero-rows"),
    pytest.param(1, 6, 8, 2, 3, 3, 1, 64, 9, "random", id="N<m-start_pos-mqa3"),
    pytest.param(1, 9, 4, 2, 3, 2, 2, 80, 5, "chunk_hidden", id="D80-masked-chunk"),
    pytest.param(1, 70, 64, 2, 40, 2, 1, 24, 0, "random", id="m64-keys80-tiles"),
    pytest.param(1, 7, 1, 2, 3, 2, 2, 20, 0, "random", id="m1-D20-scalar-path"),
    pytest.param(1, 120, 100, 1, 9, 1, 1, 16, 0, None, id="m100-two-row-blocks"),
    pytest.param(1, 9, 4, 1, 4, 2, 1, 128, 2, "random", id="D128"),
    pytest.param(1, 7, 4, 3, 50, 2, 1, 32, 0, "random", id="keys150-three-key-tiles"),
]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("B, N, m, K, R, Hq, Hkv, D, start_pos, mask", CCA_CASES)
def test_cca_matches_reference(emulated_cuda, B, N, m, K, R, Hq, Hkv, D, start_pos, mask, dtype):
    q, k, v, neighbour_mask = native_cca.make_inputs(B, N, m, K, R, Hq, Hkv, D, start_pos, mask, dtype)
    native_cca.check_against_reference("cuda", q, k, v, m, neighbour_mask, start_pos)


def test_cca_everything_masked_gives_zeros(emulated_cuda):
    B, N, m, K, R, H, D = 1, 10, 4, 2, 3, 2, 16
    q, k, v, _ = native_cca.make_inputs(B, N, m, K, R, H, H, D, 0, None, torch.bfloat16)
    mask = torch.zeros(k.shape[:4], dtype=torch.bool)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = rk.chunked_cross_attention(*leaves, m, neighbour_mask=mask, backend="cuda")
    assert torch.equal(out, torch.zeros_like(out))
    for g in torch.autograd.grad(out.float().sum(), leaves):
        assert torch.equal(g, torch.zeros_like(g))


def test_cca_strided_and_unaligned_inputs(emulated_cuda):
    """Head-major q, K/R axes that do not flatten, a head-dim stride of 2 and a data pointer
    2 bytes off 16-byte alignment: the scalar load path, same results."""
    B, N, m, K, R, Hq, Hkv, D = 1, 13, 4, 2, 5, 4, 2, 32
    L = N // m + 1
    q = torch.randn(B, Hq, N, D).half().transpose(1, 2)
    k = torch.randn(B, L, Hkv, R, K, D).half().permute(0, 1, 4, 3, 2, 5)
    v = torch.randn(B, L, K, R, Hkv, 2 * D).half()[..., ::2]
    flat = torch.randn(B * L * K * R * Hkv * D + 1).half()
    v_unaligned = flat[1:].view(B, L, K, R, Hkv, D)  # storage offset 1: not 16-byte aligned
    mask = (torch.rand(B, L, K, 2 * R) > 0.3)[..., ::2]
    native_cca.check_against_reference("cuda", q, k, v, m, mask, 3)
    native_cca.check_against_reference("cuda", q, k, v_unaligned, m, mask, 3)


NEIGHBOUR_TESTS = {"self": test_neighbour_self_attention.TESTS, "cross": test_neighbour_cross_attention.TESTS}
# (B, L, K, R, M, Hq, Hkv, D, mask); "empty": one neighbour (self) / chunk (cross) with no real token
NEIGHBOUR_CASES = [
    (1, 1, 2, 5, 7, 4, 2, 32, "random"),
    (1, 1, 1, 70, 66, 2, 1, 16, "empty"),
    (1, 2, 2, 6, 5, 2, 2, 40, "empty"),
    (1, 1, 2, 4, 9, 2, 1, 20, "random"),
    (1, 1, 1, 5, 6, 1, 1, 128, None),
    (1, 1, 1, 5, 150, 2, 1, 16, "random"),  # cross: three key tiles
]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("op", ["self", "cross"])
@pytest.mark.parametrize("B, L, K, R, M, Hq, Hkv, D, mask", NEIGHBOUR_CASES)
def test_neighbour_matches_reference(emulated_cuda, op, B, L, K, R, M, Hq, Hkv, D, mask, dtype):
    dims = dict(B=B, L=L, K=K, R=R, M=M, Hq=Hq, Hkv=Hkv, D=D)  # self-attention has no M
    NEIGHBOUR_TESTS[op].check_case("cuda", Case(dims, {"empty": "first"}.get(mask, mask)), dtype, "cpu")


def test_neighbour_padding_rows_are_zero(emulated_cuda):
    case = Case(dict(B=1, L=1, K=2, R=9, Hq=2, Hkv=1, D=16), "first")  # neighbour 0's tokens all padding
    q, k, v, mask = NEIGHBOUR_TESTS["self"].inputs(case, torch.float16, "cpu")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = rk.neighbour_self_attention(*leaves, neighbour_mask=mask, backend="cuda")
    assert (out[~mask] == 0).all()
    dq = torch.autograd.grad(out.float().sum(), leaves[0])[0]
    assert (dq[~mask] == 0).all()


def test_raw_ops_refuse_what_they_cannot_run(emulated_cuda):
    ops = emulated_cuda
    q = torch.randn(1, 5, 2, 16)
    k = torch.randn(1, 2, 1, 3, 1, 16)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        ops.chunked_cross_attention_fwd(q, k, k, None, 4, 0.25, 0)
    wide = torch.randn(1, 5, 2, 136).half()
    with pytest.raises(RuntimeError, match="head dim"):
        ops.chunked_cross_attention_fwd(wide, torch.randn(1, 2, 1, 3, 1, 136).half(),
                                        torch.randn(1, 2, 1, 3, 1, 136).half(), None, 4, 0.25, 0)
    with pytest.raises(RuntimeError, match="too few neighbour chunks"):  # tokens 0..8 read chunks 0, 1
        ops.chunked_cross_attention_fwd(torch.randn(1, 9, 2, 16).half(), k[:, :1].half(), k[:, :1].half(),
                                        None, 4, 0.25, 0)
    qn = torch.randn(1, 1, 2, 3, 2, 8).half()
    with pytest.raises(RuntimeError, match="Hq % Hkv"):
        ops.neighbour_self_attention_fwd(qn, torch.randn(1, 1, 2, 3, 3, 8).half(),
                                         torch.randn(1, 1, 2, 3, 3, 8).half(), None, 1.0)
