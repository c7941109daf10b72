"""The native backends of chunked_cross_attention ("cpu": csrc/cpu, "cuda": csrc/cuda)
against the reference: forward and gradients, awkward shapes, masks, grouped
heads, strided inputs, determinism, bad input.

The CPU tests need the extension (`python setup.py build_ext --inplace`); they
are skipped without it, except in CI (CI=true), where a missing extension fails.
The CUDA tests are marked gpu (the CUDA kernels run fp16/bf16 only).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from retro_kernels import BackendNotSupported, _native, chunked_cross_attention, dispatch
from retro_kernels.reference.chunked_cross_attention import chunked_cross_attention as reference
from tests.tolerances import assert_close_to_reference

CPU_MISSING = _native.missing_reason("cpu")
needs_cpu_ext = pytest.mark.skipif(CPU_MISSING is not None, reason=str(CPU_MISSING))


def test_cpu_extension_is_built_in_ci():
    """In CI the extension is built by `pip install -e .`: never skip its tests silently."""
    if os.environ.get("CI", "").lower() != "true":
        pytest.skip("only enforced in CI (CI=true)")
    assert CPU_MISSING is None, CPU_MISSING


def make_inputs(B, N, m, K, R, Hq, Hkv, D, start_pos, mask, dtype, device="cpu", extra_chunks=1):
    L = (start_pos + N) // m + extra_chunks
    q = torch.randn(B, N, Hq, D, device=device).to(dtype)
    k = torch.randn(B, L, K, R, Hkv, D, device=device).to(dtype)
    v = torch.randn(B, L, K, R, Hkv, D, device=device).to(dtype)
    neighbour_mask = None
    if mask == "random":
        neighbour_mask = torch.rand(B, L, K, R, device=device) > 0.3
    elif mask == "chunk_hidden":  # every key of one read chunk masked, one key only in another
        neighbour_mask = torch.rand(B, L, K, R, device=device) > 0.3
        neighbour_mask[:, 0] = False
        if L > 1:
            neighbour_mask[-1, 1] = False
            neighbour_mask[-1, 1, K - 1, R - 1] = True
    return q, k, v, neighbour_mask


def run_with_grads(backend, q, k, v, m, neighbour_mask, start_pos, dout, dtype=None):
    """Output and (dq, dk, dv) of one backend, inputs cast to `dtype` if given."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    if backend == "reference":
        out = reference(*leaves, m, neighbour_mask=neighbour_mask, start_pos=start_pos)
    else:
        out = chunked_cross_attention(
            *leaves, m, neighbour_mask=neighbour_mask, start_pos=start_pos, backend=backend
        )
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def check_against_reference(backend, q, k, v, m, neighbour_mask, start_pos):
    dout = torch.randn(q.shape, device=q.device)
    out, grads = run_with_grads(backend, q, k, v, m, neighbour_mask, start_pos, dout)
    ref32, grads32 = run_with_grads(
        "reference", q.cpu(), k.cpu(), v.cpu(), m,
        None if neighbour_mask is None else neighbour_mask.cpu(), start_pos, dout.cpu(), torch.float32,
    )
    ref_lp, grads_lp = None, [None] * 3
    if q.dtype != torch.float32:
        ref_lp, grads_lp = run_with_grads(
            "reference", q, k, v, m, neighbour_mask, start_pos, dout, q.dtype
        )
    assert out.dtype == q.dtype and out.is_contiguous()
    assert_close_to_reference("out", out.cpu(), ref32, None if ref_lp is None else ref_lp.cpu())
    for name, g, g32, glp, x in zip(("dq", "dk", "dv"), grads, grads32, grads_lp, (q, k, v)):
        assert g.dtype == x.dtype and g.is_contiguous()
        assert_close_to_reference(
            name, g.cpu(), g32, None if glp is None else glp.cpu(), factor=3.0
        )


# (B, N, m, K, R, Hq, Hkv, D, start_pos, mask)
CASES = [
    pytest.param(2, 37, 8, 2, 5, 4, 2, 32, 0, "random", id="N%m!=0-gqa-D32"),
    pytest.param(1, 5, 8, 1, 3, 2, 2, 64, 0, None, id="N<m"),
    pytest.param(1, 6, 8, 2, 3, 2, 1, 64, 9, "random", id="N<m-start_pos-mqa"),
    pytest.param(2, 23, 4, 4, 7, 6, 3, 80, 5, "chunk_hidden", id="start_pos-K4-D80-masked-chunk"),
    pytest.param(1, 9, 1, 2, 3, 4, 1, 32, 0, "random", id="m1-mqa"),
    pytest.param(1, 9, 1, 1, 6, 2, 2, 128, 2, None, id="m1-start_pos-D128"),
    pytest.param(1, 150, 64, 2, 10, 2, 1, 64, 0, "random", id="m64"),
    pytest.param(1, 70, 64, 1, 9, 2, 2, 80, 61, "chunk_hidden", id="m64-start_pos-masked-chunk"),
]


@needs_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B, N, m, K, R, Hq, Hkv, D, start_pos, mask", CASES)
def test_cpu_matches_reference(B, N, m, K, R, Hq, Hkv, D, start_pos, mask, dtype):
    q, k, v, neighbour_mask = make_inputs(B, N, m, K, R, Hq, Hkv, D, start_pos, mask, dtype)
    check_against_reference("cpu", q, k, v, m, neighbour_mask, start_pos)


@needs_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_strided_inputs(dtype):
    """Views of larger tensors (head-major q, transposed k/v, a strided mask) give the same result."""
    B, N, m, K, R, Hq, Hkv, D = 2, 19, 4, 2, 5, 4, 2, 32
    L = N // m + 1
    q = torch.randn(B, Hq, N, D).to(dtype).transpose(1, 2)  # (B, N, Hq, D), head-major memory
    k = torch.randn(B, L, Hkv, R, K, D).to(dtype).permute(0, 1, 4, 3, 2, 5)  # K, R don't flatten
    v = torch.randn(B, L, K, R, Hkv, 2 * D).to(dtype)[..., ::2]  # head dim stride 2
    neighbour_mask = (torch.rand(B, L, K, 2 * R) > 0.3)[..., ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or neighbour_mask.is_contiguous())
    check_against_reference("cpu", q, k, v, m, neighbour_mask, 3)


@needs_cpu_ext
def test_cpu_fully_masked_rows_give_zeros_not_nan():
    B, N, m, K, R, H, D = 1, 20, 4, 2, 3, 2, 16
    q, k, v, _ = make_inputs(B, N, m, K, R, H, H, D, 0, None, torch.float32)
    neighbour_mask = torch.zeros(B, N // m + 1, K, R, dtype=torch.bool)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = chunked_cross_attention(*leaves, m, neighbour_mask=neighbour_mask, backend="cpu")
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out.sum(), leaves)
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@needs_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_is_deterministic(dtype):
    q, k, v, neighbour_mask = make_inputs(2, 70, 8, 2, 12, 4, 2, 64, 0, "random", dtype)
    dout = torch.randn(q.shape).to(dtype)
    first = run_with_grads("cpu", q, k, v, 8, neighbour_mask, 0, dout)
    second = run_with_grads("cpu", q, k, v, 8, neighbour_mask, 0, dout)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


@needs_cpu_ext
def test_cpu_aten_gemm_path_matches_reference():
    """The fallback GEMM (at::mm, used when libtorch exports no BLAS sgemm) is also right."""
    code = (
        "import torch, tests.test_native_chunked_cross_attention as t\n"
        "from retro_kernels import _native\n"
        "assert _native.load('cpu').gemm_backend() == 'aten mm'\n"
        "torch.manual_seed(0)\n"
        "q, k, v, mask = t.make_inputs(2, 37, 8, 2, 5, 4, 2, 32, 3, 'chunk_hidden', torch.float32)\n"
        "t.check_against_reference('cpu', q, k, v, 8, mask, 3)\n"
    )
    env = dict(os.environ, RETRO_KERNELS_CPU_GEMM="aten")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@needs_cpu_ext
def test_auto_picks_cpu_for_cpu_tensors():
    q, k, v, neighbour_mask = make_inputs(1, 9, 4, 1, 3, 2, 2, 16, 0, "random", torch.float32)
    inputs = dict(q=q, k=k, v=v, neighbour_mask=neighbour_mask)
    assert dispatch.select_backend("auto", "chunked_cross_attention", q.device, **inputs) == "cpu"
    assert dispatch.explain("chunked_cross_attention", **inputs)["cpu"] == []


@needs_cpu_ext
def test_cpu_bad_input():
    q, k, v, _ = make_inputs(1, 9, 4, 1, 3, 2, 2, 16, 0, None, torch.float32)
    with pytest.raises(TypeError, match="k has dtype"):
        chunked_cross_attention(q, k.half(), v, 4, backend="cpu")
    with pytest.raises(ValueError, match="head dim"):
        chunked_cross_attention(q, k[..., :8], v[..., :8], 4, backend="cpu")
    with pytest.raises(TypeError, match="neighbour_mask"):
        chunked_cross_attention(q, k, v, 4, neighbour_mask=torch.ones(k.shape[:4]), backend="cpu")
    # the raw op checks its arguments too, rather than reading out of bounds
    ops = _native.load("cpu")
    with pytest.raises(RuntimeError, match="too few neighbour chunks"):
        ops.chunked_cross_attention_fwd(q, k[:, :1], v[:, :1], None, 4, 0.25, 0)
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.chunked_cross_attention_fwd(q, k.double(), v, None, 4, 0.25, 0)


def test_cpu_backend_explains_a_missing_extension(monkeypatch):
    """Without the extension, backend='cpu' says so and says how to build it."""
    unbuilt = dataclasses.replace(dispatch.DECLARED["cpu"], missing="the C++ CPU kernels extension "
                                  "retro_kernels._C_cpu is not built; " + _native.BUILD_HINT)
    monkeypatch.setitem(dispatch.DECLARED, "cpu", unbuilt)
    q, k, v, _ = make_inputs(1, 9, 4, 1, 3, 2, 2, 16, 0, None, torch.float32)
    with pytest.raises(BackendNotSupported, match="pip install --no-build-isolation -e ."):
        chunked_cross_attention(q, k, v, 4, backend="cpu")
    # and "auto" falls back to the reference
    out = chunked_cross_attention(q, k, v, 4)
    torch.testing.assert_close(out, reference(q, k, v, 4))


# ---------------------------------------------------------------------------
# CUDA (csrc/cuda), on a GPU only
# ---------------------------------------------------------------------------

GPU_CASES = CASES + [
    pytest.param(2, 1024, 64, 2, 128, 8, 2, 64, 0, "random", id="paper-shape"),
    pytest.param(1, 200, 64, 4, 100, 4, 4, 128, 17, "chunk_hidden", id="D128-K4-R100"),
]


CUDA_MISSING = _native.missing_reason("cuda") if torch.cuda.is_available() else None
# A GPU without the extension is one failure (the test below), not one per CUDA case.
needs_cuda_ext = pytest.mark.skipif(
    CUDA_MISSING is not None,
    reason="the CUDA extension is not usable (see test_cuda_extension_is_built_on_a_gpu)",
)


@pytest.mark.gpu
def test_cuda_extension_is_built_on_a_gpu():
    """On a GPU the CUDA kernels must be built: their tests are skipped, pointing here, when not."""
    assert CUDA_MISSING is None, f"a GPU is here but the CUDA extension is not usable: {CUDA_MISSING}"


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B, N, m, K, R, Hq, Hkv, D, start_pos, mask", GPU_CASES)
def test_cuda_matches_reference(B, N, m, K, R, Hq, Hkv, D, start_pos, mask, dtype):
    q, k, v, neighbour_mask = make_inputs(B, N, m, K, R, Hq, Hkv, D, start_pos, mask, dtype, "cuda")
    check_against_reference("cuda", q, k, v, m, neighbour_mask, start_pos)


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_strided_and_deterministic():
    B, N, m, K, R, Hq, Hkv, D = 2, 70, 8, 2, 12, 4, 2, 64
    L = N // m + 1
    q = torch.randn(B, Hq, N, D, device="cuda").half().transpose(1, 2)
    k = torch.randn(B, L, Hkv, R, K, D, device="cuda").half().permute(0, 1, 4, 3, 2, 5)
    v = torch.randn(B, L, K, R, Hkv, D, device="cuda").half()
    neighbour_mask = torch.rand(B, L, K, R, device="cuda") > 0.3
    check_against_reference("cuda", q, k, v, m, neighbour_mask, 0)
    dout = torch.randn(q.shape, device="cuda").half()
    first = run_with_grads("cuda", q, k, v, m, neighbour_mask, 0, dout)
    second = run_with_grads("cuda", q, k, v, m, neighbour_mask, 0, dout)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)
