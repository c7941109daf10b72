"""retro_kernels: fused kernels for RETRO's retrieval machinery.

Public API:
    chunked_cross_attention(q, k, v, chunk_size, *, neighbour_mask=None,
                            scale=None, start_pos=0, backend="auto")
    neighbour_self_attention(q, k, v, *, neighbour_mask=None, scale=None, backend="auto")
    neighbour_cross_attention(q, k, v, *, chunk_mask=None, scale=None, backend="auto")
    retro_kernels.nn: nn.Module layers built on the ops.
    BackendNotSupported, explain(op, **inputs): why a backend was not used.
"""
from .dispatch import BackendNotSupported, explain
from .ops.chunked_cross_attention import chunked_cross_attention
from .ops.neighbour_cross_attention import neighbour_cross_attention
from .ops.neighbour_self_attention import neighbour_self_attention
from . import nn

__all__ = [
    "chunked_cross_attention",
    "neighbour_self_attention",
    "neighbour_cross_attention",
    "BackendNotSupported",
    "explain",
]
__version__ = "0.1.0"
