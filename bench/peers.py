"""The peers we measure against, each with its op's signature and in its best form
(docs/benchmarks.md, "What is measured"); `unavailable(...)` says why one cannot run somewhere."""
from __future__ import annotations

import functools
import importlib
import sys
import types

import torch
import torch.nn.functional as F

# The eager plain-PyTorch references (retro_kernels' backend="reference") take the peers' signatures.
from retro_kernels.reference.chunked_cross_attention import chunked_cross_attention as cca_reference
from retro_kernels.reference.neighbour_cross_attention import neighbour_cross_attention as nca_reference
from retro_kernels.reference.neighbour_self_attention import neighbour_self_attention as nsa_reference


def _cca_sizes(q, k, chunk_size: int, start_pos: int, peer: str):
    """B, N, Hq, D, K, R, Hkv, m and the chunks some query reads (N // m); NotImplementedError for
    start_pos > 0 (the peers are written for training)."""
    if start_pos != 0:
        raise NotImplementedError(f"the {peer} peer is written for start_pos=0 (training) only")
    B, N, Hq, D = q.shape
    _, _, K, R, Hkv, _ = k.shape
    return B, N, Hq, D, K, R, Hkv, chunk_size, N // chunk_size


def _heads(t, n, rows):
    """(..., H, D) -> (n, H, rows, D), a view where the layout allows."""
    return t.reshape(n, rows, *t.shape[-2:]).transpose(1, 2)


def _repeat_heads(k, v, hq, dim):
    """k and v repeated to hq heads along `dim` (a copy), for code without grouped heads."""
    r = hq // k.shape[dim]
    return (k, v) if r == 1 else (k.repeat_interleave(r, dim=dim), v.repeat_interleave(r, dim=dim))


def _sdpa(q, k, v, attn_mask, keep, scale):
    """F.scaled_dot_product_attention over (n, H, rows, D) views, grouped heads by enable_gqa; the rows
    where ``keep`` is False (queries that see no key, or padding) are zeroed, as the reference does."""
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return o if keep is None else o * keep


def _no_key_fix(key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask with key 0 switched on in rows that see no key, which rows see a key): kernels disagree on
    rows without keys (NaN, zeros, an average); one key keeps them finite, and the caller zeroes them."""
    has_key = key_mask.any(dim=-1, keepdim=True)
    first = torch.zeros_like(key_mask)
    first[..., 0] = True
    return key_mask | (first & ~has_key), has_key


# -- Chunked cross-attention -------------------------------------------------------------------

def _shifted_chunks(q, chunk_size, used):
    """Pad + reshape: the shifted queries as (B*used, Hq, m, D) (one copy of q: the pad)."""
    B, N, Hq, D = q.shape
    m = chunk_size
    rows = used * m
    shifted = q[:, m - 1 :]
    shifted = F.pad(shifted, (0, 0, 0, 0, 0, rows - shifted.shape[1]))[:, :rows]
    return shifted.reshape(B * used, m, Hq, D).transpose(1, 2)


def _unshift(o_rows, B, N, chunk_size):
    """(B, used*m, Hq, D) attending-chunk rows -> (B, N, Hq, D) with m-1 zero rows in front."""
    return F.pad(o_rows, (0, 0, 0, 0, chunk_size - 1, 0))[:, :N]


def cca_sdpa(q, k, v, chunk_size, *, neighbour_mask=None, scale=None, start_pos=0):
    """Pad + reshape + SDPA + reshape back + pad: chunks as the batch, (B*L, Hq, m, D) queries against
    (B*L, Hkv, K*R, D) keys (views), grouped heads by enable_gqa, the mask broadcast, not materialised."""
    B, N, Hq, D, K, R, Hkv, m, used = _cca_sizes(q, k, chunk_size, start_pos, "sdpa")
    if used == 0:
        return torch.zeros_like(q)
    qs = _shifted_chunks(q, m, used)
    ks, vs = (_heads(t[:, :used], B * used, K * R) for t in (k, v))
    attn_mask, has_key = None, None
    if neighbour_mask is not None:
        attn_mask, has_key = _no_key_fix(neighbour_mask[:, :used].reshape(B * used, 1, 1, K * R))
    o = _sdpa(qs, ks, vs, attn_mask, has_key, scale)  # (B*used, Hq, m, D)
    o = o.transpose(1, 2).reshape(B, used * m, Hq, D)  # a view when SDPA wrote (.., m, Hq, D)
    return _unshift(o, B, N, m)


def cca_sdpa_repeat(q, k, v, chunk_size, *, neighbour_mask=None, scale=None, start_pos=0):
    """cca_sdpa with k and v repeated to Hq heads (a copy), as code written before enable_gqa does."""
    k, v = _repeat_heads(k, v, q.shape[2], 4)
    return cca_sdpa(q, k, v, chunk_size, neighbour_mask=neighbour_mask, scale=scale, start_pos=start_pos)


# -- FlexAttention -----------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _flex_block_mask(n_query_rows: int, chunk_size: int, keys_per_chunk: int, used: int,
                     device: str, block: tuple[int, int]):
    """The structural block mask: shifted query row r sees the keys of chunk r // m (it depends
    only on the shape, so a training loop builds it once: cached)."""
    from torch.nn.attention.flex_attention import create_block_mask

    m, kr = chunk_size, keys_per_chunk

    def same_chunk(b, h, q_idx, kv_idx):
        return (q_idx // m) == (kv_idx // kr)

    return create_block_mask(same_chunk, None, None, n_query_rows, used * kr, device=device,
                             BLOCK_SIZE=block)


FLEX_CUDA_NOTE = ("torch.compile(flex_attention) in its default mode; block mask in flex's default "
                  "128 x 128 blocks (query blocks span two 64-row chunks)")


@functools.lru_cache(maxsize=4)
def _compiled_flex(device_type: str = "cpu"):
    """torch.compile(flex_attention) in the default mode (no autotuning: seconds, not minutes, per shape);
    one graph per problem shape, so the recompile limits rise, and a sweep that would still fall back to
    the eager (unfused) flex_attention fails loudly."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    config = torch._dynamo.config
    for limit, value in (("recompile_limit", 256), ("accumulated_recompile_limit", 4096)):
        if hasattr(config, limit):
            setattr(config, limit, max(value, getattr(config, limit)))
    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True
    return torch.compile(flex_attention, dynamic=False)


def _flex_block_size(chunk_size: int, keys_per_chunk: int, device_type: str = "cpu") -> tuple[int, int]:
    """The block mask's (query, key) block size. CUDA: flex's default 128 x 128, a multiple of the
    query tile of inductor's one default kernel (docs/benchmarks.md, "FlexAttention on a GPU").
    CPU: (m, K*R-multiple) blocks, each full or empty, when m is 16..128."""
    if device_type == "cuda":
        return 128, 128
    return (chunk_size if chunk_size in (16, 32, 64, 128) else 64), (128 if keys_per_chunk % 128 == 0 else keys_per_chunk)


def cca_flex_attention(q, k, v, chunk_size, *, neighbour_mask=None, scale=None, start_pos=0, compiled=True):
    """FlexAttention peer: the queries q[:, m-1:] (a view) are already in attending-chunk order, so with a
    structural block mask query block u reads exactly the key blocks of chunk u; the neighbour mask is
    a score_mod. `compiled=False`: flex_attention eagerly (its slow path; --quick on the CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    B, N, Hq, D, K, R, Hkv, m, used = _cca_sizes(q, k, chunk_size, start_pos, "flex_attention")
    if used == 0:
        return torch.zeros_like(q)
    kr = K * R
    qs = q[:, m - 1 :].transpose(1, 2)  # (B, Hq, N-m+1, D): a view, already shifted
    ks, vs = (_heads(t[:, :used], B, used * kr) for t in (k, v))
    block_mask = _flex_block_mask(qs.shape[2], m, kr, used, str(q.device), _flex_block_size(m, kr, q.device.type))
    score_mod = has_key = None
    if neighbour_mask is not None:
        key_mask, has_key = _no_key_fix(neighbour_mask[:, :used].reshape(B, used, kr))
        key_mask = key_mask.reshape(B, used * kr)

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(key_mask[b, kv_idx], score, -float("inf"))

    attend = _compiled_flex(q.device.type) if compiled else flex_attention
    o = attend(qs, ks, vs, score_mod=score_mod, block_mask=block_mask, scale=scale,
               enable_gqa=Hq != Hkv).transpose(1, 2)  # (B, N-m+1, Hq, D)
    if has_key is not None:
        o = o * has_key.reshape(B, used)[:, torch.arange(o.shape[1], device=q.device) // m, None, None]
    return F.pad(o, (0, 0, 0, 0, m - 1, 0))


cca_flex_attention_eager = functools.partial(cca_flex_attention, compiled=False)


# -- flash-attn --------------------------------------------------------------

def cca_flash_attn(q, k, v, chunk_size, *, neighbour_mask=None, scale=None, start_pos=0):
    """flash-attn's flash_attn_func on the padded, reshaped chunks (no mask support)."""
    from flash_attn import flash_attn_func

    B, N, Hq, D, K, R, Hkv, m, used = _cca_sizes(q, k, chunk_size, start_pos, "flash_attn")
    if neighbour_mask is not None:
        raise NotImplementedError("flash_attn_func takes no key mask (neighbour padding)")
    if used == 0:
        return torch.zeros_like(q)
    qs = _shifted_chunks(q, m, used).transpose(1, 2)  # (B*used, m, Hq, D), contiguous
    ks, vs = (t[:, :used].reshape(B * used, K * R, Hkv, D) for t in (k, v))
    o = flash_attn_func(qs, ks, vs, softmax_scale=scale)  # GQA native
    return _unshift(o.reshape(B, used * m, Hq, D), B, N, m)


# -- RETRO-pytorch -----------------------------------------------------------

def import_retro_pytorch() -> tuple[types.ModuleType, str | None]:
    """retro_pytorch.retro_pytorch and a note: where faiss or autofaiss (imported by its package
    for its retriever only) are missing, stand-ins go into sys.modules, and the note says so."""
    stubbed = []
    for name in ("faiss", "autofaiss"):
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except ImportError:
            stub = types.ModuleType(name)

            def _missing(*args, _name=name, **kwargs):
                raise ImportError(f"{_name} is not installed (stand-in for importing retro_pytorch)")

            stub.build_index = _missing  # the one name retro_pytorch imports from autofaiss
            sys.modules[name] = stub
            stubbed.append(name)
    module = importlib.import_module("retro_pytorch.retro_pytorch")
    note = f"imported with stand-ins for {', '.join(stubbed)}" if stubbed else None
    return module, note


class _Given(torch.nn.Module):
    """A 'projection' that returns the tensor it was handed for this call."""

    def __init__(self):
        super().__init__()
        self.value = None

    def forward(self, _input):
        return self.value


@functools.lru_cache(maxsize=16)
def _retro_pytorch_cca(chunk_size: int, heads: int, dim_head: int, device: str, dtype: torch.dtype):
    rp, _ = import_retro_pytorch()
    dim = heads * dim_head
    module = rp.ChunkedCrossAttention(chunk_size=chunk_size, dim=dim, heads=heads, dim_head=dim_head)
    attn = module.cross_attn
    # Attention part only: our op takes projected q, k, v, so its projections
    # become identities (q: the input, k: the context, v: handed in per call)
    # and its learned "null" key/value, which we do not have, is removed.
    attn.to_q = torch.nn.Identity()
    attn.to_k = torch.nn.Identity()
    attn.to_v = _Given()
    attn.to_out = torch.nn.Identity()
    attn.null_k = None
    attn.null_v = None
    return module.to(device=device, dtype=dtype)


def cca_retro_pytorch(q, k, v, chunk_size, *, neighbour_mask=None, scale=None, start_pos=0):
    """RETRO-pytorch 0.3.9's ChunkedCrossAttention.forward, attention part only (docs/benchmarks.md)."""
    B, N, Hq, D, K, R, Hkv, m, used = _cca_sizes(q, k, chunk_size, start_pos, "retro_pytorch")
    if used == 0:
        return torch.zeros_like(q)
    module = _retro_pytorch_cca(m, Hq, D, str(q.device), q.dtype)
    attn = module.cross_attn
    attn.scale = D ** -0.5 if scale is None else scale
    k, v = _repeat_heads(k, v, Hq, 4)
    context = k[:, :used].reshape(B, used, K, R, Hq * D)
    attn.to_v.value = v[:, :used].reshape(B * used, K * R, Hq * D)
    mask = neighbour_mask[:, :used] if neighbour_mask is not None else None
    no_rotary = (q.new_zeros(1, 1, m, 0), q.new_zeros(1, 1, R, 0))
    try:
        out = module(q.reshape(B, N, Hq * D), context=context, context_mask=mask, pos_emb=no_rotary)
    finally:
        attn.to_v.value = None
    return out.reshape(B, N, Hq, D)


# -- Neighbour self-attention (encoder, within each neighbour) ---------------------------------

def nsa_sdpa_masked(q, k, v, *, neighbour_mask=None, scale=None):
    """SDPA per neighbour, (B*L*K, H, R, D), with the (R x R) mask materialised."""
    B, L, K, R, Hq, D = q.shape
    n = B * L * K
    qs, ks, vs = (_heads(t, n, R) for t in (q, k, v))
    attn_mask = query_ok = None
    if neighbour_mask is not None:
        key_ok = neighbour_mask.reshape(n, 1, 1, R)
        query_ok = neighbour_mask.reshape(n, 1, R, 1)
        attn_mask, _ = _no_key_fix(key_ok.expand(n, 1, R, R).contiguous())  # materialised
    o = _sdpa(qs, ks, vs, attn_mask, query_ok, scale)  # (n, Hq, R, D); padding queries (and rows with no key): 0
    return o.transpose(1, 2).reshape(B, L, K, R, Hq, D)


# -- Neighbour cross-attention (encoder layer 1: neighbours -> their chunk) --------------------

def nca_sdpa_masked(q, k, v, *, chunk_mask=None, scale=None):
    """SDPA per chunk: its K*R neighbour tokens against its M tokens, mask materialised."""
    B, L, K, R, Hq, D = q.shape
    n, M = B * L, k.shape[2]
    qs, ks, vs = _heads(q, n, K * R), _heads(k, n, M), _heads(v, n, M)
    attn_mask = has_key = None
    if chunk_mask is not None:
        full = chunk_mask.reshape(n, 1, 1, M).expand(n, 1, K * R, M).contiguous()  # materialised
        attn_mask, has_key = _no_key_fix(full)
    o = _sdpa(qs, ks, vs, attn_mask, has_key, scale)  # (n, Hq, K*R, D)
    return o.transpose(1, 2).reshape(B, L, K, R, Hq, D)


def nca_sdpa_repeat(q, k, v, *, chunk_mask=None, scale=None):
    """SDPA per neighbour with the chunk activations repeated K times (RETRO-pytorch's way)."""
    B, L, K, R, Hq, D = q.shape
    n, M = B * L * K, k.shape[2]
    qs = _heads(q, n, R)
    ks, vs = (_heads(t[:, :, None].expand(B, L, K, *t.shape[2:]), n, M) for t in (k, v))  # copies
    attn_mask = has_key = None
    if chunk_mask is not None:
        key_ok = chunk_mask[:, :, None].expand(B, L, K, M).reshape(n, 1, 1, M)
        attn_mask, has_key = _no_key_fix(key_ok)
    o = _sdpa(qs, ks, vs, attn_mask, has_key, scale)  # (n, Hq, R, D)
    return o.transpose(1, 2).reshape(B, L, K, R, Hq, D)


# -- Which peers exist, and why one cannot run -------------------------------------------------

def unavailable(peer: str, device: torch.device) -> str | None:
    """Why `peer` cannot run on `device` here (None: it can)."""
    if peer == "flash_attn":
        if device.type != "cuda":
            return "flash-attn runs on CUDA GPUs only"
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            return f"flash-attn is not installed ({e.msg}); pip install flash-attn --no-build-isolation"
    if peer == "retro_pytorch":
        try:
            import_retro_pytorch()
        except Exception as e:  # ImportError, or anything its import raises
            return (f"retro-pytorch cannot be imported ({type(e).__name__}: {e}); "
                    "pip install --no-deps retro-pytorch==0.3.9 einops")
    if peer.startswith("flex_attention"):
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as e:
            return f"this torch has no FlexAttention ({e})"
    return None


CCA_PEERS = {
    "reference": cca_reference,
    "sdpa": cca_sdpa,
    "sdpa_repeat": cca_sdpa_repeat,
    "flex_attention": cca_flex_attention,
    "flash_attn": cca_flash_attn,
    "retro_pytorch": cca_retro_pytorch,
}
NSA_PEERS = {"reference": nsa_reference, "sdpa_masked": nsa_sdpa_masked}
NCA_PEERS = {
    "reference": nca_reference,
    "sdpa_masked": nca_sdpa_masked,
    "sdpa_repeat": nca_sdpa_repeat,
}
