"""An op made from its spec: the checked call, the pair of custom ops, their fakes and autograd.

`Op(spec)` registers two torch custom ops, retro_kernels::<name>_fwd and _bwd (their
arguments as in spec.py's contract, then the backend's name), with fake implementations
and autograd, so that every op works with autograd, torch.compile(fullgraph=True) and fake
tensors. Calling the `Op` checks the arguments, chooses the backend and runs it: the
reference is plain PyTorch, differentiated by autograd directly; a fused backend runs
through the custom ops, which call its forward and backward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import dispatch
from .._checks import check_backend, check_inputs
from . import sharding
from .spec import OpSpec

# Custom-op schema types of the spec's scalars (an int may be symbolic under torch.compile).
SCHEMA_TYPES = {int: "SymInt", float: "float"}


def schemas(spec: OpSpec) -> tuple[str, str]:
    """The schemas of spec's forward and backward custom ops."""
    scalars = "".join(f", {SCHEMA_TYPES[s.type]} {s.name}" for s in spec.scalars)
    inputs = f"Tensor q, Tensor k, Tensor v, Tensor? {spec.mask}"
    return (f"({inputs}{scalars}, str backend) -> (Tensor, Tensor)",
            f"(Tensor dout, {inputs}, Tensor out, Tensor lse{scalars}, str backend) -> (Tensor, Tensor, Tensor)")


def _save_for_backward(ctx, inputs, output):
    q, k, v, mask, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, out, lse)
    ctx.args = tuple(args)  # the scalars, in the spec's order, and the backend's name
    ctx.mark_non_differentiable(lse)


def _backward_fake(dout, q, k, v, mask, out, lse, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class Op:
    """The op that `spec` declares; `forward_op` and `backward_op` are its custom ops, which run
    `run_forward` and `run_backward`: the chosen backend's kernels, from its `kernels` table."""

    def __init__(self, spec: OpSpec):
        self.spec = spec
        forward_schema, backward_schema = schemas(spec)
        self.forward_op = torch.library.custom_op(
            f"retro_kernels::{spec.name}_fwd", self.run_forward, mutates_args=(), schema=forward_schema)
        self.backward_op = torch.library.custom_op(
            f"retro_kernels::{spec.name}_bwd", self.run_backward, mutates_args=(), schema=backward_schema)
        self.forward_op.register_fake(self.forward_fake)
        self.backward_op.register_fake(_backward_fake)
        self.forward_op.register_autograd(self.gradients, setup_context=_save_for_backward)
        dispatch.SPECS[spec.name] = spec  # for dispatch and for DTensor sharding strategies

    def scalars_by_name(self, values) -> dict:
        """The custom ops' scalars (in the spec's order, the one order they travel in) by name."""
        return dict(zip((s.name for s in self.spec.scalars), values, strict=True))

    def run_forward(self, q, k, v, mask, *args):
        *scalars, backend = args
        forward, _ = dispatch.kernels(backend, self.spec.name)
        return forward(q, k, v, mask, **self.scalars_by_name(scalars))

    def run_backward(self, dout, q, k, v, mask, out, lse, *args):
        *scalars, backend = args
        _, backward = dispatch.kernels(backend, self.spec.name)
        return backward(dout, q, k, v, mask, out, lse, **self.scalars_by_name(scalars))

    def forward_fake(self, q, k, v, mask, *args):
        return q.new_empty(q.shape), q.new_empty(self.spec.lse_shape(q.shape), dtype=torch.float32)

    def gradients(self, ctx, dout, _dlse):  # lse is not differentiable
        q, k, v, mask, out, lse = ctx.saved_tensors
        dq, dk, dv = self.backward_op(dout, q, k, v, mask, out, lse, *ctx.args)
        return (dq, dk, dv, None) + (None,) * len(ctx.args)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, backend: str, **scalars) -> Tensor:
        """The op's output: arguments checked, the backend chosen ("auto" or by name) and run."""
        spec = self.spec
        scalars = check_inputs(spec, q, k, v, mask, scalars)
        check_backend(backend, dispatch.BACKENDS)
        name = dispatch.select_backend(backend, spec.name, q.device, q=q, k=k, v=v, **{spec.mask: mask})
        if name == "reference":
            return sharding.per_rank(spec.reference)(q, k, v, **{spec.mask: mask}, **scalars)
        out, _ = self.forward_op(q, k, v, mask, **scalars, backend=name)
        return out
