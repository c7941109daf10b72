"""Argument checks shared by every op.

Every public op validates its arguments here, before choosing a backend, so
that bad input gets the same clear ValueError/TypeError from every backend
(and never reaches a kernel, where it would crash or return garbage).
"""
from __future__ import annotations

import math
import numbers

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, x, ndim: int, layout: str) -> None:
    """`x` is a floating tensor of rank `ndim` laid out as `layout`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions {layout}, got shape {tuple(x.shape)}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16, got {x.dtype}"
        )


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    """The tensors share one dtype and one device."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match"
            )
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; they must match"
            )


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale: `scale` if given, else head_dim ** -0.5."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_heads(q_name: str, hq: int, kv_name: str, hkv: int) -> None:
    if hq % hkv != 0:
        raise ValueError(
            f"the number of query heads ({q_name}: {hq}) must be a multiple of the "
            f"number of key/value heads ({kv_name}: {hkv})"
        )


def check_mask(name: str, mask, shape: tuple[int, ...], layout: str, device) -> None:
    """`mask` is None or a bool tensor of exactly `shape` on `device`."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor of shape {layout} or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the queries are on {device}")


def check_backend(name, allowed: tuple[str, ...]) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, one of {allowed}, got {name!r}")
    if name not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {name!r}")
    return name


def chunks_needed(start_pos: int, n_tokens: int, chunk_size: int) -> int:
    """Neighbour chunks that tokens start_pos .. start_pos+n_tokens-1 read.

    The token at absolute position t >= m-1 reads chunk (t - (m-1)) // m, so
    the last token reads chunk (start_pos + n_tokens) // m - 1.
    """
    return (start_pos + n_tokens) // chunk_size


def check_chunked_cross_attention(q, k, v, chunk_size, neighbour_mask, scale, start_pos) -> float:
    """Validate `chunked_cross_attention`'s arguments; return the softmax scale."""
    check_tensor("q", q, 4, "(B, N, Hq, D)")
    check_tensor("k", k, 6, "(B, L, K, R, Hkv, D)")
    check_tensor("v", v, 6, "(B, L, K, R, Hkv, D)")
    check_same(("q", "k", "v"), (q, k, v))
    chunk_size = check_int("chunk_size", chunk_size, 1)
    start_pos = check_int("start_pos", start_pos, 0)
    B, N, Hq, D = q.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the same shape as k {tuple(k.shape)}, got {tuple(v.shape)}")
    kB, L, K, R, Hkv, kD = k.shape
    if kB != B:
        raise ValueError(f"k must have batch size {B} like q (B, N, Hq, D), got {kB}")
    if kD != D:
        raise ValueError(f"k must have head dim {D} like q (B, N, Hq, D), got {kD}")
    if D < 1 or Hq < 1 or Hkv < 1 or K < 1 or R < 1:
        raise ValueError(
            f"q (B, N, Hq, D) = {tuple(q.shape)} and k (B, L, K, R, Hkv, D) = {tuple(k.shape)} "
            "need D, Hq, K, R and Hkv >= 1"
        )
    check_heads("q", Hq, "k", Hkv)
    need = chunks_needed(start_pos, N, chunk_size)
    if L < need:
        raise ValueError(
            f"k and v hold L={L} neighbour chunks, but tokens {start_pos}..{start_pos + N - 1} "
            f"with chunk_size={chunk_size} read chunks 0..{need - 1}: need L >= {need}"
        )
    check_mask("neighbour_mask", neighbour_mask, (B, L, K, R), "(B, L, K, R)", q.device)
    return check_scale(scale, D)


def check_neighbour_self_attention(q, k, v, neighbour_mask, scale) -> float:
    """Validate `neighbour_self_attention`'s arguments; return the softmax scale."""
    check_tensor("q", q, 6, "(B, L, K, R, Hq, D)")
    check_tensor("k", k, 6, "(B, L, K, R, Hkv, D)")
    check_tensor("v", v, 6, "(B, L, K, R, Hkv, D)")
    check_same(("q", "k", "v"), (q, k, v))
    B, L, K, R, Hq, D = q.shape
    if tuple(k.shape[:4]) != (B, L, K, R):
        raise ValueError(
            f"k must have (B, L, K, R) = {(B, L, K, R)} like q (B, L, K, R, Hq, D), "
            f"got {tuple(k.shape[:4])}"
        )
    Hkv, kD = k.shape[4], k.shape[5]
    if kD != D:
        raise ValueError(f"k must have head dim {D} like q (B, L, K, R, Hq, D), got {kD}")
    if D < 1 or Hq < 1 or Hkv < 1 or K < 1 or R < 1:
        raise ValueError(
            f"q (B, L, K, R, Hq, D) = {tuple(q.shape)} and k (B, L, K, R, Hkv, D) = "
            f"{tuple(k.shape)} need D, Hq, Hkv, K and R >= 1"
        )
    check_heads("q", Hq, "k", Hkv)
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the same shape as k {tuple(k.shape)}, got {tuple(v.shape)}")
    check_mask("neighbour_mask", neighbour_mask, (B, L, K, R), "(B, L, K, R)", q.device)
    return check_scale(scale, D)


def check_neighbour_cross_attention(q, k, v, chunk_mask, scale) -> float:
    """Validate `neighbour_cross_attention`'s arguments; return the softmax scale."""
    check_tensor("q", q, 6, "(B, L, K, R, Hq, D)")
    check_tensor("k", k, 5, "(B, L, M, Hkv, D)")
    check_tensor("v", v, 5, "(B, L, M, Hkv, D)")
    check_same(("q", "k", "v"), (q, k, v))
    B, L, K, R, Hq, D = q.shape
    kB, kL, M, Hkv, kD = k.shape
    if (kB, kL) != (B, L):
        raise ValueError(
            f"k must have (B, L) = {(B, L)} like q (B, L, K, R, Hq, D), got {(kB, kL)}"
        )
    if kD != D:
        raise ValueError(f"k must have head dim {D} like q (B, L, K, R, Hq, D), got {kD}")
    if D < 1 or Hq < 1 or Hkv < 1 or K < 1 or R < 1 or M < 1:
        raise ValueError(
            f"q (B, L, K, R, Hq, D) = {tuple(q.shape)} and k (B, L, M, Hkv, D) = "
            f"{tuple(k.shape)} need D, Hq, Hkv, K, R and M >= 1"
        )
    check_heads("q", Hq, "k", Hkv)
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the same shape as k {tuple(k.shape)}, got {tuple(v.shape)}")
    check_mask("chunk_mask", chunk_mask, (B, L, M), "(B, L, M)", q.device)
    return check_scale(scale, D)
