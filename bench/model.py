"""RETRO model benchmark: training-step throughput and peak memory.

``run(quick, device) -> list[dict]`` (called by ``python -m bench model``). One row
per implementation of the same model and batch:

  impl "retro_kernels:auto"  our model, fused kernels (Triton on CUDA; on the CPU
                             the C++ backend where it exists, else the reference)
  impl "reference"           our model, plain-PyTorch reference ops (same weights)
  impl "retro_pytorch"       lucidrains' RETRO-pytorch 0.3.9 model at the same sizes
                             (when installed; its package imports autofaiss for its
                             retriever only, which is stubbed since only the model runs)

A step is forward + backward + AdamW update on (B, N) tokens with K neighbours of
R = 2m tokens per chunk, bf16 autocast on CUDA, fp32 on the CPU. Rows carry
``metrics = {tokens_per_s, peak_mem_bytes}`` and, for ours, ``speedup`` against the others.
"""
from __future__ import annotations

import sys
import types

import torch

from bench.common import time_ms

SHAPES = {
    # paper-like chunking (m = 64, K = 2, R = 128) on a small decoder; head dim 64
    # everywhere (RETRO-pytorch needs more than 32)
    "cuda": dict(B=8, N=2048, m=64, K=2, V=8192, d=512, layers=12, heads=8, cca_start=6),
    "cpu": dict(B=4, N=256, m=32, K=2, V=2048, d=128, layers=4, heads=2, cca_start=2),
    "quick": dict(B=2, N=64, m=16, K=2, V=512, d=128, layers=3, heads=2, cca_start=2),
}


def _time_steps(step, device, quick: bool) -> tuple[float, int | None]:
    """Median seconds per step (bench.common.time_ms), and peak memory (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = time_ms(step, device, quick) / 1e3
    return seconds, torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def _batch(s, device):
    g = torch.Generator().manual_seed(0)
    L = s["N"] // s["m"]
    tokens = torch.randint(2, s["V"], (s["B"], s["N"] + 1), generator=g)
    nb = torch.randint(2, s["V"], (s["B"], L, s["K"], 2 * s["m"]), generator=g)
    return tokens.to(device), nb.to(device)


def _ours(s, device, kernels):
    from models.config import RetroConfig
    from models.model import RetroModel, lm_loss

    cfg = RetroConfig(vocab_size=s["V"], d_model=s["d"], n_layers=s["layers"], n_heads=s["heads"], seq_len=s["N"],
                      chunk_size=s["m"], num_neighbours=s["K"], cca_start_layer=s["cca_start"], kernels=kernels)
    model = RetroModel(cfg).to(device)
    with torch.no_grad():  # CCA outputs start at zero; give them weights so every op does real work
        for name, p in model.named_parameters():
            if name.endswith("cca.to_out.weight"):
                p.normal_(std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens, nb = _batch(s, device)
    mask = torch.ones(nb.shape, dtype=torch.bool, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(tokens[:, :-1], nb, mask)
        lm_loss(logits, tokens[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def _retro_pytorch(s, device):
    sys.modules.setdefault("autofaiss", types.SimpleNamespace(build_index=None))  # retriever only; unused
    from retro_pytorch.retro_pytorch import RETRO

    cca = tuple(range(s["cca_start"], s["layers"] + 1, 3))
    model = RETRO(num_tokens=s["V"], max_seq_len=s["N"], enc_dim=s["d"], enc_depth=2, dec_depth=s["layers"],
                  dec_cross_attn_layers=cca, heads=s["heads"], dec_dim=s["d"], dim_head=s["d"] // s["heads"],
                  chunk_size=s["m"], pad_id=0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens, nb = _batch(s, device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(tokens, nb, return_loss=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def run(quick: bool = False, device="cpu") -> list[dict]:
    device = torch.device(device)
    s = SHAPES["quick" if quick else device.type]
    tokens = s["B"] * s["N"]
    impls = [("retro_kernels:auto", "ours", lambda: _ours(s, device, "auto")),
             ("reference", "ours", lambda: _ours(s, device, "reference")),
             ("retro_pytorch", "peer", lambda: _retro_pytorch(s, device))]
    rows = []
    for impl, role, make in impls:
        row = {"suite": "model", "name": "train_step", "impl": impl, "role": role, "mode": "train",
               "sweep": "quick" if quick else "model", "sweep_value": None, "shape": dict(s),
               "dtype": "bf16" if device.type == "cuda" else "fp32"}
        try:
            step, n_params = make()
            seconds, peak = _time_steps(step, device, quick)
            row.update(status="ok", time_ms=seconds * 1e3,
                       metrics={"tokens_per_s": tokens / seconds, "peak_mem_bytes": peak, "params": n_params})
        except ImportError as e:
            row.update(status="skipped", reason=f"{type(e).__name__}: {e}")
        except Exception as e:  # a failing peer must not hide our rows
            row.update(status="failed", reason=f"{type(e).__name__}: {e}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    ok = {r["impl"]: r["time_ms"] for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["role"] == "ours" and r["status"] == "ok":
            r["speedup"] = {other: t / r["time_ms"] for other, t in ok.items() if other != r["impl"]}
    if device.type == "cpu":
        for r in rows:
            r["notes"] = ("on the CPU 'auto' runs the C++ CPU backend where an op has one, else the reference; "
                          "retro_pytorch's model differs in details (its own encoder widths and positions)")
    return rows


if __name__ == "__main__":
    import json

    for row in run(quick="--quick" in sys.argv, device="cuda" if torch.cuda.is_available() else "cpu"):
        print(json.dumps(row))
