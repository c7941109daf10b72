"""python -m bench import OUT_DIR: file a bench/gpu_check.sh run into the repository, in one commit.

    python -m bench import OUT_DIR [--root DIR] [--allow-dry-run]

- appends OUT_DIR/results.jsonl's rows, and one row of test counts from
  OUT_DIR/junit.xml (suite "tests"), to bench/results/<device-slug>.jsonl
  (a run already there, by run id, is not appended twice);
- rewrites the block between GPU_BEGIN and GPU_END in docs/benchmarks.md
  (every measurement) and in README.md (the fastest of ours against each
  peer) from the latest GPU run of each device in bench/results/.

Nothing else in those files changes. Rows of a dry run (`dry_run: true`, CPU,
tiny shapes) are refused: they test the runbook and are not GPU numbers;
--allow-dry-run files them anyway, marked as such (for tests of this command).
"""
from __future__ import annotations

import glob
import json
import os
import sys

from .args import OneLineParser, existing_folder, fail, with_exit_codes
from .gpu_report import junit_counts, model_table, op_tables, read_rows, run_header, tests_line

PROG = "python -m bench import"
GPU_BEGIN = "<!-- gpu-results:begin -->"
GPU_END = "<!-- gpu-results:end -->"
RUN_KEYS = ("run_id", "date", "commit", "dirty", "versions", "device", "device_name", "device_slug",
            "peak_gbps", "threads", "quick", "dry_run", "host_note")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ImportRefused(Exception):
    """A one-line reason why nothing was imported."""


def is_gpu_row(row: dict) -> bool:
    return row.get("device") == "cuda" and not row.get("dry_run")


def load_run(out_dir: str, allow_dry_run: bool) -> list[dict]:
    """The rows of OUT_DIR/results.jsonl, checked, plus a row of test counts."""
    path = os.path.join(out_dir, "results.jsonl")
    if not os.path.isfile(path):
        raise ImportRefused(f"{path} does not exist: not the OUT_DIR of a bench/gpu_check.sh run")
    rows, bad = read_rows(path)
    if bad:
        print(f"{PROG}: {path}: skipped {bad} lines that are not JSON objects (an interrupted write?)")
    if not rows:
        raise ImportRefused(f"{path} holds no rows")
    for i, row in enumerate(rows):
        missing = [k for k in ("suite", "name", "impl", "status", "run_id", "device_slug") if k not in row]
        if missing:
            raise ImportRefused(f"{path}: row {i + 1} lacks {', '.join(missing)}: not a bench/gpu_check.sh row")
    if len({r["run_id"] for r in rows}) != 1:
        raise ImportRefused(f"{path} holds rows of several runs: one OUT_DIR is one run")
    not_gpu = [r for r in rows if not is_gpu_row(r)]
    if not_gpu and not allow_dry_run:
        r = not_gpu[0]
        raise ImportRefused(f"{path} holds rows of a dry run (dry_run={r.get('dry_run')}, device "
                            f"{r.get('device')}): not GPU numbers, nothing imported (--allow-dry-run "
                            "files them anyway, marked as a dry run)")
    tests = junit_counts(os.path.join(out_dir, "junit.xml"))
    if tests and "error" not in tests:
        counts = {k: tests[k] for k in ("passed", "failed", "errors", "skipped", "total")}
        counts["failures"] = [name for _, name, _ in tests["failures"][:100]]
        rows.append({**{k: rows[0].get(k) for k in RUN_KEYS}, "suite": "tests", "name": "pytest",
                     "impl": "bench/gpu_check.sh", "role": "ours", "status": "ok", "metrics": counts})
    return rows


def results_name(row: dict) -> str:
    """<device-slug>, or <device-slug>-dry-run: a dry run never joins a device's real history."""
    return row["device_slug"] + ("-dry-run" if row.get("dry_run") else "")


def append_new(rows: list[dict], results_dir: str) -> dict[str, int]:
    """Append rows to <results_dir>/<name>.jsonl unless their run is there already: {name: rows added}."""
    added = {}
    for name in sorted({results_name(r) for r in rows}):
        path = os.path.join(results_dir, f"{name}.jsonl")
        known = {r.get("run_id") for r in read_rows(path)[0]}
        new = [r for r in rows if results_name(r) == name and r["run_id"] not in known]
        if new:
            os.makedirs(results_dir, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in new))
        added[name] = len(new)
    return added


def latest_runs(results_dir: str, allow_dry_run: bool) -> list[list[dict]]:
    """Per results file: the rows of its latest run that counts (a GPU run, or any with allow_dry_run)."""
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.jsonl"))):
        rows = [r for r in read_rows(path)[0] if is_gpu_row(r) or (allow_dry_run and r.get("dry_run"))]
        if rows:
            latest = max((r.get("date") or "", r.get("run_id") or "") for r in rows)[1]
            runs.append([r for r in rows if r.get("run_id") == latest])
    return runs


def block(runs: list[list[dict]], compact: bool) -> str:
    """The text between the markers: one section per device's latest run."""
    lines = [GPU_BEGIN, "<!-- written by `python -m bench import OUT_DIR`; an import replaces this block -->", ""]
    if not runs:
        lines += ["No GPU run has been imported yet: `bash bench/gpu_check.sh OUT` on a GPU machine, then",
                  "`python -m bench import OUT` here.", ""]
    for rows in runs:
        dry = " (DRY RUN: CPU, tiny shapes, not GPU numbers)" if any(r.get("dry_run") for r in rows) else ""
        tests = next((r["metrics"] for r in rows if r.get("suite") == "tests"), None)
        lines += [f"**{rows[0].get('device_name')}**{dry} (`bench/results/{results_name(rows[0])}.jsonl`): "
                  f"{run_header(rows)}.", "",
                  f"Tests on it (`bench/gpu_check.sh`): {tests_line(tests)}.", ""]
        lines += op_tables(rows, compact=compact) + ([] if compact else model_table(rows))
    return "\n".join(lines + [GPU_END])


def replace_block(text: str, new_block: str, name: str) -> str:
    begin, end = text.find(GPU_BEGIN), text.find(GPU_END)
    if begin < 0 or end < begin or text.count(GPU_BEGIN) != 1 or text.count(GPU_END) != 1:
        raise ImportRefused(f"{name} has no single {GPU_BEGIN} ... {GPU_END} block to replace: add one "
                            "where the GPU table belongs")
    return text[:begin] + new_block + text[end + len(GPU_END):]


def import_run(out_dir: str, root: str, allow_dry_run: bool = False) -> dict[str, int]:
    rows = load_run(out_dir, allow_dry_run)
    docs = {name: os.path.join(root, name) for name in ("docs/benchmarks.md", "README.md")}
    texts = {}
    for name, path in docs.items():  # every check before the first write
        if not os.path.isfile(path):
            raise ImportRefused(f"{path} does not exist (--root {root} is not the checkout?)")
        with open(path, encoding="utf-8") as f:
            texts[name] = f.read()
        replace_block(texts[name], "", name)
    results_dir = os.path.join(root, "bench", "results")
    added = append_new(rows, results_dir)
    runs = latest_runs(results_dir, allow_dry_run)
    for name, path in docs.items():
        new = replace_block(texts[name], block(runs, compact=name == "README.md"), name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(new)
        os.replace(path + ".tmp", path)
    return added


def main(argv=None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__)
    p.add_argument("out_dir", type=existing_folder, help="the OUT_DIR of a bench/gpu_check.sh run")
    p.add_argument("--root", type=existing_folder, default=ROOT,
                   help="the checkout to file it into (default: this one)")
    p.add_argument("--allow-dry-run", action="store_true", help="file a dry run's rows too (tests only)")
    args = p.parse_args(argv)
    return with_exit_codes(PROG, _import)(args)


def _import(args) -> int:
    try:
        added = import_run(args.out_dir, args.root, args.allow_dry_run)
    except ImportRefused as e:
        return fail(PROG, str(e))
    for name, n in added.items():
        print(f"bench/results/{name}.jsonl: {n} rows added" + ("" if n else " (this run was imported before)"))
    print("rewrote the GPU blocks of docs/benchmarks.md and README.md: review, then commit all three")
    return 0


if __name__ == "__main__":
    sys.exit(main())
