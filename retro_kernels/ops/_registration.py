"""Backend choice that `torch.compile(fullgraph=True)` can trace.

`dispatch.select_backend` finds a backend's module with
`importlib.import_module`, which Dynamo refuses to trace, so an op that calls
it inside a compiled function breaks the graph (and fails under
fullgraph=True). `preload_backends(op)` imports the fused backend modules of
`op` once, eagerly, when the op's module is imported; `select_backend` then
makes exactly dispatch's choice, with dispatch's messages, from the preloaded
modules: plain dict lookups and calls of `not_supported_reasons`, which
Dynamo traces (and guards on) like any Python code.

Outside torch.compile it simply calls `dispatch.select_backend`.
"""
from __future__ import annotations

from types import ModuleType

import torch

from .. import dispatch

# (backend, op) -> the backend's module, or None when it does not exist / cannot be imported
_MODULES: dict[tuple[str, str], ModuleType | None] = {}
_IMPORT_ERRORS: dict[tuple[str, str], str] = {}


def preload_backends(op: str) -> None:
    """Import every fused backend module of `op` now (outside any compiled region)."""
    for backend in dispatch.FUSED_BACKENDS:
        try:
            _MODULES[(backend, op)] = dispatch.load_backend(backend, op)
        except ImportError as e:  # e.g. triton not installed: that backend is unusable
            _MODULES[(backend, op)] = None
            _IMPORT_ERRORS[(backend, op)] = f"{backend} backend of {op} cannot be imported: {e}"


def _reasons(backend: str, op: str, **inputs) -> list[str]:
    if backend == "reference":
        return []
    module = _MODULES.get((backend, op))
    if module is None:
        return [_IMPORT_ERRORS.get((backend, op), f"retro_kernels has no {backend} implementation of {op}")]
    return list(module.not_supported_reasons(**inputs))


def select_backend(requested: str, op: str, device: torch.device, **inputs) -> str:
    """`dispatch.select_backend`, also inside torch.compile(fullgraph=True)."""
    if not torch.compiler.is_compiling():
        return dispatch.select_backend(requested, op, device, **inputs)
    if requested not in dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {dispatch.BACKENDS}, got {requested!r}")
    if requested != "auto":
        reasons = _reasons(requested, op, **inputs)
        if reasons:
            raise dispatch.BackendNotSupported(
                f"backend={requested!r} cannot run {op} on these inputs: " + "; ".join(reasons)
            )
        return requested
    for candidate in dispatch.AUTO_ORDER.get(device.type, ()):
        if not _reasons(candidate, op, **inputs):
            return candidate
    return "reference"
