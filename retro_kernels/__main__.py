"""`python -m retro_kernels`: what this installation can run, and why not the rest.

Prints the versions (Python, torch, triton, CUDA, the C++ compiler, ninja,
nvcc), the devices, the native libraries (built ahead of time, compiled on
first use, or missing and why) with the CPU GEMM in use (`--measure-gemm` times the candidates first), the Triton mode, and
for each op and backend whether it can run small probe inputs on each device
and, if not, the dispatch's own reasons. It compiles nothing unless asked
(`--build`).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import warnings

import torch

import retro_kernels
from retro_kernels import _native, dispatch
from retro_kernels.cpu.gemm import cpu_description

OPS = ("chunked_cross_attention", "neighbour_self_attention", "neighbour_cross_attention")
ENV_VARS = ("TRITON_INTERPRET", "RETRO_KERNELS_NO_JIT", "RETRO_KERNELS_CACHE", "RETRO_KERNELS_CPU_GEMM", "CXX")


def probe_inputs(op: str, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    """Small inputs of `op` (the keyword arguments of its backends' not_supported_reasons)."""
    def t(*shape):
        return torch.zeros(shape, device=device, dtype=dtype)

    B, L, K, R, H, D, M = 1, 2, 2, 4, 2, 16, 3
    if op == "chunked_cross_attention":
        return dict(q=t(B, 16, H, D), k=t(B, L, K, R, H, D), v=t(B, L, K, R, H, D),
                    neighbour_mask=torch.ones(B, L, K, R, dtype=torch.bool, device=device))
    if op == "neighbour_self_attention":
        q = t(B, L, K, R, H, D)
        return dict(q=q, k=q, v=q, neighbour_mask=torch.ones(B, L, K, R, dtype=torch.bool, device=device))
    return dict(q=t(B, L, K, R, H, D), k=t(B, L, M, H, D), v=t(B, L, M, H, D),
                chunk_mask=torch.ones(B, L, M, dtype=torch.bool, device=device))


def first_line(command: list[str], pick: str = "") -> str | None:
    """The first line of a tool's output (containing `pick`), or None when it cannot run."""
    if shutil.which(command[0]) is None:
        return None
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.splitlines() if pick in line and line.strip()]
    return lines[0] if lines else None


def version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def triton_mode() -> str:
    if version_of("triton") is None:
        return "unavailable: triton is not installed (`pip install triton`, Linux only)"
    if dispatch.triton_interpreting():
        return "interpreter (TRITON_INTERPRET=1: the kernels run on the CPU, slowly; fp32/fp16 only)"
    if torch.cuda.is_available():
        return "compiled (kernels JIT-compiled for the CUDA device)"
    return "unavailable: no CUDA device (TRITON_INTERPRET=1 runs the kernels on the CPU, slowly)"


def cpu_device() -> str:
    d = cpu_description()
    return f"{d['cpu_model']} ({torch.get_num_threads()} torch threads{'; ' + ' '.join(d['flags']) if d['flags'] else ''})"


def cuda_devices() -> list[str]:
    if not torch.cuda.is_available():
        return [f"none ({'torch has no CUDA' if not torch.version.cuda else 'no CUDA device visible'})"]
    devices = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        devices.append(f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    return devices


def gemm_in_use(measure: bool) -> dict:
    """The C++ CPU kernels' GEMM choice (retro_kernels.cpu.gemm.gemm_info): chosen per shape class by
    timing the candidates on first use; `measure` runs each op once at the paper's shapes first."""
    from .cpu.gemm import gemm_info

    info = gemm_info(calibrate=measure)
    return {"summary": info["summary"], "candidates": info.get("candidates", []), "mode": info["mode"],
            "classes": info.get("classes", [])}


def native_report(measure_gemm: bool = False) -> dict:
    report = {}
    for kind in ("cpu", "cuda"):
        entry = _native.describe(kind)
        if kind == "cpu" and entry["state"] == "loaded":
            entry["gemm"] = gemm_in_use(measure_gemm)
        report[kind] = entry
    return report


def op_report(devices: list[str], dtype: torch.dtype) -> dict:
    report = {}
    for op in OPS:
        report[op] = {}
        for device in devices:
            inputs = probe_inputs(op, device, dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", _native.FallbackWarning)
                auto = dispatch.select_backend("auto", op, torch.device(device), **inputs)
            report[op][device] = {"auto": auto, "reasons": retro_kernels.explain(op, **inputs)}
    return report


def collect(dtype: torch.dtype, measure_gemm: bool = False) -> dict:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
    cxx = os.environ.get("CXX", "c++").split()[0]
    return {
        "retro_kernels": {"version": retro_kernels.__version__, "path": os.path.dirname(retro_kernels.__file__)},
        "python": f"{platform.python_version()} ({sys.executable}), {platform.system()} {platform.machine()}",
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})" if torch.version.cuda
        else f"{torch.__version__} (no CUDA)",
        "triton": {"version": version_of("triton"), "mode": triton_mode()},
        "compiler": {"c++": first_line([cxx, "--version"]) or f"not found ({cxx})",
                     "ninja": first_line(["ninja", "--version"]) or version_of("ninja"),
                     "nvcc": first_line([nvcc, "--version"], "release") or "not found"},
        "devices": {"cpu": cpu_device(), "cuda": cuda_devices()},
        "native": native_report(measure_gemm),
        "ops": op_report(devices, dtype),
        "dtype": str(dtype).removeprefix("torch."),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def print_report(info: dict) -> None:
    rk = info["retro_kernels"]
    print(f"retro_kernels {rk['version']}  {rk['path']}")
    print(f"python    {info['python']}")
    print(f"torch     {info['torch']}")
    print(f"triton    {info['triton']['version'] or 'not installed'}: {info['triton']['mode']}")
    c = info["compiler"]
    print(f"compiler  c++: {c['c++']}; ninja {c['ninja'] or 'not found'}; nvcc: {c['nvcc']}")
    print(f"devices   cpu: {info['devices']['cpu']}")
    for cuda in info["devices"]["cuda"]:
        print(f"          cuda: {cuda}")
    for kind, entry in info["native"].items():
        label = "native    " if kind == "cpu" else "          "
        if entry["state"] == "missing" or entry["state"] == "failed":
            print(f"{label}{kind}: not available: {entry['reason']}")
        else:
            gemm = ""
            if "gemm" in entry:
                g = entry["gemm"]
                gemm = f"; GEMM: {g['summary']} (candidates: {', '.join(g['candidates']) or 'none'})"
                if g["mode"] == "measured" and not g["classes"]:
                    gemm += "; --measure-gemm times them now"
            hint = " (`python -m retro_kernels --build` compiles it now)" if entry["state"] == "pending" else ""
            print(f"{label}{kind}: {entry['where']}{gemm}{hint}")
    if info["env"]:
        print("env       " + " ".join(f"{k}={v}" for k, v in info["env"].items()))
    print(f"\nops, on small {info['dtype']} probe inputs (auto: the backend backend='auto' picks)")
    for op, by_device in info["ops"].items():
        for device, entry in by_device.items():
            print(f"  {op} on {device}: auto -> {entry['auto']}")
            for backend, reasons in entry["reasons"].items():
                print(f"    {backend:<10} {'yes' if not reasons else 'no: ' + '; '.join(reasons)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m retro_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--build", action="store_true",
                   help="compile the C++ CPU kernels now if they would compile on first use")
    p.add_argument("--measure-gemm", action="store_true",
                   help="run each op once at the paper's shapes on the CPU, so the GEMM choice is measured")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="dtype of the probe inputs")
    args = p.parse_args(argv)
    if args.build and _native.describe("cpu")["state"] == "pending":
        _native.build("cpu")
    info = collect(getattr(torch, args.dtype), args.measure_gemm)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_report(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
