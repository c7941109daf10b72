"""Training and evaluation data: chunk-aligned token sequences with their neighbours (docs/model.md, "Data").
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

IGNORE = -100


@dataclass
class ChunkedTokens:
    """Documents cut into chunks in stream order: tokens, valid (C, m); doc (C,) document ids;
    neighbours (C, K, R) token ids or None (no retrieval); neighbour_mask (C, K, R), True where real."""
    tokens: np.ndarray
    valid: np.ndarray
    doc: np.ndarray
    neighbours: Optional[np.ndarray] = None
    neighbour_mask: Optional[np.ndarray] = None

    def __post_init__(self):
        C, m = self.tokens.shape
        if self.valid.shape != (C, m) or self.doc.shape != (C,):
            raise ValueError(f"valid must be {(C, m)} and doc {(C,)}, got {self.valid.shape}, {self.doc.shape}")
        if self.neighbours is not None:
            if self.neighbours.ndim != 3 or self.neighbours.shape[0] != C:
                raise ValueError(f"neighbours must be (C={C}, K, R), got {self.neighbours.shape}")
            if self.neighbour_mask is None:
                self.neighbour_mask = np.ones(self.neighbours.shape, dtype=bool)

    @property
    def chunk_size(self) -> int:
        return self.tokens.shape[1]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def with_neighbours(self, neighbours, neighbour_mask) -> "ChunkedTokens":
        return ChunkedTokens(self.tokens, self.valid, self.doc, neighbours, neighbour_mask)

    def targets(self) -> np.ndarray:
        """(C, m) next-token targets in the stream, IGNORE where there is none."""
        C, m = self.tokens.shape
        flat_tok, flat_valid, flat_doc = self.tokens.reshape(-1), self.valid.reshape(-1), np.repeat(self.doc, m)
        nxt = np.full(C * m, IGNORE, dtype=np.int64)
        ok = flat_valid[1:] & (flat_doc[1:] == flat_doc[:-1])
        nxt[:-1] = np.where(ok, flat_tok[1:], IGNORE)
        return nxt.reshape(C, m)


def chunk_documents(docs: list, chunk_size: int, pad_id: int = 0) -> ChunkedTokens:
    """Cut token arrays (one per document) into chunks of `chunk_size` from each start."""
    tokens, valid, doc = [], [], []
    for d, ids in enumerate(docs):
        ids = np.asarray(ids, dtype=np.int64)
        n = -(-len(ids) // chunk_size)
        padded = np.full(n * chunk_size, pad_id, dtype=np.int64)
        padded[: len(ids)] = ids
        tokens.append(padded.reshape(n, chunk_size))
        valid.append((np.arange(n * chunk_size) < len(ids)).reshape(n, chunk_size))
        doc.append(np.full(n, d, dtype=np.int64))
    return ChunkedTokens(np.concatenate(tokens), np.concatenate(valid), np.concatenate(doc))


class SequenceBatches:
    """Batches of S = seq_len / m consecutive chunks from chunks 0, S, 2S, ...; epoch e in the order of a
    permutation drawn from `seed + e`, so `batch(step)` is a pure function of the step (exact resume).
    Each data-parallel rank takes every world-th sequence of the global batch."""

    def __init__(self, data: ChunkedTokens, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1, shuffle: bool = True):
        m = data.chunk_size
        if seq_len % m:
            raise ValueError(f"seq_len ({seq_len}) must be a multiple of the chunk size ({m})")
        self.data, self.S, self.m = data, seq_len // m, m
        self.batch_size, self.seed, self.rank, self.world, self.shuffle = batch_size, seed, rank, world, shuffle
        self.starts = np.arange(0, len(data), self.S)
        self.targets = data.targets()

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, step: int) -> dict:
        """The local share of global batch number `step`."""
        n = len(self.starts)
        idx = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        orders = {e: np.random.default_rng(self.seed + e).permutation(self.starts) if self.shuffle else self.starts
                  for e in np.unique(idx // n).tolist()}
        starts = np.array([orders[int(i // n)][i % n] for i in idx])
        return self.gather(starts[self.rank :: self.world])

    def gather(self, starts: np.ndarray) -> dict:
        """Tensors for sequences starting at the given chunks."""
        S, m, d = self.S, self.m, self.data
        rows = starts[:, None] + np.arange(S)[None, :]  # (B, S) chunk rows
        inside = rows < len(d)
        rows = np.minimum(rows, len(d) - 1)
        tokens = np.where(inside[..., None], d.tokens[rows], 0)
        targets = np.where(inside[..., None], self.targets[rows], IGNORE)
        out = {"tokens": torch.from_numpy(tokens.reshape(len(starts), S * m).astype(np.int64)),
               "targets": torch.from_numpy(targets.reshape(len(starts), S * m).astype(np.int64)),
               "chunk_rows": torch.from_numpy(rows)}
        if d.neighbours is not None:
            out["neighbours"] = torch.from_numpy(d.neighbours[rows].astype(np.int64))
            out["neighbour_mask"] = torch.from_numpy(d.neighbour_mask[rows] & inside[..., None, None])
        return out


def longest_common_run(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest run of tokens that a and b share (longest common substring)."""
    return difflib.SequenceMatcher(None, a.tolist(), b.tolist(), autojunk=False).find_longest_match().size


def chunk_overlap(data: ChunkedTokens) -> np.ndarray:
    """(C,) overlap of each chunk with the neighbours that predict it, those of chunk c-1 (docs/spec.md#the-shift):
    the longest common token run, divided by m (a document's first chunk: 0)."""
    C, m = data.tokens.shape
    out = np.zeros(C)
    if data.neighbours is None:
        return out
    for c in range(1, C):
        if data.doc[c] != data.doc[c - 1]:
            continue
        chunk = data.tokens[c][data.valid[c]]
        out[c] = max(longest_common_run(chunk, n[ok]) for n, ok in zip(data.neighbours[c - 1],
                                                                        data.neighbour_mask[c - 1])) / m
    return out


# From a retrieval database (models.retrieval)

def open_database(path, chunk_size: Optional[int] = None):
    """Open a built retrieval database (--db: cli_common.database checked that there is one)."""
    from .retrieval import RetrievalDatabase

    expect = None if chunk_size is None else {"chunk_size": chunk_size}
    return RetrievalDatabase.open(path, expect_config=expect)


def token_byte_lengths(tokenizer) -> np.ndarray:
    """(vocab,) UTF-8 bytes of each token of a byte-level BPE (one character per byte; special tokens: 0)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    out = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for s, i in vocab.items():
        out[i] = 0 if s in special else len(s)
    return out


def from_stream(db, split: str, num_neighbours: Optional[int]) -> ChunkedTokens:
    """A database split ("train" or "eval") with the first num_neighbours precomputed neighbours (None: none)."""
    stream, m = db.stream(split), db.chunk_size
    chunk_doc = np.asarray(stream.chunk_doc, dtype=np.int64)
    C = chunk_doc.size
    if C == 0:
        raise ValueError(f"the database's {split!r} split is empty")
    tokens = np.asarray(stream.tokens[: C * m], dtype=np.int64).reshape(C, m)
    data = ChunkedTokens(tokens, tokens != db.pad_id, chunk_doc)
    if num_neighbours is None:
        return data
    if stream.neighbours is None:
        raise ValueError(f"the database has no precomputed neighbours for its {split!r} split")
    table = np.asarray(stream.neighbours)
    if table.shape[1] < num_neighbours:
        raise ValueError(f"the database precomputed {table.shape[1]} neighbours per chunk; the model needs "
                         f"{num_neighbours} (rebuild with -k {num_neighbours})")
    ids, mask = db.chunk_values(table[:, :num_neighbours])
    return data.with_neighbours(ids, mask)


def neighbours_including(db, data: ChunkedTokens, num_neighbours: int) -> ChunkedTokens:
    """`data`'s neighbours from the database plus `data`'s own chunks (an exact "leaky" database of both, by L2;
    a chunk's nearest is itself with its continuation: this measures copying)."""
    m, R, K = db.chunk_size, db.neighbour_len, num_neighbours
    C = len(data)
    keys = db.embed_chunks([data.tokens[c][data.valid[c]] for c in range(C)])
    db_dist, db_ids = db.search(keys, K)
    # data's own chunks that hold document text (not only <|endoftext|>/padding)
    text = data.valid & (data.tokens != db.eos_id)
    own = np.flatnonzero(text.any(1))
    keys = np.asarray(keys, dtype=np.float32)
    sq = (keys ** 2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, own] - 2 * keys @ keys[own].T, 0.0)  # (C, own) squared L2
    own_order = np.argsort(d2, axis=1)[:, :K]
    own_dist = np.take_along_axis(d2, own_order, 1)
    db_vals, db_mask = db.chunk_values(db_ids)
    # values of data's own chunks: the chunk and its continuation within the document
    flat_tok, flat_text, flat_doc = data.tokens.reshape(-1), text.reshape(-1), np.repeat(data.doc, m)
    starts = own[own_order] * m  # (C, K)
    pos = starts[..., None] + np.arange(R)
    inside = pos < flat_tok.size
    pos_c = np.minimum(pos, flat_tok.size - 1)
    own_mask = inside & flat_text[pos_c] & (flat_doc[pos_c] == flat_doc[starts][..., None])
    own_vals = np.where(own_mask, flat_tok[pos_c], db.pad_id)
    # merge by distance
    dist, vals, mask = (np.concatenate(pair, 1) for pair in ((db_dist, own_dist), (db_vals, own_vals),
                                                             (db_mask, own_mask)))
    dist = np.where(np.concatenate([db_ids >= 0, np.ones_like(own_order, bool)], 1), dist, np.inf)
    if db.max_distance is not None:  # the database's relevance cut applies to the added chunks too
        far = dist > db.max_distance
        dist, mask = np.where(far, np.inf, dist), mask & ~far[..., None]
        vals = np.where(mask, vals, db.pad_id)
    best = np.argsort(dist, axis=1, kind="stable")[:, :K]
    return data.with_neighbours(np.take_along_axis(vals, best[..., None], 1),
                                np.take_along_axis(mask, best[..., None], 1))
