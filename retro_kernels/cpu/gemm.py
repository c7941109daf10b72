"""Which GEMM the C++ CPU kernels use on this machine (chosen by measurement, per
shape class, see csrc/cpu/gemm.h) and which CPU and ISA this is; benchmarks and
`python -m retro_kernels` report both."""
from __future__ import annotations

import collections
import os
import platform

import torch

from .. import _native
from ..ops.chunked_cross_attention import chunked_cross_attention
from ..ops.neighbour_cross_attention import neighbour_cross_attention
from ..ops.neighbour_self_attention import neighbour_self_attention

# gemm()'s candidates (csrc/cpu/gemm.h's GemmKind, in its order) and their names in the summary.
GEMM_KINDS = ("avx2", "avx512", "blas", "aten")
GEMM_TITLES = {"avx2": "avx2 micro-kernel", "avx512": "avx512 micro-kernel", "blas": "blas sgemm", "aten": "aten mm"}

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
    info = {"summary": None, "mode": "unavailable", "error": _native.missing_reason("cpu"), "classes": [],
            **cpu_description()}
    try:
        ops = _native.load("cpu")
    except RuntimeError as e:  # the compile on first use failed
        return {**info, "error": str(e)}
    if ops is None:
        return info
    if calibrate and not ops.gemm_choices()[1]:
        _calibrate()
    forced, error, candidates, blas, classes, measure_ms = ops.gemm_choices()
    rows = [classes[i:i + 10] for i in range(0, len(classes), 10)]
    info.update(
        mode="invalid" if error else "forced" if forced >= 0 else "measured",
        forced=GEMM_KINDS[forced] if forced >= 0 else None, error=error or None,
        candidates=[GEMM_KINDS[i] for i in candidates], blas=blas or None, threads=torch.get_num_threads(),
        classes=[{"trans_a": bool(r[0]), "trans_b": bool(r[1]), "M": int(r[2]), "N": int(r[3]), "K": int(r[4]),
                  "chosen": GEMM_KINDS[int(r[5])], "us": {GEMM_KINDS[i]: t for i, t in enumerate(r[6:]) if t >= 0}}
                 for r in rows],
        measure_ms=measure_ms, env=os.environ.get("RETRO_KERNELS_CPU_GEMM"))
    info["summary"] = _summary(info)
    return info


def _summary(info: dict) -> str:
    """One line: "aten mm" (forced), or "measured per shape: avx512 micro-kernel (4 shapes), ..."."""
    if info["mode"] == "invalid":
        return f"invalid: {info['error']}"
    if info["forced"]:
        return GEMM_TITLES[info["forced"]]
    if not info["classes"]:
        return "measured per shape (nothing measured yet)"
    count = collections.Counter(c["chosen"] for c in info["classes"])
    chosen = sorted(count, key=lambda kind: (-count[kind], GEMM_KINDS.index(kind)))  # most chosen first
    return "measured per shape: " + ", ".join(
        f"{GEMM_TITLES[kind]} ({count[kind]} shape{'s' if count[kind] > 1 else ''})" for kind in chosen)
