"""python -m bench kernels: what every Triton kernel asks of a GPU, compiled ahead of time (no GPU needed).

Each op's real launcher runs on meta tensors at the paper shapes (Hkv in {16, 4}, D in {64, 128},
bf16, with masks); its kernel launches are captured instead of run, specialised as Triton's JIT
would (integer arguments equal to 1, 16-byte alignment), and compiled for the target with
Triton's bundled ptxas. Per launch and per configuration its autotuner may pick: registers,
spilled bytes, shared memory, warps, stages, and the CTAs per SM these allow. `--cuda` adds the
CUDA kernels of csrc/cuda (bench/cuda_resources.py). It reruns
itself in a fresh Python when the Triton interpreter is on (or triton already imported).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

from models.cli_common import Parser, command, integer

from .cli import name_list
from .cuda_resources import ARCHS, NVCC_ARCH, format_table, occupancy, rows

PAPER = dict(B=8, N=2048, m=64, K=2, R=128, Hq=16)


@dataclasses.dataclass
class Launch:
    """One captured kernel launch: the JIT function, its arguments, and the configs it may run with."""
    kernel: object  # triton JITFunction
    grid: tuple
    args: tuple
    kwargs: dict
    configs: list  # [(meta-parameters dict, num_warps, num_stages)]; kwargs already hold a fixed one


# -- Capturing the launches a launcher makes ---------------------------------------------------

@contextlib.contextmanager
def capture_launches():
    """Within the block, Triton kernel launches are recorded (into the yielded list), not run
    (under the interpreter too, so tests can look at grids and arguments)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, _grid(grid, self, args, kwargs), args, kwargs, [None]))

    def autotuner_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
        self.nargs = None
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        launches.append(Launch(self.fn, _grid(grid, self.fn, args, kwargs), args, kwargs,
                               [(dict(c.kwargs), c.num_warps, c.num_stages) for c in configs]))

    saved = JITFunction.run, InterpretedFunction.run, Autotuner.run
    JITFunction.run, InterpretedFunction.run, Autotuner.run = jit_run, jit_run, autotuner_run
    try:
        yield launches
    finally:
        JITFunction.run, InterpretedFunction.run, Autotuner.run = saved


def _grid(grid, kernel, args, kwargs):
    if callable(grid):
        grid = grid(dict(zip(kernel.arg_names, args), **kwargs))
    return tuple(grid)


OPS = ("chunked_cross_attention", "neighbour_self_attention", "neighbour_cross_attention")


def meta_inputs(op: str, dims: dict, dtype):
    """Meta tensors (no storage), contiguous, masks included, of the shapes in dims
    (B, N, m, K, R, Hq, Hkv, D; L = N // m chunks; neighbour cross-attention's keys are m tokens)."""
    import torch

    B, N, m, K, R, Hq, Hkv, D = (dims[k] for k in ("B", "N", "m", "K", "R", "Hq", "Hkv", "D"))
    L = max(1, N // m)
    q_shape, k_shape, mask_shape = {
        "chunked_cross_attention": ((B, N, Hq, D), (B, L, K, R, Hkv, D), (B, L, K, R)),
        "neighbour_self_attention": ((B, L, K, R, Hq, D), (B, L, K, R, Hkv, D), (B, L, K, R)),
        "neighbour_cross_attention": ((B, L, K, R, Hq, D), (B, L, m, Hkv, D), (B, L, m)),
    }[op]
    q, k = (torch.empty(shape, device="meta", dtype=dtype) for shape in (q_shape, k_shape))
    mask = torch.empty(mask_shape, device="meta", dtype=torch.bool)
    return q, k, torch.empty_like(k), mask


def op_launches(op: str, dims: dict, dtype) -> dict[str, list[Launch]]:
    """{"fwd": [...], "bwd": [...]}: the launches the Triton backend makes for `op` at these shapes."""
    import torch

    from retro_kernels.triton import KERNELS

    forward, backward = KERNELS[op]
    q, k, v, mask = meta_inputs(op, dims, dtype)
    scale = dims["D"] ** -0.5
    scalars = dict(chunk_size=dims["m"], scale=scale, start_pos=0) if op == "chunked_cross_attention" else dict(scale=scale)
    with capture_launches() as fwd:
        out, lse = forward(q, k, v, mask, **scalars)
    with capture_launches() as bwd:
        backward(torch.empty_like(q), q, k, v, mask, out, lse, **scalars)
    return {"fwd": fwd, "bwd": bwd}


# -- Compiling one launch for a target, the way the JIT would ----------------------------------

def compile_launch(launch: Launch, config, arch: str):
    """The CompiledKernel that Triton's JIT would build for this launch on `arch`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", ARCHS[arch]["capability"], 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    if config is not None:
        meta, num_warps, num_stages = config
        kwargs.update(meta, num_warps=num_warps, num_stages=num_stages)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def resources(compiled, arch: str) -> dict:
    """Registers, spills, shared memory, warps, stages and the CTAs per SM they allow."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = _parse_res_usage(text)
    warps = compiled.metadata.num_warps
    smem = compiled.metadata.shared
    row = dict(registers=usage["REG"], spill_bytes=usage["STACK"] + usage["LOCAL"], smem_bytes=smem,
               num_warps=warps, num_stages=compiled.metadata.num_stages)
    row.update(occupancy(usage["REG"], smem, warps, arch))
    return row


def _parse_res_usage(text: str) -> dict:
    for line in text.splitlines():
        if "REG:" in line:
            fields = dict(part.split(":", 1) for part in line.split() if ":" in part and part[0].isupper())
            return {k: int(fields.get(k, 0)) for k in ("REG", "STACK", "SHARED", "LOCAL")}
    raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")


# -- The report --------------------------------------------------------------------------------

def _meta_label(launch: Launch, config) -> str:
    meta = dict(config[0]) if config else {}
    for name in launch.kernel.arg_names:
        if name.startswith("BLOCK_") and name in launch.kwargs:
            meta.setdefault(name, launch.kwargs[name])
    return " ".join(f"{k[6:]}={v}" for k, v in sorted(meta.items()) if k.startswith("BLOCK_"))


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def tasks(shapes, dtype_name="bf16", all_configs=True) -> list[tuple[dict, Launch, object]]:
    """(row so far, launch, config) for every launch of every (op, dims) in shapes, and every
    config an autotuned launch may pick (only its default one unless all_configs)."""
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    out = []
    for op, dims in shapes:
        for direction, launches in op_launches(op, dims, dtype).items():
            for index, launch in enumerate(launches):
                for config in launch.configs if all_configs else launch.configs[:1]:
                    row = dict(op=op, direction=direction, launch=index, kernel=launch.kernel.__name__,
                               dtype=dtype_name, **dims, grid=list(launch.grid),
                               tiles=_meta_label(launch, config), autotuned=config is not None)
                    out.append((row, launch, config))
    return out


_TASKS: list = []  # the tasks that forked compile workers read


def _compile_task(args) -> dict:
    index, arch = args
    row, launch, config = _TASKS[index]
    t0 = time.perf_counter()
    row = dict(row, arch=arch, **resources(compile_launch(launch, config, arch), arch))
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def compile_rows(task_list, arch="sm90", jobs=1):
    """Yield the resource row of every task, in order, compiling `jobs` at a time."""
    _TASKS[:] = task_list
    work = [(i, arch) for i in range(len(task_list))]
    if jobs <= 1:
        yield from map(_compile_task, work)
        return
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        yield from pool.imap(_compile_task, work)


def paper_shapes(ops=OPS, kv_heads=(16, 4), head_dims=(64, 128)):
    return [(op, dict(PAPER, Hkv=Hkv, D=D)) for op in ops for Hkv in kv_heads for D in head_dims]


def print_row(row: dict) -> None:
    print(f"{row['op']:25s} {row['direction']} Hkv={row['Hkv']:<2d} D={row['D']:<3d} "
          f"{row['tiles']:22s} warps={row['num_warps']} stages={row['num_stages']} "
          f"regs={row['registers']:3d} spill={row['spill_bytes']:4d}B smem={row['smem_bytes'] / 1024:6.1f}KB "
          f"CTAs/SM={row['ctas_per_sm']:2d} ({row['limited_by']})", flush=True)


def _split_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


@command("kernels", prog="python -m bench kernels")
def main(argv) -> int:
    p = Parser("python -m bench kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="sm90")
    p.add_argument("--head-dims", type=_split_ints, default=(64, 128))
    p.add_argument("--kv-heads", type=_split_ints, default=(16, 4))
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--ops", type=name_list(OPS, "op"), default=set(OPS), help="comma-separated op names")
    p.add_argument("--configs", choices=("all", "default"), default="all",
                   help="every config an autotuned launch may pick (default), or only its default one")
    p.add_argument("--jobs", type=integer(1), default=1, help="compile this many kernels at a time")
    p.add_argument("--cuda", action="store_true", help="also the CUDA kernels of csrc/cuda (nvcc --resource-usage)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or "triton" in sys.modules:
        env = dict(os.environ, TRITON_INTERPRET="0")
        return subprocess.call([sys.executable, "-m", "bench.kernels", *argv], env=env)

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default; set to silence 3.9's warning
    import triton

    print(f"Triton {triton.__version__} kernels compiled ahead of time for {args.arch}, {args.dtype}, "
          f"paper shapes {PAPER}", flush=True)
    shapes = paper_shapes(tuple(op for op in OPS if op in args.ops), args.kv_heads, args.head_dims)
    for row in compile_rows(tasks(shapes, args.dtype, args.configs == "all"), args.arch, args.jobs):
        print_row(row)
    if args.cuda:
        print("\nCUDA kernels (csrc/cuda):\n" + format_table(rows((NVCC_ARCH[args.arch],))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
