"""What a fused backend supports, declared once for every op it implements.

Each fused backend declares one `Backend` (retro_kernels/triton/__init__.py,
retro_kernels/cpu/__init__.py, retro_kernels/cuda/_support.py): the devices,
dtypes, head dims, mask kinds and GPUs its kernels take, and how to find an
op's kernels. `Backend.not_supported_reasons` is derived from the declaration,
plus the backend's `limits` for what depends on sizes (launch grids) or on the
environment (the Triton interpreter): in the spirit of xformers' operator
attributes (supported dtypes, max head dim, bias types, compute capability)
and its `not_supported_reasons`.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Optional

import torch

DEVICE_WORDS = {"cuda": "CUDA", "cpu": "CPU"}


def _words(items) -> str:
    """("a", "b", "c") -> "a, b and c"."""
    items = [str(i).removeprefix("torch.") for i in items]
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else items[0]


def mask_kind(mask: Optional[torch.Tensor]) -> str:
    """The kind of an op's mask: "none" when absent, else "bool" (True = a real token)."""
    return "none" if mask is None else "bool"


def launcher_module(backend: "Backend", op: str) -> tuple[Callable, Callable]:
    """The op's kernels as Python launchers: forward and backward of retro_kernels.<backend>.<op>."""
    module = importlib.import_module(f"retro_kernels.{backend.name}.{op}")
    return module.forward, module.backward


def extension_functions(backend: "Backend", op: str) -> tuple[Callable, Callable]:
    """The op's kernels in a native extension: its functions <op>_fwd and <op>_bwd.

    They take the custom ops' arguments as they are (the contract in retro_kernels/ops/spec.py).
    """
    return getattr(backend.library, f"{op}_fwd"), getattr(backend.library, f"{op}_bwd")


def no_limits(q: torch.Tensor, k: torch.Tensor) -> list[str]:
    return []


@dataclasses.dataclass(frozen=True)
class Backend:
    """A fused backend's declaration: what its kernels take, for every op.

    devices: the device types of the tensors it runs.
    dtypes: the dtypes of q, k and v it runs (the ops allow fp32, fp16, bf16).
    max_head_dim: the largest head dim D its tiles fit (None: any).
    gqa: whether q may have more heads than k and v (grouped-query, multi-query).
    mask_kinds: the kinds of mask it takes (see `mask_kind`).
    min_compute_capability, min_shared_memory: what it needs of a CUDA device
        (shared memory per block, in bytes).
    missing: why its kernels cannot be used here at all (an extension not built,
        no GPU), or None.
    ops: the ops it has kernels for; None: every op whose kernels `load` finds.
    library: a native backend's extension (its torch.ops namespace), or None.
    load(backend, op): the op's (forward, backward); raises ImportError when a
        backend with ops=None has no kernels for the op.
    limits(q, k): further reasons, for what depends on sizes or on the environment.
    """
    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: Optional[int] = None
    gqa: bool = True
    mask_kinds: tuple[str, ...] = ("none", "bool")
    min_compute_capability: Optional[tuple[int, int]] = None
    min_shared_memory: int = 0
    missing: Optional[str] = None
    ops: Optional[tuple[str, ...]] = None
    library: object = None
    load: Callable[["Backend", str], tuple[Callable, Callable]] = launcher_module
    limits: Callable[[torch.Tensor, torch.Tensor], list[str]] = no_limits

    def not_supported_reasons(self, q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor]) -> list[str]:
        """Why this backend cannot run an op on queries q, keys k and this mask ([] = it can)."""
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
        if not self.gqa and q.shape[-2] != k.shape[-2]:
            reasons.append(f"the {self.name} backend needs as many query heads as key/value heads, "
                           f"got {q.shape[-2]} and {k.shape[-2]}")
        if mask_kind(mask) not in self.mask_kinds:
            reasons.append(f"the {self.name} backend takes masks of kinds {self.mask_kinds}, got {mask_kind(mask)}")
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

    def unimplemented(self, op: str) -> Optional[str]:
        """Why this backend has no kernels for `op` (None: it has)."""
        if self.ops is not None:  # declared: a library that compiles on first use is not touched
            return None if op in self.ops else f"retro_kernels has no {self.name} implementation of {op}"
        try:
            self.load(self, op)
        except ModuleNotFoundError as e:
            if e.name and f"retro_kernels.{self.name}.{op}".startswith(e.name):
                return f"retro_kernels has no {self.name} implementation of {op}"
            return f"{e.name} is not installed"
        except ImportError as e:
            return f"the {self.name} backend failed to import: {e}"
        return None
