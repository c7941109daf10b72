"""python -m bench report: PNG plots of the results history and of each sweep.

For every <out>/<device-slug>.jsonl:
  plots/<slug>/history-<op>.png   per run (x: date, commit), the time of each
        impl at each problem of the "paper"/"base" sweep, one panel per mode;
        our fused backends show how we move over time, peers show drift of the
        machine and software.
  plots/<slug>/sweep-<op>-<sweep>-<mode>.png   from the latest run: time and
        percent of the bandwidth roofline along the swept value, one line per impl.
"""
from __future__ import annotations

import glob
import os
from collections import defaultdict

from models.cli_common import Parser, UsageError, command

from .common import DEFAULT_OUT, read_jsonl, slug

PROG = "python -m bench report"


def _series_key(r: dict) -> str:
    shape = r.get("shape") or {}
    extra = f" D={shape['D']}" if "D" in shape else ""
    return f"{r['impl']} {r.get('dtype')}{extra}"


def _plot_history(plt, rows: list[dict], out_dir: str) -> list[str]:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("sweep") in ("paper", "base")
          and r.get("time_ms")]
    by_op = defaultdict(list)
    for r in ok:  # --quick runs use other shapes: a history of their own
        by_op[(r["name"], bool(r.get("quick")))].append(r)
    return [_save(plt, _history_figure(plt, op, quick, op_rows),
                  os.path.join(out_dir, f"history-{slug(op)}{'-quick' if quick else ''}.png"))
            for (op, quick), op_rows in by_op.items()]


def _history_figure(plt, op: str, quick: bool, op_rows: list[dict]):
    """One panel per mode: each series' time per run (x: date and commit)."""
    runs = sorted({(r["date"], r["run_id"], (r.get("commit") or "")[:7]) for r in op_rows})
    run_index = {run_id: i for i, (_, run_id, _) in enumerate(runs)}
    modes = sorted({r["mode"] for r in op_rows})
    names = sorted({_series_key(r) for r in op_rows})
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}  # one colour per series in every panel
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        series = defaultdict(list)
        for r in op_rows:
            if r["mode"] == mode:
                series[_series_key(r)].append((run_index[r["run_id"]], r["time_ms"]))
        for name, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colors[name],
                    linestyle=_line_style(name), label=name)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels([f"{d[:16]}\n{c}" for d, _, c in runs], rotation=45, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (lower is better)")
        ax.set_title(f"{op} {mode}{' (--quick shapes)' if quick else ''}")
        ax.grid(True, alpha=0.3)
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    axes[0][-1].legend(list(handles.values()), list(handles), fontsize=7, loc="best")
    return fig


def _line_style(impl: str) -> str:
    return "-" if impl.startswith("retro_kernels") else "--"  # ours solid, peers dashed


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


_IMPL_COLORS = {  # the same colour for an impl in every sweep plot
    "retro_kernels:triton": "C0", "retro_kernels:cuda": "C1", "retro_kernels:cpu": "C2",
    "reference": "C7", "sdpa": "C3", "flex_attention": "C4", "flash_attn": "C5",
    "retro_pytorch": "C6", "sdpa_masked": "C3", "sdpa_repeat": "C8",
}

_SWEEP_AXES = {
    "K": lambda s: s.get("K"),
    "D": lambda s: s.get("D"),
    "N": lambda s: s.get("N"),
    "GQA": lambda s: s["Hq"] // s["Hkv"] if "Hkv" in s else None,
}


def _plot_sweeps(plt, rows: list[dict], out_dir: str) -> list[str]:
    written = []
    for (op, sweep, mode), group in sorted(_latest_sweeps(rows).items()):
        if len({r["sweep_value"] for r in group}) >= 2:
            written.append(_save(plt, _sweep_figure(plt, op, sweep, mode, group),
                                 os.path.join(out_dir, f"sweep-{slug(op)}-{slug(sweep)}-{slug(mode)}.png")))
    return written


def _latest_sweeps(rows: list[dict]) -> dict[tuple, list[dict]]:
    """{(op, sweep, mode): rows} of the latest run that has each (full runs before --quick ones), with
    the run's base problem as a point of every sweep (at its own K, D, N, Hq/Hkv)."""
    swept = [r for r in rows if r.get("suite") == "ops" and r.get("status") == "ok" and r.get("time_ms")
             and r.get("sweep") not in (None, "paper", "base", "mask")]
    latest_of: dict[tuple, tuple] = {}
    for r in swept:
        key = (r["name"], r["sweep"], r["mode"])
        latest_of[key] = max(latest_of.get(key, ()), (not r.get("quick"), r["date"], r["run_id"]))
    groups = defaultdict(list)
    for r in swept:
        key = (r["name"], r["sweep"], r["mode"])
        if r["run_id"] == latest_of[key][2]:
            groups[key].append(r)
    for (op, sweep, mode), group in groups.items():
        axis = _SWEEP_AXES.get(sweep)
        have = {(r["impl"], r["sweep_value"]) for r in group}
        base_rows = [r for r in rows if r.get("run_id") == group[0]["run_id"] and r.get("status") == "ok"
                     and r.get("sweep") == "base" and r.get("time_ms")]
        for r in base_rows:
            if r["name"] == op and r["mode"] == mode and axis and r["dtype"] == group[0]["dtype"]:
                value = axis(r["shape"])
                if (r["impl"], value) not in have:
                    group.append({**r, "sweep": sweep, "sweep_value": value})
    return groups


def _sweep_figure(plt, op: str, sweep: str, mode: str, group: list[dict]):
    """Time and percent of the roofline along the swept value, one line per impl."""
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_impl = defaultdict(list)
    for r in group:
        by_impl[r["impl"]].append(r)
    for i, (impl, impl_rows) in enumerate(sorted(by_impl.items())):
        impl_rows.sort(key=lambda r: r["sweep_value"])
        xs = [r["sweep_value"] for r in impl_rows]
        style = dict(marker="o", linestyle=_line_style(impl), color=_IMPL_COLORS.get(impl, f"C{(i + 5) % 10}"),
                     label=impl)
        ax_t.plot(xs, [r["time_ms"] for r in impl_rows], **style)
        ax_r.plot(xs, [r.get("roofline_pct") or 0 for r in impl_rows], **style)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("median ms")
    ax_r.set_ylabel("% of measured copy bandwidth (roofline)")
    for ax in (ax_t, ax_r):
        ax.set_xlabel(sweep + (" (Hq / Hkv)" if sweep == "GQA" else ""))
        ax.grid(True, alpha=0.3)
    ax_t.legend(fontsize=7)
    r0 = group[0]
    fig.suptitle(f"{op} {mode} {r0.get('dtype')} on {r0.get('device_name')} "
                 f"({(r0.get('commit') or '')[:7]}, {r0.get('date')})", fontsize=9)
    return fig


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
