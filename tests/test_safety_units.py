"""Nothing a user has is ever lost: output folders, locks, checkpoints, non-finite runs.

The rule (docs/ARCHITECTURE.md, "What a command may delete or replace"): a
command deletes or replaces only what it can prove it made itself. These tests
need no database: real training on synthetic data (tests/test_train.py's).
The command-line half, with a real database, is tests/test_cli_safety.py.
"""
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models import checkpoint as ckpt
from models import outdir
from models.evaluate import check_finite_results, load_model
from models.model import RetroModel
from models.train import TrainArgs, TrainingDiverged, train
from test_train import args, config, synthetic_data

REPO = Path(__file__).resolve().parents[1]


def quiet(*_):
    pass


def snapshot(root: Path) -> dict:
    """Every file under root with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def user_folder(path: Path) -> dict:
    """A folder of someone's own files, some with names our commands use for theirs."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text('{"name": "app"}')
    (path / "src").mkdir(exist_ok=True)
    (path / "src" / "main.py").write_text("print('hello')\n")
    (path / "notes.tmp.txt").write_text("my notes")
    (path / "step-2023-backup").mkdir(exist_ok=True)
    (path / "step-2023-backup" / "model.safetensors").write_text("my backup")
    return snapshot(path)


# -- folders and locks -----------------------------------------------------------------

def test_a_folder_is_taken_only_when_new_empty_or_our_own(tmp_path):
    assert outdir.check_folder(tmp_path / "new", "train-run") == "new"
    (tmp_path / "empty").mkdir()
    assert outdir.check_folder(tmp_path / "empty", "train-run") == "empty"
    before = user_folder(tmp_path / "user")
    for kind in outdir.KINDS:
        with pytest.raises(outdir.OutputFolderError, match="not empty .* was not made by"):
            outdir.check_folder(tmp_path / "user", kind)
    assert snapshot(tmp_path / "user") == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(outdir.OutputFolderError, match="is a file"):
        outdir.check_folder(tmp_path / "file", "demo")
    with outdir.claimed(tmp_path / "mine", "train-run") as state:
        assert state == "new"
    assert outdir.check_folder(tmp_path / "mine", "train-run") == "ours"
    with pytest.raises(outdir.OutputFolderError, match="holds the output of `train`"):
        outdir.check_folder(tmp_path / "mine", "retrieval-db")


def test_a_second_run_on_a_folder_is_refused_at_once_naming_the_holder(tmp_path):
    with outdir.claimed(tmp_path / "out", "train-run"):
        with pytest.raises(outdir.FolderInUse) as refused:
            with outdir.claimed(tmp_path / "out", "train-run"):
                pass
        message = str(refused.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "pytest" in message
        # another process too (flock, not a file that merely exists)
        probe = subprocess.run([sys.executable, "-c", "import sys; from models import outdir\n"
                                "try:\n    outdir.locked(sys.argv[1]).__enter__()\n"
                                "except outdir.FolderInUse as e:\n    print(e); sys.exit(3)", str(tmp_path / "out")],
                               cwd=REPO, capture_output=True, text=True, timeout=60)
        assert probe.returncode == 3 and f"pid {os.getpid()}" in probe.stdout, probe.stderr
    with outdir.claimed(tmp_path / "out", "train-run"):  # released: the next run may go
        pass


def test_stale_temporaries_go_but_look_alike_user_files_stay(tmp_path):
    data, cfg = synthetic_data(), config()
    out = tmp_path / "run"
    train(cfg, data, args(out, steps=1, accum=1), log=quiet)
    crashed = out / ".step-00000007.abcd_123"  # what a write killed mid-checkpoint leaves
    crashed.mkdir()
    (crashed / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"half")
    (out / "latest.json.tmpx1y2z3w4").write_text("{")
    (out / "notes.tmp.txt").write_text("mine")
    odd = out / ".step-00000008.qwertyui"  # our name, but someone's file inside: left alone
    odd.mkdir()
    (odd / "mine.txt").write_text("mine")
    train(cfg, data, args(out, steps=2, accum=1, resume=True), log=quiet)
    assert not crashed.exists() and not (out / "latest.json.tmpx1y2z3w4").exists()
    assert (out / "notes.tmp.txt").read_text() == "mine" and (odd / "mine.txt").read_text() == "mine"


# -- checkpoints -------------------------------------------------------------------------

def test_pruning_deletes_only_the_runs_own_checkpoints(tmp_path):
    """glob("step-*") + rmtree would delete a user's step-2023-backup/."""
    out = tmp_path / "run"
    train(config(), synthetic_data(), args(out, steps=1, accum=1), log=quiet)  # a run of ours
    backup = out / "step-2023-backup"
    backup.mkdir()
    (backup / "model.safetensors").write_text("my backup")
    (out / "step-00000001" / "my-notes.txt").write_text("mine")  # a file of mine inside a checkpoint
    train(config(), synthetic_data(), args(out, steps=5, accum=1, ckpt_every=1, keep=2, resume=True), log=quiet)
    assert (backup / "model.safetensors").read_text() == "my backup"
    assert (out / "step-00000001" / "my-notes.txt").read_text() == "mine"  # emptied of ours, not deleted
    assert not ckpt.sharded.shard_files(out / "step-00000001")
    assert sorted(p.name for p in out.glob("step-0*")) == ["step-00000001", "step-00000004", "step-00000005"]
    assert ckpt.read_latest(out)["checkpoints"] == ["step-00000004", "step-00000005"]


def test_a_finished_run_is_replaced_only_on_request_and_only_after_the_new_checkpoint(tmp_path, monkeypatch):
    """train without --resume must not silently replace a finished run; killed between the
    removal and the replace, latest.json must not name a deleted checkpoint."""
    out = tmp_path / "run"
    first = train(config(), synthetic_data(), args(out, steps=2, accum=1), log=quiet)
    with pytest.raises(outdir.OutputFolderError, match="holds a training run .* --resume .* --overwrite"):
        train(config(d_model=48), synthetic_data(), args(out, steps=2, accum=1), log=quiet)
    old = ckpt.resolve(out)
    # Replacing it, killed just before latest.json is written: the old run is whole and still the latest.
    real_write = ckpt.write_json_atomic

    def killed(path, obj):
        if Path(path).name == ckpt.LATEST:
            raise KeyboardInterrupt("killed")
        real_write(path, obj)

    monkeypatch.setattr(ckpt, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        train(config(d_model=48), synthetic_data(), args(out, steps=2, accum=1, overwrite=True), log=quiet)
    monkeypatch.setattr(ckpt, "write_json_atomic", real_write)
    assert ckpt.resolve(out) == old
    model = RetroModel(ckpt.load_config(out))
    ckpt.load_model_weights(model, out)
    for k, v in first["model"].state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    # Replaced for real: the new run's checkpoint is the latest, the old one is gone after it.
    train(config(d_model=48), synthetic_data(), args(out, steps=2, accum=1, overwrite=True), log=quiet)
    assert ckpt.load_config(out).d_model == 48
    assert ckpt.resolve(out).name == "step-00000002-2"  # never written over the old name
    assert not old.exists()


def test_a_hostile_latest_json_cannot_make_a_run_delete_outside_its_folder(tmp_path):
    victim = tmp_path / "step-00000001"
    victim.mkdir()
    (victim / "model.safetensors").write_text("not yours")
    out = tmp_path / "run"
    train(config(), synthetic_data(), args(out, steps=1, accum=1), log=quiet)
    latest = json.loads((out / ckpt.LATEST).read_text())
    (out / ckpt.LATEST).write_text(json.dumps({**latest, "superseded": ["../step-00000001"]}))
    with pytest.raises(ckpt.CheckpointError, match="latest.json is corrupted"):
        train(config(), synthetic_data(), args(out, steps=2, accum=1, resume=True), log=quiet)
    assert (victim / "model.safetensors").read_text() == "not yours"


def test_broken_checkpoint_files_get_an_error_naming_the_file(tmp_path):
    out = tmp_path / "run"
    train(config(), synthetic_data(), args(out, steps=1, accum=1), log=quiet)
    weights = ckpt.resolve(out) / "shard-00001-model-00001-of-00001.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ckpt.CheckpointError, match=f"{weights}.* not a valid safetensors file"):
        load_model(out)
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # foreign: no tensors at all
    with pytest.raises(ckpt.CheckpointError, match=f"{weights.parent}.* does not match"):
        load_model(out)
    weights.write_bytes(data)
    (weights.parent / "config.json").write_text(dataclasses.replace(ckpt.load_config(out), d_model=64).to_json())
    with pytest.raises(ckpt.CheckpointError, match="does not match the model its config.json describes"):
        load_model(out)
    (weights.parent / "config.json").write_text('{"vocab_size": 10, "rotary_base": -1}')
    with pytest.raises(ckpt.CheckpointError, match="config.json: RetroConfig: rotary_base"):
        load_model(out)
    (out / ckpt.LATEST).write_text("{")
    with pytest.raises(ckpt.CheckpointError, match="latest.json is corrupted"):
        load_model(out)


# -- non-finite numbers ------------------------------------------------------------------

def test_bad_training_numbers_are_refused_before_anything_runs(tmp_path):
    """--clip -1 would run gradient ascent, --weight-decay nan would save a NaN model, ..."""
    for bad, match in [(dict(clip=-1.0), "clip"), (dict(weight_decay=float("nan")), "weight_decay"),
                       (dict(steps=0), "steps"), (dict(retrieval_dropout=2.0), "retrieval_dropout"),
                       (dict(warmup=-5), "warmup"), (dict(eval_every=-1), "eval_every"),
                       (dict(batch_size=0), "batch_size"), (dict(accum=0), "accum"), (dict(keep=0), "keep"),
                       (dict(lr=float("inf")), "lr"), (dict(batch_size=4, accum=3), "multiple of --accum"),
                       (dict(resume=True, overwrite=True), "exclude each other")]:
        with pytest.raises(ValueError, match=match):
            train(config(), synthetic_data(), args(tmp_path / "run", **bad), log=quiet)
    assert not (tmp_path / "run").exists()


def nan_checkpoint(path: Path, cfg) -> Path:
    """A real checkpoint whose weights are NaN (what a diverged run would save)."""
    model = RetroModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    ckpt.RunCheckpoints(path).save(model, step=1)
    outdir.write_marker(path, "train-run")  # as train() marks its folder
    return path


def test_training_stops_on_a_non_finite_loss_and_saves_nothing(tmp_path):
    out = nan_checkpoint(tmp_path / "run", config())  # a run at step 1 whose weights are NaN
    before = snapshot(out)  # with the marker (the lock file comes with the run)
    with pytest.raises(TrainingDiverged, match="step 2: the training loss is nan"):
        train(config(), synthetic_data(), args(out, steps=2, accum=1, resume=True), log=quiet)
    assert ckpt.read_latest(out)["checkpoint"] == "step-00000001" and sorted(out.glob("step-*")) == [
        out / "step-00000001"]
    assert {k: v for k, v in snapshot(out).items() if k != outdir.LOCK} == before
    run = train(config(), synthetic_data(), args(out, steps=2, accum=1, resume=True, allow_nonfinite=True),
                log=quiet)
    assert run["history"][-1]["loss"] != run["history"][-1]["loss"]  # nan, because it was allowed


def test_evaluation_refuses_nan_weights_and_nan_results(tmp_path):
    base = nan_checkpoint(tmp_path / "nan", config())
    with pytest.raises(ckpt.CheckpointError, match="NaN/inf weights"):
        load_model(base)
    assert load_model(base, allow_nonfinite=True) is not None
    with pytest.raises(ValueError, match=r"bits per byte \(off\) is nan \(a non-finite loss\)"):
        check_finite_results({"off": {"bpb": float("nan"), "bytes": 10}})
    with pytest.raises(ValueError, match="no predicted bytes"):
        check_finite_results({"off": {"bpb": 1.0, "bytes": 5}, "on": {"bpb": float("nan"), "bytes": 0}})
    check_finite_results({"off": {"bpb": 1.0, "bytes": 5}})


def test_train_args_validate_types_too():
    with pytest.raises(ValueError, match=r"steps: expected an integer in \[1, 1000000000\], got .2.5."):
        TrainArgs(steps=2.5).validate()
    with pytest.raises(ValueError, match="clip: expected a number"):
        TrainArgs(clip=True).validate()
    TrainArgs().validate()


def test_a_checkpoint_without_optimizer_loads_and_other_files_stay(tmp_path):
    model = RetroModel(config())
    save_file({"x": torch.zeros(1)}, str(tmp_path / "unrelated.safetensors"))
    path = ckpt.RunCheckpoints(tmp_path).save(model, step=3)
    assert ckpt.resolve(tmp_path) == path and not any(k.startswith("optim.") for k in ckpt.sharded.saved_keys(path))
    assert (tmp_path / "unrelated.safetensors").exists()
