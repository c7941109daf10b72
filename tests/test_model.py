"""The RETRO model: kernels agree, incremental decoding matches, retrieval OFF is a plain GPT."""
import dataclasses
import json
import numpy as np
import pytest
import torch

from models.config import RetroConfig
from models.model import RetroModel, lm_loss


# Triton runs on CUDA tensors on a GPU and under the interpreter only without one (conftest.py).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def small_config(**kw):
    base = dict(vocab_size=61, d_model=32, n_layers=4, n_heads=4, seq_len=24, chunk_size=6,
                num_neighbours=2, neighbour_len=9, cca_start_layer=2, cca_every=2, kernels="reference")
    base.update(kw)
    return RetroConfig(**base)


def randomize_cca(model):
    """CCA outputs start at zero; give them weights so the comparisons mean something."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("cca.to_out.weight"):
                p.normal_(std=0.05)


def batch(cfg, B=2, N=None):
    N = cfg.seq_len if N is None else N
    L = -(-N // cfg.chunk_size)
    tokens = torch.randint(0, cfg.vocab_size, (B, N + 1))
    nb = torch.randint(0, cfg.vocab_size, (B, L, cfg.num_neighbours, cfg.R))
    mask = torch.ones(B, L, cfg.num_neighbours, cfg.R, dtype=torch.bool)
    mask[0, 0, 1, 5:] = False  # a padded neighbour
    mask[1, 1] = False  # a chunk with no neighbour at all
    return tokens[:, :-1], tokens[:, 1:], nb, mask


def test_cca_layers_are_every_third_from_the_start_layer():
    cfg = RetroConfig(vocab_size=10, n_layers=12, cca_start_layer=6)
    assert cfg.cca_layers == [5, 8, 11]  # paper: layers 6, 9, 12 (1-based)
    model = RetroModel(small_config(n_layers=5, cca_start_layer=2, cca_every=3))
    assert [i for i, b in enumerate(model.layers) if b.has_cca] == [1, 4]


def _available(backend):
    import retro_kernels

    q = torch.randn(1, 8, 2, 16)
    k = torch.randn(1, 2, 2, 8, 2, 16)
    return not retro_kernels.explain("chunked_cross_attention", q=q, k=k, v=k, neighbour_mask=None)[backend]


# "auto" on the CPU: the C++ CPU kernels where an op has them, the reference for the rest
@pytest.mark.parametrize("fused", ["triton", "auto"])
def test_fused_and_reference_kernels_give_the_same_loss_and_gradients(fused):
    if fused == "auto" and not _available("cpu"):
        pytest.skip("the C++ CPU backend is not built here: 'auto' would be the reference")
    cfg = small_config(seq_len=16, chunk_size=4, neighbour_len=6, d_model=24, n_heads=2, n_layers=3,
                       cca_start_layer=1, cca_every=2)
    device = TRITON_DEVICE if fused == "triton" else "cpu"
    model = RetroModel(cfg).to(device)
    randomize_cca(model)
    x, y, nb, mask = (t.to(device) for t in batch(cfg))

    def loss_and_grads(kernels):
        model.set_kernels(kernels)
        model.zero_grad()
        loss = lm_loss(model(x, nb, mask), y)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads("reference")
    fused_loss, fused_grads = loss_and_grads(fused)
    torch.testing.assert_close(fused_loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert ref_grads.keys() == fused_grads.keys()
    assert any(".cca." in n and g.abs().sum() > 0 for n, g in ref_grads.items())
    assert any(n.startswith("encoder.") and g.abs().sum() > 0 for n, g in ref_grads.items())
    for n in ref_grads:
        torch.testing.assert_close(fused_grads[n], ref_grads[n], atol=2e-5, rtol=2e-4, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_incremental_decoding_matches_the_full_forward(kernels):
    cfg = small_config(kernels=kernels, n_kv_heads=2)
    device = TRITON_DEVICE if kernels == "triton" else "cpu"
    model = RetroModel(cfg).eval().to(device)
    randomize_cca(model)
    # not a multiple of m; shorter under the (slow) Triton interpreter
    x, _, nb, mask = (t.to(device) for t in batch(cfg, N=22 if kernels == "reference" else 15))
    with torch.no_grad():
        full = model(x, nb, mask)
        # a prompt of 8 tokens (one chunk complete), then one token at a time
        cache = model.new_cache()
        steps = [model(x[:, :8], nb, mask, start_pos=0, cache=cache)]
        for t in range(8, x.shape[1]):
            steps.append(model(x[:, t:t + 1], nb, mask, start_pos=t, cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=2e-5)
    assert cache.chunks_encoded == x.shape[1] // cfg.chunk_size


def test_neighbours_of_a_chunk_only_reach_tokens_from_its_last_token_on():
    cfg = small_config()
    m = cfg.chunk_size
    model = RetroModel(cfg).eval()
    randomize_cca(model)
    x, _, nb, mask = batch(cfg)
    nb2 = nb.clone()
    nb2[:, 1] = torch.randint(0, cfg.vocab_size, nb2[:, 1].shape)
    with torch.no_grad():
        a, b = model(x, nb, mask), model(x, nb2, mask)
    first_reader = 1 * m + m - 1
    torch.testing.assert_close(a[:, :first_reader], b[:, :first_reader])
    assert (a[0, first_reader:2 * m + m - 1] - b[0, first_reader:2 * m + m - 1]).abs().max() > 1e-4


def test_retrieval_off_is_the_plain_decoder():
    cfg = small_config()
    retro = RetroModel(cfg).eval()
    randomize_cca(retro)
    plain = RetroModel(dataclasses.replace(cfg, retrieval=False)).eval()
    missing, unexpected = plain.load_state_dict(retro.state_dict(), strict=False)
    assert not missing and all(n.startswith("encoder.") or ".cca" in n for n in unexpected)
    x, _, nb, mask = batch(cfg)
    with torch.no_grad():
        torch.testing.assert_close(retro(x), plain(x))
        assert (retro(x, nb, mask) - plain(x)).abs().max() > 1e-4


def test_bad_configurations_and_inputs_are_refused_clearly():
    with pytest.raises(ValueError, match="chunk_size .* must divide seq_len"):
        small_config(seq_len=25)
    with pytest.raises(ValueError, match="n_kv_heads"):
        small_config(n_kv_heads=3)
    with pytest.raises(ValueError, match="cca_start_layer"):
        small_config(cca_start_layer=0)
    with pytest.raises(ValueError, match="kernels"):
        small_config(kernels="fast")
    cfg = small_config()
    model = RetroModel(cfg)
    x, _, nb, mask = batch(cfg)
    with pytest.raises(ValueError, match="neighbours has L=1"):
        model(x, nb[:, :1], mask[:, :1])
    with pytest.raises(ValueError, match="R=9"):
        model(x, nb[..., :4], mask[..., :4])
    with pytest.raises(ValueError, match="retrieval=False"):
        RetroModel(dataclasses.replace(cfg, retrieval=False))(x, nb, mask)


def test_config_round_trips_through_json():
    cfg = small_config(n_kv_heads=2, feed_forward="gelu")
    assert RetroConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        RetroConfig.from_json(json.dumps({**cfg.to_dict(), "bogus": 1}))


def test_generation_retrieves_each_completed_chunk_and_matches_greedy_full_forward():
    from models.generate import generate

    cfg = small_config()
    m, K, R = cfg.chunk_size, cfg.num_neighbours, cfg.R
    model = RetroModel(cfg).eval()
    randomize_cca(model)
    seen = []

    def retriever(chunks):  # a deterministic function of the chunk's tokens
        seen.extend(tuple(c.tolist()) for c in chunks)
        nb = np.stack([(np.arange(K * R).reshape(K, R) * 7 + int(c.sum())) % cfg.vocab_size for c in chunks])
        return nb, np.ones(nb.shape, dtype=bool)

    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5]  # one chunk complete, and a bit
    out = generate(model, prompt, max_new_tokens=12, retriever=retriever, temperature=0)
    assert len(out.tokens) == len(prompt) + 12
    complete = len(out.tokens) // m
    assert seen == [tuple(out.tokens[u * m:(u + 1) * m]) for u in range(complete)]
    # Greedy decoding with the cache = argmax of a full forward over the same tokens and neighbours.
    x = torch.tensor([out.tokens])
    nb = torch.as_tensor(np.stack(out.neighbours))[None]
    with torch.no_grad():
        logits = model(x, nb, torch.ones(nb.shape, dtype=torch.bool))
    assert logits[0, len(prompt) - 1:-1].argmax(-1).tolist() == out.tokens[len(prompt):]


def test_the_model_learns_to_copy_from_its_neighbours():
    """End to end through CCA and the encoder: when a chunk's neighbour is its own continuation,
    training makes retrieval ON far better than OFF on fresh random text."""
    torch.manual_seed(0)
    V, N, m, K = 32, 32, 4, 2
    cfg = RetroConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, seq_len=N, chunk_size=m, num_neighbours=K,
                      neighbour_len=2 * m, cca_start_layer=1, cca_every=1, encoder_ff_mult=2, kernels="reference")
    model = RetroModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    L = N // m

    def batch(B):
        x = torch.randint(0, V, (B, N + m + 1))
        nb = torch.randint(0, V, (B, L, K, 2 * m))
        for u in range(L):
            nb[:, u, 0] = x[:, u * m:(u + 2) * m]  # neighbour 0: the chunk and its continuation
        return x[:, :N], x[:, 1:N + 1], nb, torch.ones(nb.shape, dtype=torch.bool)

    for _ in range(100):
        x, y, nb, mask = batch(12)
        lm_loss(model(x, nb, mask), y).backward()
        opt.step()
        opt.zero_grad()
    x, y, nb, mask = batch(64)
    with torch.no_grad():
        on = lm_loss(model(x, nb, mask)[:, m:], y[:, m:]).item()
        off = lm_loss(model(x)[:, m:], y[:, m:]).item()
    assert off > np.log(V) - 0.2  # random text: nothing to learn without retrieval
    assert on < off - 1.0, (on, off)
