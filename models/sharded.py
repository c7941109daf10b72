"""Model and optimizer state of any layout (one process, DDP, FSDP, tensor parallel) in safetensors files.

torch.distributed.checkpoint saves each rank's shards to its own `shard-XXXXX-model-...safetensors`
file (HuggingFaceStorageWriter), with the offset of every shard in the file's header; any other layout
or number of processes reads back the slices it holds (HuggingFaceStorageReader). Nothing is pickled:
DCP's default format unpickles its `.metadata` file, this one reads safetensors headers only. Keys:
``model.<parameter>`` and ``optim.state.<parameter>.<exp_avg|exp_avg_sq|step>`` (tensors only: the
optimizer's hyperparameters come from the run's arguments).
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


def _tied(model) -> set:
    """Names of parameters that are another one (tied embeddings): stored once."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        (tied.add(name) if id(p) in seen else seen.add(id(p)))
    return tied


def _model_state(model) -> dict:
    tied = _tied(model)
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


def load_model(folder, model, strict: bool = True) -> tuple[list, list]:
    """Read ``model``'s parameters (its layout's slices of them); (missing, unexpected) key lists.
    strict: a KeyError unless the checkpoint holds exactly the model's parameters."""
    state, saved = _model_state(model), {k for k in saved_keys(folder) if k.startswith("model.")}
    missing, unexpected = sorted(k[6:] for k in state.keys() - saved), sorted(k[6:] for k in saved - state.keys())
    if strict and (missing or unexpected):
        raise KeyError(f"the checkpoint lacks {missing[:5]} and has {unexpected[:5]} that the model lacks")
    _read({k: v for k, v in state.items() if k in saved}, folder)
    return missing, unexpected


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
