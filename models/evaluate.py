"""Bits per byte with retrieval ON and OFF, and the chunk-overlap breakdown; ``python -m models eval``.

bpb = NLL (nats) of the predicted tokens / ln 2 / their UTF-8 bytes (docs/spec.md#evaluation); bpb(alpha)
is the bpb over the chunks whose overlap with their neighbours is <= alpha (docs/model.md, "Evaluation").
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

LABELS = {"on": "database without the held-out documents", "on_with_eval_docs": "database including them"}
ALPHAS = [round(a, 2) for a in np.linspace(0.0, 1.0, 11)]


@torch.no_grad()
def token_nll(model: RetroModel, data: ChunkedTokens, retrieval: bool, batch_size: int = 8,
              device="cpu", autocast: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """NLL (nats) of every token, aligned with data.tokens: (C, m) values and a (C, m) predicted mask."""
    model.eval()
    batches = SequenceBatches(data, model.cfg.seq_len, batch_size=1, shuffle=False)
    C, m = data.tokens.shape
    pos_nll, pos_pred = np.zeros((C, m)), np.zeros((C, m), dtype=bool)
    starts = batches.starts
    for i in range(0, len(starts), batch_size):
        batch = batches.gather(starts[i : i + batch_size])
        nll, pred = _position_nll(model, batch, retrieval, device, autocast)
        rows = batch["chunk_rows"].numpy()  # (B, S)
        S = rows.shape[1]
        inside = (starts[i : i + batch_size, None] + np.arange(S)[None, :]) < C
        pos_nll[rows[inside]] = nll.reshape(-1, S, m)[inside]
        pos_pred[rows[inside]] = pred.reshape(-1, S, m)[inside]
    # Shift from "position that predicts" to "token predicted" (the stream's first token is never predicted).
    return tuple(np.concatenate([np.zeros(1, a.dtype), a.reshape(-1)[:-1]]).reshape(C, m) for a in (pos_nll, pos_pred))


def _position_nll(model, batch: dict, retrieval: bool, device, autocast: bool) -> tuple[np.ndarray, np.ndarray]:
    """(B, N) NLL of each position's next token (0 where there is none) and whether there is one."""
    neighbours = batch.get("neighbours") if retrieval else None
    mask = batch.get("neighbour_mask") if retrieval else None
    if retrieval and neighbours is None:
        raise ValueError("retrieval=True but the evaluation data has no neighbours")
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(batch["tokens"].to(device), None if neighbours is None else neighbours.to(device),
                       None if mask is None else mask.to(device))
    targets = batch["targets"].to(device)
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets.clamp(min=0), reduction="none")
    return nll.masked_fill(targets == IGNORE, 0.0).cpu().numpy(), (targets != IGNORE).cpu().numpy()


def bits_per_byte(nll: np.ndarray, predicted: np.ndarray, token_bytes: np.ndarray) -> float:
    """Bits per byte over the `predicted` entries (nan when they hold no byte)."""
    n_bytes = token_bytes[predicted].sum()
    return float(nll[predicted].sum() / math.log(2) / n_bytes) if n_bytes else float("nan")


def evaluate(model: RetroModel, data: ChunkedTokens, byte_lengths: np.ndarray, *, retrieval: bool,
             batch_size: int = 8, device="cpu") -> dict:
    """bpb on `data`, and per chunk (`_per_chunk`) its overlap with its neighbours, NLL and predicted bytes.
    byte_lengths: (vocab,) UTF-8 bytes of each token id."""
    nll, pred = token_nll(model, data, retrieval, batch_size, device, autocast=torch.device(device).type == "cuda")
    token_bytes = np.asarray(byte_lengths)[data.tokens]
    pred = pred & (token_bytes > 0)  # special tokens (<|endoftext|>) have no bytes: not part of the text
    overlap = chunk_overlap(data) if retrieval else np.zeros(len(data))
    return {"bpb": bits_per_byte(nll, pred, token_bytes), "tokens": int(pred.sum()),
            "bytes": int(token_bytes[pred].sum()), "nats_per_token": float(nll[pred].sum() / max(1, pred.sum())),
            "_per_chunk": {"overlap": overlap, "nll": (nll * pred).sum(1), "bytes": (token_bytes * pred).sum(1)}}


def chunk_fractions(overlap: np.ndarray) -> list[float]:
    """For each alpha of ALPHAS, the fraction of the chunks whose overlap is <= alpha."""
    return [float((overlap <= alpha + 1e-9).mean()) for alpha in ALPHAS]


def bpb_by_overlap(overlap: np.ndarray, nll: np.ndarray, token_bytes: np.ndarray) -> list[float]:
    """For each alpha of ALPHAS, bits per byte over the chunks whose overlap is <= alpha (nll, token_bytes:
    per chunk (C,) or per predicted token (C, m))."""
    nll, token_bytes = nll.reshape(len(overlap), -1).sum(1), token_bytes.reshape(len(overlap), -1).sum(1)
    return [bits_per_byte(nll, overlap <= alpha + 1e-9, token_bytes) for alpha in ALPHAS]


def overlap_rows(on: dict, off: dict) -> list[dict]:
    """bpb over the chunks with overlap <= alpha (overlap with the neighbours of `on`), ON and OFF."""
    overlap = on["_per_chunk"]["overlap"]
    bytes_ = on["_per_chunk"]["bytes"]
    return [{"alpha": alpha, "chunk_fraction": fraction, "bpb_on": bpb_on, "bpb_off": bpb_off}
            for alpha, fraction, bpb_on, bpb_off in zip(
                ALPHAS, chunk_fractions(overlap), bpb_by_overlap(overlap, on["_per_chunk"]["nll"], bytes_),
                bpb_by_overlap(overlap, off["_per_chunk"]["nll"], bytes_))]


def plot_overlap(curves: dict, path: Path, title: str) -> None:
    """A PNG (written atomically) of bits per byte over the chunks with overlap <= alpha, one line per
    {label: (bpb for each of ALPHAS, matplotlib line keywords)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_file

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, (values, style) in curves.items():
        ax.plot(ALPHAS, values, label=label, **style)
    ax.set(xlabel="max overlap of a chunk with its neighbours (alpha)", title=title,
           ylabel="bits per byte over chunks with overlap <= alpha")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def write_report(path: Path, report: dict, plot: Optional[Path] = None, kind: str = "eval-report") -> None:
    """Write a JSON report that says it is ours (so a later run may replace it) and names its plot."""
    from .atomic import write_json_atomic
    from .outdir import report_kind

    report = {"kind": report_kind(kind), **report}
    if plot is not None:
        report["plot"] = str(Path(plot).resolve())
    write_json_atomic(Path(path), report)


def load_model(checkpoint, kernels: Optional[str] = None, device="cpu", allow_nonfinite: bool = False):
    """The model of a checkpoint or a retrofit folder, for inference (NaN/inf weights: CheckpointError)."""
    from .checkpoint import load_checkpoint_model
    from .retrofit import is_retrofit, load_retrofit

    if is_retrofit(checkpoint):  # `python -m models retrofit` output: the base it names + the added weights
        return load_retrofit(checkpoint, kernels=kernels, device=device, allow_nonfinite=allow_nonfinite)
    return load_checkpoint_model(checkpoint, kernels, device, allow_nonfinite)


def model_argument(text: str) -> str:
    """argparse type: a checkpoint, a training output folder with latest.json, or a retrofit folder."""
    import argparse

    from .checkpoint import resolve
    from .errors import one_line
    from .retrofit import is_retrofit

    try:
        is_retrofit(text) or resolve(text)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(one_line(e)) from None
    return text


def check_fits(cfg, db) -> None:
    """Refuse a database whose tokens are not the model's: another tokenizer, vocabulary or chunk size."""
    trained_with = cfg.extra.get("tokenizer_fingerprint")
    if trained_with and trained_with != db.tokenizer_fingerprint:
        raise ValueError(f"the database {str(db.root)!r} has another tokenizer ({db.tokenizer_fingerprint}) than the "
                         f"model was trained with ({trained_with}): its token ids would mean other text; use the "
                         f"training database, or one built with --tokenizer <that database>/tokenizer.json")
    if db.vocab_size != cfg.vocab_size or db.chunk_size != cfg.chunk_size:
        raise ValueError(f"the database (vocab {db.vocab_size}, m={db.chunk_size}) does not match the model "
                         f"(vocab {cfg.vocab_size}, m={cfg.chunk_size})")


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
    check_fits(cfg, db)
    trained_on = cfg.extra.get("db_fingerprint")
    if trained_on and trained_on != db.fingerprint:
        log(f"note: the model was trained with database {trained_on}, this one is {db.fingerprint} (same tokenizer)")
    byte_lengths = token_byte_lengths(db.tokenizer)
    data = from_stream(db, "eval", cfg.num_neighbours if cfg.retrieval else None)

    def bpb(data, retrieval):
        return evaluate(model, data, byte_lengths, retrieval=retrieval, batch_size=batch_size, device=device)

    results = {"documents": int(np.unique(data.doc).size), "chunks": len(data), "off": bpb(data, False)}
    if cfg.retrieval:
        results["on"] = bpb(data, True)
        if with_eval_docs:
            results["on_with_eval_docs"] = bpb(neighbours_including(db, data, cfg.num_neighbours), True)
        for name in ("on", "on_with_eval_docs"):
            if name in results:
                results[name]["overlap"] = overlap_rows(results[name], results["off"])
    return results


def summary(results: dict) -> dict:
    """JSON-ready results: the per-chunk arrays (keys that start with _) dropped."""
    return {k: {n: x for n, x in v.items() if not n.startswith("_")} if isinstance(v, dict) else v
            for k, v in results.items()}


def text_table(head: list, rows: list) -> str:
    """Columns of strings, left-aligned, with a rule under the head."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table(results: dict) -> str:
    names = {"off": "retrieval OFF", **{k: f"retrieval ON, {label}" for k, label in LABELS.items()}}
    return text_table(["setting", "bits/byte"], [[n, f"{results[k]['bpb']:.4f}"] for k, n in names.items()
                                                 if k in results])


# -- the command line: eval (and generate, with the same model and database flags) ---------------

def add_model_and_database_flags(p, db_help: str) -> None:
    """--checkpoint, --db, --kernels and --device: what eval and generate load."""
    from .cli_common import database, device
    from .config import KERNELS

    p.add_argument("--checkpoint", type=model_argument, required=True,
                   help="a checkpoint, a training output directory, or a `models retrofit` output folder")
    p.add_argument("--db", type=database, required=True, help=db_help)
    p.add_argument("--kernels", choices=KERNELS, default=None, help="the kernels to run (default: the model's)")
    p.add_argument("--device", type=device, default="auto", help="auto (cuda if there is one), cpu, cuda or cuda:N")


def open_checkpoint_and_database(flags, allow_nonfinite: bool = False):
    """(model, database, device) of --checkpoint, --db, --kernels and --device."""
    from .data import open_database

    device = resolve_device(flags.device)
    model = load_model(flags.checkpoint, flags.kernels, device, allow_nonfinite=allow_nonfinite)
    return model, open_database(flags.db, chunk_size=model.cfg.chunk_size), device


@command("eval")
def main(argv=None) -> int:
    from . import outdir
    from .cli_common import Parser, integer, output_file

    p = Parser("python -m models eval", description="bits per byte on the held-out documents, retrieval ON and OFF")
    add_model_and_database_flags(p, "the retrieval database (its 'eval' split is evaluated)")
    p.add_argument("--with-eval-docs", action="store_true",
                   help="also evaluate with the held-out documents added to the database (measures copying)")
    p.add_argument("--out", type=output_file, default=None, help="JSON results (default: <checkpoint>/eval.json)")
    p.add_argument("--plot", type=output_file, default=None,
                   help="PNG of bpb vs chunk overlap (default: beside the JSON)")
    p.add_argument("--batch-size", type=integer(1), default=8, help="sequences per forward")
    p.add_argument("--allow-nonfinite", action="store_true", help="report NaN/inf results instead of failing")
    flags = p.parse_args(argv)

    out = Path(flags.out) if flags.out else Path(output_file(str(Path(flags.checkpoint) / "eval.json")))
    plot = Path(flags.plot) if flags.plot else out.with_suffix(".png")
    outdir.check_own_file(out, "eval-report", "--out")
    outdir.check_own_file(plot, "eval-report", "--plot", named_by=out)
    model, db, device = open_checkpoint_and_database(flags, flags.allow_nonfinite)
    results = run_evaluation(model, db, flags.with_eval_docs, flags.batch_size, device)
    if not flags.allow_nonfinite:
        check_finite_results(results)
    curves = {}
    for i, k in enumerate(k for k in ("on", "on_with_eval_docs") if k in results):
        rows = results[k]["overlap"]
        curves[f"{LABELS[k]}: retrieval ON"] = ([r["bpb_on"] for r in rows], dict(marker="o", color=f"C{i}"))
        curves[f"{LABELS[k]}: same chunks, OFF"] = ([r["bpb_off"] for r in rows], dict(ls="--", color=f"C{i}"))
    if curves:
        plot_overlap(curves, plot, "bpb over evaluation chunks with overlap <= alpha")
    write_report(out, summary(results), plot if curves else None)
    print(table(results))
    print(f"wrote {out}" + (f" and {plot}" if curves else ""))
    return 0
