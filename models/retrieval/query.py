"""Opening a built database (validated) and retrieving neighbours from it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_file
from ..runtime import progress_bar
from . import consistency
from .embed import cached_embedder
from .build_index import open_searcher
from .doc_table import DocNames
from .manifest import SPLITS, STREAM_SPLITS, DatabaseError, Manifest, load_npy, sha256_bytes
from .tokenizer import EOS_TOKEN, PAD_TOKEN, load_tokenizer

SEARCH_BLOCK = 4096  # query vectors searched per FAISS call


class TokenStream:
    """The token stream of one split (``"train"`` or ``"eval"``; its layout: docs/retrieval.md), cut into model
    sequences. ``neighbours``: the precomputed ``(num_chunks, K)`` table of database chunk ids (-1: none)."""

    def __init__(self, db: "RetrievalDatabase", split: str):
        self.db = db
        self.split = split
        root = db.root
        self.tokens = np.memmap(root / f"stream_{split}.bin", dtype=db.tokens.dtype, mode="r")
        self.chunk_doc = load_npy(root / f"stream_{split}_chunk_doc.npy")
        chunk = db.manifest.info("chunk")
        self.num_docs, self.num_bytes = chunk[f"stream_{split}_docs"], chunk[f"stream_{split}_bytes"]
        table = root / f"neighbours_{split}.npy"
        self.neighbours = load_npy(table) if table.exists() else None

    def __len__(self) -> int:
        return int(self.tokens.size)

    def num_sequences(self, seq_len: int) -> int:
        """Sequences of ``seq_len`` inputs (+1 target) that cover the whole stream (the last one padded)."""
        self._check_seq_len(seq_len)
        return max(0, -(-(len(self) - 1) // seq_len))

    def _check_seq_len(self, seq_len: int) -> None:
        m = self.db.chunk_size
        if not isinstance(seq_len, int) or seq_len < m or seq_len % m:
            raise ValueError(f"seq_len: expected a positive multiple of chunk_size={m}, got {seq_len!r}")

    def sequence(self, i: int, seq_len: int, k: int | None = None) -> dict[str, np.ndarray]:
        """Sequence ``i``: tokens ``(seq_len + 1,)`` int64 (inputs ``[:-1]``, targets ``[1:]``),
        ``neighbours`` ``(L, K, R)`` int64 and ``neighbour_mask`` ``(L, K, R)`` bool for its
        ``L = seq_len // m`` chunks, and ``chunk_doc`` ``(L,)``. Positions past the end are padding.
        """
        self._check_seq_len(seq_len)
        n = self.num_sequences(seq_len)
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences of {seq_len} tokens")
        m = self.db.chunk_size
        start = i * seq_len
        tokens = np.full(seq_len + 1, self.db.pad_id, dtype=np.int64)
        piece = np.asarray(self.tokens[start:start + seq_len + 1], dtype=np.int64)
        tokens[:piece.size] = piece
        first, L = start // m, seq_len // m
        chunk_doc = np.full(L, -1, dtype=np.int64)
        have = min(L, self.chunk_doc.size - first)
        chunk_doc[:have] = self.chunk_doc[first:first + have]
        if self.neighbours is None:
            raise ValueError(f"the database has no precomputed neighbours for split {self.split!r}")
        k = self.neighbours.shape[1] if k is None else k
        if k > self.neighbours.shape[1]:
            raise ValueError(f"k: {k} neighbours requested, {self.neighbours.shape[1]} were precomputed")
        table = np.full((L, k), -1, dtype=np.int64)
        table[:have] = self.neighbours[first:first + have, :k]
        ids, mask = self.db.chunk_values(table)
        return {"tokens": tokens, "neighbours": ids, "neighbour_mask": mask, "chunk_doc": chunk_doc}

    def batch(self, indices, seq_len: int, k: int | None = None) -> dict[str, np.ndarray]:
        """Sequences ``indices`` stacked: tokens ``(B, seq_len + 1)``, neighbours/mask ``(B, L, K, R)``."""
        items = [self.sequence(int(i), seq_len, k) for i in indices]
        if not items:
            raise ValueError("indices: expected at least one sequence index")
        return {key: np.stack([item[key] for item in items]) for key in items[0]}


class RetrievalDatabase:
    """A built retrieval database; open it with :meth:`open` (which checks that every stage finished
    and every file is the one recorded). The constructor takes a database as far as it is built, up to
    its index. Every table is memory-mapped, the index's inverted lists too."""

    def __init__(self, root: Path, manifest: Manifest, *, nprobe: int | None = None, rerank: int | None = None,
                 embedder_device: str | None = None):
        self.root = Path(root)
        self.manifest = manifest
        self.config: dict[str, Any] = dict(manifest.config)
        self.chunk_size: int = int(self.config["chunk_size"])
        self.neighbour_len: int = 2 * self.chunk_size
        self.tokenizer = load_tokenizer(self.root / "tokenizer.json")
        self.eos_id: int = self.tokenizer.token_to_id(EOS_TOKEN)
        self.pad_id: int = self.tokenizer.token_to_id(PAD_TOKEN)
        self.vocab_size: int = self.tokenizer.get_vocab_size()
        consistency.check_declared(self)
        self.tokens = manifest.tokens()
        self.doc_offsets = load_npy(self.root / "doc_offsets.npy")
        self.doc_bytes = load_npy(self.root / "doc_bytes.npy")
        self.doc_names = DocNames(self.root)  # names[i], read from disk when asked
        self.doc_split = load_npy(self.root / "doc_split.npy")
        self.chunk_doc = load_npy(self.root / "chunk_doc.npy")
        self.chunk_start = load_npy(self.root / "chunk_start.npy")
        self.embeddings = load_npy(self.root / "embeddings.npy")
        self.index = open_searcher(self.root, self.root / "embeddings.npy", self.root / "chunk_doc.npy",
                                   nprobe=nprobe or self.config["nprobe"],
                                   rerank=self.config["rerank"] if rerank is None else rerank)
        self._embedder_device = embedder_device
        consistency.check_loaded(self)

    # --- opening -------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, expect_config: dict[str, Any] | None = None, tokenizer=None,
             verify: bool = True, nprobe: int | None = None, rerank: int | None = None,
             device: str | None = None) -> "RetrievalDatabase":
        """Open and validate a finished database.

        ``expect_config``: config keys that must match (e.g. ``{"chunk_size": 64}``).
        ``tokenizer``: a tokenizer.json path or ``tokenizers.Tokenizer`` that must equal the database's.
        ``verify``: check every file's sha256 (else only sizes; for very large databases).
        ``nprobe``: IVF lists searched; ``rerank``: candidates re-ranked by exact distance (compressed codes;
        0: max(100, 10 k)); the build's by default. ``device``: for the query embedder.
        Raises :class:`DatabaseError` (a ValueError) saying what is wrong.
        """
        root = Path(path)
        manifest = Manifest.load(root)
        consistency.check_finished(root, manifest, verify, expect_config, tokenizer)
        try:
            return cls(root, manifest, nprobe=nprobe, rerank=rerank, embedder_device=device)
        except (OSError, ValueError) as e:
            if isinstance(e, DatabaseError):
                raise
            raise DatabaseError(f"database {str(root)!r} cannot be loaded: {e}") from None

    @property
    def fingerprint(self) -> str:
        """Identifies config + tokenizer: store it in a model checkpoint to check compatibility later."""
        tok = self.manifest.stages["tokenizer"]["files"]["tokenizer.json"]["sha256"]
        return sha256_bytes((json.dumps(self.config, sort_keys=True) + tok).encode())[:16]

    @property
    def tokenizer_fingerprint(self) -> str:
        """Identifies the tokenizer alone: a model records it, and refuses a database with another one."""
        return self.manifest.stages["tokenizer"]["files"]["tokenizer.json"]["sha256"][:16]

    @property
    def num_chunks(self) -> int:
        return int(self.chunk_doc.shape[0])

    # --- documents and tokens ----------------------------------------------------------
    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

    def documents(self, split: str) -> np.ndarray:
        """Indices of the documents of ``split``: "train", "eval" (held out) or "removed" (leakage)."""
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
        return np.flatnonzero(self.doc_split[:] == SPLITS[split])

    def doc_tokens(self, doc: int) -> np.ndarray:
        return np.asarray(self.tokens[self.doc_offsets[doc]:self.doc_offsets[doc + 1]], dtype=np.int64)

    def stream(self, split: str) -> TokenStream:
        if split not in STREAM_SPLITS:
            raise ValueError(f"split: expected one of {STREAM_SPLITS}, got {split!r}")
        return TokenStream(self, split)

    # --- neighbours ----------------------------------------------------------------------
    def chunk_values(self, chunk_ids) -> tuple[np.ndarray, np.ndarray]:
        """Neighbour values of database chunks: ``(..., R)`` int64 token ids and bool mask.

        A value is the chunk and its continuation, R = 2m tokens, cut at the end of
        its document (padded with ``pad_id``, mask False); chunk id -1 gives an all-masked row.
        """
        ids = np.asarray(chunk_ids, dtype=np.int64)
        valid_chunk = ids >= 0
        safe = np.where(valid_chunk, ids, 0)
        start = self.chunk_start[safe]
        end = self.doc_offsets[self.chunk_doc[safe].astype(np.int64) + 1]
        pos = start[..., None] + np.arange(self.neighbour_len)
        mask = valid_chunk[..., None] & (pos < end[..., None])
        tokens = np.asarray(self.tokens[np.where(mask, pos, 0).reshape(-1)], dtype=np.int64).reshape(mask.shape)
        mask &= tokens != self.pad_id  # padding inside a document (``align_sections``) is not text
        return np.where(mask, tokens, self.pad_id), mask

    def embed_chunks(self, chunks: list[np.ndarray]) -> np.ndarray:
        """(n, dim) float32 keys of chunks of language-model token ids (one embedder per process and model)."""
        embedder = cached_embedder(self.config["embedder"], self._embedder_device, 128)
        return embedder.embed_token_chunks(self.tokenizer, chunks)

    def search(self, queries: np.ndarray, k: int, exclude_docs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """K nearest database chunks (squared L2, ascending) of query vectors ``(n, dim)``.

        With the build option ``max_distance``, a neighbour farther than it is
        missing (id -1, distance inf), like one the database does not have.

        ``exclude_docs``: ``(n,)`` or ``(n, E)`` document indices whose chunks may not be
        returned for that query (-1 entries exclude nothing). Missing neighbours are -1.
        """
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected a positive int, got {k!r}")
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.dim:
            raise ValueError(f"queries: expected shape (n, {self.index.dim}), got {queries.shape}")
        if exclude_docs is not None:
            exclude_docs = np.asarray(exclude_docs, dtype=np.int64).reshape(queries.shape[0], -1)
        dist, ids = self.index.search(queries, k, exclude_docs)
        if self.max_distance is not None:  # neighbours too far to be relevant are dropped, not kept
            far = dist > self.max_distance
            dist, ids = np.where(far, np.inf, dist), np.where(far, -1, ids)
        return dist, ids

    @property
    def max_distance(self) -> float | None:
        """The build's ``max_distance``: neighbours farther than this (squared L2) are not returned."""
        return self.config.get("max_distance")

    def neighbours_for_tokens(self, token_ids, k: int, exclude_doc: int | None = None,
                              partial: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Neighbours of the chunks of one token sequence: ids ``(L, K, R)`` int64 and mask ``(L, K, R)``.

        L = len // m complete chunks (``partial=True`` adds the last, incomplete one).
        ``exclude_doc``: a document index whose chunks are never returned.
        """
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        m = self.chunk_size
        L = -(-ids.size // m) if partial else ids.size // m
        if L == 0:
            shape = (0, k, self.neighbour_len)
            return np.zeros(shape, np.int64), np.zeros(shape, bool)
        vectors = self.embed_chunks([ids[u * m:(u + 1) * m] for u in range(L)])
        exclude = None if exclude_doc is None else np.full(L, int(exclude_doc))
        _, chunk_ids = self.search(vectors, k, exclude)
        return self.chunk_values(chunk_ids)

    def precompute_neighbours(self, tokens, doc_ids, k: int, out: str | os.PathLike | None = None,
                              progress: bool = True) -> np.ndarray:
        """The ``(ceil(T / m), K)`` int64 table of database chunk ids for every chunk of ``tokens``.

        ``tokens``: ``(T,)`` token ids of a dataset (any text, e.g. a new training set).
        ``doc_ids``: ``(T,)`` the database document index of each token (training data taken
        from this database), or None. With it, neighbours from the document of chunk ``u``
        and of the next chunk (whose tokens chunk ``u``'s neighbours help predict) are excluded.
        ``out``: a .npy path, written atomically and returned memory-mapped; else in memory.
        """
        tokens = np.asarray(tokens).reshape(-1)
        m = self.chunk_size
        n = -(-tokens.size // m)
        exclude = None
        if doc_ids is not None:
            doc_ids = np.asarray(doc_ids).reshape(-1)
            if doc_ids.shape != tokens.shape:
                raise ValueError(f"doc_ids: expected shape {tokens.shape} (one per token), got {doc_ids.shape}")
            first = doc_ids[np.arange(n) * m]
            nxt_last = doc_ids[np.minimum((np.arange(n) + 2) * m, tokens.size) - 1]
            exclude = np.stack([first, nxt_last], axis=1)

        def fill(table):
            with progress_bar(total=n, desc="neighbours", unit="chunk", enabled=progress) as bar:
                for lo in range(0, n, SEARCH_BLOCK):
                    hi = min(lo + SEARCH_BLOCK, n)
                    vectors = self.embed_chunks([tokens[u * m:(u + 1) * m] for u in range(lo, hi)])
                    table[lo:hi] = self.search(vectors, k, None if exclude is None else exclude[lo:hi])[1]
                    bar.update(hi - lo)
            return table

        if out is None:
            return fill(np.empty((n, k), dtype=np.int64))
        with atomic_file(out) as tmp:
            fill(np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(n, k))).flush()
        return load_npy(out)
