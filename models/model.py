"""A thin RETRO: a decoder-only LM with chunked cross-attention to encoded neighbours (docs/model.md, "Model").

Pre-norm blocks: x += attn(norm(x)); [x += cca(norm(x), E)]; x += ff(norm(x)). The retrieval encoder runs once
per forward on the neighbours, reading the first CCA layer's chunk activations; neighbours=None is a plain GPT.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retro_kernels.nn import ChunkedCrossAttention, NeighbourEncoderLayer, RotaryEmbedding

from .config import RetroConfig


# Decoder pieces

class FeedForward(nn.Module):
    """SwiGLU ("gated") or GELU MLP."""

    def __init__(self, d_model: int, mult: float, kind: str, dropout: float = 0.0):
        super().__init__()
        self.gated = kind == "gated"
        hidden = int(d_model * mult * (2 / 3 if self.gated else 1))
        hidden = 8 * math.ceil(hidden / 8)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.gate = nn.Linear(d_model, hidden, bias=False) if self.gated else None  # apart: tensor-parallel splits
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x) * F.silu(self.gate(x)) if self.gated else F.gelu(self.up(x))
        return self.dropout(self.down(h))


@dataclass
class LayerCache:
    """Self-attention keys and values of the tokens seen so far: (B, T, Hkv, D)."""
    k: Optional[Tensor] = None
    v: Optional[Tensor] = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
        return self.k, self.v


class SelfAttention(nn.Module):
    """Causal multi-head (or grouped-query) self-attention with rotary positions, via SDPA; the head counts
    come from the projections' outputs (under tensor parallelism a rank holds some heads)."""

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.head_dim
        self.head_dim = D
        self.to_q = nn.Linear(cfg.d_model, H * D, bias=False)
        self.to_k = nn.Linear(cfg.d_model, Hkv * D, bias=False)
        self.to_v = nn.Linear(cfg.d_model, Hkv * D, bias=False)
        self.to_out = nn.Linear(H * D, cfg.d_model, bias=False)
        self.rotary = RotaryEmbedding(D - D % 2, cfg.rotary_base)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, start_pos: int = 0, cache: Optional[LayerCache] = None) -> Tensor:
        B, N, _ = x.shape
        D = self.head_dim
        q, k, v = (f(x).view(B, N, -1, D) for f in (self.to_q, self.to_k, self.to_v))
        H, Hkv = q.shape[2], k.shape[2]
        positions = torch.arange(start_pos, start_pos + N, device=x.device)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        if cache is not None:
            k, v = cache.append(k, v)
        T = k.shape[1]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if T == N:  # the whole sequence: plain causal mask
            mask, causal = None, True
        elif N == 1:  # one new token sees everything cached
            mask, causal = None, False
        else:  # a block of new tokens after a cached prefix
            mask, causal = torch.arange(T, device=x.device)[None, :] <= positions[:, None], False
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=H != Hkv,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(o.transpose(1, 2).reshape(B, N, H * D))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: RetroConfig, has_cca: bool):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ff_norm = nn.RMSNorm(cfg.d_model)
        self.ff = FeedForward(cfg.d_model, cfg.ff_mult, cfg.feed_forward, cfg.dropout)
        self.has_cca = has_cca
        if has_cca:
            self.cca_norm = nn.RMSNorm(cfg.d_model)
            self.cca = ChunkedCrossAttention(cfg.d_model, cfg.n_heads, cfg.chunk_size, n_kv_heads=cfg.n_kv_heads,
                                             rotary=True, rotary_base=cfg.rotary_base, backend=cfg.kernels)

    def forward(self, x, start_pos=0, cache=None, encoded=None, encoded_mask=None, cca_start_pos=None):
        x = x + self.attn(self.attn_norm(x), start_pos, cache)
        if self.has_cca and encoded is not None:
            x = x + self.cca(self.cca_norm(x), encoded, encoded_mask, start_pos=cca_start_pos)
        return x + self.ff(self.ff_norm(x))


# Retrieval encoder

class RetrievalEncoder(nn.Module):
    """Encodes embedded neighbours, conditioned on the chunk activations they were retrieved for."""

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        heads = cfg.encoder_heads or cfg.n_heads
        self.layers = nn.ModuleList(
            NeighbourEncoderLayer(cfg.d_model, heads, cross_attention=(i + 1) in cfg.encoder_cross_attention_layers,
                                  ff_mult=cfg.encoder_ff_mult, rotary_base=cfg.rotary_base, backend=cfg.kernels)
            for i in range(cfg.encoder_layers)
        )
        self.norm = nn.RMSNorm(cfg.d_model)

    def forward(self, embedded: Tensor, chunk: Tensor, neighbour_mask: Optional[Tensor]) -> Tensor:
        for layer in self.layers:
            embedded = layer(embedded, chunk, neighbour_mask, None)
        return self.norm(embedded)


# The model

@dataclass
class NeighbourCache:
    """What incremental decoding keeps for retrieval (the fields' comments say what)."""
    chunk_hidden: Optional[Tensor] = None  # first-CCA-input activations of the unfinished chunk
    encoded: Optional[Tensor] = None  # (B, chunks done, K, R, d)
    encoded_mask: Optional[Tensor] = None  # (B, chunks done, K, R) or None

    @property
    def chunks_encoded(self) -> int:
        return 0 if self.encoded is None else self.encoded.shape[1]

    def encode_new_chunks(self, x: Tensor, complete: int, chunk_size: int, encode) -> None:
        """Encode the chunks up to ``complete`` that ``x`` (the next positions' activations) finishes:
        ``encode(chunks (B, n, m, d), first, end) -> (encoded, mask)`` for chunks first..end-1."""
        done, m = self.chunks_encoded, chunk_size
        pending = x if self.chunk_hidden is None else torch.cat([self.chunk_hidden, x], dim=1)
        new = complete - done
        if new > 0:
            encoded, mask = encode(as_chunks(pending, new, m), done, complete)
            self.encoded = encoded if self.encoded is None else torch.cat([self.encoded, encoded], 1)
            if mask is not None:
                self.encoded_mask = mask if self.encoded_mask is None else torch.cat([self.encoded_mask, mask], 1)
            pending = pending[:, new * m:]
        self.chunk_hidden = pending

    def read_by(self, start_pos: int, complete: int, chunk_size: int):
        """(encoded, mask, CCA start position) of the chunks a step from ``start_pos`` may read: shifted by
        whole chunks (the CCA output depends on t only through its chunk and t mod m)."""
        if self.encoded is None:
            return None, None, start_pos
        first = max(0, (start_pos - (chunk_size - 1)) // chunk_size)
        mask = None if self.encoded_mask is None else self.encoded_mask[:, first:complete]
        return self.encoded[:, first:complete], mask, start_pos - first * chunk_size


@dataclass
class DecodeCache(NeighbourCache):
    """State for incremental decoding (see RetroModel.forward)."""
    layers: list = field(default_factory=list)  # LayerCache per decoder layer
    length: int = 0  # tokens seen


def as_chunks(x: Tensor, count: int, chunk_size: int) -> Tensor:
    """The first ``count`` chunks of activations x (B, N, d) as (B, count, m, d)."""
    return x[:, : count * chunk_size].reshape(x.shape[0], count, chunk_size, x.shape[-1])


def complete_chunks(cfg, tokens: Tensor, neighbours: Optional[Tensor], neighbour_mask: Optional[Tensor],
                    start_pos: int, cache) -> int:
    """The chunks complete after ``tokens`` (B, N) at start_pos; ValueError unless the tokens, the cache and
    the neighbours ((B, L >= complete, K, R) ids, a mask of their shape) fit."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, N) token ids, got shape {tuple(tokens.shape)}")
    if cache is not None and start_pos != cache.length:
        raise ValueError(f"start_pos ({start_pos}) must equal the tokens already in the cache ({cache.length})")
    B, complete = tokens.shape[0], (start_pos + tokens.shape[1]) // cfg.chunk_size
    if neighbours is None:
        return complete
    if neighbours.dim() != 4 or neighbours.shape[0] != B or neighbours.shape[3] != cfg.R:
        raise ValueError(f"neighbours must be (B={B}, L, K, R={cfg.R}) token ids, got {tuple(neighbours.shape)}")
    if neighbours.shape[1] < complete:
        raise ValueError(f"neighbours has L={neighbours.shape[1]} chunks but the tokens complete {complete} "
                         f"chunks of {cfg.chunk_size}; pass the neighbours of every complete chunk")
    if neighbour_mask is not None and neighbour_mask.shape != neighbours.shape:
        raise ValueError(f"neighbour_mask must have the neighbours' shape {tuple(neighbours.shape)}, "
                         f"got {tuple(neighbour_mask.shape)}")
    return complete


def encoded_for_step(encode, x: Tensor, start_pos: int, complete: int, cache, chunk_size: int):
    """(encoded, mask, CCA start position) of the neighbours the tokens from start_pos may read, from x at the
    first CCA layer by ``encode(chunks (B, n, m, d), first, end)``; a cache keeps the unfinished chunk."""
    if cache is None:  # the full sequence, from position 0
        if complete == 0:
            return None, None, start_pos
        return (*encode(as_chunks(x, complete, chunk_size), 0, complete), start_pos)
    cache.encode_new_chunks(x, complete, chunk_size, encode)
    return cache.read_by(start_pos, complete, chunk_size)


class RetroModel(nn.Module):
    def __init__(self, cfg: RetroConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        cca = set(cfg.cca_layers)
        self.layers = nn.ModuleList(DecoderBlock(cfg, i in cca) for i in range(cfg.n_layers))
        self.encoder = RetrievalEncoder(cfg) if cfg.retrieval else None
        self.norm = nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Residual projections scaled down with depth (GPT-2); CCA outputs start at
        # zero, so a fresh (or retrofitted) model starts as its plain decoder.
        for name, p in self.named_parameters():
            if name.endswith(("attn.to_out.weight", "ff.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
            if name.endswith("cca.to_out.weight"):
                nn.init.zeros_(p)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def set_kernels(self, kernels: str) -> None:
        """Switch every fused layer to `kernels` ("auto", "reference", "triton", ...)."""
        self.cfg.kernels = kernels
        self.cfg.validate()
        for module in self.modules():
            if module is not self and hasattr(module, "backend"):
                module.backend = kernels

    def new_cache(self) -> DecodeCache:
        return DecodeCache(layers=[LayerCache() for _ in self.layers])

    def forward(self, tokens: Tensor, neighbours: Optional[Tensor] = None, neighbour_mask: Optional[Tensor] = None,
                *, start_pos: int = 0, cache: Optional[DecodeCache] = None) -> Tensor:
        """Logits (B, N, V) for `tokens` (B, N) at positions start_pos.. . neighbours: (B, L, K, R) token ids,
        L >= (start_pos + N) // m, neighbours[:, u] retrieved with chunk u (None: retrieval OFF); neighbour_mask:
        True where a neighbour token is real; cache: new_cache()'s, start_pos = the tokens already fed."""
        cfg = self.cfg
        retrieval_on = neighbours is not None
        if retrieval_on and self.encoder is None:
            raise ValueError("neighbours were given but this model has retrieval=False (no CCA layers)")
        if retrieval_on and cache is None and start_pos != 0:
            raise ValueError("start_pos > 0 with neighbours needs a DecodeCache (incremental decoding)")
        complete = complete_chunks(cfg, tokens, neighbours, neighbour_mask, start_pos, cache)  # chunks to read

        x = self.embed(tokens)
        encoded = encoded_mask = None
        cca_start = start_pos
        first_cca = cfg.cca_layers[0] if cfg.cca_layers else None
        for i, layer in enumerate(self.layers):
            if retrieval_on and i == first_cca:
                encoded, encoded_mask, cca_start = self._encode(x, neighbours, neighbour_mask, start_pos, complete,
                                                                cache)
            layer_cache = None if cache is None else cache.layers[i]
            x = layer(x, start_pos, layer_cache, encoded, encoded_mask, cca_start)
        if cache is not None:
            cache.length = start_pos + tokens.shape[1]
        return self.lm_head(self.norm(x))

    def _encode(self, x, neighbours, neighbour_mask, start_pos, complete, cache):
        def encode(chunks, first, end):
            mask = None if neighbour_mask is None else neighbour_mask[:, first:end]
            return self.encoder(self.embed(neighbours[:, first:end]), chunks, mask), mask

        return encoded_for_step(encode, x, start_pos, complete, cache, self.cfg.chunk_size)


def lm_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy in nats; targets == -100 are ignored."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction=reduction)
