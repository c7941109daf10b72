"""ScaNN (the RETRO paper's retriever) over chunk keys: a partitioning tree, anisotropic
asymmetric hashing, and exact reordering of the best candidates.

ScaNN builds and searches in RAM: every key is copied in as float32, and a
searcher has no merge of separately built parts and no memory-mapped form, so
its memory grows with the database (the merged on-disk IVF index's does not).
`build_folder` writes a searcher to a folder; `Searcher` reads it back and
searches it the way `index.Searcher` searches the IVF index (same-document
exclusion included). Optional: ``pip install 'retro_kernels[scann]'``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import index as index_mod
from .manifest import load_npy


def build(keys, num_leaves: int, k: int, training_sample: int = 100_000, reorder: int = 0):
    """A ScaNN searcher over ``keys`` (n, dim), squared L2, ``k`` neighbours by default; ``reorder``
    candidates are re-scored exactly (0: max(100, 10 k))."""
    from scann.scann_ops.py import scann_ops_pybind

    x = np.ascontiguousarray(keys, dtype=np.float32)
    n = x.shape[0]
    leaves = max(1, min(num_leaves, n // 4))
    return (scann_ops_pybind.builder(x, k, "squared_l2")
            .tree(num_leaves=leaves, num_leaves_to_search=max(1, leaves // 32), training_sample_size=min(n, training_sample))
            .score_ah(2).reorder(reorder or max(100, 10 * k)).build())


def build_folder(keys, folder, num_leaves: int = 0, k: int = 10) -> int:
    """A searcher over the keys .npy ``keys`` (about sqrt(n) leaves unless given), written to ``folder``;
    returns its number of leaves."""
    vectors = load_npy(keys)
    leaves = num_leaves or max(1, int(math.sqrt(vectors.shape[0])))
    Path(folder).mkdir(parents=True, exist_ok=True)
    build(vectors, leaves, k).serialize(str(folder), relative_path=True)  # the database can move
    return leaves


def search(searcher, queries: np.ndarray, k: int, leaves_to_search: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids), each (n, k), ascending squared L2, for ``queries`` (n, dim), on this thread."""
    ids, dist = searcher.search_batched(np.ascontiguousarray(queries, dtype=np.float32), final_num_neighbors=k,
                                        leaves_to_search=leaves_to_search)
    return np.asarray(dist, np.float32), np.asarray(ids, dtype=np.int64)


class Searcher(index_mod.Searcher):
    """`index.Searcher`'s search over a ScaNN searcher read from ``folder`` (into RAM); ScaNN reorders its
    candidates exactly itself. ``set_nprobe`` sets the leaves searched (0: the searcher's default)."""

    def __init__(self, folder, keys: np.ndarray, chunk_doc: np.ndarray, leaves_to_search: int = 0, rerank: int = 0):
        from scann.scann_ops.py import scann_ops_pybind

        if (Path(folder) / "scann_docids.pkl").exists():  # load_searcher would unpickle it
            raise ValueError(f"{folder}: a ScaNN searcher with pickled document ids is not opened (untrusted pickle)")
        self.scann = scann_ops_pybind.load_searcher(str(folder))
        self.keys, self.chunk_doc, self.rerank, self.exact = keys, chunk_doc, int(rerank), True
        self.lists_map = None  # in RAM
        self.leaves = int(leaves_to_search) or None

    @property
    def ntotal(self) -> int:
        return int(self.keys.shape[0])

    @property
    def dim(self) -> int:
        return int(self.keys.shape[1])

    def set_nprobe(self, nprobe: int) -> None:
        self.leaves = int(nprobe) or None

    def _candidates(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        return search(self.scann, queries, fetch, self.leaves)
