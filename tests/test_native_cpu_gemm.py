"""The fp32 GEMM under the CPU kernels (csrc/cpu/gemm.h), called directly through the
op of tests/cpu_gemm_helper.cpp (compiled here with csrc/cpu/gemm*.cpp, not shipped),
against float64 torch.mm, for every
candidate this CPU can run (the AVX2 and AVX-512 micro-kernels, BLAS sgemm, at::mm)
and for the measured choice ("auto"): every transpose combination, edge sizes that are
not multiples of the tiles (6 x 16, 8 x 32), beta 0 (C never read) and 1, alpha != 1,
and strided A, B, C (views into bigger buffers, whose other elements must stay
untouched). Then the choice by measurement, its report, and RETRO_KERNELS_CPU_GEMM."""
import functools
import itertools
import os
import subprocess
import sys

import pytest
import torch

from retro_kernels import _native

CPU_MISSING = _native.missing_reason("cpu")
needs_cpu_ext = pytest.mark.skipif(CPU_MISSING is not None, reason=str(CPU_MISSING))

ROWS = (1, 5, 6, 7, 8, 9, 70)  # around the micro-kernels' MR = 6 and 8
COLS = (1, 7, 16, 17, 32, 33, 70)  # around their NR = 16 and 32
DEPTHS = (1, 7, 64)
ALL_KINDS = ("avx2", "avx512", "blas", "aten")
WHY_MISSING = {
    "avx2": "this CPU has no AVX2 + FMA (or the build is not x86-64 GCC/Clang)",
    "avx512": "this CPU has no AVX-512F (or the build is not x86-64 GCC/Clang)",
    "blas": "libtorch exports no BLAS sgemm_",
    "aten": "",
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC_CPU = os.path.join(ROOT, "csrc", "cpu")


def report() -> dict:
    from retro_kernels.cpu.gemm import gemm_info

    return gemm_info()


@functools.cache
def helper():
    """torch.ops.retro_kernels_gemm_test.gemm: gemm() called directly (compiled on first use)."""
    from torch.utils import cpp_extension

    from retro_kernels import _native_build

    sources = [os.path.join(CSRC_CPU, f) for f in ("gemm.cpp", "gemm_avx2.cpp", "gemm_avx512.cpp")]
    cpp_extension.load(name="retro_kernels_gemm_test", sources=sources + [os.path.join(ROOT, "tests", "cpu_gemm_helper.cpp")],
                       extra_include_paths=[CSRC_CPU], extra_cflags=_native_build.CPU_CXX_FLAGS,
                       extra_ldflags=_native_build.CPU_LINK_FLAGS, is_python_module=False, verbose=False)
    return torch.ops.retro_kernels_gemm_test.gemm


def candidates() -> list[str]:
    return report()["candidates"] if CPU_MISSING is None else []


def kind_param(kind):
    """A parametrize entry for one candidate, skipped with the reason where this CPU lacks it."""
    missing = CPU_MISSING is not None or kind not in candidates()
    return pytest.param(kind, marks=pytest.mark.skipif(missing, reason=str(CPU_MISSING or WHY_MISSING[kind])))


KINDS = [kind_param(k) for k in ALL_KINDS] + [pytest.param("auto", marks=needs_cpu_ext)]


def strided(rows, cols, gen, pad):
    """A (rows x cols) view with row stride cols + pad into a NaN-filled buffer, and the buffer."""
    buf = torch.full((rows + 1, cols + pad), float("nan"))
    view = buf[:rows, :cols]
    view.copy_(torch.randn(rows, cols, generator=gen))
    return view, buf


def check_gemm(M, N, K, trans_a, trans_b, alpha, beta, pad, gen, backend):
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
    helper()(a, b, c, trans_a, trans_b, alpha, beta, backend)

    scale = (opa.abs() @ opb.abs()).abs().max().item() * abs(alpha) + 1.0
    torch.testing.assert_close(c.double(), expected, rtol=0, atol=1e-6 * scale * K ** 0.5 + 1e-6,
                               msg=lambda m: f"{backend} M={M} N={N} K={K} ta={trans_a} tb={trans_b} "
                                             f"alpha={alpha} beta={beta}: {m}")
    after = c_buf.clone()
    after[:M, :N] = 0.0
    assert torch.equal(after.isnan(), outside.isnan()), f"{backend} wrote outside C"


def sweep(backend, rows=ROWS, cols=COLS, depths=DEPTHS):
    gen = torch.Generator().manual_seed(0)
    scalars = ((1.0, 0.0), (0.125, 1.0), (-1.5, 0.0), (1.0, 1.0))  # (alpha, beta), taken in turn
    for n, (M, N, K) in enumerate(itertools.product(rows, cols, depths)):
        for trans_a, trans_b in itertools.product((False, True), repeat=2):
            alpha, beta = scalars[(n + 2 * trans_a + trans_b) % len(scalars)]
            pad = (M + N + K) % 3 * 5  # unit-stride rows (pad 0) and strided ones
            check_gemm(M, N, K, trans_a, trans_b, alpha, beta, pad, gen, backend)


@pytest.mark.parametrize("backend", KINDS)
def test_gemm_matches_float64(backend):
    sweep(backend)


@pytest.mark.parametrize("backend", KINDS)
def test_gemm_attention_shapes_and_determinism(backend):
    """The products of the kernels at the paper's shapes (rows 2 KB apart, as in a
    (tokens, heads, dim) tensor), and the same bits twice."""
    gen = torch.Generator().manual_seed(1)
    for M, N, K, trans_a, trans_b in ((64, 256, 64, False, True), (64, 64, 256, False, False),
                                      (256, 64, 64, True, False), (64, 128, 64, False, True)):
        check_gemm(M, N, K, trans_a, trans_b, 1.0, 0.0, 0, gen, backend)
        a = torch.randn(*((K, 8 * M) if trans_a else (M, 8 * K)), generator=gen)[:, : (M if trans_a else K)]
        b = torch.randn(*((N, 8 * K) if trans_b else (K, 8 * N)), generator=gen)[:, : (K if trans_b else N)]
        c1, c2 = torch.empty(M, N), torch.empty(M, N)
        helper()(a, b, c1, trans_a, trans_b, 1.0, 0.0, backend)
        helper()(a, b, c2, trans_a, trans_b, 1.0, 0.0, backend)
        assert torch.equal(c1, c2)


@needs_cpu_ext
def test_candidates_follow_the_cpu():
    """Every candidate the CPU can run is offered, and nothing else."""
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    have = candidates()
    assert "aten" in have
    if flags and os.uname().machine == "x86_64":
        assert ("avx2" in have) == ("avx2" in flags and "fma" in flags)
        assert ("avx512" in have) == ("avx512f" in flags)
    with pytest.raises(RuntimeError, match="backend must be auto, avx2, avx512, blas or aten"):
        helper()(torch.ones(1, 1), torch.ones(1, 1), torch.ones(1, 1), False, False, 1.0, 0.0, "fast")


@needs_cpu_ext
def test_measured_choice_gives_the_same_bits_for_any_thread_count():
    """A shape class keeps its choice for the process, so the kernels stay bitwise
    reproducible across thread counts with the measured GEMM too."""
    from op_harness import Case
    from tests import test_chunked_cross_attention as cca
    from tests import test_neighbour_cross_attention, test_neighbour_self_attention

    q, k, v, mask = cca.make_inputs(2, 70, 8, 2, 12, 4, 2, 64, 0, "random", torch.float32)
    dout = torch.randn(q.shape)
    neighbour_case = Case(dict(B=1, L=2, K=2, R=70, M=9, Hq=4, Hkv=2, D=32), "random")
    neighbour = {}
    for tests in (test_neighbour_self_attention.TESTS, test_neighbour_cross_attention.TESTS):
        inputs = tests.inputs(neighbour_case)
        neighbour[tests] = inputs + (torch.randn(inputs[0].shape),)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            outputs = list(cca.TESTS.run("cpu", q, k, v, mask, dict(chunk_size=8), dout))
            for tests, (qn, kn, vn, mn, dn) in neighbour.items():
                outputs += tests.run("cpu", qn, kn, vn, mn, {}, dn)
            runs.append(outputs)
    finally:
        torch.set_num_threads(before)
    for first, other in zip(runs[0], runs[1]):
        assert torch.equal(first, other)
    for first, other in zip(runs[0], runs[2]):
        assert torch.equal(first, other)


@needs_cpu_ext
def test_measured_choice_is_reported():
    """Running a kernel measures its shapes' classes; each keeps the fastest candidate it timed."""
    if os.environ.get("RETRO_KERNELS_CPU_GEMM", "auto") not in ("", "auto"):
        pytest.skip("RETRO_KERNELS_CPU_GEMM forces a GEMM")
    import retro_kernels.cpu.gemm as cpu_backend

    info = cpu_backend.gemm_info(calibrate=True)
    assert info["mode"] == "measured" and info["forced"] is None
    assert info["summary"].startswith("measured per shape: ")
    shapes = {(c["trans_a"], c["trans_b"], c["M"], c["N"], c["K"]) for c in info["classes"]}
    assert {(False, True, 64, 256, 64), (False, False, 64, 64, 256), (True, False, 256, 64, 64)} <= shapes
    for c in info["classes"]:
        assert set(c["us"]) == set(info["candidates"])
        assert c["chosen"] in info["candidates"] and c["us"][c["chosen"]] == min(c["us"].values())
    assert 0 < info["measure_ms"] < 1000
    assert info["isa"] in ("amx", "avx512f", "avx2", "avx") or info["isa"] == os.uname().machine


def run_forced(value: str, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RETRO_KERNELS_CPU_GEMM=value)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


@needs_cpu_ext
def test_forced_gemm_runs_everything_through_it():
    """RETRO_KERNELS_CPU_GEMM=<candidate> (read once per process) makes gemm() use it:
    reported as forced, and the CCA kernels give the reference's results through it,
    the same bits with 1 and 2 threads."""
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "import test_chunked_cross_attention as t\n"
        "from retro_kernels.cpu.gemm import gemm_info\n"
        "r = gemm_info()\n"
        "assert r['mode'] == 'forced' and r['forced'] == sys.argv[1], r\n"
        "torch.manual_seed(0)\n"
        "q, k, v, mask = t.make_inputs(2, 37, 8, 2, 5, 4, 2, 32, 3, 'chunk_hidden', torch.float32)\n"
        "t.check_against_reference('cpu', q, k, v, 8, mask, 3)\n"
        "dout = torch.randn(q.shape)\n"
        "runs = []\n"
        "for threads in (1, 2):  # the same bits for any thread count\n"
        "    torch.set_num_threads(threads)\n"
        "    runs.append(t.TESTS.run('cpu', q, k, v, mask, dict(chunk_size=8, start_pos=3), dout))\n"
        "assert torch.equal(runs[0][0], runs[1][0]), 'out'\n"
        "assert all(torch.equal(a, b) for a, b in zip(runs[0][1:], runs[1][1:])), 'grads'\n"
        "r = gemm_info()\n"
        "assert r['classes'] == []  # nothing measured\n"
        "print(r['summary'])\n"
    )
    titles = {"avx2": "avx2 micro-kernel", "avx512": "avx512 micro-kernel", "blas": "blas sgemm", "aten": "aten mm"}
    for kind in candidates():
        env = dict(os.environ, RETRO_KERNELS_CPU_GEMM=kind)
        result = subprocess.run([sys.executable, "-c", code, kind], cwd=ROOT, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{kind}: {result.stderr[-3000:]}"
        assert result.stdout.strip().splitlines()[-1] == titles[kind]


@needs_cpu_ext
@pytest.mark.parametrize("value", ["AVX2", "mkl"])
def test_bad_gemm_setting_is_a_clear_error(value):
    """An unknown RETRO_KERNELS_CPU_GEMM stops every CPU op before it starts, in one line
    naming the variable and what it may be."""
    code = (
        "import torch, retro_kernels\n"
        "q = torch.randn(1, 8, 1, 8); k = torch.randn(1, 2, 1, 3, 1, 8)\n"
        "try:\n"
        "    retro_kernels.chunked_cross_attention(q, k, k, 4, backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    print(str(e).splitlines()[0])\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    result = run_forced(value, code)
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("RETRO_KERNELS_CPU_GEMM must be one of auto, avx2, avx512, blas, aten"), line
    assert f"got '{value}'" in line


@needs_cpu_ext
def test_unavailable_gemm_setting_is_a_clear_error():
    """Forcing a candidate this CPU cannot run says why, and what it can run."""
    missing = [k for k in ALL_KINDS if k not in candidates()]
    if not missing:
        pytest.skip("this CPU runs every candidate (avx2, avx512, blas, aten)")
    code = (
        "from retro_kernels.cpu.gemm import gemm_info\n"
        "print(gemm_info()['error'])\n"
    )
    result = run_forced(missing[0], code)
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(f"RETRO_KERNELS_CPU_GEMM={missing[0]}: ") and "use one of: auto" in line, line


@needs_cpu_ext
def test_cpu_bench_rows_record_the_cpu_isa_and_gemm():
    """Every CPU row of `python -m bench` says which CPU, ISA and GEMM produced it; the `cpu`
    sweep measures the C++ CCA against pad + SDPA with its targets."""
    from bench import ops
    from bench.common import RunContext

    case = next(c for c in ops.CCABench().cases(torch.device("cpu"), True, ["fp32"]) if c.sweep == "cpu")
    rows = ops.run_op(ops.CCABench(), torch.device("cpu"), True, ["fp32"], log=lambda *a: None, cases=[case],
                      impls={"sdpa", "retro_kernels:cpu"})
    ctx = RunContext(torch.device("cpu"), quick=True)
    final = [ctx.finalize_row(r) for r in rows]
    assert final and all(r["status"] == "ok" and r["cpu_model"] and r["cpu_isa"] and r["cpu_gemm"] for r in final)
    ours = next(r for r in final if r["role"] == "ours" and r["mode"] == "fwd+bwd")
    assert set(ours["targets_met"]) == {"speedup_vs_sdpa"} and ours["speedup"]["sdpa"] > 0