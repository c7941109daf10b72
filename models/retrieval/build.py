"""Building a retrieval database, in resumable stages (see ``manifest.STAGES``).

Files of a database directory (all arrays memory-mappable; no pickles):

  manifest.json                    config, library versions, finished stages with file checksums
  tokenizer.json                   the language model's byte-level BPE
  tokens.bin                       token ids of every document, concatenated (uint16/uint32, raw)
  doc_offsets.npy (D+1,) int64     document d is tokens[doc_offsets[d]:doc_offsets[d+1]]
  doc_bytes.npy (D,) int64         UTF-8 bytes of each document (for bits per byte)
  doc_names.json                   the corpus's document ids
  doc_signatures.npy (D, 128)      MinHash signatures (leakage filter)
  doc_split.npy (D,) int8          0 train, 1 eval (held out), 2 removed by the leakage filter
  chunk_doc.npy (C,) int32         document of each retrieval chunk (the index's ids are chunk ids)
  chunk_start.npy (C,) int64       first token of each chunk in tokens.bin
  stream_{train,eval}.bin          token streams: each document starts on a chunk boundary and
                                   ends with <|endoftext|>, then <|pad|> up to the next boundary
  stream_{train,eval}_chunk_doc.npy  document of each stream chunk
  stream_{train,eval}_db_chunk.npy   the database chunk with the same tokens (-1: not in the index)
  embeddings.npy (C, dim) float16  chunk keys
  index_trained.faiss              the trained, empty index
  index_shard_NNN.faiss            index shards (consecutive chunk-id ranges)
  neighbours_{train,eval}.npy (C_s, K) int64   precomputed neighbours of every stream chunk

Documents start on chunk boundaries in the streams so that a stream chunk of a
retrieval document is exactly a database chunk: its key is reused, never
embedded twice.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import outdir
from ..runtime import TorchrunGroup, progress_bar
from . import corpus as corpus_mod
from . import index as index_mod
from .config import DEFAULT_RUNTIME, check_value, config_differences, held_out, make_config, split_documents
from .embed import Embedder
from .leakage import NUM_PERM, MinHasher, find_leaked
from .manifest import (MANIFEST_NAME, PART_FILE, SPLITS, STAGES, STREAM_SPLITS, TEMP_SUFFIX, DatabaseError, Manifest,
                       atomic_path, atomic_save_npy, atomic_write_json, database_file_patterns, expected_files, load_npy,
                       sha256_file, temporary_patterns)
from .query import RetrievalDatabase
from .tokenizer import EOS_TOKEN, PAD_TOKEN, load_tokenizer, token_dtype, train_bpe


class Builder:
    def __init__(self, out: str | os.PathLike, config: dict[str, Any], runtime: dict[str, Any],
                 tokenizer_path: str | None, log: Callable[[str], None]):
        self.root = Path(out)
        self.config = config
        self.runtime = {**DEFAULT_RUNTIME, **runtime}
        self.tokenizer_path = tokenizer_path
        self.log = log
        self.corpus_path = None if config["corpus"] == corpus_mod.DEFAULT_CORPUS else config["corpus"]
        self.exclude = [self.root]  # a database inside its own corpus folder never reads itself
        self.manifest: Manifest | None = None
        self._tokenizer = None

    def corpus(self, **kw):
        return corpus_mod.iter_corpus(self.corpus_path, exclude=self.exclude, **kw)

    # --- helpers -----------------------------------------------------------------
    @property
    def m(self) -> int:
        return self.config["chunk_size"]

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.root / "tokenizer.json")
        return self._tokenizer

    def npy(self, name: str) -> np.ndarray:
        return load_npy(self.root / name)

    def tokens(self) -> np.ndarray:
        info = self.manifest.info("tokenize")
        return np.memmap(self.root / "tokens.bin", dtype=np.dtype(info["dtype"]), mode="r", shape=(info["num_tokens"],))

    def progress(self, **kw):
        return progress_bar(enabled=self.runtime["progress"], **kw)

    # --- the stages ----------------------------------------------------------------
    def stage_tokenizer(self) -> dict:
        dest = self.root / "tokenizer.json"
        if self.tokenizer_path is not None:
            load_tokenizer(self.tokenizer_path)  # validates
            with atomic_path(dest) as tmp:
                shutil.copyfile(self.tokenizer_path, tmp)
            return {"trained": False}
        cfg = self.config

        def train_texts():
            skip = False
            bar = self.progress(desc="tokenizer: reading corpus", unit="doc")
            for doc in self.corpus(warn=lambda msg: None):
                if not doc.continued:
                    skip = held_out(doc.doc_id, cfg["eval_fraction"], cfg["split_seed"])
                    bar.update(1)
                if not skip:  # evaluation documents never shape the tokenizer
                    yield doc.text
            bar.close()

        tokenizer = train_bpe(train_texts(), cfg["vocab_size"])
        with atomic_path(dest) as tmp:
            tokenizer.save(str(tmp))
        return {"trained": True, "vocab_size": tokenizer.get_vocab_size()}

    def stage_tokenize(self) -> dict:
        tokenizer = self.tokenizer()
        vocab = tokenizer.get_vocab_size()
        dtype = token_dtype(vocab)
        hasher = MinHasher(NUM_PERM, seed=self.config["split_seed"])
        stats = corpus_mod.CorpusStats()
        names: list[str] = []
        offsets = [0]
        doc_bytes: list[int] = []
        signatures: list[np.ndarray] = []
        num_tokens = 0
        bar = self.progress(desc="tokenize", unit="doc")

        def pieces():
            for doc in self.corpus(stats=stats, warn=self.log):
                yield doc

        with atomic_path(self.root / "tokens.bin") as tmp, open(tmp, "wb") as f:
            batch: list[corpus_mod.Document] = []

            def flush():
                nonlocal num_tokens
                for doc, ids in zip(batch, self._encode_documents(tokenizer, [d.text for d in batch], dtype)):
                    f.write(ids.tobytes())
                    num_tokens += ids.size
                    sig = hasher.signature(doc.text)
                    if doc.continued and names:
                        offsets[-1] = num_tokens
                        doc_bytes[-1] += len(doc.text.encode("utf-8", errors="replace"))
                        signatures[-1] = np.minimum(signatures[-1], sig)
                    else:
                        names.append(doc.doc_id)
                        offsets.append(num_tokens)
                        doc_bytes.append(len(doc.text.encode("utf-8", errors="replace")))
                        signatures.append(sig)
                        bar.update(1)
                bar.set_postfix(tokens=num_tokens, refresh=False)
                batch.clear()

            batch_chars = 0
            for doc in pieces():
                batch.append(doc)
                batch_chars += len(doc.text)
                if len(batch) >= 256 or batch_chars >= (8 << 20):
                    flush()
                    batch_chars = 0
            if batch:
                flush()
        bar.close()
        if not names:
            (self.root / "tokens.bin").unlink(missing_ok=True)
            raise ValueError(f"corpus {self.config['corpus']!r} contains no usable documents ({stats.as_dict()})")
        lengths = np.diff(np.asarray(offsets))
        keep_empty = lengths == 0  # a document whose text encodes to nothing still keeps its slot
        atomic_save_npy(self.root / "doc_offsets.npy", np.asarray(offsets, dtype=np.int64))
        atomic_save_npy(self.root / "doc_bytes.npy", np.asarray(doc_bytes, dtype=np.int64))
        atomic_save_npy(self.root / "doc_signatures.npy", np.stack(signatures).astype(np.uint64))
        atomic_write_json(self.root / "doc_names.json", names)
        self.log(f"tokenize: {len(names)} documents, {num_tokens} tokens, {sum(doc_bytes)} bytes; corpus {stats.as_dict()}")
        return {"dtype": dtype.name, "num_tokens": int(num_tokens), "num_docs": len(names),
                "num_bytes": int(sum(doc_bytes)), "empty_docs": int(keep_empty.sum()), "corpus": stats.as_dict()}

    def _encode_documents(self, tokenizer, texts: list[str], dtype) -> list[np.ndarray]:
        """Token ids of each text; with ``align_sections``, each section padded to a chunk boundary."""
        if not self.config["align_sections"]:
            return [np.asarray(e.ids, dtype=dtype) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        pad = tokenizer.token_to_id(PAD_TOKEN)
        segments = [corpus_mod.split_sections(t) for t in texts]
        encoded = iter(tokenizer.encode_batch([s for segs in segments for s in segs], add_special_tokens=False))
        out = []
        for segs in segments:
            parts = []
            for i in range(len(segs)):
                ids = np.asarray(next(encoded).ids, dtype=dtype)
                parts.append(ids)
                if i < len(segs) - 1 and ids.size % self.m:  # the next section starts a chunk
                    parts.append(np.full(self.m - ids.size % self.m, pad, dtype=dtype))
            out.append(np.concatenate(parts) if parts else np.zeros(0, dtype=dtype))
        return out

    def stage_split(self) -> dict:
        names = json.loads((self.root / "doc_names.json").read_text())
        cfg = self.config
        is_eval = split_documents(names, cfg["eval_fraction"], cfg["split_seed"])
        leaked, matches = find_leaked(np.asarray(self.npy("doc_signatures.npy")), is_eval, cfg["leakage_threshold"])
        split = np.where(is_eval, SPLITS["eval"], np.where(leaked, SPLITS["removed"], SPLITS["train"])).astype(np.int8)
        atomic_save_npy(self.root / "doc_split.npy", split)
        removed = [{"doc": names[d], "eval_doc": names[e], "jaccard": round(j, 3)} for d, (e, j) in sorted(matches.items())]
        self.log(f"split: {int(is_eval.sum())} evaluation documents held out, {int((split == 0).sum())} training; "
                 f"leakage filter removed {len(removed)} document(s) with Jaccard >= {cfg['leakage_threshold']} "
                 f"to an evaluation document")
        for r in removed[:20]:
            self.log(f"  removed {r['doc']!r} (Jaccard {r['jaccard']} with eval doc {r['eval_doc']!r})")
        return {"eval_docs": int(is_eval.sum()), "train_docs": int((split == 0).sum()),
                "removed_leaked": len(removed), "removed": removed[:1000]}

    def stage_chunk(self) -> dict:
        m = self.m
        offsets = np.asarray(self.npy("doc_offsets.npy"))
        split = np.asarray(self.npy("doc_split.npy"))
        lengths = np.diff(offsets)
        retrievable = split == SPLITS["train"]
        if self.config["index_eval_docs"]:
            retrievable |= split == SPLITS["eval"]
        docs = np.flatnonzero(retrievable & (lengths > 0))
        if docs.size == 0:
            raise ValueError("no documents are left for the retrieval database (all held out, removed or empty)")
        per_doc = -(-lengths[docs] // m)  # ceil: the last, partial chunk is kept (padded and masked)
        chunk_doc = np.repeat(docs, per_doc).astype(np.int32)
        first = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
        chunk_start = offsets[chunk_doc] + (np.arange(chunk_doc.size) - first) * m
        atomic_save_npy(self.root / "chunk_doc.npy", chunk_doc)
        atomic_save_npy(self.root / "chunk_start.npy", chunk_start.astype(np.int64))
        # database chunk id of (doc, chunk-in-doc): chunks of a doc are consecutive
        doc_first_chunk = np.full(len(lengths), -1, dtype=np.int64)
        doc_first_chunk[docs] = np.cumsum(per_doc) - per_doc

        tokens = self.tokens()
        tok = self.tokenizer()
        eos, pad = tok.token_to_id(EOS_TOKEN), tok.token_to_id(PAD_TOKEN)
        info = {"num_chunks": int(chunk_doc.size), "retrieval_docs": int(docs.size)}
        for name in STREAM_SPLITS:
            sdocs = np.flatnonzero((split == SPLITS[name]) & (lengths > 0))
            nchunks = -(-(lengths[sdocs] + 1) // m)  # room for the document and its <|endoftext|>
            stream_chunk_doc = np.repeat(sdocs, nchunks).astype(np.int32)
            within = np.arange(stream_chunk_doc.size) - np.repeat(np.cumsum(nchunks) - nchunks, nchunks)
            has_db = doc_first_chunk[stream_chunk_doc] >= 0
            # the chunk after a document's last token (only <|endoftext|> and padding) is not in the database
            in_db = has_db & (within * m < lengths[stream_chunk_doc])
            db_chunk = np.where(in_db, doc_first_chunk[stream_chunk_doc] + within, -1)
            with atomic_path(self.root / f"stream_{name}.bin") as tmp:
                out = np.memmap(tmp, dtype=tokens.dtype, mode="w+", shape=(max(1, int(nchunks.sum()) * m),))
                out[:] = pad
                pos = 0
                for d, n in zip(sdocs, nchunks):
                    length = lengths[d]
                    out[pos:pos + length] = tokens[offsets[d]:offsets[d + 1]]
                    out[pos + length] = eos
                    pos += int(n) * m
                out.flush()
                del out
            atomic_save_npy(self.root / f"stream_{name}_chunk_doc.npy", stream_chunk_doc)
            atomic_save_npy(self.root / f"stream_{name}_db_chunk.npy", db_chunk.astype(np.int64))
            info[f"stream_{name}_tokens"] = int(nchunks.sum()) * m
            info[f"stream_{name}_docs"] = int(sdocs.size)
        self.log(f"chunk: {chunk_doc.size} retrieval chunks of {m} tokens from {docs.size} documents")
        self._check_index_fits(chunk_doc.size)
        return info

    def _check_index_fits(self, num_chunks: int) -> None:
        """The index options against the number of chunks, now: not after the (long) embedding."""
        from .embed import embedding_dim

        cfg = self.config
        kind = index_mod.resolve_index_type(cfg["index_type"], num_chunks)
        index_mod.factory_string(kind, min(num_chunks, cfg["train_sample"]), embedding_dim(cfg["embedder"]), cfg)

    def _chunk_tokens(self, ids: np.ndarray) -> list[np.ndarray]:
        tokens = self.tokens()
        offsets = np.asarray(self.npy("doc_offsets.npy"))
        chunk_doc = self.npy("chunk_doc.npy")
        chunk_start = self.npy("chunk_start.npy")
        out = []
        for c in ids:
            start = int(chunk_start[c])
            end = min(start + self.m, int(offsets[int(chunk_doc[c]) + 1]))
            out.append(np.asarray(tokens[start:end]))
        return out

    def stage_embed(self, dist: TorchrunGroup) -> dict | None:
        num_chunks = self.manifest.info("chunk")["num_chunks"]
        part = int(self.runtime["embed_part_size"])
        chunk_sum = self.manifest.stages["chunk"]["files"]["chunk_start.npy"]["sha256"][:12]
        parts_dir = self.root / f"embed_parts_{chunk_sum}_{part}"
        parts_dir.mkdir(exist_ok=True)
        stale_part = re.compile(PART_FILE.pattern.replace(f"(?:{TEMP_SUFFIX})?", TEMP_SUFFIX))
        for stale in parts_dir.iterdir():  # a part being written when a previous run was killed
            if stale_part.fullmatch(stale.name) and stale.is_file():
                stale.unlink()
        num_parts = -(-num_chunks // part)
        mine = [p for p in range(num_parts) if p % dist.world == dist.rank]
        todo = [p for p in mine if not (parts_dir / f"part_{p:06d}.npy").exists()]
        if len(todo) < len(mine):
            self.log(f"embed: resuming, {len(mine) - len(todo)} of {len(mine)} parts already done")
        if todo:
            embedder = Embedder(self.config["embedder"], device=self.runtime["device"],
                                batch_size=self.runtime["embed_batch_size"])
            tok = self.tokenizer()
            desc = "embed" if dist.world == 1 else f"embed (rank {dist.rank}/{dist.world})"
            bar = self.progress(total=sum(min(part, num_chunks - p * part) for p in todo), desc=desc, unit="chunk")
            for p in todo:
                ids = np.arange(p * part, min((p + 1) * part, num_chunks))
                vectors = embedder.embed_token_chunks(tok, self._chunk_tokens(ids), on_batch=bar.update)
                atomic_save_npy(parts_dir / f"part_{p:06d}.npy", vectors.astype(np.float16))
            bar.close()
        dist.barrier()  # every rank's parts are on disk
        if dist.rank != 0:
            return None
        missing = [p for p in range(num_parts) if not (parts_dir / f"part_{p:06d}.npy").exists()]
        if missing:
            raise RuntimeError(f"embed: parts {missing[:10]} are missing after every rank finished")
        first = load_npy(parts_dir / "part_000000.npy")
        with atomic_path(self.root / "embeddings.npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(num_chunks, first.shape[1]))
            for p in range(num_parts):
                out[p * part:(p + 1) * part] = load_npy(parts_dir / f"part_{p:06d}.npy")
            out.flush()
            del out
        for p in range(num_parts):  # the parts this stage wrote; a folder with anything else in it stays
            (parts_dir / f"part_{p:06d}.npy").unlink()
        with contextlib.suppress(OSError):
            parts_dir.rmdir()
        return {"dim": int(first.shape[1]), "embedder": self.config["embedder"]}

    def _embeddings(self) -> np.ndarray:
        return self.npy("embeddings.npy")

    def stage_train_index(self) -> dict:
        cfg = self.config
        emb = self._embeddings()
        n, dim = emb.shape
        kind = index_mod.resolve_index_type(cfg["index_type"], n)
        rng = np.random.default_rng(cfg["split_seed"])
        sample_ids = np.sort(rng.choice(n, size=min(n, cfg["train_sample"]), replace=False))
        factory = index_mod.factory_string(kind, sample_ids.size, dim, cfg)
        t0 = time.perf_counter()
        index = index_mod.train_index(factory, dim, np.asarray(emb[sample_ids], dtype=np.float32))
        with atomic_path(self.root / "index_trained.faiss") as tmp:
            index_mod.write_index(index, tmp)
        self.log(f"train_index: {factory} on {sample_ids.size} vectors in {time.perf_counter() - t0:.1f}s")
        return {"index_type": kind, "factory": factory, "train_vectors": int(sample_ids.size),
                "seconds": time.perf_counter() - t0}

    def stage_add(self) -> dict:
        import faiss

        emb = self._embeddings()
        n = emb.shape[0]
        shard = int(self.config["shard_size"])
        num_shards = max(1, -(-n // shard))
        files, offsets = [], []
        bar = self.progress(total=n, desc="add", unit="vec")
        t0 = time.perf_counter()
        for s in range(num_shards):
            index = faiss.read_index(str(self.root / "index_trained.faiss"))
            lo, hi = s * shard, min((s + 1) * shard, n)

            def batches(lo=lo, hi=hi):
                for b in range(lo, hi, 65536):
                    e = min(b + 65536, hi)
                    yield np.asarray(emb[b:e], dtype=np.float32)
                    bar.update(e - b)

            index = index_mod.add_vectors(index, batches())
            name = f"index_shard_{s:03d}.faiss"
            with atomic_path(self.root / name) as tmp:
                index_mod.write_index(index, tmp)
            files.append(name)
            offsets.append(lo)
        bar.close()
        return {"shards": files, "offsets": offsets, "seconds": time.perf_counter() - t0}

    def stage_query(self) -> dict:
        """The neighbour tables of the streams: the index is queried with every stream chunk."""
        db = RetrievalDatabase(self.root, self.manifest, embedder_device=self.runtime["device"],
                               embed_batch_size=self.runtime["embed_batch_size"])  # as far as it is built
        info = {}
        for name in STREAM_SPLITS:
            table = db.precompute_stream_neighbours(name, self.config["k"], self.root / f"neighbours_{name}.npy",
                                                    progress=self.runtime["progress"])
            info[f"neighbours_{name}"] = list(table.shape)
        return info

    # --- the driver ------------------------------------------------------------
    def open_or_create(self, overwrite: bool, inputs: dict) -> None:
        """Resume the database in ``root``, or start one (``root`` is claimed and locked by the caller).

        ``inputs``: the corpus fingerprint now. A database built with another
        configuration or from a corpus that has changed since is refused, or
        with ``overwrite`` rebuilt: only the files a database names are deleted.
        """
        root = self.root
        manifest, problem = None, None
        if Manifest.exists(root):
            try:
                manifest = Manifest.load(root)
            except DatabaseError as e:
                problem = str(e)
        if manifest is not None:
            diff = config_differences(manifest.config, self.config)
            changes = corpus_mod.fingerprint_changes(manifest.inputs, inputs)
            if not diff and not changes:
                self.manifest = manifest
                return
            if diff:
                problem = (f"{str(root)!r} holds a database built with a different configuration:\n  "
                           + "\n  ".join(diff) + "\nuse another --out directory, or --overwrite to rebuild it")
            else:
                problem = (f"the corpus {self.config['corpus']!r} changed since the database in {str(root)!r} was "
                           f"built ({'; '.join(changes)}); rebuild it with --overwrite, or build into another --out")
        elif problem is None and any(p.fullmatch(e) for e in outdir.user_entries(root)
                                     for p in database_file_patterns()):
            problem = (f"{str(root)!r} is not empty, and is not a retrieval database: it holds a database's files "
                       f"but no {MANIFEST_NAME}")
        if problem is not None and not overwrite:
            raise DatabaseError(problem if "--overwrite" in problem else f"{problem}; pass --overwrite to rebuild it")
        removed = outdir.remove_temporaries(root, database_file_patterns(), inside=[PART_FILE])
        if removed:
            self.log(f"overwrite: removed the old database's {len(removed)} files (and nothing else)")
        self.manifest = Manifest.new(root, self.config, inputs)
        self.manifest.save()

    def first_unfinished(self) -> str | None:
        for stage in STAGES:
            if not self.manifest.finished(stage):
                return stage
            problems = self.manifest.check_stage(stage, full=False)
            if problems:
                self.log(f"stage {stage}: files changed since it finished ({'; '.join(problems)}); redoing it")
                return stage
        return None


def build_database(
    out: str | os.PathLike,
    corpus: str | os.PathLike | None = None,
    *,
    tokenizer: str | os.PathLike | None = None,
    overwrite: bool = False,
    stop_after: str | None = None,
    log: Callable[[str], None] | None = None,
    runtime: dict[str, Any] | None = None,
    **config_overrides,
) -> Path:
    """Build (or resume building) a retrieval database in ``out``; returns its path.

    ``corpus``: a text file, folder or JSONL file; None for Python's documentation.
    ``tokenizer``: a tokenizer.json to use instead of training one.
    ``config_overrides``: keys of ``DEFAULT_CONFIG`` (vocab_size, chunk_size, index_type, k, ...).
    ``runtime``: keys of ``DEFAULT_RUNTIME`` (embed_batch_size, embed_part_size, device, progress).
    ``stop_after``: finish this stage, then return (the rest is done by a later call).
    Under ``torchrun`` every rank runs this; rank 0 does all stages but the
    embedding, which every rank shares; the other ranks return after it.
    """
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after: expected one of {STAGES}, got {stop_after!r}")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    corpus_id = corpus_mod.DEFAULT_CORPUS if corpus is None else str(Path(corpus).resolve())
    if corpus is not None and not Path(corpus).exists():
        raise ValueError(f"corpus: {str(corpus)!r} does not exist (expected a text file, a folder, or a .jsonl file)")
    tok_sum = None
    if tokenizer is not None:
        load_tokenizer(tokenizer)
        tok_sum = sha256_file(tokenizer)
    config = make_config(corpus=corpus_id, tokenizer=tok_sum, **config_overrides)
    runtime = {**DEFAULT_RUNTIME, **(runtime or {})}
    for name in ("embed_batch_size", "embed_part_size"):
        check_value(name, runtime[name])
    runtime_progress = runtime["progress"]
    dist = TorchrunGroup()
    if dist.rank != 0:
        runtime["progress"] = False  # one set of bars; each rank shows its own for the embedding
    builder = Builder(out, config, runtime, None if tokenizer is None else str(tokenizer),
                      log if dist.rank == 0 else (lambda msg: None))
    with contextlib.ExitStack() as hold:
        if dist.rank == 0:  # rank 0 takes the folder for the whole build: new, empty or a database's; locked
            outdir.check_folder(out, "retrieval-db", legacy=Manifest.is_database)
            inputs = corpus_mod.fingerprint(builder.corpus_path, builder.exclude)
            hold.enter_context(outdir.claimed(out, "retrieval-db", legacy=Manifest.is_database,
                                              temporaries=temporary_patterns()))
        return _build(builder, dist, overwrite, stop_after, inputs if dist.rank == 0 else None, runtime_progress, log)


def _build(builder: Builder, dist: TorchrunGroup, overwrite: bool, stop_after: str | None, inputs: dict | None,
           runtime_progress: bool, log) -> Path:
    out = builder.root
    try:
        stages: list[str] = []
        if dist.rank == 0:
            builder.open_or_create(overwrite, inputs)
            start = builder.first_unfinished()
            if start is not None:
                builder.manifest.forget_from(start)
                stages = list(STAGES[STAGES.index(start):])
                if stop_after is not None:
                    stages = [s for s in stages if STAGES.index(s) <= STAGES.index(stop_after)]
            else:
                log(f"{str(out)!r}: every stage already finished; nothing to do")
            # Stages before the embedding run on rank 0 alone.
            for stage in [s for s in stages if STAGES.index(s) < STAGES.index("embed")]:
                _run_stage(builder, stage, dist)
        go_embed = dist.broadcast_flag(int("embed" in stages))
        if dist.rank != 0:
            if go_embed:  # the other ranks only embed their share of the parts
                builder.manifest = Manifest.load(out)
                builder.runtime["progress"] = runtime_progress
                builder.stage_embed(dist)
            return Path(out)
        for stage in [s for s in stages if STAGES.index(s) >= STAGES.index("embed")]:
            _run_stage(builder, stage, dist)
        return Path(out)
    finally:
        dist.close()


def _run_stage(builder: Builder, stage: str, dist: TorchrunGroup) -> None:
    t0 = time.perf_counter()
    fn = getattr(builder, f"stage_{stage}")
    info = fn(dist) if stage == "embed" else fn()
    info = dict(info or {})
    info["seconds"] = round(time.perf_counter() - t0, 3)
    builder.manifest.record(stage, expected_files(stage, info), info)
    builder.log(f"stage {stage} finished in {info['seconds']:.1f}s")
