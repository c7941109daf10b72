"""nn.NeighbourEncoderLayer: shapes, padding, relative positions, fused vs reference backends."""
import copy

import pytest
import torch

from retro_kernels.nn import NeighbourEncoderLayer

from backends import DEVICE, fused_backends
from tolerances import FP32_ATOL, FP32_RTOL


def both_ops(dtype=torch.float32, device=DEVICE) -> list[str]:
    """The fused backends that run both encoder ops on `device` in `dtype`."""
    return [b for b in fused_backends("neighbour_self_attention", dtype, device)
            if b in fused_backends("neighbour_cross_attention", dtype, device)]


FUSED = both_ops()
GPU_FUSED = both_ops(torch.bfloat16, "cuda")  # [] without a GPU


def make_inputs(B, L, K, R, M, d_model, chunk_dim=None, device=DEVICE):
    x = torch.randn(B, L, K, R, d_model, device=device)
    chunk = torch.randn(B, L, M, chunk_dim or d_model, device=device)
    lengths = torch.randint(1, R + 1, (B, L, K), device=device)
    neighbour_mask = torch.arange(R, device=device) < lengths[..., None]
    neighbour_mask[0, 0, 0] = False  # a fully padded neighbour
    chunk_mask = torch.ones(B, L, M, dtype=torch.bool, device=device)
    chunk_mask[:, -1, M // 2 :] = False  # a partial last chunk
    return x, chunk, neighbour_mask, chunk_mask


@pytest.mark.parametrize("cross_attention", [True, False])
def test_shapes(cross_attention):
    layer = NeighbourEncoderLayer(32, 4, cross_attention, n_kv_heads=2, chunk_dim=48, backend="reference").to(DEVICE)
    x, chunk, nm, cm = make_inputs(2, 3, 2, 5, 4, 32, chunk_dim=48)
    out = layer(x, chunk, nm, cm)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert hasattr(layer, "cross_q") == cross_attention
    assert layer(x, None if not cross_attention else chunk).shape == x.shape  # masks are optional


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_padding_gives_no_nan_and_passes_through(backend):
    """Fully padded neighbours and a chunk with no real token: finite, padded rows unchanged."""
    layer = NeighbourEncoderLayer(32, 2, True, backend=backend).to(DEVICE)
    x, chunk, nm, cm = make_inputs(1, 2, 2, 5, 4, 32)
    nm[0, 1, 1] = False
    cm[0, 1] = False  # chunk 1 has no real token: its cross-attention outputs zeros
    x.requires_grad_()
    chunk.requires_grad_()
    out = layer(x, chunk, nm, cm)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[~nm], x[~nm], atol=0, rtol=0)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(chunk.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    assert (chunk.grad[0, 1] == 0).all()  # masked chunk tokens get no gradient


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_relative_positions(backend):
    """Positions are relative (j' - j): moving a neighbour right behind padding changes nothing."""
    layer = NeighbourEncoderLayer(32, 2, True, backend=backend).to(DEVICE)
    R, shift = 5, 3
    x, chunk, _, cm = make_inputs(1, 1, 1, R, 4, 32)
    mask = torch.ones(1, 1, 1, R, dtype=torch.bool, device=DEVICE)
    shifted = torch.cat([torch.randn(1, 1, 1, shift, 32, device=DEVICE), x], dim=3)
    shifted_mask = torch.cat([torch.zeros(1, 1, 1, shift, dtype=torch.bool, device=DEVICE), mask], dim=3)
    out = layer(x, chunk, mask, cm)
    out_shifted = layer(shifted, chunk, shifted_mask, cm)
    torch.testing.assert_close(out_shifted[:, :, :, shift:], out, atol=1e-5, rtol=1e-5)
    # and the positions matter: swapping two tokens is not just a permutation of the output
    swapped = x[:, :, :, [1, 0, 2, 3, 4]]
    out_swapped = layer(swapped, chunk, mask, cm)
    assert not torch.allclose(out_swapped[:, :, :, [1, 0, 2, 3, 4]], out, atol=1e-4)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("cross_attention", [True, False])
def test_fused_matches_reference(backend, cross_attention):
    torch.manual_seed(1)
    reference = NeighbourEncoderLayer(40, 4, cross_attention, n_kv_heads=2, chunk_dim=24,
                                      backend="reference").to(DEVICE)
    fused = copy.deepcopy(reference)
    fused.backend = backend
    x, chunk, nm, cm = make_inputs(2, 2, 2, 6, 5, 40, chunk_dim=24)
    results = []
    for layer in (reference, fused):
        xi = x.clone().requires_grad_()
        ci = chunk.clone().requires_grad_()
        out = layer(xi, ci, nm, cm)
        grads = torch.autograd.grad(out.square().sum(), [xi, ci] + list(layer.parameters()), allow_unused=True)
        results.append((out, grads))
    (ref_out, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref_out, atol=FP32_ATOL, rtol=FP32_RTOL)
    names = ["x", "chunk"] + [n for n, _ in reference.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads):
        if r is None:  # the chunk without cross-attention
            assert g is None, name
            continue
        torch.testing.assert_close(g, r, atol=FP32_ATOL, rtol=FP32_RTOL, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    layer = NeighbourEncoderLayer(32, 2, True, backend=backend).to(DEVICE)
    x, chunk, nm, cm = make_inputs(1, 2, 2, 5, 4, 32)
    # aot_eager: Dynamo traces the whole layer (fullgraph) and AOTAutograd its backward
    # through the ops' fake and autograd registrations; inductor is covered by the op tests.
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    results = []
    for run in (compiled, layer):
        xi = x.clone().requires_grad_()
        out = run(xi, chunk, nm, cm)
        results.append((out, torch.autograd.grad(out.square().sum(), xi)[0]))
    torch.testing.assert_close(results[0], results[1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_kv_heads"):
        NeighbourEncoderLayer(32, 4, False, n_kv_heads=3)
    with pytest.raises(ValueError, match="ff_mult"):
        NeighbourEncoderLayer(32, 4, False, ff_mult=0)
    layer = NeighbourEncoderLayer(32, 4, True, backend="reference")
    x, chunk, nm, cm = make_inputs(1, 2, 2, 5, 4, 32, device="cpu")
    with pytest.raises(ValueError, match="chunk .* is required"):
        layer(x)
    with pytest.raises(ValueError, match="^x "):
        layer(x[0], chunk)
    with pytest.raises(ValueError, match="^chunk "):
        layer(x, chunk[:, :1])
    with pytest.raises(ValueError, match="^chunk "):
        layer(x, chunk[..., :16])
    with pytest.raises(ValueError, match="^neighbour_mask "):
        layer(x, chunk, nm[..., :2], cm)
    with pytest.raises(ValueError, match="^chunk_mask "):
        layer(x, chunk, nm, cm[..., :2])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_bf16_paper_shapes(backend):
    """RETRO-sized encoder block in bf16: fused and reference agree to bf16 accuracy."""
    torch.manual_seed(0)
    reference = NeighbourEncoderLayer(512, 8, True, backend="reference").cuda().bfloat16()
    fused = copy.deepcopy(reference)
    fused.backend = backend
    x, chunk, nm, cm = make_inputs(2, 8, 2, 128, 64, 512, device="cuda")
    x, chunk = x.bfloat16(), chunk.bfloat16()
    ref = reference(x, chunk, nm, cm).float()
    out = fused(x, chunk, nm, cm).float()
    reference32 = copy.deepcopy(reference).float()
    ref32 = reference32(x.float(), chunk.float(), nm, cm)
    budget = 2 * (ref - ref32).abs().max() + 8e-3
    assert torch.isfinite(out).all()
    assert (out - ref32).abs().max() <= budget
