"""Op benchmarks: each retro_kernels backend and each peer (bench/peers.py), forward, backward, both;
shapes, cost models and timing rules: docs/benchmarks.md."""
from __future__ import annotations

import math
import time
import traceback
from typing import Callable, NamedTuple

import torch

import retro_kernels
from retro_kernels import dispatch

from . import peers
from .common import TORCH_DTYPES, make_row, time_ms

MODES = ("fwd", "bwd", "fwd+bwd")
FUSED = ("triton", "cpu", "cuda")


class Case(NamedTuple):
    sweep: str
    sweep_value: object
    shape: dict
    dtype: str


def _padding_mask(shape: tuple, length: int, generator: torch.Generator, device) -> torch.Tensor:
    """Bool mask (..., length), True = real: about half the rows lose up to their last quarter
    (never a whole row: RETRO-pytorch's peer averages fully masked rows instead of zeroing them)."""
    rows = math.prod(shape)
    cut = torch.randint(0, max(1, length // 4), (rows,), generator=generator)
    real = length - torch.where(torch.rand(rows, generator=generator) < 0.5, cut, 0)
    return (torch.arange(length)[None, :] < real[:, None]).reshape(*shape, length).to(device)


def _randn(*shape, case: Case, device) -> torch.Tensor:
    return torch.randn(shape, device=device, dtype=getattr(torch, TORCH_DTYPES[case.dtype]))


def _sweeps(base: dict, values: dict, dtypes: list[str]) -> list[Case]:
    """The base problem in every dtype, then each axis of `values` swept in the first dtype."""
    cases = [Case("base", None, base, dt) for dt in dtypes]
    for axis, vals in values.items():
        sweep = "GQA" if axis == "Hkv" else axis
        cases += [Case(sweep, base["Hq"] // v if axis == "Hkv" else v, {**base, axis: v}, dtypes[0]) for v in vals]
    return cases


class OpBench:
    name: str
    label: str
    peers: dict[str, Callable]
    mask_key = "neighbour_mask"

    def ours(self, backend: str) -> Callable:
        op = getattr(retro_kernels, self.name)
        return lambda q, k, v, **kw: op(q, k, v, **kw, backend=backend)

    def explain(self, q, k, v, kw) -> dict[str, list[str]]:
        """retro_kernels.explain with the inputs the op's dispatch sees."""
        return retro_kernels.explain(self.name, q=q, k=k, v=v, **{self.mask_key: kw.get(self.mask_key)})

    def cost(self, case: Case, mode: str) -> tuple[float, float]:
        itemsize = getattr(torch, TORCH_DTYPES[case.dtype]).itemsize
        fwd_flops, fwd_bytes, stat_rows = self.forward_cost(case.shape, itemsize)
        bwd = (2.5 * fwd_flops, 2 * fwd_bytes + 4 * case.shape["B"] * case.shape["Hq"] * stat_rows)
        return {"fwd": (fwd_flops, fwd_bytes), "bwd": bwd,
                "fwd+bwd": (fwd_flops + bwd[0], fwd_bytes + bwd[1])}[mode]

    def targets(self, impl: str, mode: str, device: torch.device, dtype: str) -> dict:
        """Goals for a row of ours (recorded, never asserted): on the CPU, fwd+bwd in fp32 against SDPA."""
        if impl.startswith("retro_kernels:") and device.type == "cpu" and mode == "fwd+bwd" and dtype == "fp32":
            return {"speedup_min": {p: 1.2 for p in self.peers if p.startswith("sdpa")}}
        return {}

    def cases(self, device, quick, dtypes):
        """The neighbour ops' cases: the paper's D and a K sweep on a GPU, base and K elsewhere (BASES)."""
        if device.type == "cuda" and not quick:
            gpu = self.BASES["gpu"]
            cases = [Case("paper", d, {**gpu, "D": d}, dt) for dt in dtypes for d in (64, 128)]
            return cases + [Case("K", K, {**gpu, "K": K}, dtypes[0]) for K in (1, 2, 4, 10)]
        return _sweeps(self.BASES["quick" if quick else "cpu"], {"K": (3,) if quick else (1, 4)}, dtypes)


class CCABench(OpBench):
    name, label, peers = "chunked_cross_attention", "CCA", peers.CCA_PEERS

    def inputs(self, case: Case, device, generator):
        s = case.shape
        L = s["N"] // s["m"]
        q = _randn(s["B"], s["N"], s["Hq"], s["D"], case=case, device=device)
        k, v = (_randn(s["B"], L, s["K"], s["R"], s["Hkv"], s["D"], case=case, device=device) for _ in "kv")
        kw = {"chunk_size": s["m"]}
        if s.get("mask"):
            kw["neighbour_mask"] = _padding_mask((s["B"], L, s["K"]), s["R"], generator, device)
        return q, k, v, kw

    def forward_cost(self, s: dict, elem: int):
        kr, rows = s["K"] * s["R"], max(0, s["N"] - (s["m"] - 1))
        used = s["N"] // s["m"]
        nbytes = elem * (2 * s["B"] * s["N"] * s["Hq"] * s["D"] + 2 * s["B"] * used * kr * s["Hkv"] * s["D"])
        return 4 * s["B"] * s["Hq"] * rows * kr * s["D"], nbytes, s["N"]

    def targets(self, impl, mode, device, dtype):
        if not impl.startswith("retro_kernels:"):
            return {}
        if device.type == "cuda" and mode == "fwd":
            return {"roofline_pct_min": 85, "speedup_min": {"flex_attention": 1.5, "sdpa": 1.3}}
        if device.type == "cuda" and mode == "bwd":
            return {"roofline_pct_min": 70, "speedup_min": {p: 1.0 for p in self.peers}}
        if device.type == "cpu" and mode == "fwd+bwd" and dtype == "fp32":
            return {"speedup_min": {"sdpa": 1.25}, "matmul_pct_min": 60}
        return {}

    def cases(self, device, quick, dtypes):
        if device.type == "cuda" and not quick:
            base = dict(B=16, N=2048, m=64, K=2, R=128, Hq=16, Hkv=16, D=128, mask=False)
            cases = [Case("paper", d, {**base, "D": d}, dt) for dt in dtypes for d in (64, 128)]
            dt = dtypes[0]
            cases.append(Case("mask", True, {**base, "mask": True}, dt))
            cases += [Case("K", K, {**base, "K": K}, dt) for K in (1, 2, 4, 6, 8, 10)]
            cases += [Case("D", D, {**base, "D": D}, dt) for D in (32, 64, 96, 128, 256)]
            cases += [Case("N", N, {**base, "N": N, "B": 32768 // N}, dt) for N in (512, 1024, 2048, 4096, 8192)]
            return cases + [Case("GQA", 16 // h, {**base, "Hkv": h}, dt) for h in (16, 8, 4, 2, 1)]
        if quick:
            base = dict(B=1, N=200, m=32, K=2, R=64, Hq=4, Hkv=2, D=32, mask=False)
            values = {"K": (3,), "D": (48,), "N": (100,), "Hkv": (1,)}
        else:
            base = dict(B=1, N=512, m=64, K=2, R=128, Hq=8, Hkv=8, D=64, mask=False)
            values = {"K": (1, 2, 4, 8), "D": (32, 64, 128), "N": (256, 512, 1024), "Hkv": (8, 2, 1)}
        cases = _sweeps(base, values, dtypes)
        cases.insert(len(dtypes), Case("mask", True, {**base, "mask": True}, dtypes[0]))
        if device.type == "cpu":
            cpu = dict(B=1 if quick else 2, N=256 if quick else 1024, m=64, K=2, R=128, Hq=8, Hkv=8, D=64)
            cases += [Case("cpu", mask, {**cpu, "mask": mask}, "fp32") for mask in (False, True)]
        return cases


class NSABench(OpBench):
    name, label, peers = "neighbour_self_attention", "NSA", peers.NSA_PEERS
    BASES = {"gpu": dict(B=16, L=32, K=2, R=128, Hq=16, Hkv=16, D=64, mask=True),
             "cpu": dict(B=1, L=8, K=2, R=128, Hq=8, Hkv=8, D=64, mask=True),
             "quick": dict(B=1, L=4, K=2, R=64, Hq=4, Hkv=2, D=32, mask=True)}

    def inputs(self, case, device, generator):
        s = case.shape
        lead = (s["B"], s["L"], s["K"], s["R"])
        q = _randn(*lead, s["Hq"], s["D"], case=case, device=device)
        k, v = (_randn(*lead, s["Hkv"], s["D"], case=case, device=device) for _ in "kv")
        kw = {"neighbour_mask": _padding_mask(lead[:3], s["R"], generator, device)} if s.get("mask") else {}
        return q, k, v, kw

    def forward_cost(self, s, elem):
        n = s["B"] * s["L"] * s["K"]
        nbytes = elem * (2 * n * s["R"] * s["Hq"] * s["D"] + 2 * n * s["R"] * s["Hkv"] * s["D"])
        return 4 * n * s["Hq"] * s["R"] * s["R"] * s["D"], nbytes, n * s["R"]



class NCABench(OpBench):
    name, label, peers = "neighbour_cross_attention", "NCA", peers.NCA_PEERS
    BASES = {k: dict(v, M=v["R"] // 2) for k, v in NSABench.BASES.items()}  # M: the chunk's tokens
    mask_key = "chunk_mask"

    def inputs(self, case, device, generator):
        s = case.shape
        q = _randn(s["B"], s["L"], s["K"], s["R"], s["Hq"], s["D"], case=case, device=device)
        k, v = (_randn(s["B"], s["L"], s["M"], s["Hkv"], s["D"], case=case, device=device) for _ in "kv")
        kw = {}
        if s.get("mask"):
            mask = torch.ones(s["B"], s["L"], s["M"], dtype=torch.bool)
            mask[:, -1, s["M"] // 2 :] = False  # a partial last chunk
            kw["chunk_mask"] = mask.to(device)
        return q, k, v, kw

    def forward_cost(self, s, elem):
        n, kr = s["B"] * s["L"], s["K"] * s["R"]
        nbytes = elem * (2 * n * kr * s["Hq"] * s["D"] + 2 * n * s["M"] * s["Hkv"] * s["D"])
        return 4 * n * s["Hq"] * kr * s["M"] * s["D"], nbytes, n * kr

    def targets(self, impl, mode, device, dtype):
        if device.type == "cuda" and impl.startswith("retro_kernels:"):
            return {"speedup_min": {"sdpa_repeat": 2.0}}
        return super().targets(impl, mode, device, dtype)



OP_BENCHES = (CCABench(), NSABench(), NCABench())


# -- Measuring ---------------------------------------------------------------------------------

def timed_call(fn, q, k, v, kw, mode):
    """The call that `mode` times (fwd: inference; bwd: autograd.grad of a retained graph; fwd+bwd: both)."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(q, k, v, **kw)
        return call
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    if mode == "bwd":
        out = fn(qg, kg, vg, **kw)
        dout = torch.randn_like(out)
        return lambda: torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True)
    dout = torch.randn_like(q)
    return lambda: torch.autograd.grad(fn(qg, kg, vg, **kw), (qg, kg, vg), dout)


def _peer_skip_reason(peer: str, case: Case, mode: str, device, quick) -> str | None:
    if peer == "flex_attention" and device.type == "cpu" and mode != "fwd":
        return "FlexAttention has no backward on the CPU (torch raises NotImplementedError)"
    if peer == "flex_attention" and device.type == "cpu" and not quick and case.sweep not in ("base", "mask"):
        return "compiling FlexAttention takes about a minute per shape on a CPU: base shapes only"
    if peer == "flash_attn" and case.shape.get("mask"):
        return "flash_attn_func takes no key mask (neighbour padding)"
    return peers.unavailable(peer, device)


def candidates(bench: OpBench, device, quick, q, k, v, kw):
    """[(impl, role, fn or None, skip reason, notes)]: the peers first (the reference first of all),
    then ours, so that a row of ours is compared with them the moment it is measured."""
    out = []
    for peer, fn in bench.peers.items():
        notes = None
        if peer == "flex_attention" and device.type == "cpu" and quick:
            fn = peers.cca_flex_attention_eager
            notes = "flex_attention run eagerly (not compiled) under --quick on the CPU"
        elif peer == "flex_attention" and device.type == "cuda":
            notes = peers.FLEX_CUDA_NOTE
        elif peer == "retro_pytorch" and not peers.unavailable(peer, device):
            notes = peers.import_retro_pytorch()[1]
        out.append((peer, "peer", fn, None, notes))
    reasons = bench.explain(q, k, v, kw)
    for backend in FUSED:
        why = reasons.get(backend, [])
        if backend == "triton" and device.type == "cpu" and dispatch.triton_interpreting():
            why = why + ["TRITON_INTERPRET=1: the interpreter is a debugger, not a benchmark"]
        fn = None if why else bench.ours(backend)
        out.append((f"retro_kernels:{backend}", "ours", fn, "; ".join(why) or None, None))
    return out


def run_op(bench: OpBench, device: torch.device, quick: bool, dtypes: list[str], log=print,
           sweeps: set[str] | None = None, cases: list[Case] | None = None,
           impls: set[str] | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Rows of `bench` for its cases (or `cases`), every impl (or those in `impls`), each complete when
    made (forward error, speedups against the peers of its mode); `on_row(row)` sees it at once."""
    rows, logged = [], set()

    def emit(row):
        rows.append(row)
        if on_row:
            on_row(row)
        if row["status"] != "ok" and (row["impl"], row["reason"]) not in logged:
            logged.add((row["impl"], row["reason"]))
            log(f"  {row['status']} {row['impl']} for {bench.label}: {row['reason']}")

    torch.manual_seed(0)  # inputs (on the device)
    generator = torch.Generator().manual_seed(0)  # masks (on the CPU, then moved)
    for case in bench.cases(device, quick, dtypes) if cases is None else cases:
        if sweeps and case.sweep not in sweeps:
            continue
        t0 = time.perf_counter()
        q, k, v, kw = bench.inputs(case, device, generator)
        chosen = [c for c in candidates(bench, device, quick, q, k, v, kw) if not impls or c[0] in impls]
        with torch.no_grad():
            reference = bench.peers["reference"](q, k, v, **kw)
        for mode in MODES:
            for row in mode_rows(bench, case, mode, chosen, (q, k, v, kw), reference, device, quick):
                emit(row)
        del reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log(f"  {bench.label} {case.sweep}={case.sweep_value} {case.dtype}: {time.perf_counter() - t0:.1f}s")
    return rows


def mode_rows(bench, case, mode, chosen, inputs, reference, device, quick):
    """Yield the rows of one mode as they are measured, peers first; a row of ours carries its
    speedups against the peers measured before it."""
    flops, nbytes = bench.cost(case, mode)
    peer_ms = {}
    for impl, role, fn, skip, notes in chosen:
        fields = dict(role=role, mode=mode, sweep=case.sweep, sweep_value=case.sweep_value, shape=dict(case.shape),
                      dtype=case.dtype, flops=flops, bytes=nbytes, notes=notes,
                      targets=bench.targets(impl, mode, device, case.dtype))
        if role == "peer":
            skip = skip or _peer_skip_reason(impl, case, mode, device, quick)
        row = measure(bench, impl, fn, skip, fields, inputs, reference, device, quick)
        if row["status"] == "ok" and role == "peer":
            peer_ms[impl] = row["time_ms"]
        elif row["status"] == "ok":
            row["speedup"] = {p: ms / row["time_ms"] for p, ms in peer_ms.items()}
        yield row


def measure(bench, impl, fn, skip, fields, inputs, reference, device, quick) -> dict:
    """One impl in one mode: an ok row with its time (and forward error), or a skipped or failed row."""
    if skip:
        return make_row("ops", bench.name, impl, "skipped", reason=skip, **fields)
    q, k, v, kw = inputs
    try:
        ms = time_ms(timed_call(fn, q, k, v, kw, fields["mode"]), device, quick)
        err = None
        if fields["mode"] == "fwd":
            with torch.no_grad():
                err = (fn(q, k, v, **kw).float() - reference.float()).abs().max().item()
    except NotImplementedError as e:
        return make_row("ops", bench.name, impl, "skipped", reason=str(e), **fields)
    except Exception as e:  # noqa: BLE001 -- a failing impl is a row; the others still run
        traceback.print_exc(limit=3)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return make_row("ops", bench.name, impl, "failed", reason=f"{type(e).__name__}: {str(e)[:300]}", **fields)
    return make_row("ops", bench.name, impl, "ok", time_ms=ms, max_abs_err=err, **fields)


def run(quick: bool, device, dtypes: list[str], sweeps: set[str] | None = None,
        ops: set[str] | None = None, log=print) -> list[dict]:
    """Rows for every op (or those named, by name or label, in `ops`), every case (or those in `sweeps`)."""
    rows = []
    for bench in OP_BENCHES:
        if not ops or {bench.name, bench.label} & set(ops):
            log(f"== {bench.name}")
            rows += run_op(bench, torch.device(device), quick, dtypes, log, sweeps)
    return rows
