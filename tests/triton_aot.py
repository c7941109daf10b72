"""Compile the Triton kernels for real GPUs ahead of time, without a GPU.

Triton ships ptxas, so a kernel can be compiled to a cubin for sm_80/sm_90
here. That catches what the CPU interpreter cannot: kernels that do not
lower for a GPU, register spills, and shared memory the chip does not have.
bench/kernels.py does the work (it runs the real launchers on meta tensors
and compiles the launches they make); this runs it in a fresh Python with the
interpreter off, where @triton.jit gives compilable kernels.
"""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_fresh(code: str, timeout: int = 900) -> str:
    """Run `code` in a new Python with the interpreter off (TRITON_INTERPRET=0); its stdout."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, f"ahead-of-time compile failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def compile_report(shapes, dtype="bf16", arch="sm90", configs="all", jobs=2) -> list[dict]:
    """bench/kernels.py's resource rows for `shapes` ([(op, dims)]); configs: "all" (every config an
    autotuned launch may pick), "default", or "bwd" (every backward config, the forwards' defaults)."""
    code = f"""
import json
from bench import kernels as bk
tasks = bk.tasks({shapes!r}, {dtype!r}, all_configs={configs!r} != "default")
if {configs!r} == "bwd":
    tasks = [t for t in tasks if t[0]["direction"] == "bwd" or t[2] is t[1].configs[0]]
print(json.dumps(list(bk.compile_rows(tasks, {arch!r}, jobs={jobs}))))
"""
    return json.loads(run_fresh(code).strip().splitlines()[-1])
