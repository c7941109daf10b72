"""The Python stages of bench/gpu_check.sh (see docs/benchmarks.md, "GPU check").

    python -m bench.gpu_check env   OUT_DIR [--dry-run]        stage 1: env.json (versions, peaks)
    python -m bench.gpu_check bench PART OUT_DIR [--dry-run]   stage 3: rows into OUT_DIR/results.jsonl

PART is one of PARTS, in the order the runbook runs them (most valuable first):
cca (ours against the reference and pad/repeat + SDPA), neighbour (self- and
cross-attention), model (training step, fused against reference), flex (CCA's
FlexAttention peer: compiling it is the slow part, so it comes last).

Each row is appended to OUT_DIR/results.jsonl the moment it is measured
(bench/common.py's schema), so a stage killed at its time budget keeps what
it measured. The roofline uses the peaks stage 1 measured (env.json). With
--dry-run everything runs on the CPU at tiny shapes and every row says
dry_run: true; `python -m bench import` refuses such rows.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

from .args import OneLineParser, existing_folder, fail, with_exit_codes

PROG = "python -m bench.gpu_check"
NO_GPU = "torch sees no CUDA device (use --dry-run on a CPU machine)"

PARTS = ("cca", "neighbour", "model", "flex")
RESULTS = "results"  # OUT_DIR/results.jsonl
ENV = "env.json"

# The paper's shapes (B=8, N=2048, m=64, K=2, R=128, Hq=16), bf16, most valuable first;
# the dry run keeps their structure (grouped heads, two head dims) at tiny sizes, in fp32.
GPU_DIMS = [dict(Hkv=16, D=128), dict(Hkv=4, D=128), dict(Hkv=16, D=64), dict(Hkv=4, D=64)]
DRY_DIMS = [dict(Hkv=4, D=32), dict(Hkv=2, D=16)]
SHAPES = {
    "gpu": {"CCA": dict(B=8, N=2048, m=64, K=2, R=128, Hq=16, mask=False),
            "NSA": dict(B=8, L=32, K=2, R=128, Hq=16, mask=True),
            "NCA": dict(B=8, L=32, K=2, R=128, M=64, Hq=16, mask=True)},
    "dry": {"CCA": dict(B=1, N=100, m=16, K=2, R=32, Hq=4, mask=False),
            "NSA": dict(B=1, L=4, K=2, R=32, Hq=4, mask=True),
            "NCA": dict(B=1, L=4, K=2, R=32, M=16, Hq=4, mask=True)},
}


def cases(label: str, dry_run: bool):
    """The runbook's cases of one op: sweep "paper" (Hkv = Hq) and "paper_gqa", sweep_value D."""
    from .ops import Case

    base = SHAPES["dry" if dry_run else "gpu"][label]
    dtype = "fp32" if dry_run else "bf16"
    out = []
    for dims in DRY_DIMS if dry_run else GPU_DIMS:
        sweep = "paper" if dims["Hkv"] == base["Hq"] else "paper_gqa"
        out.append(Case(sweep, dims["D"], {**base, **dims}, dtype))
    return out


# ---------------------------------------------------------------------------
# Stage 1: the machine
# ---------------------------------------------------------------------------

def _command_output(argv: list[str], timeout: float = 30) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({argv[0]}: {type(e).__name__}: {e})"
    return (done.stdout + done.stderr).strip()


NVIDIA_QUERY = ("name,driver_version,compute_cap,memory.total,clocks.sm,clocks.max.sm,clocks.mem,"
                "clocks.max.mem,power.draw,power.limit,temperature.gpu,utilization.gpu")


def _nvidia_query() -> str | None:
    return _command_output(["nvidia-smi", f"--query-gpu={NVIDIA_QUERY}", "--format=csv"])


def environment(dry_run: bool) -> dict:
    """Versions, the device, and its measured peaks (copy bandwidth, matmul rates)."""
    import torch

    from .common import RunContext

    device = torch.device("cpu" if dry_run else "cuda")
    info = {"nvidia_smi": _command_output(["nvidia-smi"]), "clocks_before": _nvidia_query()}
    ctx = RunContext(device, quick=dry_run)
    ctx.measure_peaks(["fp32"] if dry_run else ["bf16"])
    info["clocks_after_peaks"] = _nvidia_query()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "capability": list(torch.cuda.get_device_capability(device)),
                       "memory_bytes": props.total_memory, "multiprocessors": props.multi_processor_count}
    info.update(
        run_id=ctx.run_id, date=ctx.date, dry_run=ctx.dry_run, commit=ctx.commit, dirty=ctx.dirty,
        device=device.type, device_name=ctx.device_name, device_slug=ctx.device_slug,
        versions={**ctx.versions, "nvcc": (_command_output(["nvcc", "--version"]) or "").splitlines()[-1:]},
        peak_gbps=ctx.peak_gbps, peak_tflops=ctx.peak_tflops,
        cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
        loadavg=os.getloadavg(), torch_threads=torch.get_num_threads(),
        env={k: v for k, v in os.environ.items()
             if k.startswith(("TRITON_", "TORCH_", "CUDA_", "MAX_JOBS", "BENCH_", "RETRO_KERNELS_"))},
    )
    return info


def write_env(out_dir: str, dry_run: bool) -> int:
    import torch

    if not dry_run and not torch.cuda.is_available():
        return fail(PROG, NO_GPU, 2)
    info = environment(dry_run)
    path = os.path.join(out_dir, ENV)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, sort_keys=True, default=str)
    os.replace(path + ".tmp", path)
    rates = ", ".join(f"{k} {v:.1f}" for k, v in info["peak_tflops"].items())
    print(f"{info['device_name']}: copy {info['peak_gbps']:.0f} GB/s, matmul TFLOP/s {rates}; "
          f"torch {info['versions']['torch']}, triton {info['versions']['triton']}")
    return 0


# ---------------------------------------------------------------------------
# Stage 3: benchmarks
# ---------------------------------------------------------------------------

class RowSink:
    """Finalizes each row (run keys, rates from stage 1's peaks) and appends it at once."""

    def __init__(self, out_dir: str, device, dry_run: bool):
        from .common import RunContext

        self.out_dir = out_dir
        self.ctx = RunContext(device, quick=dry_run)
        self.counts = {"ok": 0, "skipped": 0, "failed": 0}
        env_path = os.path.join(out_dir, ENV)
        if os.path.exists(env_path):
            with open(env_path, encoding="utf-8") as f:
                env = json.load(f)
            self.ctx.peak_gbps, self.ctx.peak_tflops = env.get("peak_gbps"), env.get("peak_tflops") or {}
        else:
            print(f"no {ENV} from stage 1: measuring the peaks again")
            self.ctx.measure_peaks(["fp32"] if dry_run else ["bf16"])

    def __call__(self, row: dict) -> None:
        from .common import append_jsonl

        full = self.ctx.finalize_row(row)
        append_jsonl([full], self.out_dir, RESULTS)
        self.counts[full["status"]] += 1
        if full["status"] == "ok":
            pct = full.get("roofline_pct")
            print(f"  {full['name']} {full['mode']} {full['impl']} {full.get('shape')}: "
                  f"{full['time_ms']:.3f} ms" + (f", {pct:.0f}% of roofline" if pct is not None else ""))


def _ops_part(sink: RowSink, device, dry_run: bool, labels: tuple[str, ...], impls=None) -> None:
    from . import ops

    for bench in ops.OP_BENCHES:
        if bench.label in labels:
            print(f"== {bench.name}")
            ops.run_op(bench, device, dry_run, [], sweeps=None, cases=cases(bench.label, dry_run),
                       impls=impls, on_row=sink)


def run_part(part: str, out_dir: str, dry_run: bool) -> int:
    import torch

    from . import peers
    from .cli import run_hook

    device = torch.device("cpu" if dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        return fail(PROG, NO_GPU, 2)
    sink = RowSink(out_dir, device, dry_run)
    t0 = time.perf_counter()
    if part == "cca":
        ours_and_sdpa = {n for n in peers.CCA_PEERS if n != "flex_attention"} | \
                        {"retro_kernels:triton", "retro_kernels:cpu", "retro_kernels:cuda"}
        _ops_part(sink, device, dry_run, ("CCA",), impls=ours_and_sdpa)
    elif part == "neighbour":
        _ops_part(sink, device, dry_run, ("NSA", "NCA"))
    elif part == "flex":
        _ops_part(sink, device, dry_run, ("CCA",), impls={"flex_attention"})
    elif part == "model":
        for row in run_hook("model", dry_run, device):
            sink(row)
    print(f"{part}: {sink.counts['ok']} rows ok, {sink.counts['skipped']} skipped, "
          f"{sink.counts['failed']} failed in {time.perf_counter() - t0:.1f}s")
    return 1 if sink.counts["failed"] else 0


def main(argv=None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__)
    sub = p.add_subparsers(dest="stage", required=True)
    env = sub.add_parser("env", help="stage 1: the machine and its peaks, into OUT_DIR/env.json")
    env.add_argument("out_dir", type=existing_folder)
    bench = sub.add_parser("bench", help="stage 3: one part of the benchmarks, into OUT_DIR/results.jsonl")
    bench.add_argument("part", choices=PARTS)
    bench.add_argument("out_dir", type=existing_folder)
    for parser in (env, bench):
        parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (tests the runbook)")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["BENCH_DRY_RUN"] = "1"
    if args.stage == "env":
        return with_exit_codes(PROG, write_env)(args.out_dir, args.dry_run)
    return with_exit_codes(PROG, run_part)(args.part, args.out_dir, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
