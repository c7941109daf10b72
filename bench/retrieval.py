"""Retrieval benchmarks: embedding chunks/s, and build time, QPS and recall@10 (against exact search)
of Flat and IVF-PQ indexes over the chunk embeddings, or over the stored keys of the database
RETRO_BENCH_DB names; queries are held-out vectors. Rows in this module's own format (bench/cli.py)."""
from __future__ import annotations

import os
import time

import numpy as np

from bench.common import time_ms

WORDS_PER_CHUNK = 40  # about 64 BPE tokens of English documentation


def _chunk_texts(n: int) -> list[str]:
    from models.retrieval.corpus import python_docs_corpus

    texts: list[str] = []
    for doc in python_docs_corpus():
        words = doc.text.split()
        for i in range(0, len(words), WORDS_PER_CHUNK):
            texts.append(" ".join(words[i:i + WORDS_PER_CHUNK]))
            if len(texts) == n:
                return texts
    return texts


def _recall(truth: np.ndarray, found: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found)]))


def _index_rows(vectors: np.ndarray, queries: np.ndarray, device: str, k: int = 10) -> list[dict]:
    import faiss

    from models.retrieval import index as index_mod

    use_gpu = device.startswith("cuda") and index_mod.gpu_available()
    rows = []
    truth = None
    n, dim = vectors.shape
    for kind in ("flat", "ivfpq"):
        factory = "Flat" if kind == "flat" else index_mod.factory_string(kind, n, dim, {})
        t0 = time.perf_counter()
        index = index_mod.train_index(factory, dim, vectors, use_gpu=use_gpu)
        index.add(vectors)
        build_s = time.perf_counter() - t0
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = min(32, ivf.nlist)
        _, found = index.search(queries, k)
        search_s = time_ms(lambda: index.search(queries, k), "cpu") / 1e3
        if truth is None:
            truth = found
        rows.append({
            "suite": "retrieval", "case": f"index/{kind}", "device": device, "vectors": n, "dim": dim,
            "queries": len(queries), "factory": factory, "build_s": round(build_s, 4),
            "qps": round(len(queries) / search_s, 1), "recall@10": round(_recall(truth, found), 4),
            "faiss_gpu": bool(use_gpu), "threads": faiss.omp_get_max_threads(),
        })
    return rows


def run(quick: bool, device: str) -> list[dict]:
    """Embedding chunks/s on ``device``; Flat/IVF-PQ build time, QPS and recall@10."""
    from models.retrieval.embed import Embedder

    on_gpu = device.startswith("cuda")
    n_embed = (256 if quick else 1024) * (16 if on_gpu else 1)
    texts = _chunk_texts(n_embed)
    embedder = Embedder(device=device, batch_size=256 if on_gpu else 128)
    embedded = {}  # the vectors of the timed calls (its first, untimed, call is the warm-up)
    seconds = time_ms(lambda: embedded.update(vectors=embedder.embed_texts(texts)), device, quick) / 1e3
    vectors = embedded["vectors"]
    rows = [{
        "suite": "retrieval", "case": "embed", "device": device, "chunks": len(texts),
        "seconds": round(seconds, 3), "chunks_per_s": round(len(texts) / seconds, 1),
        "dtype": str(embedder.dtype).replace("torch.", ""), "model": embedder.name,
    }]
    db_path = os.environ.get("RETRO_BENCH_DB")
    if db_path:
        from models.retrieval import RetrievalDatabase

        vectors = np.asarray(RetrievalDatabase.open(db_path, verify=False).embeddings, dtype=np.float32)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(vectors))
    n_queries = min(1000, max(16, len(vectors) // 10))
    queries, base = vectors[perm[:n_queries]], vectors[perm[n_queries:]]
    rows += _index_rows(np.ascontiguousarray(base), np.ascontiguousarray(queries), device)
    return rows
