"""CPU micro-benchmarks with pytest-benchmark: `pytest bench --benchmark-only`.

Not part of the default test run (`python -m pytest -q tests` collects only
tests/). The same ops and peers as `python -m bench ops`, at one small CPU
shape in fp32, forward and forward+backward; what cannot run here (a
backend that is not built, a peer that is not installed) is skipped with
its reason. Timings are reported by pytest-benchmark, never asserted.
"""
import pytest
import torch

import retro_kernels
from bench import ops, peers
from bench.ops import Case

pytest.importorskip("pytest_benchmark")

SHAPES = {
    "chunked_cross_attention": dict(B=1, N=512, m=64, K=2, R=128, Hq=8, Hkv=8, D=64, mask=False),
    "neighbour_self_attention": dict(B=1, L=8, K=2, R=128, Hq=8, Hkv=8, D=64, mask=True),
    "neighbour_cross_attention": dict(B=1, L=8, K=2, R=128, M=64, Hq=8, Hkv=8, D=64, mask=True),
}
BENCHES = {b.name: b for b in ops.OP_BENCHES}
IMPLS = [f"retro_kernels:{b}" for b in ops.FUSED] + ["reference", "sdpa", "sdpa_masked",
                                                      "sdpa_repeat", "flex_attention", "retro_pytorch"]


def _function(bench, impl, q, k, v, kw):
    if impl.startswith("retro_kernels:"):
        backend = impl.split(":")[1]
        reasons = bench.explain(q, k, v, kw).get(backend, [])
        if backend == "triton" and retro_kernels.dispatch.triton_interpreting():
            reasons = reasons + ["the Triton interpreter is not a benchmark"]
        if reasons:
            pytest.skip("; ".join(reasons))
        return bench.ours(backend)
    if impl not in bench.peers:
        pytest.skip(f"{impl} is not a peer of {bench.name}")
    reason = peers.unavailable(impl, torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    return bench.peers[impl]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", list(SHAPES))
def test_op(benchmark, op, impl, mode):
    bench = BENCHES[op]
    if bench.available():
        pytest.skip(bench.available())
    if impl == "flex_attention" and mode != "fwd":
        pytest.skip("FlexAttention has no backward on the CPU")
    torch.manual_seed(0)
    case = Case("base", None, SHAPES[op], "fp32")
    q, k, v, kw = bench.inputs(case, torch.device("cpu"), torch.Generator().manual_seed(0))
    fn = _function(bench, impl, q, k, v, kw)
    benchmark.extra_info.update(op=op, impl=impl, mode=mode, shape=SHAPES[op])
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(q, k, v, **kw)
    else:
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

        def call():
            out = fn(qg, kg, vg, **kw)
            return torch.autograd.grad(out, (qg, kg, vg), torch.ones_like(out))
    result = benchmark(call)
    assert result is not None
