"""The C++ CPU kernels of the neighbour-encoder ops against the reference, in the
cases the op test files do not cover on a CPU: bf16 (real on the CPU), grouped
heads with every mask kind, K*R rows that do not flatten, determinism in bf16.

(tests/test_neighbour_*_attention.py run their whole suites on backend="cpu" too.)
"""
from __future__ import annotations

import pytest
import torch

from retro_kernels import _native
from retro_kernels.ops.neighbour_cross_attention import neighbour_cross_attention
from retro_kernels.ops.neighbour_self_attention import neighbour_self_attention
from retro_kernels.reference.neighbour_cross_attention import (
    neighbour_cross_attention as cross_reference,
)
from retro_kernels.reference.neighbour_self_attention import (
    neighbour_self_attention as self_reference,
)
from tests.tolerances import assert_close_to_reference

CPU_MISSING = _native.missing_reason("cpu")
needs_cpu_ext = pytest.mark.skipif(CPU_MISSING is not None, reason=str(CPU_MISSING))
# A GPU without the CUDA extension fails once, in test_native_chunked_cross_attention.py.
needs_cuda_ext = pytest.mark.skipif(
    torch.cuda.is_available() and _native.missing_reason("cuda") is not None,
    reason="the CUDA extension is not usable (see test_native_chunked_cross_attention.py"
           "::test_cuda_extension_is_built_on_a_gpu)",
)

OPS = {
    "self": (neighbour_self_attention, self_reference, "neighbour_mask"),
    "cross": (neighbour_cross_attention, cross_reference, "chunk_mask"),
}


def make_inputs(op, B, L, K, R, M, Hq, Hkv, D, mask, dtype, device="cpu"):
    q = torch.randn(B, L, K, R, Hq, D).to(dtype)
    kv_shape = (B, L, K, R, Hkv, D) if op == "self" else (B, L, M, Hkv, D)
    k, v = torch.randn(kv_shape).to(dtype), torch.randn(kv_shape).to(dtype)
    if device != "cpu":
        q, k, v = q.to(device), k.to(device), v.to(device)
    mask_shape = (B, L, K, R) if op == "self" else (B, L, M)
    m = None
    if mask == "random":
        m = torch.rand(mask_shape) > 0.3
    elif mask == "empty":  # one neighbour (self) / one chunk (cross) with no real token
        m = torch.rand(mask_shape) > 0.3
        m[0, 0] = False
    return q, k, v, None if m is None else m.to(device)


def grads(fn, q, k, v, mask_name, mask, dtype=None, **kw):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **{mask_name: mask}, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device, out.dtype)
    return [out.detach()] + [g.detach() for g in torch.autograd.grad(out, leaves, dout)]


CASES = [
    (1, 2, 2, 7, 5, 4, 2, 32, "random"),
    (2, 1, 3, 70, 9, 3, 1, 80, "empty"),
    (1, 2, 1, 5, 66, 2, 2, 128, None),
]


def check_against_reference(backend, device, op, B, L, K, R, M, Hq, Hkv, D, mask, dtype):
    fn, ref, mask_name = OPS[op]
    q, k, v, m = make_inputs(op, B, L, K, R, M, Hq, Hkv, D, mask, dtype, device)
    got = [t.cpu() for t in grads(fn, q, k, v, mask_name, m, backend=backend)]
    q, k, v, m = [None if t is None else t.cpu() for t in (q, k, v, m)]
    want32 = grads(ref, q, k, v, mask_name, m, torch.float32)
    want_lp = grads(ref, q, k, v, mask_name, m) if dtype != torch.float32 else [None] * 4
    for name, g, w32, wlp, x in zip(("out", "dq", "dk", "dv"), got, want32, want_lp, (q, q, k, v)):
        assert g.dtype == x.dtype and g.is_contiguous()
        assert_close_to_reference(f"{op} {name}", g, w32, wlp, factor=2.0 if name == "out" else 3.0)


@needs_cpu_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("op", ["self", "cross"])
@pytest.mark.parametrize("B, L, K, R, M, Hq, Hkv, D, mask", CASES)
def test_cpu_matches_reference(op, B, L, K, R, M, Hq, Hkv, D, mask, dtype):
    check_against_reference("cpu", "cpu", op, B, L, K, R, M, Hq, Hkv, D, mask, dtype)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)  # the CUDA kernels: fp16/bf16
@pytest.mark.parametrize("op", ["self", "cross"])
@pytest.mark.parametrize("B, L, K, R, M, Hq, Hkv, D, mask", CASES + [(2, 4, 2, 128, 64, 8, 2, 64, "random")])
def test_cuda_matches_reference(op, B, L, K, R, M, Hq, Hkv, D, mask, dtype):
    check_against_reference("cuda", "cuda", op, B, L, K, R, M, Hq, Hkv, D, mask, dtype)


@needs_cpu_ext
@pytest.mark.parametrize("op", ["self", "cross"])
def test_cpu_strided_inputs_and_bf16_determinism(op):
    fn, ref, mask_name = OPS[op]
    B, L, K, R, M, Hq, Hkv, D = 2, 2, 3, 6, 7, 4, 2, 32
    q = torch.randn(B, L, R, K, Hq, D).permute(0, 1, 3, 2, 4, 5)  # K and R do not flatten
    _, k, v, m = make_inputs(op, B, L, K, R, M, Hq, Hkv, 2 * D, "random", torch.float32)
    k, v = k[..., ::2], v[..., ::2]  # head dim stride 2
    got = grads(fn, q, k, v, mask_name, m, backend="cpu")
    want = grads(ref, q, k, v, mask_name, m)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close_to_reference(f"{op} {name}", g, w)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    first = grads(fn, qb, kb, vb, mask_name, m, backend="cpu")
    second = grads(fn, qb, kb, vb, mask_name, m, backend="cpu")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_cpu_ext
def test_cpu_raw_ops_check_their_arguments():
    ops = _native.load("cpu")
    q = torch.randn(1, 1, 2, 3, 2, 8)
    with pytest.raises(RuntimeError, match="Hq % Hkv"):
        ops.neighbour_self_attention_fwd(q, torch.randn(1, 1, 2, 3, 3, 8), torch.randn(1, 1, 2, 3, 3, 8), None, 1.0)
    with pytest.raises(RuntimeError, match="chunk_mask"):
        ops.neighbour_cross_attention_fwd(q, torch.randn(1, 1, 4, 2, 8), torch.randn(1, 1, 4, 2, 8),
                                          torch.ones(1, 1, 5, dtype=torch.bool), 1.0)
