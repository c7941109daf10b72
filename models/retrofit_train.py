"""Training a retrofit, and ``python -m models retrofit --base BASE --db DB --out OUT``.

BASE: a plain decoder checkpoint of ours or a local transformers folder (safetensors) sharing the database's
tokenizer; OUT receives retrofit.json and retrofit.safetensors (docs/model.md, "RETROfit").
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import outdir, parallel
from .cli_common import Parser, UsageError, command, one_line
from .data import ChunkedTokens
from .runtime import configure_threads, is_first_process, resolve_device, setup_distributed
from .retrofit import (CONFIG_FILE, TEMPORARIES, WEIGHTS_FILE, RetrofitConfig, RetrofitModel, base_kind,
                       is_retrofit, paper_cca_layers)
from .train import TrainArgs, TrainingLoop, add_model_flags, add_train_flags, train_args_from

KIND = "retrofit"  # its output folders' marker (models.outdir)


def train_retrofit(model: RetrofitModel, data: ChunkedTokens, args: TrainArgs,
                   eval_data: Optional[ChunkedTokens] = None, byte_lengths: Optional[np.ndarray] = None,
                   log=print, metrics: Optional[Path] = None) -> list:
    """Train the added weights of `model` with `models.train`'s loop (any layout); the history (also to
    ``metrics``, JSON lines)."""
    rank, world, device = setup_distributed(resolve_device(args.device))
    loop = TrainingLoop(model, data, args, device, rank, world, retrieval=True, name="retrofit")
    return loop.run(eval_data=eval_data, byte_lengths=byte_lengths, log=log if rank == 0 else (lambda msg: None),
                    metrics=metrics if rank == 0 else None)


def check_out(out, overwrite: bool) -> str:
    """Refuse (OutputFolderError) an OUT that is not new, empty or a retrofit's own (a finished one: overwrite)."""
    out = Path(out)
    state = outdir.check_folder(out, KIND)
    if is_retrofit(out) and not overwrite:
        raise outdir.OutputFolderError(
            f"--out {str(out)!r} holds a retrofit ({CONFIG_FILE}, {WEIGHTS_FILE}); pass --overwrite to replace "
            f"those two files and its metrics.jsonl (nothing else there is touched), or choose another folder")
    return state


# python -m models retrofit

def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def layer_numbers(text: str) -> list[int]:
    """argparse type: increasing 1-based layer numbers, "6,9,12"."""
    try:
        layers = [int(s, 10) for s in text.split(",") if s.strip()]
    except ValueError:
        layers = []
    if not layers or layers != sorted(set(layers)) or layers[0] < 1:
        raise argparse.ArgumentTypeError(f"expected increasing 1-based layer numbers like 6,9,12, got {text!r}")
    return layers


def base_model(text: str) -> str:
    """argparse type: a plain models decoder checkpoint, or a transformers folder with safetensors weights."""
    from .retrofit import _base_files

    try:
        _base_files(Path(text), base_kind(text))
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(one_line(e)) from None
    return text


def base_shape(path: Path, kind: str) -> dict:
    """The base's sizes, positions, sequence length and tokenizer record, from its config only."""
    if kind == "models":
        from .checkpoint import load_config

        cfg = load_config(path)
        _need(not cfg.retrieval, f"--base: {str(path)!r} already has retrieval (CCA layers); retrofit a plain "
                                 f"decoder (python -m models train --no-retrieval)")
        return {"n_layers": cfg.n_layers, "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "heads": cfg.n_heads,
                "seq_len": cfg.seq_len, **{k: cfg.extra.get(k) for k in ("db_fingerprint", "tokenizer_fingerprint")}}
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--base: {str(path)!r}/config.json cannot be read as a transformers config "
                         f"({one_line(e)[:300]})") from None
    n_layers = getattr(cfg, "num_hidden_layers", None)
    _need(isinstance(n_layers, int), f"--base: {str(path)!r}'s config names no num_hidden_layers")
    return {"n_layers": n_layers, "vocab_size": getattr(cfg, "vocab_size", None),
            "d_model": getattr(cfg, "hidden_size", None), "heads": getattr(cfg, "num_attention_heads", None),
            "positions": getattr(cfg, "max_position_embeddings", None)}


def check_tokenizer(path: Path, kind: str, shape: dict, db, log) -> None:
    """The one-line refusals (UsageError) of a base whose token ids would not be the database's."""
    if kind == "hf":
        from .retrieval import RetrievalDatabase
        from .retrieval.manifest import DatabaseError

        tok = path / "tokenizer.json"
        _need(tok.is_file(), f"--base: {str(path)!r} has no tokenizer.json, so nothing shows it shares the "
                             f"database's tokenizer (build the database with the model's tokenizer.json, or save "
                             f"the database's tokenizer.json beside a model built with its vocabulary)")
        try:
            RetrievalDatabase.open(db.root, tokenizer=tok, verify=False)
        except DatabaseError as e:  # a different tokenizer, or one that cannot be read
            raise UsageError(f"--base: {one_line(e)}") from None
    trained_with = shape.get("tokenizer_fingerprint")
    _need(trained_with is None or trained_with == db.tokenizer_fingerprint,
          f"--base {str(path)!r} was trained with another tokenizer ({trained_with}) than --db "
          f"{str(db.root)!r}'s ({db.tokenizer_fingerprint}): its token ids would mean other text")
    _need(shape["vocab_size"] == db.vocab_size,
          f"--base: the model has {shape['vocab_size']} token embeddings but the database's tokenizer has "
          f"{db.vocab_size} tokens; they must be the same tokenizer")
    if shape.get("db_fingerprint") not in (None, db.fingerprint):
        log(f"note: the base was trained on database {shape.get('db_fingerprint')}, retrofitting on {db.fingerprint} "
            f"(the same tokenizer)")


# The training flags retrofit takes from `python -m models train` (TrainArgs), and its defaults for them.
RETROFIT_TRAIN_FLAGS = ("steps", "batch_size", "lr", "warmup", "weight_decay", "clip", "retrieval_dropout",
                        "eval_every", "seed", "allow_nonfinite", "device", "parallel", "tp", "activation_checkpointing",
                        "compile", "progress")
RETROFIT_DEFAULTS = TrainArgs(retrieval_dropout=0.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli_common import add_threads_flag, database, folder, integer, text

    p.add_argument("--base", type=base_model, required=True,
                   help="a plain models decoder checkpoint, or a local transformers folder")
    p.add_argument("--db", type=database, required=True, help="the retrieval database (same tokenizer as the base)")
    p.add_argument("--out", type=folder, required=True,
                   help="a new (or empty) folder for retrofit.json + retrofit.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace the retrofit in --out (only its own files)")
    g = p.add_argument_group("what is added")
    g.add_argument("--cca-layers", type=layer_numbers, default=None,
                   help="1-based layers followed by CCA, e.g. 6,9,12 (default: every 3rd from 6, as in the paper)")
    g.add_argument("--encoder-layers", type=integer(1, 1024), default=2, help="neighbour encoder layers")
    add_model_flags(g, ("--encoder-ff-mult", "--heads", "--neighbours"),
                    heads=dict(default=None, help="CCA/encoder heads (default: the base's)"))
    g.add_argument("--layers", type=text("a dotted path of decoder layers"), default=None,
                   help="other transformers models: dotted path of the decoder layers (e.g. model.decoder.layers)")
    g.add_argument("--attention", type=text("an attribute name"), default=None,
                   help="... and each layer's self-attention attribute (e.g. self_attn)")
    add_model_flags(g, ("--kernels",))
    g = p.add_argument_group("training (only the added weights)")
    add_model_flags(g, ("--seq-len",), seq_len=dict(default=None, help="tokens per sequence (default: base's or 512)"))
    add_train_flags(g, RETROFIT_TRAIN_FLAGS, RETROFIT_DEFAULTS)
    add_threads_flag(g)


def plan(flags, shape: dict, db) -> RetrofitConfig:
    """What `retrofit` adds, checked (UsageError) against the base's config and the database."""
    m, n_layers = db.chunk_size, shape["n_layers"]
    layers = flags.cca_layers or paper_cca_layers(n_layers)
    _need(layers[-1] <= n_layers, f"--cca-layers: the base has {n_layers} layers, got {layers}")
    seq_len = flags.seq_len or shape.get("seq_len") or 512
    _need(seq_len % m == 0, f"--seq-len: expected a multiple of the database's chunk size {m}, got {seq_len}")
    _need(not shape.get("positions") or seq_len <= shape["positions"],
          f"--seq-len: the base has {shape.get('positions')} positions, got {seq_len}")
    _need(flags.neighbours <= int(db.config["k"]),
          f"--neighbours: the database precomputed {db.config['k']} neighbours per chunk, got {flags.neighbours}")
    heads = flags.heads or shape["heads"]
    _need(heads is not None, "--heads: the base's config names no num_attention_heads; pass --heads")
    try:
        return RetrofitConfig(
            chunk_size=m, cca_layers=layers, d_model=shape["d_model"], n_heads=heads, n_layers=n_layers,
            vocab_size=db.vocab_size, num_neighbours=flags.neighbours, neighbour_len=db.neighbour_len,
            seq_len=seq_len, encoder_layers=flags.encoder_layers, encoder_ff_mult=flags.encoder_ff_mult,
            kernels=flags.kernels, layers=flags.layers, attention=flags.attention,
            extra={"db_fingerprint": db.fingerprint, "tokenizer_fingerprint": db.tokenizer_fingerprint})
    except ValueError as e:
        named = f"--heads {heads}" if flags.heads else f"the base model's {heads} heads (--heads)"
        raise UsageError(f"{named}: {e}") from None


@command("retrofit")
def main(argv=None) -> int:
    from .data import from_stream, open_database, token_byte_lengths
    from .retrofit import load_base, save_retrofit, trainable_share

    p = Parser("python -m models retrofit", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    flags = p.parse_args(argv)
    args = train_args_from(flags, RETROFIT_TRAIN_FLAGS, out=flags.out, overwrite=flags.overwrite)
    check_out(flags.out, flags.overwrite)  # every check that needs no file: before anything is read
    base_path = Path(flags.base)
    kind = base_kind(base_path)
    shape = base_shape(base_path, kind)
    db = open_database(flags.db)
    check_tokenizer(base_path, kind, shape, db, print)
    cfg = plan(flags, shape, db)

    parallel.check_heads(cfg, flags.tp)
    threads = configure_threads(flags.threads)
    first = is_first_process()  # under torchrun: it holds OUT and prints
    _, _, device = setup_distributed(resolve_device(flags.device))
    args.device = str(device)
    train_data, eval_data = from_stream(db, "train", flags.neighbours), from_stream(db, "eval", flags.neighbours)
    claim = outdir.claimed(flags.out, KIND, temporaries=TEMPORARIES, check=lambda: check_out(flags.out, flags.overwrite))
    with claim if first else contextlib.nullcontext():
        base, source = load_base(base_path, device, flags.allow_nonfinite)
        torch.manual_seed(flags.seed)
        model = RetrofitModel(base, cfg)
        share = trainable_share(model)
        if first:
            print(f"retrofitting {kind} model {base_path}: CCA after layers {list(cfg.cca_layers)}, "
                  f"{share['trainable']:,} trainable parameters ({100 * share['share']:.1f}% of all), {threads} CPU "
                  f"thread(s)")
        history = train_retrofit(model, train_data, args, eval_data, token_byte_lengths(db.tokenizer),
                                 metrics=Path(flags.out) / "metrics.jsonl")
        weights = model.added_state_dict()  # every process: sharded weights are gathered
        if first:
            save_retrofit(model, flags.out, source, {"trainable": share, "history": history, "args": {
                k: v for k, v in vars(flags).items() if k != "debug"}}, weights=weights)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if not first:
        return 0
    print(f"done: {flags.steps} steps, last loss {history[-1]['loss']:.4f}, eval {history[-1].get('eval')}; "
          f"{WEIGHTS_FILE} in {flags.out} (evaluate: python -m models eval --checkpoint {flags.out} --db {flags.db})")
    return 0
