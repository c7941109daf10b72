"""Argument checks shared by every op, made from its spec (retro_kernels/ops/spec.py).

Every public op validates its arguments here, before choosing a backend, so
that bad input gets the same clear one-line error from every backend (and never
reaches a kernel, where it would crash or return garbage): TypeError for an
argument of the wrong type, ValueError for a wrong value or shape, each naming
the argument and what was expected.
"""
from __future__ import annotations

import math
import numbers

import torch

from .ops.sharding import check_placements
from .ops.spec import SCALE, dims_of

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, x, layout: str) -> None:
    """`x` is a floating tensor with one dim per name of `layout`."""
    ndim = len(dims_of(layout))
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


def check_mask(name: str, mask, layout: str, dims: dict[str, int], device) -> None:
    """`mask` is None or a bool tensor of exactly the shape `layout` names, on `device`."""
    if mask is None:
        return
    shape = tuple(dims[d] for d in dims_of(layout))
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


# Dims that may be empty: no batch, no tokens, no chunks. Heads, the head dim,
# neighbours and the tokens of a neighbour or chunk must be at least 1.
MAY_BE_EMPTY = ("B", "N", "L")
# Words for a dim in messages, where a letter would say less.
DIM_WORDS = {"B": "batch size", "D": "head dim"}


def _like_q(spec, names, want, got) -> str:
    """"k must have batch size 2 like q (B, N, Hq, D), got 1", or with several dims "(B, L) = (2, 3)"."""
    if len(names) == 1 and names[0] in DIM_WORDS:
        return f"k must have {DIM_WORDS[names[0]]} {want[0]} like q {spec.q}, got {got[0]}"
    return f"k must have ({', '.join(names)}) = {want} like q {spec.q}, got {got}"


def check_shapes(spec, q, k, v) -> dict[str, int]:
    """The size of every dim the spec names, from q and k; k agrees with q on the dims they share."""
    dims = dict(zip(dims_of(spec.q), q.shape))
    k_dims = dict(zip(dims_of(spec.kv), k.shape))
    shared = [d for d in k_dims if d in dims and d != "D"]
    for names in (shared, ["D"]):
        want, got = tuple(dims[d] for d in names), tuple(k_dims[d] for d in names)
        if want != got:
            raise ValueError(_like_q(spec, names, want, got))
    dims.update(k_dims)
    if any(size < 1 for d, size in dims.items() if d not in MAY_BE_EMPTY):
        need = ", ".join(d for d in dims if d not in MAY_BE_EMPTY)
        raise ValueError(f"q {spec.q} = {tuple(q.shape)} and k {spec.kv} = {tuple(k.shape)} need {need} >= 1")
    check_heads("q", dims["Hq"], "k", dims["Hkv"])
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the same shape as k {tuple(k.shape)}, got {tuple(v.shape)}")
    return dims


def check_inputs(spec, q, k, v, mask, scalars: dict) -> dict:
    """Validate an op's arguments against its spec; return its scalars, checked, the scale resolved."""
    check_tensor("q", q, spec.q)
    check_tensor("k", k, spec.kv)
    check_tensor("v", v, spec.kv)
    check_same(("q", "k", "v"), (q, k, v))
    check_placements(q, k, v, mask, spec.mask)
    values = {s.name: check_int(s.name, scalars[s.name], s.minimum) for s in spec.scalars if s is not SCALE}
    dims = check_shapes(spec, q, k, v)
    spec.check(dims, values)
    check_mask(spec.mask, mask, spec.mask_layout, dims, q.device)
    values[SCALE.name] = check_scale(scalars[SCALE.name], dims["D"])
    return {s.name: values[s.name] for s in spec.scalars}
