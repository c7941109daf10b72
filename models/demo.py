"""The end-to-end demo: retrieval lowers bits per byte on held-out documents.

    python -m models demo [--out runs/demo] [--quick]

1. Corpus: the language-reference topics of Python's own documentation
   (``pydoc_data``, part of the database's default corpus, no download), whole.
   They are sections of one reference that quote each other (the "if" topic
   is also a section of "compound statements", "customization" a section of
   "special method names", ...): text a held-out topic shares with the others
   is what retrieval can bring back.
2. Builds the retrieval database (held-out documents are not in it), with
   section alignment (a section shared by two documents is chunked the same
   way in both) and a relevance cut (neighbours farther than ``max_distance``
   are dropped: a chunk retrieves text only when it has close matches).
3. Trains a small RETRO on the training documents, with same-document
   neighbours excluded and retrieval dropout (so retrieval OFF is a fair baseline).
4. Prints bits per byte on the held-out documents: retrieval OFF; ON with the
   database (which does not hold them); ON with a database that also holds them.
5. Samples a continuation of a held-out document's opening, with the
   neighbours retrieved for each chunk.

Everything goes to one folder (--out): corpus, database, checkpoints,
results.json, overlap.png, sample.txt, summary.md. Re-running reuses the
finished database build (resumable) but trains afresh.
"""
from __future__ import annotations

import collections
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import outdir
from .cli_common import command

# Two presets: the same path, different sizes. On a 2-core CPU the MiniLM
# embedding of the database (~30-40 chunks/s) and training (~0.3-0.5 s per step)
# set the sizes: a few thousand chunks and a few hundred steps fit in 10 minutes.
# max_distance: squared L2 between MiniLM chunk keys; on this corpus unrelated
# chunks are 5-15 apart and a shared section's chunks 0 (identical text).
PRESETS = {
    "full": dict(corpus_bytes=None, max_doc_bytes=None, vocab_size=2048, chunk_size=32, eval_fraction=0.25,
                 max_distance=2.0, d_model=128, layers=4, heads=4, seq_len=128, cca_start=2, cca_every=2,
                 encoder_ff_mult=2, dropout=0.1, retrieval_dropout=0.5, steps=450, batch_size=8, lr=4e-3,
                 warmup=30, eval_every=150, sample_tokens=96),
    "quick": dict(corpus_bytes=60_000, max_doc_bytes=3_000, vocab_size=1024, chunk_size=32, eval_fraction=0.25,
                  max_distance=2.0, d_model=96, layers=4, heads=4, seq_len=128, cca_start=2, cca_every=2,
                  encoder_ff_mult=2, dropout=0.1, retrieval_dropout=0.5, steps=60, batch_size=8, lr=4e-3,
                  warmup=10, eval_every=0, sample_tokens=40),
}
K = 2  # neighbours per chunk


def demo_corpus(path: Path, corpus_bytes: int | None, max_doc_bytes: int | None) -> dict:
    """Write the language-reference topics of Python's documentation as JSONL.

    corpus_bytes: stop once this many bytes are written (None: every topic);
    max_doc_bytes: cut each topic at this many bytes (None: whole).
    """
    from .retrieval import python_docs_corpus

    chosen, total = [], 0
    for doc in python_docs_corpus():
        if not doc.doc_id.startswith("topic:"):
            break  # the topics come first, then the modules' docstrings
        if corpus_bytes is not None and total >= corpus_bytes:
            break
        data = doc.text.encode("utf-8")
        text = data[:max_doc_bytes].decode("utf-8", errors="ignore") if max_doc_bytes else doc.text
        chosen.append({"id": doc.doc_id, "text": text})
        total += len(text.encode("utf-8"))
    from .retrieval.manifest import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for row in chosen:
            f.write(json.dumps(row) + "\n")
    kinds = collections.Counter(r["id"].split(":")[0] for r in chosen)
    return {"documents": len(chosen), "bytes": total, "kinds": dict(kinds)}


def is_old_demo_folder(path: Path) -> bool:
    """A finished demo from before output folders had markers (its results.json says so)."""
    try:
        report = json.loads((Path(path) / "results.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(report, dict) and {"preset", "corpus", "config", "results", "history"} <= set(report)


@command("demo")
def main(argv=None) -> int:
    from .cli_common import SEED, Parser, device, folder, integer
    from .config import KERNELS

    p = Parser("python -m models demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=folder, default="runs/demo", help="folder for everything the demo makes")
    p.add_argument("--quick", action="store_true", help="the same path, smaller (CI: under 2 minutes)")
    p.add_argument("--steps", type=integer(1), default=None, help="override the preset's training steps")
    p.add_argument("--kernels", choices=KERNELS, default="auto")
    p.add_argument("--device", type=device, default="auto")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--threads", type=integer(1, 4096), default=None,
                   help="torch CPU threads (default: all cores, or 1 when other processes keep them busy)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    outdir.check_folder(args.out, "demo", legacy=is_old_demo_folder)
    with outdir.claimed(args.out, "demo", legacy=is_old_demo_folder):
        return run(args)


def run(args) -> int:
    from .data import from_stream, open_database
    from .evaluate import LABELS, plot_overlap, run_evaluation, summary, table, write_report
    from .generate import database_retriever, generate, show
    from .retrieval import build_database
    from .train import TrainArgs, configure_threads, resolve_device, train
    from .config import RetroConfig

    preset = dict(PRESETS["quick" if args.quick else "full"])
    if args.steps:
        preset["steps"] = args.steps
    out = Path(args.out)  # claimed by main(): new, empty or a demo's own, and locked
    device = resolve_device(args.device)
    threads = configure_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    times = {}

    def say(msg):
        print(f"[demo {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    # 1-2. corpus and database -------------------------------------------------
    corpus = demo_corpus(out / "corpus.jsonl", preset["corpus_bytes"], preset["max_doc_bytes"])
    say(f"corpus: {corpus['documents']} documents of Python's documentation {corpus['kinds']}, "
        f"{corpus['bytes'] / 1e3:.0f} kB; {threads} CPU thread(s)")
    t = time.perf_counter()
    build_database(out / "db", corpus=out / "corpus.jsonl", overwrite=True, vocab_size=preset["vocab_size"],
                   chunk_size=preset["chunk_size"], eval_fraction=preset["eval_fraction"], k=K, index_type="flat",
                   align_sections=True, max_distance=preset["max_distance"],
                   runtime={"progress": not args.no_progress}, log=lambda m: say(m))
    times["database"] = time.perf_counter() - t
    db = open_database(out / "db", chunk_size=preset["chunk_size"])
    train_data = from_stream(db, "train", K)
    eval_data = from_stream(db, "eval", K)
    say(f"database: {db.num_chunks} chunks of {db.chunk_size} tokens; training stream {len(train_data)} chunks, "
        f"held-out stream {len(eval_data)} chunks from {np.unique(eval_data.doc).size} documents "
        f"({times['database']:.0f}s)")

    # 3. train -------------------------------------------------------------------
    cfg = RetroConfig(
        vocab_size=db.vocab_size, d_model=preset["d_model"], n_layers=preset["layers"], n_heads=preset["heads"],
        seq_len=preset["seq_len"], chunk_size=db.chunk_size, num_neighbours=K, neighbour_len=db.neighbour_len,
        cca_start_layer=preset["cca_start"], cca_every=preset["cca_every"], encoder_ff_mult=preset["encoder_ff_mult"],
        dropout=preset["dropout"], kernels=args.kernels,
        extra={"db_fingerprint": db.fingerprint, "tokenizer_fingerprint": db.tokenizer_fingerprint},
    )
    targs = TrainArgs(out=str(out / "model"), steps=preset["steps"], batch_size=preset["batch_size"],
                      lr=preset["lr"], warmup=preset["warmup"], eval_every=preset["eval_every"], eval_sequences=32,
                      retrieval_dropout=preset["retrieval_dropout"],
                      seed=args.seed, device=str(device), progress=not args.no_progress,
                      overwrite=True)  # a fresh run each time (the database is reused); train replaces only its own
    n_params = sum(p.numel() for p in __import__("models.model", fromlist=["RetroModel"]).RetroModel(cfg).parameters())
    say(f"training a RETRO of {n_params / 1e6:.2f}M parameters for {targs.steps} steps of "
        f"{targs.batch_size} x {cfg.seq_len} tokens (CCA in layers {[i + 1 for i in cfg.cca_layers]})")
    t = time.perf_counter()
    from .data import token_byte_lengths

    result = train(cfg, train_data, targs, eval_data, token_byte_lengths(db.tokenizer), log=say)
    times["training"] = time.perf_counter() - t
    model = result["model"].eval()

    # 4. evaluate ---------------------------------------------------------------
    t = time.perf_counter()
    results = run_evaluation(model, db, with_eval_docs=True, device=device, log=say)
    times["evaluation"] = time.perf_counter() - t
    plot_overlap({LABELS[k]: results[k]["overlap"] for k in ("on", "on_with_eval_docs")}, out / "overlap.png",
                 title="held-out bpb over chunks with overlap <= alpha")

    # 5. sample -------------------------------------------------------------------
    t = time.perf_counter()
    first_doc = int(eval_data.doc[0])
    doc_tokens = db.doc_tokens(first_doc)
    prompt = doc_tokens[: 2 * db.chunk_size].tolist()
    sample = generate(model, prompt, preset["sample_tokens"], database_retriever(db, K), temperature=0.7,
                      top_k=40, top_p=0.95, seed=args.seed, stop_ids=(db.eos_id,), device=device)
    sample_text = f"held-out document: {db.doc_names[first_doc]}\n" + show(db, sample)
    (out / "sample.txt").write_text(sample_text + "\n")
    times["generation"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_start

    report = {"preset": "quick" if args.quick else "full", "corpus": corpus, "config": cfg.to_dict(),
              "train_args": {k: v for k, v in vars(targs).items()}, "results": summary(results),
              "seconds": times, "history": result["history"]}
    write_report(out / "results.json", report, kind="demo-results")
    tab = table(results)
    summary_md = "\n".join([
        f"# RETRO demo ({report['preset']})", "",
        f"held-out documents: {results['documents']} ({results['on']['bytes']} bytes predicted)", "",
        "```", tab, "```", "",
        f"wall time: {times['total']:.0f}s (database {times['database']:.0f}s, training {times['training']:.0f}s, "
        f"evaluation {times['evaluation']:.0f}s, generation {times['generation']:.0f}s)", "",
    ])
    (out / "summary.md").write_text(summary_md)
    print()
    print(tab)
    print()
    print(sample_text)
    print()
    lowered = results["on"]["bpb"] < results["off"]["bpb"]
    print(f"retrieval {'lowers' if lowered else 'DOES NOT lower'} bits per byte on held-out documents: "
          f"{results['off']['bpb']:.4f} -> {results['on']['bpb']:.4f}"
          + (" (--quick is a smoke run of the same path: too small a corpus and too short a training "
             "to show it; run the full demo)" if args.quick else ""))
    print(f"wall time {times['total']:.0f}s; everything is in {out}/")
    if args.quick:  # a smoke run of the same path; the claim is the full demo's
        return 0
    return 0 if lowered else 1


if __name__ == "__main__":
    sys.exit(main())
