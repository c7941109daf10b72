"""The build's first stages, from text to token streams (tokenizer, tokenize, split, chunk): functions of
the build (`build.Builder`) that write their files atomically and return what the manifest records."""
from __future__ import annotations

import collections
import contextlib
import functools
import shutil
from pathlib import Path

import numpy as np

from ..atomic import atomic_file
from . import corpus as corpus_mod
from . import engine as engine_mod
from . import index as index_mod
from .config import held_out
from .doc_table import DocNames, DocumentTable, NpyAppender
from .embed import embedding_dim
from .leakage import NUM_PERM, MinHasher, find_leaked
from .manifest import SPLITS, STREAM_SPLITS, read_rows, release_pages
from .tokenizer import EOS_TOKEN, PAD_TOKEN, load_tokenizer, token_dtype, train_bpe

BATCH_DOCS, BATCH_CHARS = 256, 8 << 20  # documents encoded per tokenizer call, at most


# -- tokenizer ----------------------------------------------------------------------------

def train_or_copy_tokenizer(build) -> dict:
    """tokenizer.json: the given one (checked), or a byte-level BPE trained on the training documents."""
    dest = build.root / "tokenizer.json"
    if build.tokenizer_path is not None:  # (checked by build_database)
        with atomic_file(dest) as tmp:
            shutil.copyfile(build.tokenizer_path, tmp)
        return {"trained": False}
    cfg = build.config

    def training_texts():
        skip = False
        with build.progress(desc="tokenizer: reading corpus", unit="doc") as bar:
            for doc in build.corpus(warn=lambda msg: None):
                if not doc.continued:
                    skip = held_out(doc.doc_id, cfg["eval_fraction"], cfg["split_seed"])
                    bar.update(1)
                if not skip:  # evaluation documents never shape the tokenizer
                    yield doc.text

    tokenizer = train_bpe(training_texts(), cfg["vocab_size"])
    with atomic_file(dest) as tmp:
        tokenizer.save(str(tmp))
    return {"trained": True, "vocab_size": tokenizer.get_vocab_size()}


# -- tokenize -----------------------------------------------------------------------------

def tokenize_corpus(build) -> dict:
    """tokens.bin (every document's token ids, concatenated) and the document table; batches of documents
    are encoded in parallel on the Ray engine, written in corpus order."""
    dtype = token_dtype(build.tokenizer.get_vocab_size())
    stats, batches, cfg = corpus_mod.CorpusStats(), collections.deque(), build.config

    def units():
        for docs in _batches(build.corpus(stats=stats, warn=build.log)):
            batches.append(docs)
            yield f"of the documents from {docs[0].doc_id!r}", (
                str(build.root / "tokenizer.json"), [d.text for d in docs], dtype.name, build.m,
                cfg["align_sections"], cfg["split_seed"])

    with build.progress(desc="tokenize", unit="doc") as bar, atomic_file(build.root / "tokens.bin") as tmp, \
            open(tmp, "wb") as f, DocumentTable(build.root, NUM_PERM) as table:
        for encoded in engine_mod.map_units(**build.engine, fn=encode_unit, units=units(), what="tokenize batch"):
            for doc, ids, size, signature in zip(batches.popleft(), *encoded):
                f.write(ids.tobytes())
                bar.update(table.add(doc, ids.size, size, signature))
            bar.set_postfix(tokens=table.num_tokens, refresh=False)
        if not table.num_docs:  # nothing is written
            raise ValueError(f"corpus {build.config['corpus']!r} contains no usable documents ({stats.as_dict()})")
    build.log(f"tokenize: {table.num_docs} documents, {table.num_tokens} tokens, {table.num_bytes} bytes; "
              f"corpus {stats.as_dict()}")
    # a document that encodes to nothing keeps its slot (empty_docs)
    return {"dtype": dtype.name, "num_tokens": int(table.num_tokens), "num_docs": table.num_docs,
            "num_bytes": int(table.num_bytes), "empty_docs": int(table.empty_docs), "corpus": stats.as_dict()}


def encode_unit(tokenizer_path: str, texts: list[str], dtype: str, chunk_size: int, align_sections: bool,
                seed: int) -> tuple[list, list, list]:
    """A batch of documents: (token ids, UTF-8 bytes, MinHash signature) of each."""
    tokenizer = _tokenizer(tokenizer_path, Path(tokenizer_path).stat().st_mtime_ns)
    hasher = MinHasher(NUM_PERM, seed=seed)
    ids = encode_documents(tokenizer, texts, np.dtype(dtype), chunk_size, align_sections)
    return ids, [len(t.encode("utf-8", errors="replace")) for t in texts], [hasher.signature(t) for t in texts]


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str, mtime_ns: int):
    return load_tokenizer(path)


def _batches(docs):
    """The documents in lists of at most BATCH_DOCS documents or (about) BATCH_CHARS characters."""
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_documents(tokenizer, texts: list[str], dtype, chunk_size: int, align_sections: bool) -> list[np.ndarray]:
    """Token ids of each text; with ``align_sections``, each section padded to a chunk boundary."""
    if not align_sections:
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
            if i < len(segs) - 1 and ids.size % chunk_size:  # the next section starts a chunk
                parts.append(np.full(chunk_size - ids.size % chunk_size, pad, dtype=dtype))
        out.append(np.concatenate(parts) if parts else np.zeros(0, dtype=dtype))
    return out


# -- split --------------------------------------------------------------------------------

def hold_out_documents(build) -> dict:
    """doc_split.npy: the evaluation documents (a hash of their id), and the training documents the
    leakage filter removes (MinHash Jaccard >= leakage_threshold with an evaluation document); the
    names and signatures are read a block at a time, the split written a block at a time."""
    cfg, names = build.config, DocNames(build.root)
    eval_docs = np.array([d for d, name in enumerate(names) if held_out(name, cfg["eval_fraction"], cfg["split_seed"])],
                         dtype=np.int64)
    matches = find_leaked(build.npy("doc_signatures.npy"), eval_docs, cfg["leakage_threshold"])
    leaked = np.array(sorted(matches), dtype=np.int64)
    with atomic_file(build.root / "doc_split.npy") as tmp, open(tmp, "wb") as f:
        split = NpyAppender(f, np.int8)
        for lo in range(0, len(names), 1 << 20):
            block = np.full(min(len(names) - lo, 1 << 20), SPLITS["train"], dtype=np.int8)
            for docs, value in ((eval_docs, SPLITS["eval"]), (leaked, SPLITS["removed"])):
                block[docs[(docs >= lo) & (docs < lo + block.size)] - lo] = value
            split.append(block)
        split.close()
    removed = [{"doc": names[d], "eval_doc": names[e], "jaccard": round(j, 3)} for d, (e, j) in sorted(matches.items())]
    train_docs = len(names) - eval_docs.size - leaked.size
    build.log(f"split: {eval_docs.size} evaluation documents held out, {train_docs} training; "
              f"leakage filter removed {len(removed)} document(s) with Jaccard >= {cfg['leakage_threshold']} "
              f"to an evaluation document")
    for r in removed[:20]:
        build.log(f"  removed {r['doc']!r} (Jaccard {r['jaccard']} with eval doc {r['eval_doc']!r})")
    return {"eval_docs": int(eval_docs.size), "train_docs": int(train_docs),
            "removed_leaked": len(removed), "removed": removed[:1000]}


# -- chunk --------------------------------------------------------------------------------

DOC_BLOCK = 4096  # documents the chunk stage reads, cuts and appends at a time


def cut_chunks_and_streams(build) -> dict:
    """The chunk table of the retrieval documents (chunk_doc.npy, chunk_start.npy) and the token stream
    of each split (stream_<split>.bin and its chunks' documents and database chunks), in one pass over
    blocks of documents: the document tables are read and the chunk tables appended a block at a time."""
    m, sources = build.m, _DocSources(build)
    num_docs = sources.split.shape[0]
    tables = {"chunk_doc.npy": np.int32, "chunk_start.npy": np.int64}
    for name in STREAM_SPLITS:
        tables.update({f"stream_{name}_chunk_doc.npy": np.int32, f"stream_{name}_db_chunk.npy": np.int64})
    streams = {name: {"tokens": 0, "docs": 0, "bytes": 0} for name in STREAM_SPLITS}
    with contextlib.ExitStack() as stack:
        files = {n: stack.enter_context(open(stack.enter_context(atomic_file(build.root / n)), "wb"))
                 for n in [*tables, *(f"stream_{name}.bin" for name in STREAM_SPLITS)]}
        out = {n: NpyAppender(files[n], dtype) for n, dtype in tables.items()}
        num_chunks = retrieval_docs = 0
        for lo in range(0, num_docs, DOC_BLOCK):
            block = _DocBlock(sources, lo, min(lo + DOC_BLOCK, num_docs))
            first = block.cut_chunks(out, num_chunks)
            num_chunks, retrieval_docs = num_chunks + block.chunks, retrieval_docs + block.retrievable.sum()
            for name in STREAM_SPLITS:
                block.write_stream(name, first, out, files[f"stream_{name}.bin"], streams[name])
        if num_chunks == 0:  # nothing is written
            raise ValueError("no documents are left for the retrieval database (all held out, removed or empty)")
        for name in STREAM_SPLITS:
            if streams[name]["tokens"] == 0:  # a stream file is never empty: it could not be mapped
                files[f"stream_{name}.bin"].write(np.full(1, sources.pad, sources.tokens.dtype).tobytes())
        for table in out.values():
            table.close()
    info = {"num_chunks": int(num_chunks), "retrieval_docs": int(retrieval_docs)}
    info.update({f"stream_{name}_{key}": int(v) for name, counts in streams.items() for key, v in counts.items()})
    build.log(f"chunk: {num_chunks} retrieval chunks of {m} tokens from {retrieval_docs} documents")
    _check_index_fits(build.config, num_chunks)
    return info


class _DocSources:
    """What the chunk stage reads: the document tables and tokens (memory-mapped), the special tokens."""

    def __init__(self, build):
        self.m, self.offsets, self.split = build.m, build.npy("doc_offsets.npy"), build.npy("doc_split.npy")
        self.bytes, self.tokens = build.npy("doc_bytes.npy"), build.manifest.tokens()
        self.pad, self.eos = build.tokenizer.token_to_id(PAD_TOKEN), build.tokenizer.token_to_id(EOS_TOKEN)
        self.kept = [SPLITS["train"]] + ([SPLITS["eval"]] if build.config["index_eval_docs"] else [])


class _DocBlock:
    """Documents ``lo:hi``: their offsets, lengths and split, read from the document tables."""

    def __init__(self, sources: _DocSources, lo: int, hi: int):
        self.sources, self.m, self.docs = sources, sources.m, np.arange(lo, hi)
        self.offsets = read_rows(sources.offsets, np.arange(lo, hi + 1))
        self.split, self.lengths = read_rows(sources.split, self.docs), np.diff(self.offsets)
        self.retrievable = np.isin(self.split, sources.kept) & (self.lengths > 0)

    def cut_chunks(self, out: dict, base: int) -> np.ndarray:
        """Append the block's database chunks (every 64 tokens of a retrievable document; the last,
        partial one kept, padded and masked); returns each document's first chunk id (-1: none)."""
        per_doc = np.where(self.retrievable, -(-self.lengths // self.m), 0)
        first = np.where(self.retrievable, base + np.cumsum(per_doc) - per_doc, -1)
        for _, _, doc, within in _doc_blocks(self.docs[self.retrievable], per_doc[self.retrievable]):
            out["chunk_doc.npy"].append(doc)
            out["chunk_start.npy"].append(self.offsets[doc - self.docs[0]] + within * self.m)
        self.chunks = int(per_doc.sum())
        return first

    def write_stream(self, name: str, first: np.ndarray, out: dict, stream, counts: dict) -> None:
        """Append the block's documents of split ``name`` to its stream: each from a chunk boundary, then
        <|endoftext|>, then padding; with the document of each stream chunk and the database chunk holding
        the same tokens (-1: none)."""
        m, at = self.m, np.flatnonzero((self.split == SPLITS[name]) & (self.lengths > 0))
        nchunks = -(-(self.lengths[at] + 1) // m)  # room for the document and its <|endoftext|>
        for _, _, doc, within in _doc_blocks(self.docs[at], nchunks):
            i = doc - self.docs[0]
            # the chunk after a document's last token (only <|endoftext|> and padding) is not in the database
            in_db = (first[i] >= 0) & (within * m < self.lengths[i])
            out[f"stream_{name}_chunk_doc.npy"].append(doc)
            out[f"stream_{name}_db_chunk.npy"].append(np.where(in_db, first[i] + within, -1))
        if not at.size:
            return
        tokens = self.sources.tokens
        text = np.array(tokens[self.offsets[at[0]]:self.offsets[at[-1] + 1]])  # the documents, and between them
        release_pages(tokens)
        buf, starts = np.full(int(nchunks.sum()) * m, self.sources.pad, tokens.dtype), (np.cumsum(nchunks) - nchunks) * m
        for i, start in zip(at, starts):
            n = int(self.lengths[i])
            buf[start:start + n] = text[self.offsets[i] - self.offsets[at[0]]:][:n]
            buf[start + n] = self.sources.eos
        stream.write(buf.tobytes())
        counts["tokens"] += buf.size
        counts["docs"] += at.size
        counts["bytes"] += int(read_rows(self.sources.bytes, self.docs[at]).sum())


def _doc_blocks(docs: np.ndarray, counts: np.ndarray, block: int = 4096):
    """(lo, hi, document of each row, row within its document) of the rows of ``block`` documents at a
    time, document ``docs[i]`` having ``counts[i]`` consecutive rows."""
    first = np.cumsum(counts) - counts
    for a in range(0, len(docs), block):
        lo, n = int(first[a]), counts[a:a + block]
        hi = lo + int(n.sum())
        yield lo, hi, np.repeat(docs[a:a + block], n), np.arange(hi - lo) - np.repeat(first[a:a + block] - lo, n)


def _check_index_fits(cfg: dict, num_chunks: int) -> None:
    """The index options against the number of chunks, now: not after the (long) embedding (brought-in keys
    are counted by the next stage, before they are copied)."""
    kind = index_mod.resolve_index_type(cfg["index_type"], num_chunks)
    if kind != "scann":  # ScaNN fits its leaves to the keys
        index_mod.factory_string(kind, min(num_chunks, cfg["train_sample"]), embedding_dim(cfg["embedder"]), cfg)
