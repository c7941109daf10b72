"""Registers, spills, shared memory and occupancy of the CUDA kernels (csrc/cuda); no GPU needed.

    python -m bench.cuda_resources          (or python -m bench kernels --cuda)

Each csrc/cuda/*.cu is compiled for the device only with .ci/run's flags and `--resource-usage`
(ptxas: registers, spill bytes per kernel); the dynamic shared memory and each kernel's target
occupancy (its __launch_bounds__) come from csrc/cuda/attention_layout.h through a small host
program. `rows(archs)`: one dict per (kernel, dtype, head_dim, arch) with registers, spill_bytes,
smem_bytes, ctas_per_sm (what registers and shared memory allow) and target_ctas_per_sm.
"""
from __future__ import annotations

import concurrent.futures
import functools
import glob
import os
import re
import shutil
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
# .ci/run's nvcc flags (torch's BuildExtension's), without the -gencode list
NVCC_FLAGS = [
    "-std=c++20", "-O3", "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    "-DTORCH_EXTENSION_NAME=_C_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H",
]
# Per-SM limits of the targets (CUDA occupancy rules; 1 KB of shared memory per CTA is reserved).
ARCHS = {  # by Triton's names; NVCC_ARCH: nvcc's
    "sm90": dict(capability=90, registers=65536, smem_per_sm=228 * 1024, smem_per_block=227 * 1024,
                 threads=2048, ctas=32),
    "sm80": dict(capability=80, registers=65536, smem_per_sm=164 * 1024, smem_per_block=163 * 1024,
                 threads=2048, ctas=32),
}
RESERVED_SMEM_PER_CTA = 1024
NVCC_ARCH = {"sm80": "sm_80", "sm90": "sm_90a"}
THREADS = 128
PASSES = {"fwd": 0, "bwd_dq": 1, "bwd_dkdv": 2}
DTYPES = {"6__half": "fp16", "13__nv_bfloat16": "bf16"}
KERNEL = re.compile(r"attention_(fwd|bwd_dq|bwd_dkdv)_kernelI(6__half|13__nv_bfloat16)Li(\d+)E"
                    r".*?(Cca|Neighbour)Problem")


def find_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        nvcc = "/usr/local/cuda/bin/nvcc"
    return nvcc


def _include_flags(tmp: str) -> list[str]:
    """torch's include paths, and the CI trick: the CPU torch wheel ships the c10/cuda headers
    without their generated config header, so supply it (a CUDA torch defines the same macro)."""
    from torch.utils.cpp_extension import include_paths

    impl = os.path.join(tmp, "include", "c10", "cuda", "impl")
    os.makedirs(impl, exist_ok=True)
    with open(os.path.join(impl, "cuda_cmake_macros.h"), "w") as f:
        f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return ["-I" + os.path.join(tmp, "include")] + ["-I" + p for p in include_paths()]


def parse_ptxas(log: str) -> list[dict]:
    """(kernel, dtype, head_dim, registers, spill_bytes) per entry function in ptxas -v output."""
    found, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            k = KERNEL.search(m.group(1))
            current = None if k is None else {
                "kernel": f"{k.group(4).lower()}_{k.group(1)}", "dtype": DTYPES[k.group(2)],
                "head_dim": int(k.group(3)), "spill_bytes": 0,
            }
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            found.append(current)
            current = None
    return found


def _compile(nvcc: str, source: str, arch: str, includes: list[str], tmp: str) -> list[dict]:
    out = os.path.join(tmp, f"{os.path.basename(source)}.{arch}.cubin")
    cmd = [nvcc, "-cubin", f"-arch={arch}", "--resource-usage", *NVCC_FLAGS, *includes, source, "-o", out]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed for {source} ({arch}):\n{result.stderr[-4000:]}")
    return [dict(row, arch=arch) for row in parse_ptxas(result.stderr)]


def smem_table(tmp: str) -> dict[tuple[str, int], tuple[int, int]]:
    """(pass, head_dim) -> (dynamic shared memory bytes, target CTAs per SM), from attention_layout.h."""
    program = os.path.join(tmp, "layout.cpp")
    with open(program, "w") as f:
        f.write(
            '#include "attention_layout.h"\n#include <cstdio>\nusing namespace retro_kernels::cuda;\n'
            "template <Pass P, int D> void row() {\n"
            '  std::printf("%s %d %zu %d\\n", pass_name(P), D, SmemLayout<P, D>::bytes, min_ctas_per_sm(P, D));\n}\n'
            "template <int D> void rows() { row<Pass::Forward, D>(); row<Pass::BackwardDq, D>(); "
            "row<Pass::BackwardDkDv, D>(); }\n"
            "int main() { rows<32>(); rows<64>(); rows<128>(); }\n"
        )
    compiler = shutil.which(os.environ.get("CXX", "c++")) or find_nvcc()
    exe = os.path.join(tmp, "layout")
    subprocess.run([compiler, "-std=c++17", "-I", CUDA_DIR, program, "-o", exe], check=True, capture_output=True)
    table = {}
    for line in subprocess.run([exe], check=True, capture_output=True, text=True).stdout.splitlines():
        name, d, smem, target = line.split()
        table[name, int(d)] = (int(smem), int(target))
    return table


@functools.cache
def rows(archs: tuple[str, ...] = tuple(NVCC_ARCH.values())) -> list[dict]:
    """One row per (kernel, dtype, head dim, arch); raises RuntimeError without nvcc."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found: cannot compile the CUDA kernels")
    sources = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
    with tempfile.TemporaryDirectory() as tmp:
        includes = _include_flags(tmp)
        table = smem_table(tmp)
        jobs = [(s, a) for s in sources for a in archs]
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
            compiled = list(pool.map(lambda job: _compile(nvcc, job[0], job[1], includes, tmp), jobs))
    result, by_nvcc_name = [], {v: k for k, v in NVCC_ARCH.items()}
    for kernels in compiled:
        for row in kernels:
            smem, target = table[row["kernel"].split("_", 1)[1], row["head_dim"]]
            limits = by_nvcc_name[row["arch"]]
            row.update(smem_bytes=smem, target_ctas_per_sm=target,
                       ctas_per_sm=occupancy(row["registers"], smem, THREADS // 32, limits)["ctas_per_sm"])
            result.append(row)
    order = {name: i for i, name in enumerate(PASSES)}
    result.sort(key=lambda r: (r["arch"], r["kernel"].split("_")[0], order[r["kernel"].split("_", 1)[1]],
                               r["head_dim"], r["dtype"]))
    return result


def occupancy(registers: int, smem: int, warps: int, arch: str) -> dict:
    """CTAs per SM and which resource limits them (registers are allocated per warp, 256 at a time)."""
    a = ARCHS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    limits = {
        "registers": (a["registers"] // regs_per_warp) // warps,
        "smem": a["smem_per_sm"] // (smem + RESERVED_SMEM_PER_CTA) if smem <= a["smem_per_block"] else 0,
        "threads": a["threads"] // (32 * warps),
        "ctas": a["ctas"],
    }
    limit = min(limits, key=limits.get)
    return dict(ctas_per_sm=limits[limit], limited_by=limit)


def format_table(table: list[dict]) -> str:
    header = ("kernel", "dtype", "head_dim", "arch", "registers", "spill_bytes", "smem_bytes", "ctas_per_sm",
              "target_ctas_per_sm")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    lines += [" | ".join(str(r[h]) for h in header) for r in table]
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(rows()))
