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

def cut_chunks_and_streams(build) -> dict:
    """The chunk table of the retrieval documents (chunk_doc.npy, chunk_start.npy) and the token stream
    of each split (stream_<split>.bin and its chunks' documents and database chunks); the per-chunk
    tables are written a block of documents at a time."""
    m, offsets = build.m, np.asarray(build.npy("doc_offsets.npy"))
    split, lengths = np.asarray(build.npy("doc_split.npy")), np.diff(offsets)
    retrievable = split == SPLITS["train"]
    if build.config["index_eval_docs"]:
        retrievable |= split == SPLITS["eval"]
    docs = np.flatnonzero(retrievable & (lengths > 0))
    if docs.size == 0:
        raise ValueError("no documents are left for the retrieval database (all held out, removed or empty)")
    per_doc = -(-lengths[docs] // m)  # ceil: the last, partial chunk is kept (padded and masked)
    # database chunk id of (doc, chunk-in-doc): chunks of a doc are consecutive
    doc_first_chunk = np.full(len(lengths), -1, dtype=np.int64)
    doc_first_chunk[docs] = np.cumsum(per_doc) - per_doc
    with _tables(build.root, {"chunk_doc.npy": np.int32, "chunk_start.npy": np.int64}, int(per_doc.sum())) as t:
        for lo, hi, doc, within in _doc_blocks(docs, per_doc):
            t["chunk_doc.npy"][lo:hi], t["chunk_start.npy"][lo:hi] = doc, offsets[doc] + within * m
            release_pages(*t.values())
    info = {"num_chunks": int(per_doc.sum()), "retrieval_docs": int(docs.size)}
    for name in STREAM_SPLITS:
        info.update(write_stream(build, name, np.flatnonzero((split == SPLITS[name]) & (lengths > 0)), offsets,
                                 doc_first_chunk))
    build.log(f"chunk: {info['num_chunks']} retrieval chunks of {m} tokens from {docs.size} documents")
    _check_index_fits(build.config, info["num_chunks"])
    return info


def _doc_blocks(docs: np.ndarray, counts: np.ndarray, block: int = 4096):
    """(lo, hi, document of each row, row within its document) of the rows of ``block`` documents at a
    time, document ``docs[i]`` having ``counts[i]`` consecutive rows."""
    first = np.cumsum(counts) - counts
    for a in range(0, len(docs), block):
        lo, n = int(first[a]), counts[a:a + block]
        hi = lo + int(n.sum())
        yield lo, hi, np.repeat(docs[a:a + block], n), np.arange(hi - lo) - np.repeat(first[a:a + block] - lo, n)


@contextlib.contextmanager
def _tables(root, dtypes: dict, rows: int):
    """``{name: (rows,) memory-mapped .npy}`` written atomically when the block ends."""
    with contextlib.ExitStack() as stack:
        maps = {n: np.lib.format.open_memmap(stack.enter_context(atomic_file(root / n)), mode="w+", dtype=t,
                                             shape=(rows,)) for n, t in dtypes.items()}
        yield maps
        for table in maps.values():
            table.flush()
        maps.clear()


def write_stream(build, name: str, docs: np.ndarray, offsets: np.ndarray, doc_first_chunk: np.ndarray) -> dict:
    """Stream ``name`` of documents ``docs``: each from a chunk boundary, then <|endoftext|>, then padding;
    with the document of each stream chunk and the database chunk holding the same tokens (-1: none)."""
    m, lengths = build.m, np.diff(offsets)
    tokens, tokenizer = build.manifest.tokens(), build.tokenizer
    eos, pad = tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(PAD_TOKEN)
    nchunks = -(-(lengths[docs] + 1) // m)  # room for the document and its <|endoftext|>
    tables = {f"stream_{name}_chunk_doc.npy": np.int32, f"stream_{name}_db_chunk.npy": np.int64}
    with _tables(build.root, tables, int(nchunks.sum())) as t:
        for lo, hi, doc, within in _doc_blocks(docs, nchunks):
            # the chunk after a document's last token (only <|endoftext|> and padding) is not in the database
            in_db = (doc_first_chunk[doc] >= 0) & (within * m < lengths[doc])
            t[f"stream_{name}_chunk_doc.npy"][lo:hi] = doc
            t[f"stream_{name}_db_chunk.npy"][lo:hi] = np.where(in_db, doc_first_chunk[doc] + within, -1)
            release_pages(*t.values())
    with atomic_file(build.root / f"stream_{name}.bin") as tmp:
        out = np.memmap(tmp, dtype=tokens.dtype, mode="w+", shape=(max(1, int(nchunks.sum()) * m),))
        out[:] = pad
        pos, released = 0, 0
        for d, n in zip(docs, nchunks):
            out[pos:pos + lengths[d]] = tokens[offsets[d]:offsets[d + 1]]
            out[pos + lengths[d]] = eos
            pos += int(n) * m
            if pos - released > 1 << 24:  # tokens written since the maps' pages were last unmapped
                release_pages(out, tokens)
                released = pos
        out.flush()
        del out
    doc_bytes = build.npy("doc_bytes.npy")
    size = sum(int(read_rows(doc_bytes, docs[lo:lo + (1 << 20)]).sum()) for lo in range(0, docs.size, 1 << 20))
    return {f"stream_{name}_tokens": int(nchunks.sum()) * m, f"stream_{name}_docs": int(docs.size),
            f"stream_{name}_bytes": size}


def _check_index_fits(cfg: dict, num_chunks: int) -> None:
    """The index options against the number of chunks, now: not after the (long) embedding (brought-in keys
    are counted by the next stage, before they are copied)."""
    kind = index_mod.resolve_index_type(cfg["index_type"], num_chunks)
    if kind != "scann":  # ScaNN fits its leaves to the keys
        index_mod.factory_string(kind, min(num_chunks, cfg["train_sample"]), embedding_dim(cfg["embedder"]), cfg)
