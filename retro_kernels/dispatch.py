"""Choosing a backend, and saying why the others were not used.

Each op has a plain-PyTorch "reference" and some fused backends. A fused
backend is a module `retro_kernels.<backend>.<op>` with three functions:

    not_supported_reasons(**inputs) -> list[str]   # empty when it can serve them
    forward(...)   -> (out, lse)                     # lse: fp32 softmax statistics
    backward(...)  -> gradients

`backend="auto"` tries the fused backends in the op's order for the input's
device and falls back to the reference; naming a backend that cannot serve
the input raises BackendNotSupported with its reasons, in the spirit of
xformers' `not_supported_reasons`.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

FUSED_BACKENDS = ("triton", "cpu", "cuda")
BACKENDS = ("auto", "reference") + FUSED_BACKENDS

# Tried in this order by backend="auto", by the device of the inputs.
AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}


class BackendNotSupported(ValueError):
    """The requested backend cannot run these inputs; the message says why."""


def load_backend(backend: str, op: str) -> ModuleType | None:
    """The module implementing `op` for `backend`, or None if it does not exist."""
    try:
        return importlib.import_module(f"retro_kernels.{backend}.{op}")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(f"retro_kernels.{backend}"):
            return None
        raise


def not_supported_reasons(backend: str, op: str, **inputs) -> list[str]:
    """Why `backend` cannot run `op` on `inputs` (empty list: it can)."""
    if backend == "reference":
        return []
    module = load_backend(backend, op)
    if module is None:
        return [f"retro_kernels has no {backend} implementation of {op}"]
    return list(module.not_supported_reasons(**inputs))


def select_backend(requested: str, op: str, device: torch.device, **inputs) -> str:
    """The backend that will run `op`: `requested`, or the best one for "auto"."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested != "auto":
        reasons = not_supported_reasons(requested, op, **inputs)
        if reasons:
            raise BackendNotSupported(
                f"backend={requested!r} cannot run {op} on these inputs: " + "; ".join(reasons)
            )
        return requested
    for candidate in AUTO_ORDER.get(device.type, ()):
        if not not_supported_reasons(candidate, op, **inputs):
            return candidate
    return "reference"


def explain(op: str, **inputs) -> dict[str, list[str]]:
    """For every backend, why it cannot run `op` on `inputs` ([] = it can)."""
    return {b: not_supported_reasons(b, op, **inputs) for b in ("reference",) + FUSED_BACKENDS}


# Shared reasons, used by the backend modules -------------------------------

def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_reasons(tensors: dict[str, torch.Tensor], max_head_dim: int = 256) -> list[str]:
    """Why the Triton kernels cannot run on these tensors."""
    reasons = []
    try:
        import triton  # noqa: F401
    except ImportError:
        reasons.append("triton is not installed (pip install triton)")
    first = next(iter(tensors.values()))
    if first.device.type != "cuda" and not triton_interpreting():
        reasons.append(
            f"triton needs CUDA tensors (got {first.device.type}); set TRITON_INTERPRET=1 "
            "before importing triton to run the kernels on the CPU, slowly"
        )
    if first.device.type != "cuda" and triton_interpreting() and first.dtype == torch.bfloat16:
        reasons.append("bfloat16 arithmetic is wrong under the Triton interpreter; use a GPU")
    head_dim = first.shape[-1]
    if head_dim > max_head_dim:
        reasons.append(f"head dim {head_dim} > {max_head_dim} does not fit the Triton kernels' tiles")
    return reasons
