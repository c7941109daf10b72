"""Model and optimizer state of any layout in safetensors files, readable by any other layout.

torch.distributed.checkpoint's HuggingFace storage: one `shard-*.safetensors` per rank, located by the
headers' offsets, nothing pickled (DCP's default unpickles `.metadata`). Keys: ``model.<parameter>`` and
``optim.state.<parameter>.<exp_avg|exp_avg_sq|step>`` (tensors only: hyperparameters come from the args).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

SHARD_FILE = re.compile(r"shard-\d{5}-model-\d{5}-of-\d{5}\.safetensors")
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)  # one process: as meant


def shard_files(folder) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if SHARD_FILE.fullmatch(p.name)) if folder.is_dir() else []


def _model_state(model) -> dict:
    """``model.<name>`` of every state tensor; a tied parameter (the output layer's embedding) once."""
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    return {f"model.{k}": v for k, v in get_model_state_dict(model).items() if k not in tied}


def save(folder, model, optimizer=None) -> None:
    """Every rank writes its shards of the model (and optimizer state) into ``folder`` (collective)."""
    state = _model_state(model)
    if optimizer is not None:
        flat = get_optimizer_state_dict(model, optimizer, options=FLAT)
        state.update({f"optim.{k}": v for k, v in flat.items() if torch.is_tensor(v)})
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True),
             no_dist=not dist.is_initialized())


def _read(state: dict, folder) -> None:
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=not dist.is_initialized())


def saved_keys(folder) -> set:
    """The keys a checkpoint folder holds (read from the safetensors headers)."""
    return set(HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata)


def load_model(folder, model) -> None:
    """Read ``model``'s parameters (its layout's slices of them); a KeyError unless the checkpoint holds them all."""
    state, saved = _model_state(model), {k for k in saved_keys(folder) if k.startswith("model.")}
    if state.keys() != saved:
        raise KeyError(f"the checkpoint lacks {sorted(state.keys() - saved)[:5]} and has "
                       f"{sorted(saved - state.keys())[:5]} that the model lacks")
    _read(state, folder)


def load_optimizer(folder, model, optimizer) -> None:
    """Read the AdamW state of ``optimizer`` (over ``model``'s parameters, any layout); a checkpoint saved
    without one leaves it fresh."""
    saved = saved_keys(folder)
    if not any(k.startswith("optim.") for k in saved):
        return
    for group in optimizer.param_groups:  # the tensors the checkpoint's values are read into
        for p in group["params"]:
            optimizer.state[p] = {"step": torch.zeros(()), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}
    flat = get_optimizer_state_dict(model, optimizer, options=FLAT)
    tensors = {f"optim.{k}": v for k, v in flat.items() if torch.is_tensor(v)}
    if tensors.keys() - saved:
        raise KeyError(f"the checkpoint lacks optimizer state {sorted(tensors.keys() - saved)[:3]}")
    _read(tensors, folder)
    set_optimizer_state_dict(model, optimizer, {**flat, **{k[6:]: v for k, v in tensors.items()}}, options=FLAT)
