"""Training: AdamW, warmup + cosine, clipping, accumulation, bf16 on GPU, checkpoints, exact resume, DDP.

    python -m models train --db DIR --out runs/x [--steps 2000 --batch-size 16 ...]
    torchrun --nproc-per-node 2 -m models train --db DIR --out runs/x   # DDP (gloo on CPU, nccl on GPU)

Everything random in a step is a function of (seed, step): the batch order
(`SequenceBatches`), the retrieval dropout, and the global torch RNG, which is
saved in each checkpoint. So `--resume` continues exactly where a straight run
would have been.

Retrieval dropout: with probability `retrieval_dropout` a training sequence
gets all its neighbours masked, which makes every CCA output of it zero: the
model also learns to work as a plain decoder, so "retrieval OFF" is a fair
baseline for the same weights.

Retrofit (`--retrofit CKPT`): start from a plain decoder checkpoint
(retrieval=False), add CCA layers and the encoder, freeze the decoder and
train only the new parameters.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import outdir
from .cli_common import SEED, Parser, UsageError, check_value, command, integer, number
from .config import KERNELS, RetroConfig
from .data import ChunkedTokens, SequenceBatches, sequence_overlap_weights
from .evaluate import bits_per_byte, token_nll
from .model import RetroModel, lm_loss
from .runtime import resolve_device, setup_distributed

# The range of every numeric training argument, once: argparse type= functions
# for the command line, and TrainArgs.validate() for callers of train().
LIMITS = {
    "steps": integer(1, 10**9), "batch_size": integer(1, 1 << 20), "accum": integer(1, 1 << 20),
    "lr": number(0, lo_open=True),
    "min_lr_ratio": number(0, 1), "warmup": integer(0), "weight_decay": number(0), "clip": number(0),
    "retrieval_dropout": number(0, 1), "overlap_sampling": number(0), "eval_every": integer(0),
    "eval_sequences": integer(1), "ckpt_every": integer(0), "keep": integer(1), "seed": SEED,
}


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient norm or evaluation number: training stops (--allow-nonfinite lets it run)."""


@dataclass
class TrainArgs:
    out: str = "runs/retro"
    steps: int = 1000
    batch_size: int = 8  # sequences per optimizer step, over all processes and accumulation
    accum: int = 1  # gradient accumulation micro-steps per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    retrieval_dropout: float = 0.25
    overlap_sampling: float = 0.0  # > 0: sample sequences with weight (this + their neighbour overlap); 0: uniform
    eval_every: int = 0  # 0: only at the end
    eval_sequences: int = 32
    ckpt_every: int = 0  # 0: only at the end
    keep: int = 2
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # replace a finished run in `out` (its checkpoints go once the first new one is saved)
    allow_nonfinite: bool = False  # keep going on a NaN/inf loss (default: stop with an error)
    retrofit: Optional[str] = None
    device: str = "auto"
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        """ValueError naming the field unless every number is in its range (LIMITS)."""
        for name, parse in LIMITS.items():
            check_value(name, getattr(self, name), parse)
        if self.batch_size % self.accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by accum ({self.accum})")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run in out, or replace it")


def lr_at(step: int, a: TrainArgs) -> float:
    """Linear warmup to lr, then cosine down to lr * min_lr_ratio at the last step."""
    if a.warmup and step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    progress = (step - a.warmup) / max(1, a.steps - a.warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * cos)


def build_model(cfg: RetroConfig, a: TrainArgs) -> RetroModel:
    """A fresh model, or a retrofitted one: a plain decoder's frozen weights plus new CCA/encoder."""
    if not a.retrofit:
        return RetroModel(cfg)
    base = ckpt.load_config(a.retrofit)
    if base.retrieval:
        raise ValueError(f"--retrofit expects a plain decoder checkpoint (retrieval=False); {a.retrofit} has retrieval")
    shape = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "feed_forward", "ff_mult",
             "rotary_base", "tie_embeddings")
    mismatch = [k for k in shape if getattr(base, k) != getattr(cfg, k)]
    if mismatch:
        raise ValueError(f"--retrofit: the decoder checkpoint differs from the config in {mismatch}")
    model = RetroModel(cfg)
    missing, unexpected = ckpt.load_model_weights(model, a.retrofit, strict=False)
    bad = [k for k in missing if not RetroModel.is_retrieval_parameter(k)]
    if bad or unexpected:
        raise ValueError(f"--retrofit: checkpoint does not match the decoder (missing {bad}, unexpected {unexpected})")
    for name, p in model.named_parameters():
        p.requires_grad_(RetroModel.is_retrieval_parameter(name))
    return model


def make_optimizer(model: RetroModel, a: TrainArgs) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95))


def drop_retrieval(mask: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Mask all neighbours of each sequence with probability p (that sequence then runs as a plain LM)."""
    if p <= 0:
        return mask
    keep = torch.rand(mask.shape[0], generator=generator) >= p
    return mask & keep.view(-1, *([1] * (mask.dim() - 1)))


def evaluate_loss(model, data: ChunkedTokens, byte_lengths, a: TrainArgs, device, retrieval=True) -> dict:
    """Quick held-out numbers during training (on the first eval_sequences sequences)."""
    m, N = data.chunk_size, model.cfg.seq_len
    rows = min(len(data), a.eval_sequences * (N // m))
    sub = ChunkedTokens(data.tokens[:rows], data.valid[:rows], data.doc[:rows],
                        None if data.neighbours is None else data.neighbours[:rows],
                        None if data.neighbour_mask is None else data.neighbour_mask[:rows])
    on = retrieval and sub.neighbours is not None and model.cfg.retrieval
    nll, pred = token_nll(model, sub, on, batch_size=8, device=device, autocast=device.type == "cuda")
    out = {"loss": float(nll[pred].sum() / max(1, pred.sum()))}
    if byte_lengths is not None:
        out["bpb"] = bits_per_byte(nll, pred, np.asarray(byte_lengths)[sub.tokens])
    model.train()
    return out


def check_data(cfg: RetroConfig, train_data: ChunkedTokens, a: TrainArgs, world: int = 1) -> None:
    if cfg.retrieval and train_data.neighbours is None:
        raise ValueError("the config has retrieval=True but the training data has no neighbours")
    if train_data.chunk_size != cfg.chunk_size:
        raise ValueError(f"the data's chunk size ({train_data.chunk_size}) differs from the config's ({cfg.chunk_size})")
    if train_data.neighbours is not None and cfg.retrieval and (
            train_data.neighbours.shape[1] != cfg.num_neighbours or train_data.neighbours.shape[2] != cfg.R):
        raise ValueError(f"the data has (K, R) = {train_data.neighbours.shape[1:]} neighbours but the config "
                         f"expects ({cfg.num_neighbours}, {cfg.R})")
    if a.batch_size % (a.accum * world):
        raise ValueError(f"batch_size ({a.batch_size}) must be divisible by accum ({a.accum}) x processes ({world})")


def check_out(a: TrainArgs) -> None:
    """Refuse (OutputFolderError, exit 2) an --out that this run may not write into. Changes nothing."""
    out = Path(a.out)
    outdir.check_folder(out, "train-run", legacy=ckpt.is_run_folder)
    latest = ckpt.read_latest(out) if out.is_dir() else None
    if latest is not None and not (a.resume or a.overwrite):
        raise outdir.OutputFolderError(
            f"--out {str(out)!r} holds a training run (at step {latest.get('step')}, {ckpt.LATEST}); pass --resume "
            f"to continue it, or --overwrite to replace it (its checkpoints stay until the new run saves one)")


def train(cfg: RetroConfig, train_data: ChunkedTokens, a: TrainArgs, eval_data: Optional[ChunkedTokens] = None,
          byte_lengths: Optional[np.ndarray] = None, log=print) -> dict:
    """Train (or resume) and return {"model", "history", "step"}; checkpoints go to a.out.

    Rank 0 takes a.out for the run (outdir.claimed: new, empty or its own, locked).
    """
    a.validate()
    device = resolve_device(a.device)
    rank, world, device = setup_distributed(device)
    check_data(cfg, train_data, a, world)
    if rank != 0:
        return _train(cfg, train_data, a, eval_data, byte_lengths, log, rank, world, device)
    check_out(a)
    with outdir.claimed(a.out, "train-run", legacy=ckpt.is_run_folder, temporaries=ckpt.TEMPORARIES,
                        inside=ckpt.CHECKPOINT_FILES):
        check_out(a)  # under the lock
        return _train(cfg, train_data, a, eval_data, byte_lengths, log, rank, world, device)


def check_finite(what: str, value: float, step: int, a: TrainArgs) -> None:
    """TrainingDiverged unless ``value`` is finite or a.allow_nonfinite (train and retrofit training)."""
    if not math.isfinite(value) and not a.allow_nonfinite:
        raise TrainingDiverged(
            f"step {step}: the {what} is {value} (not finite); stopped before this step was saved "
            f"(what {a.out} held is intact); lower --lr, or pass --allow-nonfinite to go on")


def _train(cfg, train_data, a, eval_data, byte_lengths, log, rank, world, device) -> dict:
    out = Path(a.out)
    torch.manual_seed(a.seed)
    model = build_model(cfg, a).to(device)
    optimizer = make_optimizer(model, a)
    start_step, history = 0, []
    resuming = a.resume and (out / ckpt.LATEST).is_file()
    if resuming:
        saved = ckpt.load_config(out)
        if saved.to_dict() != {**cfg.to_dict(), "kernels": saved.kernels}:
            raise ValueError(f"--resume: the checkpoint in {out} was trained with a different config")
        ckpt.load_model_weights(model, out)
        state = ckpt.load_training_state(out, optimizer)
        start_step, history = state["step"], state.get("history", [])
        if rank == 0:
            log(f"resumed from {ckpt.resolve(out)} at step {start_step}")
    run = ckpt.RunCheckpoints(out, a.keep, replace_previous=a.overwrite) if rank == 0 else None
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    micro = a.batch_size // a.accum  # sequences per micro-step over all processes
    batches = SequenceBatches(train_data, cfg.seq_len, micro, seed=a.seed, rank=rank, world=world)
    if a.overlap_sampling > 0 and cfg.retrieval:
        weights = sequence_overlap_weights(batches, a.overlap_sampling)
        batches = SequenceBatches(train_data, cfg.seq_len, micro, seed=a.seed, rank=rank, world=world, weights=weights)
    autocast = device.type == "cuda"
    progress = None
    if rank == 0 and a.progress:
        from tqdm import tqdm

        progress = tqdm(total=a.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    tokens_per_step = a.batch_size * cfg.seq_len
    t0, tokens_seen = time.perf_counter(), 0
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]

    for step in range(start_step, a.steps):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, a)
        total = 0.0
        for k in range(a.accum):
            index = step * a.accum + k
            b = batches.batch(index)
            tokens, targets = b["tokens"].to(device), b["targets"].to(device)
            nb = mask = None
            if cfg.retrieval:
                gen = torch.Generator().manual_seed(a.seed * 1_000_003 + index * world + rank)
                nb = b["neighbours"].to(device)
                mask = drop_retrieval(b["neighbour_mask"], a.retrieval_dropout, gen).to(device)
            sync = k == a.accum - 1 or world == 1
            ctx = ddp_model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with ctx:
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                    logits = ddp_model(tokens, nb, mask)
                loss = lm_loss(logits, targets) / a.accum
                loss.backward()
            total += loss.item()
        done = step + 1
        check_finite("training loss", total, done, a)
        # clip 0: no clipping, but the norm is still measured: a non-finite gradient never reaches the weights
        norm = float(torch.nn.utils.clip_grad_norm_(trainable, a.clip or float("inf")))
        check_finite("gradient norm", norm, done, a)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += tokens_per_step
        rate = tokens_seen / (time.perf_counter() - t0)
        record = {"step": done, "loss": total, "lr": lr_at(step, a), "tokens_per_s": rate}
        if eval_data is not None and ((a.eval_every and done % a.eval_every == 0) or done == a.steps) and rank == 0:
            record["eval"] = evaluate_loss(model, eval_data, byte_lengths, a, device)
            if cfg.retrieval and eval_data.neighbours is not None:
                record["eval_off"] = evaluate_loss(model, eval_data, byte_lengths, a, device, retrieval=False)
            for name in ("eval", "eval_off"):
                for key, value in record.get(name, {}).items():
                    check_finite(f"held-out {key} ({name})", value, done, a)
            log(f"step {done}: eval {record['eval']}" + (f" off {record['eval_off']}" if "eval_off" in record else ""))
        history.append(record)
        if progress is not None:
            progress.set_postfix(loss=f"{total:.3f}", tok_s=f"{rate:,.0f}")
            progress.update(1)
        if run is not None and ((a.ckpt_every and done % a.ckpt_every == 0) or done == a.steps):
            run.save(model, optimizer, done, {"history": history, "args": asdict(a)})
    if progress is not None:
        progress.close()
    if world > 1:
        dist.barrier()
    return {"model": model, "history": history, "step": max(a.steps, start_step)}


# ---------------------------------------------------------------------------
# python -m models train
# ---------------------------------------------------------------------------

def add_model_arguments(p) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=integer(1, 1 << 16), default=256)
    g.add_argument("--layers", type=integer(1, 1024), default=6)
    g.add_argument("--heads", type=integer(1, 1024), default=4)
    g.add_argument("--kv-heads", type=integer(1, 1024), default=None,
                   help="fewer than --heads: grouped-query attention")
    g.add_argument("--ff", choices=("gated", "gelu"), default="gated")
    g.add_argument("--seq-len", type=integer(1, 1 << 24), default=512,
                   help="N, a multiple of the database's chunk size")
    g.add_argument("--neighbours", type=integer(1, 4096), default=2, help="K neighbours per chunk")
    g.add_argument("--cca-start", type=integer(1, 1024), default=3,
                   help="first decoder layer with CCA (1-based; paper: 6 or 9)")
    g.add_argument("--cca-every", type=integer(1, 1024), default=3)
    g.add_argument("--no-retrieval", action="store_true", help="train a plain decoder (no CCA, no encoder)")
    g.add_argument("--dropout", type=number(0, 1, hi_open=True), default=0.0,
                   help="decoder dropout (attention, feed-forward)")
    g.add_argument("--encoder-ff-mult", type=integer(1, 64), default=4,
                   help="retrieval encoder feed-forward width / d_model")
    g.add_argument("--kernels", choices=KERNELS, default="auto", help="auto (fused where available) or a backend")


def add_train_arguments(p) -> None:
    from .cli_common import checkpoint, device, folder

    g = p.add_argument_group("training")
    d = TrainArgs()
    g.add_argument("--out", type=folder, default=d.out, help="checkpoint directory")
    g.add_argument("--steps", type=LIMITS["steps"], default=d.steps)
    g.add_argument("--batch-size", type=LIMITS["batch_size"], default=d.batch_size, help="sequences per optimizer step")
    g.add_argument("--accum", type=LIMITS["accum"], default=d.accum, help="gradient accumulation micro-steps")
    g.add_argument("--lr", type=LIMITS["lr"], default=d.lr)
    g.add_argument("--warmup", type=LIMITS["warmup"], default=d.warmup)
    g.add_argument("--weight-decay", type=LIMITS["weight_decay"], default=d.weight_decay)
    g.add_argument("--clip", type=LIMITS["clip"], default=d.clip, help="gradient norm clip (0: none)")
    g.add_argument("--retrieval-dropout", type=LIMITS["retrieval_dropout"], default=d.retrieval_dropout,
                   help="fraction of sequences trained with their neighbours masked")
    g.add_argument("--overlap-sampling", type=LIMITS["overlap_sampling"], default=d.overlap_sampling,
                   help="> 0: draw training sequences with weight (this + the mean overlap of their chunks with "
                        "their neighbours), so sequences whose neighbours are informative come more often")
    g.add_argument("--eval-every", type=LIMITS["eval_every"], default=d.eval_every, help="steps (0: at the end)")
    g.add_argument("--ckpt-every", type=LIMITS["ckpt_every"], default=d.ckpt_every, help="steps (0: at the end)")
    g.add_argument("--seed", type=LIMITS["seed"], default=d.seed)
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (its checkpoints are deleted once the new run saved one)")
    g.add_argument("--allow-nonfinite", action="store_true", help="keep training on a NaN/inf loss (default: stop)")
    g.add_argument("--retrofit", type=checkpoint, default=None,
                   help="a plain decoder checkpoint: freeze it, train CCA + encoder")
    g.add_argument("--device", type=device, default="auto")
    g.add_argument("--no-progress", action="store_true")


def config_from_arguments(args, db) -> RetroConfig:
    """The model config of the command line and the database; UsageError when they do not fit."""
    extra = {"db_fingerprint": db.fingerprint, "tokenizer_fingerprint": db.tokenizer_fingerprint}
    have_k = int(db.config["k"])
    if not args.no_retrieval and args.neighbours > have_k:
        raise UsageError(f"--neighbours {args.neighbours}: the database precomputed {have_k} neighbours per chunk "
                         f"(rebuild it with -k {args.neighbours})")
    try:
        cfg = RetroConfig(
            vocab_size=db.vocab_size, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
            n_kv_heads=args.kv_heads, feed_forward=args.ff, seq_len=args.seq_len, chunk_size=db.chunk_size,
            num_neighbours=args.neighbours, neighbour_len=db.neighbour_len, retrieval=not args.no_retrieval,
            cca_start_layer=min(args.cca_start, args.layers), cca_every=args.cca_every, kernels=args.kernels,
            dropout=args.dropout, encoder_ff_mult=args.encoder_ff_mult, extra=extra,
        )
        if args.retrofit:
            base = ckpt.load_config(args.retrofit)
            trained_with = base.extra.get("tokenizer_fingerprint")
            if trained_with and trained_with != db.tokenizer_fingerprint:
                raise UsageError(f"--retrofit {args.retrofit} was trained with another tokenizer than --db {args.db}'s "
                                 f"({trained_with} vs {db.tokenizer_fingerprint})")
            cfg = base.replace(retrieval=True, num_neighbours=args.neighbours,
                               cca_start_layer=min(args.cca_start, base.n_layers), cca_every=args.cca_every,
                               kernels=args.kernels, extra=extra)
    except ckpt.CheckpointError:
        raise
    except ValueError as e:  # RetroConfig: the arguments do not fit together or with the database
        raise UsageError(str(e)) from None
    return cfg


def train_args_from(args) -> TrainArgs:
    a = TrainArgs(
        out=args.out, steps=args.steps, batch_size=args.batch_size, accum=args.accum, lr=args.lr,
        warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip,
        retrieval_dropout=args.retrieval_dropout, overlap_sampling=args.overlap_sampling,
        eval_every=args.eval_every, ckpt_every=args.ckpt_every, seed=args.seed, resume=args.resume,
        overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite, retrofit=args.retrofit,
        device=args.device, progress=not args.no_progress,
    )
    if a.batch_size % a.accum:
        raise UsageError(f"--batch-size {a.batch_size} must be a multiple of --accum {a.accum}")
    if a.resume and a.overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run in --out, or replace it")
    a.validate()  # the ranges: argparse checked them with the same LIMITS
    return a


@command("train")
def main(argv=None) -> int:
    from .cli_common import database
    from .data import from_stream, open_database, token_byte_lengths

    p = Parser("python -m models train", description=__doc__.split("\n\n")[0])
    p.add_argument("--db", type=database, required=True,
                   help="retrieval database directory (python -m models build-db)")
    add_model_arguments(p)
    add_train_arguments(p)
    args = p.parse_args(argv)
    a = train_args_from(args)  # every check that needs no file: before anything is read
    if int(os.environ.get("RANK", "0")) == 0:
        check_out(a)
    db = open_database(args.db)
    cfg = config_from_arguments(args, db)
    K = cfg.num_neighbours if cfg.retrieval else None
    train_data = from_stream(db, "train", K)
    eval_data = from_stream(db, "eval", K)
    try:
        result = train(cfg, train_data, a, eval_data, token_byte_lengths(db.tokenizer))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    last = result["history"][-1] if result["history"] else {}
    if int(os.environ.get("RANK", "0")) == 0:
        ran = f"last loss {last['loss']:.4f}, eval {last.get('eval')}" if last else "no step left to run"
        print(f"done: step {result['step']}, {ran}, checkpoint in {args.out}")
    return 0
