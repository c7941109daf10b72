"""RETRO model benchmark: training-step throughput and peak memory of our model (fused kernels, and
the reference ops with the same weights) and of RETRO-pytorch 0.3.9's model at the same sizes;
`parallel=` (--parallel): our step in each layout of models.parallel on 2 torchrun processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

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


def _row(name: str, impl: str, s: dict, quick: bool, device, **fields) -> dict:
    return {"suite": "model", "name": name, "impl": impl, "role": "ours", "mode": "train",
            "sweep": "quick" if quick else "model", "sweep_value": None, "shape": dict(s),
            "dtype": "bf16" if device.type == "cuda" else "fp32", **fields}


def _ours(s, device, kernels, layout=None, share=slice(None)):
    """(step, parameter count, model, optimizer); layout: models.parallel's (applied to the model),
    share: the rows of the batch this process computes."""
    from models.config import RetroConfig
    from models.model import RetroModel, lm_loss
    from models.parallel import prepare

    cfg = RetroConfig(vocab_size=s["V"], d_model=s["d"], n_layers=s["layers"], n_heads=s["heads"], seq_len=s["N"],
                      chunk_size=s["m"], num_neighbours=s["K"], cca_start_layer=s["cca_start"], kernels=kernels)
    torch.manual_seed(0)
    model = RetroModel(cfg).to(device)
    with torch.no_grad():  # CCA outputs start at zero; give them weights so every op does real work
        for name, p in model.named_parameters():
            if name.endswith("cca.to_out.weight"):
                p.normal_(std=0.02)
    n_params = sum(p.numel() for p in model.parameters())
    forward = model if layout is None else prepare(model, layout, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens, nb = (t[share] for t in _batch(s, device))
    mask = torch.ones(nb.shape, dtype=torch.bool, device=device)

    def step(update=True):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = forward(tokens[:, :-1], nb, mask)
        lm_loss(logits, tokens[:, 1:]).backward()
        if update:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step, n_params, model, opt


def _retro_pytorch(s, device):
    from bench.peers import import_retro_pytorch

    RETRO = import_retro_pytorch()[0].RETRO
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


LAYOUTS = {"single": ("ddp", 1), "ddp": ("ddp", 1), "fsdp": ("fsdp", 1), "tp": ("ddp", 2)}


def parallel_row(name: str, quick: bool, device) -> dict:
    """The row of layout ``name`` (LAYOUTS), measured in this process: the only one, or a torchrun rank."""
    from models.parallel import ATTENTION_INPUTS, make_layout, state_bytes
    from models.runtime import setup_distributed

    s = SHAPES["quick" if quick else device.type]
    rank, world, device = setup_distributed(device)
    layout = make_layout(world, rank, device, *LAYOUTS[name])
    share = slice(layout.dp_rank, None, layout.dp_size)
    step, n_params, model, opt = _ours(s, device, "auto", layout, share)
    seconds, peak = _time_steps(step, device, quick)
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, out: seen.append(out.numel() * out.element_size()))
             for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ATTENTION_INPUTS]
    step(update=False)  # with its gradients: what a rank holds in the middle of a step
    for h in hooks:
        h.remove()
    held = state_bytes(model, opt)
    metrics = {"tokens_per_s": s["B"] * s["N"] / seconds, "peak_mem_bytes": peak, "params": n_params, **held,
               "state_bytes": sum(held.values()), "attention_input_bytes": sum(seen)}
    return _row("train_step_parallel", name, {**s, "processes": world}, quick, device, status="ok",
                time_ms=seconds * 1e3, metrics=metrics)


def parallel_rows(names, quick: bool, device, processes: int = 2) -> list[dict]:
    """One row per layout: single in this process, the others on ``processes`` torchrun processes."""
    rows = []
    for name in [n for n in LAYOUTS if n in names]:
        if name == "single":
            rows.append(parallel_row(name, quick, device))
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "bench.model", "--layout", name, "--device", device.type] + ["--quick"] * quick
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LOGLEVEL": "ERROR"})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        rows.append(json.loads(lines[-1]) if proc.returncode == 0 and lines else
                    {"suite": "model", "name": "train_step_parallel", "impl": name, "status": "failed",
                     "reason": (proc.stderr.strip().splitlines() or ["no output"])[-1]})
    return rows


def run(quick: bool = False, device="cpu", parallel=None) -> list[dict]:
    if parallel:
        return parallel_rows(parallel, quick, torch.device(device))
    device = torch.device(device)
    s = SHAPES["quick" if quick else device.type]
    tokens = s["B"] * s["N"]
    impls = [("retro_kernels:auto", "ours", lambda: _ours(s, device, "auto")[:2]),
             ("reference", "ours", lambda: _ours(s, device, "reference")[:2]),
             ("retro_pytorch", "peer", lambda: _retro_pytorch(s, device))]
    rows = []
    for impl, role, make in impls:
        row = _row("train_step", impl, s, quick, device, role=role)
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
            r["notes"] = ("on the CPU 'auto' runs the C++ CPU backend where an op has one, else the reference; "
                          "retro_pytorch's model differs in details (its own encoder widths and positions)")
    return rows


if __name__ == "__main__":  # a torchrun rank of parallel_rows: --layout NAME --device TYPE [--quick]
    row = parallel_row(sys.argv[sys.argv.index("--layout") + 1], "--quick" in sys.argv,
                       torch.device(sys.argv[sys.argv.index("--device") + 1]))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(row))
