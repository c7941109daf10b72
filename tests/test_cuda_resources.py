"""The CUDA kernels' resource figures (bench/cuda_resources.py), which need nvcc but no GPU:
every kernel compiles for sm_80 and sm_90a, nothing spills, and each kernel reaches the
occupancy it is built for (its __launch_bounds__ target; on an H100/H200 also by shared memory).

The compile takes about a minute (both .cu files, both architectures, in parallel).
Without nvcc the test is skipped, except in CI (CI=true), where .ci/run requires nvcc anyway.
"""
from __future__ import annotations

import os

import pytest

from bench import cuda_resources

NVCC = cuda_resources.find_nvcc()


@pytest.fixture(scope="module")
def table():
    if NVCC is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("nvcc not found in CI: cannot check the CUDA kernels' resources")
        pytest.skip("nvcc not found: cannot compile the CUDA kernels")
    return cuda_resources.rows()


def test_every_kernel_compiles_for_both_archs(table):
    kernels = {(r["kernel"], r["dtype"], r["head_dim"], r["arch"]) for r in table}
    want = {(f"{op}_{p}", dtype, d, arch)
            for op in ("cca", "neighbour") for p in cuda_resources.PASSES for dtype in ("fp16", "bf16")
            for d in (32, 64, 128) for arch in cuda_resources.NVCC_ARCH.values()}
    assert kernels == want


def test_nothing_spills(table):
    spilled = [(r["kernel"], r["dtype"], r["head_dim"], r["arch"], r["spill_bytes"]) for r in table if r["spill_bytes"]]
    assert not spilled


def test_occupancy_targets(table):
    for r in table:
        # registers always allow the __launch_bounds__ target (ptxas must fit it)
        assert r["registers"] <= 65536 // (r["target_ctas_per_sm"] * cuda_resources.THREADS), r
        if r["arch"] == "sm_90a":  # and on an H100/H200 shared memory does too
            assert r["ctas_per_sm"] >= r["target_ctas_per_sm"], r
            if r["head_dim"] <= 64:
                assert r["ctas_per_sm"] >= 2, r


def test_parse_ptxas_and_occupancy_arithmetic():
    log = (
        "ptxas info    : Compiling entry function '_ZN13retro_kernels4cuda12_GLOBAL__N_123attention_bwd_dq_"
        "kernelI6__halfLi32ENS1_10CcaProblemEEEvNT1_6ParamsE' for 'sm_90a'\n"
        "ptxas info    : Function properties for _ZN13retro_kernels...\n"
        "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 96 registers, used 1 barriers, 8 bytes cumulative stack size\n"
        "ptxas info    : Compiling entry function '_ZN13retro_kernels4cuda12_GLOBAL__N_117attention_fwd_kernelI"
        "13__nv_bfloat16Li128ENS1_16NeighbourProblemEEEvNT1_6ParamsE' for 'sm_90a'\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 213 registers, used 1 barriers\n"
    )
    assert cuda_resources.parse_ptxas(log) == [
        dict(kernel="cca_bwd_dq", dtype="fp16", head_dim=32, spill_bytes=16, registers=96),
        dict(kernel="neighbour_fwd", dtype="bf16", head_dim=128, spill_bytes=0, registers=213),
    ]
    # 213 registers -> 216 per thread, 27648 per CTA: 2 CTAs; 87552 + 1024 bytes: 2 on sm_90a, 1 on sm_80
    assert cuda_resources.occupancy(213, 87552, 4, "sm90")["ctas_per_sm"] == 2
    assert cuda_resources.occupancy(213, 87552, 4, "sm80")["ctas_per_sm"] == 1
    assert cuda_resources.occupancy(96, 1024, 4, "sm90")["ctas_per_sm"] == 5
