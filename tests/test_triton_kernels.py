"""The Triton kernels' launch machinery: resources on real GPUs (compiled ahead of time), 64-bit
offsets, 1-D grids, refusals, autotuning, the backends' sweeps, and a backward with no work outside it."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import retro_kernels as rk
from retro_kernels import dispatch
from tolerances import assert_close_to_reference

triton = pytest.importorskip("triton")
from retro_kernels.triton import _common  # noqa: E402

from bench import kernels as bench_kernels  # noqa: E402

OPS = ("chunked_cross_attention", "neighbour_self_attention", "neighbour_cross_attention")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(
    DEVICE.type == "cpu" and not dispatch.triton_interpreting(), reason="triton needs a GPU or the interpreter")


def launchers(op):
    """The op's Triton (forward, backward): its entry in the backend's kernels table."""
    return dispatch.DECLARED["triton"].kernels[op]


def call(op, q, k, v, mask, backend="triton", chunk_size=4):
    if op == "chunked_cross_attention":
        return rk.chunked_cross_attention(q, k, v, chunk_size, neighbour_mask=mask, backend=backend)
    if op == "neighbour_self_attention":
        return rk.neighbour_self_attention(q, k, v, neighbour_mask=mask, backend=backend)
    return rk.neighbour_cross_attention(q, k, v, chunk_mask=mask, backend=backend)


def inputs(op, B=1, L=2, K=2, R=5, m=4, Hq=2, Hkv=1, D=16, dtype=torch.float32):
    """Random inputs; CCA has N = L * m + 1 tokens, neighbour cross-attention M = m keys per chunk."""
    kw = dict(device=DEVICE, dtype=dtype)
    if op == "chunked_cross_attention":
        q = torch.randn(B, L * m + 1, Hq, D, **kw)
        k, v = (torch.randn(B, L, K, R, Hkv, D, **kw) for _ in range(2))
        mask = torch.rand(B, L, K, R, device=DEVICE) > 0.3
    elif op == "neighbour_self_attention":
        q = torch.randn(B, L, K, R, Hq, D, **kw)
        k, v = (torch.randn(B, L, K, R, Hkv, D, **kw) for _ in range(2))
        mask = torch.rand(B, L, K, R, device=DEVICE) > 0.3
    else:
        q = torch.randn(B, L, K, R, Hq, D, **kw)
        k, v = (torch.randn(B, L, m, Hkv, D, **kw) for _ in range(2))
        mask = torch.rand(B, L, m, device=DEVICE) > 0.3
    return q, k, v, mask


def outputs_and_grads(op, q, k, v, mask, dout, backend, chunk_size):
    """Output and gradients, with q, k, v themselves as the leaves (views keep their strides)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = call(op, *leaves, mask, backend, chunk_size)
    return (out.detach(),) + torch.autograd.grad(out, leaves, dout)


def check_against_reference(op, q, k, v, mask, dout=None, chunk_size=4):
    dout = torch.randn(q.shape, device=q.device, dtype=q.dtype) if dout is None else dout
    got = outputs_and_grads(op, q, k, v, mask, dout, "triton", chunk_size)
    want32 = outputs_and_grads(op, q.float(), k.float(), v.float(), mask, dout.float(), "reference", chunk_size)
    want_lp = None
    if q.dtype != torch.float32:
        want_lp = outputs_and_grads(op, q, k, v, mask, dout, "reference", chunk_size)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_close_to_reference(f"{op} {name}", got[i], want32[i], None if want_lp is None else want_lp[i],
                                  factor=2.0 if i == 0 else 3.0)


# -- resources on sm_80 / sm_90, compiled ahead of time (no GPU needed) ----------------------

def test_resource_report_holds_the_targets_at_the_paper_shapes():
    """bf16, paper shapes, Hkv 16 and 4, D 64 and 128: no forward or backward config spills registers,
    every backward config autotuning may pick runs at least 2 CTAs per SM at D = 64 on sm_90."""
    from triton_aot import compile_report

    rows = compile_report(bench_kernels.paper_shapes(), "bf16", "sm90", configs="bwd")
    assert {r["op"] for r in rows} == set(OPS) and {r["direction"] for r in rows} == {"fwd", "bwd"}
    for r in rows:
        what = f"{r['op']} {r['direction']} Hkv={r['Hkv']} D={r['D']} {r['tiles']} stages={r['num_stages']}"
        assert r["spill_bytes"] == 0, f"{what} spills {r['spill_bytes']} bytes"
        assert r["smem_bytes"] <= bench_kernels.ARCHS["sm90"]["smem_per_block"], what
        if r["direction"] == "bwd" and r["D"] == 64:
            assert r["ctas_per_sm"] >= 2, f"{what}: {r['ctas_per_sm']} CTA/SM ({r['limited_by']})"


def test_kernels_compile_for_other_dtypes_head_dims_and_sm80():
    """fp16 at the paper shapes without spills; D = 40 and 80 (not powers of two), D = 256 in bf16
    and fp32 and m = 1 compile, within sm_80's shared memory where they must run there."""
    from triton_aot import compile_report

    rows = compile_report(bench_kernels.paper_shapes(kv_heads=(4,)), "fp16", "sm90", configs="default")
    assert rows and all(r["spill_bytes"] == 0 for r in rows)
    small = dict(B=1, N=256, m=64, K=2, R=128, Hq=4, Hkv=2)
    odd = [(op, dict(small, D=D)) for op in OPS for D in (40, 80)] + [
        ("chunked_cross_attention", dict(small, m=1, D=32))]
    assert len(compile_report(odd, "fp16", "sm90", configs="default")) >= 2 * len(odd)
    wide = [(op, dict(small, D=256)) for op in OPS]
    for dtype in ("bf16", "fp32"):
        for r in compile_report(wide, dtype, "sm80", configs="default"):
            assert r["smem_bytes"] <= bench_kernels.ARCHS["sm80"]["smem_per_block"], r


# -- 1-D grids and the launches they need --------------------------------------------------

class _RecordingKernel:
    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((grid, args, meta))


def test_launch_splits_grids_beyond_cudas_limit():
    kernel = _RecordingKernel()
    n = 2 * _common.MAX_GRID_X + 3
    config = _common.Config((("BLOCK_N", 32),), 4, 2)
    _common.launch(kernel, n, lambda pid_base: ("x", pid_base), dict(BLOCK_M=64), [config], key=())
    grids = [g for g, _, _ in kernel.launches]
    assert grids == [(_common.MAX_GRID_X,), (_common.MAX_GRID_X,), (3,)]
    assert [a[1] for _, a, _ in kernel.launches] == [0, _common.MAX_GRID_X, 2 * _common.MAX_GRID_X]
    assert kernel.launches[0][2] == dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


@pytest.mark.parametrize("op", OPS)
def test_many_heads_times_batch_launch_on_a_1d_grid(op):
    """B * H = 80,000 programs (more than grid y's 65,535): one grid dimension, every key set covered."""
    dims = dict(B=5000, N=1 if op == "chunked_cross_attention" else 64, m=64, K=2, R=128, Hq=16, Hkv=16, D=64)
    launches = bench_kernels.op_launches(op, dims, torch.float16)
    for direction, launched in launches.items():
        assert launched, direction
        for launch in launched:
            assert len(launch.grid) == 1 and 5000 * 16 <= launch.grid[0] <= _common.MAX_GRID_X, (direction, launch.grid)


# -- 64-bit offsets: index * stride past 2^31 elements, with every stride below it ---------------

BIG = 2**29 + 64  # index 4 along such a stride lies past 2^31 elements


@pytest.fixture(scope="module")
def huge_storages():
    """3.3e9 fp16 values and flags: on the CPU virtual memory, only the pages the views use are ever
    touched; on a GPU 10 GB of its memory."""
    n = 3_300_000_000
    return torch.empty(n, dtype=torch.float16, device=DEVICE), torch.empty(n, dtype=torch.bool, device=DEVICE)


def _spread(storage, offset, shape, big_dim, big):
    """A view of `shape` into `storage` at `offset` with random values: contiguous strides but `big` along big_dim."""
    strides, step = [0] * len(shape), 1
    for d in reversed(range(len(shape))):
        strides[d] = big if d == big_dim else step
        step *= 1 if d == big_dim else shape[d]
    view = storage.as_strided(shape, strides, offset)
    view.copy_(torch.rand(shape) > 0.3 if storage.dtype == torch.bool else torch.randn(shape, dtype=storage.dtype))
    return view


# op: q (and dout) shape, k and v shape, mask shape, and (dim, stride) of the big stride of each
SPREAD = {
    # q rows n * stride_qn (n up to 11), chunk u * stride_kl (u up to 2), m = 4
    "chunked_cross_attention": ((1, 12, 2, 16), (1, 3, 2, 3, 1, 16), (1, 3, 2, 3),
                                (1, 2**28 + 64), (1, 2**30 + 64), (1, 2**30 + 64)),
    # token r * stride_r (r up to 5) in q, k, v, mask
    "neighbour_self_attention": ((1, 1, 2, 6, 2, 16), (1, 1, 2, 6, 1, 16), (1, 1, 2, 6), (3, BIG), (3, BIG), (3, BIG)),
    # neighbour k * stride_qk (k up to 4), chunk token j * stride_km (j up to 5)
    "neighbour_cross_attention": ((1, 1, 5, 3, 2, 16), (1, 1, 6, 1, 16), (1, 1, 6), (2, BIG), (2, BIG), (2, BIG)),
}


@needs_triton
@pytest.mark.parametrize("op", OPS)
def test_offsets_past_2_to_the_31_elements(op, huge_storages):
    values, flags = huge_storages
    q_shape, kv_shape, m_shape, q_big, kv_big, m_big = SPREAD[op]
    q, dout = _spread(values, 0, q_shape, *q_big), _spread(values, 100_000, q_shape, *q_big)
    k, v = _spread(values, 200_000, kv_shape, *kv_big), _spread(values, 300_000, kv_shape, *kv_big)
    mask = _spread(flags, 0, m_shape, *m_big)
    reach = max(t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) for t in (q, k, v, dout))
    assert reach >= 2**31 and max(max(t.stride()) for t in (q, k, v, dout, mask)) < 2**31
    check_against_reference(op, q, k, v, mask, dout)


# -- each backward sweep, forced, on awkward shapes ----------------------------------------------

SWEEPS = {
    "rows": lambda bd: [_common._backward_pass("rows", False, 32, 16, bd)],
    "keys+dq": lambda bd: [_common._backward_pass("keys", True, 16, 16, bd)],
    "keys,dq": lambda bd: [_common._backward_pass("keys", False, 16, 16, bd),
                           _common._backward_pass("dq", False, 16, 16, bd)],
}
# "rows": at most 32 rows per key set; "keys+dq": one run of at most 16 keys; several tiles otherwise
SWEEP_SHAPES = {
    "rows": {"chunked_cross_attention": dict(K=2, R=13, m=5, Hq=2, Hkv=1, D=24),
             "neighbour_self_attention": dict(K=2, R=9, Hq=2, Hkv=1, D=24),
             "neighbour_cross_attention": dict(K=2, R=5, m=19, Hq=2, Hkv=1, D=24)},
    "keys+dq": {"chunked_cross_attention": dict(K=1, R=11, m=9, Hq=4, Hkv=2, D=24),
                "neighbour_self_attention": dict(K=2, R=13, Hq=4, Hkv=2, D=24),
                "neighbour_cross_attention": dict(K=2, R=5, m=9, Hq=4, Hkv=2, D=24)},
    "keys,dq": {"chunked_cross_attention": dict(K=2, R=19, m=7, Hq=4, Hkv=1, D=40),
                "neighbour_self_attention": dict(K=1, R=19, Hq=4, Hkv=1, D=40),
                "neighbour_cross_attention": dict(K=2, R=5, m=19, Hq=4, Hkv=1, D=40)},
}


@needs_triton
@pytest.mark.parametrize("sweep", list(SWEEPS))
@pytest.mark.parametrize("op", OPS)
def test_every_backward_sweep_matches_the_reference(op, sweep, monkeypatch):
    shape = SWEEP_SHAPES[sweep][op]
    plan = SWEEPS[sweep]
    monkeypatch.setattr(_common, "backward_plan",
                        lambda rows, run, n_runs, D, elem: plan(_common.block_d(D)))
    q, k, v, mask = inputs(op, L=2, **shape)
    mask[:, 0] = False  # a chunk / neighbour whose keys are all masked
    check_against_reference(op, q, k, v, mask, chunk_size=shape.get("m", 4))


# -- the backward runs no ATen arithmetic outside its kernels ----------------------------------

class _AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


ALLOCATIONS_AND_VIEWS = {"aten.empty.memory_format", "aten.view.dtype", "aten.detach.default",
                         "aten.unsqueeze.default", "aten.squeeze.dim"}


@pytest.mark.parametrize("op", OPS)
def test_backward_launcher_only_allocates(op, monkeypatch):
    launched = []
    monkeypatch.setattr(_common, "launch", lambda kernel, n, args, fixed, configs, key: launched.append(fixed))
    q, k, v, mask = inputs(op, m=4)
    dout, out = torch.randn_like(q), torch.randn_like(q)
    lse = torch.randn(q.shape[0], q.shape[-2], out[..., 0, 0].numel() // q.shape[0], device=DEVICE)
    scalars = dict(chunk_size=4, scale=0.25, start_pos=0) if op == "chunked_cross_attention" else dict(scale=0.25)
    with _AtenOps() as recorded:
        launchers(op)[1](dout, q, k, v, mask, out, lse, **scalars)
    assert launched and recorded.ops <= ALLOCATIONS_AND_VIEWS, recorded.ops - ALLOCATIONS_AND_VIEWS


# -- refusals, so that backend="auto" falls back instead of failing -----------------------------

@pytest.mark.parametrize("op", OPS)
def test_triton_refuses_what_it_cannot_run(op, monkeypatch):
    q, k, v, mask = inputs(op, D=264, dtype=torch.float32)
    reasons = dispatch.not_supported_reasons("triton", op, q=q, k=k, v=v, **_mask_kw(op, mask))
    assert any("head dim 264" in r for r in reasons)
    if DEVICE.type == "cpu":
        q, k, v, mask = inputs(op, dtype=torch.bfloat16)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert any("bfloat16" in r for r in dispatch.not_supported_reasons(
            "triton", op, q=q, k=k, v=v, **_mask_kw(op, mask)))
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert any("TRITON_INTERPRET=1" in r for r in dispatch.not_supported_reasons(
            "triton", op, q=q, k=k, v=v, **_mask_kw(op, mask)))


def _mask_kw(op, mask):
    return {"chunk_mask" if op == "neighbour_cross_attention" else "neighbour_mask": mask}


class _Props:
    def __init__(self, major, minor, smem, name="a GPU"):
        self.major, self.minor, self.shared_memory_per_block_optin, self.name = major, minor, smem, name


@pytest.mark.parametrize("props, refused", [
    (_Props(7, 5, 64 * 1024), "compute capability"),
    (_Props(8, 9, 99 * 1024), "shared memory"),
    (_Props(8, 0, 163 * 1024), None),
    (_Props(9, 0, 227 * 1024), None),
])
def test_triton_refuses_gpus_its_tiles_do_not_fit(props, refused, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reasons = dispatch.DECLARED["triton"].gpu_reasons(torch.device("cuda", 0))
    assert (refused is None and reasons == []) or (refused and any(refused in r for r in reasons)), reasons


# -- autotuning: one fixed config in the interpreter and for small launches ----------------------

def test_autotuning_only_for_large_gpu_launches(monkeypatch):
    monkeypatch.setattr(_common, "triton_interpreting", lambda: True)
    assert not _common.autotuning(10**6)
    monkeypatch.setattr(_common, "triton_interpreting", lambda: False)
    assert _common.autotuning(_common.AUTOTUNE_MIN_PROGRAMS)
    assert not _common.autotuning(_common.AUTOTUNE_MIN_PROGRAMS - 1)
    monkeypatch.setenv("RETRO_KERNELS_TRITON_AUTOTUNE", "0")
    assert not _common.autotuning(10**6)


def test_interpreter_launches_the_default_config_only():
    kernel = _RecordingKernel()
    configs = [_common.Config((("BLOCK_N", 64),), 4, 3), _common.Config((("BLOCK_N", 32),), 4, 2)]
    _common.launch(kernel, 10**6, lambda pid_base: (pid_base,), {}, configs, key=())
    assert [meta for _, _, meta in kernel.launches] == [dict(BLOCK_N=64, num_warps=4, num_stages=3)]


@pytest.mark.parametrize("rows, run, n_runs", [(64, 128, 2), (256, 128, 2), (128, 128, 1), (1024, 64, 1), (8, 3, 1)])
@pytest.mark.parametrize("D, elem", [(64, 2), (128, 2), (256, 2), (64, 4)])
def test_backward_configs_differ_only_in_pipeline_depth(rows, run, n_runs, D, elem):
    """The backward autotunes num_stages only: tiles and warps fix every sum's order (determinism)."""
    for fixed, configs in _common.backward_plan(rows, run, n_runs, D, elem):
        assert len({(c.meta, c.num_warps) for c in configs}) == 1 and len(configs) > 1
        assert fixed["BLOCK_M"] >= 16 and fixed["BLOCK_N"] >= 16
    sweeps = [fixed["SWEEP"] for fixed, _ in _common.backward_plan(rows, run, n_runs, D, elem)]
    assert sweeps in (["rows"], ["keys"], ["keys", "dq"])


@pytest.mark.parametrize("rows, run", [(64, 128), (256, 128), (128, 64), (8, 3)])
@pytest.mark.parametrize("D, elem", [(64, 2), (128, 2), (64, 4), (256, 2)])
def test_forward_candidates(rows, run, D, elem):
    fixed, configs = _common.forward_tiles(rows, run, D, elem)
    assert len(set(configs)) == len(configs)
    for c in configs:
        assert (c.num_warps == 8) == (fixed["BLOCK_M"] == 128 or _common.block_d(D) >= 256)
    pruned = _common.prune_by_smem(configs, lambda c: _common.forward_smem(fixed, c, elem), torch.device("cpu"))
    assert pruned[0] == configs[0]
    assert all(_common.forward_smem(fixed, c, elem) <= 227 * 1024 for c in pruned[1:])


# -- a device guard around every launch -----------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_inputs_on_another_gpu_than_the_current_one(op):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with torch.cuda.device(0):
        q, k, v, mask = (t.to("cuda:1") for t in inputs(op, dtype=torch.float16))
        check_against_reference(op, q, k, v, mask)
