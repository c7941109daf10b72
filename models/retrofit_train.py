"""Training a retrofit, and ``python -m models retrofit``.

    python -m models retrofit --base BASE --db DB --out OUT [--cca-layers 6,9,12 --steps 1000 ...]

BASE is one of our plain decoder checkpoints (`python -m models train
--no-retrieval`) or a local transformers model folder (`save_pretrained`;
loaded with from_pretrained, offline, safetensors only). OUT receives
`retrofit.json` and `retrofit.safetensors` (the added weights only; the base
is referenced by path and sha256, never copied or changed); `models eval` and
`models generate` take OUT as their --checkpoint.

A base and a database must share a tokenizer, or the token ids mean
different things. Our databases carry their own byte-level BPE
(`tokenizer.json`), so:

- one of our decoders must have been trained on a database with the same
  vocabulary (a different database fingerprint is reported, not refused);
- a transformers folder must hold a `tokenizer.json` equal to the database's,
  and an embedding with exactly as many rows as it has tokens. Either build the
  database with the model's tokenizer (`build-db --tokenizer FOLDER/tokenizer.json`;
  it needs `<|endoftext|>` and `<|pad|>` special tokens, so add a pad token and
  resize the embedding first if the model lacks one), or build the model from a
  config with the database's vocabulary and save the database's tokenizer.json
  beside it (what the README example and the tests do).

Everything is checked before any weight is loaded; a mismatch is one line.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .cli_common import Parser, UsageError, command
from .data import ChunkedTokens, SequenceBatches, sequence_overlap_weights
from .model import lm_loss
from .retrofit import CONFIG_FILE, WEIGHTS_FILE, RetrofitModel, base_kind, paper_cca_layers
from .train import TrainArgs, drop_retrieval, evaluate_loss, lr_at, make_optimizer, resolve_device


def train_retrofit(model: RetrofitModel, data: ChunkedTokens, a: TrainArgs, eval_data: Optional[ChunkedTokens] = None,
                   byte_lengths: Optional[np.ndarray] = None, log=print) -> list:
    """Train the added weights of `model` on `data` (with its neighbours); returns the history.

    The batch order and the retrieval dropout are functions of (a.seed, step), as in `models.train`.
    """
    device = resolve_device(a.device)
    cfg = model.cfg
    if data.neighbours is None or data.neighbours.shape[1:] != (cfg.num_neighbours, cfg.R):
        raise ValueError(f"the training data must carry (K, R) = ({cfg.num_neighbours}, {cfg.R}) neighbours per chunk")
    model.to(device).train()
    optimizer = make_optimizer(model, a)
    batches = SequenceBatches(data, cfg.seq_len, a.batch_size, seed=a.seed)
    if a.overlap_sampling > 0:
        batches = SequenceBatches(data, cfg.seq_len, a.batch_size, seed=a.seed,
                                  weights=sequence_overlap_weights(batches, a.overlap_sampling))
    trainable = [p for p in model.parameters() if p.requires_grad]
    progress = None
    if a.progress:
        from tqdm import tqdm

        progress = tqdm(total=a.steps, desc="retrofit", unit="step", dynamic_ncols=True)
    history, t0 = [], time.perf_counter()
    for step in range(a.steps):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, a)
        b = batches.batch(step)
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
        mask = drop_retrieval(b["neighbour_mask"], a.retrieval_dropout, gen)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(b["tokens"].to(device), b["neighbours"].to(device), mask.to(device))
        loss = lm_loss(logits, b["targets"].to(device))
        loss.backward()
        if a.clip:
            torch.nn.utils.clip_grad_norm_(trainable, a.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        record = {"step": done, "loss": loss.item(), "lr": lr_at(step, a),
                  "tokens_per_s": done * a.batch_size * cfg.seq_len / (time.perf_counter() - t0)}
        if eval_data is not None and ((a.eval_every and done % a.eval_every == 0) or done == a.steps):
            record["eval"] = evaluate_loss(model, eval_data, byte_lengths, a, device)
            log(f"retrofit step {done}: eval {record['eval']}")
        history.append(record)
        if progress is not None:
            progress.set_postfix(loss=f"{record['loss']:.3f}")
            progress.update(1)
    if progress is not None:
        progress.close()
    return history


# ---------------------------------------------------------------------------
# python -m models retrofit
# ---------------------------------------------------------------------------

def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def parse_layers(text: str) -> list[int]:
    try:
        layers = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        layers = []
    _need(bool(layers) and layers == sorted(set(layers)) and layers[0] >= 1,
          f"--cca-layers: expected increasing 1-based layer numbers like 6,9,12, got {text!r}")
    return layers


def check_out(out: Path) -> None:
    """OUT must be new, empty, or a retrofit this command wrote (whose two files it then replaces)."""
    from .retrofit import is_retrofit

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {str(out)!r} is a file, expected a folder")
    if out.is_dir() and any(out.iterdir()) and not is_retrofit(out):
        raise ValueError(f"--out: {str(out)!r} is not empty and holds no {CONFIG_FILE} of ours: "
                         f"refusing to write into it (choose a new folder)")


def base_shape(path: Path, kind: str) -> dict:
    """The base's layer count, vocabulary, positions and sequence length, from its config only."""
    if kind == "models":
        from .checkpoint import load_config

        cfg = load_config(path)
        _need(not cfg.retrieval, f"--base: {str(path)!r} already has retrieval (CCA layers); retrofit a plain "
                                 f"decoder (python -m models train --no-retrieval)")
        return {"n_layers": cfg.n_layers, "vocab_size": cfg.vocab_size, "positions": None, "seq_len": cfg.seq_len,
                "db_fingerprint": cfg.extra.get("db_fingerprint")}
    from transformers import AutoConfig

    from .retrofit import _base_files

    _base_files(path, kind)  # refuses a folder with pickled weights only
    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    n_layers = getattr(cfg, "num_hidden_layers", None)
    _need(isinstance(n_layers, int), f"--base: {str(path)!r}'s config names no num_hidden_layers")
    return {"n_layers": n_layers, "vocab_size": getattr(cfg, "vocab_size", None),
            "positions": getattr(cfg, "max_position_embeddings", None), "seq_len": None, "db_fingerprint": None}


def check_tokenizer(path: Path, kind: str, shape: dict, db_path, db, log) -> None:
    """The one-line refusals of a base whose token ids would not be the database's."""
    if kind == "hf":
        from .retrieval import RetrievalDatabase

        tok = path / "tokenizer.json"
        _need(tok.is_file(), f"--base: {str(path)!r} has no tokenizer.json, so nothing shows it shares the "
                             f"database's tokenizer (build the database with the model's tokenizer.json, or save "
                             f"the database's tokenizer.json beside a model built with its vocabulary)")
        RetrievalDatabase.open(db_path, tokenizer=tok, verify=False)  # DatabaseError: a different tokenizer
    _need(shape["vocab_size"] == db.vocab_size,
          f"--base: the model has {shape['vocab_size']} token embeddings but the database's tokenizer has "
          f"{db.vocab_size} tokens; they must be the same tokenizer")
    if shape["db_fingerprint"] and shape["db_fingerprint"] != db.fingerprint:
        log(f"note: the base was trained on database {shape['db_fingerprint']}, retrofitting on {db.fingerprint} "
            f"(same vocabulary size; make sure it is the same tokenizer)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainArgs(steps=1000, lr=1e-3, warmup=100, retrieval_dropout=0.0)
    p.add_argument("--base", required=True, help="a plain models decoder checkpoint, or a local transformers folder")
    p.add_argument("--db", required=True, help="the retrieval database (same tokenizer as the base)")
    p.add_argument("--out", required=True, help="a new (or empty) folder for retrofit.json + retrofit.safetensors")
    g = p.add_argument_group("what is added")
    g.add_argument("--cca-layers", default=None, help="1-based layers followed by CCA, e.g. 6,9,12 "
                                                      "(default: every 3rd from 6, as in the paper)")
    g.add_argument("--encoder-layers", type=int, default=2)
    g.add_argument("--encoder-ff-mult", type=int, default=4)
    g.add_argument("--heads", type=int, default=None, help="CCA/encoder heads (default: the base's)")
    g.add_argument("--neighbours", type=int, default=2, help="K neighbours per chunk")
    g.add_argument("--layers", default=None, help="transformers models other than GPT-2/Llama: dotted path of "
                                                  "the decoder layers (e.g. model.decoder.layers)")
    g.add_argument("--attention", default=None, help="... and each layer's self-attention attribute (e.g. self_attn)")
    g.add_argument("--kernels", default="auto")
    g = p.add_argument_group("training (only the added weights)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the base's, or 512)")
    for name, kind, default in (("steps", int, d.steps), ("batch-size", int, d.batch_size), ("lr", float, d.lr),
                                ("warmup", int, d.warmup), ("weight-decay", float, d.weight_decay),
                                ("clip", float, d.clip), ("retrieval-dropout", float, d.retrieval_dropout),
                                ("overlap-sampling", float, d.overlap_sampling), ("eval-every", int, d.eval_every),
                                ("seed", int, d.seed)):
        g.add_argument(f"--{name}", type=kind, default=default)
    g.add_argument("--device", default="auto")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--no-progress", action="store_true")


def check_numbers(args) -> None:
    for name in ("steps", "batch_size", "encoder_layers", "encoder_ff_mult", "neighbours"):
        _need(getattr(args, name) >= 1, f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    _need(args.lr > 0 and np.isfinite(args.lr), f"--lr: expected a positive number, got {args.lr}")
    _need(args.warmup >= 0 and args.eval_every >= 0, "--warmup and --eval-every: expected integers >= 0")
    _need(0 <= args.retrieval_dropout < 1, f"--retrieval-dropout: expected a number in [0, 1), got {args.retrieval_dropout}")
    _need(args.overlap_sampling >= 0, f"--overlap-sampling: expected a number >= 0, got {args.overlap_sampling}")
    _need(args.heads is None or args.heads >= 1, f"--heads: expected an integer >= 1, got {args.heads}")
    _need(args.threads is None or args.threads >= 1, f"--threads: expected an integer >= 1, got {args.threads}")
    _need(args.seq_len is None or args.seq_len >= 1, f"--seq-len: expected an integer >= 1, got {args.seq_len}")


@command("retrofit")
def main(argv=None) -> int:
    from .config import KERNELS
    from .data import from_stream, open_database, token_byte_lengths
    from .retrofit import load_base, retrofit, save_retrofit, trainable_share
    from .train import configure_threads

    p = Parser("python -m models retrofit", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    check_numbers(args)
    _need(args.kernels in KERNELS, f"--kernels: expected one of {KERNELS}, got {args.kernels!r}")
    out, base_path = Path(args.out), Path(args.base)
    check_out(out)
    kind = base_kind(base_path)
    shape = base_shape(base_path, kind)
    db = open_database(args.db)
    m = db.chunk_size
    check_tokenizer(base_path, kind, shape, args.db, db, print)
    layers = parse_layers(args.cca_layers) if args.cca_layers else paper_cca_layers(shape["n_layers"])
    _need(layers[-1] <= shape["n_layers"], f"--cca-layers: the base has {shape['n_layers']} layers, got {layers}")
    seq_len = args.seq_len or shape["seq_len"] or 512
    _need(seq_len % m == 0, f"--seq-len: expected a multiple of the database's chunk size {m}, got {seq_len}")
    _need(not shape["positions"] or seq_len <= shape["positions"],
          f"--seq-len: the base has {shape['positions']} positions, got {seq_len}")
    _need(args.neighbours <= int(db.config.get("k", args.neighbours)),
          f"--neighbours: the database precomputed {db.config.get('k')} neighbours per chunk, got {args.neighbours}")

    threads = configure_threads(args.threads)
    device = resolve_device(args.device)
    train_data = from_stream(db, "train", args.neighbours)  # refuses a K the database lacks
    eval_data = from_stream(db, "eval", args.neighbours)
    base, source = load_base(base_path, device)
    torch.manual_seed(args.seed)
    model = retrofit(base, chunk_size=m, cca_layers=layers, encoder_layers=args.encoder_layers,
                     num_neighbours=args.neighbours, neighbour_len=db.neighbour_len, seq_len=seq_len,
                     heads=args.heads, encoder_ff_mult=args.encoder_ff_mult, kernels=args.kernels,
                     layers=args.layers, attention=args.attention, extra={"db_fingerprint": db.fingerprint})
    share = trainable_share(model)
    print(f"retrofitting {kind} model {base_path}: CCA after layers {layers}, {share['trainable']:,} trainable "
          f"parameters ({100 * share['share']:.1f}% of all), {threads} CPU thread(s)")
    a = TrainArgs(out=str(out), steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                  weight_decay=args.weight_decay, clip=args.clip, retrieval_dropout=args.retrieval_dropout,
                  overlap_sampling=args.overlap_sampling, eval_every=args.eval_every, seed=args.seed,
                  device=str(device), progress=not args.no_progress)
    history = train_retrofit(model, train_data, a, eval_data, token_byte_lengths(db.tokenizer))
    save_retrofit(model, out, source, {"trainable": share, "history": history,
                                       "args": {k: v for k, v in vars(args).items()}})
    print(f"done: {args.steps} steps, last loss {history[-1]['loss']:.4f}, eval {history[-1].get('eval')}; "
          f"{WEIGHTS_FILE} in {out} (evaluate: python -m models eval --checkpoint {out} --db {args.db})")
    return 0
