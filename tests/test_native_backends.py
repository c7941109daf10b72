"""What is particular to the native backends ("cpu": csrc/cpu, "cuda": csrc/cuda), not to an op:
that they are built where they must be, what a missing build says, the CPU's fallback GEMM, and
the raw extension ops' own argument checks. Every op's cases run on them in op_harness.

The CPU tests need the extension (`python setup.py build_ext --inplace`); they are
skipped without it, except in CI (CI=true), where a missing extension fails.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from retro_kernels import BackendNotSupported, _native, dispatch

from backends import probe_inputs

CPU_MISSING = _native.missing_reason("cpu")
needs_cpu_ext = pytest.mark.skipif(CPU_MISSING is not None, reason=str(CPU_MISSING))
CUDA_MISSING = _native.missing_reason("cuda") if torch.cuda.is_available() else None
OPS = ("chunked_cross_attention", "neighbour_self_attention", "neighbour_cross_attention")


def test_cpu_extension_is_built_in_ci():
    """In CI the extension is built by `pip install -e .`: never skip its tests silently."""
    if os.environ.get("CI", "").lower() != "true":
        pytest.skip("only enforced in CI (CI=true)")
    assert CPU_MISSING is None, CPU_MISSING


@pytest.mark.gpu
def test_cuda_extension_is_built_on_a_gpu():
    """On a GPU the CUDA kernels must be built: without them backend="cuda" is not tested (one failure, here)."""
    assert CUDA_MISSING is None, f"a GPU is here but the CUDA extension is not usable: {CUDA_MISSING}"


@pytest.mark.parametrize("op", OPS)
def test_cpu_backend_explains_a_missing_extension(op, monkeypatch):
    """Without the extension, backend='cpu' says so and says how to build it; "auto" falls back."""
    unbuilt = dataclasses.replace(dispatch.DECLARED["cpu"], missing="the C++ CPU kernels extension "
                                  "retro_kernels._C_cpu is not built; " + _native.BUILD_HINT)
    monkeypatch.setitem(dispatch.DECLARED, "cpu", unbuilt)
    inputs = probe_inputs(op, "cpu", torch.float32)
    assert dispatch.not_supported_reasons("cpu", op, **inputs) == [unbuilt.missing]
    with pytest.raises(BackendNotSupported, match="pip install --no-build-isolation -e ."):
        dispatch.select_backend("cpu", op, torch.device("cpu"), **inputs)
    monkeypatch.setattr(_native, "_warned", set())
    with pytest.warns(_native.FallbackWarning, match="pip install --no-build-isolation -e ."):
        assert dispatch.select_backend("auto", op, torch.device("cpu"), **inputs) == "reference"


@needs_cpu_ext
def test_cpu_aten_gemm_path_matches_reference():
    """The fallback GEMM (at::mm, used when libtorch exports no BLAS sgemm) is also right."""
    code = (
        "import torch\n"
        "from retro_kernels.cpu.gemm import gemm_info\n"
        "import test_chunked_cross_attention as t\n"
        "assert gemm_info()['summary'] == 'aten mm'\n"
        "torch.manual_seed(0)\n"
        "q, k, v, mask = t.make_inputs(2, 37, 8, 2, 5, 4, 2, 32, 3, 'chunk_hidden', device='cpu')\n"
        "t.check_against_reference('cpu', q, k, v, 8, mask, 3)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, RETRO_KERNELS_CPU_GEMM="aten", PYTHONPATH=os.pathsep.join([root, os.path.join(root, "tests")]))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@needs_cpu_ext
def test_cpu_raw_ops_check_their_arguments():
    """The extension's ops check what they are given too, rather than read out of bounds."""
    ops = _native.load("cpu")
    q, k = torch.randn(1, 9, 2, 16), torch.randn(1, 3, 1, 3, 2, 16)
    with pytest.raises(RuntimeError, match="too few neighbour chunks"):
        ops.chunked_cross_attention_fwd(q, k[:, :1], k[:, :1], None, 4, 0.25, 0)
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.chunked_cross_attention_fwd(q, k.double(), k, None, 4, 0.25, 0)
    qn = torch.randn(1, 1, 2, 3, 2, 8)
    with pytest.raises(RuntimeError, match="Hq % Hkv"):
        ops.neighbour_self_attention_fwd(qn, torch.randn(1, 1, 2, 3, 3, 8), torch.randn(1, 1, 2, 3, 3, 8), None, 1.0)
    with pytest.raises(RuntimeError, match="chunk_mask"):
        ops.neighbour_cross_attention_fwd(qn, torch.randn(1, 1, 4, 2, 8), torch.randn(1, 1, 4, 2, 8),
                                          torch.ones(1, 1, 5, dtype=torch.bool), 1.0)

