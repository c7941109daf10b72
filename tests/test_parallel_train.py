"""FSDP, tensor-parallel and FSDP x tensor-parallel training (torchrun, 2 CPU processes, gloo) against one process
on the same global batches and seeds; an FSDP checkpoint resumed exactly and read back in one process."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import checkpoint as ckpt
from models.errors import UsageError
from models.evaluate import token_nll
from models.parallel import check_heads

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_train import args, config, synthetic_data  # noqa: E402

LAYOUTS = {"fsdp": dict(parallel="fsdp"), "tp": dict(tp=2), "fsdp_tp": dict(parallel="fsdp", tp=2),
           "fsdp_ac": dict(parallel="fsdp", activation_checkpointing=True)}
RUN = dict(steps=4, batch_size=4, accum=2, ckpt_every=2, keep=5)


def retrofit_run(out, **layout):
    """A retrofit of a seeded plain decoder (the same on every process), trained a few steps: (model, losses)."""
    from models.model import RetroModel
    from models.retrofit import retrofit
    from models.retrofit_train import train_retrofit

    torch.manual_seed(0)
    model = retrofit(RetroModel(config(retrieval=False)), chunk_size=4, cca_layers=[2], neighbour_len=8, seq_len=16,
                     kernels="reference")
    history = train_retrofit(model, synthetic_data(), args(out, steps=3, accum=1, **layout), log=lambda *_: None)
    return model, [h["loss"] for h in history]


def _worker(out):
    """Under torchrun: each layout trains; then the fsdp run resumes from its step-2 checkpoint."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from models.train import train

    out, losses = Path(out), {}
    for name, layout in LAYOUTS.items():
        run = train(config(), synthetic_data(), args(out / name, **RUN, **layout), log=lambda *_: None)
        losses[name] = [h["loss"] for h in run["history"]]
        if name == "fsdp":  # the weights the sharded run ended with, gathered
            full = get_model_state_dict(run["model"], options=StateDictOptions(full_state_dict=True))
            if dist.get_rank() == 0:
                save_file({k: v.contiguous() for k, v in full.items() if k != "lm_head.weight"},
                          str(out / "fsdp_weights.safetensors"))
    if dist.get_rank() == 0:
        shutil.copytree(out / "fsdp" / "step-00000002", out / "resumed" / "step-00000002")
        shutil.copy(out / "fsdp" / ".retro_kernels.json", out / "resumed")  # train's marker: the folder is a run
        (out / "resumed" / "latest.json").write_text(json.dumps({"checkpoint": "step-00000002", "step": 2,
                                                                 "checkpoints": ["step-00000002"], "superseded": []}))
    dist.barrier()
    run = train(config(), synthetic_data(), args(out / "resumed", **RUN, parallel="fsdp", resume=True),
                log=lambda *_: None)
    losses["resumed"] = [h["loss"] for h in run["history"]]
    for name, layout in {"retrofit_fsdp": dict(parallel="fsdp"), "retrofit_tp": dict(tp=2)}.items():
        model, losses[name] = retrofit_run(out / name, **layout)
        added = model.added_state_dict()  # gathered from the shards, on every process
        if dist.get_rank() == 0:
            save_file({k: v.contiguous() for k, v in added.items()}, str(out / f"{name}.safetensors"))
    if dist.get_rank() == 0:
        (out / "losses.json").write_text(json.dumps(losses))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from models.train import train

    single = train(config(), synthetic_data(), args(out / "single", **RUN), log=lambda *_: None)
    return out, json.loads((out / "losses.json").read_text()), single


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_processes_train_as_one(runs, layout):
    out, losses, single = runs
    expected = [h["loss"] for h in single["history"]]
    assert losses[layout] == pytest.approx(expected, rel=1e-5), layout
    metrics = [json.loads(line) for line in (out / layout / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(m["tokens_per_s"] > 0 for m in metrics)
    assert [m["loss"] for m in metrics] == losses[layout] and "eval" not in metrics[0]


def test_retrofit_trains_as_one_process_with_its_frozen_base_sharded(runs):
    out, losses, _ = runs
    model, expected = retrofit_run(out / "retrofit_single")
    for name in ("retrofit_fsdp", "retrofit_tp"):
        assert losses[name] == pytest.approx(expected, rel=1e-5), name
        added = load_file(str(out / f"{name}.safetensors"))
        assert {k: v.shape for k, v in added.items()} == {k: v.shape for k, v in model.added_state_dict().items()}


def test_fsdp_checkpoint_resumes_exactly_and_loads_in_one_process(runs, monkeypatch):
    out, losses, single = runs
    assert losses["resumed"][2:] == losses["fsdp"][2:]  # the steps after the checkpoint, exactly
    for name in ("load", "loads", "Unpickler"):  # reading the shards of 2 processes unpickles nothing
        monkeypatch.setattr(pickle, name, lambda *a, **k: pytest.fail("a checkpoint load unpickled"))
    model = ckpt.load_checkpoint_model(out / "fsdp")  # written by 2 processes, read by one
    trained = load_file(str(out / "fsdp_weights.safetensors"))
    assert trained and all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    data = synthetic_data()  # and it evaluates as the one-process run's model does (to float tolerance)
    nll, pred = token_nll(model, data, True)
    nll_single, _ = token_nll(single["model"], data, True)
    assert nll[pred].mean() == pytest.approx(nll_single[pred].mean(), rel=1e-4)


def test_layouts_that_cannot_be_formed_are_refused_in_one_line(monkeypatch):
    with pytest.raises(UsageError, match=r"--tp 3 must divide the number of processes \(1"):
        args("x", tp=3)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UsageError, match="--tp 2 with --parallel ddp: DDP replicates whole models"):
        args("x", tp=2)
    with pytest.raises(UsageError, match="--batch-size 3 must be a multiple of --accum 1 x 2 data-parallel"):
        args("x", tp=2, parallel="fsdp", batch_size=3, accum=1)
    with pytest.raises(UsageError, match="--tp 4 must divide the attention heads .the model has heads 2, kv-heads 2"):
        check_heads(config(), 4)


if __name__ == "__main__":
    _worker(sys.argv[1])
