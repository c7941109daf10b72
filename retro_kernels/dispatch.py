"""Choosing a backend, and saying why the others were not used.

Each op (retro_kernels/ops/spec.py) has a plain-PyTorch "reference" and the
fused backends, each declared once (retro_kernels/backend.py): `BACKEND` in
retro_kernels/triton, retro_kernels/cpu and retro_kernels/cuda/_support.py,
whose `kernels` table names each op's forward and backward. Choosing a backend
is plain lookups (torch.compile traces them).

`backend="auto"` tries the fused backends in the op's order for the input's
device and falls back to the reference; naming a backend that cannot serve
the input raises BackendNotSupported with its reasons, in the spirit of
xformers' `not_supported_reasons`.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import _native, cpu, triton
from .backend import Backend
from .cuda import _support as cuda
from .triton.interpreter import interpreting as triton_interpreting  # noqa: F401  (bench/, __main__)

FUSED_BACKENDS = ("triton", "cpu", "cuda")
BACKENDS = ("auto", "reference") + FUSED_BACKENDS

# Tried in this order by backend="auto", by the device of the inputs.
AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}

# Every fused backend's declaration, by name.
DECLARED: dict[str, Backend] = {b.name: b for b in (triton.BACKEND, cpu.BACKEND, cuda.BACKEND)}

# op name -> its spec (retro_kernels/ops/spec.py), noted by each op when it is defined.
SPECS: dict = {}


class BackendNotSupported(ValueError):
    """The requested backend cannot run these inputs; the message says why."""


def kernels(backend: str, op: str) -> tuple[Callable, Callable]:
    """(forward, backward) of `op` in the fused `backend` (a name Op.__call__ checked): its entry in
    the backend's `kernels` table."""
    declared = DECLARED[backend]
    why = declared.missing or (None if op in declared.kernels else f"retro_kernels has no {backend} "
                                                                    f"implementation of {op}")
    if why:
        raise BackendNotSupported(f"backend={backend!r} cannot run {op}: {why}")
    return declared.kernels[op]


def implemented_backends(op: str) -> list[str]:
    """The fused backends with kernels for `op` (they may still refuse inputs)."""
    return [b for b in FUSED_BACKENDS if op in DECLARED[b].kernels]


def not_supported_reasons(backend: str, op: str, **inputs) -> list[str]:
    """Why `backend` cannot run `op` on `inputs` (q, k, v and the op's mask by its name; [] = it can)."""
    if backend == "reference":
        return []
    if op not in SPECS:
        return [f"{op} is not a registered op"]
    return DECLARED[backend].not_supported_reasons(op, inputs["q"], inputs["k"])


def select_backend(requested: str, op: str, device: torch.device, **inputs) -> str:
    """The backend that will run `op`: `requested` (one of BACKENDS, checked by the caller), or
    the best one for "auto"."""
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
