"""Sampling with a KV cache and retrieval as chunks complete (docs/model.md, "Generation");
``python -m models generate``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from .cli_common import command
from .model import RetroModel

# retriever(list of (m,) token arrays) -> (tokens (n, K, R), mask (n, K, R))
Retriever = Callable[[list], tuple]


@dataclass
class Generation:
    tokens: list  # prompt + generated ids
    prompt_len: int
    neighbours: list = field(default_factory=list)  # per completed chunk: (K, R) ids
    neighbour_masks: list = field(default_factory=list)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator) -> int:
    """One token from (V,) logits: greedy at temperature 0, else top-k, then nucleus (top-p)."""
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the model's next-token logits are not finite (NaN or inf): its weights or inputs are broken")
    if temperature <= 0:
        return int(logits.argmax())
    logits = (logits.float() - logits.max()) / temperature  # <= 0: a tiny temperature gives -inf, never nan
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        logits[order[drop]] = float("-inf")
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate(model: RetroModel, prompt: list, max_new_tokens: int, retriever: Optional[Retriever] = None,
             temperature: float = 0.8, top_k: int = 50, top_p: float = 0.95, seed: int = 0,
             stop_ids: tuple = (), device="cpu") -> Generation:
    """Sample a continuation of `prompt` (token ids). Retrieval is on when `retriever` is given."""
    cfg, m = model.cfg, model.cfg.chunk_size
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    if retriever is not None and not cfg.retrieval:
        raise ValueError("a retriever was given but the model has retrieval=False")
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    out = Generation(tokens=list(prompt), prompt_len=len(prompt))
    K, R = cfg.num_neighbours, cfg.R

    def neighbour_tensors():
        """The neighbours of every complete chunk, retrieving those of the chunks completed since the last call."""
        if retriever is None:
            return None, None
        done, complete = len(out.neighbours), len(out.tokens) // m
        if complete > done:
            neighbours, mask = retriever([np.asarray(out.tokens[u * m:(u + 1) * m]) for u in range(done, complete)])
            out.neighbours.extend(np.asarray(neighbours)[:, :K, :R])
            out.neighbour_masks.extend(np.asarray(mask)[:, :K, :R])
        if not out.neighbours:
            return torch.zeros(1, 0, K, R, dtype=torch.long, device=device), None
        neighbours = torch.as_tensor(np.stack(out.neighbours), dtype=torch.long, device=device)[None]
        mask = torch.as_tensor(np.stack(out.neighbour_masks), dtype=torch.bool, device=device)[None]
        return neighbours, mask

    cache = model.new_cache()
    neighbours, mask = neighbour_tensors()
    x = torch.as_tensor(out.tokens, dtype=torch.long, device=device)[None]
    logits = model(x, neighbours, mask, start_pos=0, cache=cache)[0, -1]
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        out.tokens.append(token)
        if token in stop_ids:
            break
        neighbours, mask = neighbour_tensors()  # retrieves when this token completed a chunk
        x = torch.tensor([[token]], dtype=torch.long, device=device)
        logits = model(x, neighbours, mask, start_pos=len(out.tokens) - 1, cache=cache)[0, -1]
    return out


def database_retriever(db, K: int) -> Retriever:
    """Retrieve from a database with the chunk's own tokens (nothing excluded)."""
    return lambda chunks: db.neighbours_for_tokens(np.concatenate([np.asarray(c, dtype=np.int64) for c in chunks]), K)


def format_generation(db, result: Generation, max_neighbour_chars: int = 160) -> str:
    """The prompt, the continuation, and each chunk's neighbours (decoded)."""
    m = db.chunk_size
    lines = ["prompt:", "  " + db.decode(result.tokens[: result.prompt_len]).replace("\n", "\n  "),
             "continuation:", "  " + db.decode(result.tokens[result.prompt_len:]).replace("\n", "\n  ")]
    for u, (neighbours, mask) in enumerate(zip(result.neighbours, result.neighbour_masks)):
        chunk = db.decode(result.tokens[u * m:(u + 1) * m]).replace("\n", " ")
        lines.append(f"chunk {u} {chunk[:max_neighbour_chars]!r}")
        for k in range(neighbours.shape[0]):
            if not mask[k].any():  # dropped by the relevance cut (or no chunk in the database)
                lines.append(f"    neighbour {k}: none retrieved (no database chunk within "
                             f"max_distance={db.max_distance})")
                continue
            text = db.decode(neighbours[k][mask[k]]).replace("\n", " ")
            lines.append(f"    neighbour {k}: {text[:max_neighbour_chars]!r}")
    return "\n".join(lines)


@command("generate")
def main(argv=None) -> int:
    from .cli_common import SEED, Parser, UsageError, integer, number, text
    from .evaluate import add_model_and_database_flags, check_fits, open_checkpoint_and_database

    p = Parser("python -m models generate", description="sample from a RETRO model")
    add_model_and_database_flags(p, "retrieval database (its tokenizer is the model's)")
    p.add_argument("--prompt", type=text("a non-empty prompt"), required=True)
    p.add_argument("--max-new-tokens", type=integer(0, 1_000_000), default=128)
    p.add_argument("--temperature", type=number(0), default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=integer(0), default=50, help="0: no top-k cut")
    p.add_argument("--top-p", type=number(0, 1, lo_open=True), default=0.95, help="1: no nucleus cut")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--no-retrieval", action="store_true")
    flags = p.parse_args(argv)
    model, db, device = open_checkpoint_and_database(flags)
    check_fits(model.cfg, db)
    retrieves = model.cfg.retrieval and not flags.no_retrieval
    retriever = database_retriever(db, model.cfg.num_neighbours) if retrieves else None
    prompt = db.encode(flags.prompt).tolist()
    if not prompt:
        raise UsageError(f"--prompt {flags.prompt!r} encodes to no token")
    result = generate(model, prompt, flags.max_new_tokens, retriever, flags.temperature, flags.top_k, flags.top_p,
                      flags.seed, stop_ids=(db.eos_id,), device=device)
    print(format_generation(db, result))
    return 0
