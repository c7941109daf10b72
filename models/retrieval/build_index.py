"""The build's last stages, from chunks to neighbours (embed, train_index, add + merge, query), on either
engine. The index stages are functions of files (keys .npy, chunk -> document .npy, an output folder),
usable without a corpus. Each runs in units whose finished files stay in ``<stage>_parts_<key>/`` (the key
names the inputs), so a rerun skips them and a resumed stage equals an uninterrupted one. Each stage
returns a statistics row, also appended to ``build_stats.jsonl``."""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..atomic import TEMP_SUFFIX, atomic_file
from . import engine as engine_mod
from . import index as index_mod
from . import scann_index
from .doc_table import NpyAppender
from .embed import EmbedParts, cached_embedder, chunk_tokens, embed_on_ray, embedding_dim
from .engine import peak_rss_mb
from .manifest import SCANN_FOLDER, STREAM_SPLITS, atomic_save_npy, load_npy, read_rows, release_pages

STATS_FILE = "build_stats.jsonl"
SEARCH_BLOCK = 4096  # query vectors searched per FAISS call


# -- resumable units ------------------------------------------------------------------------

class Parts:
    """``<stage>_parts_<key>/part_NNNNNN.<ext>``: the finished units of a stage (each written atomically); a
    temporary a killed run left is removed. ``key`` names the inputs, so other inputs start afresh."""

    def __init__(self, root: Path, stage: str, key: str, ext: str):
        self.folder = Path(root) / f"{stage}_parts_{key}"
        self.ext = ext
        self.folder.mkdir(parents=True, exist_ok=True)
        being_written = re.compile(rf"part_\d{{6}}\.{ext}{TEMP_SUFFIX}")
        for stale in self.folder.iterdir():
            if being_written.fullmatch(stale.name) and stale.is_file():
                stale.unlink()

    def path(self, p: int) -> Path:
        return self.folder / f"part_{p:06d}.{self.ext}"

    def todo(self, n: int) -> list[int]:
        return [p for p in range(n) if not self.path(p).exists()]

    def remove(self, n: int) -> None:
        """The parts this stage wrote (and the folder, if nothing else is in it)."""
        for p in range(n):
            self.path(p).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.folder.rmdir()


def inputs_key(*items) -> str:
    """12 hex digits naming ``items``; a path stands for its name, size and modification time."""
    def describe(x):
        return [x.name, x.stat().st_size, x.stat().st_mtime_ns] if isinstance(x, Path) else x

    return hashlib.sha256(json.dumps([describe(x) for x in items], default=str).encode()).hexdigest()[:12]


def ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)] or [(0, 0)]


def stats_row(out: Path, stage: str, engine: str, workers: int, n: int, seconds: float, rss: list[float],
              files: list[Path]) -> dict:
    """The stage's statistics, appended to ``out/build_stats.jsonl``."""
    row = {"stage": stage, "engine": engine, "workers": workers, "n_vectors": int(n), "seconds": round(seconds, 3),
           "vectors_per_s": round(n / seconds, 1) if seconds > 0 else None,
           "peak_rss_mb": round(max([peak_rss_mb(), *rss]), 1),
           "bytes_on_disk": int(sum(f.stat().st_size for f in files if f.exists()))}
    with open(Path(out) / STATS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _prepare(engine: str, workers: int | None) -> int:
    engine_mod.check_engine(engine)
    if engine == "ray":
        engine_mod.connect()
    return engine_mod.default_workers(engine, workers)


# -- train_index ------------------------------------------------------------------------------

def train_ivf(keys, out, factory: str, *, sample: int = 100_000, seed: int = 0, engine: str = "local",
              workers: int | None = None) -> dict:
    """``out/index_trained.faiss``: the empty IVF index ``factory``, trained on a sample of the keys (one unit)."""
    workers, t0 = _prepare(engine, workers), time.perf_counter()
    out, n = Path(out), load_npy(keys).shape[0]
    rss = engine_mod.run_units(engine, _train_unit, [("sample", (str(keys), str(out), factory, sample, seed))],
                               what="train_index")
    return stats_row(out, "train_index", engine, 1, min(n, sample), time.perf_counter() - t0, rss,
                     [out / "index_trained.faiss"])


def _train_unit(keys: str, out: str, factory: str, sample: int, seed: int) -> float:
    vectors = load_npy(keys)
    n, dim = vectors.shape
    ids = np.sort(np.random.default_rng(seed).choice(n, size=min(n, sample), replace=False))
    index = index_mod.train_index(factory, dim, read_rows(vectors, ids).astype(np.float32))
    with atomic_file(Path(out) / "index_trained.faiss") as tmp:
        index_mod.write_index(index, tmp)
    return peak_rss_mb()


# -- add: shards, merged into one on-disk index -------------------------------------------------

def add_parts(out: Path, keys: Path, shard_size: int) -> Parts:
    return Parts(out, "add", inputs_key(Path(out) / "index_trained.faiss", Path(keys), shard_size), "faiss")


def add_shards(keys, out, *, shard_size: int = 1_000_000, engine: str = "local", workers: int | None = None,
               progress=None) -> dict:
    """One unit per shard of ``shard_size`` consecutive keys (their chunk ids), each encoded by a copy of
    the trained index into ``out/add_parts_<key>/``; finished shards are kept across runs."""
    workers, t0 = _prepare(engine, workers), time.perf_counter()
    out, keys = Path(out), Path(keys)
    n = load_npy(keys).shape[0]
    parts, shards = add_parts(out, keys, shard_size), ranges(n, shard_size)
    units = [(f"shard {s} (keys {lo}:{hi})", (str(out / "index_trained.faiss"), str(keys), lo, hi, str(parts.path(s))))
             for s in parts.todo(len(shards)) for lo, hi in [shards[s]]]
    rss = engine_mod.run_units(engine, _add_unit, units, what="add", workers=workers, progress=progress)
    return stats_row(out, "add", engine, workers, n, time.perf_counter() - t0, rss,
                     [parts.path(s) for s in range(len(shards))])


def _add_unit(trained: str, keys: str, lo: int, hi: int, shard: str) -> float:
    with atomic_file(shard) as tmp:
        index_mod.add_shard(Path(trained), load_npy(keys), lo, hi, tmp)
    return peak_rss_mb()


def merge_shards(keys, out, *, shard_size: int = 1_000_000, engine: str = "local", workers: int | None = None) -> dict:
    """``out/index.faiss`` and ``out/index.ivfdata``: every shard's inverted lists merged on disk (one
    unit); the shards are deleted. ``keys``, ``shard_size``: those `add_shards` had (they name its parts)."""
    _prepare(engine, workers)
    out, keys, t0 = Path(out), Path(keys), time.perf_counter()
    n = load_npy(keys).shape[0]
    parts, count = add_parts(out, keys, shard_size), len(ranges(n, shard_size))
    missing = parts.todo(count)
    if missing:
        raise RuntimeError(f"merge: index shards {missing[:10]} are missing (run add_shards first)")
    rss = engine_mod.run_units(engine, _merge_unit, [("index", (str(out), [str(parts.path(s)) for s in range(count)]))],
                               what="merge")
    parts.remove(count)
    return stats_row(out, "merge", engine, 1, n, time.perf_counter() - t0, rss,
                     [out / "index.faiss", out / "index.ivfdata"])


def _merge_unit(out: str, shards: list[str]) -> float:
    out = Path(out)
    with atomic_file(out / "index.ivfdata") as data_tmp, atomic_file(out / "index.faiss") as index_tmp:
        index_mod.merge_shards(out / "index_trained.faiss", [Path(s) for s in shards], index_tmp, out / "index.ivfdata",
                               data_tmp)
    return peak_rss_mb()


def open_searcher(out, keys, chunk_doc, *, nprobe: int = 32, rerank: int = 0) -> index_mod.Searcher:
    """The merged index in ``out``, memory-mapped, with its keys and chunk documents for re-ranking and
    exclusion."""
    if (Path(out) / SCANN_FOLDER).is_dir():  # nprobe: the ScaNN leaves searched
        return scann_index.Searcher(Path(out) / SCANN_FOLDER, load_npy(keys), load_npy(chunk_doc), nprobe, rerank)
    return index_mod.Searcher(Path(out) / "index.faiss", load_npy(keys), load_npy(chunk_doc), nprobe, rerank)


# -- query: neighbour tables ---------------------------------------------------------------------

@dataclass(frozen=True)
class QuerySpec:
    """What a range of query chunks needs: the index, its keys and chunk documents, the search options, and
    where the query vectors come from."""
    out: str                       # the folder of index.faiss
    keys: str
    chunk_doc: str
    k: int
    nprobe: int = 32
    rerank: int = 0
    max_distance: float | None = None
    rows: str | None = None        # (n,) key row of each query chunk, -1: embedded (``embed``); None: the keys
    docs: str | None = None        # (n,) document of each query chunk: its and the next chunk's are excluded
    embed: dict | None = None      # {"root", "split", "embedder", "device", "batch_size"}: a stream's chunks

    def num_queries(self) -> int:
        return load_npy(self.rows if self.rows is not None else self.keys).shape[0]


def precompute(keys, chunk_doc, out, *, k: int, nprobe: int = 32, rerank: int = 0, range_size: int = 100_000,
               engine: str = "local", workers: int | None = None, neighbours: str = "neighbours.npy") -> dict:
    """``out/<neighbours>`` (N, k) int64: the neighbours of every key, chunks of its own document and of the
    next chunk's excluded (as RETRO's training data are retrieved)."""
    spec = QuerySpec(str(out), str(keys), str(chunk_doc), k, nprobe, rerank, docs=str(chunk_doc))
    return precompute_table(spec, Path(out) / neighbours, range_size=range_size, engine=engine, workers=workers)


def precompute_table(spec: QuerySpec, table: Path, *, range_size: int, engine: str = "local", workers: int | None = None,
                     progress=None) -> dict:
    """``table`` (n, k) int64 from tasks over ranges of ``range_size`` query chunks, each memory-mapping
    the merged index and writing its own range (kept across runs), joined at the end."""
    workers, t0 = _prepare(engine, workers), time.perf_counter()
    out, n = Path(spec.out), spec.num_queries()
    spans = ranges(n, range_size)
    index_files = [out / f for f in ("index.faiss", "index.ivfdata", f"{SCANN_FOLDER}/dataset.npy") if (out / f).exists()]
    key = inputs_key(*index_files, Path(spec.keys), asdict(spec), range_size, table.name)
    parts = Parts(out, "query", key, "npy")
    units = [(f"range {lo}:{hi}", (spec, lo, hi, str(parts.path(r)))) for r in parts.todo(len(spans))
             for lo, hi in [spans[r]]]
    rss = engine_mod.run_units(engine, _query_unit, units, what=f"query {table.name}", workers=workers,
                               progress=progress)
    _join_parts([parts.path(r) for r in range(len(spans))], table, n, np.int64)
    parts.remove(len(spans))
    return stats_row(out, "query", engine, workers, n, time.perf_counter() - t0, rss, [table])


def _query_unit(spec: QuerySpec, lo: int, hi: int, part: str) -> float:
    searcher = open_searcher(spec.out, spec.keys, spec.chunk_doc, nprobe=spec.nprobe, rerank=spec.rerank)
    docs = load_npy(spec.docs) if spec.docs is not None else None
    ids = np.empty((hi - lo, spec.k), np.int64)
    for a in range(lo, hi, SEARCH_BLOCK):
        b = min(a + SEARCH_BLOCK, hi)
        exclude = None
        if docs is not None:  # the chunk's document and the next chunk's
            exclude = np.stack([docs[a:b], docs[np.minimum(np.arange(a, b) + 1, len(docs) - 1)]], 1).astype(np.int64)
        dist, found = searcher.search(_query_vectors(spec, searcher, a, b), spec.k, exclude)
        if spec.max_distance is not None:
            found = np.where(dist > spec.max_distance, -1, found)
        ids[a - lo:b - lo] = found
        release_pages(docs)
    atomic_save_npy(part, ids)
    return peak_rss_mb()


def _query_vectors(spec: QuerySpec, searcher, a: int, b: int) -> np.ndarray:
    """Query chunks ``a:b``: stored keys, and (``spec.embed``) the stream chunks the database lacks embedded."""
    if spec.rows is None:
        return read_rows(searcher.keys, np.arange(a, b)).astype(np.float32)
    rows = np.asarray(load_npy(spec.rows)[a:b])
    out = np.empty((b - a, searcher.dim), np.float32)
    known = rows >= 0
    out[known] = read_rows(searcher.keys, rows[known])
    new = np.flatnonzero(~known)
    if new.size:
        e = spec.embed
        embedder = cached_embedder(e["embedder"], e["device"], e["batch_size"])
        tokenizer, chunks = chunk_tokens(Path(e["root"]), a + new, e["split"])
        out[new] = embedder.embed_token_chunks(tokenizer, chunks)
    return out


# -- the database's stages (functions of `build.Builder`) -----------------------------------------

def db_train_index(build) -> dict:
    """index_trained.faiss: the empty IVF index, trained on a sample of the keys."""
    cfg, keys = build.config, build.root / "embeddings.npy"
    n, dim = load_npy(keys).shape
    kind = index_mod.resolve_index_type(cfg["index_type"], n)
    if kind == "scann":
        return {"factory": "scann"}  # trained with its keys by the add stage
    factory = index_mod.factory_string(kind, min(n, cfg["train_sample"]), dim, cfg)
    row = train_ivf(keys, build.root, factory, sample=cfg["train_sample"], seed=cfg["split_seed"], **build.engine)
    build.log(f"train_index: {factory} on {row['n_vectors']} vectors in {row['seconds']:.1f}s")
    return {"factory": factory, "train_vectors": row["n_vectors"]}


def db_add(build) -> dict:
    """index.faiss + index.ivfdata: every key added (one unit per shard), the shards merged on disk (ScaNN:
    scann/, built in one unit)."""
    keys, shard = build.root / "embeddings.npy", build.config["shard_size"]
    if build.config["index_type"] == "scann":  # one unit: ScaNN builds in RAM and cannot merge parts
        _prepare(**build.engine)
        leaves = engine_mod.run_units(build.engine["engine"], scann_index.build_folder,
                                      [("scann", (str(keys), str(build.root / SCANN_FOLDER), build.config["nlist"]))],
                                      what="add")
        return {"scann_leaves": leaves[0]}
    count = len(ranges(load_npy(keys).shape[0], shard))
    with build.progress(total=count, desc="add", unit="shard") as bar:
        add_shards(keys, build.root, shard_size=shard, progress=bar.update, **build.engine)
    merge_shards(keys, build.root, shard_size=shard, **build.engine)
    return {"shards": count}


def db_query(build) -> dict:
    """neighbours_<split>.npy: the k nearest database chunks of every stream chunk; for the training split,
    chunks of the query chunk's document and of the next chunk's are excluded."""
    cfg, root, info = build.config, build.root, {}
    for split in STREAM_SPLITS:
        spec = QuerySpec(str(root), str(root / "embeddings.npy"), str(root / "chunk_doc.npy"), cfg["k"], cfg["nprobe"],
                         cfg["rerank"], cfg["max_distance"], rows=str(root / f"stream_{split}_db_chunk.npy"),
                         docs=str(root / f"stream_{split}_chunk_doc.npy") if split == "train" else None,
                         embed={"root": str(root), "split": split, "embedder": cfg["embedder"],
                                "device": build.runtime["device"], "batch_size": build.runtime["embed_batch_size"]})
        table, size = root / f"neighbours_{split}.npy", cfg["shard_size"]
        with build.progress(total=len(ranges(spec.num_queries(), size)), desc=f"query {split}", unit="range") as bar:
            precompute_table(spec, table, range_size=size, progress=bar.update, **build.engine)
        info[f"neighbours_{split}"] = list(load_npy(table).shape)
    return info


def db_embed(build) -> dict:
    """embeddings.npy (float16): the key of every retrieval chunk, embedded in resumable parts of
    ``embed_part_size`` chunks, or copied from ``--embeddings``."""
    num_chunks, t0 = build.manifest.info("chunk")["num_chunks"], time.perf_counter()
    if build.config["embeddings"] is not None:
        return import_embeddings(build, num_chunks)
    size = int(build.runtime["embed_part_size"])
    parts = Parts(build.root, "embed", inputs_key(build.root / "chunk_start.npy", size), "npy")
    count = len(ranges(num_chunks, size))
    todo = parts.todo(count)
    if len(todo) < count:
        build.log(f"embed: resuming, {count - len(todo)} of {count} parts already done")
    spec = {"root": str(build.root), "embedder": build.config["embedder"], "device": build.runtime["device"],
            "batch_size": build.runtime["embed_batch_size"], "part_size": size, "num_chunks": num_chunks,
            "folder": str(parts.folder)}
    engine, workers = build.engine["engine"], _prepare(**build.engine)
    with build.progress(total=len(todo), desc="embed", unit="part") as bar:
        if engine == "ray" and todo:
            rss = embed_on_ray(spec, todo, workers, bar.update)
        else:
            embed, rss = EmbedParts(spec) if todo else None, []
            for p in todo:  # (a failure names its part)
                rss.append(float(embed({"part": [p]})["rss"][0]))
                bar.update(1)
    dim = _join_parts([parts.path(p) for p in range(count)], build.root / "embeddings.npy", num_chunks)
    parts.remove(count)
    stats_row(build.root, "embed", engine, workers, num_chunks, time.perf_counter() - t0, rss,
              [build.root / "embeddings.npy"])
    return {"dim": dim, "embedder": build.config["embedder"]}


def _join_parts(files: list[Path], out: Path, rows: int, dtype=np.float16) -> int:
    """The .npy ``files`` (consecutive rows, ``rows`` in all) copied into ``out`` a block at a time, read and
    written with positional reads and writes (no map keeps their pages resident); returns the width."""
    dim = load_npy(files[0]).shape[1]
    with atomic_file(out) as tmp, open(tmp, "wb") as f:
        joined = NpyAppender(f, dtype, (dim,))
        for part in map(load_npy, files):
            for lo in range(0, part.shape[0], 65536):
                joined.append(read_rows(part, np.arange(lo, min(lo + 65536, part.shape[0]))))
        if joined.rows != rows:
            raise ValueError(f"{out.name}: its parts hold {joined.rows} rows, not {rows}")
        joined.close()
    return int(dim)


def embedding_files(path) -> list[Path]:
    """The .npy files of ``--embeddings``: the file, or a folder's .npy files in name order."""
    files = sorted(Path(path).glob("*.npy")) if Path(path).is_dir() else [Path(path)]
    if not files or not files[0].is_file():
        raise ValueError(f"embeddings: expected a .npy file or a folder of .npy parts, got {str(path)!r}")
    return files


def check_embeddings(path, dim: int, num_chunks: int | None = None) -> None:
    """ValueError unless ``--embeddings`` holds (rows, dim) finite float16/float32 vectors (``num_chunks``
    rows when given), read a block at a time."""
    rows = 0
    for f in embedding_files(path):
        try:
            part = load_npy(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"embeddings: {f} is not a readable .npy file ({e})") from None
        if part.dtype not in (np.float16, np.float32) or part.ndim != 2 or part.shape[1] != dim:
            raise ValueError(f"embeddings: {f} holds {part.dtype} of shape {part.shape}; expected float16 or "
                             f"float32 of shape (chunks, {dim}) (the embedder's dimension)")
        for lo in range(0, part.shape[0], 65536):
            if not (np.abs(part[lo:lo + 65536]) <= np.finfo(np.float16).max).all():  # (NaN compares False)
                raise ValueError(f"embeddings: {f} has values that are not finite float16 numbers near row {lo}")
        rows += part.shape[0]
    if num_chunks is not None and rows != num_chunks:
        raise ValueError(f"embeddings: {path} holds {rows} vectors, the chunk table has {num_chunks} chunks")


def import_embeddings(build, num_chunks: int) -> dict:
    t0, dim, path = time.perf_counter(), embedding_dim(build.config["embedder"]), build.config["embeddings"]
    check_embeddings(path, dim, num_chunks)
    _join_parts(embedding_files(path), build.root / "embeddings.npy", num_chunks)
    build.log(f"embed: {num_chunks} keys copied from {path}")
    stats_row(build.root, "embed", "local", 1, num_chunks, time.perf_counter() - t0, [], [build.root / "embeddings.npy"])
    return {"dim": dim, "embedder": build.config["embedder"], "imported": True}
