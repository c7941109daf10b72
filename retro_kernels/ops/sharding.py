"""DTensor inputs: every op runs on each rank's shard of its inputs and never gathers them.

On each dim of their device mesh the tensors of a call are placed one of three ways,
read from q's placement, and the output is placed as q is:
    batch      Shard(0): q, k, v and the mask (every layout starts with B);
    heads      q, k and v Shard(-2) (every layout ends with (heads, D)), the mask Replicate();
               each rank keeps whole groups of grouped-query heads, so k's heads must divide
               by the number of head shards;
    replicate  every tensor Replicate().
Anything else (Shard on another dim, Partial, k placed unlike q, a plain tensor among
DTensors) is a one-line ValueError naming the argument and its placement: nothing is
gathered or redistributed behind the caller's back. The fused backends run through their
custom ops, for which sharding strategies are registered here, so that DTensor dispatch
calls each rank's forward and backward kernels; the reference runs on the local tensors.
"""
from __future__ import annotations

import functools
import math
import sys
from typing import Callable

import torch


def distributed_types() -> tuple:
    """DTensor, and the DTensorSpec that strategies get; () until torch.distributed.tensor is
    imported, as no DTensor exists before (so that importing the ops does not import it)."""
    if "torch.distributed.tensor" not in sys.modules:
        return ()
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._dtensor_spec import DTensorSpec
    return DTensor, DTensorSpec


def placement(kind: str, role: str, ndim: int):
    """The placement, on a mesh dim of `kind`, of a tensor of `role` ("q", "kv", "mask", "lse")."""
    from torch.distributed.tensor import Replicate, Shard

    if kind == "replicate" or (kind == "heads" and role == "mask"):
        return Replicate()
    if kind == "batch":
        return Shard(0)
    return Shard(1 if role == "lse" else ndim - 2)  # lse is (B, Hq, ...)


def _kind(p, ndim: int) -> str | None:
    from torch.distributed.tensor import Replicate, Shard

    if type(p) is Replicate:
        return "replicate"
    if type(p) is Shard and p.dim % ndim in (0, ndim - 2):
        return "batch" if p.dim % ndim == 0 else "heads"
    return None


def check_placements(q, k, v, mask, mask_name: str) -> tuple[str, ...] | None:
    """How the call is distributed, a kind per mesh dim (None: plain tensors); ValueError if unsupported."""
    tensors = {"q": q, "k": k, "v": v, mask_name: mask}
    dist = {name: x for name, x in tensors.items() if isinstance(x, distributed_types())}
    if not dist:
        return None
    register_strategies()
    first = next(iter(dist))
    for name, x in tensors.items():
        if x is not None and name not in dist:
            raise ValueError(f"{name} must be a DTensor like {first}, got a {type(x).__name__}")
        if x is not None and x.device_mesh != q.device_mesh:
            raise ValueError(f"{name} is on device mesh {x.device_mesh} but q is on {q.device_mesh}")
    kinds = tuple(_kind(p, q.ndim) for p in q.placements)
    if None in kinds:
        raise ValueError(f"q placed {tuple(q.placements)} is not supported: on each mesh dim shard q "
                         f"over the batch (Shard(0)) or heads (Shard({q.ndim - 2})), or replicate it")
    for name, x in dist.items():
        role = "q" if name == "q" else "mask" if name == mask_name else "kv"
        want = tuple(placement(kind, role, x.ndim) for kind in kinds)
        if any(type(a) is not type(b) or a != b for a, b in zip(x.placements, want)):
            raise ValueError(f"{name} placed {tuple(x.placements)} is not supported with q placed "
                             f"{tuple(q.placements)} ({', '.join(kinds)}): place {name} {want}")
    shards = math.prod(q.device_mesh.size(i) for i, kind in enumerate(kinds) if kind == "heads")
    if k.shape[-2] % shards:
        raise ValueError(f"k has {k.shape[-2]} key/value heads, which do not split into whole groups over "
                         f"{shards} head shards: shard heads over a mesh whose size divides {k.shape[-2]}")
    return kinds


def _strategies(kinds, roles: tuple[str, ...], outputs: tuple[str, ...], tensors, n_args: int) -> list:
    """register_sharding's (output placements, input placements) for the kinds q is placed in."""
    ndim = {role: t.ndim for role, t in zip(roles, tensors) if t is not None}
    return [([placement(kind, r, ndim.get(r, 0)) for r in outputs],
             [None if t is None else placement(kind, r, t.ndim) for r, t in zip(roles, tensors)]
             + [None] * (n_args - len(tensors)))
            for kind in dict.fromkeys(kinds)]


@functools.cache
def register_strategies() -> None:
    """Sharding strategies for every op's custom ops retro_kernels::<name>_fwd and _bwd.

    They keep every input where it is (no redistribution), except the backward's incoming
    gradient, which DTensor places like the forward's output (as autograd does)."""
    from torch.distributed.tensor.experimental import register_sharding

    from .. import dispatch  # every op's spec, noted as each op is defined
    for spec in dispatch.SPECS.values():
        def forward(q, k, v, mask, *args, spec=spec):
            kinds = check_placements(q, k, v, mask, spec.mask)
            return _strategies(kinds, ("q", "kv", "kv", "mask"), ("q", "lse"), (q, k, v, mask), 4 + len(args))

        def backward(dout, q, k, v, mask, out, lse, *args, spec=spec):
            kinds = check_placements(q, k, v, mask, spec.mask)
            return _strategies(kinds, ("q", "q", "kv", "kv", "mask", "q", "lse"), ("q", "kv", "kv"),
                               (dout, q, k, v, mask, out, lse), 7 + len(args))

        register_sharding(getattr(torch.ops.retro_kernels, f"{spec.name}_fwd").default)(forward)
        register_sharding(getattr(torch.ops.retro_kernels, f"{spec.name}_bwd").default)(backward)


def per_rank(reference: Callable) -> Callable:
    """`reference`, run on each rank's local tensors when q is a DTensor (placements checked before)."""
    @functools.wraps(reference)
    def run(q, k, v, **kwargs):
        if not isinstance(q, distributed_types()):
            return reference(q, k, v, **kwargs)
        local = {name: getattr(x, "to_local", lambda: x)() for name, x in kwargs.items()}
        out = reference(q.to_local(), k.to_local(), v.to_local(), **local)
        return type(q).from_local(out, q.device_mesh, q.placements, shape=q.shape,
                                  stride=torch.empty(q.shape, device="meta").stride())
    return run
