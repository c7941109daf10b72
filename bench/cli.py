"""python -m bench [ops|model|retrieval|all|report] [--device ..] [--dtype ..] [--quick] [--out DIR]

ops        the three attention ops, every backend of ours against every peer
model      bench/model.py (the RETRO model's training step), if present
retrieval  bench/retrieval.py (the retriever), if present
all        ops (+ bench/cpu_cca.py on the CPU), model, retrieval
report     PNG plots of <out>/*.jsonl into <out>/plots/

Results are printed as a table and appended to <out>/<device-slug>.jsonl.
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

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Benchmark modules that other branches provide: (suite name, module, how it is called).
HOOKS = {
    "model": ("bench.model", "run(quick, device)"),
    "retrieval": ("bench.retrieval", "run(quick, device)"),
    "cpu_cca": ("bench.cpu_cca", "run(quick)"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="ops", choices=("ops", "model", "retrieval", "all", "report"))
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                   help="default: fp16 and bf16 on cuda (sweeps in fp16), fp32 on cpu")
    p.add_argument("--quick", action="store_true", help="small shapes, short timings (CI)")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (default bench/results)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's own; on a machine shared with other "
                        "jobs 1 thread, or OMP_WAIT_POLICY=PASSIVE, avoids OpenMP spin-wait stalls)")
    p.add_argument("--sweeps", default=None,
                   help="comma-separated sweeps to run (paper, base, mask, K, D, N, GQA); default all")
    p.add_argument("--ops", default=None,
                   help="comma-separated ops to run (chunked_cross_attention or CCA, NSA, NCA); default all")
    p.add_argument("--no-save", action="store_true", help="print only; append nothing")
    return p.parse_args(argv)


def run_hook(suite: str, quick: bool, device) -> list[dict]:
    """Rows from another branch's benchmark module, or one 'skipped' row saying why not."""
    from .common import make_row

    module_name, signature = HOOKS[suite]
    if module_name not in sys.modules and importlib.util.find_spec(module_name) is None:
        reason = f"{module_name} is not here yet (its branch provides {signature})"
        print(f"skip {suite}: {reason}")
        return [make_row(suite, suite, "*", "skipped", reason=reason)]
    try:
        module = importlib.import_module(module_name)
        params = inspect.signature(module.run).parameters
        kwargs = {"quick": quick}
        if "device" in params:
            kwargs["device"] = device.type
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


def _split(text: str | None) -> set[str] | None:
    return {part.strip() for part in text.split(",") if part.strip()} if text else None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.what == "report":
        from .report import make_report

        return make_report(args.out)

    import torch

    from . import ops
    from .common import RunContext, append_jsonl, print_table

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype:
        dtypes = [args.dtype]
    else:
        dtypes = ["fp16", "bf16"] if device.type == "cuda" else ["fp32"]

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ctx = RunContext(device, args.quick)
    print(f"bench {args.what} on {ctx.device_name} ({torch.get_num_threads()} threads), "
          f"dtypes {dtypes}, quick={args.quick}, commit {ctx.commit}{' (dirty)' if ctx.dirty else ''}")
    ctx.measure_peaks(dtypes)

    rows = []
    if args.what in ("ops", "all"):
        rows += ops.run(args.quick, device, dtypes, sweeps=_split(args.sweeps), op_names=_split(args.ops))
        wanted = _split(args.ops)
        if device.type == "cpu" and (not wanted or wanted & {"cpu_cca", "CCA", "chunked_cross_attention"}):
            rows += run_hook("cpu_cca", args.quick, device)
    if args.what in ("model", "all"):
        rows += run_hook("model", args.quick, device)
    if args.what in ("retrieval", "all"):
        rows += run_hook("retrieval", args.quick, device)

    rows = [ctx.finalize_row(r) for r in rows]
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
