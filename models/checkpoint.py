"""Checkpoints without pickle, written atomically.

A checkpoint is a directory `step-XXXXXXXX/` holding

    config.json          the RetroConfig
    model.safetensors    the weights (tied weights stored once)
    optimizer.safetensors  every tensor of the optimizer state, flattened keys
    state.json           step, optimizer/scheduler scalars, RNG states, training args

It is written into a temporary directory and renamed into place (os.replace),
then `latest.json` is replaced to point at it: a run killed at any moment
leaves the previous checkpoint intact and `latest.json` naming a complete one.
Nothing is unpickled when loading: safetensors and JSON only.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from .config import RetroConfig

LATEST = "latest.json"


def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- nested state <-> (tensors, json) -----------------------------------------

def _flatten(obj, prefix: str, tensors: dict):
    """Replace tensors in a nested dict/list by {"__tensor__": key}, collecting them."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__":
                [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint without pickle")


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    return obj


def rng_state() -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("torch_cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# -- save / load ---------------------------------------------------------------

def save_checkpoint(out_dir, model, optimizer=None, step: int = 0, state: Optional[dict] = None,
                    keep: int = 2) -> Path:
    """Write checkpoint `step` under out_dir atomically; keep the newest `keep` ones."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".step-{step:08d}."))
    try:
        (tmp / "config.json").write_text(model.cfg.to_json())
        save_model(model, str(tmp / "model.safetensors"))
        meta = {"step": step, **(state or {})}
        rng_tensors, meta["rng"] = rng_state()
        save_file({f"rng.{k}": v for k, v in rng_tensors.items()}, str(tmp / "rng.safetensors"))
        if optimizer is not None:
            tensors: dict = {}
            meta["optimizer"] = _flatten(optimizer.state_dict(), "opt", tensors)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(out_dir / LATEST, {"checkpoint": final.name, "step": step})
    old = sorted(p for p in out_dir.glob("step-*") if p.is_dir() and p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def resolve(path) -> Path:
    """A checkpoint directory: `path` itself, or the one `path/latest.json` names."""
    path = Path(path)
    if (path / LATEST).is_file():
        path = path / json.loads((path / LATEST).read_text())["checkpoint"]
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: expected a directory with config.json and model.safetensors, "
            f"or a training output directory with {LATEST}")
    return path


def load_config(path) -> RetroConfig:
    return RetroConfig.from_json((resolve(path) / "config.json").read_text())


def load_model_weights(model, path, strict: bool = True):
    """Load weights into `model`; returns (missing, unexpected) key lists."""
    return load_model(model, str(resolve(path) / "model.safetensors"), strict=strict)


def load_training_state(path, optimizer=None, restore_rng: bool = True) -> dict:
    """Load optimizer state and RNG states; returns the JSON state (step, scheduler, args...)."""
    path = resolve(path)
    meta = json.loads((path / "state.json").read_text())
    if optimizer is not None and "optimizer" in meta:
        tensors = load_file(str(path / "optimizer.safetensors"))
        optimizer.load_state_dict(_unflatten(meta["optimizer"], tensors))
    if restore_rng:
        rng = load_file(str(path / "rng.safetensors"))
        set_rng_state({k[len("rng."):]: v for k, v in rng.items()}, meta["rng"])
    return meta
