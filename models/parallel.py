"""Training on several processes: a (data x tensor parallel) mesh, DDP or FSDP2, attention heads split
over the tensor-parallel ranks (COLWISE / ROWWISE projections), activation checkpointing, torch.compile.
See docs/model.md, "Several processes and machines".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .errors import UsageError

ATTENTION_INPUTS = ("to_q", "to_k", "to_v", "self_q", "self_k", "self_v", "cross_q", "cross_k", "cross_v")
COLWISE = ATTENTION_INPUTS + ("up", "gate", "ff.0")
ROWWISE = ("to_out", "down", "self_out", "cross_out", "ff.2")


@dataclass
class Layout:
    """This process's place in the run: its share of the data (dp) and of the heads (tp)."""
    parallel: str = "ddp"
    tp: int = 1
    mesh: Optional[object] = None  # DeviceMesh ("dp", "tp"); None: one process
    dp_rank: int = 0
    dp_size: int = 1

    @property
    def dp_group(self):
        return None if self.mesh is None else self.mesh["dp"].get_group()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the data-parallel ranks."""
        if self.dp_size > 1:
            dist.all_reduce(value, group=self.dp_group)
        return value


def check_heads(cfg, tp: int) -> None:
    """UsageError naming --tp unless it divides every head count (grouped-query: whole groups per rank)."""
    heads = {"heads": cfg.n_heads, "kv-heads": getattr(cfg, "n_kv_heads", None) or cfg.n_heads,
             "encoder heads": cfg.encoder_heads or cfg.n_heads}
    bad = [f"{name} {n}" for name, n in heads.items() if n % tp]
    if bad:
        raise UsageError(f"--tp {tp} must divide the attention heads (the model has {', '.join(bad)})")


def check_layout(world: int, parallel: str, tp: int) -> None:
    """UsageError naming the flag unless ``world`` processes can form the layout."""
    if world % tp:
        raise UsageError(f"--tp {tp} must divide the number of processes ({world}; torchrun --nproc-per-node)")
    if parallel == "ddp" and world > tp > 1:
        raise UsageError(f"--tp {tp} with --parallel ddp: DDP replicates whole models; use --parallel fsdp")


def make_layout(world: int, rank: int, device: torch.device, parallel: str, tp: int) -> Layout:
    """The mesh of ``world`` processes: world / tp data-parallel rows of tp tensor-parallel ranks."""
    check_layout(world, parallel, tp)
    if world == 1:
        return Layout(parallel, tp)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    return Layout(parallel, tp, mesh, mesh["dp"].get_local_rank(), world // tp)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (every ModuleList's items): the units of sharding and recomputation."""
    return [b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m]


def split_heads(model: nn.Module, mesh) -> None:
    """Tensor parallelism: the trained projections named in COLWISE / ROWWISE split over ``mesh``'s ranks
    (a frozen base that a retrofit reads stays whole; FSDP shards it)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {}
    for name, module in model.named_modules():
        if (isinstance(module, nn.Linear) and module.weight.requires_grad
                and any(name.endswith("." + s) for s in COLWISE + ROWWISE)):
            plan[name] = ColwiseParallel() if any(name.endswith("." + s) for s in COLWISE) else RowwiseParallel()
    parallelize_module(model, mesh, plan)


def prepare(model: nn.Module, layout: Layout, device: torch.device, activation_checkpointing: bool = False,
            compile: bool = False) -> nn.Module:
    """Apply the layout to ``model`` (in place: tp, recomputation, compile, fsdp); what to call forward on."""
    if layout.tp > 1:
        split_heads(model, layout.mesh["tp"])
    for block in blocks(model):
        if activation_checkpointing:
            from torch.distributed._composable import checkpoint

            checkpoint(block)
        if compile:
            block.compile()
    if layout.mesh is None or layout.parallel == "ddp" and layout.dp_size == 1:
        return model
    if layout.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        cuda = device.type == "cuda"
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None,
                                      reduce_dtype=torch.float32 if cuda else None)
        for block in blocks(model):
            fully_shard(block, mesh=layout.mesh["dp"], mp_policy=policy)
        fully_shard(model, mesh=layout.mesh["dp"], mp_policy=policy)
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               process_group=layout.dp_group)


def clip_grad_norm(parameters, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ over plain and sharded (DTensor, any mesh) gradients; the total norm."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    squares = {}  # (mesh, placements) -> the local sum of squares
    for g in grads:
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        local = g.to_local() if isinstance(g, DTensor) else g
        squares[key] = squares.get(key, 0) + local.detach().float().square().sum()
    total = torch.zeros(())
    for key, s in squares.items():
        for dim, placement in enumerate(key[1] if key else ()):
            if placement.is_shard():  # replicated dims hold copies: only the shards add up
                dist.all_reduce(s, group=key[0].get_group(dim))
        total = total + s.cpu()
    norm = float(total.sqrt())
    scale = min(1.0, max_norm / (norm + 1e-6))
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return norm


def state_bytes(model: nn.Module, optimizer) -> dict:
    """Bytes this rank holds of the parameters, their gradients and the optimizer state."""
    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {"param_bytes": sum(map(local, params)),
            "grad_bytes": sum(local(p.grad) for p in params if p.grad is not None),
            "optimizer_bytes": sum(map(local, state))}
