"""What an op declares: its tensors and their layouts, its mask, its scalars, its softmax statistics.

Every op is one `OpSpec` (see retro_kernels/ops/<op>.py). Everything else about
the op is made from it, once, for all ops (retro_kernels/ops/_op.py): the argument
checks (retro_kernels/_checks.py), the pair of torch custom ops with their fake
implementations and autograd, and the calls into the backends.

Layouts are written as in docs/spec.md#notation-and-layouts, "(B, N, Hq, D)": dims that share a name
must have the same size in every tensor. By convention the query heads are Hq,
the key/value heads Hkv (Hq % Hkv == 0) and the head dim D.

Fused-backend contract. A fused backend implements an op with two functions,
their arguments in the spec's order:

    forward(q, k, v, mask, *scalars) -> (out, lse)
        q, k, v  fp32/fp16/bf16 (one dtype), any strides, laid out as the spec says
        mask     bool (True = a real token) in the spec's mask layout, or None
        scalars  the spec's scalars, checked; the scale already resolved
        out      q's shape and dtype, contiguous; rows with no real key are zeros
        lse      fp32, contiguous, the spec's `lse` layout: the natural-log
                 log-sum-exp of each query row's scaled scores; +inf for rows with no key

    backward(dout, q, k, v, mask, out, lse, *scalars) -> (dq, dk, dv)
        dout     q's shape, any strides; out, lse exactly as the same backend's forward returned them
        dq, dk, dv contiguous, the shapes and dtypes of q, k, v.
        Deterministic: no atomics, one owner per output element.

What inputs a backend can run is declared once per backend (retro_kernels/backend.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable


def dims_of(layout: str) -> tuple[str, ...]:
    """The dim names of a layout: "(B, N, Hq, D)" -> ("B", "N", "Hq", "D")."""
    return tuple(name.strip() for name in layout.strip("()").split(","))


@dataclasses.dataclass(frozen=True)
class Scalar:
    """A non-tensor argument of an op, given to every backend in the spec's order."""
    name: str
    type: type  # int or float
    minimum: int = 0  # ints: the smallest value allowed


# The softmax scale, an argument of every op: None (the default) means D ** -0.5.
SCALE = Scalar("scale", float)


def _no_check(dims: dict[str, int], scalars: dict[str, object]) -> None:
    """An op with no check beyond the shared ones."""


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One op: see the module doc.

    name: "chunked_cross_attention"; its custom ops are retro_kernels::<name>_fwd and _bwd.
    q, kv: the layouts of q and of k and v (k and v have one shape).
    mask, mask_layout: the mask's argument name and its layout (bool, True = a real token).
    scalars: the scalar arguments, in the order the custom ops and backends take them:
        ints (Scalar(name, int, minimum)) and SCALE, which every op has.
    lse: the layout of the fp32 softmax statistics, each dim a name of q's or a product
        of them: "(B, Hq, L*K*R)".
    reference: the plain-PyTorch specification, called as
        reference(q, k, v, <mask>=mask, <scalar>=value, ...).
    check(dims, scalars): what this op requires beyond the shared checks; raises
        ValueError naming the argument. dims holds the size of every named dim.
    """
    name: str
    q: str
    kv: str
    mask: str
    mask_layout: str
    scalars: tuple[Scalar, ...]
    lse: str
    reference: Callable
    check: Callable[[dict[str, int], dict[str, object]], None] = _no_check

    def __post_init__(self):
        if SCALE not in self.scalars or any(s.type is not int for s in self.scalars if s is not SCALE):
            raise TypeError(f"{self.name}: scalars are ints and SCALE (once), got {self.scalars}")

    def lse_shape(self, q_shape) -> tuple:
        """The shape of the softmax statistics of queries of shape q_shape."""
        size = dict(zip(dims_of(self.q), q_shape))
        return tuple(math.prod(size[name] for name in dim.split("*")) for dim in dims_of(self.lse))
