"""python -m bench retrieval-scale: the retrieval database's heavy stages at growing sizes.

For each size (synthetic clustered 384-d keys, a memory-mapped .npy given to the index
stages as the database's keys) and each engine and worker count, every stage's seconds,
vectors/s, peak RSS of its largest process (ru_maxrss, measured in that process) and
bytes on disk; for the neighbour precompute and for single chunk queries, recall@10
against exact search on a sample, queries/s and p50/p99 latency on one thread.

Peers in the same run, each stage in a process of its own:
  before      the single-process path with a list of in-RAM shards and no re-ranking
  inram       every shard's codes merged into one index in RAM (as Megatron-LM's RETRO
              preprocessing and autofaiss do), then searched in RAM
  scann       ScaNN (tree + asymmetric hashing + exact reordering) against the merged IVF index,
              IVF-SQ8 and IVF-PQ48, both re-ranked, at equal recall@10; ScaNN builds and searches
              in RAM and has no merge

Rows are appended, one JSON object per line, to <out>/retrieval_scale.jsonl.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib.util
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from models.cli_common import Parser, command, integer

from .common import DEFAULT_OUT

PROG = "python -m bench retrieval-scale"
DIM = 384
K = 10
CLUSTERS = 1000
BLOCK = 65536                    # vectors per read/write/add block
SIZES = (250_000, 1_000_000, 4_000_000)
QUICK_SIZES = (2_000, 4_000, 8_000)
ENGINES = ("before", "inram", "local", "ray")
SHARD_SIZE = 5_000_000           # the single-process path's default vectors per shard


# -- data -----------------------------------------------------------------------------------

def synthetic_keys(path: Path, n: int, dim: int = DIM, seed: int = 0) -> Path:
    """``n`` unit-length keys around CLUSTERS random centres, float16, written block by block."""
    centres = np.random.default_rng(seed).standard_normal((CLUSTERS, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    for lo in range(0, n, BLOCK):
        rng = np.random.default_rng((seed, lo))
        hi = min(lo + BLOCK, n)
        x = centres[rng.integers(0, CLUSTERS, hi - lo)] + rng.standard_normal((hi - lo, dim), np.float32) / 24
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    return path


def blocks(keys, lo: int = 0, hi: int | None = None):
    hi = keys.shape[0] if hi is None else hi
    for start in range(lo, hi, BLOCK):
        yield np.ascontiguousarray(keys[start:min(start + BLOCK, hi)], dtype=np.float32)


def exact_neighbours(keys, query_ids: np.ndarray, k: int = K) -> np.ndarray:
    """(q, k) ids of the exact nearest keys of keys[query_ids], excluded ones (`drop_excluded`) left out."""
    from faiss.contrib.exhaustive_search import knn_ground_truth

    queries = np.asarray(keys[query_ids], dtype=np.float32)
    _, ids = knn_ground_truth(queries, blocks(keys), k + 2)
    return drop_excluded(ids, query_ids, k)


def drop_excluded(ids: np.ndarray, query_ids: np.ndarray, k: int = K) -> np.ndarray:
    """The first ``k`` ids of each row other than the query's own chunk and the next (each synthetic
    chunk is a document of its own; the precompute excludes a chunk's document and the next chunk's)."""
    out = np.full((len(ids), k), -1, np.int64)
    for row, (found, q) in enumerate(zip(ids, np.asarray(query_ids))):
        rest = found[(found != q) & (found != q + 1)][:k]
        out[row, :rest.size] = rest
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([np.intersect1d(f[:k], t).size / k for f, t in zip(found, truth)]))


def disk_bytes(*paths) -> int:
    total = 0
    for p in map(Path, paths):
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()] if p.exists() else []
        total += sum(f.stat().st_size for f in files)
    return total


# -- measuring a step in a process of its own -----------------------------------------------

def peak_rss_mb() -> float:
    """This process's peak resident memory (ru_maxrss: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measured(fn, args, threads):
    import faiss

    if threads:
        faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    out = fn(*args) or {}
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), **out}


def start_processes():
    """Start the small process every measured process is forked from, before this one grows: a process
    started from a large one would report its parent's size as its own peak (ru_maxrss spans exec)."""
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(["bench.retrieval_scale"])
    forkserver.ensure_running()


def in_processes(fn, arg_lists, threads: int | None = None, at_once: int = 0) -> dict:
    """``fn(*args)`` for each of ``arg_lists``, ``at_once`` at a time (0: all), each in a fresh process: the
    first call's dict, the largest process's peak RSS (MB), and the seconds: the call's own (or what it
    reports, a stage's statistics), or for several the wall time of all."""
    ctx = multiprocessing.get_context("forkserver")
    t0 = time.perf_counter()
    procs = min(at_once or len(arg_lists), len(arg_lists))
    with concurrent.futures.ProcessPoolExecutor(procs, mp_context=ctx, max_tasks_per_child=1) as pool:
        outs = [f.result() for f in [pool.submit(_measured, fn, args, threads) for args in arg_lists]]
    seconds = outs[0]["seconds"] if len(outs) == 1 else time.perf_counter() - t0
    return {**outs[0], "seconds": seconds, "peak_rss_mb": max(o["peak_rss_mb"] for o in outs)}


def in_process(fn, *args, threads: int | None = None) -> dict:
    """``fn(*args)`` in a fresh process: its dict, its seconds and that process's peak RSS (MB)."""
    return in_processes(fn, [args], threads)


# -- the peers: one process, shards in RAM (before); shards merged in RAM (inram) -------------

def nlist_for(n: int) -> int:
    """About 2 sqrt(n) inverted lists, a power of two."""
    return 1 << max(4, min(14, round(np.log2(2 * np.sqrt(n)))))


def factory(n: int, codes: str = "SQ8") -> str:
    """IVF sized to the database, with SQ8 (one byte per dimension) or PQ48 (48 bytes a key) codes."""
    return f"IVF{nlist_for(n)},{codes}"


def peer_add(keys_path: str, trained: str, out: str, lo: int, hi: int) -> dict:
    """keys[lo:hi] added to the trained index, in RAM, written to ``out``."""
    import faiss

    index = faiss.read_index(trained)
    keys = np.load(keys_path, mmap_mode="r")
    for start, block in zip(range(lo, hi, BLOCK), blocks(keys, lo, hi)):
        index.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
    faiss.write_index(index, out)
    return {"n_vectors": hi - lo}


def peer_merge_in_ram(shards: list[str], out: str) -> dict:
    """Every shard's codes into the first shard's index, in RAM (faiss.merge_into), then written."""
    import faiss

    index = faiss.read_index(shards[0])
    for path in shards[1:]:
        faiss.merge_into(index, faiss.read_index(path), False)
    faiss.write_index(index, out)
    return {"n_vectors": int(index.ntotal)}


def peer_search(paths: list[str], keys_path: str, query_ids, mmap: bool, nprobe: int, single: bool) -> dict:
    """The peers' neighbour search: every index in ``paths`` searched, results merged, no re-ranking."""
    import faiss

    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    indexes = [faiss.read_index(p, flags) for p in paths]
    for index in indexes:
        faiss.extract_index_ivf(index).nprobe = nprobe
    keys = np.load(keys_path, mmap_mode="r")

    def search(q):
        found = [index.search(q, K + 2) for index in indexes]
        d, i = np.concatenate([f[0] for f in found], 1), np.concatenate([f[1] for f in found], 1)
        order = np.argsort(d, axis=1, kind="stable")[:, :K + 2]
        return np.take_along_axis(i, order, 1)

    return timed_queries(search, keys, query_ids, single)


def timed_queries(search, keys, query_ids, single: bool) -> dict:
    """Found ids of keys[query_ids] (excluded ones left out) and the time: per query (``single``) or in blocks."""
    from models.retrieval.manifest import read_rows
    query_ids = np.asarray(query_ids)
    found, times = [], []
    step = 1 if single else 4096
    for lo in range(0, query_ids.size, step):
        q = read_rows(keys, query_ids[lo:lo + step]).astype(np.float32)
        t0 = time.perf_counter()
        found.append(search(q))
        times.append(time.perf_counter() - t0)
    out = {"found": drop_excluded(np.concatenate(found), query_ids), "search_s": float(np.sum(times))}
    if single:
        out["p50_ms"], out["p99_ms"] = (float(np.percentile(times, p) * 1e3) for p in (50, 99))
    return out


# -- rows -----------------------------------------------------------------------------------

def make_row(stage: str, engine: str, workers: int, n_vectors: int, m: dict, processed: int, **extra) -> dict:
    """One JSONL row from a measurement ``m`` (seconds, peak_rss_mb, ...); ``processed``: the vectors
    (or queries) the stage went through."""
    seconds = float(m["seconds"])
    row = {"suite": "retrieval_scale", "stage": stage, "engine": engine, "workers": workers,
           "n_vectors": n_vectors, "processed": int(processed), "seconds": round(seconds, 6),
           "vectors_per_s": round(processed / seconds, 1) if seconds > 0 else None,
           "peak_rss_mb": round(float(m["peak_rss_mb"]), 1), "bytes_on_disk": m.get("bytes_on_disk")}
    for key in ("recall_at_10", "p50_ms", "p99_ms", "qps"):
        if m.get(key) is not None:
            row[key] = round(float(m[key]), 4)
    return {**row, **extra}


def search_row(stage: str, engine: str, workers: int, n: int, m: dict, query_ids, sample, **extra) -> dict:
    """A precompute or query row: recall@10 of ``m["found"]`` (rows for ``query_ids``) on the sample."""
    pos = np.searchsorted(query_ids, sample.ids)
    m = {**m, "recall_at_10": recall_at_k(m["found"][pos], sample.truth)}
    m["qps"] = len(query_ids) / m.get("search_s", m["seconds"])
    return make_row(stage, engine, workers, n, m, len(query_ids), n_queries=len(query_ids), **extra)


class SizeData:
    """One database size: its keys (synthetic, memory-mapped), chunk documents (one chunk per document),
    the precompute's range of query chunks (the first ones; all of them at small sizes) and, spread over
    it, the queries whose exact neighbours are known."""

    def __init__(self, folder: Path, n: int, range_size: int, truth_size: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.n, self.keys = n, synthetic_keys(folder / "keys.npy", n)
        self.chunk_doc = folder / "chunk_doc.npy"
        np.save(self.chunk_doc, np.arange(n, dtype=np.int32))
        self.range_ids = np.arange(min(range_size, n))
        self.rows = folder / "query_rows.npy"
        np.save(self.rows, self.range_ids)
        self.ids = self.range_ids[::max(1, self.range_ids.size // truth_size)][:truth_size]
        self.truth = exact_neighbours(np.load(self.keys, mmap_mode="r"), self.ids)


def peer_rows(data: SizeData, work: Path, workers: int, p: dict, trained: Path) -> list[dict]:
    """before: added in one process (a shard per SHARD_SIZE), shards searched in turn, no re-ranking;
    inram: the engines' shards, ``workers`` added at once, merged in RAM, searched in RAM. Both start from ``trained``
    (the local engine's trained index: the same training)."""
    n, keys, trained, nprobe, rows = data.n, str(data.keys), str(trained), p["nprobe"], []
    ranges = [(lo, min(lo + SHARD_SIZE, n)) for lo in range(0, n, SHARD_SIZE)]
    shards = [str(work / f"before_{i:03d}.faiss") for i in range(len(ranges))]
    m = in_process(_add_in_turn, keys, trained, shards, ranges)
    rows.append(make_row("add", "before", 1, n, {**m, "bytes_on_disk": disk_bytes(*shards)}, n))
    rows += peer_search_rows("before", 1, data, shards, True, nprobe)
    ranges = [(lo, min(lo + p["shard_size"], n)) for lo in range(0, n, p["shard_size"])]
    parts = [str(work / f"inram_part_{i:03d}.faiss") for i in range(len(ranges))]
    m = in_processes(peer_add, [(keys, trained, part, lo, hi) for part, (lo, hi) in zip(parts, ranges)],
                     threads=1, at_once=workers)
    rows.append(make_row("add", "inram", workers, n, {**m, "bytes_on_disk": disk_bytes(*parts)}, n))
    merged = str(work / "inram_merged.faiss")
    m = in_process(peer_merge_in_ram, parts, merged)
    rows.append(make_row("merge", "inram", workers, n, {**m, "bytes_on_disk": disk_bytes(merged)}, n))
    return rows + peer_search_rows("inram", workers, data, [merged], False, nprobe)


def peer_search_rows(engine: str, workers: int, data: SizeData, paths: list[str], mmap: bool, nprobe: int):
    m = in_process(peer_search, paths, str(data.keys), data.range_ids, mmap, nprobe, False)
    rows = [search_row("precompute", engine, workers, data.n, m, data.range_ids, data, rerank=0, nprobe=nprobe,
                       threads=None)]
    m = in_process(peer_search, paths, str(data.keys), data.ids, mmap, nprobe, True, threads=1)
    return rows + [search_row("query", engine, workers, data.n, m, data.ids, data, rerank=0, nprobe=nprobe,
                              threads=1)]


def _add_in_turn(keys: str, trained: str, shards: list[str], ranges: list[tuple[int, int]]) -> dict:
    for path, (lo, hi) in zip(shards, ranges):
        peer_add(keys, trained, path, lo, hi)
    return {}


# -- the engines: models.retrieval.build_index, each stage in a fresh process (and Ray cluster) ----------

def engine_stage(stage: str, engine: str, workers: int, work: str, data: SizeData, p: dict) -> dict:
    """One index stage of the database build; for ray, on a local cluster this process starts and stops,
    so the tasks' workers are new and their ru_maxrss is this stage's alone."""
    from models.retrieval import build_index as bi

    keys, chunk_doc = str(data.keys), str(data.chunk_doc)
    try:
        if stage == "train_index":
            return bi.train_ivf(keys, work, p["factory"], sample=p["sample"], engine=engine, workers=workers)
        if stage == "add":
            return bi.add_shards(keys, work, shard_size=p["shard_size"], engine=engine, workers=workers)
        if stage == "merge":
            return bi.merge_shards(keys, work, shard_size=p["shard_size"], engine=engine, workers=workers)
        spec = bi.QuerySpec(work, keys, chunk_doc, K, p["nprobe"], p["rerank"], rows=str(data.rows), docs=chunk_doc)
        table = Path(work) / "neighbours_sample.npy"
        row = bi.precompute_table(spec, table, range_size=p["range_size"], engine=engine, workers=workers)
        return {**row, "found": np.load(table)}
    finally:
        if engine == "ray":
            import ray

            ray.shutdown()


def searcher_queries(work: str, data: SizeData, nprobe: int, rerank: int) -> dict:
    """Single chunk queries on the merged memory-mapped index, re-ranked, one at a time."""
    from models.retrieval import build_index as bi

    searcher = bi.open_searcher(work, data.keys, data.chunk_doc, nprobe=nprobe, rerank=rerank)
    return timed_queries(lambda q: searcher.search(q, K + 2)[1], searcher.keys, data.ids, single=True)


def engine_rows(engine: str, workers: int, work: Path, data: SizeData, p: dict, trained: Path | None = None):
    """Every stage's row, from the stage's own statistics (its peak: the driver's and every task's).
    ``trained``: an index trained by this engine already (training is one task on any worker count)."""
    work.mkdir(parents=True, exist_ok=True)
    rows, stages = [], ("train_index", "add", "merge", "precompute")
    if trained is not None:
        shutil.copyfile(trained, work / "index_trained.faiss")
        stages = stages[1:]
    for stage in stages:
        m = in_process(engine_stage, stage, engine, workers, str(work), data, p)  # the stage's own row
        if stage == "precompute":
            rows.append(search_row(stage, engine, workers, data.n, m, data.range_ids, data,
                                   rerank=p["rerank"], nprobe=p["nprobe"]))
        else:
            rows.append(make_row(stage, engine, workers, data.n, m, m["n_vectors"]))
    m = in_process(searcher_queries, str(work), data, p["nprobe"], p["rerank"], threads=1)
    return rows + [search_row("query", engine, workers, data.n, m, data.ids, data, rerank=p["rerank"],
                              nprobe=p["nprobe"], threads=1)]


# -- ScaNN against IVF-SQ8 and IVF-PQ at equal recall@10 ------------------------------------------------

def scann_build(data: SizeData, folder: str, num_leaves: int) -> dict:
    from models.retrieval import scann_index

    scann_index.build_folder(data.keys, folder, num_leaves, K + 2)
    return {"bytes_on_disk": disk_bytes(folder)}


def scann_sweep(data: SizeData, folder: str, leaves: list[int]) -> dict:
    """Single queries (one thread) on the ScaNN searcher read back into RAM, at each ``leaves`` searched."""
    from models.retrieval import scann_index

    searcher = scann_index.Searcher(folder, np.load(data.keys, mmap_mode="r"), np.load(data.chunk_doc))
    return sweep(searcher, data, leaves)


def sweep(searcher, data: SizeData, settings: list[int]) -> dict:
    out = {}
    for value in settings:
        searcher.set_nprobe(value)
        out[value] = timed_queries(lambda q: searcher.search(q, K + 2)[1], searcher.keys, data.ids, True)
    return {"settings": out}


def ivf_sweep(work: str, data: SizeData, nprobes: list[int], rerank: int) -> dict:
    from models.retrieval import build_index as bi

    return sweep(bi.open_searcher(work, data.keys, data.chunk_doc, rerank=rerank), data, nprobes)


def sweep_rows(engine: str, m: dict, knob: str, data: SizeData) -> list[dict]:
    return [search_row("query_sweep", engine, 1, data.n, {**q, "seconds": q["search_s"], "peak_rss_mb": m["peak_rss_mb"]},
                       data.ids, data, threads=1, **{knob: value}, in_ram=engine == "scann", mergeable=engine != "scann")
            for value, q in m["settings"].items()]


def settings_for(nlist: int) -> list[int]:
    return [s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256) if s <= nlist]


def ivfpq_rows(data: SizeData, folder: Path, p: dict) -> list[dict]:
    """The local engine's index with PQ48 codes instead (trained, added, merged) and its query sweep."""
    work, p = folder / "ivfpq", {**p, "factory": factory(data.n, "PQ48")}
    work.mkdir(parents=True, exist_ok=True)
    rows = [make_row(stage, "ivfpq", 1, data.n, m, m["n_vectors"], factory=p["factory"])
            for stage in ("train_index", "add", "merge")
            for m in [in_process(engine_stage, stage, "local", 1, str(work), data, p)]]
    nlist = nlist_for(data.n)
    return rows + sweep_rows("ivfpq", in_process(ivf_sweep, str(work), data, settings_for(nlist), p["rerank"],
                                                 threads=1), "nprobe", data)


def scann_rows(data: SizeData, folder: Path, nlist: int, p: dict, ivf: list[dict]) -> list[dict]:
    """ScaNN's build and per-setting query rows, IVF-PQ's (`ivfpq_rows`); then, for each recall target,
    the fastest setting of ScaNN, of the merged IVF-SQ8 index (``ivf``: its sweep's rows) and of IVF-PQ
    that reaches it."""
    ivfpq = ivfpq_rows(data, folder, p)
    b = in_process(scann_build, data, str(folder / "scann"), nlist)
    rows = [make_row("build", "scann", 1, data.n, b, data.n, in_ram=True, mergeable=False, num_leaves=nlist)]
    rows += sweep_rows("scann", in_process(scann_sweep, data, str(folder / "scann"), settings_for(nlist), threads=1),
                       "leaves_to_search", data)
    for target in (0.9, 0.95, 0.99):
        for engine, candidates in (("scann", rows), ("ivfsq8", ivf), ("ivfpq", ivfpq)):
            ok = [r for r in candidates if r["stage"] == "query_sweep" and r["recall_at_10"] >= target]
            best = min(ok, key=lambda r: r["p50_ms"]) if ok else {"suite": "retrieval_scale", "engine": engine,
                                                                   "n_vectors": data.n}
            rows.append({**best, "stage": "equal_recall", "recall_target": target, "reached": bool(ok)})
    return ivfpq + rows


# -- the run ------------------------------------------------------------------------------------

def machine() -> dict:
    """The CPU's model and the vector ISA extensions FAISS can use, the date (UTC), faiss's version."""
    import datetime

    import faiss

    info = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    return {"cpu_model": info.get("model name", platform.processor()), "cpus": os.cpu_count(),
            "cpu_isa": [f for f in ("avx", "fma", "f16c", "avx2", "avx512f", "amx_tile", "asimd") if f in flags],
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "faiss": faiss.__version__, **{k.lower(): os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}}


def params(n: int, quick: bool, shard_size: int, range_ids: int, max_workers: int) -> dict:
    # faiss wants 39 training keys a list at least
    return {"factory": factory(n), "sample": min(n, max(100_000, 40 * nlist_for(n))), "shard_size": shard_size,
            "nprobe": 16 if quick else 32, "rerank": 0, "range_size": -(-range_ids // (2 * max_workers))}


def run(args) -> int:
    start_processes()
    sizes, workers, engines = args.sizes, args.workers, args.engines
    scratch = Path(tempfile.mkdtemp(prefix="retrieval-scale-", dir=args.scratch))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "retrieval_scale.jsonl"
    where = {**machine(), "quick": args.quick}
    print(f"{PROG}: sizes {sizes}, workers {workers}, engines {sorted(engines)}; rows to {results}; "
          f"scratch {scratch}; {where['cpu_model']}", flush=True)
    try:
        for n in sizes:
            for row in size_rows(n, args, scratch / f"n{n}"):
                row = {**row, **where}
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(summary(row), flush=True)
            shutil.rmtree(scratch / f"n{n}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the folder mkdtemp made for this run
    return 0


def size_rows(n: int, args, folder: Path):
    """Yield every row of one database size, as each is measured."""
    t0 = time.perf_counter()
    data = SizeData(folder, n, args.queries, args.truth)
    p = params(n, args.quick, args.shard_size, data.range_ids.size, max(args.workers))
    yield {"suite": "retrieval_scale", "stage": "data", "engine": "synthetic", "workers": 1, "n_vectors": n,
           "seconds": round(time.perf_counter() - t0, 3), "bytes_on_disk": disk_bytes(data.keys), "dim": DIM,
           "n_queries": int(data.range_ids.size), "n_truth": int(data.ids.size), **p}
    nlist = nlist_for(n)
    if "local" in args.engines:
        yield from engine_rows("local", 1, folder / "local_1", data, p)
        ivf = sweep_rows("ivfsq8", in_process(ivf_sweep, str(folder / "local_1"), data, settings_for(nlist),
                                               p["rerank"], threads=1), "nprobe", data)
        yield from ivf
    if "before" in args.engines or "inram" in args.engines:
        peers = peer_rows(data, folder, max(args.workers), p, folder / "local_1" / "index_trained.faiss")
        yield from (r for r in peers if r["engine"] in args.engines)
    if "ray" in args.engines:
        for i, w in enumerate(args.workers):
            first = folder / f"ray_{args.workers[0]}" / "index_trained.faiss"
            yield from engine_rows("ray", w, folder / f"ray_{w}", data, p, trained=first if i else None)
    if "scann" in args.engines and n == args.scann_size:
        yield from scann_rows(data, folder, nlist, p, ivf)


def summary(r: dict) -> str:
    cols = [f"{r['stage']:<12}", f"{r['engine']:<9}", f"w{r.get('workers', '-')}", f"n={r['n_vectors']:>9}"]
    for key, fmt in (("seconds", "{:.2f}s"), ("vectors_per_s", "{:.0f}/s"), ("peak_rss_mb", "{:.0f}MB"),
                     ("bytes_on_disk", "{}B"), ("recall_at_10", "R@10={:.3f}"), ("p50_ms", "p50={:.2f}ms"),
                     ("p99_ms", "p99={:.2f}ms"), ("recall_target", "target={}")):
        if r.get(key) is not None:
            cols.append(fmt.format(r[key]))
    return "  ".join(cols)


def size_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def parse_args(argv):
    p = Parser(PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, 4-bit codebooks, fewer queries")
    p.add_argument("--sizes", type=size_list, help=f"database sizes in chunks (default {SIZES}); each >= 1000")
    p.add_argument("--workers", type=size_list, default=[1, 2], help="Ray worker counts (default 1,2)")
    p.add_argument("--engines", default=",".join(ENGINES + ("scann",)),
                   help="comma-separated: before, inram, local, ray, scann (default all)")
    p.add_argument("--queries", type=integer(1), help="query chunks the precompute runs over (from chunk 0; "
                   "default 10000, --quick 1000)")
    p.add_argument("--truth", type=integer(1), help="queries with exact neighbours (default 500, --quick 100)")
    p.add_argument("--shard-size", type=integer(1), help="keys per index shard, at every size (default half "
                   "the smallest size)")
    p.add_argument("--scann-size", type=integer(1), help="the size ScaNN is compared at (default the middle one)")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (default bench/results)")
    p.add_argument("--scratch", default=None, help="folder for the run's keys and indexes (default the system's "
                   "temporary folder; removed at the end)")
    args = p.parse_args(argv)
    args.sizes = args.sizes or list(QUICK_SIZES if args.quick else SIZES)
    if min(args.sizes) < 1000:
        p.error(f"argument --sizes: each size must be >= 1000 chunks, got {min(args.sizes)}")
    args.shard_size = args.shard_size or -(-min(args.sizes) // 2)
    args.engines = set(e.strip() for e in args.engines.split(",") if e.strip())
    if not args.engines or args.engines - set(ENGINES + ("scann",)):
        p.error(f"argument --engines: expected some of before, inram, local, ray, scann, got {sorted(args.engines)}")
    if args.engines & {"before", "inram", "scann"} and "local" not in args.engines:
        p.error("argument --engines: before, inram and scann start from or compare with the local engine's "
                "index: name local too")
    args.queries = args.queries or (1000 if args.quick else 10_000)
    args.truth = min(args.truth or (100 if args.quick else 500), args.queries)
    args.scann_size = args.scann_size or sorted(args.sizes)[len(args.sizes) // 2]
    if args.scann_size not in args.sizes:
        p.error(f"argument --scann-size: expected one of --sizes {args.sizes}, got {args.scann_size}")
    if args.scratch is not None and not os.path.isdir(args.scratch):
        p.error(f"argument --scratch: {args.scratch!r} is not a folder")
    if "ray" in args.engines and importlib.util.find_spec("ray") is None:
        p.error("argument --engines: ray needs Ray (pip install 'retro_kernels[ray]'); leave ray out")
    if "scann" in args.engines and importlib.util.find_spec("scann") is None:
        args.engines.discard("scann")
        print(f"{PROG}: scann is not installed (pip install 'retro_kernels[scann]'): no ScaNN rows", file=sys.stderr)
    return args


@command("retrieval-scale", prog=PROG)
def main(argv) -> int:
    return run(parse_args(argv))
