"""CPU chunked cross-attention: the C++ kernel (backend="cpu") vs pad + reshape +
PyTorch's scaled_dot_product_attention vs the reference, forward + backward.

    python -m bench.cpu_cca [--quick]

`run(quick)` returns one dict per (variant, mask) with times (ms, best and
median of interleaved repeats), the peak extra memory of one forward+backward
(measured in a fresh subprocess: peak RSS minus RSS before the call), and the
achieved GFLOP/s as a fraction of a torch.mm (2048 x 2048 fp32) rate measured in
the same run. FLOPs: forward 4*B*L*Hq*m*K*R*D (QK^T and PV over the N // m
attending chunks), forward+backward 3.5x that (the backward recomputes QK^T and
does four more products).
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


def matmul_gflops(reps=5):
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * 2048**3 / best / 1e9


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_child(variant, masked):
    """In this (fresh) process: peak RSS growth of one forward+backward, in bytes."""
    s = SHAPE
    # warm up on a tiny shape: the first call of an op imports and sets up things once
    tiny = make_inputs(1, 2 * s["m"], s["m"], 1, 8, 1, 8, masked)
    step_fn(variant, *tiny[:3], s["m"], tiny[3])()
    q, k, v, mask = make_inputs(s["B"], s["N"], s["m"], s["K"], s["R"], s["H"], s["D"], masked)
    step = step_fn(variant, q, k, v, s["m"], mask)
    before = _rss_bytes()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(0, peak - before)


def peak_memory(variant, masked):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"import bench.cpu_cca as b; print(b._peak_child({variant!r}, {masked!r}))"
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return int(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> list[dict]:
    """Measure every variant at SHAPE, with and without a neighbour mask."""
    from retro_kernels import _native

    missing = _native.missing_reason("cpu")
    if missing:
        raise RuntimeError(missing)
    s = SHAPE
    reps = 3 if quick else 10
    mm_rate = matmul_gflops(3 if quick else 5)
    flops_fwd = 4 * s["B"] * (s["N"] // s["m"]) * s["H"] * s["m"] * s["K"] * s["R"] * s["D"]
    rows = []
    for masked in (False, True):
        q, k, v, mask = make_inputs(s["B"], s["N"], s["m"], s["K"], s["R"], s["H"], s["D"], masked)
        steps = {name: step_fn(name, q, k, v, s["m"], mask) for name in VARIANTS}
        fwds = {name: forward_fn(name, q, k, v, s["m"], mask) for name in VARIANTS}
        for fn in list(steps.values()) + list(fwds.values()):
            fn()  # warm up
        times = {name: [] for name in VARIANTS}
        fwd_times = {name: [] for name in VARIANTS}
        for _ in range(reps):  # interleaved, so that load from other processes hits all alike
            for name in VARIANTS:
                fwd_times[name].append(_timed(fwds[name]))
                times[name].append(_timed(steps[name]))
        best_sdpa = min(times["pad_sdpa"])
        for name in VARIANTS:
            best = min(times[name])
            gflops = 3.5 * flops_fwd / best / 1e9
            rows.append({
                "bench": "cpu_cca",
                "variant": name,
                "mask": masked,
                **s,
                "dtype": "float32",
                "threads": torch.get_num_threads(),
                "fwd_ms_best": 1e3 * min(fwd_times[name]),
                "fwd_ms_median": 1e3 * statistics.median(fwd_times[name]),
                "fwd_bwd_ms_best": 1e3 * best,
                "fwd_bwd_ms_median": 1e3 * statistics.median(times[name]),
                "speedup_vs_pad_sdpa": best_sdpa / best,
                "peak_extra_mib": peak_memory(name, masked) / 2**20,
                "fwd_bwd_gflops": gflops,
                "matmul_gflops": mm_rate,
                "fraction_of_matmul": gflops / mm_rate,
            })
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    args = parser.parse_args(argv)
    rows = run(args.quick)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"shape {SHAPE}, fp32, {rows[0]['threads']} threads, torch.mm {rows[0]['matmul_gflops']:.0f} GFLOP/s")
    print(f"{'variant':<10} {'mask':<5} {'fwd ms':>8} {'fwd+bwd ms':>11} {'median':>8} {'x sdpa':>7} "
          f"{'peak MiB':>9} {'GFLOP/s':>8} {'of mm':>6}")
    for r in rows:
        print(f"{r['variant']:<10} {str(r['mask']):<5} {r['fwd_ms_best']:8.1f} {r['fwd_bwd_ms_best']:11.1f} "
              f"{r['fwd_bwd_ms_median']:8.1f} {r['speedup_vs_pad_sdpa']:7.2f} {r['peak_extra_mib']:9.1f} "
              f"{r['fwd_bwd_gflops']:8.1f} {r['fraction_of_matmul']:6.2f}")


if __name__ == "__main__":
    main()
