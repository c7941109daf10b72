"""Bits per byte with retrieval ON and OFF, and the chunk-overlap breakdown.

bpb = sum over predicted tokens of NLL (nats) / ln 2 / UTF-8 bytes of those tokens.
Every token of a document except its first is predicted, so this is the
DESIGN.md formula over the text the model predicts; it does not depend on the
tokenizer.

Overlap breakdown (RETRO paper, section 4.4): each evaluation chunk is
predicted with the neighbours retrieved for the chunk before it; its overlap is
the longest run of tokens it shares with any of them, divided by m
(`data.chunk_overlap`). bpb(alpha) is the bpb over the chunks with overlap <=
alpha, for alpha from 0 to 1: how much of the gain remains without copying.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .cli_common import command
from .data import IGNORE, ChunkedTokens, SequenceBatches, chunk_overlap
from .model import RetroModel
from .runtime import resolve_device

LABELS = {"on": "database without the held-out docs", "on_with_eval_docs": "database including them"}
ALPHAS = [round(a, 2) for a in np.linspace(0.0, 1.0, 11)]


@torch.no_grad()
def token_nll(model: RetroModel, data: ChunkedTokens, retrieval: bool, batch_size: int = 8,
              device="cpu", autocast: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """NLL (nats) of every token, aligned with data.tokens: (C, m) values and a (C, m) predicted mask."""
    model.eval()
    N = model.cfg.seq_len
    batches = SequenceBatches(data, N, batch_size=1, shuffle=False)
    C, m = data.tokens.shape
    pos_nll = np.zeros((C, m))
    pos_pred = np.zeros((C, m), dtype=bool)
    starts = batches.starts
    for i in range(0, len(starts), batch_size):
        b = batches.gather(starts[i : i + batch_size])
        tokens = b["tokens"].to(device)
        nb = b.get("neighbours") if retrieval else None
        mask = b.get("neighbour_mask") if retrieval else None
        if retrieval and nb is None:
            raise ValueError("retrieval=True but the evaluation data has no neighbours")
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(tokens, None if nb is None else nb.to(device), None if mask is None else mask.to(device))
        targets = b["targets"].to(device)
        nll = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), targets.clamp(min=0), reduction="none")
        nll = nll.masked_fill(targets == IGNORE, 0.0).cpu().numpy()
        rows = b["chunk_rows"].numpy()  # (B, S)
        inside = (starts[i : i + batch_size, None] + np.arange(rows.shape[1])[None, :]) < C
        S = rows.shape[1]
        nll = nll.reshape(-1, S, m)
        pred = (targets != IGNORE).cpu().numpy().reshape(-1, S, m)
        pos_nll[rows[inside]] = nll[inside]
        pos_pred[rows[inside]] = pred[inside]
    # Shift from "position that predicts" to "token predicted".
    tgt_nll = np.zeros(C * m)
    tgt_pred = np.zeros(C * m, dtype=bool)
    tgt_nll[1:] = pos_nll.reshape(-1)[:-1]
    tgt_pred[1:] = pos_pred.reshape(-1)[:-1]
    return tgt_nll.reshape(C, m), tgt_pred.reshape(C, m)


def bits_per_byte(nll: np.ndarray, predicted: np.ndarray, token_bytes: np.ndarray) -> float:
    n_bytes = token_bytes[predicted].sum()
    return float(nll[predicted].sum() / math.log(2) / n_bytes) if n_bytes else float("nan")


def evaluate(model: RetroModel, data: ChunkedTokens, byte_lengths: np.ndarray, *, retrieval: bool,
             batch_size: int = 8, device="cpu", overlap: bool = True) -> dict:
    """bpb on `data` (a set of documents); with retrieval, also bpb by chunk overlap.

    byte_lengths: (vocab,) UTF-8 bytes of each token id.
    """
    nll, pred = token_nll(model, data, retrieval, batch_size, device, autocast=torch.device(device).type == "cuda")
    tb = np.asarray(byte_lengths)[data.tokens]
    pred = pred & (tb > 0)  # special tokens (<|endoftext|>) have no bytes: not part of the text
    out = {
        "bpb": bits_per_byte(nll, pred, tb),
        "tokens": int(pred.sum()),
        "bytes": int(tb[pred].sum()),
        "nats_per_token": float(nll[pred].sum() / max(1, pred.sum())),
    }
    out["_per_chunk"] = {"overlap": np.zeros(len(data)), "nll": (nll * pred).sum(1), "bytes": (tb * pred).sum(1)}
    if overlap and retrieval and data.neighbours is not None:
        ov = chunk_overlap(data)
        rows = []
        for alpha in ALPHAS:
            keep = (ov <= alpha + 1e-9)[:, None] & pred
            rows.append({"alpha": alpha, "bpb": bits_per_byte(nll, keep, tb),
                         "chunk_fraction": float((ov <= alpha + 1e-9).mean())})
        out["overlap"] = rows
        out["_per_chunk"] = {"overlap": ov, "nll": (nll * pred).sum(1), "bytes": (tb * pred).sum(1)}
    return out


def overlap_rows(on: dict, off: dict) -> list[dict]:
    """bpb over the chunks with overlap <= alpha (overlap with the neighbours of `on`), ON and OFF."""
    rows = []
    pc_on, pc_off = on["_per_chunk"], off["_per_chunk"]
    for alpha in ALPHAS:
        keep = pc_on["overlap"] <= alpha + 1e-9
        b = pc_on["bytes"][keep].sum()
        rows.append({
            "alpha": alpha,
            "chunk_fraction": float(keep.mean()),
            "bpb_on": float(pc_on["nll"][keep].sum() / math.log(2) / b) if b else float("nan"),
            "bpb_off": float(pc_off["nll"][keep].sum() / math.log(2) / b) if b else float("nan"),
        })
    return rows


def plot_overlap(rows_by_name: dict, path: Path, title: str = "") -> None:
    """bpb vs the chunk-overlap threshold alpha: for each setting, ON (solid) and OFF (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, rows) in enumerate(rows_by_name.items()):
        color = f"C{i}"
        alphas = [r["alpha"] for r in rows]
        ax.plot(alphas, [r["bpb_on"] for r in rows], marker="o", color=color, label=f"{name}: retrieval ON")
        ax.plot(alphas, [r["bpb_off"] for r in rows], ls="--", color=color, label=f"{name}: same chunks, OFF")
    ax.set_xlabel("max chunk overlap with its neighbours (alpha)")
    ax.set_ylabel("bits per byte")
    ax.set_title(title or "bpb over evaluation chunks with overlap <= alpha")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path) -> None:
    """Write a matplotlib figure as a PNG atomically (``.<name>.XXXXXXXX.tmp.png``, then a rename) and close it."""
    import matplotlib.pyplot as plt

    from .atomic import atomic_file

    try:
        with atomic_file(path, suffix=".tmp.png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def public(result: dict) -> dict:
    """The JSON-serialisable part of an evaluate() result."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def write_report(path: Path, report: dict, plot: Optional[Path] = None, kind: str = "eval-report") -> None:
    """Write a JSON report that says it is ours (so a later run may replace it) and names its plot."""
    from .atomic import write_json_atomic
    from .outdir import report_kind

    report = {"kind": report_kind(kind), **report}
    if plot is not None:
        report["plot"] = str(Path(plot).resolve())
    write_json_atomic(Path(path), report)


def load_model(checkpoint, kernels: Optional[str] = None, device="cpu", allow_nonfinite: bool = False):
    """The model of a checkpoint or a retrofit folder, for inference; a CheckpointError if its weights hold
    NaN or inf."""
    from .checkpoint import load_checkpoint_model
    from .retrofit import is_retrofit, load_retrofit

    if is_retrofit(checkpoint):  # `python -m models retrofit` output: the base it names + the added weights
        return load_retrofit(checkpoint, kernels=kernels, device=device, allow_nonfinite=allow_nonfinite)
    return load_checkpoint_model(checkpoint, kernels, device, allow_nonfinite)


def check_tokenizer(cfg, db, log=print) -> None:
    """Refuse a database whose tokenizer is not the model's: its token ids would mean other text."""
    trained_with = cfg.extra.get("tokenizer_fingerprint")
    if trained_with is None:
        log("warning: the checkpoint does not record its tokenizer (written before tokenizer fingerprints); "
            "cannot check that the database's tokenizer is the one it was trained with")
    elif trained_with != db.tokenizer_fingerprint:
        raise ValueError(f"the database {str(db.root)!r} has another tokenizer ({db.tokenizer_fingerprint}) than the "
                         f"model was trained with ({trained_with}): its token ids would mean other text; use the "
                         f"training database, or one built with --tokenizer <that database>/tokenizer.json")


def check_finite_results(results: dict) -> None:
    """A ValueError if any bits-per-byte number is NaN or inf (eval never reports nan as a result)."""
    for name in ("off", "on", "on_with_eval_docs"):
        if name in results and not math.isfinite(results[name]["bpb"]):
            why = "no predicted bytes" if results[name]["bytes"] == 0 else "a non-finite loss"
            raise ValueError(f"bits per byte ({name}) is {results[name]['bpb']} ({why}); nothing is reported "
                             f"(--allow-nonfinite writes it anyway)")


def run_evaluation(model, db, with_eval_docs: bool, batch_size: int = 8, device="cpu", log=print) -> dict:
    """bpb on the database's held-out documents: OFF, ON, and ON with them in the database."""
    from .data import from_stream, neighbours_including, token_byte_lengths

    cfg = model.cfg
    check_tokenizer(cfg, db, log)
    fp = cfg.extra.get("db_fingerprint")
    if fp and fp != db.fingerprint:
        log(f"note: the model was trained with database {fp}, this one is {db.fingerprint} (same tokenizer)")
    if db.vocab_size != cfg.vocab_size or db.chunk_size != cfg.chunk_size:
        raise ValueError(f"the database (vocab {db.vocab_size}, m={db.chunk_size}) does not match the model "
                         f"(vocab {cfg.vocab_size}, m={cfg.chunk_size})")
    tb = token_byte_lengths(db.tokenizer)
    data = from_stream(db, "eval", cfg.num_neighbours if cfg.retrieval else None)
    results = {"documents": int(np.unique(data.doc).size), "chunks": len(data)}
    off = evaluate(model, data, tb, retrieval=False, batch_size=batch_size, device=device)
    results["off"] = off
    if cfg.retrieval:
        results["on"] = evaluate(model, data, tb, retrieval=True, batch_size=batch_size, device=device)
        results["on"]["overlap"] = overlap_rows(results["on"], off)
        if with_eval_docs:
            leaky = neighbours_including(db, data, cfg.num_neighbours)
            r = evaluate(model, leaky, tb, retrieval=True, batch_size=batch_size, device=device)
            r["overlap"] = overlap_rows(r, off)
            results["on_with_eval_docs"] = r
    return results


def summary(results: dict) -> dict:
    """JSON-ready results: the per-chunk arrays dropped."""
    return {k: public(v) if isinstance(v, dict) else v for k, v in results.items()}


def table(results: dict) -> str:
    rows = [("retrieval OFF", results["off"])]
    if "on" in results:
        rows.append(("retrieval ON, database without the held-out documents", results["on"]))
    if "on_with_eval_docs" in results:
        rows.append(("retrieval ON, database including them", results["on_with_eval_docs"]))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'setting'.ljust(width)}  bits/byte", f"{'-' * width}  ---------"]
    lines += [f"{name.ljust(width)}  {r['bpb']:.4f}" for name, r in rows]
    return "\n".join(lines)



@command("eval")
def main(argv=None) -> int:
    from . import outdir
    from .cli_common import Parser, database, device, integer, model_checkpoint, output_file
    from .config import KERNELS
    from .data import open_database

    p = Parser("python -m models eval", description="bits per byte on the held-out documents, retrieval ON and OFF")
    p.add_argument("--checkpoint", type=model_checkpoint, required=True,
                   help="a checkpoint, a training output directory, or a `models retrofit` output folder")
    p.add_argument("--db", type=database, required=True, help="the retrieval database (its 'eval' split is evaluated)")
    p.add_argument("--with-eval-docs", action="store_true",
                   help="also evaluate with the held-out documents added to the database (measures copying)")
    p.add_argument("--out", type=output_file, default=None, help="JSON results (default: <checkpoint>/eval.json)")
    p.add_argument("--plot", type=output_file, default=None,
                   help="PNG of bpb vs chunk overlap (default: beside the JSON)")
    p.add_argument("--batch-size", type=integer(1), default=8)
    p.add_argument("--kernels", choices=KERNELS, default=None)
    p.add_argument("--device", type=device, default="auto")
    p.add_argument("--allow-nonfinite", action="store_true", help="report NaN/inf results instead of failing")
    args = p.parse_args(argv)

    out = Path(args.out) if args.out else Path(output_file(str(Path(args.checkpoint) / "eval.json")))
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    outdir.check_own_file(out, "eval-report", "--out")
    outdir.check_own_file(plot, "eval-report", "--plot", named_by=out)
    device_ = resolve_device(args.device)
    model = load_model(args.checkpoint, args.kernels, device_, allow_nonfinite=args.allow_nonfinite)
    db = open_database(args.db, chunk_size=model.cfg.chunk_size)
    results = run_evaluation(model, db, args.with_eval_docs, args.batch_size, device_)
    if not args.allow_nonfinite:
        check_finite_results(results)
    curves = {LABELS[k]: results[k]["overlap"] for k in ("on", "on_with_eval_docs") if k in results}
    if curves:
        plot_overlap(curves, plot)
    write_report(out, summary(results), plot if curves else None)
    print(table(results))
    print(f"wrote {out}" + (f" and {plot}" if curves else ""))
    return 0
