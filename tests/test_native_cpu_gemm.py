"""The fp32 GEMM under the CPU kernels (csrc/cpu: gemm(), the AVX2 micro-kernel by
default), called directly through the test-only op retro_kernels_cpu::gemm_for_tests,
against float64 torch.mm: every transpose combination, edge sizes that are not
multiples of the 6 x 16 tile, beta 0 (C never read) and 1, alpha != 1, and strided
A, B, C (views into bigger buffers, whose other elements must stay untouched)."""
import itertools
import os
import subprocess
import sys

import pytest
import torch

from retro_kernels import _native

CPU_MISSING = _native.missing_reason("cpu")
needs_cpu_ext = pytest.mark.skipif(CPU_MISSING is not None, reason=str(CPU_MISSING))

SIZES = (1, 5, 6, 7, 16, 17, 33, 70)  # rows and columns: around MR = 6, NR = 16
DEPTHS = (1, 2, 7, 64, 70)


def strided(rows, cols, gen, pad):
    """A (rows x cols) view with row stride cols + pad into a NaN-filled buffer, and the buffer."""
    buf = torch.full((rows + 1, cols + pad), float("nan"))
    view = buf[:rows, :cols]
    view.copy_(torch.randn(rows, cols, generator=gen))
    return view, buf


def check_gemm(M, N, K, trans_a, trans_b, alpha, beta, pad, gen):
    a, _ = strided(*((K, M) if trans_a else (M, K)), gen, pad)
    b, _ = strided(*((N, K) if trans_b else (K, N)), gen, pad)
    c, c_buf = strided(M, N, gen, pad)
    if beta == 0.0:
        c.fill_(float("nan"))  # with beta == 0, C must not be read
    c0 = c.clone()
    outside = c_buf.clone()
    outside[:M, :N] = 0.0

    opa = (a.t() if trans_a else a).double()
    opb = (b.t() if trans_b else b).double()
    expected = alpha * (opa @ opb) + (beta * c0.double() if beta != 0.0 else 0.0)
    torch.ops.retro_kernels_cpu.gemm_for_tests(a, b, c, trans_a, trans_b, alpha, beta)

    scale = (opa.abs() @ opb.abs()).abs().max().item() * abs(alpha) + 1.0
    torch.testing.assert_close(c.double(), expected, rtol=0, atol=1e-6 * scale * K ** 0.5 + 1e-6,
                               msg=lambda m: f"M={M} N={N} K={K} ta={trans_a} tb={trans_b} "
                                             f"alpha={alpha} beta={beta}: {m}")
    after = c_buf.clone()
    after[:M, :N] = 0.0
    assert torch.equal(after.isnan(), outside.isnan()), "wrote outside C"


def sweep(sizes=SIZES, depths=DEPTHS):
    gen = torch.Generator().manual_seed(0)
    scalars = ((1.0, 0.0), (0.125, 1.0), (-1.5, 0.0), (1.0, 1.0))  # (alpha, beta), taken in turn
    for n, (M, N, K) in enumerate(itertools.product(sizes, sizes, depths)):
        for trans_a, trans_b in itertools.product((False, True), repeat=2):
            alpha, beta = scalars[(n + 2 * trans_a + trans_b) % len(scalars)]
            pad = (M + N + K) % 3 * 5  # unit-stride rows (pad 0) and strided ones
            check_gemm(M, N, K, trans_a, trans_b, alpha, beta, pad, gen)


@needs_cpu_ext
def test_gemm_matches_torch():
    sweep()


@needs_cpu_ext
def test_gemm_attention_shapes_and_determinism():
    """The products of the CCA kernels at the paper's shape, and the same bits twice."""
    gen = torch.Generator().manual_seed(1)
    for M, N, K, trans_a, trans_b in ((64, 256, 64, False, True), (64, 64, 256, False, False),
                                      (256, 64, 64, True, False)):
        check_gemm(M, N, K, trans_a, trans_b, 1.0, 0.0, 0, gen)
        a = torch.randn(*((K, M) if trans_a else (M, K)), generator=gen)
        b = torch.randn(*((N, K) if trans_b else (K, N)), generator=gen)
        c1, c2 = torch.empty(M, N), torch.empty(M, N)
        torch.ops.retro_kernels_cpu.gemm_for_tests(a, b, c1, trans_a, trans_b, 1.0, 0.0)
        torch.ops.retro_kernels_cpu.gemm_for_tests(a, b, c2, trans_a, trans_b, 1.0, 0.0)
        assert torch.equal(c1, c2)


@needs_cpu_ext
def test_gemm_backend_default_is_the_micro_kernel_on_avx2():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    name = _native.load("cpu").gemm_backend()
    if os.environ.get("RETRO_KERNELS_CPU_GEMM"):
        pytest.skip("RETRO_KERNELS_CPU_GEMM is set")
    if " avx2" in flags and " fma" in flags:
        assert name == "avx2 micro-kernel"
    else:
        assert name in ("blas sgemm", "aten mm")


@needs_cpu_ext
@pytest.mark.parametrize("forced", ["blas", "aten"])
def test_forced_gemm_backends_match_torch(forced):
    """RETRO_KERNELS_CPU_GEMM=blas / =aten pick the other two GEMMs (once per process)."""
    code = (
        "import torch, tests.test_native_cpu_gemm as t\n"
        "from retro_kernels import _native\n"
        "name = _native.load('cpu').gemm_backend()\n"
        f"assert name == ('aten mm' if '{forced}' == 'aten' else name), name\n"
        f"assert '{forced}' == 'aten' or name in ('blas sgemm', 'aten mm'), name\n"
        "t.sweep(sizes=(1, 7, 16, 33), depths=(1, 7, 64))\n"
    )
    env = dict(os.environ, RETRO_KERNELS_CPU_GEMM=forced)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
