"""Which GEMM the C++ CPU kernels use on this machine (chosen by measurement, per
shape class, see csrc/cpu/gemm.h) and which CPU and ISA this is; benchmarks and
`python -m retro_kernels` report both."""
from __future__ import annotations

import json
import os
import platform

import torch

from ..ops.chunked_cross_attention import chunked_cross_attention
from ..ops.neighbour_cross_attention import neighbour_cross_attention
from ..ops.neighbour_self_attention import neighbour_self_attention
from . import MISSING, OPS

# (flag in /proc/cpuinfo, name we report), best first: the ISA a CPU kernel can use.
_ISA_LEVELS = (("amx_tile", "amx"), ("avx512f", "avx512f"), ("avx2", "avx2"))


def cpu_description() -> dict:
    """{"cpu_model", "isa", "flags"}: the CPU's model name, its best vector ISA for these
    kernels ("amx", "avx512f", "avx2", else the machine name, e.g. "x86_64") and the
    relevant flags it has (avx2, fma, avx512f, avx512_bf16, amx_tile, amx_bf16; on Arm asimd, sve)."""
    model, flags = platform.processor() or platform.machine() or "cpu", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    isa = next((name for flag, name in _ISA_LEVELS if flag in flags), platform.machine() or "unknown")
    if isa == "avx2" and "fma" not in flags:
        isa = "avx"
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve")
    return {"cpu_model": model, "isa": isa, "flags": [f for f in wanted if f in flags]}


def _calibrate() -> None:
    """Run each op's forward and backward once at the paper's tile shapes (a few ms), so
    that the GEMM choice for those shapes is made now."""
    g = torch.Generator().manual_seed(0)
    m, R, D = 64, 128, 64
    q = torch.randn(1, 2 * m, 1, D, generator=g, requires_grad=True)
    kv = [torch.randn(1, 2, 2, R, 1, D, generator=g, requires_grad=True) for _ in range(2)]
    chunked_cross_attention(q, *kv, m, backend="cpu").sum().backward()
    qn = torch.randn(1, 1, 2, R, 1, D, generator=g, requires_grad=True)
    neighbour_self_attention(qn, *[t[:, :1] for t in kv], backend="cpu").sum().backward()
    chunk = [torch.randn(1, 1, m, 1, D, generator=g, requires_grad=True) for _ in range(2)]
    neighbour_cross_attention(qn, *chunk, backend="cpu").sum().backward()


def gemm_info(calibrate: bool = False) -> dict:
    """Which GEMM the C++ CPU kernels use here, as a dict.

    Keys: "summary" (one line, e.g. "measured per shape: avx512 micro-kernel (5
    shapes)" or "aten mm" when RETRO_KERNELS_CPU_GEMM forces one), "mode"
    ("measured", "forced", "invalid" (a bad RETRO_KERNELS_CPU_GEMM; "error" says why)
    or "unavailable" (no extension; "error" says why)), "forced", "candidates" (the
    GEMMs this CPU can run), "blas" (its version), "threads", "classes" (one per shape
    class measured so far: trans_a, trans_b, M, N, K of the call that was timed,
    "chosen" and "us", the best time of each candidate in microseconds),
    "measure_ms" (time spent measuring), plus cpu_description()'s keys.

    The choice is made per shape class on first use; `calibrate=True` first runs each
    op once at the paper's shapes so that their classes are measured.
    """
    info = {"summary": None, "mode": "unavailable", "error": MISSING, "classes": [], **cpu_description()}
    if OPS is None:
        return info
    if calibrate and json.loads(OPS.gemm_report())["mode"] != "invalid":
        _calibrate()
    info.update(json.loads(OPS.gemm_report()))
    info["summary"] = OPS.gemm_backend()
    info["env"] = os.environ.get("RETRO_KERNELS_CPU_GEMM")
    return info
