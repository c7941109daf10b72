"""What a fused backend supports, declared once for every op it implements.

Each fused backend declares one `Backend` (retro_kernels/triton/__init__.py,
retro_kernels/cpu/__init__.py, retro_kernels/cuda/_support.py): the devices,
dtypes, head dims and GPUs its kernels take, and its `kernels`, a plain table
from op name to the (forward, backward) functions the op's custom ops call.
`Backend.not_supported_reasons` is derived from the declaration, plus the
backend's `limits` for what depends on sizes (launch grids) or on the
environment (the Triton interpreter): in the spirit of xformers' operator
attributes (supported dtypes, max head dim, compute capability) and its
`not_supported_reasons`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

DEVICE_WORDS = {"cuda": "CUDA", "cpu": "CPU"}


def _words(items) -> str:
    """("a", "b", "c") -> "a, b and c"."""
    items = [str(i).removeprefix("torch.") for i in items]
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else items[0]


def no_limits(q: torch.Tensor, k: torch.Tensor) -> list[str]:
    return []


@dataclasses.dataclass(frozen=True)
class NativeKernel:
    """One op of a native extension, torch.ops.<namespace>.<name>: `library()` gives the
    namespace when the kernel is first called (a library compiled on first use compiles then)."""
    library: Callable[[], object]
    name: str

    def __call__(self, *args, **scalars):
        return getattr(self.library(), self.name)(*args, **scalars)


def native_kernels(library: Callable[[], object]) -> dict[str, tuple[NativeKernel, NativeKernel]]:
    """The `kernels` table of a native extension: each op's ops <op>_fwd and <op>_bwd in the
    namespace library() gives (their schemas: csrc/cpu/op_schemas.h)."""
    return {
        "chunked_cross_attention": (NativeKernel(library, "chunked_cross_attention_fwd"),
                                    NativeKernel(library, "chunked_cross_attention_bwd")),
        "neighbour_self_attention": (NativeKernel(library, "neighbour_self_attention_fwd"),
                                     NativeKernel(library, "neighbour_self_attention_bwd")),
        "neighbour_cross_attention": (NativeKernel(library, "neighbour_cross_attention_fwd"),
                                      NativeKernel(library, "neighbour_cross_attention_bwd")),
    }


@dataclasses.dataclass(frozen=True)
class Backend:
    """A fused backend's declaration: what its kernels take, for every op.

    devices: the device types of the tensors it runs.
    dtypes: the dtypes of q, k and v it runs (the ops allow fp32, fp16, bf16).
    max_head_dim: the largest head dim D its tiles fit (None: any).
    min_compute_capability, min_shared_memory: what it needs of a CUDA device
        (shared memory per block, in bytes).
    missing: why its kernels cannot be used here at all (an extension not built,
        no GPU, triton not installed), or None.
    kernels: op name -> (forward, backward), called as the fused-backend contract
        says (retro_kernels/ops/spec.py), the scalars by name.
    limits(q, k): further reasons, for what depends on sizes or on the environment.
    """
    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    kernels: dict[str, tuple[Callable, Callable]]
    max_head_dim: Optional[int] = None
    min_compute_capability: Optional[tuple[int, int]] = None
    min_shared_memory: int = 0
    missing: Optional[str] = None
    limits: Callable[[torch.Tensor, torch.Tensor], list[str]] = no_limits

    def not_supported_reasons(self, op: str, q: torch.Tensor, k: torch.Tensor) -> list[str]:
        """Why this backend cannot run `op` on queries q and keys k ([] = it can)."""
        if op not in self.kernels:
            return [self.missing or f"retro_kernels has no {self.name} implementation of {op}"]
        reasons = [self.missing] if self.missing else []
        if q.device.type not in self.devices:
            devices = " or ".join(DEVICE_WORDS.get(d, d) for d in self.devices)
            reasons.append(f"the {self.name} backend needs {devices} tensors, got {q.device.type}")
        elif q.device.type == "cuda" and not self.missing:
            reasons += self.gpu_reasons(q.device)
        if q.dtype not in self.dtypes:
            reasons.append(f"the {self.name} backend runs {_words(self.dtypes)}, got {q.dtype}")
        head_dim = q.shape[-1]
        if self.max_head_dim is not None and head_dim > self.max_head_dim:
            reasons.append(f"head dim {head_dim} > {self.max_head_dim} does not fit the {self.name} kernels' tiles")
        return reasons + self.limits(q, k)

    def gpu_reasons(self, device: torch.device) -> list[str]:
        """Why this backend's kernels cannot run on the CUDA device `device`."""
        try:
            props = torch.cuda.get_device_properties(device.index if device.index is not None else 0)
        except (AssertionError, RuntimeError) as e:  # e.g. fake CUDA tensors on a machine without a GPU
            return [f"no CUDA device to run the {self.name} kernels on {device}: {' '.join(str(e).split())}"]
        need = self.min_compute_capability
        if need and (props.major, props.minor) < need:
            return [f"the {self.name} kernels need compute capability {need[0]}.{need[1]} or newer; "
                    f"{props.name} is {props.major}.{props.minor}"]
        smem = getattr(props, "shared_memory_per_block_optin", 0)
        if smem and smem < self.min_shared_memory:
            return [f"the {self.name} kernels' tiles need {self.min_shared_memory // 1024} KB of shared memory per "
                    f"block; {props.name} has {smem // 1024} KB"]
        return []
