"""Which fused backends the tests exercise on this machine.

A fused backend is tested wherever it can run: Triton on a GPU or under the
interpreter, the C++ CPU kernels when the extension is built, CUDA on a GPU.
"""
import torch

from retro_kernels import dispatch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fused_backends(op: str, probe: dict) -> list[str]:
    """The fused backends that can run `op` on the `probe` inputs (on DEVICE)."""
    return [b for b in dispatch.FUSED_BACKENDS if not dispatch.not_supported_reasons(b, op, **probe)]
