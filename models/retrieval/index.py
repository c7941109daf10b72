"""One FAISS IVF index over the chunk keys, its inverted lists on disk, searched memory-mapped: faiss's
recipe for indexes larger than RAM, in steps any process can run (`build_index` runs them locally or as
Ray tasks; docs/retrieval.md, "The index"). Index types: ``flat`` (``IVF1,SQfp16``: exact), ``ivfpq``
(sized from the data), or any FAISS factory string starting with ``IVF``; compressed codes are re-ranked
by exact L2 distance to the memory-mapped keys.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import mmap
import os
import sys
from pathlib import Path

import numpy as np

from .manifest import read_rows, release_pages

INDEX_TYPES = ("auto", "flat", "ivfpq", "scann")  # or an IVF factory string
AUTO_FLAT_MAX = 200_000  # "auto" picks exact search up to this many chunks, IVF-PQ above
RERANK_BLOCK = 64  # queries whose candidates are re-ranked at once (64 x rerank x dim floats)
MAPPED_BLOCK_BYTES = 64 << 20  # of mapped inverted lists a search may touch before it unmaps them


def _faiss():
    import faiss

    return faiss


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@contextlib.contextmanager
def quiet_stdout():
    """FAISS's C++ code prints progress ("resizing ...") on standard output: silence it at the descriptor."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def resolve_index_type(index_type: str, num_vectors: int) -> str:
    if index_type == "auto":
        return "flat" if num_vectors <= AUTO_FLAT_MAX else "ivfpq"
    if index_type == "scann":
        try:
            import scann  # noqa: F401
        except ImportError:
            raise ValueError("index_type: 'scann' needs the scann package: pip install 'retro_kernels[scann]'") from None
    if index_type in INDEX_TYPES or (isinstance(index_type, str) and index_type.startswith("IVF")):
        return index_type
    raise ValueError(f"index_type: expected one of {INDEX_TYPES} or a FAISS factory string starting with IVF, "
                     f"got {index_type!r}")


def factory_string(index_type: str, num_train: int, dim: int, params: dict) -> str:
    """The FAISS index_factory string; IVF-PQ sizes adapt to the training sample when left at 0."""
    if index_type == "flat":
        return "IVF1,SQfp16"
    if index_type.startswith("IVF"):
        return _checked_factory(index_type, num_train, dim)
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


def _checked_factory(factory: str, num_train: int, dim: int) -> str:
    faiss = _faiss()
    try:
        ivf = faiss.extract_index_ivf(faiss.index_factory(dim, factory, faiss.METRIC_L2))
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"index_type: {factory!r} is not an IVF factory string for dimension {dim} "
                         f"({str(e).strip().splitlines()[-1]})") from None
    if num_train < ivf.nlist:
        raise ValueError(f"index_type: {num_train} training vectors are fewer than the {ivf.nlist} lists of {factory!r}")
    return factory


def train_index(factory: str, dim: int, sample: np.ndarray, use_gpu: bool | None = None):
    """An empty index of type ``factory`` (IVF, or any other), trained on ``sample``."""
    faiss = _faiss()
    index = faiss.index_factory(dim, factory, faiss.METRIC_L2)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)
        if _fp16_codes(ivf):
            ivf.by_residual = False  # the float16 codes of float16 keys are the keys: exact
        if hasattr(ivf, "do_polysemous_training"):
            # the factory turns it on; it costs minutes (we never search with Hamming filtering)
            ivf.do_polysemous_training = False
        # factory_string already sized the lists and codebooks for the sample; no per-run warning
        ivf.cp.min_points_per_centroid = 1
        if hasattr(ivf, "pq"):
            ivf.pq.cp.min_points_per_centroid = 1
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if use_gpu if use_gpu is not None else gpu_available():
        try:
            gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
            gpu.train(sample)
            return faiss.index_gpu_to_cpu(gpu)
        except Exception as e:  # an index layout the GPU build does not support
            print(f"warning: GPU FAISS training failed ({e}); training on the CPU", file=sys.stderr)
    index.train(sample)
    return index


@functools.cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _fp16_codes(ivf) -> bool:
    return isinstance(ivf, _faiss().IndexIVFScalarQuantizer) and ivf.sq.qtype == _faiss().ScalarQuantizer.QT_fp16


def write_index(index, path: Path) -> None:
    _faiss().write_index(index, str(path))


def add_shard(trained: Path, keys: np.ndarray, lo: int, hi: int, out: Path, block: int = 65536) -> None:
    """Keys ``lo:hi`` (ids lo..hi-1) added to a copy of the trained index, written to ``out``."""
    index = _faiss().read_index(str(trained))
    for start in range(lo, hi, block):
        end = min(start + block, hi)
        index.add_with_ids(read_rows(keys, np.arange(start, end)).astype(np.float32), np.arange(start, end))
    write_index(index, out)


def merge_shards(trained: Path, shards: list[Path], index_out: Path, data_out: Path, data_tmp: Path) -> None:
    """The shards' lists merged into ``data_tmp`` (to be renamed ``data_out``), the index that reads them
    written to ``index_out``. The layout is faiss's on-disk lists (``OnDiskInvertedLists``: each list's codes,
    then its ids, lists one after the other), as ``faiss.contrib.ondisk.merge_ondisk`` makes it; but written
    with positional writes, one shard in RAM at a time, where merge_ondisk writes through a map of the whole
    file and so keeps every page of it resident."""
    faiss = _faiss()
    index = faiss.read_index(str(trained))
    ivf = faiss.extract_index_ivf(index)
    if ivf.ntotal:
        raise ValueError(f"merge: {trained} is not an empty trained index ({ivf.ntotal} vectors)")
    sizes = np.stack([_list_sizes(s) for s in shards])           # (shards, nlist)
    total = np.ascontiguousarray(sizes.sum(0), dtype=np.uint64)
    with quiet_stdout():
        lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(data_tmp))
    lists.set_all_lists_sizes(faiss.swig_ptr(total))             # offsets of lists of exactly these sizes
    offsets = np.array([lists.lists.at(j).offset for j in range(ivf.nlist)], np.int64)
    code, filled = ivf.code_size, np.zeros(ivf.nlist, np.int64)  # entries written so far, per list
    with open(data_tmp, "wb") as f:
        lists.totsize = int(offsets[-1] + int(total[-1]) * (code + 8))
        f.truncate(lists.totsize)
        for shard, shard_sizes in zip(shards, sizes):
            part = faiss.read_index(str(shard))
            src = faiss.extract_index_ivf(part).invlists
            for j in map(int, np.flatnonzero(shard_sizes)):
                n = int(shard_sizes[j])
                os.pwrite(f.fileno(), faiss.rev_swig_ptr(src.get_codes(j), n * code), int(offsets[j] + filled[j] * code))
                ids_at = offsets[j] + int(total[j]) * code + filled[j] * 8
                os.pwrite(f.fileno(), faiss.rev_swig_ptr(src.get_ids(j), n).view(np.uint8), int(ids_at))
                filled[j] += n
            del src, part
        os.fsync(f.fileno())
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns it now
    index.ntotal = ivf.ntotal = int(total.sum())
    # opened with IO_FLAG_ONDISK_SAME_DIR: the lists are found by this name beside index.faiss
    lists.filename = data_out.name
    write_index(index, index_out)


def _list_sizes(shard: Path) -> np.ndarray:
    """The length of every inverted list of a shard, its lists memory-mapped and not read."""
    faiss = _faiss()
    part = faiss.read_index(str(shard), faiss.IO_FLAG_MMAP)
    lists = faiss.extract_index_ivf(part).invlists
    return np.array([lists.list_size(j) for j in range(lists.nlist)], np.int64)


class Searcher:
    """K nearest keys of query vectors in the merged index, re-ranked by exact distance to ``keys`` (N, dim,
    memory-mapped) when the codes are compressed (``rerank`` candidates per query, 0: max(100, 10 k)), skipping
    chunks of excluded documents (``chunk_doc``: (N,) document of each chunk). Another index type overrides
    ``_candidates`` (and ``ntotal``, ``dim``, ``set_nprobe``)."""

    def __init__(self, index_path: Path, keys: np.ndarray, chunk_doc: np.ndarray, nprobe: int = 32, rerank: int = 0):
        faiss = _faiss()
        try:  # its lists memory-mapped read-only from beside it
            with quiet_stdout():
                self.index = faiss.read_index(str(index_path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as e:
            raise ValueError(f"index {index_path} cannot be read ({str(e).strip().splitlines()[0]})") from None
        self.set_nprobe(nprobe)
        self.keys, self.chunk_doc, self.rerank = keys, chunk_doc, int(rerank)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(self.index))
        self.exact = isinstance(ivf, faiss.IndexIVFFlat) or (_fp16_codes(ivf) and not ivf.by_residual)
        lists = faiss.downcast_InvertedLists(ivf.invlists)
        self.lists_map = None
        if isinstance(lists, faiss.OnDiskInvertedLists):
            # faiss starts 32 threads per search to read the probed lists ahead: 2 ms a call, where the page
            # cache serves the lists in 0.3 ms
            lists.prefetch_nthread = 0
            self.lists_map = (int(lists.ptr or 0), int(lists.totsize))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def set_nprobe(self, nprobe: int) -> None:
        _faiss().extract_index_ivf(self.index).nprobe = int(nprobe)

    def breadth(self, k: int) -> int:
        return k if self.exact else max(self.rerank or max(100, 10 * k), k)

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids), each (n, k), ascending squared L2, id -1 where fewer than k are found.
        ``exclude``: (n, E) documents whose chunks query ``i`` may not return (-1: none).

        Queries go a block at a time, the touched pages of the mapped files unmapped after each
        (`release_pages`): a process holds one block's lists, not every list it has ever searched."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n, step = queries.shape[0], self.queries_per_block()
        dist, ids = [np.full((0, k), np.inf, np.float32)], [np.full((0, k), -1, np.int64)]
        for lo in range(0, n, step):
            d, i = self._search_block(queries[lo:lo + step], k, None if exclude is None else exclude[lo:lo + step])
            dist.append(d)
            ids.append(i)
            self.release()
        return np.concatenate(dist), np.concatenate(ids)

    def queries_per_block(self) -> int:
        """Queries whose probed lists fit MAPPED_BLOCK_BYTES, on average."""
        if self.lists_map is None:
            return 4096
        ivf = _faiss().extract_index_ivf(self.index)
        per_query = ivf.nprobe * self.lists_map[1] / max(1, ivf.nlist)
        return int(max(1, min(4096, MAPPED_BLOCK_BYTES // max(1.0, per_query))))

    def release(self) -> None:
        """Unmap the pages this process has touched of the mapped lists and chunk table (`release_pages`)."""
        release_pages(self.chunk_doc, self.keys)
        if self.lists_map is not None and self.lists_map[1]:
            if _libc().madvise(ctypes.c_void_p(self.lists_map[0]), ctypes.c_size_t(self.lists_map[1]),
                               mmap.MADV_DONTNEED) != 0:
                raise OSError(ctypes.get_errno(), "madvise of the mapped inverted lists failed")

    def _search_block(self, queries: np.ndarray, k: int, exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """`search` of one block: rows that lose too many candidates to the exclusion are searched again, 4
        times as broadly."""
        n = queries.shape[0]
        out_d, out_i = np.full((n, k), np.inf, np.float32), np.full((n, k), -1, np.int64)
        todo, fetch = np.arange(n), min(self.ntotal, self.breadth(k) + (k + 16 if exclude is not None else 0))
        while todo.size and fetch > 0:
            d, i = self._candidates(queries[todo], fetch)
            keep = i >= 0
            if exclude is not None:
                keep &= ~np.any(self.chunk_doc[np.maximum(i, 0)][:, :, None] == exclude[todo][:, None, :], axis=2)
            done = (keep.sum(1) >= k) | (i < 0).any(1) | (fetch >= self.ntotal)
            for row in np.flatnonzero(done):
                sel = np.flatnonzero(keep[row])[:k]
                out_d[todo[row], :sel.size], out_i[todo[row], :sel.size] = d[row, sel], i[row, sel]
            todo, fetch = todo[~done], min(self.ntotal, fetch * 4)
        return out_d, out_i

    def _candidates(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """``fetch`` candidates per query, ordered by exact distance (re-ranked when the codes are compressed)."""
        d, i = self.index.search(queries, fetch)
        if self.exact:
            return d, i
        for lo in range(0, len(queries), RERANK_BLOCK):
            ids = i[lo:lo + RERANK_BLOCK]
            diff = read_rows(self.keys, np.maximum(ids, 0)).astype(np.float32) - queries[lo:lo + RERANK_BLOCK, None, :]
            d[lo:lo + RERANK_BLOCK] = np.where(ids >= 0, np.einsum("qcd,qcd->qc", diff, diff), np.inf)
        order = np.argsort(d, axis=1, kind="stable")
        return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
