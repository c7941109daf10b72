"""The end-to-end demo: RETROfitting a plain decoder lowers bits per byte on held-out documents.

    python -m models demo [--out runs/demo] [--quick]

1. Corpus: the language-reference topics of Python's own documentation, whole.
2. The retrieval database (held-out documents not in it), with section
   alignment and a relevance cut (``max_distance``).
3. Per seed, the paper's retrofitting protocol (`models.demo_protocol`): a
   plain decoder (the baseline), frozen, with CCA and the encoder trained.
4. Bits per byte on the held-out documents: the baseline (= RETROfit OFF),
   RETROfit ON, and ON with a database that also holds them (the copying
   ceiling); with `--seeds N`, mean and spread.
5. A sample continuing a held-out document's opening, with its neighbours.

Everything goes to one folder (--out; docs/model.md, "The demo", lists it),
new, empty or a demo's own, locked while the demo runs. Exit status 1 when
RETROfit ON is not below the baseline on every seed (not with --quick).
"""
from __future__ import annotations

import collections
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import outdir
from .atomic import atomic_file, temporaries
from .cli_common import command

# Two presets: the same path, different sizes. On a 2-core CPU the MiniLM
# embedding of the database (~30-40 chunks/s) and training (~0.3-0.5 s per step)
# set the sizes: a few thousand chunks and a few hundred steps fit in 10 minutes.
# max_distance: squared L2 between MiniLM chunk keys; on this corpus unrelated
# chunks are 5-15 apart and a shared section's chunks 0 (identical text).
FULL = dict(corpus_bytes=None, max_doc_bytes=None, vocab_size=2048, chunk_size=32, eval_fraction=0.25,
            max_distance=2.0, d_model=128, layers=4, heads=4, seq_len=128, dropout=0.1, steps=450, batch_size=8,
            lr=4e-3, warmup=30, eval_every=150, sample_tokens=96, cca_layers=[2, 4], encoder_layers=2,
            encoder_ff_mult=2, retrofit_steps=300, retrofit_lr=4e-3, retrofit_warmup=30)
PRESETS = {"full": FULL, "quick": dict(FULL, corpus_bytes=60_000, max_doc_bytes=3_000, vocab_size=1024, d_model=96,
                                       steps=60, warmup=10, eval_every=0, sample_tokens=40, retrofit_steps=40,
                                       retrofit_warmup=10)}
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
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        for row in chosen:
            f.write(json.dumps(row) + "\n")
    kinds = collections.Counter(r["id"].split(":")[0] for r in chosen)
    return {"documents": len(chosen), "bytes": total, "kinds": dict(kinds)}


# What a killed run leaves in the demo's folder (models.atomic's temporaries of its files).
TEMPORARIES = temporaries("corpus.jsonl", "overlap.png", "results.json", "sample.txt", "summary.md")


@command("demo")
def main(argv=None) -> int:
    from .cli_common import SEED, Parser, UsageError, add_threads_flag, device, folder, integer
    from .config import KERNELS
    from .demo_protocol import check_seed_folders
    from .train import LIMITS

    p = Parser("python -m models demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=folder, default="runs/demo", help="folder for everything the demo makes")
    p.add_argument("--quick", action="store_true", help="the same path, smaller (CI: under 2 minutes)")
    p.add_argument("--steps", type=LIMITS["steps"], default=None, help="override the preset's training steps")
    p.add_argument("--kernels", choices=KERNELS, default="auto")
    p.add_argument("--device", type=device, default="auto")
    p.add_argument("--seed", type=SEED, default=0, help="the first seed")
    p.add_argument("--seeds", type=integer(1, 100), default=1,
                   help="run this many seeds (seed, seed+1, ...): mean and spread")
    p.add_argument("--retrofit-steps", type=LIMITS["steps"], default=None,
                   help="override the preset's retrofit steps")
    add_threads_flag(p)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    last_seed = args.seed + args.seeds - 1
    if last_seed >= 2**32:
        raise UsageError(f"--seed {args.seed} --seeds {args.seeds}: the last seed ({last_seed}) must be < 2**32")
    outdir.check_folder(args.out, "demo")
    check_seed_folders(Path(args.out), range(args.seed, last_seed + 1))
    with outdir.claimed(args.out, "demo", temporaries=TEMPORARIES):
        return run(args)


def run(args) -> int:
    from .demo_protocol import aggregate, plot_curves, run_seed, write_outputs
    from .runtime import configure_threads, resolve_device

    preset = dict(PRESETS["quick" if args.quick else "full"], k=K)
    preset["steps"] = args.steps or preset["steps"]
    preset["retrofit_steps"] = args.retrofit_steps or preset["retrofit_steps"]
    out = Path(args.out)  # claimed by main(): new, empty or a demo's own, and locked
    device = resolve_device(args.device)
    threads = configure_threads(args.threads)
    t_start = time.perf_counter()
    times = {}

    def say(msg):
        print(f"[demo {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    say(f"{threads} CPU thread(s), load average {os.getloadavg()[0]:.1f}")
    data = prepare_data(out, preset, args, times, say)  # 1-2. corpus and database
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs = [run_seed(data["db"], data["eval"], data["leaky"], data["byte_lengths"], preset, seed,
                     out, args, device, say) for seed in seeds]  # 3-4. per seed: baseline, RETROfit, evaluation
    per_seed = [r["result"] for r in runs]
    plot_curves(per_seed[0]["overlap"], out / "overlap.png", f"held-out bpb by chunk overlap (seed {seeds[0]})")
    t = time.perf_counter()
    sample_text = write_sample(out, runs[0]["model"], data["db"], data["eval"], preset, seeds[0], device)  # 5.
    times["generation"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_start
    summary = aggregate(per_seed)
    verdict = write_outputs(out, per_seed, summary, {"preset": "quick" if args.quick else "full",
                            "corpus": data["corpus"], "preset_values": preset, "seconds": times,
                            "threads": threads}, args.quick)
    print(f"\n{sample_text}\n\n{verdict}\nwall time {times['total']:.0f}s; everything is in {out}/")
    if args.quick:  # a smoke run of the same path; the claim is the full demo's
        return 0
    return 0 if summary["seeds_with_gain"] == len(seeds) else 1


def prepare_data(out: Path, preset: dict, args, times: dict, say) -> dict:
    """The corpus, the database, its training and held-out streams, and the held-out stream's neighbours
    from a database that also holds the held-out documents (the copying ceiling)."""
    from .data import from_stream, neighbours_including, open_database, token_byte_lengths
    from .retrieval import build_database

    corpus = demo_corpus(out / "corpus.jsonl", preset["corpus_bytes"], preset["max_doc_bytes"])
    say(f"corpus: {corpus['documents']} documents of Python's documentation {corpus['kinds']}, "
        f"{corpus['bytes'] / 1e3:.0f} kB")
    t = time.perf_counter()
    build_database(out / "db", corpus=out / "corpus.jsonl", overwrite=True, vocab_size=preset["vocab_size"],
                   chunk_size=preset["chunk_size"], eval_fraction=preset["eval_fraction"], k=K, index_type="flat",
                   align_sections=True, max_distance=preset["max_distance"],
                   runtime={"progress": not args.no_progress}, log=lambda m: say(m))
    times["database"] = time.perf_counter() - t
    db = open_database(out / "db", chunk_size=preset["chunk_size"])
    train_data, eval_data = from_stream(db, "train", K), from_stream(db, "eval", K)
    t = time.perf_counter()
    leaky = neighbours_including(db, eval_data, K)
    times["database_with_eval_docs"] = time.perf_counter() - t
    say(f"database: {db.num_chunks} chunks of {db.chunk_size} tokens; training stream {len(train_data)} chunks, "
        f"held-out stream {len(eval_data)} chunks from {np.unique(eval_data.doc).size} documents "
        f"({times['database']:.0f}s, + {times['database_with_eval_docs']:.0f}s with the held-out chunks)")
    return {"corpus": corpus, "db": db, "train": train_data, "eval": eval_data, "leaky": leaky,
            "byte_lengths": token_byte_lengths(db.tokenizer)}


def write_sample(out: Path, model, db, eval_data, preset, seed, device) -> str:
    """A continuation of the opening of the held-out document whose first two chunks retrieve the most
    neighbours (chosen by the retrieval alone, not by the model), with what each chunk retrieved."""
    from .generate import database_retriever, format_generation, generate

    docs = np.unique(eval_data.doc)
    found = [int(eval_data.neighbour_mask[np.flatnonzero(eval_data.doc == d)[:2]].any(-1).sum()) for d in docs]
    doc = int(docs[int(np.argmax(found))])
    prompt = db.doc_tokens(doc)[: 2 * db.chunk_size].tolist()
    sample = generate(model, prompt, preset["sample_tokens"], database_retriever(db, K), temperature=0.7,
                      top_k=40, top_p=0.95, seed=seed, stop_ids=(db.eos_id,), device=device)
    text = (f"held-out document: {db.doc_names[doc]} (RETROfit of the seed-{seed} baseline)\n"
            + format_generation(db, sample))
    with atomic_file(out / "sample.txt") as tmp:
        tmp.write_text(text + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
