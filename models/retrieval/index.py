"""FAISS L2 indexes over chunk embeddings: Flat, IVF-PQ or HNSW, in one or several shards.

- ``flat``: exact search; the default for small databases.
- ``ivfpq``: ``IVF{nlist},PQ{m}x{nbits}`` trained on a sample; for large ones.
- ``hnsw``: ``HNSW{M}`` graph over the full vectors; no training.

Shards cover consecutive ranges of chunk ids (``shard_size`` vectors each) and
are searched one after the other with their results merged, so an index that
does not fit in memory at once still works; each shard file is memory-mapped
on load (``faiss.IO_FLAG_MMAP``). When the installed FAISS has GPU support and
a GPU is present, training and adding (Flat, IVF) run on the GPU and the result
is moved back to the CPU to be saved.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

INDEX_TYPES = ("auto", "flat", "ivfpq", "hnsw")
AUTO_FLAT_MAX = 200_000  # "auto" picks exact search up to this many chunks, IVF-PQ above


def _faiss():
    import faiss

    return faiss


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_index_type(index_type: str, num_vectors: int) -> str:
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type: expected one of {INDEX_TYPES}, got {index_type!r}")
    if index_type == "auto":
        return "flat" if num_vectors <= AUTO_FLAT_MAX else "ivfpq"
    return index_type


def factory_string(index_type: str, num_train: int, dim: int, params: dict) -> str:
    """The FAISS index_factory string; IVF-PQ sizes adapt to the training sample when left at 0."""
    if index_type == "flat":
        return "Flat"
    if index_type == "hnsw":
        return f"HNSW{int(params.get('hnsw_m') or 32)}"
    if index_type != "ivfpq":
        raise ValueError(f"index_type: expected flat/ivfpq/hnsw, got {index_type!r}")
    # FAISS wants >= 39 training points per centroid; use sqrt-scaling capped by that.
    nlist = int(params.get("nlist") or max(1, min(int(4 * math.sqrt(num_train)), num_train // 39)))
    pq_m = int(params.get("pq_m") or next(m for m in (48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1) if dim % m == 0))
    if dim % pq_m:
        raise ValueError(f"pq_m: must divide the embedding dimension {dim}, got {pq_m}")
    nbits = int(params.get("pq_nbits") or max(1, min(8, int(math.log2(max(2, num_train // 4))))))
    if num_train < nlist:
        raise ValueError(f"IVF-PQ: {num_train} training vectors are fewer than nlist={nlist}; use a smaller nlist or index_type='flat'")
    if num_train < (1 << nbits):
        raise ValueError(f"IVF-PQ: {num_train} training vectors are fewer than 2**pq_nbits={1 << nbits}; lower pq_nbits")
    return f"IVF{nlist},PQ{pq_m}x{nbits}"


def train_index(factory: str, dim: int, sample: np.ndarray, use_gpu: bool | None = None):
    """An empty index of type ``factory``, trained on ``sample`` (no-op for Flat/HNSW)."""
    faiss = _faiss()
    index = faiss.index_factory(dim, factory, faiss.METRIC_L2)
    if index.is_trained:
        return index
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)
        if hasattr(ivf, "do_polysemous_training"):
            # the factory turns it on; it costs minutes (we never search with Hamming filtering)
            ivf.do_polysemous_training = False
        # factory_string already sized the lists and codebooks for the sample; no per-run warning
        ivf.cp.min_points_per_centroid = 1
        if hasattr(ivf, "pq"):
            ivf.pq.cp.min_points_per_centroid = 1
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if use_gpu is None:
        use_gpu = gpu_available()
    if use_gpu:
        try:
            res = faiss.StandardGpuResources()
            gpu = faiss.index_cpu_to_gpu(res, 0, index)
            gpu.train(sample)
            return faiss.index_gpu_to_cpu(gpu)
        except Exception as e:  # an index layout the GPU build does not support
            print(f"warning: GPU FAISS training failed ({e}); training on the CPU", file=sys.stderr)
    index.train(sample)
    return index


def serialize(index) -> np.ndarray:
    return _faiss().serialize_index(index)


def deserialize(blob: np.ndarray):
    return _faiss().deserialize_index(np.asarray(blob, dtype=np.uint8))


def write_index(index, path: Path) -> None:
    _faiss().write_index(index, str(path))


def add_vectors(index, vectors_iter, use_gpu: bool | None = None):
    """Add batches of vectors (an iterator of float arrays) to ``index``; returns the CPU index."""
    faiss = _faiss()
    if use_gpu is None:
        use_gpu = gpu_available() and "HNSW" not in type(index).__name__
    target = index
    if use_gpu:
        try:
            res = faiss.StandardGpuResources()
            target = faiss.index_cpu_to_gpu(res, 0, index)
        except Exception as e:
            print(f"warning: cannot move the index to the GPU ({e}); adding on the CPU", file=sys.stderr)
            use_gpu = False
    for batch in vectors_iter:
        target.add(np.ascontiguousarray(batch, dtype=np.float32))
    return faiss.index_gpu_to_cpu(target) if use_gpu else target


class ShardedIndex:
    """Search over index shards covering consecutive id ranges; results merged by distance."""

    def __init__(self, paths: list[Path], offsets: list[int], mmap: bool = True,
                 nprobe: int | None = None, ef_search: int | None = None):
        faiss = _faiss()
        flags = (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if mmap else 0
        self.shards = []
        for path in paths:
            try:
                shard = faiss.read_index(str(path), flags)
            except RuntimeError as e:
                raise ValueError(f"index shard {path} cannot be read ({str(e).splitlines()[0]})") from None
            self.shards.append(shard)
        self.offsets = list(offsets)
        self.set_search_params(nprobe=nprobe, ef_search=ef_search)

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

    @property
    def dim(self) -> int:
        return self.shards[0].d

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        faiss = _faiss()
        for shard in self.shards:
            ivf = faiss.try_extract_index_ivf(shard)
            if ivf is not None and nprobe:
                ivf.nprobe = int(nprobe)
            if hasattr(shard, "hnsw") and ef_search:
                shard.hnsw.efSearch = int(ef_search)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids), each (n, k), ascending squared L2; id -1 where fewer than k exist."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = queries.shape[0]
        all_d, all_i = [], []
        for shard, offset in zip(self.shards, self.offsets):
            kk = min(k, shard.ntotal)
            if kk == 0:
                continue
            d, i = shard.search(queries, kk)
            all_d.append(d)
            all_i.append(np.where(i >= 0, i + offset, -1))
        if not all_d:
            return np.full((n, k), np.inf, np.float32), np.full((n, k), -1, np.int64)
        d = np.concatenate(all_d, axis=1)
        i = np.concatenate(all_i, axis=1)
        d = np.where(i < 0, np.inf, d)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        d = np.take_along_axis(d, order, axis=1)
        i = np.take_along_axis(i, order, axis=1)
        if d.shape[1] < k:  # fewer vectors than k in all
            pad = k - d.shape[1]
            d = np.pad(d, ((0, 0), (0, pad)), constant_values=np.inf)
            i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
        return d.astype(np.float32), i.astype(np.int64)

    def search_excluding(self, queries: np.ndarray, k: int, exclude: np.ndarray | None,
                         chunk_doc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like ``search`` but skipping neighbours from the documents ``exclude[row]`` ((n,) or (n, E)).

        Over-fetches, and searches again with a larger k for the rows that lost
        too many neighbours to the exclusion, until they have k or the index is exhausted.
        """
        n = queries.shape[0]
        if exclude is None:
            return self.search(queries, k)
        exclude = np.asarray(exclude, dtype=np.int64).reshape(n, -1)  # (n, E) documents per query
        out_d = np.full((n, k), np.inf, np.float32)
        out_i = np.full((n, k), -1, np.int64)
        todo = np.arange(n)
        fetch = min(self.ntotal, 2 * k + 16)
        while todo.size:
            d, i = self.search(queries[todo], fetch)
            docs = chunk_doc[np.maximum(i, 0)]
            keep = (i >= 0) & ~np.any(docs[:, :, None] == exclude[todo][:, None, :], axis=2)
            done = (keep.sum(1) >= k) | (fetch >= self.ntotal)
            for row in np.flatnonzero(done):
                sel = np.flatnonzero(keep[row])[:k]
                out_d[todo[row], :sel.size] = d[row, sel]
                out_i[todo[row], :sel.size] = i[row, sel]
            todo = todo[~done]
            fetch = min(self.ntotal, fetch * 4)
        return out_d, out_i
