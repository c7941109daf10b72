"""Markdown from a bench/gpu_check.sh run: OUT_DIR/summary.md, and the GPU tables of the docs.

    python -m bench.gpu_report summary OUT_DIR [--stages FILE]

Reads OUT_DIR/results.jsonl (bench/common.py's rows), OUT_DIR/junit.xml
(pytest) and OUT_DIR/env.json (stage 1), and the runbook's stage log (one
line per stage: name, status, seconds, budget, note; tab-separated), and
rewrites OUT_DIR/summary.md. It imports neither torch nor the kernels, so it
runs in a fraction of a second after every stage. bench/gpu_import.py renders
the docs' tables with the same functions.
"""
from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict

from .args import OneLineParser, existing_folder

MARKER = "<!-- written by bench/gpu_check.sh -->"
OP_ORDER = ("chunked_cross_attention", "neighbour_self_attention", "neighbour_cross_attention")
SHAPE_ORDER = ("B", "N", "L", "m", "K", "R", "M", "Hq", "Hkv", "D")


def read_rows(path: str) -> tuple[list[dict], int]:
    """(rows, number of lines that are not JSON objects) of a results file; ([], 0) if absent."""
    rows, bad = [], 0
    if not os.path.exists(path):
        return rows, bad
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


# ---------------------------------------------------------------------------
# pytest's junit.xml
# ---------------------------------------------------------------------------

def junit_counts(path: str) -> dict | None:
    """Counts, failures and skip reasons from a junit.xml that pytest wrote (None if absent or unreadable)."""
    if not os.path.exists(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"error": f"{os.path.basename(path)} is not valid XML ({e})"}
    counts = Counter()
    failures, skips = [], Counter()
    seconds = 0.0
    for case in root.iter("testcase"):
        if not case.get("name"):  # xdist leaves nameless entries when a run is interrupted
            continue
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        seconds += float(case.get("time") or 0)
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                message = (child.get("message") or child.text or "").strip().splitlines()
                failures.append((outcome, name, message[0][:300] if message else ""))
                break
            if child.tag == "skipped":
                outcome = "skipped"
                skips[(child.get("message") or "").strip()[:300]] += 1
                break
        counts[outcome] += 1
    return {"passed": counts["passed"], "failed": counts["failed"], "errors": counts["errors"],
            "skipped": counts["skipped"], "total": sum(counts.values()), "test_seconds": seconds,
            "failures": failures, "skip_reasons": skips.most_common()}


def tests_line(counts: dict | None) -> str:
    if counts is None:
        return "no junit.xml (the tests stage did not finish writing it)"
    if "error" in counts:
        return counts["error"]
    return (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
            f"{counts['skipped']} skipped ({counts['total']} tests)")


# ---------------------------------------------------------------------------
# Benchmark tables
# ---------------------------------------------------------------------------

def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def shape_text(shape: dict, keys=SHAPE_ORDER) -> str:
    parts = [f"{k}={shape[k]}" for k in keys if k in shape]
    if shape.get("mask") and keys is SHAPE_ORDER:
        parts.append("masked")
    return " ".join(parts)


def _case_key(r: dict) -> tuple:
    return (r.get("run_id"), r["name"], r.get("dtype"), json.dumps(r.get("shape") or {}, sort_keys=True),
            r.get("mode"))


def speedups(rows: list[dict]) -> dict[int, dict[str, float]]:
    """{id(row of ours): {peer: peer time / our time}} over the peers of the same run, problem and mode.

    Computed here rather than read from the rows: a peer measured in another
    stage of the same run (FlexAttention) counts too.
    """
    peers: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r.get("status") == "ok" and r.get("role") == "peer" and r.get("time_ms"):
            peers[_case_key(r)][r["impl"]] = r["time_ms"]
    return {id(r): {p: t / r["time_ms"] for p, t in peers[_case_key(r)].items()}
            for r in rows if r.get("status") == "ok" and r.get("role") == "ours" and r.get("time_ms")}


def op_tables(rows: list[dict], compact: bool = False) -> list[str]:
    """One table per op: each impl's median, % of the roofline, and ours' speedups against each peer.

    compact: only the fastest of ours per problem and mode (the headline table).
    The shape keys every row shares go into the caption, the others into a column.
    """
    ok = [r for r in rows if r.get("suite") == "ops" and r.get("status") == "ok" and r.get("time_ms")]
    gains = speedups(ok)
    lines = []
    for op in sorted({r["name"] for r in ok}, key=lambda n: (OP_ORDER + (n,)).index(n)):
        op_rows = [r for r in ok if r["name"] == op]
        peer_names = sorted({r["impl"] for r in op_rows if r.get("role") == "peer"},
                            key=lambda p: (p != "reference", p))
        shown = []
        for key in dict.fromkeys(_case_key(r) for r in op_rows):
            group = [r for r in op_rows if _case_key(r) == key]
            ours = sorted((r for r in group if r.get("role") == "ours"), key=lambda r: r["time_ms"])
            shown += ours[:1] if compact else ours + [r for r in group if r.get("role") == "peer"]
        if not shown:
            continue
        shapes = [r.get("shape") or {} for r in shown]
        keys = [k for k in SHAPE_ORDER if any(k in s for s in shapes)]
        varying = tuple(k for k in keys if len({s.get(k) for s in shapes}) > 1)
        common = {k: shapes[0][k] for k in keys if k not in varying and k in shapes[0]}
        common["mask"] = all(s.get("mask") for s in shapes)
        dtypes = "/".join(sorted({str(r.get("dtype")) for r in shown}))
        what = "fastest of ours" if compact else "every impl"
        lines += [f"**{op}** ({dtypes}, {shape_text(common)}; {what}; speedup = peer's time / ours, "
                  "same run)", ""]
        header = [", ".join(varying) or "problem", "mode", "impl", "ms", "% roofline"] + \
                 [f"vs {p}" for p in peer_names]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in shown:
            gain = gains.get(id(r), {})
            cells = [shape_text(r.get("shape") or {}, varying) or "-", str(r.get("mode")), r["impl"],
                     _fmt(r["time_ms"], ".3f"), _fmt(r.get("roofline_pct"), ".0f")]
            cells += [f"{gain[p]:.2f}x" if p in gain else "" for p in peer_names]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def model_table(rows: list[dict]) -> list[str]:
    steps = [r for r in rows if r.get("suite") == "model" and r.get("status") == "ok" and r.get("time_ms")]
    if not steps:
        return []
    ref = next((r["time_ms"] for r in steps if r["impl"] == "reference"), None)
    lines = [f"**model training step** ({shape_text(steps[0].get('shape') or {}, tuple(steps[0].get('shape') or {}))})",
             "", "| impl | ms / step | tokens / s | peak memory (GB) | vs reference |", "|---|---|---|---|---|"]
    for r in steps:
        m = r.get("metrics") or {}
        mem = m.get("peak_mem_bytes")
        gain = f"{ref / r['time_ms']:.2f}x" if ref and r["impl"] != "reference" else ""
        lines.append(f"| {r['impl']} | {r['time_ms']:.1f} | {_fmt(m.get('tokens_per_s'), ',.0f')} | "
                     f"{_fmt(mem / 1e9 if mem else None, '.2f')} | {gain} |")
    return lines + [""]


def not_measured(rows: list[dict]) -> list[str]:
    reasons = Counter((r["status"], r["name"], r["impl"], r.get("reason") or "")
                      for r in rows if r.get("status") in ("skipped", "failed"))
    return [f"- {status.upper()} {name} / {impl} ({n} rows): {reason}"
            for (status, name, impl, reason), n in sorted(reasons.items())]


def run_header(rows: list[dict]) -> str:
    r = rows[0]
    v = r.get("versions") or {}
    peaks = r.get("peak_tflops")
    rate = f", matmul {peaks:.3g} TFLOP/s in the rows' dtype" if isinstance(peaks, (int, float)) else ""
    dirty = " (dirty)" if r.get("dirty") else ""
    return (f"run {r.get('run_id')} on {r.get('date')}, commit "
            f"{(r.get('commit') or '?')[:10]}{dirty}; torch {v.get('torch')}, triton {v.get('triton')}, "
            f"CUDA {v.get('cuda')}; measured copy bandwidth {_fmt(r.get('peak_gbps'), '.0f')} GB/s{rate}")


# ---------------------------------------------------------------------------
# summary.md
# ---------------------------------------------------------------------------

def read_stages(path: str | None) -> list[list[str]]:
    if not path or not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def tests_section(tests: dict | None) -> list[str]:
    if not tests or "error" in tests:
        return []
    out = ["## Tests", "", tests_line(tests), ""]
    if tests["failures"]:
        out += ["Failed:", ""] + [f"- {kind.upper()} `{name}`: {msg}" for kind, name, msg in tests["failures"][:60]]
        if len(tests["failures"]) > 60:
            out.append(f"- ... and {len(tests['failures']) - 60} more (junit.xml)")
        out.append("")
    if tests["skip_reasons"]:
        out += ["Skipped, by reason:", ""] + [f"- {n} x {reason or '(no reason given)'}"
                                              for reason, n in tests["skip_reasons"][:25]] + [""]
    return out


def summary_markdown(out_dir: str, stages: list[list[str]]) -> str:
    rows, bad = read_rows(os.path.join(out_dir, "results.jsonl"))
    tests = junit_counts(os.path.join(out_dir, "junit.xml"))
    env = {}
    if os.path.exists(os.path.join(out_dir, "env.json")):
        with open(os.path.join(out_dir, "env.json"), encoding="utf-8") as f:
            env = json.load(f)
    dry = env.get("dry_run") or any(r.get("dry_run") for r in rows)
    out = [MARKER, "# GPU check" + (" (DRY RUN: CPU, tiny shapes; not GPU numbers)" if dry else ""), ""]
    if env:
        tflops = ", ".join(f"{k} {v:.3g}" for k, v in (env.get("peak_tflops") or {}).items())
        v = env.get("versions") or {}
        out += [f"- device: {env.get('device_name')} (run {env.get('run_id')}, {env.get('date')}, commit "
                f"{(env.get('commit') or '?')[:10]})",
                f"- versions: python {v.get('python')}, torch {v.get('torch')}, triton {v.get('triton')}, "
                f"CUDA {v.get('cuda')}",
                f"- measured peaks: copy {_fmt(env.get('peak_gbps'), '.0f')} GB/s (the roofline), "
                f"matmul TFLOP/s {tflops}"]
    else:
        out.append("- no env.json: stage 1 did not finish")
    out += [f"- tests: {tests_line(tests)}",
            f"- benchmark rows: {sum(r.get('status') == 'ok' for r in rows)} ok, "
            f"{sum(r.get('status') == 'skipped' for r in rows)} skipped, "
            f"{sum(r.get('status') == 'failed' for r in rows)} failed"
            + (f"; {bad} unreadable lines" if bad else ""), ""]
    out += ["## Headline", ""] + (op_tables(rows, compact=True) + model_table(rows) or ["(no measurements)", ""])
    if stages:
        out += ["## Stages", "", "| stage | status | seconds | budget | note |", "|---|---|---|---|---|"]
        out += ["| " + " | ".join((s + [""] * 5)[:5]) + " |" for s in stages] + [""]
    out += tests_section(tests)
    missing = not_measured(rows)
    if missing:
        out += ["## Not measured", ""] + missing + [""]
    out += ["## Every measurement", ""] + op_tables(rows)
    return "\n".join(out) + "\n"


def write_summary(out_dir: str, stages_path: str | None) -> int:
    text = summary_markdown(out_dir, read_stages(stages_path))
    path = os.path.join(out_dir, "summary.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return 0


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m bench.gpu_report", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    summary = sub.add_parser("summary", help="rewrite OUT_DIR/summary.md")
    summary.add_argument("out_dir", type=existing_folder)
    summary.add_argument("--stages", default=None, help="the runbook's stage log")
    args = p.parse_args(argv)
    return write_summary(args.out_dir, args.stages)


if __name__ == "__main__":
    sys.exit(main())
