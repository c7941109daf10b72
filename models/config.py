"""`RetroConfig`: the shape of a RETRO model, checked once, saved as JSON with every checkpoint.
Layer numbers are 1-based, as in the paper (cca_start_layer=6, cca_every=3: layers 6, 9, 12, ...).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

from .cli_common import check_value, integer, number

KERNELS = ("auto", "reference", "triton", "cpu", "cuda")
FEED_FORWARDS = ("gated", "gelu")
POSITIVE = integer(1)
# The range of every number of a config (None is allowed for the OPTIONAL ones, else an int >= 1).
LIMITS = {**dict.fromkeys(("vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "chunk_size", "num_neighbours",
                           "cca_start_layer", "cca_every", "encoder_layers", "encoder_ff_mult"), POSITIVE),
          "rotary_base": number(0, lo_open=True), "ff_mult": number(0, lo_open=True),
          "dropout": number(0, 1, hi_open=True)}
OPTIONAL = ("n_kv_heads", "encoder_heads", "neighbour_len")


@dataclass
class RetroConfig:
    vocab_size: int
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: n_heads (fewer: grouped-query attention)
    feed_forward: str = "gated"  # "gated" (SwiGLU) or "gelu"
    ff_mult: float = 4.0  # hidden width of the feed-forward / d_model (gated: 2/3 of it)
    seq_len: int = 512  # N, tokens per training sequence
    chunk_size: int = 64  # m
    num_neighbours: int = 2  # K
    neighbour_len: Optional[int] = None  # R; None: 2 * chunk_size (chunk + continuation)
    retrieval: bool = True  # False: a plain decoder (no CCA layers, no encoder)
    cca_start_layer: int = 6  # 1-based; clipped to n_layers for small models (see cca_layers)
    cca_every: int = 3
    encoder_layers: int = 2
    encoder_heads: Optional[int] = None  # None: n_heads
    encoder_cross_attention_layers: tuple = (1,)  # 1-based encoder layers with cross-attention
    encoder_ff_mult: int = 4  # encoder feed-forward width / d_model
    rotary_base: float = 10000.0
    tie_embeddings: bool = True
    dropout: float = 0.0
    kernels: str = "auto"  # "auto" (fused where available) or "reference", or a named backend
    extra: dict = field(default_factory=dict)  # free-form notes (e.g. the database it was trained on)

    def __post_init__(self):
        self.encoder_cross_attention_layers = tuple(self.encoder_cross_attention_layers)
        self.validate()

    @property
    def R(self) -> int:
        return 2 * self.chunk_size if self.neighbour_len is None else self.neighbour_len

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def cca_layers(self) -> list[int]:
        """0-based indices of the decoder layers with chunked cross-attention."""
        if not self.retrieval:
            return []
        return list(range(self.cca_start_layer - 1, self.n_layers, self.cca_every))

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"RetroConfig: {msg}")

        try:  # the numbers: the command line's type= functions and their messages
            for name, parse in {**LIMITS, **dict.fromkeys(OPTIONAL, POSITIVE)}.items():
                if name not in OPTIONAL or getattr(self, name) is not None:
                    check_value(name, getattr(self, name), parse)
        except ValueError as e:
            raise ValueError(f"RetroConfig: {e}") from None
        for name in ("retrieval", "tie_embeddings"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        need(all(isinstance(x, int) for x in self.encoder_cross_attention_layers),
             f"encoder_cross_attention_layers must be layer numbers, got {self.encoder_cross_attention_layers!r}")
        need(isinstance(self.extra, dict), f"extra must be a JSON object, got {self.extra!r}")
        need(self.d_model % self.n_heads == 0,
             f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        need(self.n_heads % (self.n_kv_heads or self.n_heads) == 0,
             f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        need(self.d_model % (self.encoder_heads or self.n_heads) == 0,
             f"d_model ({self.d_model}) must be divisible by encoder_heads ({self.encoder_heads})")
        need(self.seq_len % self.chunk_size == 0,
             f"chunk_size ({self.chunk_size}) must divide seq_len ({self.seq_len}): "
             f"training sequences are whole chunks, each with its own neighbours")
        need(self.feed_forward in FEED_FORWARDS,
             f"feed_forward must be one of {FEED_FORWARDS}, got {self.feed_forward!r}")
        need(self.kernels in KERNELS, f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.retrieval:
            need(self.cca_start_layer <= self.n_layers,
                 f"cca_start_layer ({self.cca_start_layer}) must be a layer number in 1..n_layers "
                 f"({self.n_layers}); layer numbers are 1-based as in the paper")
            for layer in self.encoder_cross_attention_layers:
                need(1 <= layer <= self.encoder_layers,
                     f"encoder_cross_attention_layers has {layer}, not in 1..{self.encoder_layers}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["encoder_cross_attention_layers"] = list(self.encoder_cross_attention_layers)
        return d

    @classmethod
    def from_json(cls, text: str) -> "RetroConfig":
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError(f"RetroConfig: expected a JSON object, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"RetroConfig: unknown fields {sorted(unknown)}")
        if not isinstance(d.get("encoder_cross_attention_layers", ()), (list, tuple)):
            raise ValueError("RetroConfig: encoder_cross_attention_layers must be a list of layer numbers")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
