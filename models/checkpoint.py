"""A training run's checkpoints: `step-XXXXXXXX/` folders (config.json, shard-*.safetensors, rng.safetensors,
state.json) and `latest.json`, which names the newest and lists the run's own (the only ones it deletes).
Written atomically, never pickled; the layout and its guarantees: docs/model.md, "Checkpoints".
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException

from . import sharded
from .atomic import fsync_dir, temporaries, write_json_atomic
from .config import RetroConfig
from .errors import one_line
from .model import RetroModel

LATEST = "latest.json"
RUN_KIND = "retro_kernels/train-run"
CHECKPOINT_FILES = ("config.json", "rng.safetensors", "state.json", sharded.SHARD_FILE)
STEP_NAME = re.compile(r"step-\d{8}(?:-\d+)?")
# Leftovers of killed runs, removed when a run takes the folder (mkdtemp below; atomic_file for latest.json).
TEMPORARIES = (re.compile(r"\.step-\d{8}\.[a-z0-9_]{8}"), *temporaries(LATEST))


class CheckpointError(ValueError):
    """A checkpoint (or latest.json) that is missing, corrupted, or does not match; the message names the file."""


def rng_state() -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    n, p = np.random.get_state(), random.getstate()
    return tensors, {"numpy": [n[0], n[1].tolist(), int(n[2]), int(n[3]), float(n[4])],
                     "python": [p[0], list(p[1]), p[2]]}


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("torch_cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    n, p = meta["numpy"], meta["python"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    random.setstate((p[0], tuple(p[1]), p[2]))


# -- a run's checkpoints ----------------------------------------------------------

def read_latest(out) -> Optional[dict]:
    """`out/latest.json` checked (it names step-* folders inside `out` only), or None if there is none."""
    path = Path(out) / LATEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupted ({one_line(e)})") from None
    ok = isinstance(data, dict) and all(isinstance(data.get(k), list) for k in ("checkpoints", "superseded"))
    named = [data.get("checkpoint"), *data["checkpoints"], *data["superseded"]] if ok else []
    ok = ok and all(isinstance(n, str) and STEP_NAME.fullmatch(n) for n in named)
    if not ok:
        raise CheckpointError(f"{path} is corrupted: expected {{\"checkpoint\": \"step-XXXXXXXX\", ...}} "
                              f"naming checkpoints of this folder")
    return data


def remove_checkpoint(path: Path) -> None:
    """Delete checkpoint folder `path`: only the files a checkpoint holds; a folder with anything else stays."""
    path = Path(path)
    if not STEP_NAME.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
        return
    for child in path.iterdir():
        ours = child.name in CHECKPOINT_FILES or sharded.SHARD_FILE.fullmatch(child.name)
        if ours and child.is_file() and not child.is_symlink():
            child.unlink()
    try:
        path.rmdir()
    except OSError:  # something that is not ours is inside: it stays
        pass


class RunCheckpoints:
    """The checkpoints of one training run in `out`; replace_previous: a new registry, the previous run's
    checkpoints deleted once the first new one is saved (else latest.json's registry continues)."""

    def __init__(self, out, keep: int = 2, replace_previous: bool = False):
        self.out, self.keep = Path(out), keep
        latest = read_latest(self.out) or {"checkpoints": [], "superseded": []}
        previous = latest["checkpoints"] if replace_previous else []
        self.mine = [] if replace_previous else list(latest["checkpoints"])
        self.superseded = list(latest["superseded"]) + list(previous)

    def _free_name(self, step: int) -> Path:
        name, n = f"step-{step:08d}", 0
        while os.path.lexists(self.out / name):  # a dangling link's name is taken too
            n += 1
            name = f"step-{step:08d}-{n}"
        return self.out / name

    def save(self, model, optimizer=None, step: int = 0, state: Optional[dict] = None) -> Optional[Path]:
        """Checkpoint ``step``; under torchrun every process calls it (each writes its shards), and the
        first one, which writes the rest and returns the folder, keeps the registry (the others: None)."""
        first = not dist.is_initialized() or dist.get_rank() == 0
        if first:
            self.out.mkdir(parents=True, exist_ok=True)
        tmp = [str(tempfile.mkdtemp(dir=self.out, prefix=f".step-{step:08d}.")) if first else None]
        if dist.is_initialized():
            dist.broadcast_object_list(tmp, src=0)
        tmp = Path(tmp[0])
        try:
            sharded.save(tmp, model, optimizer)
            if not first:
                return None
            (tmp / "config.json").write_text(model.cfg.to_json())
            meta = {"step": step, **(state or {})}
            rng_tensors, meta["rng"] = rng_state()
            save_file({f"rng.{k}": v for k, v in rng_tensors.items()}, str(tmp / "rng.safetensors"))
            (tmp / "state.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            final = self._free_name(step)
            os.replace(tmp, final)  # a new name: no checkpoint is deleted to make room
        except BaseException:
            if first:
                shutil.rmtree(tmp, ignore_errors=True)  # made by this call, just now
            raise
        fsync_dir(self.out)
        self.mine.append(final.name)
        keep, drop = self.mine[-self.keep:], self.superseded + self.mine[:-self.keep]
        write_json_atomic(self.out / LATEST, {"kind": RUN_KIND, "version": 1, "checkpoint": final.name,
                                              "step": step, "checkpoints": keep, "superseded": drop})
        for name in drop:  # latest.json already names the new one: the old ones may go
            remove_checkpoint(self.out / name)
        self.mine, self.superseded = keep, []
        return final


# -- loading: every failure names its file -----------------------------------------

def resolve(path) -> Path:
    """A checkpoint directory: `path` itself, or the one `path/latest.json` names."""
    path = Path(path)
    latest = read_latest(path) if path.is_dir() else None
    if latest is not None:
        named = path / latest["checkpoint"]
        if not named.is_dir():
            raise CheckpointError(f"{path / LATEST} names {latest['checkpoint']}, which does not exist")
        path = named
    if not sharded.shard_files(path) or not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no checkpoint at {str(path)!r}: expected a directory with config.json and shard-*.safetensors, "
            f"or a training output directory with {LATEST}")
    return path


def load_config(path) -> RetroConfig:
    file = resolve(path) / "config.json"
    try:
        return RetroConfig.from_json(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {file}: {one_line(e)}") from None


# What reading a damaged or mismatched checkpoint raises (DCP wraps the readers' errors in CheckpointException).
READ_ERRORS = (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError, RuntimeError,
               AssertionError, SafetensorError, CheckpointException)


def load_model_weights(model, path) -> None:
    """Load weights into `model` (any layout: its slices of them)."""
    folder = resolve(path)
    for file in sharded.shard_files(folder):
        try:
            safe_open(str(file), "pt").__exit__(None, None, None)  # reads and checks the header only
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"checkpoint {file} is not a valid safetensors file "
                                  f"(truncated, or not a checkpoint: {one_line(e)})") from None
    try:
        sharded.load_model(folder, model)
    except READ_ERRORS as e:
        raise CheckpointError(f"checkpoint {folder / 'shard-*.safetensors'} does not match the model its "
                              f"config.json describes ({one_line(e)[:400]})") from None


def refuse_nonfinite(model, where: str, advice: str = "", skip: str = "\0") -> None:
    """CheckpointError naming ``where`` if a parameter or buffer (not under ``skip``) holds NaN or inf."""
    bad = [name for name, t in model.state_dict().items()
           if not name.startswith(skip) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{where} holds NaN/inf weights in {len(bad)} tensor(s) (e.g. {bad[0]}){advice}")


def load_checkpoint_model(path, kernels: Optional[str] = None, device="cpu",
                          allow_nonfinite: bool = False) -> RetroModel:
    """The model of a checkpoint, for inference; a CheckpointError if its weights hold NaN or inf."""
    cfg = load_config(path)
    if kernels:
        cfg.kernels = kernels
    model = RetroModel(cfg)
    load_model_weights(model, path)
    if not allow_nonfinite:
        refuse_nonfinite(model, f"checkpoint {resolve(path) / 'shard-*.safetensors'}",
                         ": its training diverged; use an earlier checkpoint")
    return model.to(device).eval()


def load_training_state(path, optimizer=None, restore_rng: bool = True, model=None) -> dict:
    """Load the optimizer state (of ``model``'s parameters) and RNG states; returns the JSON state (step, args...)."""
    path = resolve(path)
    current = path / "state.json"
    try:
        meta = json.loads(current.read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
            raise ValueError("expected a JSON object with an integer step")
        if optimizer is not None:
            current = path / "shard-*.safetensors"
            sharded.load_optimizer(path, model, optimizer)
        if restore_rng:
            current = path / "rng.safetensors"
            rng = load_file(str(current))
            set_rng_state({k[len("rng."):]: v for k, v in rng.items()}, meta["rng"])
    except READ_ERRORS as e:
        raise CheckpointError(f"checkpoint {current} cannot be resumed from ({type(e).__name__}: "
                              f"{one_line(e)[:300]})") from None
    return meta
