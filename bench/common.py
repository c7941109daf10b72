"""What every benchmark shares: the row (docs/benchmarks.md), the one timer, the machine's peaks, results
files and the markdown tables. torch is imported only where a function measures (summaries stay fast)."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import uuid
from collections import Counter, defaultdict

MEASUREMENT_DEFAULTS = {
    "role": "peer", "mode": None, "sweep": None, "sweep_value": None, "shape": {}, "dtype": None,
    "reason": None, "time_ms": None, "flops": None, "bytes": None, "tflops": None, "gbps": None,
    "roofline_pct": None, "matmul_pct": None, "speedup": {}, "max_abs_err": None, "targets": {},
    "targets_met": {}, "metrics": {}, "notes": None,
}
STATUSES = ("ok", "skipped", "failed")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def make_row(suite: str, name: str, impl: str, status: str = "ok", **fields) -> dict:
    """A row with every measurement key present; keywords that are not keys land in metrics."""
    row = {"suite": suite, "name": name, "impl": impl, "status": status}
    for key, default in MEASUREMENT_DEFAULTS.items():
        row[key] = fields.pop(key, dict(default) if isinstance(default, dict) else default)
    row["metrics"] = {**row["metrics"], **fields}
    return row


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_fields() -> dict:
    """The CPU, its best vector ISA, and the GEMM the C++ CPU kernels chose so far in this process."""
    from retro_kernels.cpu.gemm import gemm_info

    info = gemm_info()
    return {"cpu_model": info["cpu_model"], "cpu_isa": info["isa"], "cpu_gemm": info["summary"] or info["error"]}


def device_name_and_slug(device) -> tuple[str, str]:
    """('NVIDIA H100 80GB HBM3', 'nvidia-h100-80gb-hbm3') or ('AMD EPYC ... (2 cores)', 'cpu-amd-epyc-...-2c')."""
    import torch

    from retro_kernels.cpu.gemm import cpu_description

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, slug(name)
    model = cpu_description()["cpu_model"]
    return f"{model} ({os.cpu_count()} cores)", f"cpu-{slug(model)}-{os.cpu_count()}c"


def git_commit() -> tuple[str | None, bool | None]:
    """HEAD, and whether the code differs from it (results files do not count)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 ":(exclude)bench/results"], cwd=root, capture_output=True, text=True)
        return commit, bool(status.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return None, None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import retro_kernels

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "retro_kernels": retro_kernels.__version__}
    for dist in ("triton", "numpy", "flash-attn", "retro-pytorch", "faiss-cpu"):
        try:
            out[dist.replace("-", "_")] = version(dist)
        except PackageNotFoundError:
            pass
    return out


# -- The one timer -----------------------------------------------------------------------------

def time_ms(fn, device, quick: bool = False) -> float:
    """Median milliseconds of one fn() call. GPU: one untimed call (compiles, autotunes), then
    triton.testing.do_bench (CUDA events, L2 flushed). CPU: torch.utils.benchmark's blocked_autorange."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize(device)
        warmup, rep = (5, 20) if quick else (25, 100)
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.05 if quick else 0.5).median * 1e3


class RunContext:
    """What a run records in every row: who, where, when, with what peaks."""

    def __init__(self, device, quick: bool):
        self.device, self.quick = device, quick
        self.run_id = os.environ.get("BENCH_RUN_ID") or uuid.uuid4().hex[:12]
        self.date = os.environ.get("BENCH_RUN_DATE") or \
            _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.dry_run = os.environ.get("BENCH_DRY_RUN", "0") == "1"
        self.commit, self.dirty = git_commit()
        self.versions = versions()
        self.device_name, self.device_slug = device_name_and_slug(device)
        self.peak_gbps: float | None = None
        self.peak_tflops: dict[str, float] = {}

    def measure_peaks(self, dtypes: list[str]) -> None:
        """The device's copy bandwidth (GB/s) and square-matmul TFLOP/s of fp32 and each of `dtypes`."""
        import torch

        device, quick = self.device, self.quick
        n_bytes = ((64 << 20) if device.type == "cpu" else (1 << 30)) // (4 if quick else 1)
        src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        self.peak_gbps = 2 * n_bytes / time_ms(lambda: dst.copy_(src), device, quick) / 1e6
        del src, dst
        n = 8192 if device.type == "cuda" else (512 if quick else 1024)
        for name in dict.fromkeys(["fp32", *dtypes]):
            try:
                a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, TORCH_DTYPES[name])) for _ in "ab")
                self.peak_tflops[name] = 2 * n**3 / time_ms(lambda: a @ b, device, quick) / 1e9
            except RuntimeError as e:  # a dtype the device cannot multiply
                print(f"  (no {name} matmul peak: {e})")
        rates = ", ".join(f"{k} {v:.2f}" for k, v in self.peak_tflops.items())
        print(f"peaks on {self.device_name}: copy {self.peak_gbps:.1f} GB/s; matmul TFLOP/s {rates}")

    def finalize_row(self, row: dict) -> dict:
        """The row with every key, its rates, the run keys and targets_met; ValueError for a malformed row."""
        import torch

        missing = [k for k in ("suite", "name", "impl", "status") if k not in row]
        if missing or row["status"] not in STATUSES:
            raise ValueError(f"a benchmark row needs suite, name, impl and a status in {STATUSES}: {row}")
        full = {**make_row(row["suite"], row["name"], row["impl"], row["status"]), **row}
        peak_tflops = self.peak_tflops.get(full["dtype"] or "fp32", self.peak_tflops.get("fp32"))
        fill_rates(full, self.peak_gbps, peak_tflops)
        full.update(run_id=self.run_id, date=self.date, commit=self.commit, dirty=self.dirty,
                    versions=self.versions, device=self.device.type, device_name=self.device_name,
                    device_slug=self.device_slug, peak_gbps=self.peak_gbps, peak_tflops=peak_tflops,
                    threads=torch.get_num_threads(), quick=self.quick, dry_run=self.dry_run,
                    host_note=os.environ.get("BENCH_HOST_NOTE"), loadavg=list(os.getloadavg()))
        if self.device.type == "cpu":
            full.update(cpu_fields())
        full["targets_met"] = targets_met(full)
        return full


def fill_rates(row: dict, peak_gbps: float | None, peak_tflops: float | None) -> None:
    """tflops, gbps, roofline_pct, matmul_pct from time_ms, flops and bytes."""
    if row["status"] != "ok" or not row["time_ms"]:
        return
    seconds = row["time_ms"] * 1e-3
    if row["flops"]:
        row["tflops"] = row["flops"] / seconds / 1e12
        row["matmul_pct"] = 100 * row["tflops"] / peak_tflops if peak_tflops else None
    if row["bytes"]:
        row["gbps"] = row["bytes"] / seconds / 1e9
        row["roofline_pct"] = 100 * row["gbps"] / peak_gbps if peak_gbps else None


def targets_met(row: dict) -> dict[str, bool]:
    """{target: met} for the targets (roofline_pct_min, matmul_pct_min, speedup_min per peer) that can be judged."""
    met, targets = {}, row.get("targets") or {}
    if row["status"] != "ok":
        return met
    for key in ("roofline_pct_min", "matmul_pct_min"):
        if key in targets and row.get(key[:-4]) is not None:
            met[key] = row[key[:-4]] >= targets[key]
    for peer, need in (targets.get("speedup_min") or {}).items():
        if peer in (row.get("speedup") or {}):
            met[f"speedup_vs_{peer}"] = row["speedup"][peer] >= need
    return met


# -- Results files -----------------------------------------------------------------------------

def _json_default(x):
    return None if isinstance(x, float) and not math.isfinite(x) else str(x)


def append_jsonl(rows: list[dict], out_dir: str, name: str) -> str:
    """Append rows to <out_dir>/<name>.jsonl in one flushed write; existing lines stay untouched."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.jsonl")
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, default=_json_default, sort_keys=True) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
    return path


def read_jsonl(path: str) -> tuple[list[dict], int]:
    """(rows, number of lines that are not JSON objects, e.g. an interrupted write); ([], 0) if absent."""
    rows, bad = [], 0
    if not os.path.exists(path):
        return rows, bad
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in filter(str.strip, f):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


# -- Markdown tables: the terminal, summary.md and the docs ------------------------------------

OP_ORDER = ("chunked_cross_attention", "neighbour_self_attention", "neighbour_cross_attention")
SHAPE_ORDER = ("B", "N", "L", "m", "K", "R", "M", "Hq", "Hkv", "D", "mask", "dtype")


def fmt(x, spec: str) -> str:
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def shape_text(shape: dict, keys=SHAPE_ORDER) -> str:
    return " ".join(f"{k}={shape[k]}" for k in keys if k in shape)


def _case_key(r: dict) -> tuple:
    return r.get("run_id"), r["name"], r.get("dtype"), json.dumps(r.get("shape"), sort_keys=True), r.get("mode")


def speedups(rows: list[dict]) -> dict[int, dict[str, float]]:
    """{id(row of ours): {peer: peer time / our time}} over the peers of the same run, problem and mode
    (a peer measured in a later stage of the runbook, FlexAttention, counts too)."""
    peers: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r.get("role") == "peer":
            peers[_case_key(r)][r["impl"]] = r["time_ms"]
    return {id(r): {p: t / r["time_ms"] for p, t in peers[_case_key(r)].items()}
            for r in rows if r.get("role") == "ours"}


def op_tables(rows: list[dict], compact: bool = False) -> list[str]:
    """One table per op: time, rates and ours' speedups against each peer (compact: the fastest of ours
    per problem and mode only). Shape keys that every row shares go into the caption."""
    ok = [r for r in rows if r.get("suite") == "ops" and r.get("status") == "ok" and r.get("time_ms")]
    gains, lines = speedups(ok), []
    for op in sorted({r["name"] for r in ok}, key=lambda n: (OP_ORDER + (n,)).index(n)):
        shown = []
        for key in dict.fromkeys(_case_key(r) for r in ok if r["name"] == op):
            group = [r for r in ok if _case_key(r) == key]
            ours = sorted((r for r in group if r.get("role") == "ours"), key=lambda r: r["time_ms"])
            shown += ours[:1] if compact else ours + [r for r in group if r.get("role") != "ours"]
        if not shown:
            continue
        peer_names = sorted({p for r in shown for p in gains.get(id(r), {})}, key=lambda p: (p != "reference", p))
        shapes = [{**(r.get("shape") or {}), "dtype": r.get("dtype")} for r in shown]
        varying = tuple(k for k in SHAPE_ORDER if len({s.get(k) for s in shapes}) > 1)
        common = {k: v for k, v in shapes[0].items() if k not in varying}
        lines += [f"**{op}** ({shape_text(common)}; {'fastest of ours' if compact else 'every impl'}; "
                  "speedup = peer's time / ours, same run)", ""]
        header = [", ".join(varying) or "problem", "mode", "impl", "ms", "TFLOP/s", "% roofline", "% matmul"]
        lines += ["| " + " | ".join(header + [f"vs {p}" for p in peer_names]) + " |",
                  "|" + "---|" * (len(header) + len(peer_names))]
        for r, shape in zip(shown, shapes):
            gain = gains.get(id(r), {})
            cells = [shape_text(shape, varying) or "-", r.get("mode"), r["impl"], fmt(r["time_ms"], ".3f"),
                     fmt(r.get("tflops"), ".3g"), fmt(r.get("roofline_pct"), ".0f"), fmt(r.get("matmul_pct"), ".0f")]
            cells += [f"{gain[p]:.2f}x" if p in gain else "" for p in peer_names]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines.append("")
    return lines


def suite_table(rows: list[dict]) -> list[str]:
    """The other suites' rows (model, retrieval, ...): time, speedups and metrics."""
    ok = [r for r in rows if r.get("suite") not in ("ops", "tests") and r.get("status") == "ok"]
    if not ok:
        return []
    lines = ["| suite | name | impl | shape | ms | speedup | metrics |", "|---|---|---|---|---|---|---|"]
    for r in ok:
        gain = ", ".join(f"{p} {x:.2f}x" for p, x in (r.get("speedup") or {}).items())
        metrics = ", ".join(f"{k}={fmt(v, '.4g')}" for k, v in (r.get("metrics") or {}).items())
        shape = r.get("shape") or {}
        lines.append(f"| {r['suite']} | {r['name']} | {r['impl']} | {shape_text(shape, tuple(shape))} "
                     f"| {fmt(r.get('time_ms'), '.1f')} | {gain} | {metrics} |")
    return lines + [""]


def not_measured(rows: list[dict]) -> list[str]:
    """Each distinct reason a row was skipped or failed, with its count."""
    reasons = Counter((r["status"], r["name"], r["impl"], r.get("reason") or "")
                      for r in rows if r.get("status") in ("skipped", "failed"))
    return [f"- {status.upper()} {name} / {impl} ({n} rows): {reason}"
            for (status, name, impl, reason), n in sorted(reasons.items())]
