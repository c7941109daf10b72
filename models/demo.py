"""The end-to-end demo: RETROfitting a plain decoder lowers bits per byte on held-out documents.

    python -m models demo [--out runs/demo] [--quick] [--seeds N]

Corpus, database, per seed a plain decoder RETROfitted (the paper's protocol, section 4.4) and its bits
per byte three ways (the baseline = OFF, ON, ON with a database holding the held-out documents), a sample:
docs/model.md, "The demo", which lists what --out holds. --out is new, empty or a demo's own, locked
while the demo runs. Exit status 1 when RETROfit ON is not below the baseline on every seed (not with --quick).
"""
from __future__ import annotations

import collections
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import outdir, retrofit_train, train
from .atomic import atomic_file, temporaries
from .checkpoint import load_training_state
from .cli_common import SEED, Parser, UsageError, add_threads_flag, command, device, folder, integer
from .config import KERNELS
from .data import from_stream, neighbours_including, open_database, token_byte_lengths
from .evaluate import ALPHAS, bpb_by_overlap, chunk_fractions, evaluate, plot_overlap, text_table, write_report
from .generate import database_retriever, format_generation, generate
from .retrieval import build_database, python_docs_corpus
from .retrofit import load_retrofit, read_record
from .runtime import configure_threads, resolve_device

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


SETTINGS = ("baseline", "retrofit_on", "retrofit_on_with_eval_docs")
NAMES = {"baseline": "baseline (plain decoder = RETROfit OFF)",
         "retrofit_on": "RETROfit ON, database without the held-out documents",
         "retrofit_on_with_eval_docs": "RETROfit ON, database including them (copying ceiling)"}


def run_command(main, argv: list) -> None:
    """A `python -m models` command's main() on ``argv``; its exit status, unless 0, ends the demo (the
    command has said why, in one line)."""
    status = main([str(a) for a in argv])
    if status:
        raise SystemExit(status)


def seed_folders(out: Path, seed: int) -> tuple[Path, Path]:
    """The baseline's checkpoint folder and the retrofit's folder of one seed."""
    return out / f"baseline-seed{seed}", out / f"retrofit-seed{seed}"


def check_seed_folders(out: Path, seeds) -> None:
    """Refuse (OutputFolderError, exit 2), before any work, a seed's folder that the demo may not replace.

    A demo replaces a baseline run of `train` and a retrofit of its own there, never anything else.
    """
    for seed in seeds:
        base_dir, rf_dir = seed_folders(out, seed)
        train.check_out(train.TrainArgs(out=str(base_dir), overwrite=True))
        retrofit_train.check_out(rf_dir, overwrite=True)


def evaluate_three(model, data, leaky, byte_lengths, device) -> dict:
    """bpb of the three settings on the held-out documents, and the overlap curve of each."""
    results = {"baseline": evaluate(model, data, byte_lengths, retrieval=False, device=device),
               "retrofit_on": evaluate(model, data, byte_lengths, retrieval=True, device=device),
               "retrofit_on_with_eval_docs": evaluate(model, leaky, byte_lengths, retrieval=True, device=device)}
    # One x axis for all three: each chunk's overlap with the database neighbours RETROfit ON reads.
    overlap = results["retrofit_on"]["_per_chunk"]["overlap"]
    curves = {"alpha": ALPHAS, "chunk_fraction": chunk_fractions(overlap)}
    for name in SETTINGS:
        per_chunk = results[name]["_per_chunk"]
        curves[name] = bpb_by_overlap(overlap, per_chunk["nll"], per_chunk["bytes"])
    baseline = results["baseline"]
    return {"bpb": {k: results[k]["bpb"] for k in SETTINGS}, "gain": baseline["bpb"] - results["retrofit_on"]["bpb"],
            "documents": int(np.unique(data.doc).size), "chunks": len(data), "tokens": baseline["tokens"],
            "bytes": baseline["bytes"], "overlap": curves}


def spread(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def aggregate(per_seed: list) -> dict:
    """Mean and spread over seeds of each setting's bpb and of the gain (baseline - retrofit_on)."""
    out = {k: spread([s["bpb"][k] for s in per_seed]) for k in SETTINGS}
    out["gain"] = spread([s["gain"] for s in per_seed])
    out["seeds_with_gain"] = sum(s["gain"] > 0 for s in per_seed)
    return out


def table(per_seed: list, summary: dict) -> str:
    """Per seed and (with several seeds) mean +- std: the three settings and the gain."""
    head = ["seed", "baseline (OFF)", "RETROfit ON", "ON incl. held-out", "gain (OFF - ON)"]
    rows = [[str(s["seed"]), *(f"{s['bpb'][k]:.4f}" for k in SETTINGS), f"{s['gain']:+.4f}"] for s in per_seed]
    if len(per_seed) > 1:
        rows.append(["mean +- std", *(f"{summary[k]['mean']:.4f} +- {summary[k]['std']:.4f}" for k in SETTINGS),
                     f"{summary['gain']['mean']:+.4f} +- {summary['gain']['std']:.4f}"])
    return text_table(head, rows)


def run_seed(db, eval_data, leaky, byte_lengths, p, seed, out, args, device, say) -> dict:
    """One seed of the protocol: a plain decoder (`models train --no-retrieval`), RETROfitted (`models retrofit`),
    each replacing only its own run in its seed folder; three evaluations. The numbers and the model."""
    common = ["--db", db.root, "--overwrite", "--seq-len", p["seq_len"], "--batch-size", p["batch_size"],
              "--eval-every", p["eval_every"], "--seed", seed, "--kernels", args.kernels, "--device", device,
              *(["--no-progress"] if args.no_progress else [])]
    base_dir, rf_dir = seed_folders(out, seed)
    t0 = time.perf_counter()
    say(f"seed {seed}: training the baseline, a plain decoder, for {p['steps']} steps")
    run_command(train.main, ["--out", base_dir, "--no-retrieval", "--d-model", p["d_model"], "--layers", p["layers"],
                             "--heads", p["heads"], "--dropout", p["dropout"], "--steps", p["steps"], "--lr", p["lr"],
                             "--warmup", p["warmup"], *common])
    t1 = time.perf_counter()
    say(f"seed {seed}: RETROfitting it: frozen, CCA after layers {p['cca_layers']}, {p['retrofit_steps']} steps")
    run_command(retrofit_train.main, [
        "--base", base_dir, "--out", rf_dir, "--cca-layers", ",".join(map(str, p["cca_layers"])), "--encoder-layers",
        p["encoder_layers"], "--encoder-ff-mult", p["encoder_ff_mult"], "--neighbours", p["k"], "--steps",
        p["retrofit_steps"], "--lr", p["retrofit_lr"], "--warmup", p["retrofit_warmup"], "--threads",
        torch.get_num_threads(), *common])
    record, model = read_record(rf_dir), load_retrofit(rf_dir, device=device)
    t2 = time.perf_counter()
    result = evaluate_three(model, eval_data, leaky, byte_lengths, device)
    times = {"baseline": t1 - t0, "retrofit": t2 - t1, "evaluation": time.perf_counter() - t2}
    say(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in result["bpb"].items())
        + f" ({times['baseline']:.0f}s + {times['retrofit']:.0f}s + {times['evaluation']:.0f}s)")
    history = {"baseline": load_training_state(base_dir, restore_rng=False)["history"], "retrofit": record["history"]}
    result.update(seed=seed, trainable=record["trainable"], seconds=times, history=history,
                  checkpoints={"baseline": str(base_dir), "retrofit": str(rf_dir)})
    return {"result": result, "model": model}


def write_outputs(out: Path, per_seed: list, summary: dict, meta: dict, quick: bool) -> str:
    """results.json and summary.md; returns the verdict line."""
    seeds = [s["seed"] for s in per_seed]
    share, held_out = per_seed[0]["trainable"], {k: per_seed[0][k] for k in ("documents", "chunks", "bytes")}
    report = {**meta, "protocol": "retrofit", "seeds": seeds, "bpb": {k: summary[k]["mean"] for k in SETTINGS},
              "spread": summary, "overlap": per_seed[0]["overlap"], "trainable": share, "held_out": held_out,
              "per_seed": per_seed, "load_average": os.getloadavg()}
    write_report(out / "results.json", report, kind="demo-results")
    target = summary["seeds_with_gain"] == len(seeds) and summary["gain"]["mean"] >= 2 * summary["gain"]["std"]
    verdict = (f"RETROfit ON below the baseline on {summary['seeds_with_gain']} of {len(seeds)} seed(s); "
               f"mean gain {summary['gain']['mean']:+.4f} bpb"
               + (f", seed spread (std) {summary['gain']['std']:.4f}: the gain is "
                  f"{'at least' if target else 'LESS than'} twice the spread" if len(seeds) > 1 else "") + ".")
    if quick:
        verdict += (" --quick is a smoke run of the same path (a tiny corpus with almost no shared sections, so "
                    "ON is about OFF): it reports without the exit-status rule; run the full demo for the claim.")
    times = meta["seconds"]
    tab = table(per_seed, summary)
    lines = [f"# RETROfit demo ({meta['preset']}, seeds {seeds})", "",
             f"held-out documents: {held_out['documents']} ({held_out['bytes']} bytes predicted); bits per byte:",
             "", "```", tab, "```", "", *(f"- {NAMES[k]}" for k in SETTINGS), "", verdict, "",
             f"trainable: {share['trainable']:,} added parameters, {100 * share['share']:.1f}% of all "
             f"({share['base']:,} frozen in the baseline)", "",
             f"wall time: {times['total']:.0f}s (database {times['database']:.0f}s + "
             f"{times['database_with_eval_docs']:.0f}s with the held-out chunks; "
             + "; ".join(f"seed {s['seed']}: baseline {s['seconds']['baseline']:.0f}s, retrofit "
                         f"{s['seconds']['retrofit']:.0f}s, evaluation {s['seconds']['evaluation']:.0f}s"
                         for s in per_seed)
             + f"; generation {times['generation']:.0f}s), {meta['threads']} thread(s), load average "
               f"{report['load_average'][0]:.1f}", ""]
    with atomic_file(out / "summary.md") as tmp:
        tmp.write_text("\n".join(lines))
    print(f"\n{tab}")
    return verdict


def demo_corpus(path: Path, corpus_bytes: int | None, max_doc_bytes: int | None) -> dict:
    """Write the language-reference topics of Python's documentation as JSONL.

    corpus_bytes: stop once this many bytes are written (None: every topic);
    max_doc_bytes: cut each topic at this many bytes (None: whole).
    """
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
    p = Parser("python -m models demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=folder, default="runs/demo", help="folder for everything the demo makes")
    p.add_argument("--quick", action="store_true", help="the same path, smaller (CI: under 2 minutes)")
    p.add_argument("--steps", type=train.LIMITS["steps"], default=None, help="override the preset's training steps")
    p.add_argument("--kernels", choices=KERNELS, default="auto")
    p.add_argument("--device", type=device, default="auto")
    p.add_argument("--seed", type=SEED, default=0, help="the first seed")
    p.add_argument("--seeds", type=integer(1, 100), default=1,
                   help="run this many seeds (seed, seed+1, ...): mean and spread")
    p.add_argument("--retrofit-steps", type=train.LIMITS["steps"], default=None,
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
    curves = per_seed[0]["overlap"]
    plot_overlap({NAMES[k]: (curves[k], dict(marker="o", color=f"C{i}")) for i, k in enumerate(SETTINGS)},
                 out / "overlap.png", f"held-out bpb by chunk overlap (seed {seeds[0]})")
    t = time.perf_counter()
    sample_text = write_sample(out, runs[0]["model"], data["db"], data["eval"], preset, seeds[0], device)  # 5.
    times["generation"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_start
    summary = aggregate(per_seed)
    verdict = write_outputs(out, per_seed, summary, {"preset": "quick" if args.quick else "full",
                            "corpus": data["corpus"], "preset_values": preset, "seconds": times,
                            "threads": threads}, args.quick)
    print(f"\n{sample_text}\n\n{verdict}\nwall time {times['total']:.0f}s; everything is in {out}/")
    # --quick is a smoke run of the same path; the claim is the full demo's
    return 0 if args.quick or summary["seeds_with_gain"] == len(seeds) else 1


def prepare_data(out: Path, preset: dict, args, times: dict, say) -> dict:
    """The corpus, the database, its training and held-out streams, and the held-out stream's neighbours
    from a database that also holds the held-out documents (the copying ceiling)."""
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
