"""Op benchmarks: each retro_kernels backend and each peer, forward, backward, both.

Ops: chunked_cross_attention (CCA), neighbour_self_attention (NSA),
neighbour_cross_attention (NCA); an op the installed retro_kernels lacks
(an older version) is skipped with a printed reason.

Cost models (docs/spec.md#cost-model); e = bytes per element, Lu = N // m
chunks read, rows = N - (m-1) attending query rows:

    CCA  fwd flops = 4 * B * Hq * rows * K*R * D
         fwd bytes = e * (2*B*N*Hq*D + 2*B*Lu*K*R*Hkv*D)         q, out; k, v
         bwd bytes = e * (4*B*N*Hq*D + 4*B*Lu*K*R*Hkv*D) + 4*B*Hq*N
                     (read q, out, dout, k, v and the fp32 softmax statistics;
                      write dq, dk, dv)
    NSA  fwd flops = 4 * B*L*K * Hq * R*R * D
         fwd bytes = e * (2*B*L*K*R*Hq*D + 2*B*L*K*R*Hkv*D)
    NCA  fwd flops = 4 * B*L * Hq * K*R * M * D
         fwd bytes = e * (2*B*L*K*R*Hq*D + 2*B*L*M*Hkv*D)
    bwd flops = 2.5 x fwd (five matmuls to the forward's two: S is recomputed);
    bwd bytes of NSA/NCA as for CCA (read q, out, dout, k, v, stats; write grads);
    fwd+bwd = fwd + bwd, for both.

The forward is timed under torch.no_grad (inference); the backward alone
as torch.autograd.grad of a retained graph; fwd+bwd as one training step
of the op (forward with grad, then autograd.grad).
"""
from __future__ import annotations

import dataclasses
import math
import time
import traceback
from typing import Callable

import torch

import retro_kernels
from retro_kernels import dispatch

from . import peers
from .common import DTYPES, make_row, median_time_ms

MODES = ("fwd", "bwd", "fwd+bwd")
FUSED = ("triton", "cpu", "cuda")


@dataclasses.dataclass
class Case:
    sweep: str
    sweep_value: object
    shape: dict
    dtype: str


# ---------------------------------------------------------------------------
# The three ops: inputs, cost models, who runs them
# ---------------------------------------------------------------------------

def _padding_mask(shape: tuple, length: int, generator: torch.Generator, device) -> torch.Tensor:
    """Bool mask (..., length), True = real: about half the rows lose up to the last quarter.

    Every row keeps at least 3/4 of its tokens, so no row is fully masked
    (RETRO-pytorch's peer averages fully masked rows instead of zeroing them).
    """
    rows = math.prod(shape)
    real = torch.full((rows,), length, dtype=torch.long)
    padded = torch.rand(rows, generator=generator) < 0.5
    cut = torch.randint(0, max(1, length // 4), (rows,), generator=generator)
    real = torch.where(padded, real - cut, real)
    mask = torch.arange(length)[None, :] < real[:, None]
    return mask.reshape(*shape, length).to(device)


def _randn(shape: tuple, device, dtype) -> torch.Tensor:
    """Standard normal inputs made on the device (GPU shapes reach GBs; run_op seeds torch)."""
    return torch.randn(shape, device=device, dtype=dtype)


class OpBench:
    name: str
    label: str
    peers: dict[str, Callable]

    def available(self) -> str | None:
        if not hasattr(retro_kernels, self.name):
            return f"this retro_kernels has no {self.name}"
        return None

    def ours(self, backend: str) -> Callable:
        op = getattr(retro_kernels, self.name)

        def run(q, k, v, **kw):
            return op(q, k, v, **kw, backend=backend)

        return run

    mask_key = "neighbour_mask"

    def explain(self, q, k, v, kw) -> dict[str, list[str]]:
        """retro_kernels.explain with the inputs the op's dispatch sees."""
        return retro_kernels.explain(self.name, q=q, k=k, v=v, **{self.mask_key: kw.get(self.mask_key)})

    def cost(self, case: Case, mode: str) -> tuple[float, float]:
        fwd_flops, fwd_bytes, stat_rows = self.forward_cost(case.shape, DTYPES[case.dtype].itemsize)
        bwd_flops = 2.5 * fwd_flops
        bwd_bytes = 2 * fwd_bytes + 4 * case.shape["B"] * case.shape["Hq"] * stat_rows
        return {
            "fwd": (fwd_flops, fwd_bytes),
            "bwd": (bwd_flops, bwd_bytes),
            "fwd+bwd": (fwd_flops + bwd_flops, fwd_bytes + bwd_bytes),
        }[mode]

    def targets(self, impl: str, mode: str, device: torch.device, dtype: str) -> dict:
        return {}


class CCABench(OpBench):
    name = "chunked_cross_attention"
    label = "CCA"
    peers = peers.CCA_PEERS

    def inputs(self, case: Case, device, generator):
        s = case.shape
        dtype = DTYPES[case.dtype]
        L = s["N"] // s["m"]
        q = _randn((s["B"], s["N"], s["Hq"], s["D"]), device, dtype)
        kv_shape = (s["B"], L, s["K"], s["R"], s["Hkv"], s["D"])
        k = _randn(kv_shape, device, dtype)
        v = _randn(kv_shape, device, dtype)
        kw = {"chunk_size": s["m"]}
        if s.get("mask"):
            kw["neighbour_mask"] = _padding_mask((s["B"], L, s["K"]), s["R"], generator, device)
        return q, k, v, kw

    def forward_cost(self, s: dict, elem: int):
        used = s["N"] // s["m"]
        rows = max(0, s["N"] - (s["m"] - 1))
        kr = s["K"] * s["R"]
        flops = 4 * s["B"] * s["Hq"] * rows * kr * s["D"]
        nbytes = elem * (2 * s["B"] * s["N"] * s["Hq"] * s["D"] + 2 * s["B"] * used * kr * s["Hkv"] * s["D"])
        return flops, nbytes, s["N"]

    def targets(self, impl, mode, device, dtype):
        if not impl.startswith("retro_kernels:"):
            return {}
        if device.type == "cuda":
            if mode == "fwd":
                return {"device": "H100", "roofline_pct_min": 85,
                        "speedup_min": {"flex_attention": 1.5, "sdpa": 1.3}}
            if mode == "bwd":
                return {"device": "H100", "roofline_pct_min": 70,
                        "speedup_min": {p: 1.0 for p in self.peers}}
        elif mode == "fwd+bwd" and dtype == "fp32":
            return {"device": "CPU, fp32", "speedup_min": {"sdpa": 1.25},
                    "report": "matmul_pct (fraction of the machine's matmul FLOP rate)"}
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
            cases += [Case("GQA", 16 // h, {**base, "Hkv": h}, dt) for h in (16, 8, 4, 2, 1)]
            return cases
        if quick:
            base = dict(B=1, N=200, m=32, K=2, R=64, Hq=4, Hkv=2, D=32, mask=False)
            values = {"K": (3,), "D": (48,), "N": (100,), "Hkv": (1,)}
        else:
            base = dict(B=1, N=512, m=64, K=2, R=128, Hq=8, Hkv=8, D=64, mask=False)
            values = {"K": (1, 2, 4, 8), "D": (32, 64, 128), "N": (256, 512, 1024), "Hkv": (8, 2, 1)}
        cases = [Case("base", None, base, dt) for dt in dtypes]
        dt = dtypes[0]
        cases.append(Case("mask", True, {**base, "mask": True}, dt))
        for axis, vals in values.items():
            sweep = "GQA" if axis == "Hkv" else axis
            for val in vals:
                value = base["Hq"] // val if axis == "Hkv" else val
                cases.append(Case(sweep, value, {**base, axis: val}, dt))
        return cases


class NSABench(OpBench):
    name = "neighbour_self_attention"
    label = "NSA"
    peers = peers.NSA_PEERS

    def inputs(self, case, device, generator):
        s = case.shape
        dtype = DTYPES[case.dtype]
        lead = (s["B"], s["L"], s["K"], s["R"])
        q = _randn((*lead, s["Hq"], s["D"]), device, dtype)
        k = _randn((*lead, s["Hkv"], s["D"]), device, dtype)
        v = _randn((*lead, s["Hkv"], s["D"]), device, dtype)
        kw = {}
        if s.get("mask"):
            kw["neighbour_mask"] = _padding_mask(lead[:3], s["R"], generator, device)
        return q, k, v, kw

    def forward_cost(self, s, elem):
        n = s["B"] * s["L"] * s["K"]
        flops = 4 * n * s["Hq"] * s["R"] * s["R"] * s["D"]
        nbytes = elem * (2 * n * s["R"] * s["Hq"] * s["D"] + 2 * n * s["R"] * s["Hkv"] * s["D"])
        return flops, nbytes, n * s["R"]

    def cases(self, device, quick, dtypes):
        if device.type == "cuda" and not quick:
            base = dict(B=16, L=32, K=2, R=128, Hq=16, Hkv=16, D=64, mask=True)
            cases = [Case("paper", d, {**base, "D": d}, dt) for dt in dtypes for d in (64, 128)]
            cases += [Case("K", K, {**base, "K": K}, dtypes[0]) for K in (1, 2, 4, 10)]
            return cases
        if quick:
            base = dict(B=1, L=4, K=2, R=64, Hq=4, Hkv=2, D=32, mask=True)
            ks = (3,)
        else:
            base = dict(B=1, L=8, K=2, R=128, Hq=8, Hkv=8, D=64, mask=True)
            ks = (1, 4)
        cases = [Case("base", None, base, dt) for dt in dtypes]
        cases += [Case("K", K, {**base, "K": K}, dtypes[0]) for K in ks]
        return cases


class NCABench(OpBench):
    name = "neighbour_cross_attention"
    label = "NCA"
    peers = peers.NCA_PEERS
    mask_key = "chunk_mask"

    def inputs(self, case, device, generator):
        s = case.shape
        dtype = DTYPES[case.dtype]
        q = _randn((s["B"], s["L"], s["K"], s["R"], s["Hq"], s["D"]), device, dtype)
        k = _randn((s["B"], s["L"], s["M"], s["Hkv"], s["D"]), device, dtype)
        v = _randn((s["B"], s["L"], s["M"], s["Hkv"], s["D"]), device, dtype)
        kw = {}
        if s.get("mask"):
            mask = torch.ones(s["B"], s["L"], s["M"], dtype=torch.bool)
            mask[:, -1, s["M"] // 2 :] = False  # a partial last chunk
            kw["chunk_mask"] = mask.to(device)
        return q, k, v, kw

    def forward_cost(self, s, elem):
        n = s["B"] * s["L"]
        kr = s["K"] * s["R"]
        flops = 4 * n * s["Hq"] * kr * s["M"] * s["D"]
        nbytes = elem * (2 * n * kr * s["Hq"] * s["D"] + 2 * n * s["M"] * s["Hkv"] * s["D"])
        return flops, nbytes, n * kr

    def targets(self, impl, mode, device, dtype):
        if device.type == "cuda" and impl.startswith("retro_kernels:"):
            return {"device": "H100", "speedup_min": {"sdpa_repeat": 2.0}}
        return {}

    def cases(self, device, quick, dtypes):
        if device.type == "cuda" and not quick:
            base = dict(B=16, L=32, K=2, R=128, M=64, Hq=16, Hkv=16, D=64, mask=True)
            cases = [Case("paper", d, {**base, "D": d}, dt) for dt in dtypes for d in (64, 128)]
            cases += [Case("K", K, {**base, "K": K}, dtypes[0]) for K in (1, 2, 4, 10)]
            return cases
        if quick:
            base = dict(B=1, L=4, K=2, R=64, M=32, Hq=4, Hkv=2, D=32, mask=True)
            ks = (3,)
        else:
            base = dict(B=1, L=8, K=2, R=128, M=64, Hq=8, Hkv=8, D=64, mask=True)
            ks = (1, 4)
        cases = [Case("base", None, base, dt) for dt in dtypes]
        cases += [Case("K", K, {**base, "K": K}, dtypes[0]) for K in ks]
        return cases


OP_BENCHES = (CCABench(), NSABench(), NCABench())


# ---------------------------------------------------------------------------
# Timing one implementation
# ---------------------------------------------------------------------------

def time_mode(fn, q, k, v, kw, mode, device, quick):
    """(median ms, forward output or None) of one call of `mode`."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(q, k, v, **kw)

        with torch.no_grad():
            out = fn(q, k, v, **kw)
        return median_time_ms(call, device, quick), out
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(qg, kg, vg, **kw)
    dout = torch.randn_like(out)
    if mode == "bwd":
        def call():
            return torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True)
    else:
        def call():
            return torch.autograd.grad(fn(qg, kg, vg, **kw), (qg, kg, vg), dout)
    return median_time_ms(call, device, quick), None


def _peer_skip_reason(bench: OpBench, peer: str, case: Case, mode: str, device, quick) -> str | None:
    reason = peers.unavailable(peer, device)
    if reason:
        return reason
    if peer == "flex_attention":
        if device.type == "cpu" and mode != "fwd":
            return "FlexAttention has no backward on the CPU (torch raises NotImplementedError)"
        if device.type == "cpu" and not quick and case.sweep not in ("base", "mask"):
            return "compiling FlexAttention takes about a minute per shape on this CPU: base shapes only"
    if peer == "flash_attn" and case.shape.get("mask"):
        return "flash_attn_func takes no key mask (neighbour padding)"
    return None


def _impls(bench: OpBench, case: Case, device, quick, q, k, v, kw):
    """[(impl name, role, fn or None, skip reason, notes)] for this case: the peers
    first (the reference first of all), then ours, so that a row of ours can be
    compared with the reference and the peers the moment it is measured."""
    out = []
    for peer, fn in bench.peers.items():
        notes = None
        if peer == "flex_attention" and device.type == "cpu" and quick:
            fn = peers.cca_flex_attention_eager
            notes = "flex_attention run eagerly (not compiled) under --quick on the CPU"
        if peer == "flex_attention" and device.type == "cuda":
            notes = peers.FLEX_CUDA_NOTE
        if peer == "retro_pytorch" and not peers.unavailable(peer, device):
            notes = peers.import_retro_pytorch()[1]
        out.append((peer, "peer", fn, None, notes))
    try:
        reasons = bench.explain(q, k, v, kw)
    except Exception as e:  # an op whose explain inputs we guessed wrong
        reasons = {b: [f"explain() failed: {type(e).__name__}: {e}"] for b in FUSED}
    for backend in FUSED:
        why = reasons.get(backend, [])
        if backend == "triton" and device.type == "cpu" and dispatch.triton_interpreting():
            why = why + ["TRITON_INTERPRET=1: the interpreter is a debugger, not a benchmark"]
        fn = None if why else bench.ours(backend)
        out.append((f"retro_kernels:{backend}", "ours", fn, "; ".join(why) or None, None))
    return out


def _clear(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _max_abs_err(out, reference) -> float | None:
    if out is None or reference is None:
        return None
    return (out.float() - reference.float()).abs().max().item()


def run_op(bench: OpBench, device: torch.device, quick: bool, dtypes: list[str], log=print,
           sweeps: set[str] | None = None, cases: list[Case] | None = None,
           impls: set[str] | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Rows of `bench` for its cases (or `cases`), every impl (or those named in `impls`).

    Each row is complete when it is made: forward error against the reference
    (computed untimed when the reference itself is not among `impls`) and
    speedups against the peers measured for the same mode; `on_row(row)` sees
    it at once (bench/gpu_check.py appends it to a file there and then).
    """
    run = _OpRun(bench, device, quick, log, on_row)
    why = bench.available()
    if why:
        log(f"skip {bench.name}: {why}")
        run.emit(make_row("ops", bench.name, "*", "skipped", reason=why))
        return run.rows
    torch.manual_seed(0)  # inputs (on the device)
    generator = torch.Generator().manual_seed(0)  # masks (on the CPU, then moved)
    for case in bench.cases(device, quick, dtypes) if cases is None else cases:
        if sweeps and case.sweep not in sweeps:
            continue
        t0 = time.perf_counter()
        run.case(case, generator, impls)
        _clear(device)
        log(f"  {bench.label} {case.sweep}={case.sweep_value} {case.dtype}: {time.perf_counter() - t0:.1f}s")
    return run.rows


class _OpRun:
    """The rows of one run_op call, made case by case, mode by mode, impl by impl."""

    def __init__(self, bench: OpBench, device, quick: bool, log, on_row):
        self.bench, self.device, self.quick, self.log, self.on_row = bench, device, quick, log, on_row
        self.rows: list[dict] = []
        self.printed_skips: set[tuple] = set()

    def emit(self, row: dict) -> None:
        self.rows.append(row)
        if self.on_row:
            self.on_row(row)

    def case(self, case: Case, generator, impls: set[str] | None) -> None:
        """Every mode of every impl on one case's inputs."""
        bench = self.bench
        q, k, v, kw = inputs = bench.inputs(case, self.device, generator)
        candidates = [c for c in _impls(bench, case, self.device, self.quick, q, k, v, kw)
                      if not impls or c[0] in impls]
        reference = None
        if not any(c[0] == "reference" for c in candidates):
            with torch.no_grad():
                reference = bench.peers["reference"](q, k, v, **kw)
        for mode in MODES:
            reference = self.mode(case, mode, candidates, inputs, reference)

    def mode(self, case: Case, mode: str, candidates, inputs, reference):
        """The rows of one mode, peers first; returns the reference output (measured here when it is a candidate)."""
        bench, device = self.bench, self.device
        flops, nbytes = bench.cost(case, mode)
        peer_rows = []
        for impl, role, fn, skip, notes in candidates:
            fields = dict(role=role, mode=mode, sweep=case.sweep, sweep_value=case.sweep_value,
                          shape=dict(case.shape), dtype=case.dtype, flops=flops, bytes=nbytes,
                          notes=notes, targets=bench.targets(impl, mode, device, case.dtype))
            if role == "peer" and skip is None:
                skip = _peer_skip_reason(bench, impl, case, mode, device, self.quick)
            row, out = self.measure(impl, fn, skip, fields, inputs)
            if row["status"] != "ok":
                continue
            if impl == "reference" and out is not None:
                reference = out
            row["max_abs_err"] = _max_abs_err(out, reference)
            if role == "peer":
                peer_rows.append(row)
            else:
                add_speedups(peer_rows + [row])
            self.emit(row)
            del out
        return reference

    def measure(self, impl: str, fn, skip: str | None, fields: dict, inputs) -> tuple[dict, object]:
        """(row, forward output or None) of one impl in one mode; a row that is not ok is emitted here."""
        name, mode = self.bench.name, fields["mode"]
        if skip:
            self.emit(make_row("ops", name, impl, "skipped", reason=skip, **fields))
            if (impl, skip) not in self.printed_skips:
                self.log(f"  skip {impl} for {self.bench.label}: {skip}")
                self.printed_skips.add((impl, skip))
            return self.rows[-1], None
        try:
            ms, out = time_mode(fn, *inputs, mode, self.device, self.quick)
        except NotImplementedError as e:
            self.emit(make_row("ops", name, impl, "skipped", reason=str(e), **fields))
            return self.rows[-1], None
        except Exception as e:
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self.log(f"  FAILED {impl} {self.bench.label} {mode}: {msg}")
            if self.log is print:
                traceback.print_exc(limit=3)
            self.emit(make_row("ops", name, impl, "failed", reason=msg, **fields))
            _clear(self.device)
            return self.rows[-1], None
        return make_row("ops", name, impl, "ok", time_ms=ms, **fields), out


def add_speedups(rows: list[dict]) -> None:
    """speedup[peer] = peer time / our time, for every (mode) group, on rows of ours."""
    by_mode: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["status"] == "ok" and r["role"] == "peer":
            by_mode.setdefault(r["mode"], {})[r["impl"]] = r["time_ms"]
    for r in rows:
        if r["status"] == "ok" and r["role"] == "ours":
            r["speedup"] = {p: t / r["time_ms"] for p, t in by_mode.get(r["mode"], {}).items()}


def run(quick: bool, device: torch.device, dtypes: list[str], log=print,
        sweeps: set[str] | None = None, op_names: set[str] | None = None) -> list[dict]:
    """Rows for every op (or those in op_names), every case (or those whose sweep is in sweeps)."""
    rows = []
    for bench in OP_BENCHES:
        if op_names and bench.name not in op_names and bench.label not in op_names:
            continue
        log(f"== {bench.name}")
        rows += run_op(bench, device, quick, dtypes, log, sweeps)
    return rows
