"""python -m bench [SUITE|all] [--device ..] [--dtype ..] [--quick] [--out DIR] ...

Suites (rows printed as tables and appended to <out>/<device-slug>.jsonl):
  ops        the three attention ops, every backend of ours against every peer
             (on the CPU also the `cpu` shape set: the C++ kernels at their reference shapes)
  model      the RETRO model's training step (bench/model.py)
  retrieval  the retriever: embedding, FAISS indexes (bench/retrieval.py)
  all        every suite
Tools:
  report     PNG plots of <out>/*.jsonl into <out>/plots/ (python -m bench report --out DIR)
  import     file a bench/gpu_check.sh run's results (python -m bench import OUT_DIR)
  kernels    the Triton kernels' resource report (python -m bench kernels --help)

Exit status: 2 for a bad argument (one line, before any work), 1 when a
measurement failed or the run could not finish, 130 interrupted, 0 otherwise.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
import traceback

from models.cli_common import Parser, UsageError, command, integer

from .common import DEFAULT_OUT

PROG = "python -m bench"

# One entry per command. A suite's module has run(quick, device, ...) -> rows, taking whichever
# of dtypes, sweeps and ops it declares; a tool's function is main(argv) -> exit status.
SUITES = {"ops": "bench.ops", "model": "bench.model", "retrieval": "bench.retrieval"}
TOOLS = {"report": ("bench.report", "main"), "import": ("bench.gpu_check", "import_main"),
         "kernels": ("bench.kernels", "main")}

# What --ops and --sweeps accept (tests/test_bench_cli.py checks these against bench/ops.py).
OP_NAMES = {"chunked_cross_attention": "CCA", "neighbour_self_attention": "NSA",
            "neighbour_cross_attention": "NCA"}
SWEEP_NAMES = ("paper", "base", "mask", "K", "D", "N", "GQA", "cpu")


def name_list(valid, what: str):
    """A type= for comma-separated names, each one of `valid`."""
    def parse(text: str) -> set[str]:
        names = {part.strip() for part in text.split(",") if part.strip()}
        unknown = sorted(names - set(valid))
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}s from "
                                             f"{', '.join(valid)}, got {text!r}")
        return names

    return parse


def parse_args(argv):
    p = Parser(PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="ops", metavar="{" + ",".join([*SUITES, "all"]) + "}")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                   help="default: fp16 and bf16 on cuda (sweeps in fp16), fp32 on cpu")
    p.add_argument("--quick", action="store_true", help="small shapes, short timings (CI)")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (default bench/results)")
    p.add_argument("--threads", type=integer(1), default=None,
                   help="torch CPU threads (default torch's own; on a machine shared with other "
                        "jobs 1 thread, or OMP_WAIT_POLICY=PASSIVE, avoids OpenMP spin-wait stalls)")
    p.add_argument("--sweeps", type=name_list(SWEEP_NAMES, "sweep"), default=None,
                   help=f"comma-separated sweeps to run ({', '.join(SWEEP_NAMES)}); default all")
    p.add_argument("--ops", type=name_list([*OP_NAMES, *OP_NAMES.values()], "op"), default=None,
                   help="comma-separated ops to run (chunked_cross_attention or CCA, NSA, NCA); default all")
    p.add_argument("--parallel", type=name_list(("single", "ddp", "fsdp", "tp"), "layout"), default=None,
                   help="model: the training step in these layouts (single, ddp, fsdp, tp; 2 torchrun processes)")
    p.add_argument("--no-save", action="store_true", help="print only; append nothing")
    args, extras = p.parse_known_args(argv)  # a misspelt option first: `--opps CCA` is not a bad `what`
    if extras:
        p.error(f"unrecognized arguments: {' '.join(extras)}")
    if args.what not in (*SUITES, "all"):
        p.error(f"argument what: invalid choice: {args.what!r} (choose from {', '.join([*SUITES, 'all', *TOOLS])})")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in TOOLS:
        module, function = TOOLS[argv[0]]
        return getattr(importlib.import_module(module), function)(argv[1:])
    return measure(argv)


@command("bench", prog=PROG)
def measure(argv) -> int:
    """The suites `what` names: rows printed and appended to <out>/<device-slug>.jsonl."""
    import torch

    from .common import RunContext, append_jsonl, not_measured, op_tables, suite_table

    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("argument --device: cuda, but torch sees no CUDA device")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = [args.dtype] if args.dtype else (["fp16", "bf16"] if device.type == "cuda" else ["fp32"])
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ctx = RunContext(device, args.quick)
    print(f"bench {args.what} on {ctx.device_name} ({torch.get_num_threads()} threads), dtypes {dtypes}, "
          f"quick={args.quick}, commit {ctx.commit}{' (dirty)' if ctx.dirty else ''}")
    ctx.measure_peaks(dtypes)
    options = dict(quick=args.quick, device=device, dtypes=dtypes, sweeps=args.sweeps, ops=args.ops,
                   parallel=args.parallel)
    rows = [ctx.finalize_row(r) for suite in (SUITES if args.what == "all" else [args.what])
            for r in suite_rows(suite, options)]
    print("\n" + "\n".join(op_tables(rows) + suite_table(rows) + ["not measured:"] * any(
        r["status"] != "ok" for r in rows) + not_measured(rows)))
    if not args.no_save:
        print(f"appended {len(rows)} rows to {append_jsonl(rows, args.out, ctx.device_slug)}")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    print(f"done in {time.perf_counter() - t0:.1f}s: {len(rows)} rows, "
          + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 1 if counts["failed"] else 0


def suite_rows(suite: str, options: dict) -> list[dict]:
    """The rows of one suite, or one failed row saying why it raised (the other suites still run)."""
    from .common import make_row

    try:
        run = importlib.import_module(SUITES[suite]).run
        params = inspect.signature(run).parameters
        kwargs = {k: v for k, v in options.items() if k in params}
        if "device" in kwargs and suite != "ops":
            kwargs["device"] = kwargs["device"].type
        rows = list(run(**kwargs))
    except Exception as e:  # noqa: BLE001 -- a failing suite is a row, not the end of the run
        traceback.print_exc()
        return [make_row(suite, suite, "*", "failed", reason=f"{type(e).__name__}: {e}")]
    return [r if {"name", "impl", "status"} <= set(r) else _own_format(suite, r) for r in rows]


def _own_format(suite: str, row: dict) -> dict:
    """A row in a module's own format (retrieval's): its numbers kept whole under metrics."""
    from .common import make_row

    rest = {k: v for k, v in row.items() if k != "suite"}
    name = rest.pop("name", None) or rest.pop("case", suite)
    return make_row(suite, str(name), str(rest.pop("impl", "-")), rest.pop("status", "ok"), **rest)
