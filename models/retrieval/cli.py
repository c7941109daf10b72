"""Command-line tools: ``python -m models build-db | query | db-info``."""
from __future__ import annotations

import argparse
import os
import sys
import time

from ..cli_common import Parser, UsageError, command, database, device, existing_path, folder, integer
from .manifest import STAGES


def _checked_by(check):
    """An argparse type= function from a checker that raises ValueError (its message becomes the error)."""
    def parse(text: str) -> str:
        try:
            check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    parse.__name__ = check.__name__
    return parse


def _tokenizer_file(text: str) -> str:
    from .tokenizer import load_tokenizer

    return _checked_by(load_tokenizer)(text)


def _embedder(text: str) -> str:
    from .embed import resolve_model_dir

    return _checked_by(resolve_model_dir)(text)


@command("build-db")
def build_db_main(argv: list[str]) -> int:
    from .. import outdir
    from .build import build_database
    from .config import DEFAULT_CONFIG, DEFAULT_RUNTIME, LIMITS
    from .index import INDEX_TYPES
    from .manifest import Manifest

    p = Parser(
        "python -m models build-db",
        description="Build a RETRO retrieval database (resumable: re-run the same command after an interruption). "
                    "Run it under `torchrun --nproc-per-node N` to share the embedding across N processes.")
    p.add_argument("--corpus", type=existing_path, default=None,
                   help="text file, folder, or .jsonl file (field 'text', optional 'id'); "
                        "default: Python's own documentation, no download")
    p.add_argument("--out", type=folder, required=True, help="database directory")
    p.add_argument("--tokenizer", type=_tokenizer_file, default=None,
                   help="use this tokenizer.json instead of training a BPE")
    p.add_argument("--vocab-size", type=LIMITS["vocab_size"], default=DEFAULT_CONFIG["vocab_size"])
    p.add_argument("--chunk-size", type=LIMITS["chunk_size"], default=DEFAULT_CONFIG["chunk_size"],
                   help="m (neighbours are 2m tokens)")
    p.add_argument("--embedder", type=_embedder, default=DEFAULT_CONFIG["embedder"],
                   help="all-MiniLM-L6-v2 (packaged) or a local transformers model directory")
    p.add_argument("--eval-fraction", type=LIMITS["eval_fraction"], default=DEFAULT_CONFIG["eval_fraction"],
                   help="fraction of documents held out for evaluation")
    p.add_argument("--split-seed", type=LIMITS["split_seed"], default=DEFAULT_CONFIG["split_seed"])
    p.add_argument("--leakage-threshold", type=LIMITS["leakage_threshold"], default=DEFAULT_CONFIG["leakage_threshold"],
                   help="remove training documents with 13-gram Jaccard >= this to an evaluation document")
    p.add_argument("--index-eval-docs", action="store_true",
                   help="make the held-out evaluation documents retrievable too (a 'leaky' database)")
    p.add_argument("--align-sections", action="store_true",
                   help="start every section heading and body on a chunk boundary, so that a section two "
                        "documents share is chunked the same way in both")
    p.add_argument("--max-distance", type=LIMITS["max_distance"], default=None,
                   help="drop neighbours farther than this squared L2 distance (default: keep the K nearest)")
    p.add_argument("--index-type", choices=INDEX_TYPES, default=DEFAULT_CONFIG["index_type"])
    p.add_argument("--nlist", type=LIMITS["nlist"], default=0, help="IVF lists (0: from the data)")
    p.add_argument("--pq-m", type=LIMITS["pq_m"], default=0, help="PQ sub-quantizers (0: from the data)")
    p.add_argument("--pq-nbits", type=LIMITS["pq_nbits"], default=0, help="bits per PQ code (0: from the data)")
    p.add_argument("--hnsw-m", type=LIMITS["hnsw_m"], default=DEFAULT_CONFIG["hnsw_m"])
    p.add_argument("--train-sample", type=LIMITS["train_sample"], default=DEFAULT_CONFIG["train_sample"])
    p.add_argument("--shard-size", type=LIMITS["shard_size"], default=DEFAULT_CONFIG["shard_size"],
                   help="vectors per index shard")
    p.add_argument("-k", "--k", type=LIMITS["k"], default=DEFAULT_CONFIG["k"], help="neighbours precomputed per chunk")
    p.add_argument("--batch-size", type=LIMITS["embed_batch_size"], default=DEFAULT_RUNTIME["embed_batch_size"],
                   help="embedding batch")
    p.add_argument("--part-size", type=LIMITS["embed_part_size"], default=DEFAULT_RUNTIME["embed_part_size"],
                   help="chunks per resumable embedding part")
    p.add_argument("--device", type=device, default=None, help="embedding device (default: cuda if available)")
    p.add_argument("--stop-after", choices=STAGES, default=None, help="stop after this stage")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild a database built with another configuration or from a changed corpus "
                        "(only the database's own files are deleted)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.pq_m:
        from .embed import embedding_dim

        dim = embedding_dim(a.embedder)
        if dim % a.pq_m:
            raise UsageError(f"argument --pq-m: expected a divisor of the embedding dimension {dim}, got {a.pq_m}")
    if int(os.environ.get("RANK", "0")) == 0:
        outdir.check_folder(a.out, "retrieval-db", legacy=Manifest.is_database)
    t0 = time.perf_counter()
    out = build_database(
        a.out, a.corpus, tokenizer=a.tokenizer, overwrite=a.overwrite, stop_after=a.stop_after,
        runtime={"embed_batch_size": a.batch_size, "embed_part_size": a.part_size,
                 "device": None if a.device == "auto" else a.device, "progress": not a.no_progress},
        vocab_size=a.vocab_size, chunk_size=a.chunk_size, embedder=a.embedder, eval_fraction=a.eval_fraction,
        split_seed=a.split_seed, leakage_threshold=a.leakage_threshold, index_eval_docs=a.index_eval_docs,
        align_sections=a.align_sections, max_distance=a.max_distance,
        index_type=a.index_type, nlist=a.nlist, pq_m=a.pq_m, pq_nbits=a.pq_nbits, hnsw_m=a.hnsw_m,
        train_sample=a.train_sample, shard_size=a.shard_size, k=a.k,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"database {out} ready ({time.perf_counter() - t0:.1f}s this run)", file=sys.stderr)
    return 0


@command("query")
def query_main(argv: list[str]) -> int:
    p = Parser("python -m models query", description="Print the nearest database chunks of each chunk of TEXT.")
    p.add_argument("--db", type=database, required=True, help="database directory")
    p.add_argument("text", nargs="+", help="query text (several arguments are joined with spaces)")
    p.add_argument("-k", type=integer(1, 4096), default=3, help="neighbours per chunk")
    p.add_argument("--nprobe", type=integer(1), default=None, help="IVF lists searched")
    p.add_argument("--show", type=integer(0), default=300, help="characters of each neighbour to print")
    a = p.parse_args(argv)
    text = " ".join(a.text)
    if not text.strip():
        raise UsageError("argument text: expected some query text, got only spaces")
    from .query import RetrievalDatabase

    db = RetrievalDatabase.open(a.db, nprobe=a.nprobe)
    ids = db.encode(text)
    if ids.size == 0:
        raise UsageError(f"argument text: {text!r} encodes to no token")
    m = db.chunk_size
    L = -(-ids.size // m)
    vectors = db.embed_chunks([ids[u * m:(u + 1) * m] for u in range(L)])
    dist, chunk_ids = db.search(vectors, a.k)
    for u in range(L):
        print(f"=== query chunk {u} ({min(m, ids.size - u * m)} tokens): {db.decode(ids[u * m:(u + 1) * m])!r}")
        for rank, (d, c) in enumerate(zip(dist[u], chunk_ids[u])):
            if c < 0:
                continue
            doc = int(db.chunk_doc[c])
            values, mask = db.chunk_values([c])
            shown = db.decode(values[0][mask[0]])[:a.show].replace("\n", " ")
            print(f"--- neighbour {rank + 1}: chunk {c} of {db.doc_names[doc]!r}, L2^2 {d:.3f}\n{shown}")
    return 0


@command("db-info")
def info_main(argv: list[str]) -> int:
    p = Parser("python -m models db-info", description="Validate a database; print a summary.")
    p.add_argument("--db", type=database, required=True)
    p.add_argument("--no-verify", action="store_true", help="check file sizes only, not checksums")
    a = p.parse_args(argv)
    from .query import RetrievalDatabase

    db = RetrievalDatabase.open(a.db, verify=not a.no_verify)
    st = db.manifest.stages
    print(f"database {a.db}: OK (fingerprint {db.fingerprint}, tokenizer {db.tokenizer_fingerprint})")
    print(f"  documents: {len(db.doc_names)} ({len(db.documents('train'))} train, {len(db.documents('eval'))} eval, "
          f"{len(db.documents('removed'))} removed by the leakage filter)")
    print(f"  tokens: {db.tokens.size}, vocab {db.vocab_size}, chunks {db.num_chunks} of {db.chunk_size}")
    print(f"  index: {st['train_index']['info'].get('factory')} in {len(st['add']['info']['shards'])} shard(s)")
    for stage in STAGES:
        print(f"  stage {stage:12s} {st[stage]['info'].get('seconds', 0):8.1f}s")
    return 0
