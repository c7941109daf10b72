"""RETROfit: freeze a trained causal LM, add retrieval, train only what was added (RETRO paper, section 4.4).

    rf = retrofit(gpt2, chunk_size=64, cca_layers=[6, 9, 12])   # 1-based; rf(ids) == gpt2(ids).logits
    logits = rf(input_ids, neighbours, neighbour_mask)   # (B, L, K, R) neighbour token ids

The bases it takes and its forward hooks: docs/model.md, "RETROfit".
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import operator
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from retro_kernels.nn import ChunkedCrossAttention

from .atomic import atomic_file, temporaries, write_json_atomic
from .config import RetroConfig
from .model import NeighbourCache, RetrievalEncoder, RetroModel, complete_chunks, encoded_for_step
from .sharded import shard_files

FORMAT = "retro_kernels/retrofit"
CONFIG_FILE = "retrofit.json"
WEIGHTS_FILE = "retrofit.safetensors"
# What a killed save leaves (models.atomic's temporaries of its two files), removed when a run takes the folder.
TEMPORARIES = temporaries(CONFIG_FILE, WEIGHTS_FILE)
# Where GPT-2, the Llama family (Mistral, Qwen2, Gemma, ...), GPT-NeoX and OPT keep their blocks.
KNOWN_LAYERS = ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers")
KNOWN_ATTENTION = ("attn", "self_attn", "attention", "self_attention")


@dataclass
class RetrofitConfig:
    """What was added to the base model; `d_model`, `n_heads`, `n_layers`, `vocab_size` describe the base."""
    chunk_size: int
    cca_layers: tuple  # 1-based decoder layers followed by CCA (paper: 6, 9, 12, ...)
    d_model: int
    n_heads: int  # CCA and encoder heads
    n_layers: int
    vocab_size: int
    num_neighbours: int = 2  # K
    neighbour_len: Optional[int] = None  # R; None: 2 * chunk_size
    seq_len: int = 512  # the sequence length evaluation and training use
    encoder_layers: int = 2
    encoder_heads: Optional[int] = None
    encoder_cross_attention_layers: tuple = (1,)
    encoder_ff_mult: int = 4
    rotary_base: float = 10000.0
    kernels: str = "auto"
    layers: Optional[str] = None  # dotted path of a transformers model's decoder layers (None: found)
    attention: Optional[str] = None  # attribute of each layer holding its self-attention (None: found)
    extra: dict = field(default_factory=dict)
    retrieval: bool = dataclasses.field(default=True, init=False)  # what evaluation asks of a model

    def __post_init__(self):
        self.cca_layers = tuple(self.cca_layers)
        self.encoder_cross_attention_layers = tuple(self.encoder_cross_attention_layers)
        self.validate()

    @property
    def R(self) -> int:
        return 2 * self.chunk_size if self.neighbour_len is None else self.neighbour_len

    def validate(self) -> None:
        """ValueError unless cca_layers are layers of the base and the added modules fit it (RetroConfig's rules)."""
        layers = self.cca_layers
        if not (layers and all(isinstance(i, int) and 1 <= i <= self.n_layers for i in layers)
                and list(layers) == sorted(set(layers))):
            raise ValueError(f"retrofit: cca_layers must be increasing 1-based layer numbers in 1..{self.n_layers} "
                             f"(paper: every 3rd from 6), got {list(layers)}")
        shared = {k: v for k, v in self.to_dict().items() if k not in ("cca_layers", "layers", "attention")}
        try:
            RetroConfig(**shared, cca_start_layer=layers[0])
        except ValueError as e:
            raise ValueError(f"retrofit: {str(e).removeprefix('RetroConfig: ')}") from None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "retrieval"}


# How to reach into a base model

def _attribute(root: nn.Module, path: str):
    try:
        return operator.attrgetter(path)(root)
    except AttributeError:
        return None


def _first(root: nn.Module, given: Optional[str], known: tuple, fits, option: str, expected: str) -> str:
    """`given`, or else the first of the `known` paths, that names an attribute of `root` that `fits`."""
    for path in (given,) if given else known:
        if fits(_attribute(root, path)):
            return path
    named = f"{option}={given!r} is not" if given else f"none of {list(known)} is"
    raise ValueError(f"retrofit: {named} {expected}")


class BaseAdapter:
    """The decoder layers, their self-attention, the token embedding and the forward of a base model."""

    def __init__(self, model: nn.Module, layers: Optional[str], attention: Optional[str]):
        self.model = model
        self.ours = isinstance(model, RetroModel)
        if self.ours:
            if model.cfg.retrieval:
                raise ValueError("retrofit: the base model already has retrieval (CCA layers); "
                                 "retrofit a plain decoder (trained with retrieval=False)")
            self.layers, self.attention = list(model.layers), "attn"
            self.embedding, self.hidden, self.heads = model.embed, model.cfg.d_model, model.cfg.n_heads
            return
        if not hasattr(model, "get_input_embeddings"):
            raise ValueError(f"retrofit: expected a models.RetroModel or a transformers causal LM, got "
                             f"{type(model).__name__}")
        path = _first(model, layers, KNOWN_LAYERS, lambda found: isinstance(found, nn.ModuleList) and len(found) > 0,
                      "layers", f"a ModuleList of decoder layers in {type(model).__name__}; name them with "
                                f"layers='dotted.path'")
        self.layers = list(_attribute(model, path))
        self.attention = _first(self.layers[0], attention, KNOWN_ATTENTION, lambda found: isinstance(found, nn.Module),
                                "attention", f"a submodule of {type(self.layers[0]).__name__}; name the layer's "
                                             f"self-attention with attention='name'")
        self.embedding = model.get_input_embeddings()
        self.hidden = self.embedding.embedding_dim
        self.heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
        forward = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in forward else "past_key_values"  # 5.x renamed it

    def new_cache(self):
        if self.ours:
            return self.model.new_cache()
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # transformers 4.x
            return DynamicCache()

    def logits(self, tokens: Tensor, start_pos: int, cache) -> Tensor:
        if self.ours:
            return self.model(tokens, start_pos=start_pos, cache=cache)
        out = self.model(input_ids=tokens, use_cache=cache is not None, **{self.cache_argument: cache})
        return out.logits if hasattr(out, "logits") else out[0]


# The retrofitted model

class CCABlock(nn.Module):
    """cca(norm(h)): the update CCA adds to the residual stream after self-attention."""

    def __init__(self, cfg: RetrofitConfig):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model)
        self.cca = ChunkedCrossAttention(cfg.d_model, cfg.n_heads, cfg.chunk_size, rotary=True,
                                         rotary_base=cfg.rotary_base, backend=cfg.kernels)

    def forward(self, h, encoded, encoded_mask, start_pos):
        return self.cca(self.norm(h), encoded, encoded_mask, start_pos=start_pos)


@dataclass
class RetrofitCache(NeighbourCache):
    """Incremental decoding state: the base model's own cache plus what retrieval keeps."""
    base: object = None
    length: int = 0


@dataclass
class _Step:
    """What the hooks need during one forward with neighbours."""
    neighbours: Tensor
    neighbour_mask: Optional[Tensor]
    start_pos: int
    complete: int
    cache: Optional[RetrofitCache]
    residual: Optional[Tensor] = None
    encoded: Optional[Tensor] = None
    encoded_mask: Optional[Tensor] = None
    cca_start: int = 0


class RetrofitModel(nn.Module):
    """A frozen base model with chunked cross-attention and a neighbour encoder added (see the module doc)."""

    def __init__(self, base: nn.Module, cfg: RetrofitConfig, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.adapter = BaseAdapter(base, cfg.layers, cfg.attention)
        found = (self.adapter.hidden, len(self.adapter.layers), self.adapter.embedding.num_embeddings)
        if found != (cfg.d_model, cfg.n_layers, cfg.vocab_size):
            raise ValueError(f"retrofit: the base model has (d_model, layers, vocabulary) = {found}, the retrofit's "
                             f"configuration {(cfg.d_model, cfg.n_layers, cfg.vocab_size)}")
        self.base = base
        self.cfg = cfg
        for p in base.parameters():
            p.requires_grad_(False)
        self.encoder = RetrievalEncoder(cfg)
        self.cca = nn.ModuleDict({str(i): CCABlock(cfg) for i in cfg.cca_layers})
        self._init_new_weights()
        weight = self.adapter.embedding.weight
        for module in (self.encoder, self.cca):  # on the base's device; the base itself is left as it is
            module.to(device=weight.device, dtype=dtype or weight.dtype)
        self._step: Optional[_Step] = None
        self._hooks = []
        previous = getattr(base, "_retro_kernels_retrofit", None)
        if previous is not None and previous() is not None:
            previous().remove_hooks()  # one retrofit per base at a time: the newest reads the neighbours
        object.__setattr__(base, "_retro_kernels_retrofit", weakref.ref(self))  # not a submodule
        for i in cfg.cca_layers:
            layer = self.adapter.layers[i - 1]
            self._hooks.append(layer.register_forward_pre_hook(self._layer_input_hook(i), with_kwargs=True))
            attention = _attribute(layer, self.adapter.attention)
            self._hooks.append(attention.register_forward_hook(self._attention_output_hook(i)))
        base.eval()

    def _init_new_weights(self):
        for module in (self.encoder, self.cca):
            module.apply(RetroModel._init_weights)
        for block in self.cca.values():  # retrofit ON starts as the base model
            nn.init.zeros_(block.cca.to_out.weight)

    # -- parameters, modes, kernels ---------------------------------------------------
    def added_state_dict(self) -> dict:
        """The weights retrofitting added (what `save_retrofit` writes); sharded ones (FSDP, tensor parallel)
        gathered whole, which every process of the run must ask for."""
        return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in self.state_dict().items()
                if not k.startswith("base.")}

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()  # the frozen base runs as it was trained to be used: no dropout
        return self

    set_kernels = RetroModel.set_kernels  # the added modules are the only ones with a backend

    def new_cache(self) -> RetrofitCache:
        return RetrofitCache(base=self.adapter.new_cache())

    def remove_hooks(self) -> None:
        """Detach from the base model (which then no longer reads neighbours at all)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- forward ---------------------------------------------------------------------
    def forward(self, tokens: Tensor, neighbours: Optional[Tensor] = None, neighbour_mask: Optional[Tensor] = None,
                *, start_pos: int = 0, cache: Optional[RetrofitCache] = None) -> Tensor:
        """Logits (B, N, V), as `RetroModel.forward`: neighbours (B, L, K, R) ids, L >= (start_pos + N) // m,
        neighbours[:, u] retrieved with chunk u; None runs the base model alone."""
        if cache is None and start_pos != 0:
            raise ValueError("start_pos > 0 needs a cache from new_cache() (incremental decoding)")
        if neighbours is not None and not self._hooks:
            raise ValueError("this retrofit is detached from its base (remove_hooks() was called, or the "
                             "base was retrofitted again): it cannot read neighbours")
        complete = complete_chunks(self.cfg, tokens, neighbours, neighbour_mask, start_pos, cache)
        if neighbours is not None:
            self._step = _Step(neighbours, neighbour_mask, start_pos, complete, cache)
        try:
            logits = self.adapter.logits(tokens, start_pos, None if cache is None else cache.base)
        finally:
            self._step = None
        if cache is not None:
            cache.length = start_pos + tokens.shape[1]
        return logits

    # -- the hooks ---------------------------------------------------------------------
    def _layer_input_hook(self, layer: int):
        first = layer == self.cfg.cca_layers[0]

        def hook(module, args, kwargs):
            step = self._step
            if step is None:
                return None
            x = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(x, Tensor):
                raise ValueError(f"retrofit: decoder layer {layer} was not called with the hidden states first "
                                 f"(or as hidden_states=); this model's layers cannot be hooked this way")
            step.residual = x
            if first:
                self._encode(step, x)
            return None

        return hook

    def _attention_output_hook(self, layer: int):
        block = self.cca[str(layer)]

        def hook(module, args, output):
            step = self._step
            if step is None or step.encoded is None:
                return None
            y = output[0] if isinstance(output, tuple) else output
            h = step.residual + y  # the residual stream after self-attention
            dtype = block.norm.weight.dtype
            update = block(h.to(dtype), step.encoded, step.encoded_mask, step.cca_start).to(y.dtype)
            y = y + update
            return (y, *output[1:]) if isinstance(output, tuple) else y

        return hook

    def _encode(self, step: _Step, x: Tensor) -> None:
        """Encoded neighbours of the chunks some token of this step may read, from the activations x
        at the first CCA layer (the unfinished chunk's activations wait in the cache)."""
        dtype, m = self.encoder.norm.weight.dtype, self.cfg.chunk_size

        def encode(chunks, first, end):
            mask = None if step.neighbour_mask is None else step.neighbour_mask[:, first:end]
            with torch.no_grad():  # the base's embedding is frozen
                embedded = self.adapter.embedding(step.neighbours[:, first:end])
            return self.encoder(embedded.to(dtype), chunks.to(dtype), mask), mask

        step.encoded, step.encoded_mask, step.cca_start = encoded_for_step(
            encode, x, step.start_pos, step.complete, step.cache, m)


def retrofit(model: nn.Module, *, chunk_size: int, cca_layers, seq_len: Optional[int] = None,
             heads: Optional[int] = None, layers: Optional[str] = None, attention: Optional[str] = None,
             dtype: Optional[torch.dtype] = None, **options) -> RetrofitModel:
    """Freeze `model` (a plain RetroModel or a transformers causal LM) and add a neighbour encoder and CCA
    after the self-attention of the 1-based `cca_layers`. heads (default: the base's), seq_len (default:
    8 chunks), dtype (default: the base's), options: the other RetrofitConfig fields."""
    adapter = BaseAdapter(model, layers, attention)  # refuses what cannot be retrofitted
    heads = heads or adapter.heads
    if heads is None:
        raise ValueError("retrofit: the base model's config names no num_attention_heads; pass heads=")
    cfg = RetrofitConfig(chunk_size=chunk_size, cca_layers=tuple(cca_layers), d_model=adapter.hidden, n_heads=heads,
                         n_layers=len(adapter.layers), vocab_size=adapter.embedding.num_embeddings,
                         seq_len=seq_len or 8 * chunk_size, layers=layers, attention=attention, **options)
    return RetrofitModel(model, cfg, dtype)


def paper_cca_layers(n_layers: int) -> list[int]:
    """The paper's choice, every 3rd layer from layer 6, for a model this deep (the last layer if shallower)."""
    return list(range(6, n_layers + 1, 3)) or [n_layers]


def trainable_share(model: RetrofitModel) -> dict:
    """Parameters retrofitting trains vs the base model's (tied weights counted once)."""
    added = sum(p.numel() for p in model.parameters() if p.requires_grad)  # parameters(): tied ones once
    base = sum(p.numel() for p in model.base.parameters())
    return {"trainable": added, "base": base, "share": added / (added + base)}


# The base model on disk, and saving / loading what was added

def base_kind(path) -> str:
    """'models' (one of our plain decoder checkpoints) or 'hf' (a transformers model folder)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is not a directory (expected a models checkpoint "
                                f"or a transformers model folder)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if (path / "latest.json").is_file() or "chunk_size" in config:
        return "models"
    if "model_type" in config:
        return "hf"
    raise ValueError(f"{str(path)!r} is neither a models checkpoint (config.json + shard-*.safetensors, "
                     f"or latest.json) nor a transformers model folder (config.json with a model_type)")


def _base_files(path: Path, kind: str) -> list[Path]:
    if kind == "models":
        from .checkpoint import resolve

        ckpt = resolve(path)
        return [ckpt / "config.json", *shard_files(ckpt)]
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"{str(path)!r} has no *.safetensors weights (pickled .bin weights are "
                         f"never loaded: save the model with save_pretrained(safe_serialization=True))")
    return [path / "config.json", *weights]


def base_fingerprint(path, kind: str) -> str:
    """sha256 over the base model's config and weight files."""
    return _sha256(_base_files(Path(path), kind), with_names=True)


def load_base(path, device="cpu", allow_nonfinite: bool = False) -> tuple[nn.Module, dict]:
    """The base model from disk, and the record `save_retrofit` keeps of it. Nothing is downloaded;
    a base with NaN/inf weights is refused (CheckpointError) unless allow_nonfinite."""
    from .checkpoint import refuse_nonfinite

    path = Path(path)
    kind = base_kind(path)
    if kind == "models":
        from .checkpoint import load_checkpoint_model

        model = load_checkpoint_model(path, device=device, allow_nonfinite=allow_nonfinite)  # refuses NaN weights
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM

        _base_files(path, kind)  # refuses a folder with pickled weights only
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
        model = model.to(device).eval()
        if not allow_nonfinite:
            refuse_nonfinite(model, f"the transformers model in {str(path)!r}")
    return model, {"kind": kind, "path": str(path.resolve()), "sha256": base_fingerprint(path, kind)}


def _record(path) -> Optional[dict]:
    try:
        record = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def is_retrofit(path) -> bool:
    return _record(path) is not None


def save_retrofit(model: RetrofitModel, out, base: Optional[dict] = None, state: Optional[dict] = None,
                  weights: Optional[dict] = None) -> Path:
    """Write the added weights and the record (config, base, `state`) into `out`, each atomically; the record
    holds the weights' sha256, so `load_retrofit` refuses a pair torn between the two renames."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / WEIGHTS_FILE) as tmp:
        weights = model.added_state_dict() if weights is None else weights
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp))
        weights_sha256 = _sha256([tmp])
    record = {"format": FORMAT, "version": 1, "config": model.cfg.to_dict(), "base": base,
              "weights_sha256": weights_sha256, **(state or {})}
    write_json_atomic(out / CONFIG_FILE, record)
    return out


def _sha256(files, with_names: bool = False) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).name.encode() if with_names else b"")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_record(path) -> dict:
    record = _record(path)
    if record is None:
        raise FileNotFoundError(f"no retrofit at {str(path)!r} (expected {CONFIG_FILE} and {WEIGHTS_FILE} "
                                f"written by `python -m models retrofit`)")
    return record


def load_retrofit(path, base: Optional[nn.Module] = None, kernels: Optional[str] = None,
                  device="cpu", allow_nonfinite: bool = False) -> RetrofitModel:
    """A saved retrofit on `base`, or on the (unchanged) base its record names; every failure names its file,
    NaN/inf weights are refused unless allow_nonfinite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .checkpoint import CheckpointError, refuse_nonfinite
    from .errors import one_line

    record = read_record(path)
    config, weights_file = Path(path) / CONFIG_FILE, Path(path) / WEIGHTS_FILE
    try:
        cfg = RetrofitConfig(**record["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config}: not a valid retrofit configuration ({one_line(e)})") from None
    if kernels:
        cfg.kernels = kernels
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} is missing (the added weights of the retrofit in {str(path)!r})")
    if _sha256([weights_file]) != record.get("weights_sha256"):
        raise CheckpointError(f"{weights_file} is not the file {config} records (its sha256 differs: changed, "
                              f"truncated, or a save interrupted between the two files); retrofit again")
    if base is None:
        base = _recorded_base(path, record, device, allow_nonfinite)
    model = RetrofitModel(base.to(device), cfg)
    try:
        weights = load_file(str(weights_file))
    except SafetensorError as e:
        raise CheckpointError(f"{weights_file} is not a valid safetensors file ({one_line(e)})") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("base.")]
    if missing or unexpected:
        raise CheckpointError(f"{weights_file}: the saved weights do not match the retrofit {config} describes "
                              f"(missing {missing}, unexpected {unexpected})")
    if not allow_nonfinite:
        refuse_nonfinite(model, str(weights_file), ": its training diverged; retrofit again", skip="base.")
    return model.to(device).eval()


def _recorded_base(path, record: dict, device, allow_nonfinite: bool) -> nn.Module:
    """The base model a retrofit's record names, refused if it is gone or changed."""
    source = record.get("base") or {}
    if not source.get("path"):
        raise ValueError(f"{str(path)!r} records no base model path: pass base= (the model it was made on)")
    if not Path(source["path"]).is_dir():
        raise FileNotFoundError(f"the base model of {str(path)!r}, {source['path']!r}, is gone")
    if base_fingerprint(source["path"], source["kind"]) != source.get("sha256"):
        raise ValueError(f"the base model at {source['path']!r} changed since it was retrofitted "
                         f"(its files' sha256 differs): the added weights were trained for the old one")
    base, _ = load_base(source["path"], device, allow_nonfinite)
    return base
