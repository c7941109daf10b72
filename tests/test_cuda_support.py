"""What the cuda backend refuses, checked on the CPU with meta and fake CUDA tensors: the
reasons are written once (retro_kernels/cuda/_support.py) for the three ops, and
backend="auto" falls back instead of raising."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import retro_kernels as rk
from retro_kernels import dispatch
from retro_kernels.cuda import _support

OPS = ("chunked_cross_attention", "neighbour_self_attention", "neighbour_cross_attention")


def inputs(op, dtype, D, device, B=1, H=2):
    mask_name = {"neighbour_cross_attention": "chunk_mask"}.get(op, "neighbour_mask")
    if op == "chunked_cross_attention":
        q = torch.empty(B, 9, H, D, dtype=dtype, device=device)
        k = torch.empty(B, 2, 2, 3, H, D, dtype=dtype, device=device)
    else:
        q = torch.empty(B, 2, 2, 3, H, D, dtype=dtype, device=device)
        k = torch.empty(*((B, 2, 2, 3) if op == "neighbour_self_attention" else (B, 2, 5)), H, D,
                        dtype=dtype, device=device)
    return {"q": q, "k": k, "v": k, mask_name: None}


@pytest.mark.parametrize("op", OPS)
def test_meta_inputs_get_every_reason(op):
    reasons = dispatch.not_supported_reasons("cuda", op, **inputs(op, torch.float32, 256, "meta"))
    assert any("needs CUDA tensors, got meta" in r for r in reasons)
    assert any("float16 and bfloat16" in r and "float32" in r for r in reasons)
    assert any("head dim 256 > 128" in r for r in reasons)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [16, 20, 80, 128])
def test_supported_inputs_differ_only_by_the_device(op, dtype, D):
    """fp16/bf16 with any head dim up to 128 (the scalar path takes D % 8 != 0) is accepted."""
    on_meta = dataclasses.replace(_support.BACKEND, devices=("meta",), missing=None)  # the same declaration
    assert on_meta.not_supported_reasons(op, inputs(op, dtype, D, "meta")["q"], inputs(op, dtype, D, "meta")["k"]) == []


def test_one_check_serves_the_three_ops():
    per_op = [tuple(dispatch.not_supported_reasons("cuda", op, **inputs(op, torch.float32, 200, "meta")))
              for op in OPS]
    assert per_op[0] == per_op[1] == per_op[2]


def test_rows_beyond_the_grid_are_refused():
    q = torch.empty(2**20, 1024, 1, 8, dtype=torch.float16, device="meta")  # 2^30 rows
    assert any("rows" in r for r in _support.grid_limits(q, q[:1]))


@pytest.mark.parametrize("op", OPS)
def test_auto_falls_back_for_fake_cuda_inputs(op):
    """On CUDA tensors the cuda backend refuses fp32 or D > 128 with reasons; auto picks another."""
    with FakeTensorMode():
        for dtype, D in ((torch.float32, 64), (torch.float16, 256)):
            args = inputs(op, dtype, D, "cuda")
            reasons = dispatch.not_supported_reasons("cuda", op, **args)
            assert reasons
            assert dispatch.select_backend("auto", op, torch.device("cuda"), **args) != "cuda"
            with pytest.raises(rk.BackendNotSupported, match="backend='cuda'"):
                dispatch.select_backend("cuda", op, torch.device("cuda"), **args)
