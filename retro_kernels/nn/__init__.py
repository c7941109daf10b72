"""nn.Module layers built on the retro_kernels ops."""
from .chunked_cross_attention import ChunkedCrossAttention
from .rotary import RotaryEmbedding
from .neighbour_encoder import NeighbourEncoderLayer

__all__ = ["ChunkedCrossAttention", "RotaryEmbedding"]
__all__ += ["NeighbourEncoderLayer"]
