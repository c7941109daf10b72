"""CPU chunked cross-attention: the C++ kernel (backend="cpu") vs pad + reshape +
PyTorch's scaled_dot_product_attention vs the reference, forward + backward; and,
with --neighbour, the two neighbour-encoder ops against their SDPA peers.

    python -m bench.cpu_cca [--quick] [--reps N] [--threads T] [--no-memory] [--neighbour] [--json]
    python -m bench.cpu_cca --against DIR [--runs 3] [...]    (before/after: DIR another checkout)

`run(quick)` returns one row per (variant, mask), in bench/common.py's schema, with
times (ms, best and median of interleaved repeats), the peak extra memory of one
forward+backward (measured in a fresh subprocess: peak RSS, VmHWM, minus RSS before
the call), and the achieved GFLOP/s as a fraction of the torch.mm (2048 x 2048 fp32)
rate, timed in the same interleaved rounds. FLOPs: forward 4*B*L*Hq*m*K*R*D (QK^T and
PV over the N // m attending chunks), forward+backward 3.5x that (the backward
recomputes QK^T and does four more products); nominal, also in the masked runs, where
the cpu kernel skips the masked keys.

Speed-ups are the median over rounds of (peer time / our time) within a round, so a
load spike hits both sides of a ratio alike; every row also records the machine's
load average before and after (`metrics.loadavg`), the CPU model, its ISA and the GEMM
the kernels chose (cpu_model, cpu_isa, cpu_gemm). RETRO_KERNELS_CPU_GEMM=avx2 (etc.)
measures the kernels with one GEMM forced, e.g. to stand in for an AVX2-only machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SHAPE = dict(B=2, N=1024, m=64, K=2, R=128, H=8, D=64)
VARIANTS = ("cpu", "pad_sdpa", "reference")


def make_inputs(B, N, m, K, R, H, D, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = N // m
    q = torch.randn(B, N, H, D, generator=g)
    k = torch.randn(B, L, K, R, H, D, generator=g)
    v = torch.randn(B, L, K, R, H, D, generator=g)
    # about 30% of neighbour tokens are padding; every chunk keeps real tokens
    mask = (torch.rand(B, L, K, R, generator=g) > 0.3) if masked else None
    if mask is not None:
        mask[..., 0] = True
    return q, k, v, mask


def pad_sdpa(q, k, v, m, mask):
    """RETRO's steps with PyTorch's fused attention: shift + pad, reshape, SDPA, un-shift."""
    B, N, H, D = q.shape
    _, L, K, R, _, _ = k.shape
    h = F.pad(q[:, m - 1:], (0, 0, 0, 0, 0, m - 1))  # shift by m-1, pad at the end
    used = N // m
    h = h[:, : used * m].reshape(B * used, m, H, D).transpose(1, 2)  # (B*L, H, m, D)
    kk = k[:, :used].reshape(B * used, K * R, H, D).transpose(1, 2)
    vv = v[:, :used].reshape(B * used, K * R, H, D).transpose(1, 2)
    attn_mask = None if mask is None else mask[:, :used].reshape(B * used, 1, 1, K * R)
    o = F.scaled_dot_product_attention(h, kk, vv, attn_mask=attn_mask)
    o = o.transpose(1, 2).reshape(B, used * m, H, D)
    return F.pad(o, (0, 0, 0, 0, m - 1, 0))[:, :N]  # un-shift: m-1 zero rows in front


def step_fn(variant, q, k, v, m, mask):
    """One forward + backward of `variant` on fresh leaf tensors."""
    from retro_kernels import chunked_cross_attention
    from retro_kernels.reference.chunked_cross_attention import chunked_cross_attention as reference

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))

    def step():
        for t in leaves:
            t.grad = None
        if variant == "cpu":
            out = chunked_cross_attention(*leaves, m, neighbour_mask=mask, backend="cpu")
        elif variant == "pad_sdpa":
            out = pad_sdpa(*leaves, m, mask)
        else:
            out = reference(*leaves, m, neighbour_mask=mask)
        out.backward(dout)
        return out

    return step


def forward_fn(variant, q, k, v, m, mask):
    from retro_kernels import chunked_cross_attention
    from retro_kernels.reference.chunked_cross_attention import chunked_cross_attention as reference

    def fwd():
        with torch.no_grad():
            if variant == "cpu":
                return chunked_cross_attention(q, k, v, m, neighbour_mask=mask, backend="cpu")
            if variant == "pad_sdpa":
                return pad_sdpa(q, k, v, m, mask)
            return reference(q, k, v, m, neighbour_mask=mask)

    return fwd


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes():
    """This process's peak RSS (VmHWM; unlike ru_maxrss it is not inherited from the parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss():
    try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_child(variant, masked, shape=None):
    """In this (fresh) process: peak RSS growth of one forward+backward, in bytes."""
    s = shape or SHAPE
    # warm up on a tiny shape: the first call of an op imports and sets up things once
    tiny = make_inputs(1, 2 * s["m"], s["m"], 1, 8, 1, 8, masked)
    step_fn(variant, *tiny[:3], s["m"], tiny[3])()
    q, k, v, mask = make_inputs(s["B"], s["N"], s["m"], s["K"], s["R"], s["H"], s["D"], masked)
    step = step_fn(variant, q, k, v, s["m"], mask)
    _reset_peak_rss()
    before = _rss_bytes()
    step()
    return max(0, _peak_rss_bytes() - before)


def peak_memory(variant, masked, shape=None):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"import bench.cpu_cca as b; print(b._peak_child({variant!r}, {masked!r}, {shape!r}))"
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return int(out.stdout.strip().splitlines()[-1])


QUICK_SHAPE = dict(SHAPE, B=1, N=256)  # --quick: the same kernels, a quarter of the work
IMPL = {"cpu": "retro_kernels:cpu", "pad_sdpa": "sdpa", "reference": "reference"}
# targets (recorded, never asserted): forward+backward vs pad + SDPA, and the
# fraction of the torch.mm rate; the neighbour ops vs their fastest SDPA peer
TARGET_SPEEDUP = 1.25
TARGET_OF_MM = 0.6
TARGET_NEIGHBOUR_SPEEDUP = 1.2


def loadavg() -> str | None:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


def _machine() -> dict:
    """cpu_model, cpu_isa, cpu_gemm (bench.common.cpu_fields; a checkout older than it,
    measured with --against, gets what its extension can say)."""
    try:
        from bench.common import cpu_fields
    except ImportError:
        from bench.common import cpu_model_name

        gemm = getattr(torch.ops.retro_kernels_cpu, "gemm_backend", None)
        return {"cpu_model": cpu_model_name(), "cpu_isa": None, "cpu_gemm": gemm() if gemm else None}
    return cpu_fields()


def interleaved(fns: dict, reps: int) -> dict[str, list[float]]:
    """Seconds of each fn, `reps` rounds, every fn once per round (so load hits all alike)."""
    for fn in fns.values():
        fn()  # warm up
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    return times


def median_ratio(times: dict[str, list[float]], peer: str, ours: str) -> float:
    """Median over rounds of peer time / our time in the same round."""
    return statistics.median(p / o for p, o in zip(times[peer], times[ours]))


def cca_rows(quick: bool, reps: int, memory: bool) -> list[dict]:
    s = QUICK_SHAPE if quick else SHAPE
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm_flops = 2 * 2048**3
    flops_fwd = 4 * s["B"] * (s["N"] // s["m"]) * s["H"] * s["m"] * s["K"] * s["R"] * s["D"]
    flops = 3.5 * flops_fwd
    rows = []
    for masked in (False, True):
        load_before = loadavg()
        q, k, v, mask = make_inputs(s["B"], s["N"], s["m"], s["K"], s["R"], s["H"], s["D"], masked)
        fns = {"mm": lambda: torch.mm(a, b)}
        for name in VARIANTS:
            fns[f"fwd:{name}"] = forward_fn(name, q, k, v, s["m"], mask)
            fns[name] = step_fn(name, q, k, v, s["m"], mask)
        times = interleaved(fns, reps)
        # per round: our GFLOP/s over the torch.mm GFLOP/s of that round
        of_mm = {name: statistics.median((flops / t) / (mm_flops / mm) for t, mm in zip(times[name], times["mm"]))
                 for name in VARIANTS}
        mm_rate = mm_flops / min(times["mm"]) / 1e9
        machine = _machine()
        for name in VARIANTS:
            rows.append(cca_row(name, s, masked, times, flops, of_mm[name], mm_rate, machine,
                                peak_memory(name, masked, s) if memory else None,
                                [load_before, loadavg()]))
    return rows


def cca_row(name, s, masked, times, flops, of_mm, mm_rate, machine, peak, load) -> dict:
    best, median = min(times[name]), statistics.median(times[name])
    ours = name == "cpu"
    speedup = median_ratio(times, "pad_sdpa", name)
    targets, met = {}, {}
    if ours:
        targets = {"speedup_min": {"sdpa": TARGET_SPEEDUP}, "fraction_of_matmul_min": TARGET_OF_MM}
        met = {"speedup_min.sdpa": speedup >= TARGET_SPEEDUP, "fraction_of_matmul_min": of_mm >= TARGET_OF_MM}
    return {
        "suite": "cpu_cca",
        "name": "chunked_cross_attention",
        "impl": IMPL[name],
        "role": "ours" if ours else "peer",
        "mode": "fwd+bwd",
        "sweep": "mask",
        "sweep_value": masked,
        "shape": dict(s, mask=masked),
        "dtype": "fp32",
        "status": "ok",
        "reason": None,
        "time_ms": 1e3 * median,
        "flops": flops,
        "tflops": flops / median / 1e12,
        "matmul_pct": 100 * of_mm,
        "speedup": {"sdpa": speedup} if ours else {},
        "targets": targets,
        "targets_met": met,
        **machine,
        "metrics": {
            "threads": torch.get_num_threads(),
            "rounds": len(times[name]),
            "fwd_ms_best": 1e3 * min(times[f"fwd:{name}"]),
            "fwd_ms_median": 1e3 * statistics.median(times[f"fwd:{name}"]),
            "fwd_bwd_ms_best": 1e3 * best,
            "fwd_bwd_ms_median": 1e3 * median,
            "speedup_vs_pad_sdpa_median": speedup,
            "speedup_vs_pad_sdpa_best": min(times["pad_sdpa"]) / best,
            "peak_mem_bytes": peak,
            "fwd_bwd_gflops_best": flops / best / 1e9,
            "matmul_gflops": mm_rate,
            "fraction_of_matmul": of_mm,
            "loadavg": load,
        },
        "notes": "speedup and fraction_of_matmul: medians over rounds of same-round ratios; time_ms is the median",
    }


def neighbour_cases(quick: bool):
    """(bench, case) pairs: bench/ops.py's CPU base shapes of the two neighbour ops, and
    the cross-attention with K=1 (its slowest case against SDPA)."""
    from bench import ops

    cpu = torch.device("cpu")
    for bench in (ops.NSABench(), ops.NCABench()):
        for case in bench.cases(cpu, quick, ["fp32"]):
            if case.sweep == "base" or (bench.label == "NCA" and case.sweep == "K" and case.sweep_value == 1):
                yield bench, case


def neighbour_rows(quick: bool, reps: int) -> list[dict]:
    """Forward+backward of backend="cpu" and of each SDPA peer, interleaved."""
    rows = []
    for bench, case in neighbour_cases(quick):
        load_before = loadavg()
        q, k, v, kw = bench.inputs(case, torch.device("cpu"), torch.Generator().manual_seed(0))
        impls = {"retro_kernels:cpu": bench.ours("cpu")}
        impls.update({peer: fn for peer, fn in bench.peers.items() if peer.startswith("sdpa")})
        dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]

        def step(fn):
            return lambda: torch.autograd.grad(fn(*leaves, **kw), leaves, dout)

        times = interleaved({name: step(fn) for name, fn in impls.items()}, reps)
        flops, _ = bench.cost(case, "fwd+bwd")
        speedups = {p: median_ratio(times, p, "retro_kernels:cpu") for p in impls if p.startswith("sdpa")}
        machine, load = _machine(), [load_before, loadavg()]
        for name in impls:
            ours = name == "retro_kernels:cpu"
            fastest = min(speedups.values())
            median = statistics.median(times[name])
            rows.append({
                "suite": "cpu_cca", "name": bench.name, "impl": name, "role": "ours" if ours else "peer",
                "mode": "fwd+bwd", "sweep": case.sweep, "sweep_value": case.sweep_value,
                "shape": dict(case.shape), "dtype": "fp32", "status": "ok", "reason": None,
                "time_ms": 1e3 * median, "flops": flops, "tflops": flops / median / 1e12,
                "speedup": speedups if ours else {},
                "targets": {"speedup_min_fastest_sdpa": TARGET_NEIGHBOUR_SPEEDUP} if ours else {},
                "targets_met": {"speedup_min_fastest_sdpa": fastest >= TARGET_NEIGHBOUR_SPEEDUP} if ours else {},
                **machine,
                "metrics": {"threads": torch.get_num_threads(), "rounds": reps,
                            "fwd_bwd_ms_best": 1e3 * min(times[name]), "fwd_bwd_ms_median": 1e3 * median,
                            "loadavg": load},
                "notes": "speedup: median over rounds of same-round (peer time / ours)",
            })
    return rows


def run(quick: bool = False, reps: int | None = None, memory: bool = True, neighbour: bool = False) -> list[dict]:
    """Measure every variant at SHAPE (QUICK_SHAPE if quick), with and without a neighbour
    mask; with `neighbour`, the neighbour ops too.

    Rows follow bench/common.py's schema (suite "cpu_cca", mode "fwd+bwd", sweep "mask"
    for CCA); time_ms is the median, the best times and the rest are under metrics.
    """
    from retro_kernels import _native

    missing = _native.missing_reason("cpu")
    if missing:
        raise RuntimeError(missing)
    reps = reps or (3 if quick else 10)
    rows = cca_rows(quick, reps, memory)
    if neighbour:
        rows += neighbour_rows(quick, reps)
    return rows


def print_rows(rows: list[dict]) -> None:
    first = rows[0]
    m = first["metrics"]
    print(f"{first['cpu_model']} ({first['cpu_isa']}), {m['threads']} threads, GEMM: {first['cpu_gemm']}")
    print(f"load average before/after: {m['loadavg']}; torch.mm {m['matmul_gflops']:.0f} GFLOP/s (best round)")
    print(f"shape {first['shape']}, fp32, {m['rounds']} interleaved rounds")
    print(f"{'variant':<18} {'mask':<5} {'fwd ms':>8} {'fwd+bwd ms':>11} {'median':>8} {'x sdpa':>7} "
          f"{'peak MiB':>9} {'GFLOP/s':>8} {'of mm':>6}")
    for r in rows:
        if r["name"] != "chunked_cross_attention":
            continue
        m = r["metrics"]
        peak = "-" if m["peak_mem_bytes"] is None else f"{m['peak_mem_bytes'] / 2**20:.1f}"
        print(f"{r['impl']:<18} {str(r['sweep_value']):<5} {m['fwd_ms_best']:8.1f} {m['fwd_bwd_ms_best']:11.1f} "
              f"{m['fwd_bwd_ms_median']:8.1f} {m['speedup_vs_pad_sdpa_median']:7.2f} "
              f"{peak:>9} {m['fwd_bwd_gflops_best']:8.1f} {m['fraction_of_matmul']:6.2f}")
    for r in rows:
        if r["name"] == "chunked_cross_attention":
            continue
        m = r["metrics"]
        vs = ", ".join(f"{p} {x:.2f}x" for p, x in r["speedup"].items())
        print(f"{r['name']:<26} [{r['sweep']}={r['sweep_value']}] {r['impl']:<18} "
              f"median {m['fwd_bwd_ms_median']:7.1f} ms  best {m['fwd_bwd_ms_best']:7.1f} ms  {vs}")


def _one_run(tree: str, args) -> list[dict]:
    """This file's measurement run in a subprocess on `tree`'s code (its retro_kernels and
    bench packages; this file itself comes from here, so an older checkout works too)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--json", "--no-memory", "--reps", str(args.reps or 10)]
    cmd += ["--quick"] * args.quick + ["--neighbour"] * args.neighbour
    cmd += ["--threads", str(args.threads)] if args.threads else []
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"run on {tree} failed:\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def compare(args) -> None:
    """--against DIR: runs alternating between this checkout and DIR, then per row the
    median over runs of each run's (same-round median) speed-up and time."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this": here, "against": os.path.abspath(args.against)}
    results = {name: [] for name in trees}
    for i in range(args.runs):
        for name, tree in trees.items():
            results[name].append(_one_run(tree, args))
            print(f"run {i + 1}/{args.runs} on {name} ({tree}): load {loadavg()}", flush=True)
    first = results["this"][0][0]
    print(f"\n{first['cpu_model']} ({first['cpu_isa']}), GEMM here: {first['cpu_gemm']}, "
          f"there: {results['against'][0][0]['cpu_gemm']}")
    print(f"{'op':<26} {'case':<10} {'impl':<18} {'ms there':>9} {'ms here':>8} {'x peer there':>13} "
          f"{'x peer here':>12} {'of mm there':>12} {'of mm here':>11}")
    for row in results["this"][0]:
        if row["role"] != "ours":
            continue
        key = (row["name"], row["sweep"], row["sweep_value"], row["impl"])
        stats = {}
        for name, runs in results.items():
            same = [r for run in runs for r in run if (r["name"], r["sweep"], r["sweep_value"], r["impl"]) == key]
            stats[name] = {
                "ms": statistics.median(r["time_ms"] for r in same),
                "x": statistics.median(min(r["speedup"].values()) for r in same),
                "mm": statistics.median(r["metrics"].get("fraction_of_matmul") or float("nan") for r in same),
            }
        case = f"{row['sweep']}={row['sweep_value']}"
        print(f"{row['name']:<26} {case:<10} {row['impl']:<18} {stats['against']['ms']:9.1f} {stats['this']['ms']:8.1f} "
              f"{stats['against']['x']:13.2f} {stats['this']['x']:12.2f} {stats['against']['mm']:12.2f} "
              f"{stats['this']['mm']:11.2f}")
    print("x peer: against the fastest SDPA peer; medians over runs")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None, help="interleaved rounds (default 10, 3 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's own)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--neighbour", action="store_true", help="also the neighbour ops at bench ops' base shapes")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    parser.add_argument("--against", metavar="DIR", default=None,
                        help="compare with another checkout (built), runs alternating between the two")
    parser.add_argument("--runs", type=int, default=3, help="with --against: runs on each side (default 3)")
    args = parser.parse_args(argv)
    for name in ("reps", "threads", "runs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.against:
        if not os.path.isdir(os.path.join(args.against, "retro_kernels")):
            parser.error(f"--against must be a retro_kernels checkout, got {args.against}")
        return compare(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.quick, args.reps, not args.no_memory, args.neighbour)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print_rows(rows)


if __name__ == "__main__":
    main()
