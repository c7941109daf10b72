"""What a command takes from the machine: the device, CPU threads, torchrun's processes, progress bars.
(torch is imported inside the functions: `python -m models db-info` needs none of it.)
"""
from __future__ import annotations

import os
import sys
from typing import Optional


def resolve_device(name: str) -> "torch.device":
    """The torch device of a --device value (models.cli_common.device checked it): auto is cuda if there is one."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def configure_threads(threads: Optional[int] = None) -> int:
    """Set torch's CPU threads: `threads`, or the idle cores by the load average (a pool wider than them
    makes every op wait for a descheduled thread: docs/model.md, "Threads")."""
    import torch

    if threads is None:
        cores = os.cpu_count() or 1
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        threads = max(1, min(cores, int(cores - load + 0.5)))
    torch.set_num_threads(threads)
    return threads


def setup_distributed(device: "torch.device") -> tuple[int, int, "torch.device"]:
    """(rank, world size, device) for training; starts the process group under torchrun (nccl on GPUs)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return rank, world, device


def is_first_process() -> bool:
    """Rank 0 under torchrun, or the only process: the one that owns the output folder and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def progress_bar(total=None, desc: str = "", unit: str = "it", enabled: bool = True, initial: int = 0):
    """A tqdm bar on stderr (disabled: one whose update, set_postfix and close do nothing)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                smoothing=0.1, file=sys.stderr, mininterval=0.5)
