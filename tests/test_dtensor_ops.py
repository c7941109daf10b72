"""The ops on DTensors: two real gloo processes under torchrun, each case compared with the
plain-tensor call on the same global inputs, forward and gradients, on every backend that
runs here; no collective runs inside the op (CommDebugMode), and bad placements are one-line errors.

One torchrun launch runs every case (this file is its worker); the test reads the cases rank 0 reports.
"""
import os
import subprocess
import sys
from pathlib import Path

import torch

import retro_kernels as rk
from retro_kernels import dispatch

OPS = ("chunked_cross_attention", "neighbour_self_attention", "neighbour_cross_attention")
# (placement kind on each mesh dim, with a mask): the mask replicated with heads, sharded with the batch
CASES = ((("heads",), True), (("batch",), True), (("replicate",), False), (("batch", "heads"), True))
B, HQ, HKV, D = 2, 4, 2, 8  # grouped-query heads: each rank keeps one group of 2 query heads
SCALARS = {"chunked_cross_attention": (4, 0.3, 0)}  # the custom ops' scalars: chunk_size, scale, start_pos


def cases(backend: str) -> tuple:
    """Triton's interpreter is slow: it runs the cases that shard the heads and the batch."""
    return CASES[::3] if backend == "triton" else CASES


def inputs(op: str, hkv: int = HKV) -> tuple:
    """Global q, k, v and mask of `op`, the same on every rank (seeded)."""
    g = torch.Generator().manual_seed(1)
    q_shape = (B, 8, HQ, D) if op == "chunked_cross_attention" else (B, 2, 2, 3, HQ, D)
    tokens = (B, 2, 4) if op == "neighbour_cross_attention" else (B, 2, 2, 3)  # the mask's layout
    q, k, v = (torch.randn(shape, generator=g) for shape in (q_shape, (*tokens, hkv, D), (*tokens, hkv, D)))
    return q, k, v, torch.rand(tokens, generator=g) > 0.3


def call(op: str, q, k, v, mask, backend: str):
    fn = getattr(rk, op)
    if op == "chunked_cross_attention":
        return fn(q, k, v, 4, neighbour_mask=mask, backend=backend)
    return fn(q, k, v, **{dispatch.SPECS[op].mask: mask}, backend=backend)


def check_case(mesh, op: str, backend: str, kinds: tuple[str, ...], masked: bool) -> None:
    """One call on DTensors placed `kinds` (one per mesh dim) against the plain call."""
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    from retro_kernels.ops.sharding import placement

    q, k, v, mask = inputs(op)
    mask = mask if masked else None
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    plain = [x.clone().requires_grad_() for x in (q, k, v)]
    want = call(op, *plain, mask, backend)
    (want * dout).sum().backward()

    def placements(role, ndim):
        return tuple(placement(kind, role, ndim) for kind in kinds)

    def place(x, role):
        return None if x is None else distribute_tensor(x, mesh, placements(role, x.ndim), src_data_rank=None)

    dq, dk, dv = (place(x, role).detach().requires_grad_() for x, role in zip((q, k, v), ("q", "kv", "kv")))
    dmask, weights = place(mask, "mask"), distribute_tensor(dout, mesh, [Replicate()] * mesh.ndim, src_data_rank=None)
    with CommDebugMode() as comms:  # nothing gathered, forward or backward
        out = call(op, dq, dk, dv, dmask, backend)
        (out * weights).sum().backward()  # the output's gradient arrives replicated
    assert comms.get_total_counts() == 0, comms.get_comm_counts()
    for got, expect, role in ((out, want, "q"), (dq.grad, plain[0].grad, "q"), (dk.grad, plain[1].grad, "kv"),
                              (dv.grad, plain[2].grad, "kv")):
        assert got.placements == placements(role, got.ndim), (got.placements, kinds, role)
        torch.testing.assert_close(got.full_tensor(), expect, atol=2e-5, rtol=1e-4)
    if backend != "reference" and len(kinds) > 1:  # the fused forward's lse (B, Hq, ...), placed like q
        forward = getattr(torch.ops.retro_kernels, f"{op}_fwd")
        _, lse = forward(dq, dk, dv, dmask, *SCALARS.get(op, (0.3,)), backend)
        assert lse.placements == placements("lse", lse.ndim), (lse.placements, kinds)
        torch.testing.assert_close(lse.full_tensor(), forward(q, k, v, mask, *SCALARS.get(op, (0.3,)), backend)[1])


def refusals(mesh, op: str) -> list[str]:
    """The one-line error of every unsupported placement tried (all must raise ValueError)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    def dt(x, *placements):
        return distribute_tensor(x, mesh, placements, src_data_rank=None)

    q, k, v, mask = inputs(op)
    _, k3, v3, _ = inputs(op, hkv=3)
    h = q.ndim - 2
    cases = [
        (dt(q, Shard(1)), dt(k, Shard(1)), dt(v, Shard(1)), None),                          # the sequence dim
        (dt(q, Shard(h)), dt(k, Replicate()), dt(v, Replicate()), None),                    # k not over heads
        (dt(q, Shard(0)), dt(k, Shard(0)), dt(v, Shard(0)), dt(mask, Replicate())),         # mask not with batch
        (dt(q, Shard(h)), dt(k, Shard(k.ndim - 2)), dt(v, Shard(k.ndim - 2)), dt(mask, Shard(0))),
        (dt(q, Replicate()), dt(k, Replicate()), DTensor.from_local(v, mesh, [Partial()]), None),
        (dt(q[..., :3, :], Shard(h)), dt(k3, Shard(k.ndim - 2)), dt(v3, Shard(k.ndim - 2)), None),  # 3 heads
        (dt(q, Replicate()), k, v, None),                                                   # plain among DTensors
        (dt(q, Shard(0)), dt(k, Shard(0)), dt(v, Shard(0)), dt(mask[:1], Shard(0))),        # global shapes checked
    ]
    errors = []
    for case in cases:
        try:
            call(op, *case, "reference")
        except ValueError as e:
            assert "\n" not in str(e), str(e)
            errors.append(str(e))
        else:
            raise AssertionError(f"{op}: no error for placements {[getattr(x, 'placements', x) for x in case]}")
    # the fused custom op checks its DTensor arguments too, when called directly
    try:
        getattr(torch.ops.retro_kernels, f"{op}_fwd")(*cases[1], *SCALARS.get(op, (0.3,)), "cpu")
    except Exception as e:  # DTensor dispatch may wrap it; the message is ours
        assert "k placed (Replicate(),)" in str(e), str(e)
    else:
        raise AssertionError(f"{op}_fwd ran on q over heads and k replicated")
    return errors


def backends(op: str) -> list[str]:
    """The backends that run `op` on these CPU inputs here."""
    probe = dict(zip(("q", "k", "v", dispatch.SPECS[op].mask), inputs(op)))
    fused = dispatch.implemented_backends(op)
    return ["reference"] + [b for b in fused if not dispatch.not_supported_reasons(b, op, **probe)]


def worker() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    report = print if dist.get_rank() == 0 else lambda *_, **__: None  # a failure on any rank fails the launch
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    data_x_heads = init_device_mesh("cpu", (1, dist.get_world_size()))  # a 2-D mesh: batch, then heads
    for op in OPS:
        for backend in backends(op):
            for kinds, masked in cases(backend):
                check_case(mesh if len(kinds) == 1 else data_x_heads, op, backend, kinds, masked)
                report(f"ok {op} {backend} {','.join(kinds)} mask={masked}", flush=True)
        for error in refusals(mesh, op):
            report(f"refused {op}: {error}", flush=True)
    dist.destroy_process_group()


def test_ops_on_dtensors_over_two_gloo_ranks():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = proc.stdout.splitlines()
    for op in OPS:
        for backend in backends(op):
            for kinds, masked in cases(backend):
                assert f"ok {op} {backend} {','.join(kinds)} mask={masked}" in lines, (op, backend, kinds)
        refused = [line for line in lines if line.startswith(f"refused {op}:")]
        assert len(refused) == 8
        mask_shape = f"must have shape {dispatch.SPECS[op].mask_layout} = {tuple(inputs(op)[3].shape)}, got (1, "
        for words in (mask_shape, "q placed (Shard(dim=1),)", "k placed (Replicate(),)", "v placed (Partial(sum),)",
                      f"{dispatch.SPECS[op].mask} placed", "k has 3 key/value heads", "k must be a DTensor like q"):
            assert any(words in line for line in refused), (op, words, refused)


if __name__ == "__main__":
    worker()
