"""Which fused backends the tests exercise: found one way, by asking dispatch.

Every fused backend is tested in every dtype it declares (retro_kernels/backend.py),
and runs wherever it can: Triton on a GPU or under the interpreter, the C++ CPU
kernels when the extension is built, CUDA on a GPU. A pair that cannot run here is
skipped with dispatch's reasons. Each backend is tested on its own device: CUDA
tensors where it takes them and a GPU is here, else CPU tensors.
"""
from __future__ import annotations

import functools

import torch

from retro_kernels import dispatch
from retro_kernels.ops.spec import dims_of

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def spec_of(op: str):
    import retro_kernels  # noqa: F401  (defines the ops, registering their specs)

    return dispatch.SPECS[op]


def device_of(backend: str) -> torch.device:
    """The device a backend's tests put their tensors on."""
    if torch.cuda.is_available() and "cuda" in dispatch.DECLARED[backend].devices:
        return torch.device("cuda")
    return torch.device("cpu")


def probe_inputs(op: str, device, dtype) -> dict:
    """Small inputs of `op`, for asking the backends about (q, k, v and the op's mask, by name)."""
    spec = spec_of(op)
    size = {"D": 16}
    q = torch.zeros([size.get(d, 2) for d in dims_of(spec.q)], device=device, dtype=dtype)
    k = torch.zeros([size.get(d, 2) for d in dims_of(spec.kv)], device=device, dtype=dtype)
    return {"q": q, "k": k, "v": k, spec.mask: None}


@functools.cache
def why_not(op: str, backend: str, dtype) -> tuple[str, ...]:
    """Why `backend` cannot run `op` in `dtype` here, on device_of(backend) (empty: it can)."""
    return tuple(dispatch.not_supported_reasons(backend, op, **probe_inputs(op, device_of(backend), dtype)))


def declared(op: str) -> tuple[tuple[str, torch.dtype], ...]:
    """(backend, dtype) for every fused backend with kernels for `op`, in every dtype it declares:
    the tests' parametrisation (a pair that cannot run here is skipped, saying why_not)."""
    return tuple((b, dtype) for b in dispatch.implemented_backends(op) for dtype in DTYPES
                 if dtype in dispatch.DECLARED[b].dtypes)


def runnable(op: str) -> tuple[tuple[str, torch.dtype], ...]:
    """The declared pairs that can run `op` here."""
    return tuple((b, dtype) for b, dtype in declared(op) if not why_not(op, b, dtype))


def fused_backends(op: str, dtype=torch.float32, device=DEVICE) -> list[str]:
    """The fused backends that run `op` on `device` in `dtype` (for the layers' tests)."""
    return [b for b, d in runnable(op) if d == dtype and device_of(b) == torch.device(device)]
