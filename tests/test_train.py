"""Training: exact resume, checkpoints without pickle, DDP keeps ranks identical."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import checkpoint as ckpt
from models import sharded
from models.config import RetroConfig
from models.data import ChunkedTokens, chunk_documents
from models.model import RetroModel
from models.train import TrainArgs, make_optimizer, train

V = 53


def synthetic_data(seed=0, docs=12, K=2, m=4, R=8):
    rng = np.random.default_rng(seed)
    data = chunk_documents([rng.integers(1, V, rng.integers(10, 40)) for _ in range(docs)], m)
    C = len(data)
    nb = rng.integers(1, V, (C, K, R))
    mask = np.ones((C, K, R), dtype=bool)
    mask[::3, 1, 5:] = False
    return data.with_neighbours(nb, mask)


def config(**kw):
    base = dict(vocab_size=V, d_model=32, n_layers=3, n_heads=2, seq_len=16, chunk_size=4,
                neighbour_len=8, cca_start_layer=2, cca_every=3, kernels="reference")
    base.update(kw)
    return RetroConfig(**base)


def args(out, **kw):
    base = dict(out=str(out), steps=4, batch_size=4, accum=2, lr=3e-3, warmup=2, progress=False,
                retrieval_dropout=0.5, device="cpu")
    base.update(kw)
    return TrainArgs(**base)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_after_a_checkpoint_continues_exactly(tmp_path):
    data, cfg = synthetic_data(), config(dropout=0.1)  # dropout: the torch RNG state matters too
    straight = train(cfg, data, args(tmp_path / "a", ckpt_every=2, keep=5), log=lambda *_: None)
    assert any(k.startswith("optim.") for k in sharded.saved_keys(tmp_path / "a" / "step-00000002"))
    # A second run that has only the step-2 checkpoint resumes from it.
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "step-00000002", tmp_path / "b" / "step-00000002")
    shutil.copy(tmp_path / "a" / ".retro_kernels.json", tmp_path / "b")  # train's marker: the folder is a run
    (tmp_path / "b" / "latest.json").write_text(json.dumps({"checkpoint": "step-00000002", "step": 2,
                                                            "checkpoints": ["step-00000002"], "superseded": []}))
    resumed = train(cfg, data, args(tmp_path / "b", resume=True), log=lambda *_: None)
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]
    assert resumed["history"][2]["loss"] == straight["history"][2]["loss"]  # the next step's loss, exactly
    assert resumed["history"][3]["loss"] == straight["history"][3]["loss"]
    a, b = weights(straight["model"]), weights(resumed["model"])
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoints_are_not_pickles_and_load_back(tmp_path, monkeypatch):
    data, cfg = synthetic_data(), config()
    run = train(cfg, data, args(tmp_path, steps=1, accum=1), log=lambda *_: None)
    for name in ("load", "loads", "Unpickler"):  # loading a checkpoint, its optimizer state too, unpickles nothing
        monkeypatch.setattr(pickle, name, lambda *a, **k: pytest.fail("a checkpoint load unpickled"))
    model = RetroModel(cfg)
    ckpt.load_training_state(tmp_path, make_optimizer(model, args(tmp_path)), model=model)
    d = ckpt.resolve(tmp_path)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "rng.safetensors",
                                                   "shard-00001-model-00001-of-00001.safetensors", "state.json"]
    model = RetroModel(ckpt.load_config(tmp_path))
    ckpt.load_model_weights(model, tmp_path)
    for k, v in weights(run["model"]).items():
        assert torch.equal(model.state_dict()[k], v)
    assert not list(tmp_path.glob(".step-*")), "temporary checkpoint directories left behind"


def test_bad_training_inputs_are_refused_clearly(tmp_path):
    data = synthetic_data()
    with pytest.raises(ValueError, match="no neighbours"):
        train(config(), ChunkedTokens(data.tokens, data.valid, data.doc), args(tmp_path), log=lambda *_: None)
    with pytest.raises(ValueError, match="chunk size"):
        train(config(chunk_size=8, neighbour_len=8), data, args(tmp_path), log=lambda *_: None)


def _ddp_worker(out):
    """Run under torchrun: a few DDP steps, then each rank writes its weights."""
    from safetensors.torch import save_file

    result = train(config(), synthetic_data(), args(out, steps=3, accum=1, batch_size=4), log=lambda *_: None)
    rank = int(os.environ["RANK"])
    save_file({k: v.contiguous() for k, v in weights(result["model"]).items() if k != "lm_head.weight"},
              str(Path(out) / f"rank{rank}.safetensors"))


def test_ddp_two_cpu_processes_keep_identical_weights(tmp_path):
    from safetensors.torch import load_file

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29631",
           __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    w0, w1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    init = RetroModel(config())  # and they did train
    assert any(not torch.equal(w0[k], v) for k, v in init.state_dict().items() if k in w0)


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
