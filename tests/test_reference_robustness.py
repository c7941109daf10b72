"""The references (the specification, and the fallback path) on hostile input.

- A masked token takes no part whatever it holds: NaN or inf at masked
  positions changes nothing, in the output or the gradients.
- Chunked cross-attention's memory is O(input), not O(start_pos): a token at
  start_pos = 5e7 must not materialise 5e7 positions.
- The layers and the model config reject rotary_base <= 0.
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from models.config import RetroConfig
from retro_kernels.nn import ChunkedCrossAttention, NeighbourEncoderLayer, RotaryEmbedding
from retro_kernels.reference.chunked_cross_attention import chunked_cross_attention
from retro_kernels.reference.neighbour_cross_attention import neighbour_cross_attention
from retro_kernels.reference.neighbour_self_attention import neighbour_self_attention


def _poison(x, mask, value):
    """x with `value` written at the tokens where mask (x.shape[:-2]) is False."""
    return x.detach().masked_fill(~mask[..., None, None], value)


def _run(fn, tensors, **kw):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors, **kw)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return out.detach(), [t.grad for t in tensors]


def _assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert torch.isfinite(out_a).all()
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.isfinite(ga).all()
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_chunked_cross_attention_ignores_whatever_masked_neighbour_tokens_hold(value):
    B, N, Hq, Hkv, D, m, K, R = 2, 11, 4, 2, 8, 4, 2, 5
    L = N // m
    q = torch.randn(B, N, Hq, D)
    k, v = torch.randn(2, B, L, K, R, Hkv, D).unbind(0)
    mask = torch.rand(B, L, K, R) > 0.4
    mask[0, 1] = False  # a chunk whose every neighbour token is masked
    clean = _run(chunked_cross_attention, [q, _poison(k, mask, 0.0), _poison(v, mask, 0.0)],
                 chunk_size=m, neighbour_mask=mask)
    poisoned = _run(chunked_cross_attention, [q, _poison(k, mask, value), _poison(v, mask, value)],
                    chunk_size=m, neighbour_mask=mask)
    _assert_same(poisoned, clean)
    assert (poisoned[0][0, m - 1 + m: m - 1 + 2 * m] == 0).all()  # the all-masked chunk's queries: zeros
    grads_k, grads_v = poisoned[1][1], poisoned[1][2]
    assert (grads_k[~mask] == 0).all() and (grads_v[~mask] == 0).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_neighbour_self_attention_ignores_whatever_padding_tokens_hold(value):
    B, L, K, R, Hq, Hkv, D = 1, 2, 2, 6, 4, 2, 8
    q = torch.randn(B, L, K, R, Hq, D)
    k, v = torch.randn(2, B, L, K, R, Hkv, D).unbind(0)
    mask = torch.rand(B, L, K, R) > 0.3
    mask[0, 0, 1] = False  # a fully padded neighbour
    clean = _run(neighbour_self_attention, [_poison(x, mask, 0.0) for x in (q, k, v)], neighbour_mask=mask)
    poisoned = _run(neighbour_self_attention, [_poison(x, mask, value) for x in (q, k, v)], neighbour_mask=mask)
    _assert_same(poisoned, clean)
    assert (poisoned[0][~mask] == 0).all()


@pytest.mark.parametrize("value", [float("nan"), -float("inf")])
def test_neighbour_cross_attention_ignores_whatever_hidden_chunk_tokens_hold(value):
    B, L, K, R, M, Hq, Hkv, D = 1, 3, 2, 4, 5, 2, 1, 8
    q = torch.randn(B, L, K, R, Hq, D)
    k, v = torch.randn(2, B, L, M, Hkv, D).unbind(0)
    mask = torch.rand(B, L, M) > 0.3
    mask[0, 2] = False  # a chunk with no token at all
    clean = _run(neighbour_cross_attention, [q, _poison(k, mask, 0.0), _poison(v, mask, 0.0)], chunk_mask=mask)
    poisoned = _run(neighbour_cross_attention, [q, _poison(k, mask, value), _poison(v, mask, value)],
                    chunk_mask=mask)
    _assert_same(poisoned, clean)


def _naive_cca(q, k, v, m, mask, start_pos):
    """docs/spec.md#the-shift token by token: position t >= m-1 reads the neighbours of chunk (t-(m-1))//m."""
    B, N, Hq, D = q.shape
    K, R, Hkv = k.shape[2], k.shape[3], k.shape[4]
    out = torch.zeros_like(q)
    for b in range(B):
        for n in range(N):
            t = start_pos + n
            if t < m - 1:
                continue
            u = (t - (m - 1)) // m
            for h in range(Hq):
                keys = k[b, u, :, :, h // (Hq // Hkv)].reshape(K * R, D)
                vals = v[b, u, :, :, h // (Hq // Hkv)].reshape(K * R, D)
                real = torch.ones(K * R, dtype=torch.bool) if mask is None else mask[b, u].reshape(-1)
                if not real.any():
                    continue
                w = torch.softmax((keys[real] @ q[b, n, h]) * D ** -0.5, 0)
                out[b, n, h] = w @ vals[real]
    return out


@pytest.mark.parametrize("seed", range(12))
def test_chunked_cross_attention_window_matches_the_rule_token_by_token(seed):
    g = torch.Generator().manual_seed(seed)
    m = int(torch.randint(1, 6, (), generator=g))
    start_pos = int(torch.randint(0, 4 * m + 3, (), generator=g))
    N = int(torch.randint(1, 3 * m + 2, (), generator=g))
    Hkv = int(torch.randint(1, 3, (), generator=g))
    Hq, D, K, R, B = Hkv * int(torch.randint(1, 3, (), generator=g)), 3, 2, 3, 2
    L = (start_pos + N) // m + int(torch.randint(0, 2, (), generator=g))  # extra chunks are ignored
    q = torch.randn(B, N, Hq, D, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, B, L, K, R, Hkv, D, generator=g, dtype=torch.float64).unbind(0)
    mask = torch.rand(B, L, K, R, generator=g) > 0.3
    got = chunked_cross_attention(q, k, v, m, neighbour_mask=mask, start_pos=start_pos)
    torch.testing.assert_close(got, _naive_cca(q, k, v, m, mask, start_pos))


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("start_pos", [0, 7, 50_000_000])
def test_chunked_cross_attention_memory_is_o_input_not_o_start_pos(start_pos):
    """One token at start_pos = 5e7 (the reference must not pad all 5e7 positions first)."""
    m, Hq, D = 64, 1, 2  # small heads: a regression fails the assertion, not the machine
    N = 1
    L = (start_pos + N) // m + 1
    q = torch.randn(1, N, Hq, D, requires_grad=True)
    k = torch.randn(1, 1, 1, 1, 1, D).expand(1, L, 1, 1, 1, D)  # (B, L, K, R, Hkv, D), no memory per chunk
    v = torch.randn(1, 1, 1, 1, 1, D).expand(1, L, 1, 1, 1, D)
    with _LargestTensor() as probe:
        out = chunked_cross_attention(q, k, v, m, start_pos=start_pos)
        out.sum().backward()
    # The window holds at most one attending chunk here: m rows of (Hq, D), however large start_pos is.
    assert probe.largest <= m * Hq * D, probe.largest
    expect = torch.zeros_like(out) if start_pos + N <= m - 1 else v[0, 0, 0, 0, 0].expand_as(out)
    torch.testing.assert_close(out, expect)  # one key: its value, exactly


@pytest.mark.parametrize("base", [0, -1.0, float("nan"), float("inf")])
def test_layers_and_config_reject_a_rotary_base_that_is_not_positive(base):
    with pytest.raises(ValueError, match="rotary_base must be a finite number > 0"):
        RotaryEmbedding(8, base)
    with pytest.raises(ValueError, match="rotary_base"):
        ChunkedCrossAttention(16, 2, 4, rotary_base=base)
    with pytest.raises(ValueError, match="rotary_base"):
        ChunkedCrossAttention(16, 2, 4, rotary=False, rotary_base=base)
    with pytest.raises(ValueError, match="rotary_base"):
        NeighbourEncoderLayer(16, 2, cross_attention=True, rotary_base=base)
    with pytest.raises(ValueError, match="rotary_base"):
        RetroConfig(vocab_size=16, d_model=16, n_heads=2, n_layers=2, seq_len=8, chunk_size=4,
                    cca_start_layer=1, rotary_base=base)
    assert math.isfinite(RotaryEmbedding(8, 10.0).inv_freq.sum())
