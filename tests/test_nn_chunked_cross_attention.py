"""nn.ChunkedCrossAttention and RotaryEmbedding."""
import pytest
import torch

import retro_kernels as rk
from retro_kernels.nn import ChunkedCrossAttention, RotaryEmbedding

from backends import DEVICE, fused_backends

BACKENDS = fused_backends("chunked_cross_attention")


def test_rotary_scores_depend_only_on_relative_position():
    rotary = RotaryEmbedding(16)
    q = torch.randn(1, 1, 16).expand(5, 1, 16)
    k = torch.randn(1, 1, 16).expand(5, 1, 16)
    pos = torch.arange(5)
    qr, kr = rotary(q, pos), rotary(k, pos)
    # <q at a, k at b> is a function of a - b
    scores = qr[:, 0] @ kr[:, 0].T
    for d in range(-3, 4):
        diag = torch.diagonal(scores, offset=-d)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), atol=1e-5, rtol=1e-5)


def test_rotary_rejects_odd_dim():
    with pytest.raises(ValueError, match="rotary dim"):
        RotaryEmbedding(7)


def test_query_and_key_positions_follow_the_design_notes(monkeypatch):
    """Query at attending index i is rotated by i + m - 1, neighbour token j by j (not [2m-2, 0, ...])."""
    m, N, R = 4, 11, 3
    layer = ChunkedCrossAttention(16, 2, chunk_size=m, backend="reference")
    seen = []
    original = RotaryEmbedding.forward

    def record(self, x, positions):
        seen.append(positions.tolist())
        return original(self, x, positions)

    monkeypatch.setattr(RotaryEmbedding, "forward", record)
    layer(torch.randn(1, N, 16), torch.randn(1, 2, 1, R, 16), start_pos=0)
    q_pos, k_pos = seen
    for t in range(m - 1, N):
        i = (t - (m - 1)) % m
        assert q_pos[t] == i + m - 1
    assert q_pos[m - 1 : 2 * m - 1] == [m - 1, m, m + 1, m + 2]
    assert k_pos == list(range(R))


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_layer_zero_rows_decoding_and_gqa(backend):
    m = 4
    layer = ChunkedCrossAttention(32, 4, chunk_size=m, n_kv_heads=2, backend=backend).to(DEVICE)
    hidden = torch.randn(2, 13, 32, device=DEVICE)
    neighbours = torch.randn(2, 3, 2, 5, 32, device=DEVICE)
    mask = torch.rand(2, 3, 2, 5, device=DEVICE) > 0.3
    full = layer(hidden, neighbours, mask)
    assert full.shape == hidden.shape
    assert full[:, : m - 1].abs().max() == 0
    steps = torch.cat([layer(hidden[:, t : t + 1], neighbours, mask, start_pos=t) for t in range(13)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_fused_equals_reference_with_gradients(backend):
    torch.manual_seed(1)
    fused = ChunkedCrossAttention(40, 2, chunk_size=4, n_kv_heads=1, backend=backend).to(DEVICE)
    ref = ChunkedCrossAttention(40, 2, chunk_size=4, n_kv_heads=1, backend="reference").to(DEVICE)
    ref.load_state_dict(fused.state_dict())
    hidden = torch.randn(1, 10, 40, device=DEVICE)
    neighbours = torch.randn(1, 2, 2, 3, 40, device=DEVICE)
    outs = []
    for layer in (fused, ref):
        out = layer(hidden, neighbours)
        out.square().sum().backward()
        outs.append((out, [p.grad for p in layer.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    for g1, g2 in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(g1, g2, atol=1e-4, rtol=1e-4)


def test_layer_bad_arguments():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ChunkedCrossAttention(32, 4, chunk_size=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkedCrossAttention(32, 4, chunk_size=0)
    layer = ChunkedCrossAttention(32, 4, chunk_size=4)
    with pytest.raises(ValueError, match="neighbours must be"):
        layer(torch.randn(1, 8, 32), torch.randn(1, 2, 3, 32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_torch_compile_fullgraph(backend):
    """The whole layer (projections, rotary, the op with a mask and grouped heads) in one graph."""
    torch._dynamo.reset()
    layer = rk.nn.ChunkedCrossAttention(32, 2, chunk_size=4, n_kv_heads=1, backend=backend).to(DEVICE)
    hidden = torch.randn(2, 10, 32, device=DEVICE)
    neighbours = torch.randn(2, 2, 2, 3, 32, device=DEVICE)
    mask = torch.rand(2, 2, 2, 3, device=DEVICE) > 0.3
    eager = layer(hidden, neighbours, mask)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(hidden, neighbours, mask)
    out.sum().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for p, g in zip(layer.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
