"""RETROfit: a frozen base (ours, GPT-2 or Llama built from configs) plus CCA and a neighbour encoder.

Without neighbours the retrofit is the base model bit for bit; neighbours of chunk u
reach only positions >= u*m + m-1; only the added weights train; the added
weights save and load without the base; incremental decoding equals the full forward.
"""
import json
import os

import numpy as np
import pytest
import torch

from models.config import RetroConfig
from models.model import RetroModel, lm_loss
from models.retrofit import (RetrofitModel, load_base, load_retrofit, paper_cca_layers, retrofit, save_retrofit,
                             trainable_share)

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

V, M, R = 61, 4, 6  # vocabulary, chunk size, neighbour length


def ours():
    cfg = RetroConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4, seq_len=16, chunk_size=M, retrieval=False,
                      kernels="reference")
    return RetroModel(cfg).eval()


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=3, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=None)
    return transformers.LlamaForCausalLM(cfg).eval()


BASES = {"ours": ours, "gpt2": gpt2, "llama": llama}


def base_logits(base, x):
    out = base(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def make(name, cca_layers=(2, 3), randomize=True):
    torch.manual_seed(0)
    base = BASES[name]()
    rf = retrofit(base, chunk_size=M, cca_layers=cca_layers, neighbour_len=R, seq_len=16, kernels="reference")
    if randomize:  # CCA outputs start at zero; give them weights so that comparisons mean something
        with torch.no_grad():
            for block in rf.cca.values():
                block.cca.to_out.weight.normal_(std=0.1)
    return base, rf


def inputs(B=2, N=18, L=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, N), generator=g)
    nb = torch.randint(0, V, (B, L, 2, R), generator=g)
    mask = torch.ones(nb.shape, dtype=torch.bool)
    mask[0, 1, 1, 3:] = False  # a padded neighbour
    mask[1, 2] = False  # a chunk with no neighbour at all
    return x, nb, mask


@pytest.mark.parametrize("name", list(BASES))
def test_without_neighbours_the_retrofit_is_the_base_model_bit_for_bit(name):
    base, rf = make(name, randomize=False)
    x, nb, mask = inputs()
    with torch.no_grad():
        expected = base_logits(base, x)
        assert torch.equal(rf(x), expected)
        assert torch.equal(rf(x, nb, mask), expected)  # CCA's output projections start at zero
    _, rf = make(name)  # trained (non-zero) CCA: still the base without neighbours, different with them
    with torch.no_grad():
        assert torch.equal(rf(x), base_logits(rf.base, x))
        assert (rf(x, nb, mask) - rf(x)).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(BASES))
def test_neighbours_of_chunk_u_reach_only_positions_from_u_m_plus_m_minus_1(name):
    _, rf = make(name)
    x, nb, mask = inputs()
    for u in range(4):
        changed = nb.clone()
        changed[:, u] = (changed[:, u] + 1 + torch.arange(R)) % V
        with torch.no_grad():
            a, b = rf(x, nb, mask), rf(x, changed, mask)
        first = u * M + M - 1
        torch.testing.assert_close(a[:, :first], b[:, :first], atol=1e-6, rtol=0)
        assert (a[0, first:first + M] - b[0, first:first + M]).abs().max() > 1e-4, u


@pytest.mark.parametrize("name", list(BASES))
def test_only_the_added_weights_train_and_the_base_does_not_move(name):
    base, rf = make(name)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    assert all(not p.requires_grad for p in base.parameters())
    added = {n: p for n, p in rf.named_parameters() if p.requires_grad}
    assert added and all(n.startswith(("encoder.", "cca.")) for n in added)
    x, nb, mask = inputs()
    opt = torch.optim.AdamW([p for p in rf.parameters() if p.requires_grad], lr=1e-2)
    old = {n: p.detach().clone() for n, p in added.items()}
    for _ in range(2):
        lm_loss(rf(x[:, :-1], nb, mask), x[:, 1:]).backward()
        assert all(p.grad is None for p in base.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in added.values())
        opt.step()
        opt.zero_grad()
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not torch.equal(p, old[n]) for n, p in added.items())
    share = trainable_share(rf)
    assert share["trainable"] == sum(p.numel() for p in added.values()) and 0 < share["share"] < 1


@pytest.mark.parametrize("name", list(BASES))
def test_incremental_decoding_with_the_cache_equals_the_full_forward(name):
    _, rf = make(name)
    x, nb, mask = inputs(N=19)
    with torch.no_grad():
        full = rf(x, nb, mask)
        cache = rf.new_cache()
        steps = [rf(x[:, :6], nb, mask, start_pos=0, cache=cache)]  # a prompt with one chunk complete
        for t in range(6, x.shape[1]):
            steps.append(rf(x[:, t:t + 1], nb, mask, start_pos=t, cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=2e-5)
    assert cache.chunks_encoded == x.shape[1] // M


@pytest.mark.parametrize("name", ["ours", "gpt2"])
def test_generation_retrieves_per_chunk_and_matches_greedy_full_forward(name):
    from models.generate import generate

    _, rf = make(name)

    def retriever(chunks):  # a deterministic function of each chunk's tokens
        nb = np.stack([(np.arange(2 * R).reshape(2, R) * 7 + int(c.sum())) % V for c in chunks])
        return nb, np.ones(nb.shape, dtype=bool)

    prompt = [3, 1, 4, 1, 5, 9]
    out = generate(rf, prompt, max_new_tokens=11, retriever=retriever, temperature=0)
    assert len(out.neighbours) == len(out.tokens) // M
    x = torch.tensor([out.tokens])
    nb = torch.as_tensor(np.stack(out.neighbours))[None]
    with torch.no_grad():
        logits = rf(x, nb, torch.ones(nb.shape, dtype=torch.bool))
    assert logits[0, len(prompt) - 1:-1].argmax(-1).tolist() == out.tokens[len(prompt):]


def test_the_added_weights_save_and_load_without_touching_the_base(tmp_path):
    from models import checkpoint as ckpt

    base, rf = make("gpt2")
    base.save_pretrained(tmp_path / "gpt2")
    files = {p.name: p.read_bytes() for p in (tmp_path / "gpt2").iterdir()}
    _, source = load_base(tmp_path / "gpt2")
    save_retrofit(rf, tmp_path / "rf", source)
    saved = json.loads((tmp_path / "rf" / "retrofit.json").read_text())
    assert saved["base"]["kind"] == "hf" and sorted(os.listdir(tmp_path / "rf")) == ["retrofit.json",
                                                                                     "retrofit.safetensors"]
    x, nb, mask = inputs()
    with torch.no_grad():
        expected = rf(x, nb, mask)
        for loaded in (load_retrofit(tmp_path / "rf", base=gpt2_like(base)), load_retrofit(tmp_path / "rf")):
            torch.testing.assert_close(loaded(x, nb, mask), expected, atol=0, rtol=0)
    assert {p.name: p.read_bytes() for p in (tmp_path / "gpt2").iterdir()} == files  # the base is untouched
    # our own decoder, referenced by its checkpoint folder
    mine, rf2 = make("ours")
    ckpt.RunCheckpoints(tmp_path / "plain").save(mine)
    _, source = load_base(tmp_path / "plain")
    save_retrofit(rf2, tmp_path / "rf2", source)
    with torch.no_grad():
        torch.testing.assert_close(load_retrofit(tmp_path / "rf2")(x, nb, mask), rf2(x, nb, mask), atol=0, rtol=0)
    # a base that changed since is refused
    with torch.no_grad():
        mine.embed.weight.add_(1.0)
    ckpt.RunCheckpoints(tmp_path / "plain").save(mine, step=1)
    with pytest.raises(ValueError, match="changed since it was retrofitted"):
        load_retrofit(tmp_path / "rf2")


def gpt2_like(base):
    """A fresh GPT-2 with the same weights (what a user re-creating the base passes as base=)."""
    twin = transformers.GPT2LMHeadModel(base.config).eval()
    twin.load_state_dict(base.state_dict())
    return twin


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match="cca_layers must be increasing 1-based layer numbers in 1..3"):
        retrofit(gpt2(), chunk_size=M, cca_layers=[4])
    with pytest.raises(ValueError, match="cca_layers"):
        retrofit(gpt2(), chunk_size=M, cca_layers=[0])
    with pytest.raises(ValueError, match="already has retrieval"):
        retrofit(RetroModel(RetroConfig(vocab_size=V, d_model=32, n_layers=2, seq_len=8, chunk_size=M,
                                        cca_start_layer=1)), chunk_size=M, cca_layers=[1])
    with pytest.raises(ValueError, match="layers='nope' is not a ModuleList"):
        retrofit(gpt2(), chunk_size=M, cca_layers=[1], layers="nope")
    with pytest.raises(ValueError, match="attention='mlp_x' is not a submodule"):
        retrofit(gpt2(), chunk_size=M, cca_layers=[1], attention="mlp_x")
    _, rf = make("gpt2")
    x, nb, mask = inputs()
    with pytest.raises(ValueError, match="neighbours has L=2"):
        rf(x, nb[:, :2], mask[:, :2])
    with pytest.raises(ValueError, match="start_pos > 0 needs a cache"):
        rf(x, nb, mask, start_pos=4)
    assert paper_cca_layers(12) == [6, 9, 12] and paper_cca_layers(4) == [4]
    assert isinstance(rf, RetrofitModel)


def test_retrofitting_a_base_again_detaches_the_previous_retrofit():
    base, first = make("gpt2")
    second = load_retrofit_like(first, base)
    x, nb, mask = inputs()
    with pytest.raises(ValueError, match="detached from its base"):
        first(x, nb, mask)
    with torch.no_grad():
        assert torch.equal(first(x), base_logits(base, x))  # OFF still works: it is the base
        assert (second(x, nb, mask) - base_logits(base, x)).abs().max() > 1e-3


def load_retrofit_like(rf, base):
    again = retrofit(base, chunk_size=M, cca_layers=rf.cfg.cca_layers, neighbour_len=R, seq_len=16,
                     kernels="reference")
    again.load_state_dict(rf.added_state_dict(), strict=False)
    return again


def test_the_demo_protocol_evaluates_three_settings_on_one_overlap_axis():
    from models.data import chunk_documents
    from models.demo import SETTINGS, aggregate, evaluate_three, table
    from models.evaluate import evaluate

    _, rf = make("ours")
    rng = np.random.default_rng(0)
    data = chunk_documents([rng.integers(2, V, n) for n in (30, 21, 40)], M)
    nb = rng.integers(2, V, (len(data), 2, R))
    nb[3, 0, :M] = data.tokens[4]  # chunk 4's text among the neighbours that predict it: overlap 1
    data = data.with_neighbours(nb, np.ones(nb.shape, dtype=bool))
    leaky = data.with_neighbours(np.roll(nb, 1, axis=0), data.neighbour_mask)
    byte_lengths = np.arange(V) % 3 + 1
    r = evaluate_three(rf, data, leaky, byte_lengths, "cpu")
    assert r["bpb"]["baseline"] == evaluate(rf.base, data, byte_lengths, retrieval=False)["bpb"]
    assert r["bpb"]["retrofit_on"] != r["bpb"]["baseline"]
    assert r["gain"] == r["bpb"]["baseline"] - r["bpb"]["retrofit_on"]
    curves = r["overlap"]
    assert curves["chunk_fraction"][-1] == 1.0 and curves["chunk_fraction"][0] < 1.0
    for name in SETTINGS:  # at alpha = 1 every chunk counts: the overall bpb
        assert curves[name][-1] == pytest.approx(r["bpb"][name], rel=1e-9)
    seeds = [dict(r, seed=0), dict(r, seed=1, gain=r["gain"] + 0.01,
                                   bpb={**r["bpb"], "retrofit_on": r["bpb"]["retrofit_on"] - 0.01})]
    summary = aggregate(seeds)
    assert summary["gain"]["mean"] == pytest.approx(r["gain"] + 0.005)
    assert summary["gain"]["std"] == pytest.approx(0.01 / np.sqrt(2))
    assert "mean +- std" in table(seeds, summary)


def test_the_demo_refuses_a_bad_seed_count(tmp_path, capsys):
    from models import demo

    assert demo.main(["--seeds", "0", "--out", str(tmp_path / "d")]) == 2
    assert "--seeds" in capsys.readouterr().err and not (tmp_path / "d").exists()
