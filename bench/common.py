"""What every benchmark shares: the row schema, timing, the machine's peaks, output.

Row schema
==========
Every benchmark module returns a list of dicts ("rows"); the CLI prints them
as a table and appends them, one JSON object per line, to
`<out>/<device-slug>.jsonl`. A module fills the *measurement* keys; the CLI
adds the *run* keys (`finalize_row`). Keys (all JSON-serialisable):

Measurement keys, filled by the benchmark module:
    suite         str   "ops", "model", "retrieval", "cpu_cca" (the module)
    name          str   what is measured: an op name ("chunked_cross_attention"),
                        "train_step", "faiss_search", ...
    impl          str   who computes it: "retro_kernels:triton", "reference",
                        "sdpa", "flex_attention", "retro_pytorch", ...
    role          str   "ours" (a retro_kernels backend) or "peer"
    mode          str   "fwd", "bwd", "fwd+bwd", or a free word ("train", "search")
    sweep         str   which series the row belongs to: "paper", "K", "D", "N",
                        "GQA", "mask", "quick", ... (plots draw one line per impl
                        along `sweep_value`)
    sweep_value   number|str|None   the swept quantity's value for this row
    shape         dict  the problem size, e.g. {"B":.., "N":.., "m":.., "K":.., ...}
    dtype         str   "fp32", "fp16", "bf16"
    status        str   "ok", "skipped" (cannot run here) or "failed" (raised)
    reason        str|None   why skipped/failed; None when ok
    time_ms       float|None   median wall time of one call
    flops         float|None   floating-point operations of one call (model: docs/spec.md#cost-model)
    bytes         float|None   bytes one call must move at least (the roofline model)
    tflops        float|None   flops / time
    gbps          float|None   bytes / time, GB/s (1e9 bytes)
    roofline_pct  float|None   gbps / measured peak bandwidth * 100
    matmul_pct    float|None   tflops / measured matmul peak * 100
    speedup       dict  {peer impl: peer time / this time}, for role "ours"
    max_abs_err   float|None   forward output vs the reference at this shape
    targets       dict  the benchmark's goals that apply to this row (recorded, never asserted):
                        {"roofline_pct_min": 85, "speedup_min": {"sdpa": 1.3}, ...}
    targets_met   dict  {target name: bool} for the targets that could be evaluated
    metrics       dict  anything else a module measures (tokens_per_s, peak_mem_bytes, ...)
    notes         str|None   caveats (e.g. "flex_attention not compiled under --quick")

Run keys, added by the CLI (`finalize_row`):
    run_id, date (UTC ISO 8601), commit, dirty, versions {python, torch, triton,
    retro_kernels, numpy, flash_attn, retro_pytorch}, device, device_name,
    device_slug, peak_gbps (measured copy bandwidth), peak_tflops (measured
    matmul rate, in the row's dtype where measured, else fp32), threads, quick,
    dry_run (True for rows of `bench/gpu_check.sh --dry-run`: tiny CPU shapes that
    test the runbook, never numbers to publish), host_note; on the CPU also cpu_model,
    cpu_isa ("amx", "avx512f", "avx2", ...) and cpu_gemm (the GEMM the C++ CPU kernels
    chose, `cpu_fields`).

A run made of several processes (bench/gpu_check.sh) shares one run id and
date through the environment: BENCH_RUN_ID, BENCH_RUN_DATE, BENCH_DRY_RUN=1.

A module may leave out any measurement key except suite, name, impl and
status; missing ones are filled with None/{} by `finalize_row`.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import uuid
from typing import Callable

import torch

REQUIRED_KEYS = ("suite", "name", "impl", "status")
MEASUREMENT_DEFAULTS = {
    "role": "peer",
    "mode": None,
    "sweep": None,
    "sweep_value": None,
    "shape": {},
    "dtype": None,
    "reason": None,
    "time_ms": None,
    "flops": None,
    "bytes": None,
    "tflops": None,
    "gbps": None,
    "roofline_pct": None,
    "matmul_pct": None,
    "speedup": {},
    "max_abs_err": None,
    "targets": {},
    "targets_met": {},
    "metrics": {},
    "notes": None,
}
STATUSES = ("ok", "skipped", "failed")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def make_row(suite: str, name: str, impl: str, status: str = "ok", **fields) -> dict:
    """A row with every measurement key present (see the module doc)."""
    row = {"suite": suite, "name": name, "impl": impl, "status": status}
    for key, default in MEASUREMENT_DEFAULTS.items():
        row[key] = fields.pop(key, default() if callable(default) else
                              (dict(default) if isinstance(default, dict) else default))
    if fields:
        row["metrics"] = {**row["metrics"], **fields}
    return row


# ---------------------------------------------------------------------------
# The machine and the checkout
# ---------------------------------------------------------------------------

def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_fields() -> dict:
    """cpu_model, cpu_isa and cpu_gemm: the CPU, its best vector ISA, and the GEMM the
    C++ CPU kernels chose so far in this process (retro_kernels.cpu.gemm.gemm_info)."""
    from retro_kernels.cpu.gemm import gemm_info

    info = gemm_info()
    return {"cpu_model": info["cpu_model"], "cpu_isa": info["isa"], "cpu_gemm": info["summary"] or info["error"]}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model_name()} ({os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """File name stem for the device's results: 'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc-2c'."""
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return "cpu-" + slug(cpu_model_name()) + f"-{os.cpu_count()}c"


def git_commit() -> tuple[str | None, bool | None]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        # results files change with every run: they do not make the code dirty
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                     ".", ":(exclude)bench/results"],
                                    cwd=root, capture_output=True, text=True).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return None, None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def versions() -> dict:
    import retro_kernels

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "retro_kernels": retro_kernels.__version__,
    }
    for dist in ("triton", "numpy", "flash-attn", "retro-pytorch", "faiss-cpu"):
        out[dist.replace("-", "_")] = _version(dist)
    return out


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_ms(fn: Callable[[], object], device: torch.device, quick: bool = False) -> float:
    """Median wall time of fn() in milliseconds, after a warm-up call.

    GPU: triton.testing.do_bench (CUDA events, L2 flushed between calls,
    median). CPU: torch.utils.benchmark.Timer.blocked_autorange on all of
    torch's threads (median of blocks).
    """
    fn()  # warm-up: compilation, autotuning, allocator
    synchronize(device)
    if device.type == "cuda":
        import triton.testing

        warmup, rep = (5, 20) if quick else (25, 100)
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=0.05 if quick else 0.5)
    return measurement.median * 1e3


def measure_peak_bandwidth(device: torch.device, quick: bool = False) -> float:
    """Device memory bandwidth in GB/s from a timed device-to-device copy (read + write)."""
    n_bytes = (64 << 20) if device.type == "cpu" else (1 << 30)
    if quick:
        n_bytes //= 4
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_time_ms(lambda: dst.copy_(src), device, quick)
    del src, dst
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, quick: bool = False) -> float:
    """The machine's dense matmul rate in TFLOP/s for `dtype` (square matmul)."""
    n = 8192 if device.type == "cuda" else (512 if quick else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_time_ms(lambda: a @ b, device, quick)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def fill_rates(row: dict, peak_gbps: float | None, peak_tflops: float | None) -> dict:
    """tflops, gbps, roofline_pct, matmul_pct from time_ms, flops and bytes."""
    t = row.get("time_ms")
    if row.get("status") != "ok" or not t:
        return row
    seconds = t * 1e-3
    if row.get("flops"):
        row["tflops"] = row["flops"] / seconds / 1e12
        if peak_tflops:
            row["matmul_pct"] = 100 * row["tflops"] / peak_tflops
    if row.get("bytes"):
        row["gbps"] = row["bytes"] / seconds / 1e9
        if peak_gbps:
            row["roofline_pct"] = 100 * row["gbps"] / peak_gbps
    return row


# ---------------------------------------------------------------------------
# Run context, rows, output
# ---------------------------------------------------------------------------

class RunContext:
    """What a run records in every row: who, where, when, with what peaks."""

    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.quick = quick
        self.run_id = os.environ.get("BENCH_RUN_ID") or uuid.uuid4().hex[:12]
        self.date = os.environ.get("BENCH_RUN_DATE") or \
            _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.dry_run = os.environ.get("BENCH_DRY_RUN", "0") == "1"
        self.commit, self.dirty = git_commit()
        self.versions = versions()
        self.device_name = device_name(device)
        self.device_slug = device_slug(device)
        self.peak_gbps: float | None = None
        self.peak_tflops: dict[str, float] = {}
        self.host_note = os.environ.get("BENCH_HOST_NOTE")

    def measure_peaks(self, dtypes: list[str]) -> None:
        t0 = time.perf_counter()
        self.peak_gbps = measure_peak_bandwidth(self.device, self.quick)
        for name in dict.fromkeys(["fp32", *dtypes]):
            try:
                self.peak_tflops[name] = measure_matmul_tflops(self.device, DTYPES[name], self.quick)
            except RuntimeError as e:  # e.g. a dtype the device cannot multiply
                print(f"  (no {name} matmul peak: {e})")
        rates = ", ".join(f"{k} {v:.2f}" for k, v in self.peak_tflops.items())
        print(f"peaks on {self.device_name}: copy bandwidth {self.peak_gbps:.1f} GB/s; "
              f"matmul TFLOP/s {rates} ({time.perf_counter() - t0:.1f}s)")

    def finalize_row(self, row: dict) -> dict:
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise ValueError(f"benchmark row lacks required keys {missing}: {row}")
        if row["status"] not in STATUSES:
            raise ValueError(f"row status must be one of {STATUSES}, got {row['status']!r}")
        full = make_row(row["suite"], row["name"], row["impl"], row["status"])
        full.update(row)
        peak_tflops = self.peak_tflops.get(full.get("dtype") or "fp32", self.peak_tflops.get("fp32"))
        fill_rates(full, self.peak_gbps, peak_tflops)
        full.update(
            run_id=self.run_id, date=self.date, commit=self.commit, dirty=self.dirty,
            versions=self.versions, device=self.device.type, device_name=self.device_name,
            device_slug=self.device_slug, peak_gbps=self.peak_gbps, peak_tflops=peak_tflops,
            threads=torch.get_num_threads(), quick=self.quick, dry_run=self.dry_run,
            host_note=self.host_note,
        )
        if self.device.type == "cpu":
            full.update(cpu_fields())
        evaluate_targets(full)
        return full


def evaluate_targets(row: dict) -> None:
    """targets_met from targets (roofline_pct_min, speedup_min per peer, ...)."""
    met = {}
    targets = row.get("targets") or {}
    if row.get("status") == "ok":
        if "roofline_pct_min" in targets and row.get("roofline_pct") is not None:
            met["roofline_pct_min"] = row["roofline_pct"] >= targets["roofline_pct_min"]
        for peer, need in (targets.get("speedup_min") or {}).items():
            have = (row.get("speedup") or {}).get(peer)
            if have is not None:
                met[f"speedup_vs_{peer}"] = have >= need
    row["targets_met"] = met


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def append_jsonl(rows: list[dict], out_dir: str, slug_: str) -> str:
    """Append rows to <out_dir>/<slug>.jsonl (one flushed write; existing lines untouched)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{slug_}.jsonl")
    text = "".join(json.dumps(r, default=_json_default, sort_keys=True) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return path


def read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    print(f"  {path}: skipping a line that is not JSON (interrupted write?)", file=sys.stderr)
    return rows


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def shape_text(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def print_table(rows: list[dict], file=None) -> None:
    """One line per measured row, grouped by problem; then each distinct reason something did not run.

    %roof: percent of the measured copy bandwidth; %mm: percent of the
    measured matmul FLOP rate (in the row's dtype).
    """
    file = file or sys.stdout
    header = f"{'mode':<8} {'dtype':<5} {'impl':<22} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} " \
             f"{'%roof':>6} {'%mm':>5}  speedup (peer time / ours) / notes"
    last_key = None
    for r in rows:
        if r["status"] != "ok":
            continue
        key = (r["name"], r.get("sweep"), r.get("sweep_value"), json.dumps(r.get("shape"), sort_keys=True))
        if key != last_key:
            sweep = r.get("sweep") or ""
            if r.get("sweep_value") is not None:
                sweep = f"{sweep}={r['sweep_value']}"
            print(f"\n{r['name']}  [{sweep}]  {shape_text(r.get('shape') or {})}", file=file)
            print(header, file=file)
            last_key = key
        line = f"{str(r.get('mode') or '')[:8]:<8} {str(r.get('dtype') or '')[:5]:<5} {r['impl'][:22]:<22} " \
               f"{_fmt(r.get('time_ms'), '9.3f')} {_fmt(r.get('tflops'), '8.3f')} " \
               f"{_fmt(r.get('gbps'), '8.1f')} {_fmt(r.get('roofline_pct'), '6.1f')} " \
               f"{_fmt(r.get('matmul_pct'), '5.1f')}  "
        extras = [f"{p} {s:.2f}x" for p, s in (r.get("speedup") or {}).items()]
        if r.get("max_abs_err") is not None and r["impl"] != "reference":
            extras.append(f"err {r['max_abs_err']:.1e}")
        if r.get("metrics"):
            extras += [f"{k}={_fmt_metric(v)}" for k, v in r["metrics"].items()]
        if r.get("notes"):
            extras.append(f"({r['notes']})")
        print(line + ", ".join(extras), file=file)
    reasons: dict[tuple, int] = {}
    for r in rows:
        if r["status"] != "ok":
            key = (r["status"], r["name"], r["impl"], r.get("reason") or "")
            reasons[key] = reasons.get(key, 0) + 1
    if reasons:
        print("\nnot measured:", file=file)
        for (status, name, impl, reason), n in reasons.items():
            print(f"  {status.upper():<7} {name} / {impl} ({n} rows): {reason}", file=file)


def _fmt_metric(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
