"""Autograd for a fused op's pair of custom ops, shared by every op.

Every op registers two custom ops with the same layout:

    forward(q, k, v, mask, *args) -> (out, lse)
    backward(dout, q, k, v, mask, out, lse, *args) -> (dq, dk, dv)

where `mask` is an optional bool tensor and `args` are non-tensor arguments
(the last one the backend's name). The gradients flow to q, k and v only;
lse is the forward's softmax statistics, not differentiable.
"""
from __future__ import annotations


def register_fused_autograd(forward_op, backward_op) -> None:
    """Give `backward_op` its fake implementation and make it `forward_op`'s autograd."""

    @backward_op.register_fake
    def _backward_fake(dout, q, k, v, mask, out, lse, *args):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, mask, *args = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.args = tuple(args)
        ctx.mark_non_differentiable(lse)

    def backward(ctx, dout, _dlse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        dq, dk, dv = backward_op(dout, q, k, v, mask, out, lse, *ctx.args)
        return (dq, dk, dv, None) + (None,) * len(ctx.args)

    forward_op.register_autograd(backward, setup_context=setup_context)
