"""Comparisons against the reference, with the tolerances of docs/spec.md#tolerances.

fp32: tight absolute and relative tolerances.
fp16/bf16: compute the reference in fp32 (ref32) and in the low precision with
plain PyTorch (ref_lp); require max|out - ref32| <= factor * max|ref_lp - ref32| + eps,
factor 2 for outputs and 3 for gradients.
"""
import torch

FP32_ATOL = 2e-5
FP32_RTOL = 2e-5
LOW_PRECISION_EPS = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_close_to_reference(name, out, ref32, ref_lp=None, factor=2.0):
    """`out` matches the fp32 reference as well as eager low precision does (see module doc)."""
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref32, atol=FP32_ATOL, rtol=FP32_RTOL, msg=lambda m: f"{name}: {m}")
        return
    assert ref_lp is not None, "low-precision comparisons need the eager low-precision result"
    err = (out.float() - ref32.float()).abs().max().item()
    budget = factor * (ref_lp.float() - ref32.float()).abs().max().item() + LOW_PRECISION_EPS[out.dtype]
    assert err <= budget, f"{name}: max error {err:.3e} > allowed {budget:.3e} ({out.dtype})"
