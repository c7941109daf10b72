"""python -m bench report: for every <out>/<device-slug>.jsonl, PNG plots of each op's history
(plots/<slug>/history-<op>.png) and of each sweep (plots/<slug>/sweep-<op>-<sweep>-<mode>.png)."""
from __future__ import annotations

import glob
import os
from collections import defaultdict

from models.cli_common import Parser, UsageError, command

from .common import DEFAULT_OUT, read_jsonl, slug

PROG = "python -m bench report"


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot(ax, series: dict, colors: dict) -> None:
    """One line per series {name: [(x, y)]}: ours solid, peers dashed, one colour per name in every panel."""
    for name, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colors[name],
                linestyle="-" if name.startswith("retro_kernels") else "--", label=name)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6)


def _plot_history(plt, rows: list[dict], out_dir: str) -> list[str]:
    """Per op (--quick runs apart: other shapes), one panel per mode: each impl's time at the paper or
    base problems, per run (x: date and commit)."""
    by_op = defaultdict(list)
    for r in rows:
        if r.get("status") == "ok" and r.get("sweep") in ("paper", "base") and r.get("time_ms"):
            by_op[(r["name"], bool(r.get("quick")))].append(r)
    written = []
    for (op, quick), op_rows in by_op.items():
        runs = sorted({(r["date"], r["run_id"], (r.get("commit") or "")[:7]) for r in op_rows})
        x = {run_id: i for i, (_, run_id, _) in enumerate(runs)}
        key = lambda r: f"{r['impl']} {r.get('dtype')} D={(r.get('shape') or {}).get('D')}"  # noqa: E731
        colors = {n: f"C{i % 10}" for i, n in enumerate(sorted({key(r) for r in op_rows}))}
        modes = sorted({r["mode"] for r in op_rows})
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            series = defaultdict(list)
            for r in op_rows:
                if r["mode"] == mode:
                    series[key(r)].append((x[r["run_id"]], r["time_ms"]))
            _plot(ax, series, colors)
            ax.set_xticks(range(len(runs)))
            ax.set_xticklabels([f"{d[:16]}\n{c}" for d, _, c in runs], rotation=45, ha="right", fontsize=7)
            ax.set(yscale="log", ylabel="median ms (lower is better)", title=f"{op} {mode}" + " (--quick)" * quick)
        written.append(_save(plt, fig, os.path.join(out_dir, f"history-{slug(op)}{'-quick' * quick}.png")))
    return written


def _plot_sweeps(plt, rows: list[dict], out_dir: str) -> list[str]:
    """Per (op, sweep, mode), from the latest run that has it (full runs before --quick ones): time and
    percent of the roofline along the swept value, one line per impl."""
    swept = [r for r in rows if r.get("suite") == "ops" and r.get("status") == "ok" and r.get("time_ms")
             and r.get("sweep") not in (None, "paper", "base", "mask", "cpu")]
    latest = {}
    for r in swept:
        key = (r["name"], r["sweep"], r["mode"])
        latest[key] = max(latest.get(key, ()), (not r.get("quick"), r["date"], r["run_id"]))
    written = []
    for (op, sweep, mode), (_, date, run_id) in sorted(latest.items()):
        group = [r for r in swept if (r["name"], r["sweep"], r["mode"], r["run_id"]) == (op, sweep, mode, run_id)]
        if len({r["sweep_value"] for r in group}) < 2:
            continue
        colors = {n: f"C{i % 10}" for i, n in enumerate(sorted({r["impl"] for r in group}))}
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, field in zip(axes, ("time_ms", "roofline_pct")):
            series = defaultdict(list)
            for r in group:
                series[r["impl"]].append((r["sweep_value"], r.get(field) or 0))
            _plot(ax, series, colors)
            ax.set(xlabel=sweep + " (Hq / Hkv)" * (sweep == "GQA"),
                   ylabel="median ms" if field == "time_ms" else "% of measured copy bandwidth (roofline)")
        axes[0].set_yscale("log")
        fig.suptitle(f"{op} {mode} {group[0].get('dtype')} on {group[0].get('device_name')} "
                     f"({(group[0].get('commit') or '')[:7]}, {date})", fontsize=9)
        written.append(_save(plt, fig, os.path.join(out_dir, f"sweep-{slug(op)}-{slug(sweep)}-{slug(mode)}.png")))
    return written


@command("report", prog=PROG)
def main(argv) -> int:
    p = Parser(PROG, description=__doc__)
    p.add_argument("--out", default=DEFAULT_OUT, help="the results folder (default bench/results)")
    return make_report(p.parse_args(argv).out)


def make_report(results_dir: str) -> int:
    """The plots of every results file in ``results_dir``; UsageError if it holds none."""
    files = sorted(glob.glob(os.path.join(results_dir, "*.jsonl")))
    if not files:
        raise UsageError(f"--out {results_dir!r} holds no results (*.jsonl): run python -m bench first")
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("the plots need matplotlib (pip install matplotlib)") from None
    plt.switch_backend("Agg")

    written = []
    for path in files:
        rows = read_jsonl(path)[0]
        out_dir = os.path.join(results_dir, "plots", os.path.basename(path)[: -len(".jsonl")])
        os.makedirs(out_dir, exist_ok=True)
        written += _plot_history(plt, rows, out_dir) + _plot_sweeps(plt, rows, out_dir)
    print("\n".join(f"wrote {p}" for p in written))
    print(f"{len(written)} plots from {len(files)} results files")
    return 0
