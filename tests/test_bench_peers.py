"""The benchmark's peers compute what the reference computes (a wrong peer makes every ratio a lie).

Small shapes on the CPU in fp32, forward and gradients, over the awkward
cases: N not a multiple of m, N < m, grouped-query heads, padded
neighbours, chunks whose every neighbour token is masked. FlexAttention has
no backward on the CPU and compiling it takes about a minute here, so the
CPU test runs it eagerly, forward only; the compiled form is a GPU test.
"""
import importlib.util

import pytest
import torch

from bench import peers
from tests.tolerances import FP32_ATOL, FP32_RTOL

HAS_CUDA = torch.cuda.is_available()

CCA_CASES = {
    # name: (B, N, m, K, R, Hq, Hkv, D, mask)
    "plain": (2, 64, 16, 2, 24, 2, 2, 16, None),
    "N_not_multiple_of_m": (1, 75, 16, 3, 20, 2, 2, 8, None),
    "gqa_padded_neighbours": (2, 70, 16, 2, 24, 4, 2, 12, "padded"),
    "fully_masked_chunk": (1, 64, 16, 2, 16, 2, 1, 8, "one_chunk_empty"),
    "N_below_m": (1, 10, 16, 2, 16, 2, 2, 8, None),
}


def _cca_inputs(B, N, m, K, R, Hq, Hkv, D, mask, device="cpu", dtype=torch.float32):
    L = max(1, -(-N // m))
    q = torch.randn(B, N, Hq, D, device=device, dtype=dtype)
    k = torch.randn(B, L, K, R, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(B, L, K, R, Hkv, D, device=device, dtype=dtype)
    neighbour_mask = None
    if mask is not None:
        lengths = torch.randint(R // 2, R + 1, (B, L, K))
        neighbour_mask = (torch.arange(R) < lengths[..., None]).to(device)
        if mask == "one_chunk_empty":
            neighbour_mask[:, 1] = False
    return q, k, v, neighbour_mask


def _peer_or_skip(name):
    reason = peers.unavailable(name, torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    return peers.CCA_PEERS[name]


def _check(peer, case, grads=True, fn_kwargs=None):
    B, N, m, K, R, Hq, Hkv, D, mask = CCA_CASES[case]
    q, k, v, neighbour_mask = _cca_inputs(B, N, m, K, R, Hq, Hkv, D, mask)
    kwargs = dict(neighbour_mask=neighbour_mask, scale=0.3)
    inputs = [t.clone().requires_grad_(grads) for t in (q, k, v)]
    ref_inputs = [t.clone().requires_grad_(grads) for t in (q, k, v)]
    out = peer(*inputs, m, **kwargs)
    ref = peers.cca_reference(*ref_inputs, m, **kwargs)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=FP32_ATOL, rtol=FP32_RTOL)
    if grads and N >= m:
        dout = torch.randn_like(ref)
        got = torch.autograd.grad(out, inputs, dout)
        want = torch.autograd.grad(ref, ref_inputs, dout)
        for name, g, w in zip("qkv", got, want):
            torch.testing.assert_close(g, w, atol=FP32_ATOL, rtol=FP32_RTOL, msg=lambda s: f"d{name}: {s}")


@pytest.mark.parametrize("peer_name", ["sdpa", "sdpa_repeat"])
@pytest.mark.parametrize("case", list(CCA_CASES))
def test_sdpa_peers_match_reference(case, peer_name):
    _check(peers.CCA_PEERS[peer_name], case)


@pytest.mark.parametrize("case", list(CCA_CASES))
def test_flex_attention_peer_matches_reference_forward(case):
    _peer_or_skip("flex_attention")
    _check(peers.cca_flex_attention_eager, case, grads=False)


@pytest.mark.parametrize("case", [c for c in CCA_CASES if c != "fully_masked_chunk"])
def test_retro_pytorch_peer_matches_reference(case):
    # RETRO-pytorch averages all keys for a fully masked chunk (it masks with
    # -finfo.max): it differs from the reference there by design, so that case is left out.
    _peer_or_skip("retro_pytorch")
    _check(peers.cca_retro_pytorch, case)


def test_retro_pytorch_peer_differs_on_fully_masked_chunks():
    """Documents why the case above is left out: not zeros where the reference gives zeros."""
    _peer_or_skip("retro_pytorch")
    B, N, m, K, R, Hq, Hkv, D, mask = CCA_CASES["fully_masked_chunk"]
    q, k, v, neighbour_mask = _cca_inputs(B, N, m, K, R, Hq, Hkv, D, mask)
    out = peers.cca_retro_pytorch(q, k, v, m, neighbour_mask=neighbour_mask)
    ref = peers.cca_reference(q, k, v, m, neighbour_mask=neighbour_mask)
    rows = slice(m - 1 + m, m - 1 + 2 * m)  # attending chunk 1, whose neighbours are all masked
    assert ref[:, rows].abs().max() == 0
    assert out[:, rows].abs().max() > 0


def test_peers_reject_start_pos():
    q, k, v, _ = _cca_inputs(1, 32, 16, 1, 8, 1, 1, 4, None)
    with pytest.raises(NotImplementedError, match="start_pos"):
        peers.cca_sdpa(q, k, v, 16, start_pos=3)


def test_flash_attn_peer_is_skipped_with_a_reason_without_cuda():
    reason = peers.unavailable("flash_attn", torch.device("cpu"))
    assert reason and "CUDA" in reason


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("peer_name", ["sdpa", "sdpa_repeat", "flex_attention", "flash_attn", "retro_pytorch"])
def test_cca_peers_on_gpu(peer_name, dtype):
    """At the paper's chunk shape on a GPU, forward and gradients; FlexAttention compiled in the
    default mode (its block mask must fit the default kernel tiles: bench/peers.py)."""
    reason = peers.unavailable(peer_name, torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    peer = peers.CCA_PEERS[peer_name]
    B, N, m, K, R, Hq, Hkv, D = 2, 300, 64, 2, 128, 4, 2, 64
    q, k, v, _ = _cca_inputs(B, N, m, K, R, Hq, Hkv, D, None, device="cuda", dtype=torch.float32)
    lp = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_lp_in = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = peer(*lp, m)
    ref32 = peers.cca_reference(*ref_in, m)
    ref_lp = peers.cca_reference(*ref_lp_in, m)
    err = (out.float() - ref32).abs().max().item()
    budget = 2 * (ref_lp.float() - ref32).abs().max().item() + 1e-2
    assert err <= budget, f"{peer_name} forward error {err} > {budget}"
    dout = torch.randn_like(ref32)
    got = torch.autograd.grad(out, lp, dout.to(dtype))
    want = torch.autograd.grad(ref32, ref_in, dout)
    want_lp = torch.autograd.grad(ref_lp, ref_lp_in, dout.to(dtype))
    for name, g, w, wl in zip("qkv", got, want, want_lp):
        err = (g.float() - w).abs().max().item()
        budget = 3 * (wl.float() - w).abs().max().item() + 1e-2
        assert err <= budget, f"{peer_name} d{name} error {err} > {budget}"


# ---------------------------------------------------------------------------
# Neighbour-encoder peers (once retro_kernels has the ops' references)
# ---------------------------------------------------------------------------

def _needs_reference(op):
    if importlib.util.find_spec(f"retro_kernels.reference.{op}") is None:
        pytest.skip(f"retro_kernels.reference.{op} is not on this branch yet")


def _assert_matches(peer, ref_fn, inputs, kwargs):
    a = [t.clone().requires_grad_() for t in inputs]
    b = [t.clone().requires_grad_() for t in inputs]
    out, ref = peer(*a, **kwargs), ref_fn(*b, **kwargs)
    torch.testing.assert_close(out, ref, atol=FP32_ATOL, rtol=FP32_RTOL)
    dout = torch.randn_like(ref)
    for name, g, w in zip("qkv", torch.autograd.grad(out, a, dout), torch.autograd.grad(ref, b, dout)):
        torch.testing.assert_close(g, w, atol=FP32_ATOL, rtol=FP32_RTOL, msg=lambda s: f"d{name}: {s}")


@pytest.mark.parametrize("masked", [False, True])
def test_neighbour_self_attention_peer(masked):
    _needs_reference("neighbour_self_attention")
    B, L, K, R, Hq, Hkv, D = 2, 3, 2, 12, 4, 2, 8
    q = torch.randn(B, L, K, R, Hq, D)
    k, v = torch.randn(B, L, K, R, Hkv, D), torch.randn(B, L, K, R, Hkv, D)
    kwargs = {"scale": 0.4}
    if masked:
        mask = torch.arange(R) < torch.randint(1, R + 1, (B, L, K, 1))
        mask[0, 1, 0] = False  # a neighbour that is all padding
        kwargs["neighbour_mask"] = mask
    _assert_matches(peers.nsa_sdpa_masked, peers.nsa_reference, (q, k, v), kwargs)


@pytest.mark.parametrize("peer_name", ["sdpa_masked", "sdpa_repeat"])
@pytest.mark.parametrize("masked", [False, True])
def test_neighbour_cross_attention_peers(peer_name, masked):
    _needs_reference("neighbour_cross_attention")
    B, L, K, R, M, Hq, Hkv, D = 2, 3, 2, 12, 8, 4, 2, 8
    q = torch.randn(B, L, K, R, Hq, D)
    k, v = torch.randn(B, L, M, Hkv, D), torch.randn(B, L, M, Hkv, D)
    kwargs = {"scale": 0.4}
    if masked:
        mask = torch.ones(B, L, M, dtype=torch.bool)
        mask[:, -1, M // 2 :] = False  # a partial last chunk
        mask[1, 0] = False  # a chunk with no tokens at all
        kwargs["chunk_mask"] = mask
    _assert_matches(peers.NCA_PEERS[peer_name], peers.nca_reference, (q, k, v), kwargs)
