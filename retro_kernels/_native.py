"""Loading the native extensions built from csrc/ (see setup.py and docs/native.md).

`retro_kernels._C_cpu` and `retro_kernels._C_cuda` are shared libraries that
register torch ops (namespaces `retro_kernels_cpu`, `retro_kernels_cuda`) when
loaded. They are optional: `load(kind)` returns the op namespace, or None and
`missing_reason(kind)` says why and how to build it.
"""
from __future__ import annotations

import importlib.util
import os
import threading

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the retro_kernels checkout "
    "(or `python setup.py build_ext --inplace`), without RETRO_KERNELS_NO_NATIVE=1"
)
_WHAT = {"cpu": "C++ CPU kernels", "cuda": "CUDA kernels"}

_lock = threading.Lock()
_loaded: dict[str, object] = {}
_errors: dict[str, str] = {}


def load(kind: str):
    """`torch.ops.retro_kernels_<kind>` once the extension is loaded, else None."""
    if kind not in _WHAT:
        raise ValueError(f"kind must be one of {tuple(_WHAT)}, got {kind!r}")
    with _lock:
        if kind in _loaded:
            return _loaded[kind]
        if kind in _errors:
            return None
        module = f"retro_kernels._C_{kind}"
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin or not os.path.exists(spec.origin):
            _errors[kind] = f"the {_WHAT[kind]} extension {module} is not built; {BUILD_HINT}"
            return None
        try:
            # Loading the library runs its TORCH_LIBRARY registrations.
            torch.ops.load_library(spec.origin)
        except OSError as e:
            _errors[kind] = (
                f"the {_WHAT[kind]} extension {module} failed to load ({e}); it may have been "
                f"built against another torch: rebuild it; {BUILD_HINT}"
            )
            return None
        namespace = getattr(torch.ops, f"retro_kernels_{kind}")
        _loaded[kind] = namespace
        return namespace


def missing_reason(kind: str) -> str | None:
    """Why `load(kind)` returns None (None when the extension is loaded)."""
    return None if load(kind) is not None else _errors[kind]
