"""The build's last stages, from chunks to neighbours: embed, train_index, add, query.

Each stage is a function of the build (`models.retrieval.build.Builder`), as in
`build_text`. The embedding is the one stage every torchrun process shares:
each embeds its parts (resumable files of `embed_part_size` chunks), rank 0 joins them.
"""
from __future__ import annotations

import contextlib
import re
import time

import numpy as np

from ..atomic import atomic_file
from . import index as index_mod
from .embed import Embedder
from .manifest import PART_FILE, STREAM_SPLITS, TEMP_SUFFIX, atomic_save_npy, load_npy
from .query import RetrievalDatabase

ADD_BLOCK = 65536  # vectors added to an index per call


# -- embed --------------------------------------------------------------------------------

def embed_chunks(build) -> dict | None:
    """embeddings.npy: the key of every retrieval chunk (float16). None on the ranks other than 0."""
    group = build.group
    num_chunks = build.manifest.info("chunk")["num_chunks"]
    part = int(build.runtime["embed_part_size"])
    parts = EmbeddingParts(build, part)
    num_parts = -(-num_chunks // part)
    mine = [p for p in range(num_parts) if p % group.world == group.rank]
    todo = [p for p in mine if not parts.path(p).exists()]
    if len(todo) < len(mine):
        build.log(f"embed: resuming, {len(mine) - len(todo)} of {len(mine)} parts already done")
    if todo:
        _embed_parts(build, parts, todo, num_chunks)
    group.barrier()  # every rank's parts are on disk
    if group.rank != 0:
        return None
    dim = parts.join(num_parts, num_chunks, build.root / "embeddings.npy")
    return {"dim": dim, "embedder": build.config["embedder"]}


class EmbeddingParts:
    """The folder ``embed_parts_<chunk table sha256>_<part size>`` of the resumable parts: a part
    finished by a killed run is kept, one it was writing is removed."""

    def __init__(self, build, part_size: int):
        chunk_sum = build.manifest.stages["chunk"]["files"]["chunk_start.npy"]["sha256"][:12]
        self.folder = build.root / f"embed_parts_{chunk_sum}_{part_size}"
        self.size = part_size
        self.folder.mkdir(exist_ok=True)
        being_written = re.compile(PART_FILE.pattern.replace(f"(?:{TEMP_SUFFIX})?", TEMP_SUFFIX))
        for stale in self.folder.iterdir():
            if being_written.fullmatch(stale.name) and stale.is_file():
                stale.unlink()

    def path(self, p: int):
        return self.folder / f"part_{p:06d}.npy"

    def join(self, num_parts: int, num_chunks: int, out) -> int:
        """Every part into ``out``, then the parts (and the folder, if nothing else is in it) deleted;
        returns the vectors' dimension."""
        missing = [p for p in range(num_parts) if not self.path(p).exists()]
        if missing:
            raise RuntimeError(f"embed: parts {missing[:10]} are missing after every rank finished")
        dim = load_npy(self.path(0)).shape[1]
        with atomic_file(out) as tmp:
            joined = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(num_chunks, dim))
            for p in range(num_parts):
                joined[p * self.size:(p + 1) * self.size] = load_npy(self.path(p))
            joined.flush()
            del joined
        for p in range(num_parts):  # the parts this stage wrote; a folder with anything else in it stays
            self.path(p).unlink()
        with contextlib.suppress(OSError):
            self.folder.rmdir()
        return int(dim)


def _embed_parts(build, parts: EmbeddingParts, todo: list[int], num_chunks: int) -> None:
    group, size = build.group, parts.size
    embedder = Embedder(build.config["embedder"], device=build.runtime["device"],
                        batch_size=build.runtime["embed_batch_size"])
    tokenizer = build.tokenizer()
    desc = "embed" if group.world == 1 else f"embed (rank {group.rank}/{group.world})"
    bar = build.progress(total=sum(min(size, num_chunks - p * size) for p in todo), desc=desc, unit="chunk")
    for p in todo:
        ids = np.arange(p * size, min((p + 1) * size, num_chunks))
        vectors = embedder.embed_token_chunks(tokenizer, chunk_tokens(build, ids), on_batch=bar.update)
        atomic_save_npy(parts.path(p), vectors.astype(np.float16))
    bar.close()


def chunk_tokens(build, ids: np.ndarray) -> list[np.ndarray]:
    """The tokens of database chunks ``ids`` (the last chunk of a document is shorter)."""
    tokens = build.tokens()
    offsets = np.asarray(build.npy("doc_offsets.npy"))
    chunk_doc = build.npy("chunk_doc.npy")
    chunk_start = build.npy("chunk_start.npy")
    out = []
    for c in ids:
        start = int(chunk_start[c])
        end = min(start + build.m, int(offsets[int(chunk_doc[c]) + 1]))
        out.append(np.asarray(tokens[start:end]))
    return out


# -- train_index, add ---------------------------------------------------------------------

def train_index(build) -> dict:
    """index_trained.faiss: the empty index, trained (IVF-PQ) on a sample of the keys."""
    cfg = build.config
    keys = build.npy("embeddings.npy")
    n, dim = keys.shape
    kind = index_mod.resolve_index_type(cfg["index_type"], n)
    rng = np.random.default_rng(cfg["split_seed"])
    sample_ids = np.sort(rng.choice(n, size=min(n, cfg["train_sample"]), replace=False))
    factory = index_mod.factory_string(kind, sample_ids.size, dim, cfg)
    t0 = time.perf_counter()
    index = index_mod.train_index(factory, dim, np.asarray(keys[sample_ids], dtype=np.float32))
    with atomic_file(build.root / "index_trained.faiss") as tmp:
        index_mod.write_index(index, tmp)
    build.log(f"train_index: {factory} on {sample_ids.size} vectors in {time.perf_counter() - t0:.1f}s")
    return {"index_type": kind, "factory": factory, "train_vectors": int(sample_ids.size),
            "seconds": time.perf_counter() - t0}


def add_to_index(build) -> dict:
    """index_shard_NNN.faiss: every key added to a copy of the trained index, shard_size keys per shard."""
    import faiss

    keys = build.npy("embeddings.npy")
    n = keys.shape[0]
    shard = int(build.config["shard_size"])
    files, offsets = [], []
    bar = build.progress(total=n, desc="add", unit="vec")
    t0 = time.perf_counter()
    for s in range(max(1, -(-n // shard))):
        index = faiss.read_index(str(build.root / "index_trained.faiss"))
        lo, hi = s * shard, min((s + 1) * shard, n)

        def blocks(lo=lo, hi=hi):
            for start in range(lo, hi, ADD_BLOCK):
                end = min(start + ADD_BLOCK, hi)
                yield np.asarray(keys[start:end], dtype=np.float32)
                bar.update(end - start)

        index = index_mod.add_vectors(index, blocks())
        name = f"index_shard_{s:03d}.faiss"
        with atomic_file(build.root / name) as tmp:
            index_mod.write_index(index, tmp)
        files.append(name)
        offsets.append(lo)
    bar.close()
    return {"shards": files, "offsets": offsets, "seconds": time.perf_counter() - t0}


# -- query: the neighbour tables ------------------------------------------------------------

def precompute_neighbours(build) -> dict:
    """neighbours_<split>.npy: the k nearest database chunks of every stream chunk (the index queried)."""
    db = RetrievalDatabase(build.root, build.manifest, embedder_device=build.runtime["device"],
                           embed_batch_size=build.runtime["embed_batch_size"])  # as far as it is built
    info = {}
    for name in STREAM_SPLITS:
        table = db.precompute_stream_neighbours(name, build.config["k"], build.root / f"neighbours_{name}.npy",
                                                progress=build.runtime["progress"])
        info[f"neighbours_{name}"] = list(table.shape)
    return info
