"""A database's files checked before they are trusted, in the order `RetrievalDatabase` makes the checks:
every stage finished with its recorded files (`check_finished`); what the manifest declares holds before
the files are read (`check_declared`); the loaded tables agree (`check_loaded`). Each raises one
DatabaseError listing every problem it found."""
from __future__ import annotations

import os

import numpy as np

from .config import LIMITS, check_value, config_differences
from .manifest import STAGES, STREAM_SPLITS, DatabaseError, load_npy
from .tokenizer import load_tokenizer, token_dtype


def check_finished(root, manifest, verify: bool, expect_config: dict | None, tokenizer) -> None:
    """Every stage finished, its files as recorded (``verify``: their sha256 too), the configuration and
    tokenizer the caller expects."""
    missing = [s for s in STAGES if not manifest.finished(s)]
    if missing:
        raise DatabaseError(
            f"database {str(root)!r} is incomplete: stage(s) {missing} never finished; re-run "
            "`python -m models build-db` with the same arguments to resume it")
    for stage in STAGES:
        problems = manifest.check_stage(stage, full=verify)
        if problems:
            raise DatabaseError(f"database {str(root)!r} is corrupted ({stage} stage): " + "; ".join(problems))
    if expect_config:
        have = {k: manifest.config.get(k) for k in expect_config}
        diff = config_differences(have, dict(expect_config))
        if diff:
            raise DatabaseError(f"database {str(root)!r} was built with a different configuration:\n  "
                                + "\n  ".join(diff))
    if tokenizer is not None:
        given = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        ours = load_tokenizer(root / "tokenizer.json")
        if given.to_str() != ours.to_str():
            raise DatabaseError(
                f"database {str(root)!r} was built with a different tokenizer than the one given "
                f"({given.get_vocab_size()} vs {ours.get_vocab_size()} tokens); its token ids would be wrong")


def check_declared(db) -> None:
    """What the manifest declares about its files, checked against them before they are read."""
    problems = []
    for name in LIMITS:
        if name in db.config:
            try:
                check_value(name, db.config[name])
            except ValueError as e:
                problems.append(f"config {e}")
    _raise_if(db, problems)
    info, m = db.manifest.info("tokenize"), db.chunk_size
    dtype = token_dtype(db.vocab_size)
    if info.get("dtype") != dtype.name:
        problems.append(f"the manifest declares token dtype {info.get('dtype')!r}, the tokenizer's "
                        f"{db.vocab_size} tokens are stored as {dtype.name!r}")
    num_tokens = info.get("num_tokens")
    size = (db.root / "tokens.bin").stat().st_size
    if not isinstance(num_tokens, int) or size != num_tokens * dtype.itemsize:
        problems.append(f"tokens.bin holds {size} bytes, not {num_tokens!r} tokens of {dtype.name}")
    for split in STREAM_SPLITS:
        size = (db.root / f"stream_{split}.bin").stat().st_size
        whole_chunks = size % dtype.itemsize == 0 and (size // dtype.itemsize) % m == 0
        if not whole_chunks and size != dtype.itemsize:  # an empty stream is one padding token
            problems.append(f"stream_{split}.bin holds {size} bytes: not whole chunks of {m} {dtype.name} tokens")
    _raise_if(db, problems)


def check_loaded(db) -> None:
    """The loaded tables against each other and against the manifest's counts."""
    _raise_if(db, _document_problems(db))
    _raise_if(db, _chunk_problems(db) + _index_problems(db) + _stream_problems(db))


def _document_problems(db) -> list[str]:
    D = db.manifest.info("tokenize").get("num_docs")
    offsets = np.asarray(db.doc_offsets)
    problems = []
    if not isinstance(D, int) or offsets.shape != (D + 1,):
        problems.append(f"doc_offsets.npy has {offsets.shape[0]} entries for {D!r} documents")
    elif offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != db.tokens.size:
        problems.append("document offsets do not match the token file")
    for name, table in (("doc_bytes.npy", db.doc_bytes), ("doc_name_offsets.npy", db.doc_names),
                        ("doc_split.npy", db.doc_split)):
        if len(table) != len(offsets) - 1:
            problems.append(f"{name} has {len(table)} entries for {len(offsets) - 1} documents")
    return problems


def _chunk_problems(db, block: int = 1 << 20) -> list[str]:
    n, m, offsets = db.chunk_doc.shape[0], db.chunk_size, db.doc_offsets
    if db.chunk_start.shape[0] != n or db.embeddings.shape[0] != n:
        return [f"chunk table ({n}) and embeddings ({db.embeddings.shape[0]}) disagree"]
    for lo in range(0, n, block):  # memory-mapped tables, read a block at a time
        doc = np.asarray(db.chunk_doc[lo:lo + block], dtype=np.int64)
        if doc.min() < 0 or doc.max() >= len(offsets) - 1:
            return ["chunk_doc.npy names documents that do not exist"]
        within = db.chunk_start[lo:lo + block] - offsets[doc]
        if ((within < 0) | (within >= offsets[doc + 1] - offsets[doc]) | (within % m != 0)).any():
            return [f"chunk_start.npy does not cut the documents into chunks of {m} tokens"]
    return []


def _index_problems(db) -> list[str]:
    n, dim = db.chunk_doc.shape[0], db.manifest.info("embed").get("dim")
    problems = []
    if db.embeddings.shape[1:] != (dim,):
        problems.append(f"embeddings.npy has shape {db.embeddings.shape}, the manifest declares dimension {dim!r}")
    if db.index.ntotal != n:
        problems.append(f"index holds {db.index.ntotal} vectors, the chunk table {n}")
    if db.index.dim != db.embeddings.shape[1]:
        problems.append(f"index dimension {db.index.dim} != embedding dimension {db.embeddings.shape[1]}")
    return problems


def _stream_problems(db) -> list[str]:
    m, problems = db.chunk_size, []
    for split in STREAM_SPLITS:
        docs = load_npy(db.root / f"stream_{split}_chunk_doc.npy")
        tokens = (db.root / f"stream_{split}.bin").stat().st_size // db.tokens.dtype.itemsize
        if tokens != max(1, docs.shape[0] * m):
            problems.append(f"stream_{split}.bin holds {tokens} tokens, not {docs.shape[0]} chunks of {m}")
        if load_npy(db.root / f"stream_{split}_db_chunk.npy").shape != docs.shape:
            problems.append(f"stream_{split}_db_chunk.npy does not match stream_{split}_chunk_doc.npy")
        if db.manifest.finished("query"):  # the neighbour tables exist once the last stage finished
            table = load_npy(db.root / f"neighbours_{split}.npy")
            if table.shape != (docs.shape[0], db.config["k"]):
                problems.append(f"neighbours_{split}.npy has shape {table.shape}, expected "
                                f"({docs.shape[0]}, k={db.config['k']})")
    return problems


def _raise_if(db, problems: list[str]) -> None:
    if problems:
        raise DatabaseError(f"database {str(db.root)!r} is inconsistent: " + "; ".join(problems))
