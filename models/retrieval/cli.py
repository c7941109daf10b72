"""Command-line tools: ``python -m models build-db | query | db-info``."""
from __future__ import annotations

import argparse
import sys
import time

from ..cli_common import Parser, UsageError, command, database, device, existing_path, folder, integer
from .config import DEFAULT_CONFIG, DEFAULT_RUNTIME, LIMITS
from .embed import resolve_model_dir
from .index import resolve_index_type
from .manifest import STAGES
from .tokenizer import load_tokenizer


def _checked_by(check):
    """An argparse type= function from a checker that raises ValueError (its message becomes the error)."""
    def parse(text: str) -> str:
        try:
            check(text)
        except ValueError as e:  # "name: why" becomes "argument --name: why"
            name, _, why = str(e).partition(": ")
            raise argparse.ArgumentTypeError(why if name.isidentifier() and why else str(e)) from None
        return text

    return parse


# build-db's flags for the database's configuration (config.DEFAULT_CONFIG, whose values are their defaults;
# config.LIMITS has the range of each number), with their help.
CONFIG_FLAGS = {
    "vocab_size": "BPE vocabulary (when no --tokenizer is given)",
    "chunk_size": "m (neighbours are 2m tokens)",
    "embedder": "all-MiniLM-L6-v2 (packaged) or a local transformers model directory",
    "eval_fraction": "fraction of documents held out for evaluation",
    "split_seed": "seed of the held-out split (a hash of each document id) and of the index's training sample",
    "leakage_threshold": "remove training documents with 13-gram Jaccard >= this to an evaluation document",
    "index_eval_docs": "make the held-out evaluation documents retrievable too (a 'leaky' database)",
    "align_sections": "start every section heading and body on a chunk boundary (shared sections chunk alike)",
    "max_distance": "drop neighbours farther than this squared L2 distance (default: keep the K nearest)",
    "embeddings": "the chunks' keys from --embedder's model: a (chunks, dim) float16/32 .npy or a folder of parts",
    "index_type": "flat (exact), ivfpq, auto (flat up to 200,000 chunks), scann, or a FAISS factory string IVF...",
    "nlist": "IVF lists (0: from the data)",
    "pq_m": "PQ sub-quantizers (0: from the data)",
    "pq_nbits": "bits per PQ code (0: from the data)",
    "train_sample": "vectors the IVF index is trained on",
    "shard_size": "keys per add unit and query chunks per neighbour-table unit (the resumable units)",
    "nprobe": "IVF lists searched for the neighbour tables",
    "rerank": "candidates of a compressed index (PQ, SQ) re-ranked by exact distance (0: max(100, 10 k))",
    "k": "neighbours precomputed per chunk",
}


def _add_config_flags(p) -> None:
    other_types = {"embedder": dict(type=_checked_by(resolve_model_dir)), "embeddings": dict(type=existing_path),
                   "index_type": dict(type=_checked_by(lambda text: resolve_index_type(text, 0)))}
    for key, help_ in CONFIG_FLAGS.items():
        names = ("-k", "--k") if key == "k" else ("--" + key.replace("_", "-"),)
        default = DEFAULT_CONFIG[key]
        if isinstance(default, bool):
            p.add_argument(*names, action="store_true", help=help_)
        else:
            kind = dict(type=LIMITS[key]) if key in LIMITS else other_types[key]
            p.add_argument(*names, default=default, help=help_, **kind)


def _build_db_parser() -> Parser:
    p = Parser(
        "python -m models build-db",
        description="Build a RETRO retrieval database (resumable: re-run the same command after an interruption). "
                    "--engine ray runs its heavy stages on a Ray cluster.")
    p.add_argument("--corpus", type=existing_path, default=None,
                   help="text file, folder, or .jsonl file (field 'text', optional 'id'); "
                        "default: Python's own documentation, no download")
    p.add_argument("--out", type=folder, required=True, help="database directory")
    p.add_argument("--tokenizer", type=_checked_by(load_tokenizer), default=None,
                   help="use this tokenizer.json instead of training a BPE")
    _add_config_flags(p)
    p.add_argument("--batch-size", type=LIMITS["embed_batch_size"], default=DEFAULT_RUNTIME["embed_batch_size"],
                   help="embedding batch")
    p.add_argument("--part-size", type=LIMITS["embed_part_size"], default=DEFAULT_RUNTIME["embed_part_size"],
                   help="chunks per resumable embedding part")
    p.add_argument("--device", type=device, default=None, help="embedding device (default: cuda if available)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process; ray: the heavy stages as Ray work (pip install 'retro_kernels[ray]')")
    p.add_argument("--ray-address", default=None,
                   help="the Ray cluster to join (default: RAY_ADDRESS, else a local cluster on this machine)")
    p.add_argument("--workers", type=LIMITS["workers"], default=None,
                   help="Ray units at a time (default: the cluster's CPUs)")
    p.add_argument("--stop-after", choices=STAGES, default=None, help="stop after this stage")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild a database built with another configuration or from a changed corpus "
                        "(only the database's own files are deleted)")
    p.add_argument("--no-progress", action="store_true")
    return p


@command("build-db")
def build_db_main(argv: list[str]) -> int:
    from .build import build_database

    flags = _build_db_parser().parse_args(argv)
    if flags.ray_address and flags.engine != "ray":
        raise UsageError("argument --ray-address: only with --engine ray")
    try:  # before any work: Ray installed, --pq-m and the brought-in keys of the embedder's width
        from .build_index import check_embeddings
        from .embed import embedding_dim
        from .engine import check_engine

        check_engine(flags.engine)
        dim = embedding_dim(flags.embedder)
        if flags.pq_m and dim % flags.pq_m:
            raise ValueError(f"pq_m: expected a divisor of the embedding dimension {dim}, got {flags.pq_m}")
        if flags.embeddings is not None:
            check_embeddings(flags.embeddings, dim)
    except ValueError as e:
        name, _, why = str(e).partition(": ")
        raise UsageError(f"argument --{name.replace('_', '-')}: {why}") from None
    t0 = time.perf_counter()
    out = build_database(
        flags.out, flags.corpus, tokenizer=flags.tokenizer, overwrite=flags.overwrite, stop_after=flags.stop_after,
        engine=flags.engine, workers=flags.workers, ray_address=flags.ray_address,
        runtime={"embed_batch_size": flags.batch_size, "embed_part_size": flags.part_size,
                 "device": None if flags.device == "auto" else flags.device, "progress": not flags.no_progress},
        **{key: getattr(flags, key) for key in CONFIG_FLAGS})
    print(f"database {out} ready ({time.perf_counter() - t0:.1f}s this run)", file=sys.stderr)
    return 0


@command("query")
def query_main(argv: list[str]) -> int:
    p = Parser("python -m models query", description="Print the nearest database chunks of each chunk of TEXT.")
    p.add_argument("--db", type=database, required=True, help="database directory")
    p.add_argument("text", nargs="+", help="query text (several arguments are joined with spaces)")
    p.add_argument("-k", type=integer(1, 4096), default=3, help="neighbours per chunk")
    p.add_argument("--nprobe", type=integer(1), default=None, help="IVF lists searched (default: the build's)")
    p.add_argument("--rerank", type=integer(0), default=None,
                   help="candidates of a compressed index re-ranked by exact distance (default: the build's)")
    p.add_argument("--show", type=integer(0), default=300, help="characters of each neighbour to print")
    flags = p.parse_args(argv)
    text = " ".join(flags.text)
    if not text.strip():
        raise UsageError("argument text: expected some query text, got only spaces")
    from .query import RetrievalDatabase

    db = RetrievalDatabase.open(flags.db, nprobe=flags.nprobe, rerank=flags.rerank)
    ids = db.encode(text)
    if ids.size == 0:
        raise UsageError(f"argument text: {text!r} encodes to no token")
    m = db.chunk_size
    L = -(-ids.size // m)
    vectors = db.embed_chunks([ids[u * m:(u + 1) * m] for u in range(L)])
    dist, chunk_ids = db.search(vectors, flags.k)
    for u in range(L):
        print(f"=== query chunk {u} ({min(m, ids.size - u * m)} tokens): {db.decode(ids[u * m:(u + 1) * m])!r}")
        for rank, (d, c) in enumerate(zip(dist[u], chunk_ids[u])):
            if c < 0:
                continue
            doc = int(db.chunk_doc[c])
            values, mask = db.chunk_values([c])
            shown = db.decode(values[0][mask[0]])[:flags.show].replace("\n", " ")
            print(f"--- neighbour {rank + 1}: chunk {c} of {db.doc_names[doc]!r}, L2^2 {d:.3f}\n{shown}")
    return 0


@command("db-info")
def info_main(argv: list[str]) -> int:
    p = Parser("python -m models db-info", description="Validate a database; print a summary.")
    p.add_argument("--db", type=database, required=True)
    p.add_argument("--no-verify", action="store_true", help="check file sizes only, not checksums")
    flags = p.parse_args(argv)
    from .query import RetrievalDatabase

    db = RetrievalDatabase.open(flags.db, verify=not flags.no_verify)
    stages = db.manifest.stages
    print(f"database {flags.db}: OK (fingerprint {db.fingerprint}, tokenizer {db.tokenizer_fingerprint})")
    print(f"  documents: {len(db.doc_names)} ({len(db.documents('train'))} train, {len(db.documents('eval'))} eval, "
          f"{len(db.documents('removed'))} removed by the leakage filter)")
    print(f"  tokens: {db.tokens.size}, vocab {db.vocab_size}, chunks {db.num_chunks} of {db.chunk_size}")
    print(f"  index: {stages['train_index']['info'].get('factory')}, inverted lists on disk "
          f"({stages['add']['info'].get('shards')} shard(s) merged)")
    for stage in STAGES:
        print(f"  stage {stage:12s} {stages[stage]['info'].get('seconds', 0):8.1f}s")
    return 0
