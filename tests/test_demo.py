"""The model's data, metrics and command line (the demo itself runs in .ci/run: --quick)."""
import math

import numpy as np
import pytest
import torch

from models.config import RetroConfig
from models.data import IGNORE, SequenceBatches, chunk_documents, chunk_overlap, longest_common_run
from models.evaluate import evaluate
from models.model import RetroModel


def test_targets_stay_inside_documents_and_skip_padding():
    data = chunk_documents([[5, 6, 7], [8, 9, 10, 11, 12]], chunk_size=2, pad_id=0)
    assert data.tokens.tolist() == [[5, 6], [7, 0], [8, 9], [10, 11], [12, 0]]
    assert data.targets().tolist() == [[6, 7], [IGNORE, IGNORE], [9, 10], [11, 12], [IGNORE, IGNORE]]
    b = SequenceBatches(data, seq_len=4, batch_size=1, shuffle=False).gather(np.array([0, 4]))
    assert b["tokens"].tolist() == [[5, 6, 7, 0], [12, 0, 0, 0]]  # the last sequence is padded
    assert b["targets"].tolist() == [[6, 7, IGNORE, IGNORE], [IGNORE] * 4]


def test_chunk_overlap_uses_the_neighbours_of_the_previous_chunk():
    assert longest_common_run(np.array([1, 2, 3, 4]), np.array([9, 2, 3, 4, 1])) == 3
    data = chunk_documents([[1, 2, 3, 4, 5, 6, 7, 8]], chunk_size=4)
    nb = np.zeros((2, 1, 8), dtype=np.int64)
    nb[0, 0, 2:6] = [5, 6, 7, 9]  # chunk 0's neighbour holds 3 tokens of chunk 1
    data = data.with_neighbours(nb, np.ones(nb.shape, bool))
    assert chunk_overlap(data).tolist() == [0.0, 0.75]


def test_bits_per_byte_counts_predicted_tokens_and_their_bytes():
    V = 16
    cfg = RetroConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, seq_len=8, chunk_size=4,
                      num_neighbours=1, neighbour_len=8, cca_start_layer=1, kernels="reference")
    model = RetroModel(cfg)
    with torch.no_grad():
        model.embed.weight.zero_()  # tied: all logits 0, a uniform prediction: ln V nats per token
    data = chunk_documents([[1, 2, 3, 4, 5, 6], [7, 8, 9]], chunk_size=4)
    data = data.with_neighbours(np.ones((len(data), 1, 8), np.int64), np.ones((len(data), 1, 8), bool))
    byte_lengths = np.arange(V) % 3 + 1
    byte_lengths[0] = 0  # a special token: no bytes, never counted
    r = evaluate(model, data, byte_lengths, retrieval=True)
    predicted = [2, 3, 4, 5, 6, 8, 9]  # every token but each document's first
    assert r["tokens"] == len(predicted) and r["bytes"] == byte_lengths[predicted].sum()
    assert r["bpb"] == pytest.approx(len(predicted) * math.log(V) / math.log(2) / byte_lengths[predicted].sum())


def test_commands_report_missing_inputs_clearly(tmp_path, capsys):
    from models import evaluate as ev
    from models import generate as gen
    from models import train as tr

    assert tr.main(["--db", str(tmp_path / "nope"), "--out", str(tmp_path / "run")]) == 2
    assert "no retrieval database" in capsys.readouterr().err
    assert ev.main(["--checkpoint", str(tmp_path), "--db", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert gen.main(["--checkpoint", str(tmp_path), "--db", str(tmp_path), "--prompt", "x"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
