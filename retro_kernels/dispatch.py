"""Choosing a backend, and saying why the others were not used.

Each op has a plain-PyTorch "reference" and some fused backends. A fused
backend is a module `retro_kernels.<backend>.<op>` with three functions
(imported once, by `register_op`, when the op is defined):

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

from . import _native

FUSED_BACKENDS = ("triton", "cpu", "cuda")
BACKENDS = ("auto", "reference") + FUSED_BACKENDS

# Tried in this order by backend="auto", by the device of the inputs.
AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}


class BackendNotSupported(ValueError):
    """The requested backend cannot run these inputs; the message says why."""


# (backend, op) -> the backend's module, or why it could not be imported.
# Filled once per op by `register_op`, when the op's module is imported, so
# that choosing a backend later is plain lookups (torch.compile traces those).
_MODULES: dict[tuple[str, str], ModuleType | str] = {}


def register_op(op: str) -> None:
    """Import every fused backend of `op` that exists, recording why others can't be used."""
    for backend in FUSED_BACKENDS:
        name = f"retro_kernels.{backend}.{op}"
        try:
            _MODULES[backend, op] = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                _MODULES[backend, op] = f"retro_kernels has no {backend} implementation of {op}"
            else:
                _MODULES[backend, op] = f"{e.name} is not installed"
        except ImportError as e:
            _MODULES[backend, op] = f"the {backend} backend failed to import: {e}"


def load_backend(backend: str, op: str) -> ModuleType:
    """The module implementing `op` for `backend` (it must have imported)."""
    module = _MODULES.get((backend, op))
    if not isinstance(module, ModuleType):
        raise BackendNotSupported(f"backend={backend!r} cannot run {op}: {module}")
    return module


def implemented_backends(op: str) -> list[str]:
    """The fused backends whose implementation of `op` imported (they may still refuse inputs)."""
    return [b for b in FUSED_BACKENDS if isinstance(_MODULES.get((b, op)), ModuleType)]


def not_supported_reasons(backend: str, op: str, **inputs) -> list[str]:
    """Why `backend` cannot run `op` on `inputs` (empty list: it can)."""
    if backend == "reference":
        return []
    module = _MODULES.get((backend, op), f"{op} is not a registered op")
    if not isinstance(module, ModuleType):
        return [module]
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
    reasons = {}
    for candidate in AUTO_ORDER.get(device.type, ()):
        reasons[candidate] = not_supported_reasons(candidate, op, **inputs)
        if not reasons[candidate]:
            return candidate
    if reasons:
        _native.warn_reference_fallback(op, device.type, reasons)
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
    if first.device.type == "cuda":
        reasons += _triton_gpu_reasons(first.device)
    return reasons


# The Triton kernels' tiles are sized for sm_80 and newer data-centre GPUs: 163 KB of shared memory per block.
TRITON_MIN_CAPABILITY = (8, 0)
TRITON_MIN_SHARED_MEMORY = 163 * 1024


def _triton_gpu_reasons(device: torch.device) -> list[str]:
    try:
        props = torch.cuda.get_device_properties(device.index if device.index is not None else 0)
    except (AssertionError, RuntimeError) as e:  # e.g. fake CUDA tensors on a machine without a GPU
        return [f"no CUDA device to run the Triton kernels on {device}: {' '.join(str(e).split())}"]
    if (props.major, props.minor) < TRITON_MIN_CAPABILITY:
        return [f"the Triton kernels need compute capability 8.0 or newer; {props.name} is {props.major}.{props.minor}"]
    smem = getattr(props, "shared_memory_per_block_optin", 0)
    if smem and smem < TRITON_MIN_SHARED_MEMORY:
        return [f"the Triton kernels' tiles need {TRITON_MIN_SHARED_MEMORY // 1024} KB of shared memory per "
                f"block; {props.name} has {smem // 1024} KB"]
    return []
