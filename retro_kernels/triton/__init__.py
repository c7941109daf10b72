"""Triton kernels (kernel and launcher side by side: chunked_cross_attention.py, and
neighbour_attention.py for the two neighbour ops), and what they support.

`BACKEND` declares it once for every op (retro_kernels/backend.py); its `kernels`
table names each op's launchers. On the CPU the kernels run only under the
interpreter (interpreter.py). Without triton installed, the table is empty and
dispatch says "triton is not installed".
"""
from __future__ import annotations

import importlib.util

import torch

from ..backend import Backend
from .interpreter import interpreter_reasons

try:
    from . import chunked_cross_attention as cca
    from . import neighbour_attention
except ImportError as e:  # no triton, or one these kernels cannot use: the other backends still work
    KERNELS = {}
    MISSING = ("triton is not installed" if importlib.util.find_spec("triton") is None
               else f"the triton backend failed to import: {e}")
else:
    KERNELS = {
        "chunked_cross_attention": (cca.forward, cca.backward),
        "neighbour_self_attention": (neighbour_attention.self_forward, neighbour_attention.self_backward),
        "neighbour_cross_attention": (neighbour_attention.cross_forward, neighbour_attention.cross_backward),
    }
    MISSING = None

BACKEND = Backend(
    name="triton",
    devices=("cuda", "cpu"),  # cpu: under the interpreter only (interpreter_reasons)
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    kernels=KERNELS,
    max_head_dim=256,
    # the tiles are sized for sm_80 and newer data-centre GPUs: 163 KB of shared memory per block
    min_compute_capability=(8, 0),
    min_shared_memory=163 * 1024,
    missing=MISSING,
    limits=interpreter_reasons,
)
