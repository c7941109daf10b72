"""Training: AdamW, warmup + cosine, clipping, accumulation, bf16 on GPU, checkpoints, exact resume, DDP/FSDP/TP.

    python -m models train --db DIR --out runs/x [--steps 2000 --batch-size 16 ...]
    torchrun --nproc-per-node 4 -m models train ... --parallel fsdp --tp 2   # FSDP2 x tensor parallel

Retrieval dropout, exact resume and the layouts' equal losses: docs/model.md, "Training".
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import outdir
from . import parallel
from .cli_common import SEED, Parser, UsageError, check_value, command, device, folder, integer, number
from .config import KERNELS, RetroConfig
from .data import ChunkedTokens, SequenceBatches
from .evaluate import bits_per_byte, token_nll
from .model import RetroModel, lm_loss
from .runtime import is_first_process, progress_bar, resolve_device, setup_distributed


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient norm or evaluation number: training stops (--allow-nonfinite lets it run)."""


def option(default, help: str, *, limit=None, type=None, cli: bool = True, choices: Optional[tuple] = None):
    """A TrainArgs field for the Python API and (cli) the command line: limit, a models.cli_common range that
    validate() checks too; choices: a string's values."""
    metadata = {"help": help, "limit": limit, "type": type or limit, "cli": cli, "choices": choices}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class TrainArgs:
    """What a training run is asked to do; the fields with cli=True are `python -m models train`'s flags."""
    out: str = option("runs/retro", "checkpoint directory", type=folder)
    steps: int = option(1000, "optimizer steps", limit=integer(1, 10**9))
    batch_size: int = option(8, "sequences per optimizer step (over all processes and accumulation)",
                             limit=integer(1, 1 << 20))
    accum: int = option(1, "gradient accumulation micro-steps", limit=integer(1, 1 << 20))
    lr: float = option(1e-3, "peak learning rate (after the warmup; AdamW)", limit=number(0, lo_open=True))
    min_lr_ratio: float = option(0.1, "the cosine schedule's last learning rate, as a fraction of lr",
                                 limit=number(0, 1), cli=False)
    warmup: int = option(100, "steps of linear learning-rate warmup", limit=integer(0))
    weight_decay: float = option(0.1, "AdamW weight decay of the weight matrices", limit=number(0))
    clip: float = option(1.0, "gradient norm clip (0: none)", limit=number(0))
    retrieval_dropout: float = option(0.25, "fraction of sequences trained with their neighbours masked",
                                      limit=number(0, 1))
    eval_every: int = option(0, "steps (0: at the end)", limit=integer(0))
    eval_sequences: int = option(32, "held-out sequences of the evaluation during training", limit=integer(1),
                                 cli=False)
    ckpt_every: int = option(0, "steps (0: at the end)", limit=integer(0))
    keep: int = option(2, "checkpoints kept (the newest)", limit=integer(1), cli=False)
    seed: int = option(0, "seed of the weights, the batch order and the retrieval dropout", limit=SEED)
    resume: bool = option(False, "continue from the latest checkpoint in --out")
    overwrite: bool = option(False, "replace the run in --out (its checkpoints are deleted once the new run "
                                    "saved one)")
    allow_nonfinite: bool = option(False, "keep training on a NaN/inf loss (default: stop)")
    device: str = option("auto", "auto (cuda if there is one), cpu, cuda or cuda:N", type=device)
    parallel: str = option("ddp", "under torchrun: ddp (whole model per rank) or fsdp (parameters, gradients and "
                                  "optimizer state sharded)", choices=("ddp", "fsdp"))
    tp: int = option(1, "tensor-parallel ranks splitting the attention heads (under torchrun; divides the "
                        "processes and the heads)", limit=integer(1, 1024))
    activation_checkpointing: bool = option(False, "recompute each block's activations in the backward pass")
    compile: bool = option(False, "torch.compile each block")
    progress: bool = option(True, "a progress bar on stderr")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """ValueError naming a number out of its range (LIMITS), UsageError unless the fields fit together."""
        for name, parse in LIMITS.items():
            check_value(name, getattr(self, name), parse)
        for f in dataclasses.fields(self):
            if f.metadata["choices"] and getattr(self, f.name) not in f.metadata["choices"]:
                raise UsageError(f"--{f.name} must be one of {f.metadata['choices']}, got {getattr(self, f.name)!r}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        parallel.check_layout(world, self.parallel, self.tp)
        world //= self.tp  # the data-parallel processes
        if self.batch_size % (self.accum * world):
            raise UsageError(f"--batch-size {self.batch_size} must be a multiple of --accum {self.accum}"
                             + (f" x {world} data-parallel processes" if world > 1 else ""))
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite exclude each other: continue the run in --out, or replace it")


# Every numeric argument's range: argparse type= of train, retrofit and demo; TrainArgs.validate().
LIMITS = {f.name: f.metadata["limit"] for f in dataclasses.fields(TrainArgs) if f.metadata["limit"]}
TRAIN_FLAGS = tuple(f.name for f in dataclasses.fields(TrainArgs) if f.metadata["cli"])


def add_train_flags(group, names=TRAIN_FLAGS, defaults: Optional[TrainArgs] = None) -> None:
    """One flag per TrainArgs field in ``names``: its type, default (``defaults``' value) and help from the field."""
    defaults = defaults or TrainArgs()
    for f in dataclasses.fields(TrainArgs):
        if f.name not in names:
            continue
        meta, default, flag = f.metadata, getattr(defaults, f.name), "--" + f.name.replace("_", "-")
        if isinstance(default, bool):  # a True default: --no-FLAG turns it off
            group.add_argument(flag, action=argparse.BooleanOptionalAction if default else "store_true",
                               default=default, help=meta["help"])
        else:
            group.add_argument(flag, type=meta["type"], default=default, help=meta["help"], choices=meta["choices"])


def train_args_from(flags, names=TRAIN_FLAGS, **given) -> TrainArgs:
    """The TrainArgs of parsed flags (those ``add_train_flags(names)`` declared), and the fields ``given``."""
    return TrainArgs(**{name: getattr(flags, name) for name in names}, **given)


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warmup to lr, then cosine down to lr * min_lr_ratio at the last step."""
    if args.warmup and step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cos)


def make_optimizer(model: torch.nn.Module, args: TrainArgs) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on the matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def drop_retrieval(mask: torch.Tensor, p: float, generator: torch.Generator, rank: int = 0,
                   world: int = 1) -> torch.Tensor:
    """Mask all neighbours of each sequence with probability p (that sequence then runs as a plain LM);
    ``mask`` is rank's share (every world-th sequence) of the global micro-batch the draws are for."""
    if p <= 0:
        return mask
    keep = (torch.rand(mask.shape[0] * world, generator=generator) >= p)[rank::world]
    return mask & keep.view(-1, *([1] * (mask.dim() - 1)))


def evaluate_loss(model, data: ChunkedTokens, byte_lengths, args: TrainArgs, device, retrieval=True) -> dict:
    """Quick held-out numbers during training (on the first eval_sequences sequences)."""
    m, N = data.chunk_size, model.cfg.seq_len
    rows = min(len(data), args.eval_sequences * (N // m))
    sub = ChunkedTokens(*(None if a is None else a[:rows] for a in (data.tokens, data.valid, data.doc,
                                                                     data.neighbours, data.neighbour_mask)))
    on = retrieval and sub.neighbours is not None and model.cfg.retrieval
    nll, pred = token_nll(model, sub, on, batch_size=8, device=device, autocast=device.type == "cuda")
    out = {"loss": float(nll[pred].sum() / max(1, pred.sum()))}
    if byte_lengths is not None:
        out["bpb"] = bits_per_byte(nll, pred, np.asarray(byte_lengths)[sub.tokens])
    model.train()
    return out


def check_finite(what: str, value: float, step: int, args: TrainArgs) -> None:
    """TrainingDiverged unless ``value`` is finite or args.allow_nonfinite (train and retrofit training)."""
    if not math.isfinite(value) and not args.allow_nonfinite:
        raise TrainingDiverged(
            f"step {step}: the {what} is {value} (not finite); stopped before this step was saved "
            f"(what {args.out} held is intact); lower --lr, or pass --allow-nonfinite to go on")


def is_due(done: int, every: int, steps: int) -> bool:
    """Whether something done every ``every`` steps (0: only at the end) is due after step ``done``."""
    return bool(every and done % every == 0) or done == steps


class TrainingLoop:
    """Optimizer steps over seeded batches (train and retrofit), ``model`` placed in place on the run's layout
    (models.parallel; ``forward``: the model or its DDP wrapper). held_out_off: held-out numbers without
    retrieval too."""

    def __init__(self, model, data: ChunkedTokens, args: TrainArgs, device, rank: int, world: int, *,
                 retrieval: bool, held_out_off: bool = False, name: str = "train"):
        check_data(model.cfg, data)
        parallel.check_heads(model.cfg, args.tp)
        self.layout = layout = parallel.make_layout(world, rank, device, args.parallel, args.tp)
        self.forward = parallel.prepare(model.to(device), layout, device, args.activation_checkpointing, args.compile)
        self.model, self.optimizer, self.args, self.device = model, make_optimizer(model, args), args, device
        self.batches = SequenceBatches(data, model.cfg.seq_len, args.batch_size // args.accum, seed=args.seed,
                                       rank=layout.dp_rank, world=layout.dp_size)
        self.retrieval, self.held_out_off, self.name, self.rank = retrieval, held_out_off, name, rank
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def run(self, start_step: int = 0, history: Optional[list] = None, eval_data=None, byte_lengths=None,
            log=print, save=None, metrics: Optional[Path] = None) -> list:
        """Steps start_step..args.steps-1 appended to ``history`` (and to ``metrics``, JSON lines);
        ``save(step, history)`` when a checkpoint is due."""
        args, history = self.args, [] if history is None else history
        rewrite = True  # the first record comes after the history that a resumed run saved
        tokens_per_step = args.batch_size * self.model.cfg.seq_len
        bar = progress_bar(total=args.steps, initial=start_step, desc=self.name, unit="step",
                           enabled=self.rank == 0 and args.progress)
        t0 = time.perf_counter()
        self.model.train()
        for step in range(start_step, args.steps):
            done = step + 1
            loss = self.step(step)
            rate = (done - start_step) * tokens_per_step / (time.perf_counter() - t0)
            record = {"step": done, "loss": loss, "lr": lr_at(step, args), "tokens_per_s": rate}
            if eval_data is not None and is_due(done, args.eval_every, args.steps):
                record.update(self.held_out(eval_data, byte_lengths, done, log))
            history.append(record)
            if metrics is not None:
                with metrics.open("w" if rewrite else "a") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in (history if rewrite else [record])))
                rewrite = False
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
            bar.update(1)
            if save is not None and is_due(done, args.ckpt_every, args.steps):
                save(done, history)
        bar.close()
        return history

    def step(self, step: int) -> float:
        """One optimizer step; its loss (summed over the micro-steps). Stops on a non-finite loss or gradient."""
        args = self.args
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        micro = [self.batches.batch(step * args.accum + k) for k in range(args.accum)]
        tokens = self.layout.sum(sum((b["targets"] != -100).sum() for b in micro).to(self.device)).clamp(min=1)
        loss = sum(self.micro_step(b, step * args.accum + k, tokens, last=k == args.accum - 1)
                   for k, b in enumerate(micro))
        loss = float(self.layout.sum(loss))
        check_finite("training loss", loss, step + 1, args)
        # clip 0: no clipping, but the norm is still measured: a non-finite gradient never reaches the weights
        norm = parallel.clip_grad_norm(self.trainable, args.clip or float("inf"))
        check_finite("gradient norm", norm, step + 1, args)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def micro_step(self, batch: dict, index: int, step_tokens: torch.Tensor, last: bool) -> torch.Tensor:
        """Forward and backward of micro-batch ``index``; its share of the step's loss (whose ``step_tokens``
        targets all ranks share). DDP syncs the gradients on the last one."""
        args, device, layout = self.args, self.device, self.layout
        tokens, targets = batch["tokens"].to(device), batch["targets"].to(device)
        neighbours = mask = None
        if self.retrieval:
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + index)
            neighbours = batch["neighbours"].to(device)
            mask = drop_retrieval(batch["neighbour_mask"], args.retrieval_dropout, generator, layout.dp_rank,
                                  layout.dp_size).to(device)
        ddp = isinstance(self.forward, torch.nn.parallel.DistributedDataParallel)
        with self.forward.no_sync() if ddp and not last else contextlib.nullcontext():
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = self.forward(tokens, neighbours, mask)
            loss = lm_loss(logits, targets, reduction="sum") / step_tokens
            (loss * layout.dp_size).backward()  # the ranks' gradients are averaged: their sum is the step's
        return loss.detach()

    def held_out(self, eval_data, byte_lengths, done: int, log) -> dict:
        """{"eval": ..., "eval_off": ...}: held-out loss and bpb with retrieval, and (held_out_off) without;
        stops on a non-finite number."""
        numbers = {"eval": evaluate_loss(self.model, eval_data, byte_lengths, self.args, self.device)}
        if self.held_out_off and eval_data.neighbours is not None:
            numbers["eval_off"] = evaluate_loss(self.model, eval_data, byte_lengths, self.args, self.device,
                                                retrieval=False)
        for name, values in numbers.items():
            for key, value in values.items():
                check_finite(f"held-out {key} ({name})", value, done, self.args)
        log(f"{self.name} step {done}: eval {numbers['eval']}"
            + (f" off {numbers['eval_off']}" if "eval_off" in numbers else ""))
        return numbers


def check_data(cfg: RetroConfig, train_data: ChunkedTokens) -> None:
    if cfg.retrieval and train_data.neighbours is None:
        raise ValueError("the config has retrieval=True but the training data has no neighbours")
    if train_data.chunk_size != cfg.chunk_size:
        raise ValueError(f"the data's chunk size ({train_data.chunk_size}) differs from the config's ({cfg.chunk_size})")
    if cfg.retrieval and train_data.neighbours.shape[1:] != (cfg.num_neighbours, cfg.R):
        raise ValueError(f"the data has (K, R) = {train_data.neighbours.shape[1:]} neighbours but the config "
                         f"expects ({cfg.num_neighbours}, {cfg.R})")


def check_out(args: TrainArgs) -> str:
    """Refuse (OutputFolderError, exit 2) an --out this run may not write into; its outdir state."""
    out = Path(args.out)
    state = outdir.check_folder(out, "train-run")
    latest = ckpt.read_latest(out) if out.is_dir() else None
    if latest is not None and not (args.resume or args.overwrite):
        raise outdir.OutputFolderError(
            f"--out {str(out)!r} holds a training run (at step {latest.get('step')}, {ckpt.LATEST}); pass --resume "
            f"to continue it, or --overwrite to replace it (its checkpoints stay until the new run saves one)")
    return state


def train(cfg: RetroConfig, train_data: ChunkedTokens, args: TrainArgs, eval_data: Optional[ChunkedTokens] = None,
          byte_lengths: Optional[np.ndarray] = None, log=print) -> dict:
    """Train (or resume) and return {"model", "history", "step"}; rank 0 claims and locks args.out."""
    rank, world, device = setup_distributed(resolve_device(args.device))
    parallel.check_heads(cfg, args.tp)
    check_data(cfg, train_data)  # before rank 0 claims --out (TrainingLoop checks again)
    if rank != 0:
        return _train(cfg, train_data, args, eval_data, byte_lengths, log, rank, world, device)
    with outdir.claimed(args.out, "train-run", temporaries=ckpt.TEMPORARIES, inside=ckpt.CHECKPOINT_FILES,
                        check=lambda: check_out(args)):
        return _train(cfg, train_data, args, eval_data, byte_lengths, log, rank, world, device)


def _train(cfg, train_data, args: TrainArgs, eval_data, byte_lengths, log, rank, world, device) -> dict:
    log = log if rank == 0 else (lambda msg: None)
    torch.manual_seed(args.seed)
    model = RetroModel(cfg)
    loop = TrainingLoop(model, train_data, args, device, rank, world, retrieval=cfg.retrieval,
                        held_out_off=cfg.retrieval)
    start_step, history = _resumed_state(cfg, model, loop.optimizer, args, log)
    run = ckpt.RunCheckpoints(Path(args.out), args.keep, replace_previous=args.overwrite)

    def save(step, history):
        run.save(model, loop.optimizer, step, {"history": history, "args": asdict(args)})

    metrics = Path(args.out) / "metrics.jsonl" if rank == 0 else None
    history = loop.run(start_step, history, eval_data, byte_lengths, log, save, metrics)
    if world > 1:
        dist.barrier()
    return {"model": model, "history": history, "step": max(args.steps, start_step)}


def _resumed_state(cfg, model, optimizer, args: TrainArgs, log) -> tuple[int, list]:
    """(step, history) of the run --resume continues (weights, optimizer, RNG loaded), or (0, [])."""
    out = Path(args.out)
    if not (args.resume and (out / ckpt.LATEST).is_file()):
        return 0, []
    saved = ckpt.load_config(out)
    if saved.to_dict() != {**cfg.to_dict(), "kernels": saved.kernels}:
        raise ValueError(f"--resume: the checkpoint in {out} was trained with a different config")
    ckpt.load_model_weights(model, out)
    state = ckpt.load_training_state(out, optimizer, model=model)
    log(f"resumed from {ckpt.resolve(out)} at step {state['step']}")
    return state["step"], state.get("history", [])


# python -m models train

# The model's flags: {flag: add_argument keywords}; retrofit takes some of them (with its own defaults).
MODEL_FLAGS = {
    "--d-model": dict(type=integer(1, 1 << 16), default=256, help="hidden size"),
    "--layers": dict(type=integer(1, 1024), default=6, help="decoder layers"),
    "--heads": dict(type=integer(1, 1024), default=4, help="attention heads"),
    "--kv-heads": dict(type=integer(1, 1024), default=None, help="fewer than --heads: grouped-query attention"),
    "--ff": dict(choices=("gated", "gelu"), default="gated", help="feed-forward: gated (SwiGLU) or GELU"),
    "--seq-len": dict(type=integer(1, 1 << 24), default=512, help="N, a multiple of the database's chunk size"),
    "--neighbours": dict(type=integer(1, 4096), default=2, help="K neighbours per chunk"),
    "--cca-start": dict(type=integer(1, 1024), default=3,
                        help="first decoder layer with CCA (1-based; paper: 6 or 9)"),
    "--cca-every": dict(type=integer(1, 1024), default=3, help="a CCA layer every this many decoder layers"),
    "--no-retrieval": dict(action="store_true", help="train a plain decoder (no CCA, no encoder)"),
    "--dropout": dict(type=number(0, 1, hi_open=True), default=0.0, help="decoder dropout (attention, feed-forward)"),
    "--encoder-ff-mult": dict(type=integer(1, 64), default=4, help="retrieval encoder feed-forward width / d_model"),
    "--kernels": dict(choices=KERNELS, default="auto", help="auto (fused where available) or a backend"),
}


def add_model_flags(group, names=tuple(MODEL_FLAGS), **changes) -> None:
    """The MODEL_FLAGS in ``names``; ``changes``: {flag name with _ for -: add_argument keywords to change}."""
    for name in names:
        group.add_argument(name, **{**MODEL_FLAGS[name], **changes.get(name[2:].replace("-", "_"), {})})


def config_from_flags(flags, db) -> RetroConfig:
    """The model config of the command line and the database; UsageError when they do not fit."""
    extra = {"db_fingerprint": db.fingerprint, "tokenizer_fingerprint": db.tokenizer_fingerprint}
    have_k = int(db.config["k"])
    if not flags.no_retrieval and flags.neighbours > have_k:
        raise UsageError(f"--neighbours {flags.neighbours}: the database precomputed {have_k} neighbours per chunk "
                         f"(rebuild it with -k {flags.neighbours})")
    try:
        cfg = RetroConfig(  # the command line's numbers must fit together and with the database
            vocab_size=db.vocab_size, d_model=flags.d_model, n_layers=flags.layers, n_heads=flags.heads,
            n_kv_heads=flags.kv_heads, feed_forward=flags.ff, seq_len=flags.seq_len, chunk_size=db.chunk_size,
            num_neighbours=flags.neighbours, neighbour_len=db.neighbour_len, retrieval=not flags.no_retrieval,
            cca_start_layer=min(flags.cca_start, flags.layers), cca_every=flags.cca_every, kernels=flags.kernels,
            dropout=flags.dropout, encoder_ff_mult=flags.encoder_ff_mult, extra=extra,
        )
        parallel.check_heads(cfg, flags.tp)
        return cfg
    except ValueError as e:  # RetroConfig: the arguments do not fit together or with the database
        raise UsageError(str(e)) from None


@command("train")
def main(argv=None) -> int:
    from .cli_common import database
    from .data import from_stream, open_database, token_byte_lengths

    p = Parser("python -m models train", description=__doc__.split("\n\n")[0])
    p.add_argument("--db", type=database, required=True,
                   help="retrieval database directory (python -m models build-db)")
    add_model_flags(p.add_argument_group("model"))
    add_train_flags(p.add_argument_group("training"))
    flags = p.parse_args(argv)
    args = train_args_from(flags)  # every check that needs no file: before anything is read
    if is_first_process():
        check_out(args)
    db = open_database(flags.db)
    cfg = config_from_flags(flags, db)
    K = cfg.num_neighbours if cfg.retrieval else None
    train_data, eval_data = from_stream(db, "train", K), from_stream(db, "eval", K)
    try:
        result = train(cfg, train_data, args, eval_data, token_byte_lengths(db.tokenizer))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    last = result["history"][-1] if result["history"] else {}
    if is_first_process():
        ran = f"last loss {last['loss']:.4f}, eval {last.get('eval')}" if last else "no step left to run"
        print(f"done: step {result['step']}, {ran}, checkpoint in {flags.out}")
    return 0
