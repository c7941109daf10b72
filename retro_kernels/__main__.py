"""`python -m retro_kernels`: what this installation can run, and why not the rest.

Versions, devices, where the native libraries come from (and the CPU GEMM in use; `--measure-gemm` times
the candidates first), the Triton mode, and each op and backend on small probe inputs per device with the
dispatch's own reasons (README, "What this installation can run"). It compiles nothing unless asked (`--build`).
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
from retro_kernels.cpu.gemm import cpu_description, gemm_info

OPS = ("chunked_cross_attention", "neighbour_self_attention", "neighbour_cross_attention")
ENV_VARS = ("TRITON_INTERPRET", "RETRO_KERNELS_NO_JIT", "RETRO_KERNELS_CACHE", "RETRO_KERNELS_CPU_GEMM", "CXX")


def probe_inputs(op: str, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Small inputs of `op` (the keyword arguments of its backends' not_supported_reasons)."""
    neighbours, chunk = (1, 2, 2, 4, 2, 16), (1, 2, 3, 2, 16)  # B L K R H D; B L M H D
    q = torch.zeros((1, 16, 2, 16) if op == "chunked_cross_attention" else neighbours, device=device, dtype=dtype)
    kv = torch.zeros(chunk if op == "neighbour_cross_attention" else neighbours, device=device, dtype=dtype)
    mask = "chunk_mask" if op == "neighbour_cross_attention" else "neighbour_mask"
    return {"q": q, "k": kv, "v": kv, mask: torch.ones(kv.shape[:-2], dtype=torch.bool, device=device)}


def first_line(command: list[str], pick: str = "") -> str | None:
    """The first line of a tool's output (containing `pick`), or None when it cannot run."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.strip() for line in out.splitlines() if pick in line and line.strip()), None)


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


def devices() -> dict:
    d = cpu_description()
    cuda = [f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
            for i, p in enumerate(map(torch.cuda.get_device_properties, range(torch.cuda.device_count())))]
    if not torch.cuda.is_available():
        cuda = [f"none ({'torch has no CUDA' if not torch.version.cuda else 'no CUDA device visible'})"]
    flags = "; " + " ".join(d["flags"]) if d["flags"] else ""
    return {"cpu": f"{d['cpu_model']} ({torch.get_num_threads()} torch threads{flags})", "cuda": cuda}


def native_report(measure_gemm: bool) -> dict:
    """Where each native library comes from; for the loaded C++ CPU kernels, the GEMM chosen per shape
    class by timing the candidates on first use (`measure_gemm`: each op runs once at the paper's shapes)."""
    report = {kind: _native.describe(kind) for kind in ("cpu", "cuda")}
    if report["cpu"]["state"] == "loaded":
        info = gemm_info(calibrate=measure_gemm)
        report["cpu"]["gemm"] = {k: info.get(k, []) for k in ("summary", "candidates", "mode", "classes")}
    return report


def op_report(device: str, op: str, dtype: torch.dtype) -> dict:
    inputs = probe_inputs(op, device, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _native.FallbackWarning)
        auto = dispatch.select_backend("auto", op, torch.device(device), **inputs)
    return {"auto": auto, "reasons": retro_kernels.explain(op, **inputs)}


def collect(dtype: torch.dtype, measure_gemm: bool = False) -> dict:
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    cxx = os.environ.get("CXX", "c++").split()[0]
    return {
        "retro_kernels": {"version": retro_kernels.__version__, "path": os.path.dirname(retro_kernels.__file__)},
        "python": f"{platform.python_version()} ({sys.executable}), {platform.system()} {platform.machine()}",
        "torch": f"{torch.__version__} ({f'CUDA {torch.version.cuda}' if torch.version.cuda else 'no CUDA'})",
        "triton": {"version": version_of("triton"), "mode": triton_mode()},
        "compiler": {"c++": first_line([cxx, "--version"]) or f"not found ({cxx})",
                     "ninja": first_line(["ninja", "--version"]) or version_of("ninja"),
                     "nvcc": first_line([nvcc, "--version"], "release") or "not found"},
        "devices": devices(),
        "native": native_report(measure_gemm),
        "ops": {op: {device: op_report(device, op, dtype) for device in ["cpu"] + ["cuda"] * torch.cuda.is_available()}
                for op in OPS},
        "dtype": str(dtype).removeprefix("torch."),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def native_line(kind: str, entry: dict) -> str:
    if entry["state"] in ("missing", "failed"):
        return f"{kind}: not available: {entry['reason']}"
    line = f"{kind}: {entry['where']}"
    if "gemm" in entry:
        g = entry["gemm"]
        line += f"; GEMM: {g['summary']} (candidates: {', '.join(g['candidates']) or 'none'})"
        line += "; --measure-gemm times them now" if g["mode"] == "measured" and not g["classes"] else ""
    return line + (" (`python -m retro_kernels --build` compiles it now)" if entry["state"] == "pending" else "")


def print_report(info: dict) -> None:
    c, rk = info["compiler"], info["retro_kernels"]
    print(f"retro_kernels {rk['version']}  {rk['path']}\npython    {info['python']}\ntorch     {info['torch']}")
    print(f"triton    {info['triton']['version'] or 'not installed'}: {info['triton']['mode']}")
    print(f"compiler  c++: {c['c++']}; ninja {c['ninja'] or 'not found'}; nvcc: {c['nvcc']}")
    print(f"devices   cpu: {info['devices']['cpu']}" + "".join(f"\n          cuda: {d}" for d in info["devices"]["cuda"]))
    print(f"native    {native_line('cpu', info['native']['cpu'])}\n          {native_line('cuda', info['native']['cuda'])}")
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
    p.add_argument("--build", action="store_true", help="compile the C++ CPU kernels now if they would compile on first use")
    p.add_argument("--measure-gemm", action="store_true",
                   help="run each op once at the paper's shapes on the CPU, so the GEMM choice is measured")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="dtype of the probe inputs")
    args = p.parse_args(argv)
    if args.build and _native.describe("cpu")["state"] == "pending":
        _native.build("cpu")
    info = collect(getattr(torch, args.dtype), args.measure_gemm)
    print(json.dumps(info, indent=2)) if args.json else print_report(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
