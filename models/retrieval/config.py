"""A retrieval database's build options: ``DEFAULT_CONFIG`` (what a database *is*: recorded and compared
when reopened), ``DEFAULT_RUNTIME`` (how it is built), ``LIMITS`` (every numeric option's range, once, for
the command line and `make_config`), and the held-out split."""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from ..cli_common import SEED, integer, number
from ..cli_common import check_value as check_number
from . import corpus as corpus_mod
from . import index as index_mod
from .embed import DEFAULT_EMBEDDER
from .leakage import THRESHOLD
from .tokenizer import MIN_VOCAB

DEFAULT_CONFIG: dict[str, Any] = {
    "corpus": corpus_mod.DEFAULT_CORPUS,  # a path, or the default corpus
    "tokenizer": None,          # sha256 of a given tokenizer.json, or None: train one
    "vocab_size": 8192,
    "chunk_size": 64,           # m; neighbour values are R = 2m tokens
    "embedder": DEFAULT_EMBEDDER,
    "eval_fraction": 0.05,      # documents held out for evaluation (by a hash of their id)
    "split_seed": 0,
    "leakage_threshold": THRESHOLD,
    "index_eval_docs": False,   # True: the evaluation documents are retrievable too
    "align_sections": False,    # True: every section heading and body starts on a chunk boundary
    "embeddings": None,         # a .npy (chunks, dim) or folder of parts: the keys, brought in (no embedding)
    "index_type": "auto",       # auto / flat / ivfpq / scann, or a FAISS factory string starting with IVF
    "nlist": 0, "pq_m": 0, "pq_nbits": 0,  # IVF-PQ sizes; 0 = chosen from the data
    "train_sample": 100_000,    # vectors the IVF index is trained on
    "shard_size": 1_000_000,    # keys per add unit, query chunks per neighbour-table unit
    "nprobe": 32,               # IVF lists searched for the neighbour tables
    "rerank": 0,                # compressed codes: candidates re-ranked by exact distance (0: max(100, 10 k))
    "k": 4,                     # neighbours precomputed per stream chunk
    "max_distance": None,       # None (RETRO): the K nearest, however far; a number: farther ones are dropped
}
# Options that change how, not what, is built: never compared when reopening.
DEFAULT_RUNTIME = {"embed_batch_size": 128, "embed_part_size": 2048, "device": None, "progress": True}


# The range of every numeric build option, once: the command line's argparse types, and make_config.
LIMITS = {
    "vocab_size": integer(MIN_VOCAB, 2**31 - 1), "chunk_size": integer(1, 1 << 16),
    "eval_fraction": number(0, 1, hi_open=True), "split_seed": SEED,
    "leakage_threshold": number(0, 1, lo_open=True), "nlist": integer(0), "pq_m": integer(0),
    "pq_nbits": integer(0, 16), "train_sample": integer(1), "shard_size": integer(1), "nprobe": integer(1),
    "rerank": integer(0), "k": integer(1, 4096), "max_distance": number(0),
    "embed_batch_size": integer(1), "embed_part_size": integer(1), "workers": integer(1),
}


def check_value(name: str, value) -> None:
    """ValueError naming ``name`` unless ``value`` is in LIMITS[name]'s range (None allowed for max_distance)."""
    if not (name in ("max_distance", "workers") and value is None):
        check_number(name, value, LIMITS[name])


def held_out(doc_id: str, eval_fraction: float, seed: int = 0) -> bool:
    """Whether document ``doc_id`` belongs to the evaluation split: a stable hash of (seed, id)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction: expected a fraction in [0, 1), got {eval_fraction}")
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest(), "little")
    return h / 2.0**64 < eval_fraction


def split_documents(doc_ids: list[str], eval_fraction: float, seed: int = 0) -> np.ndarray:
    """(len(doc_ids),) bool: True for the documents held out for evaluation."""
    return np.array([held_out(d, eval_fraction, seed) for d in doc_ids], dtype=bool)


def make_config(**overrides) -> dict[str, Any]:
    unknown = set(overrides) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown database config keys {sorted(unknown)}; known: {sorted(DEFAULT_CONFIG)}")
    config = {**DEFAULT_CONFIG, **overrides}
    for name in LIMITS:
        if name in config:
            check_value(name, config[name])
    for name in ("index_eval_docs", "align_sections"):
        if not isinstance(config[name], bool):
            raise ValueError(f"{name}: expected True or False, got {config[name]!r}")
    index_mod.resolve_index_type(config["index_type"], 0)
    return config


def config_differences(have: dict, want: dict) -> list[str]:
    keys = sorted(set(have) | set(want))
    return [f"{k}: database has {have.get(k)!r}, requested {want.get(k)!r}" for k in keys if have.get(k) != want.get(k)]
