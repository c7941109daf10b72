"""Compile Triton kernels for real GPUs ahead of time, without a GPU.

Triton ships ptxas, so a kernel can be compiled to a cubin for sm_80/sm_90
here. That catches what the CPU interpreter cannot: kernels that do not
lower for a GPU, or that need more shared memory than the chip has.
"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGETS = {"sm80": GPUTarget("cuda", 80, 32), "sm90": GPUTarget("cuda", 90, 32)}
SHARED_MEMORY_LIMIT = {"sm80": 163 * 1024, "sm90": 227 * 1024}
TRITON_TYPE = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def aot_compile(kernel, pointers: dict, floats: set, constexprs: dict, target: str, num_warps: int):
    """Compile `kernel` (a @triton.jit function): `pointers` maps argument to
    Triton pointer type, `floats` names fp32 scalar arguments, every other
    non-constexpr argument is an i32. Returns the compiled kernel."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
    source = ASTSource(
        kernel, signature,
        constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
    )
    compiled = triton.compile(source, target=TARGETS[target], options={"num_warps": num_warps})
    assert compiled.asm["cubin"], "no cubin produced"
    assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT[target], (
        f"needs {compiled.metadata.shared} bytes of shared memory, more than {target} has"
    )
    return compiled


def run_fresh(code: str, timeout: int = 600) -> str:
    """Run `code` in a new Python with the interpreter off (TRITON_INTERPRET=0),
    where @triton.jit gives compilable kernels; `from triton_aot import ...` works there."""
    import os
    import pathlib
    import subprocess
    import sys

    tests = pathlib.Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"ahead-of-time compile failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout
