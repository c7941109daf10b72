"""The Python parts of bench/gpu_check.sh, and `python -m bench import` (docs/benchmarks.md, "GPU check").

    python -m bench.gpu_check env OUT_DIR [--dry-run]          env.json: versions, the measured peaks
    python -m bench.gpu_check bench PART OUT_DIR [--dry-run]   PART's rows into OUT_DIR/results.jsonl
    python -m bench.gpu_check summary OUT_DIR [--stages FILE]  rewrite OUT_DIR/summary.md (no torch)
    python -m bench import OUT_DIR [--root DIR] [--allow-dry-run]   file a run into the repository

Each row is appended the moment it is measured, so a stage killed at its budget keeps what it
measured. A dry run (--dry-run: the CPU, tiny shapes) marks every row dry_run: true, and the
import refuses it unless --allow-dry-run (then into <slug>-dry-run.jsonl, never a device's history).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import time
import xml.etree.ElementTree as ET
from collections import Counter

from models.atomic import atomic_file, write_json_atomic
from models.cli_common import Parser, UsageError, command

from .common import append_jsonl, fmt, not_measured, op_tables, read_jsonl, suite_table

PROG = "python -m bench.gpu_check"
MARKER = "<!-- written by bench/gpu_check.sh -->"
GPU_BEGIN, GPU_END = "<!-- gpu-results:begin -->", "<!-- gpu-results:end -->"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("cca", "neighbour", "model", "flex")
NO_GPU = "torch sees no CUDA device (use --dry-run on a CPU machine)"

# The paper's shapes in bf16, (Hkv, D) most valuable first; the dry run keeps their structure
# (grouped heads, two head dims) at tiny sizes, in fp32.
DIMS = {"gpu": [(16, 128), (4, 128), (16, 64), (4, 64)], "dry": [(4, 32), (2, 16)]}
SHAPES = {
    "gpu": {"CCA": dict(B=8, N=2048, m=64, K=2, R=128, Hq=16, mask=False),
            "NSA": dict(B=8, L=32, K=2, R=128, Hq=16, mask=True),
            "NCA": dict(B=8, L=32, K=2, R=128, M=64, Hq=16, mask=True)},
    "dry": {"CCA": dict(B=1, N=100, m=16, K=2, R=32, Hq=4, mask=False),
            "NSA": dict(B=1, L=4, K=2, R=32, Hq=4, mask=True),
            "NCA": dict(B=1, L=4, K=2, R=32, M=16, Hq=4, mask=True)},
}


def cases(label: str, dry_run: bool):
    """The runbook's cases of one op: sweep "paper" (Hkv = Hq) or "paper_gqa", sweep_value D."""
    from .ops import Case

    kind = "dry" if dry_run else "gpu"
    base = SHAPES[kind][label]
    return [Case("paper" if hkv == base["Hq"] else "paper_gqa", d, {**base, "Hkv": hkv, "D": d},
                 "fp32" if dry_run else "bf16") for hkv, d in DIMS[kind]]


def _context(dry_run: bool, out_dir: str | None = None):
    """The run's RunContext, with the peaks of env.json when stage 1 wrote it (else measured here)."""
    import torch

    from .common import RunContext

    if not dry_run and not torch.cuda.is_available():
        raise UsageError(NO_GPU)
    ctx = RunContext(torch.device("cpu" if dry_run else "cuda"), quick=dry_run)
    env = _read_env(out_dir) if out_dir else {}
    if env:
        ctx.peak_gbps, ctx.peak_tflops = env["peak_gbps"], env["peak_tflops"]
    else:
        ctx.measure_peaks(["fp32"] if dry_run else ["bf16"])
    return ctx


def _read_env(out_dir: str) -> dict:
    path = os.path.join(out_dir, "env.json")  # {} where stage 1 did not write it
    return json.loads(pathlib.Path(path).read_text(encoding="utf-8")) if os.path.exists(path) else {}


def _shell(*argv: str) -> str:
    import subprocess

    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (done.stdout + done.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({argv[0]}: {type(e).__name__}: {e})"


def write_env(out_dir: str, dry_run: bool) -> int:
    """Stage 1: the machine, its versions and its measured peaks, into OUT_DIR/env.json."""
    import torch

    info = {"nvidia_smi": _shell("nvidia-smi")}  # power, temperature and performance state before the peaks
    ctx = _context(dry_run)
    info.update({k: getattr(ctx, k) for k in ("run_id", "date", "dry_run", "commit", "dirty", "device_name",
                                              "device_slug", "versions", "peak_gbps", "peak_tflops")})
    info.update(nvidia_smi_after_peaks=_shell("nvidia-smi"), nvcc=_shell("nvcc", "--version").splitlines()[-1:],
                device=ctx.device.type, cpu_count=os.cpu_count(), loadavg=os.getloadavg(),
                torch_threads=torch.get_num_threads(),
                env={k: v for k, v in os.environ.items()
                     if k.startswith(("TRITON_", "TORCH_", "CUDA_", "MAX_JOBS", "BENCH_", "RETRO_KERNELS_"))})
    write_json_atomic(os.path.join(out_dir, "env.json"), info)
    print(f"{ctx.device_name}: copy {ctx.peak_gbps:.0f} GB/s, matmul TFLOP/s {ctx.peak_tflops}")
    return 0


def run_part(part: str, out_dir: str, dry_run: bool) -> int:
    """Stage 3: one part of the benchmarks, each row finalized and appended as it is measured."""
    from . import ops
    from .cli import suite_rows

    ctx = _context(dry_run, out_dir)
    counts, t0 = Counter(), time.perf_counter()

    def sink(row):
        append_jsonl([ctx.finalize_row(row)], out_dir, "results")
        counts[row["status"]] += 1

    if part == "model":
        for row in suite_rows("model", dict(quick=dry_run, device=ctx.device)):
            sink(row)
    labels = {"cca": ("CCA",), "flex": ("CCA",), "neighbour": ("NSA", "NCA")}.get(part, ())
    ours = {f"retro_kernels:{b}" for b in ops.FUSED}
    impls = {"cca": {n for n in ops.CCABench.peers if n != "flex_attention"} | ours,
             "flex": {"flex_attention"}}.get(part)
    for bench in ops.OP_BENCHES:
        if bench.label in labels:
            print(f"== {bench.name}")
            ops.run_op(bench, ctx.device, dry_run, [], cases=cases(bench.label, dry_run), impls=impls, on_row=sink)
    print(f"{part}: {dict(counts)} in {time.perf_counter() - t0:.1f}s")
    return 1 if counts["failed"] else 0


# -- summary.md (no torch) ---------------------------------------------------------------------

def junit_counts(path: str) -> dict | None:
    """Counts, failures and skip reasons of a junit.xml pytest wrote (None if absent)."""
    if not os.path.exists(path):
        return None
    try:
        cases = [c for c in ET.parse(path).getroot().iter("testcase") if c.get("name")]  # xdist leaves nameless ones
    except ET.ParseError as e:
        return {"error": f"{os.path.basename(path)} is not valid XML ({e})"}
    counts, failures, skips = Counter(), [], Counter()
    for case in cases:
        child = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        tag = getattr(child, "tag", None)
        outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}.get(tag, "passed")
        counts[outcome] += 1
        message = ((child.get("message") or child.text or "") if child is not None else "").strip()
        if outcome in ("failed", "errors"):
            failures.append(f"{outcome.upper()} `{case.get('classname')}::{case.get('name')}`: "
                            f"{message.splitlines()[0][:300] if message else ''}")
        elif outcome == "skipped":
            skips[message[:300]] += 1
    return {**{k: counts[k] for k in ("passed", "failed", "errors", "skipped")}, "total": len(cases),
            "failures": failures, "skip_reasons": skips.most_common()}


def tests_line(counts: dict | None) -> str:
    if counts is None:
        return "no junit.xml (the tests stage did not finish writing it)"
    return counts.get("error") or (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} "
                                   f"errors, {counts['skipped']} skipped ({counts['total']} tests)")


def summary_markdown(out_dir: str, stages: list[list[str]]) -> str:
    rows, bad = read_jsonl(os.path.join(out_dir, "results.jsonl"))
    tests = junit_counts(os.path.join(out_dir, "junit.xml"))
    env = _read_env(out_dir)
    dry = env.get("dry_run") or any(r.get("dry_run") for r in rows)
    out = [MARKER, "# GPU check" + " (DRY RUN: CPU, tiny shapes; not GPU numbers)" * bool(dry), ""]
    if env:
        v = env.get("versions") or {}
        out += [f"- device: {env.get('device_name')} (run {env.get('run_id')}, {env.get('date')}, commit "
                f"{(env.get('commit') or '?')[:10]})",
                f"- versions: python {v.get('python')}, torch {v.get('torch')}, triton {v.get('triton')}, "
                f"CUDA {v.get('cuda')}",
                f"- measured peaks: copy {fmt(env.get('peak_gbps'), '.0f')} GB/s (the roofline), matmul TFLOP/s "
                + ", ".join(f"{k} {x:.3g}" for k, x in (env.get("peak_tflops") or {}).items())]
    else:
        out.append("- no env.json: stage 1 did not finish")
    status = Counter(r.get("status") for r in rows)
    out += [f"- tests: {tests_line(tests)}", f"- benchmark rows: {status['ok']} ok, {status['skipped']} skipped, "
            f"{status['failed']} failed" + f"; {bad} unreadable lines" * bool(bad), ""]
    out += ["## Headline", ""] + (op_tables(rows, compact=True) + suite_table(rows) or ["(no measurements)", ""])
    if stages:
        out += ["## Stages", "", "| stage | status | seconds | budget | note |", "|---|---|---|---|---|"]
        out += ["| " + " | ".join((s + [""] * 5)[:5]) + " |" for s in stages] + [""]
    if tests and "error" not in tests:
        out += ["## Tests", "", tests_line(tests), ""] + [f"- {f}" for f in tests["failures"][:60]]
        out += [f"- {n} x {reason or '(no reason given)'}" for reason, n in tests["skip_reasons"][:25]] + [""]
    out += ["## Not measured", ""] + not_measured(rows) + ["", "## Every measurement", ""] + op_tables(rows)
    return "\n".join(out) + "\n"


def write_summary(out_dir: str, stages_path: str | None) -> int:
    stages = []
    if stages_path and os.path.exists(stages_path):
        with open(stages_path, encoding="utf-8", errors="replace") as f:
            stages = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    with atomic_file(os.path.join(out_dir, "summary.md")) as tmp:
        tmp.write_text(summary_markdown(out_dir, stages), encoding="utf-8")
    return 0


@command("gpu_check", prog=PROG)
def main(argv) -> int:
    p = Parser(PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    for name in ("env", "bench", "summary"):
        stage = sub.add_parser(name)
        if name == "bench":
            stage.add_argument("part", choices=PARTS)
        stage.add_argument("out_dir", type=_folder)
        if name == "summary":
            stage.add_argument("--stages", default=None, help="the runbook's stage log (tab-separated)")
        else:
            stage.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (tests the runbook)")
    args = p.parse_args(argv)
    if args.stage == "summary":
        return write_summary(args.out_dir, args.stages)
    if args.dry_run:
        os.environ["BENCH_DRY_RUN"] = "1"
    if args.stage == "env":
        return write_env(args.out_dir, args.dry_run)
    return run_part(args.part, args.out_dir, args.dry_run)


def _folder(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
    return text


# -- python -m bench import --------------------------------------------------------------------

def is_gpu_row(row: dict) -> bool:
    return row.get("device") == "cuda" and not row.get("dry_run")


def results_name(row: dict) -> str:
    """<device-slug>, or <device-slug>-dry-run: a dry run never joins a device's real history."""
    return row["device_slug"] + "-dry-run" * bool(row.get("dry_run"))


def load_run(out_dir: str, allow_dry_run: bool) -> list[dict]:
    """The rows of OUT_DIR/results.jsonl, checked, plus a row of test counts; ValueError says why not."""
    path = os.path.join(out_dir, "results.jsonl")
    rows, bad = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path} holds no rows" if os.path.isfile(path) else
                         f"{path} does not exist: not the OUT_DIR of a bench/gpu_check.sh run")
    if bad:
        print(f"{path}: skipped {bad} lines that are not JSON objects (an interrupted write?)")
    if any(k not in r for r in rows for k in ("suite", "name", "impl", "status", "run_id", "device_slug")):
        raise ValueError(f"{path} holds a row without suite, name, impl, status, run_id or device_slug: "
                         "not a bench/gpu_check.sh row")
    if len({r["run_id"] for r in rows}) != 1:
        raise ValueError(f"{path} holds rows of several runs: one OUT_DIR is one run")
    if not allow_dry_run and not all(map(is_gpu_row, rows)):
        raise ValueError(f"{path} holds rows of a dry run or not of a GPU: not GPU numbers, nothing imported "
                         "(--allow-dry-run files them anyway, marked as a dry run)")
    tests = junit_counts(os.path.join(out_dir, "junit.xml"))
    if tests and "error" not in tests:
        counts = {k: v for k, v in tests.items() if k != "skip_reasons"}
        rows.append({**{k: rows[0].get(k) for k in ("run_id", "date", "commit", "dirty", "versions", "device",
                                                    "device_name", "device_slug", "peak_gbps", "dry_run")},
                     "suite": "tests", "name": "pytest", "impl": "bench/gpu_check.sh", "role": "ours",
                     "status": "ok", "metrics": counts})
    return rows


def gpu_block(runs: list[list[dict]], compact: bool) -> str:
    """The text between the markers: one section per device's latest run."""
    lines = [GPU_BEGIN, "<!-- written by `python -m bench import OUT_DIR`; an import replaces this block -->", ""]
    if not runs:
        lines += ["No GPU run has been imported yet: `bash bench/gpu_check.sh OUT` on a GPU machine, then",
                  "`python -m bench import OUT` here.", ""]
    for rows in runs:
        r = rows[0]
        v = r.get("versions") or {}
        tests = next((t["metrics"] for t in rows if t.get("suite") == "tests"), None)
        dry = " (DRY RUN: CPU, tiny shapes, not GPU numbers)" * bool(r.get("dry_run"))
        lines += [f"**{r.get('device_name')}**{dry} (`bench/results/{results_name(r)}.jsonl`): run {r.get('run_id')} "
                  f"on {r.get('date')}, commit {(r.get('commit') or '?')[:10]}{' (dirty)' * bool(r.get('dirty'))}; "
                  f"torch {v.get('torch')}, triton {v.get('triton')}, CUDA {v.get('cuda')}; measured copy bandwidth "
                  f"{fmt(r.get('peak_gbps'), '.0f')} GB/s.", "",
                  f"Tests on it (`bench/gpu_check.sh`): {tests_line(tests)}.", ""]
        lines += op_tables(rows, compact=compact) + ([] if compact else suite_table(rows))
    return "\n".join(lines + [GPU_END])


def replace_block(text: str, block: str, name: str) -> str:
    if text.count(GPU_BEGIN) != 1 or text.count(GPU_END) != 1 or text.find(GPU_END) < text.find(GPU_BEGIN):
        raise ValueError(f"{name} has no single {GPU_BEGIN} ... {GPU_END} block to replace: add one where "
                         "the GPU table belongs")
    return text[:text.find(GPU_BEGIN)] + block + text[text.find(GPU_END) + len(GPU_END):]


def import_run(out_dir: str, root: str, allow_dry_run: bool = False) -> dict[str, int]:
    """File one run into `root`; {results file: rows added}. Every check comes before the first write."""
    rows = load_run(out_dir, allow_dry_run)
    texts = {}
    for name in ("docs/benchmarks.md", "README.md"):
        if not os.path.isfile(os.path.join(root, name)):
            raise ValueError(f"{os.path.join(root, name)} does not exist (--root {root} is not the checkout?)")
        with open(os.path.join(root, name), encoding="utf-8") as f:
            texts[name] = f.read()
        replace_block(texts[name], "", name)
    results_dir, added = os.path.join(root, "bench", "results"), {}
    for name in sorted({results_name(r) for r in rows}):
        known = {r.get("run_id") for r in read_jsonl(os.path.join(results_dir, f"{name}.jsonl"))[0]}
        new = [r for r in rows if results_name(r) == name and r["run_id"] not in known]
        if new:
            append_jsonl(new, results_dir, name)
        added[name] = len(new)
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.jsonl"))):
        filed = [r for r in read_jsonl(path)[0] if is_gpu_row(r) or (allow_dry_run and r.get("dry_run"))]
        if filed:
            latest = max((r.get("date") or "", r.get("run_id") or "") for r in filed)[1]
            runs.append([r for r in filed if r.get("run_id") == latest])
    for name, text in texts.items():
        with atomic_file(os.path.join(root, name)) as tmp:
            tmp.write_text(replace_block(text, gpu_block(runs, compact=name == "README.md"), name), encoding="utf-8")
    return added


@command("import", prog="python -m bench import")
def import_main(argv) -> int:
    p = Parser("python -m bench import", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=_folder, help="the OUT_DIR of a bench/gpu_check.sh run")
    p.add_argument("--root", type=_folder, default=ROOT, help="the checkout to file it into (default: this one)")
    p.add_argument("--allow-dry-run", action="store_true", help="file a dry run's rows too (tests only)")
    args = p.parse_args(argv)
    for name, n in import_run(args.out_dir, args.root, args.allow_dry_run).items():
        print(f"bench/results/{name}.jsonl: {n} rows added" + " (this run was imported before)" * (not n))
    print("rewrote the GPU blocks of docs/benchmarks.md and README.md: review, then commit all three")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
