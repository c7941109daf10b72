"""The demo's protocol (RETRO paper, section 4.4): a plain decoder, RETROfitted, against itself.

For each seed: train a plain decoder on the training documents (the
baseline), freeze it, add CCA and the neighbour encoder (`models.retrofit`),
train only those, and measure bits per byte on the held-out documents three
ways: the baseline (= RETROfit OFF: the same frozen weights, no neighbours),
RETROfit ON (the database, which does not hold them), and ON with a database
that also holds them (every chunk finds itself: the copying ceiling). Any
gain ON is a gain over the decoder it started from.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_file

SETTINGS = ("baseline", "retrofit_on", "retrofit_on_with_eval_docs")
NAMES = {"baseline": "baseline (plain decoder = RETROfit OFF)",
         "retrofit_on": "RETROfit ON, database without the held-out documents",
         "retrofit_on_with_eval_docs": "RETROfit ON, database including them (copying ceiling)"}


def train_baseline(db, train_data, eval_data, preset, seed, out: Path, kernels, device, progress, log):
    """A plain decoder (no CCA, no encoder), trained as `python -m models train --no-retrieval` would."""
    from .config import RetroConfig
    from .data import token_byte_lengths
    from .train import TrainArgs, train

    cfg = RetroConfig(
        vocab_size=db.vocab_size, d_model=preset["d_model"], n_layers=preset["layers"], n_heads=preset["heads"],
        seq_len=preset["seq_len"], chunk_size=db.chunk_size, retrieval=False, dropout=preset["dropout"],
        kernels=kernels, extra={"db_fingerprint": db.fingerprint, "tokenizer_fingerprint": db.tokenizer_fingerprint})
    args = TrainArgs(out=str(out), steps=preset["steps"], batch_size=preset["batch_size"], lr=preset["lr"],
                     warmup=preset["warmup"], eval_every=preset["eval_every"], eval_sequences=32, seed=seed,
                     device=str(device), progress=progress,
                     overwrite=True)  # a fresh baseline each time; train replaces only its own run there
    result = train(cfg, train_data, args, eval_data, token_byte_lengths(db.tokenizer), log=log)
    return result["model"].eval(), result["history"], args


def retrofit_baseline(base, base_dir: Path, db, train_data, eval_data, preset, seed, out: Path, kernels, device,
                      progress, log):
    """Freeze `base`, add retrieval, train the added weights; saved in `out` (the base is only referenced),
    a folder claimed as `python -m models retrofit --overwrite` would (its marker, its lock, its two files)."""
    from .data import token_byte_lengths
    from .retrofit import base_fingerprint, retrofit
    from .retrofit_train import claimed_out, fit_and_save
    from .train import TrainArgs

    torch.manual_seed(seed)
    model = retrofit(base, chunk_size=db.chunk_size, cca_layers=preset["cca_layers"],
                     encoder_layers=preset["encoder_layers"], num_neighbours=preset["k"],
                     neighbour_len=db.neighbour_len, seq_len=preset["seq_len"],
                     encoder_ff_mult=preset["encoder_ff_mult"], kernels=kernels,
                     extra={"db_fingerprint": db.fingerprint, "tokenizer_fingerprint": db.tokenizer_fingerprint})
    args = TrainArgs(out=str(out), steps=preset["retrofit_steps"], batch_size=preset["batch_size"],
                     lr=preset["retrofit_lr"], warmup=preset["retrofit_warmup"], retrieval_dropout=0.0,
                     eval_every=preset["eval_every"], eval_sequences=32, seed=seed, device=str(device),
                     progress=progress, overwrite=True)  # a fresh retrofit each time
    source = {"kind": "models", "path": str(base_dir.resolve()), "sha256": base_fingerprint(base_dir, "models")}
    with claimed_out(out, args.overwrite):
        history, share = fit_and_save(model, train_data, args, source, eval_data, token_byte_lengths(db.tokenizer),
                                      log)
    return model.eval(), history, share, args


def seed_folders(out: Path, seed: int) -> tuple[Path, Path]:
    """The baseline's checkpoint folder and the retrofit's folder of one seed."""
    return out / f"baseline-seed{seed}", out / f"retrofit-seed{seed}"


def check_seed_folders(out: Path, seeds) -> None:
    """Refuse (OutputFolderError, exit 2), before any work, a seed's folder that the demo may not replace.

    A demo replaces a baseline run of `train` and a retrofit of its own there, never anything else.
    """
    from . import retrofit_train, train

    for seed in seeds:
        base_dir, rf_dir = seed_folders(out, seed)
        train.check_out(train.TrainArgs(out=str(base_dir), overwrite=True))
        retrofit_train.check_out(rf_dir, overwrite=True)


def evaluate_three(model, data, leaky, byte_lengths, device) -> dict:
    """bpb of the three settings on the held-out documents, and the overlap curve of each."""
    from .evaluate import ALPHAS, bpb_by_overlap, chunk_fractions, evaluate

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


def plot_curves(curves: dict, path: Path, title: str) -> None:
    from .evaluate import plot_overlap

    plot_overlap({NAMES[k]: (curves[k], dict(marker="o", color=f"C{i}")) for i, k in enumerate(SETTINGS)}, path, title)


def table(per_seed: list, summary: dict) -> str:
    """Per seed and (with several seeds) mean +- std: the three settings and the gain."""
    head = ["seed", "baseline (OFF)", "RETROfit ON", "ON incl. held-out", "gain (OFF - ON)"]
    rows = [[str(s["seed"]), *(f"{s['bpb'][k]:.4f}" for k in SETTINGS), f"{s['gain']:+.4f}"] for s in per_seed]
    if len(per_seed) > 1:
        rows.append(["mean +- std", *(f"{summary[k]['mean']:.4f} +- {summary[k]['std']:.4f}" for k in SETTINGS),
                     f"{summary['gain']['mean']:+.4f} +- {summary['gain']['std']:.4f}"])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_seed(db, train_data, eval_data, leaky, byte_lengths, preset, seed, out, args, device, say) -> dict:
    """One seed of the protocol: baseline, retrofit, three evaluations; returns the numbers and the model."""
    progress = not args.no_progress
    times = {}
    t = time.perf_counter()
    base_dir, rf_dir = seed_folders(out, seed)
    say(f"seed {seed}: training the baseline, a plain decoder, for {preset['steps']} steps")
    base, base_history, _ = train_baseline(db, train_data, eval_data, preset, seed, base_dir, args.kernels, device,
                                           progress, say)
    times["baseline"] = time.perf_counter() - t
    t = time.perf_counter()
    say(f"seed {seed}: RETROfitting it: frozen, CCA after layers {preset['cca_layers']}, "
        f"{preset['retrofit_steps']} steps")
    model, rf_history, share, _ = retrofit_baseline(base, base_dir, db, train_data, eval_data, preset, seed, rf_dir,
                                                    args.kernels, device, progress, say)
    times["retrofit"] = time.perf_counter() - t
    t = time.perf_counter()
    result = evaluate_three(model, eval_data, leaky, byte_lengths, device)
    times["evaluation"] = time.perf_counter() - t
    say(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in result["bpb"].items())
        + f" ({times['baseline']:.0f}s + {times['retrofit']:.0f}s + {times['evaluation']:.0f}s)")
    result.update(seed=seed, trainable=share, seconds=times, checkpoints={"baseline": str(base_dir),
                  "retrofit": str(rf_dir)}, history={"baseline": base_history, "retrofit": rf_history})
    return {"result": result, "model": model}


def write_outputs(out: Path, per_seed: list, summary: dict, meta: dict, quick: bool) -> str:
    """results.json and summary.md; returns the verdict line."""
    from .evaluate import write_report

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
