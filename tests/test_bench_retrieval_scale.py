"""python -m bench retrieval-scale at tiny sizes: its rows, its exact neighbours, its bad arguments."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bench import retrieval_scale as rs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_exact_neighbours_leave_out_the_chunk_and_the_next(tmp_path):
    keys = np.load(rs.synthetic_keys(tmp_path / "keys.npy", 3000), mmap_mode="r")
    assert keys.dtype == np.float16 and keys.shape == (3000, rs.DIM)
    x = np.asarray(keys, dtype=np.float32)
    queries = np.array([0, 17, 2999])
    truth = rs.exact_neighbours(keys, queries)
    for q, row in zip(queries, truth):
        d = ((x - x[q]) ** 2).sum(1)
        d[[q, min(q + 1, 2999)]] = np.inf
        assert set(row) == set(np.argsort(d)[:rs.K])
    assert rs.recall_at_k(truth, truth) == 1.0
    assert rs.recall_at_k(np.full_like(truth, -1), truth) == 0.0


def run_bench(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "bench", "retrieval-scale", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_rows_at_tiny_sizes(tmp_path):
    engines = "before,inram,local" + (",scann" if rs.importlib.util.find_spec("scann") else "")
    result = run_bench(tmp_path, "--quick", "--sizes", "1000", "--workers", "2", "--engines", engines,
                       "--queries", "200", "--truth", "20", "--out", str(tmp_path / "out"),
                       "--scratch", str(tmp_path), "--scann-size", "1000")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "retrieval_scale.jsonl").read_text().splitlines()]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the run's scratch folder is gone
    measured = [r for r in rows if r["stage"] not in ("data", "equal_recall")]
    for r in measured:
        for key in ("stage", "engine", "workers", "n_vectors", "seconds", "vectors_per_s", "peak_rss_mb"):
            assert r[key] is not None, (key, r)
        assert r["seconds"] > 0 and r["peak_rss_mb"] > 10 and r["cpu_model"]
    stages = {(r["engine"], r["stage"]) for r in measured}
    for engine in ("local", "before", "inram"):
        assert {(engine, s) for s in ("add", "precompute", "query")} <= stages
    assert ("local", "train_index") in stages and ("local", "merge") in stages and ("inram", "merge") in stages
    searched = [r for r in measured if r["stage"] in ("precompute", "query", "query_sweep")]
    for r in searched:
        assert 0.0 <= r["recall_at_10"] <= 1.0 and r["n_queries"] in (200, 20)
    for r in (r for r in searched if r["stage"] != "precompute"):
        assert 0 < r["p50_ms"] <= r["p99_ms"]
    local = {r["stage"]: r for r in measured if r["engine"] == "local"}
    assert local["merge"]["bytes_on_disk"] > 0 and local["precompute"]["n_queries"] == 200
    assert {r["nprobe"] for r in searched if r["engine"] == "ivfsq8"} == {1, 2, 4, 8, 16, 32, 64}  # every nprobe up to nlist (64 at 1000 keys)
    if "scann" in engines:
        scann = [r for r in rows if r["engine"] == "scann"]
        assert all(r["in_ram"] and not r["mergeable"] for r in scann if r["stage"] != "equal_recall")
        assert {r["recall_target"] for r in rows if r["stage"] == "equal_recall"} == {0.9, 0.95, 0.99}


@pytest.mark.parametrize("args, names", [
    (["--sizes", "10"], "--sizes"), (["--sizes", "a,b"], "--sizes"), (["--workers", "0"], "--workers"),
    (["--engines", "spark"], "--engines"), (["--engines", "scann"], "--engines"), (["--engines", "inram"], "--engines"),
    (["--sizes", "1000,2000", "--scann-size", "3000"], "--scann-size"), (["--scratch", "/no/such"], "--scratch"),
])
def test_bad_arguments_get_one_line_and_exit_2(tmp_path, args, names):
    result = run_bench(tmp_path, *args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and names in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_scann_searcher_finds_the_exact_neighbours_and_excludes_documents(tmp_path):
    pytest.importorskip("scann", reason="ScaNN is an optional extra (retro_kernels[scann])")
    from models.retrieval import scann_index

    keys = np.load(rs.synthetic_keys(tmp_path / "keys.npy", 2000), mmap_mode="r")
    chunk_doc = np.arange(2000) // 4  # documents of four chunks
    scann_index.build_folder(tmp_path / "keys.npy", tmp_path / "scann", num_leaves=16)
    searcher = scann_index.Searcher(tmp_path / "scann", keys, chunk_doc, leaves_to_search=16)
    queries = np.asarray(keys[:50], dtype=np.float32)
    exclude = np.stack([chunk_doc[:50], chunk_doc[1:51]], 1)
    dist, ids = searcher.search(queries, rs.K, exclude)
    x = np.asarray(keys, dtype=np.float32)
    for q, row in enumerate(ids):
        d = ((x - x[q]) ** 2).sum(1)
        d[np.isin(chunk_doc, exclude[q])] = np.inf
        assert not np.isin(chunk_doc[row], exclude[q]).any()
        assert len(set(row) & set(np.argsort(d)[:rs.K])) >= 9  # every leaf searched, exact reordering
    assert np.all(np.diff(dist, axis=1) >= -1e-5)
