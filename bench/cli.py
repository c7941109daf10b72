"""python -m bench [ops|model|retrieval|all|report] [--device ..] [--dtype ..] [--quick] [--out DIR]

ops        the three attention ops, every backend of ours against every peer
model      bench/model.py (the RETRO model's training step)
retrieval  bench/retrieval.py (the retriever: embedding, FAISS indexes)
all        ops (+ bench/cpu_cca.py on the CPU), model, retrieval
report     PNG plots of <out>/*.jsonl into <out>/plots/

Results are printed as a table and appended to <out>/<device-slug>.jsonl.

python -m bench import OUT_DIR   file a bench/gpu_check.sh run's results (bench/gpu_import.py)
python -m bench kernels [...]    the Triton kernels' resource report (bench/kernels.py)

Exit status: 2 for a bad argument (one line, before any work), 1 when a
measurement failed or the run could not finish, 0 otherwise.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import sys
import time
import traceback

from .args import OneLineParser, fail, name_list, positive_int, with_exit_codes

PROG = "python -m bench"

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# What --ops and --sweeps accept (tests/test_bench_cli.py checks these against bench/ops.py).
OP_NAMES = {"chunked_cross_attention": "CCA", "neighbour_self_attention": "NSA",
            "neighbour_cross_attention": "NCA", "cpu_cca": "cpu_cca"}
WHATS = ("ops", "model", "retrieval", "all", "report")
SWEEP_NAMES = {name: name for name in ("paper", "base", "mask", "K", "D", "N", "GQA")}
PARALLEL_NAMES = {name: name for name in ("single", "ddp", "fsdp", "tp")}

# The suites besides the ops ("hooks"): (module, how it is called); their rows need not follow
# bench/common.py's schema.
HOOKS = {
    "model": ("bench.model", "run(quick, device)"),
    "retrieval": ("bench.retrieval", "run(quick, device)"),
    "cpu_cca": ("bench.cpu_cca", "run(quick)"),
}


def parse_args(argv=None):
    p = OneLineParser(prog=PROG, description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="ops", metavar="{" + ",".join(WHATS) + "}")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                   help="default: fp16 and bf16 on cuda (sweeps in fp16), fp32 on cpu")
    p.add_argument("--quick", action="store_true", help="small shapes, short timings (CI)")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (default bench/results)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default torch's own; on a machine shared with other "
                        "jobs 1 thread, or OMP_WAIT_POLICY=PASSIVE, avoids OpenMP spin-wait stalls)")
    p.add_argument("--sweeps", type=name_list(SWEEP_NAMES, "sweep"), default=None,
                   help="comma-separated sweeps to run (paper, base, mask, K, D, N, GQA); default all")
    p.add_argument("--ops", type=name_list(OP_NAMES, "op"), default=None,
                   help="comma-separated ops to run (chunked_cross_attention or CCA, NSA, NCA); default all")
    p.add_argument("--parallel", type=name_list(PARALLEL_NAMES, "layout"), default=None,
                   help="model: the training step in these layouts (single, ddp, fsdp, tp; 2 torchrun processes)")
    p.add_argument("--no-save", action="store_true", help="print only; append nothing")
    # Unknown options first: `--opps CCA` is a misspelt option, not a bad `what`.
    args, extras = p.parse_known_args(argv)
    if extras:
        p.error(f"unrecognized arguments: {' '.join(extras)}")
    if args.what not in WHATS:
        p.error(f"argument what: invalid choice: {args.what!r} (choose from {', '.join(WHATS)}, import, kernels)")
    return args


def run_hook(suite: str, quick: bool, device, parallel=None) -> list[dict]:
    """Rows of one of HOOKS, or one row saying why there are none ('skipped' without its module, 'failed')."""
    from .common import make_row

    module_name, signature = HOOKS[suite]
    if module_name not in sys.modules and importlib.util.find_spec(module_name) is None:
        reason = f"{module_name} is not in this checkout (it would provide {signature})"
        print(f"skip {suite}: {reason}")
        return [make_row(suite, suite, "*", "skipped", reason=reason)]
    try:
        module = importlib.import_module(module_name)
        params = inspect.signature(module.run).parameters
        kwargs = {"quick": quick}
        if "device" in params:
            kwargs["device"] = device.type
        if parallel:
            kwargs["parallel"] = parallel
        rows = list(module.run(**kwargs))
    except Exception as e:
        traceback.print_exc()
        reason = f"{type(e).__name__}: {e}"
        print(f"FAILED {suite}: {reason}")
        return [make_row(suite, suite, "*", "failed", reason=reason)]
    rows = [r if all(k in r for k in ("name", "impl", "status")) else _wrap_foreign_row(suite, r)
            for r in rows]
    for r in rows:
        r.setdefault("suite", suite)
    return rows


_SHAPE_KEYS = ("B", "N", "m", "K", "R", "M", "L", "H", "Hq", "Hkv", "D", "mask")
_DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _wrap_foreign_row(suite: str, row: dict) -> dict:
    """A row that does not follow bench/common.py's schema: keep all of it, under metrics.

    name/impl come from 'name'/'bench' and 'impl'/'variant'/'backend'; the
    problem-size keys become `shape`; everything else is kept in `metrics`.
    """
    from .common import make_row

    rest = dict(row)
    name = rest.pop("name", None) or rest.pop("bench", None) or suite
    impl = rest.pop("impl", None) or rest.pop("variant", None) or rest.pop("backend", None) or "?"
    shape = {k: rest.pop(k) for k in _SHAPE_KEYS if k in rest}
    dtype = rest.pop("dtype", None)
    return make_row(suite, str(name), str(impl), rest.pop("status", "ok"), shape=shape,
                    dtype=_DTYPE_ALIASES.get(dtype, dtype), metrics=rest,
                    notes="row in the module's own format: its numbers are under metrics")


def run_kernels(argv: list[str]) -> int:
    """python -m bench kernels: bench/kernels.py's main(argv), where that module exists."""
    prog = "python -m bench kernels"
    if "bench.kernels" not in sys.modules and importlib.util.find_spec("bench.kernels") is None:
        return fail(prog, "bench/kernels.py is not in this checkout (it comes with the Triton kernels' work)", 2)
    module = importlib.import_module("bench.kernels")
    main = getattr(module, "main", None)
    if not callable(main):
        return fail(prog, "bench/kernels.py has no main()", 2)
    if not inspect.signature(main).parameters:  # a main() that reads sys.argv itself
        sys.argv = [prog, *argv]
        return main() or 0
    return main(argv) or 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["import"]:
        from .gpu_import import main as import_main

        return import_main(argv[1:])
    if argv[:1] == ["kernels"]:
        return run_kernels(argv[1:])
    args = parse_args(argv)
    if args.what == "report":
        from .report import make_report

        return make_report(args.out)
    return with_exit_codes(PROG, measure)(args)


def measure(args) -> int:
    """python -m bench {ops,model,retrieval,all}: the rows, printed and appended to <out>/<device>.jsonl."""
    import torch

    from .common import RunContext, append_jsonl, print_table

    if args.device == "cuda" and not torch.cuda.is_available():
        return fail(PROG, "argument --device: cuda, but torch sees no CUDA device", 2)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = [args.dtype] if args.dtype else (["fp16", "bf16"] if device.type == "cuda" else ["fp32"])
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ctx = RunContext(device, args.quick)
    print(f"bench {args.what} on {ctx.device_name} ({torch.get_num_threads()} threads), "
          f"dtypes {dtypes}, quick={args.quick}, commit {ctx.commit}{' (dirty)' if ctx.dirty else ''}")
    ctx.measure_peaks(dtypes)
    rows = [ctx.finalize_row(r) for r in suite_rows(args, device, dtypes)]
    print()
    print_table(rows)
    if not args.no_save:
        path = append_jsonl(rows, args.out, ctx.device_slug)
        print(f"\nappended {len(rows)} rows to {path}")
    n_failed = sum(r["status"] == "failed" for r in rows)
    print(f"done in {time.perf_counter() - t0:.1f}s: {len(rows)} rows, "
          f"{sum(r['status'] == 'ok' for r in rows)} ok, "
          f"{sum(r['status'] == 'skipped' for r in rows)} skipped, {n_failed} failed")
    return 1 if n_failed else 0


def suite_rows(args, device, dtypes: list[str]) -> list[dict]:
    """The rows of the suites `args.what` names (ops: every op, and the C++ CCA's own benchmark on a CPU)."""
    from . import ops

    rows = []
    if args.what in ("ops", "all"):
        rows += ops.run(args.quick, device, dtypes, sweeps=args.sweeps, op_names=args.ops)
        wanted = args.ops
        if device.type == "cpu" and (not wanted or wanted & {"cpu_cca", "CCA", "chunked_cross_attention"}):
            rows += run_hook("cpu_cca", args.quick, device)
    for suite in ("model", "retrieval"):
        if args.what in (suite, "all"):
            rows += run_hook(suite, args.quick, device, args.parallel if suite == "model" else None)
    return rows
