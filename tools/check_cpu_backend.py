"""Check an installed retro_kernels: backend="cpu" against the reference, forward and backward.

    python tools/check_cpu_backend.py [--expect built|compiled]

Run it from outside the checkout so that it imports the installed package
(.ci/run does, after `pip install .` and after installing the wheel). Prints
where the C++ CPU kernels came from (built ahead of time, or compiled on first
use) and exits 1 if that is not what --expect says or a result differs.
"""
from __future__ import annotations

import argparse
import sys

import torch

import retro_kernels as rk
from retro_kernels import _native
from retro_kernels.cpu.gemm import gemm_info


def inputs(op: str) -> tuple[tuple, dict]:
    """Awkward small inputs: N not a multiple of the chunk, padded neighbours, grouped-query heads."""
    B, L, K, R, Hq, Hkv, D, M, m = 2, 3, 2, 5, 4, 2, 24, 7, 8
    def t(*shape):
        return torch.randn(*shape, requires_grad=True)
    if op == "chunked_cross_attention":
        mask = torch.rand(B, L, K, R) > 0.3
        return (t(B, 29, Hq, D), t(B, L, K, R, Hkv, D), t(B, L, K, R, Hkv, D), m), dict(neighbour_mask=mask)
    if op == "neighbour_self_attention":
        mask = torch.arange(R) < torch.randint(1, R + 1, (B, L, K, 1))
        return (t(B, L, K, R, Hq, D), t(B, L, K, R, Hkv, D), t(B, L, K, R, Hkv, D)), dict(neighbour_mask=mask)
    mask = torch.rand(B, L, M) > 0.2
    return (t(B, L, K, R, Hq, D), t(B, L, M, Hkv, D), t(B, L, M, Hkv, D)), dict(chunk_mask=mask)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--expect", choices=("built", "compiled"), default=None,
                   help="built: the kernels were built ahead of time; compiled: compiled on first use")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    for op in ("chunked_cross_attention", "neighbour_self_attention", "neighbour_cross_attention"):
        positional, keywords = inputs(op)
        fn = getattr(rk, op)
        out = fn(*positional, **keywords, backend="cpu")
        ref = fn(*positional, **keywords, backend="reference")
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        tensors = [x for x in positional if isinstance(x, torch.Tensor)]
        dout = torch.randn_like(out)
        for got, want in zip(torch.autograd.grad(out, tensors, dout), torch.autograd.grad(ref, tensors, dout)):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    where = _native.describe("cpu")["where"]
    print(f"retro_kernels {rk.__version__} from {rk.__file__}: backend='cpu' matches the reference "
          f"(forward and backward, 3 ops); C++ CPU kernels {where}; GEMM {gemm_info()['summary']}")
    expected = {"built": "built ahead of time", "compiled": "compiled on first use"}.get(args.expect)
    if expected and not where.startswith(expected):
        print(f"expected the C++ CPU kernels {expected}, got: {where}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
