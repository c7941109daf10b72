"""Retrieval database parts that need no encoder: corpus ingestion, tokenizer,
leakage filter, FAISS index wrappers, manifest. Real files, real FAISS, real text."""
import json

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")
pytest.importorskip("tokenizers")

from models.atomic import atomic_file  # noqa: E402
from models.retrieval import corpus as corpus_mod  # noqa: E402
from models.retrieval import index as index_mod  # noqa: E402
from models.retrieval import build_database, held_out, split_documents  # noqa: E402
from models.retrieval.leakage import MinHasher, find_leaked  # noqa: E402
from models.retrieval.manifest import DatabaseError, Manifest, load_npy, read_rows  # noqa: E402
from models.retrieval.tokenizer import load_tokenizer, train_bpe  # noqa: E402


def _topics(n=30, chars=4000):
    """``n`` real documents (pydoc topics of at least ``chars`` characters, cut there), in name order."""
    import pydoc_data.topics as t

    names = [name for name in sorted(t.topics) if len(t.topics[name]) >= chars][:n]
    return {name: t.topics[name][:chars] for name in names}


# --- corpus ----------------------------------------------------------------------------

def test_corpus_problem_files_are_reported_not_fatal(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "a_empty.txt").write_bytes(b"")
    (folder / "b_blank.txt").write_bytes(b"  \n\n ")
    (folder / "c_binary.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (folder / "d_latin1.txt").write_bytes("café déjà vu, naïve".encode("latin-1"))
    (folder / "e_tiny.txt").write_text("x")
    (folder / "f_docs.jsonl").write_text(
        json.dumps({"id": "j1", "text": "first record"}) + "\n{not json\n"
        + json.dumps({"title": "no text field"}) + "\n" + json.dumps({"text": "second record"}) + "\n")
    warnings = []
    stats = corpus_mod.CorpusStats()
    docs = list(corpus_mod.iter_corpus(folder, stats=stats, warn=warnings.append))
    ids = [d.doc_id for d in docs]
    assert ids == ["d_latin1.txt", "e_tiny.txt", "j1", "f_docs.jsonl:4"]
    assert docs[0].text == "caf\ufffd d\ufffdj\ufffd vu, na\ufffdve"
    assert stats.skipped_empty == 2 and stats.skipped_binary == 1
    assert stats.skipped_bad_lines == 2 and stats.decoded_with_replacement == 1
    text = "\n".join(warnings)
    for needle in ("a_empty.txt: empty", "b_blank.txt", "c_binary.bin: looks binary", "d_latin1.txt: not valid UTF-8",
                   "f_docs.jsonl:2: not valid JSON", "f_docs.jsonl:3: expected an object with a string field 'text'"):
        assert needle in text


def test_corpus_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        list(corpus_mod.iter_corpus(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no files"):
        list(corpus_mod.iter_corpus(tmp_path / "empty"))


def test_build_refuses_a_corpus_without_usable_documents(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "empty.txt").write_bytes(b"")
    (folder / "blob.dat").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(ValueError, match="no usable documents"):
        build_database(tmp_path / "db", folder, vocab_size=300, runtime={"progress": False}, log=lambda m: None)


def test_large_text_file_streams_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "PIECE_BYTES", 1000)
    line = "All work and no play makes Jack a dull boy. é\n"
    (tmp_path / "big.txt").write_text(line * 200)
    pieces = list(corpus_mod.iter_corpus(tmp_path / "big.txt", warn=lambda m: None))
    assert len(pieces) > 5
    assert [p.continued for p in pieces] == [False] + [True] * (len(pieces) - 1)
    assert "".join(p.text for p in pieces) == line * 200


def test_default_corpus_is_real_python_documentation():
    stats = corpus_mod.CorpusStats()
    docs = {}
    for d in corpus_mod.iter_corpus(None, stats=stats):
        docs[d.doc_id] = d.text
        if len(docs) > 120:
            break
    assert "topic:for" in docs and "for" in docs["topic:for"]
    assert any(k.startswith("module:") for k in docs)
    assert all(len(t) > 0 for t in docs.values())


# --- tokenizer ---------------------------------------------------------------------------

def test_bpe_roundtrip_and_saved_tokenizer(tmp_path):
    texts = list(_topics(20).values())
    tok = train_bpe(iter(texts), vocab_size=600)
    assert tok.get_vocab_size() <= 600
    sample = "Unicode: naïve café — 東京 🐍 and\ttabs\n"
    assert tok.decode(tok.encode(sample).ids) == sample  # byte-level: nothing is unknown
    tok.save(str(tmp_path / "tokenizer.json"))
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.encode(texts[0]).ids == tok.encode(texts[0]).ids
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(iter(texts), vocab_size=10)


# --- held-out split ------------------------------------------------------------------------

def test_split_is_stable_and_near_the_fraction():
    ids = [f"doc{i}" for i in range(4000)]
    mask = split_documents(ids, 0.1, seed=3)
    assert 0.08 < mask.mean() < 0.12
    assert np.array_equal(mask, split_documents(ids, 0.1, seed=3))
    assert not np.array_equal(mask, split_documents(ids, 0.1, seed=4))
    assert held_out("doc7", 0.1, 3) == mask[7]
    with pytest.raises(ValueError, match="eval_fraction"):
        held_out("x", 1.5)


# --- leakage filter ----------------------------------------------------------------------

def test_minhash_leakage_filter_removes_planted_near_duplicate(tmp_path):
    topics = _topics(12, chars=6000)
    names = list(topics)
    eval_text = topics[names[0]]
    words = eval_text.split()
    # change 3 words of ~800: about 39 of ~800 13-gram shingles differ, Jaccard ~0.9
    near = words.copy()
    for i in (100, 300, 500):
        near[i] = "CHANGED"
    texts = [eval_text, " ".join(near)] + [topics[n] for n in names[1:]]
    is_eval = np.zeros(len(texts), bool)
    is_eval[0] = True
    hasher = MinHasher(seed=0)
    sigs = np.stack([hasher.signature(t) for t in texts])
    matches = find_leaked(sigs, np.flatnonzero(is_eval), 0.8)
    assert list(matches) == [1] and matches[1][0] == 0 and matches[1][1] >= 0.8  # unrelated documents are kept
    np.save(tmp_path / "sigs.npy", sigs)  # read from the memory map a block at a time: the same
    assert find_leaked(load_npy(tmp_path / "sigs.npy"), [0], 0.8, block=3) == matches
    # The estimate tracks the true 13-gram Jaccard.
    def shingles(t):
        w = t.lower().split()
        return {" ".join(w[i:i + 13]) for i in range(len(w) - 12)}
    a, b = shingles(texts[0]), shingles(texts[1])
    assert abs(matches[1][1] - len(a & b) / len(a | b)) < 0.1


def test_leakage_filter_in_a_build(tmp_path):
    topics = _topics(12, chars=6000)
    eval_id = next(f"doc{i}" for i in range(1000) if held_out(f"doc{i}", 0.2, 0))
    train_ids = [f"doc{i}" for i in range(1000) if not held_out(f"doc{i}", 0.2, 0)]
    texts = list(topics.values())
    words = texts[0].split()
    words[200] = "planted"
    records = [{"id": eval_id, "text": texts[0]}, {"id": train_ids[0], "text": " ".join(words)}]
    records += [{"id": i, "text": t} for i, t in zip(train_ids[1:], texts[1:])]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    messages = []
    db = build_database(tmp_path / "db", path, vocab_size=400, eval_fraction=0.2, stop_after="chunk",
                        runtime={"progress": False}, log=messages.append)
    manifest = Manifest.load(db)
    info = manifest.info("split")
    assert info["removed_leaked"] == 1
    assert info["removed"][0]["doc"] == train_ids[0] and info["removed"][0]["eval_doc"] == eval_id
    assert any("leakage filter removed 1 document" in m for m in messages)
    split = np.load(db / "doc_split.npy")
    assert split.tolist().count(2) == 1 and split[1] == 2 and split[0] == 1
    # The removed document contributes no retrieval chunk.
    assert 1 not in set(np.load(db / "chunk_doc.npy").tolist())


# --- FAISS index ----------------------------------------------------------------------------

def _vectors(n, d=48, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _write(index, path):
    index_mod.write_index(index, path)
    return path


def _merged(x, tmp_path, factory, shard_size, chunk_doc=None):
    """``x`` (as keys.npy) in an on-disk index merged from shards; its searcher."""
    from models.retrieval import build_index as bi

    keys, docs = tmp_path / "keys.npy", tmp_path / "doc.npy"
    np.save(keys, x)
    np.save(docs, np.arange(len(x)) if chunk_doc is None else chunk_doc)
    bi.train_ivf(keys, tmp_path, factory, sample=len(x))
    bi.add_shards(keys, tmp_path, shard_size=shard_size)
    bi.merge_shards(keys, tmp_path, shard_size=shard_size)
    return bi.open_searcher(tmp_path, keys, docs)


def test_merged_flat_index_equals_brute_force(tmp_path):
    x, q = _vectors(1000).astype(np.float16), _vectors(40, seed=1)
    searcher = _merged(x, tmp_path, index_mod.factory_string("flat", 1000, 48, {}), 300)  # 4 shards, one short
    assert searcher.ntotal == 1000 and searcher.exact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build_stats.jsonl", "doc.npy", "index.faiss",
                                                         "index.ivfdata", "index_trained.faiss", "keys.npy"]
    d, i = searcher.search(q, 10)
    brute = ((q[:, None, :] - x.astype(np.float32)[None, :, :]) ** 2).sum(-1)
    expect = np.argsort(brute, axis=1)[:, :10]
    assert np.array_equal(i, expect)
    np.testing.assert_allclose(d, np.take_along_axis(brute, expect, 1), rtol=1e-4, atol=1e-3)


def test_search_excluding_refetches_until_k_from_other_documents(tmp_path):
    rng = np.random.default_rng(0)
    centre = rng.standard_normal(16).astype(np.float32)
    same = centre + 0.01 * rng.standard_normal((200, 16)).astype(np.float32)  # doc 0: 200 near copies
    other = rng.standard_normal((300, 16)).astype(np.float32) * 3             # docs 1..3
    x = np.concatenate([same, other])
    chunk_doc = np.concatenate([np.zeros(200), 1 + np.arange(300) % 3]).astype(np.int64)
    searcher = _merged(x, tmp_path, "IVF1,Flat", 500, chunk_doc)
    q = centre[None, :].repeat(2, 0)
    _, i = searcher.search(q, 5, np.array([[0, 0], [0, 2]]))
    assert (i >= 0).all()
    assert not np.isin(chunk_doc[i[0]], [0]).any()
    assert not np.isin(chunk_doc[i[1]], [0, 2]).any()
    # and they are the nearest such vectors
    allowed = np.flatnonzero(chunk_doc != 0)
    brute = ((x[allowed] - centre) ** 2).sum(-1)
    assert np.array_equal(i[0], allowed[np.argsort(brute)[:5]])


def test_compressed_index_is_reranked_by_exact_distance(tmp_path):
    x, q = _vectors(2000, d=32), _vectors(30, d=32, seed=1)
    searcher = _merged(x, tmp_path, "IVF4,PQ4x4", 700)
    searcher.set_nprobe(4)
    assert not searcher.exact
    brute = ((q[:, None, :] - x[None]) ** 2).sum(-1)
    truth = np.argsort(brute, axis=1)[:, :5]
    searcher.rerank = 2000  # every candidate: the exact answer
    d, i = searcher.search(q, 5)
    assert np.array_equal(i, truth)
    np.testing.assert_allclose(d, np.take_along_axis(brute, truth, 1), rtol=1e-4)
    searcher.rerank = 5  # the codes' own top 5, re-ordered: worse
    assert (searcher.search(q, 5)[1] == truth).mean() < 0.9


def test_merged_lists_equal_one_index_of_every_key(tmp_path):
    """Shards (one short) merged on disk with positional writes: the same lists, codes and ids in the same
    order, as adding every key to one index; its searches the same."""
    import faiss

    x, q = _vectors(1000, d=32), _vectors(25, d=32, seed=1)
    searcher = _merged(x, tmp_path, "IVF8,SQ8", 300)
    one = faiss.read_index(str(tmp_path / "index_trained.faiss"))
    one.add_with_ids(x, np.arange(len(x)))
    merged, whole = (faiss.extract_index_ivf(i).invlists for i in (searcher.index, one))
    assert faiss.downcast_InvertedLists(merged).filename == str(tmp_path / "index.ivfdata") and searcher.lists_map[1] > 0
    for j in range(8):
        n = whole.list_size(j)
        assert merged.list_size(j) == n
        assert np.array_equal(faiss.rev_swig_ptr(merged.get_ids(j), n), faiss.rev_swig_ptr(whole.get_ids(j), n))
        assert np.array_equal(faiss.rev_swig_ptr(merged.get_codes(j), n * 32), faiss.rev_swig_ptr(whole.get_codes(j), n * 32))
    searcher.set_nprobe(3)
    faiss.extract_index_ivf(one).nprobe = 3
    assert np.array_equal(searcher.index.search(q, 10)[1], one.search(q, 10)[1])


def test_search_a_block_at_a_time_equals_one_block(tmp_path, monkeypatch):
    """A search that unmaps the lists after every query finds what one search of every query finds,
    exclusions and re-ranking included."""
    x, q = _vectors(1500, d=32), _vectors(30, d=32, seed=1)
    chunk_doc = np.arange(1500) // 3
    searcher = _merged(x, tmp_path, "IVF8,SQ8", 600, chunk_doc)
    exclude = np.stack([chunk_doc[:30], chunk_doc[:30] + 1], 1)
    whole = searcher.search(q, 10, exclude)
    monkeypatch.setattr(index_mod, "MAPPED_BLOCK_BYTES", 1)
    assert searcher.queries_per_block() == 1
    for got, want in zip(searcher.search(q, 10, exclude), whole):
        assert np.array_equal(got, want)
    assert [a.shape for a in searcher.search(q[:0], 10)] == [(0, 10), (0, 10)]


def test_ivfpq_factory_adapts_and_refuses_too_little_data():
    assert index_mod.factory_string("ivfpq", 100_000, 384, {}) == "IVF1264,PQ48x8"
    f = index_mod.factory_string("ivfpq", 400, 384, {})
    assert f.startswith("IVF10,PQ48x")
    with pytest.raises(ValueError, match="fewer than nlist"):
        index_mod.factory_string("ivfpq", 50, 384, {"nlist": 100})
    with pytest.raises(ValueError, match="pq_m"):
        index_mod.factory_string("ivfpq", 5000, 384, {"pq_m": 7})
    with pytest.raises(ValueError, match="index_type"):
        index_mod.resolve_index_type("annoy", 10)


# --- manifest ----------------------------------------------------------------------------------

def test_atomic_file_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"half-written")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_manifest_refuses_garbage(tmp_path):
    with pytest.raises(DatabaseError, match="does not exist"):
        Manifest.load(tmp_path / "nothing")
    with pytest.raises(DatabaseError, match="no manifest.json"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{garbage")
    with pytest.raises(DatabaseError, match="corrupted"):
        Manifest.load(tmp_path)


# --- command line ------------------------------------------------------------------------------

def test_cli_dispatcher_lists_commands_and_rejects_unknown(capsys):
    from models.__main__ import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err
    assert main(["build-db", "--help"]) == 0  # a command's main(argv) returns its exit code, never exits
    assert "--corpus" in capsys.readouterr().out


def test_cli_build_reports_bad_corpus_clearly(tmp_path, capsys):
    from models.__main__ import main

    assert main(["build-db", "--corpus", str(tmp_path / "missing"), "--out", str(tmp_path / "db")]) == 2
    err = capsys.readouterr().err  # a bad argument: exit 2, one line naming it, before any work
    assert "error: argument --corpus:" in err and "does not exist" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "db").exists()


# --- section alignment ------------------------------------------------------------------------

def test_split_sections_cuts_before_headings_and_after_them_losslessly():
    text = ("Intro line\n\nTitle\n*****\n\nBody of the first section.\nMore.\n\n"
            "Second\n======\nBody two.\n# Markdown heading\nBody three\n")
    pieces = corpus_mod.split_sections(text)
    assert "".join(pieces) == text
    assert pieces == ["Intro line\n\n", "Title\n*****\n\n", "Body of the first section.\nMore.\n\n",
                      "Second\n======\n", "Body two.\n", "# Markdown heading\n", "Body three\n"]
    assert corpus_mod.split_sections("no heading\nat all\n") == ["no heading\nat all\n"]
    assert corpus_mod.split_sections("") == [""]
    # an underline alone, or a rule between two rules, is not a heading
    assert corpus_mod.split_sections("-----\n=====\n") == ["-----\n=====\n"]


def test_align_sections_chunks_a_shared_section_identically_in_both_documents(tmp_path):
    import pydoc_data.topics as t

    shared = t.topics["if"]  # "The "if" statement\n****...\n\n<body>"
    head, body = corpus_mod.split_sections(shared)
    other = list(_topics(6, chars=3000).values())
    # the same section at two different offsets of two documents
    records = [{"id": "a", "text": other[0][:1234] + "\n\n" + shared},
               {"id": "b", "text": other[1][:777] + "\n\n" + shared + "\n\n" + other[2][:500]}]
    records += [{"id": f"c{i}", "text": x} for i, x in enumerate(other[3:])]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    m = 16
    db = build_database(tmp_path / "db", path, vocab_size=400, chunk_size=m, eval_fraction=0.0, stop_after="chunk",
                        align_sections=True, runtime={"progress": False}, log=lambda _: None)
    tok = load_tokenizer(db / "tokenizer.json")
    pad = tok.token_to_id("<|pad|>")
    tokens = np.fromfile(db / "tokens.bin", dtype=np.dtype(Manifest.load(db).info("tokenize")["dtype"]))
    offsets = np.load(db / "doc_offsets.npy")
    body_ids = np.asarray(tok.encode(body, add_special_tokens=False).ids)

    def body_start(d):
        ids = tokens[offsets[d]:offsets[d + 1]]
        hits = [i for i in range(ids.size - body_ids.size + 1) if (ids[i:i + body_ids.size] == body_ids).all()]
        assert len(hits) == 1
        return hits[0]

    sa, sb = body_start(0), body_start(1)
    assert sa % m == 0 and sb % m == 0  # the body starts a chunk in both documents ...
    assert sa != sb  # ... although it sits at different places in them
    assert (tokens[offsets[0]:offsets[1]] == pad).any()  # padding before it
    text = tok.decode(tokens[offsets[0]:offsets[1]].tolist(), skip_special_tokens=True)
    assert text == records[0]["text"]  # padding aside, the document is unchanged
    # without alignment: the same tokens as encoding the whole text
    plain = build_database(tmp_path / "plain", path, vocab_size=400, chunk_size=m, eval_fraction=0.0,
                           stop_after="tokenize", runtime={"progress": False}, log=lambda _: None)
    plain_tokens = np.fromfile(plain / "tokens.bin", dtype=tokens.dtype)
    assert not (plain_tokens == pad).any()


def test_max_distance_config_is_checked():
    from models.retrieval.config import make_config

    assert make_config(max_distance=2.0)["max_distance"] == 2.0 and make_config()["max_distance"] is None
    for bad in (-1.0, "2", True, float("nan")):
        with pytest.raises(ValueError, match="max_distance"):
            make_config(max_distance=bad)


def test_brought_in_embeddings_are_checked_before_they_are_used(tmp_path):
    from models.retrieval.build_index import check_embeddings

    np.save(tmp_path / "a.npy", np.ones((10, 4), np.float16))
    np.save(tmp_path / "b.npy", np.ones((5, 4), np.float32))
    check_embeddings(tmp_path, 4, 15)  # a folder of parts, in name order
    for bad in (np.nan, np.inf, 1e6):  # 1e6: beyond float16, which the database stores
        np.save(tmp_path / "b.npy", np.full((5, 4), bad, np.float32))
        with pytest.raises(ValueError, match="^embeddings: .*b.npy has values that are not finite float16"):
            check_embeddings(tmp_path, 4)
    with pytest.raises(ValueError, match="holds 10 vectors, the chunk table has 11 chunks"):
        check_embeddings(tmp_path / "a.npy", 4, 11)
    with pytest.raises(ValueError, match=r"expected float16 or float32 of shape \(chunks, 8\)"):
        check_embeddings(tmp_path / "a.npy", 8)
    np.save(tmp_path / "c.npy", np.ones((3, 4), np.int64))
    with pytest.raises(ValueError, match="holds int64"):
        check_embeddings(tmp_path / "c.npy", 4)


def test_document_table_is_written_as_it_goes_and_read_back(tmp_path):
    """A continued piece extends the document before it; the tables are .npy files numpy reads (and maps),
    the names come back one or a block at a time; a failed tokenize leaves no table behind."""
    from types import SimpleNamespace

    from models.retrieval.doc_table import DocNames, DocumentTable

    sig = lambda *v: np.array(v, dtype=np.uint64)  # noqa: E731
    with DocumentTable(tmp_path, 2) as table:
        assert table.add(SimpleNamespace(doc_id="a", continued=False), 5, 10, sig(5, 5)) == 1
        assert table.add(SimpleNamespace(doc_id="a", continued=True), 3, 4, sig(1, 9)) == 0
        table.add(SimpleNamespace(doc_id="é/b", continued=False), 0, 0, sig(7, 7))
        table.add(SimpleNamespace(doc_id="c", continued=False), 2, 1, sig(2, 2))
    assert (table.num_docs, table.num_tokens, table.num_bytes, table.empty_docs) == (3, 10, 15, 1)
    assert np.load(tmp_path / "doc_offsets.npy").tolist() == [0, 8, 8, 10]
    assert load_npy(tmp_path / "doc_bytes.npy").tolist() == [14, 0, 1]
    assert np.load(tmp_path / "doc_signatures.npy").tolist() == [[1, 5], [7, 7], [2, 2]]
    names = DocNames(tmp_path)
    assert len(names) == 3 and list(names) == ["a", "é/b", "c"] and names[1] == "é/b" and names[-1] == "c"
    with pytest.raises(IndexError):
        names[3]
    with pytest.raises(ValueError, match="no documents"), DocumentTable(tmp_path / "failed", 2) as table:
        raise ValueError("no documents")
    assert list((tmp_path / "failed").iterdir()) == []


def test_read_rows_matches_indexing_the_memory_map(tmp_path):
    """Positional reads of a .npy's rows give what indexing it gives: repeats, any order, any id shape."""
    keys, docs = np.random.default_rng(0).random((500, 6), dtype=np.float32), np.arange(300, dtype=np.int64) * 7
    np.save(tmp_path / "keys.npy", keys), np.save(tmp_path / "docs.npy", docs)
    mapped, mapped_docs = load_npy(tmp_path / "keys.npy"), load_npy(tmp_path / "docs.npy")
    for ids in (np.array([7, 3, 3, 499, 0, 1, 2]), np.arange(40, 300), np.array([[5, 6], [480, 5]])):
        assert np.array_equal(read_rows(mapped, ids), keys[ids])
    assert np.array_equal(read_rows(mapped_docs, [299, 0, 1]), docs[[299, 0, 1]])
    assert np.array_equal(read_rows(mapped[10:], [0, 2]), keys[[10, 12]])  # a view of the map: indexed
    with pytest.raises(IndexError, match="row ids must lie in"):
        read_rows(mapped, [500])
