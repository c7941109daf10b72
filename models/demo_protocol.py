"""The demo's protocol (RETRO paper, section 4.4): a plain decoder, RETROfitted, against itself.

For each seed: train a plain decoder on the training documents (the
baseline: `python -m models train --no-retrieval`), freeze it, add CCA and
the neighbour encoder and train only those (`python -m models retrofit`),
and measure bits per byte on the held-out documents three
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


def run_command(main, argv: list) -> None:
    """A `python -m models` command's main() on ``argv``; its exit status, unless 0, ends the demo (the
    command has said why, in one line)."""
    status = main([str(a) for a in argv])
    if status:
        raise SystemExit(status)


def train_baseline(db_dir: Path, preset, seed, out: Path, common: list) -> list:
    """A plain decoder: `python -m models train --no-retrieval` (replacing only its own run in `out`);
    its history."""
    from .checkpoint import load_training_state
    from .train import main

    p = preset
    run_command(main, ["--db", db_dir, "--out", out, "--overwrite", "--no-retrieval", "--d-model", p["d_model"],
                       "--layers", p["layers"], "--heads", p["heads"], "--dropout", p["dropout"], "--steps", p["steps"],
                       "--lr", p["lr"], "--warmup", p["warmup"], *common])
    return load_training_state(out, restore_rng=False)["history"]


def retrofit_baseline(base_dir: Path, db_dir: Path, preset, seed, out: Path, common: list, device):
    """`python -m models retrofit --overwrite` on the baseline (replacing only its own two files in `out`);
    the retrofit, its history and its trainable share."""
    from .retrofit import load_retrofit, read_record
    from .retrofit_train import main

    p = preset
    run_command(main, ["--base", base_dir, "--db", db_dir, "--out", out, "--overwrite", "--cca-layers",
                       ",".join(map(str, p["cca_layers"])), "--encoder-layers", p["encoder_layers"],
                       "--encoder-ff-mult", p["encoder_ff_mult"], "--neighbours", p["k"], "--steps",
                       p["retrofit_steps"], "--lr", p["retrofit_lr"], "--warmup", p["retrofit_warmup"],
                       "--threads", torch.get_num_threads(), *common])
    record = read_record(out)
    return load_retrofit(out, device=device), record["history"], record["trainable"]


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
    from .evaluate import text_table

    return text_table(head, rows)


def run_seed(db, eval_data, leaky, byte_lengths, preset, seed, out, args, device, say) -> dict:
    """One seed of the protocol: baseline, retrofit, three evaluations; returns the numbers and the model."""
    common = ["--seq-len", preset["seq_len"], "--batch-size", preset["batch_size"], "--eval-every",
              preset["eval_every"], "--seed", seed, "--kernels", args.kernels, "--device", device,
              *(["--no-progress"] if args.no_progress else [])]
    times = {}
    t = time.perf_counter()
    base_dir, rf_dir = seed_folders(out, seed)
    say(f"seed {seed}: training the baseline, a plain decoder, for {preset['steps']} steps")
    base_history = train_baseline(db.root, preset, seed, base_dir, common)
    times["baseline"] = time.perf_counter() - t
    t = time.perf_counter()
    say(f"seed {seed}: RETROfitting it: frozen, CCA after layers {preset['cca_layers']}, "
        f"{preset['retrofit_steps']} steps")
    model, rf_history, share = retrofit_baseline(base_dir, db.root, preset, seed, rf_dir, common, device)
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
