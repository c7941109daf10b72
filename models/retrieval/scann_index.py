"""ScaNN (the RETRO paper's retriever) over chunk keys: a partitioning tree, anisotropic
asymmetric hashing, and exact reordering of the best candidates.

ScaNN builds and searches in RAM: every key is copied in as float32 and the
searcher has no merge of separately built parts and no memory-mapped form, so
its memory grows with the database (the merged on-disk IVF index does not).
Optional: ``pip install 'retro_kernels[scann]'``.
"""
from __future__ import annotations

import numpy as np


def available() -> bool:
    try:
        import scann  # noqa: F401
    except ImportError:
        return False
    return True


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


def search(searcher, queries: np.ndarray, k: int, leaves_to_search: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids), each (n, k), ascending squared L2, for ``queries`` (n, dim), on this thread."""
    ids, dist = searcher.search_batched(np.ascontiguousarray(queries, dtype=np.float32), final_num_neighbors=k,
                                        leaves_to_search=leaves_to_search)
    return np.asarray(dist), np.asarray(ids, dtype=np.int64)
