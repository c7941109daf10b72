"""Host-side pieces shared by the Triton launchers: tiles, autotuning, device guard, launch limits.

Tiles. A forward program takes BLOCK_M query rows of one key set (128 when
the key set has that many rows: two heads of a GQA group at m=64, or 128
neighbour tokens; then 8 warps, one warpgroup per 64 rows; else 64 rows and
4 warps, so no warpgroup repeats another's work). A backward program owns a
whole key set; `backward_plan` picks its sweeps.

Autotuning. On a GPU, launches of at least AUTOTUNE_MIN_PROGRAMS programs are
autotuned (`triton.autotune`, keyed on the head dim, the key-set shape, the
chunk size and the dtypes): the forward over BLOCK_N, num_warps and
num_stages; the backward over num_stages only. The backward's tile shape and
warps fix the order of every floating-point sum (the dS^T Q and P^T dO
products over row tiles, dQ over key tiles, delta's row sums), and the
pipeline depth changes none of them, so its gradients are bitwise the same
whichever config wins. Configs whose shared memory would exceed the device's
are pruned before they are compiled. Small launches (the tests), the
interpreter and RETRO_KERNELS_TRITON_AUTOTUNE=0 use the first, default config.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch
import triton

from .interpreter import interpreting as triton_interpreting

MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid dimension x; every kernel here uses a 1-D grid
AUTOTUNE_MIN_PROGRAMS = 512  # smaller launches take the default config: timing them costs more than it saves


@dataclasses.dataclass(frozen=True)
class Config:
    """A launch configuration: the kernel's tuned meta-parameters, warps and pipeline stages."""
    meta: tuple  # ((name, value), ...)
    num_warps: int
    num_stages: int

    def kwargs(self) -> dict:
        return dict(self.meta, num_warps=self.num_warps, num_stages=self.num_stages)


# ---------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------

def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _fits(n: int, cap: int) -> int:
    """The smallest tile size >= n (at least 16, tl.dot's minimum), capped at cap."""
    return min(cap, max(16, triton.next_power_of_2(n)))


def forward_tiles(rows: int, run: int, head_dim: int, elem_size: int) -> tuple[dict, list[Config]]:
    """(fixed meta-parameters, candidate configs with the default first) of a forward launch.

    rows: query rows per key set; run: keys per run (the tile loop's length).
    """
    bd = block_d(head_dim)
    wide = elem_size == 2 and bd <= 128
    block_m = 128 if wide and rows >= 128 else _fits(rows, 64 if bd <= 128 or elem_size == 2 else 32)
    fixed = dict(BLOCK_M=block_m, BLOCK_D=bd)
    # default: 32-key tiles where 64 would leave one CTA per SM (128-row tiles, or D = 128), per the
    # sm_90 resource report; the autotuner may still pick others on a GPU
    narrow = block_m == 128 or bd * elem_size > 128
    default_n = _fits(run, 64 if not narrow else 32 if bd * elem_size <= 512 else 16)
    default_warps = 8 if block_m == 128 or bd >= 256 else 4
    default = Config((("BLOCK_N", default_n),), default_warps, 3)
    candidates = [default]
    for bn in (32, 64, 128):
        for warps in (4, 8):
            for stages in (2, 3, 4):
                c = Config((("BLOCK_N", bn),), warps, stages)
                # 8 warps only for 128-row tiles (one warpgroup per 64 rows); 128-key tiles spill at D = 128
                useful = (bn <= _fits(run, 128) and (warps == 4) == (block_m < 128) and bd <= 128
                          and (bn < 128 or bd <= 64))
                if useful and c != default:
                    candidates.append(c)
    return fixed, candidates


def forward_smem(meta: dict, config: Config, elem_size: int) -> int:
    """Estimated shared memory of a forward config: the Q tile and num_stages K and V tiles."""
    bn = dict(config.meta)["BLOCK_N"]
    return elem_size * meta["BLOCK_D"] * (meta["BLOCK_M"] + 2 * bn * config.num_stages)


def backward_plan(rows: int, run: int, n_runs: int, head_dim: int, elem_size: int) -> list[tuple[dict, list[Config]]]:
    """The launches of a backward over key sets of `rows` query rows (all heads of the group)
    and `n_runs` runs of `run` keys: [(fixed meta-parameters, candidate configs)], in order.

    SWEEP="rows"  every row fits one BLOCK_M tile: one sweep over the key tiles,
                  dQ accumulated on chip, each key tile's dK, dV stored once (5 matmuls);
    SWEEP="keys", DQ_TOO  every key fits one BLOCK_N tile: one sweep over the row tiles,
                  dK, dV accumulated on chip, each row tile's dQ stored once (5 matmuls);
    otherwise     two launches: "keys" (dK, dV; key tiles outside) then "dq" (row tiles outside): 7 matmuls.

    The sizes keep every config free of register spills at D <= 128 on
    triton 3.6 and 3.9, and at 2+ CTAs per SM at D = 64 on sm_90
    (bench/kernels.py reports it, tests/test_triton_kernels.py checks it).
    """
    bd = block_d(head_dim)
    if elem_size == 2 and bd <= 128:
        rows_cap, rows_n, keys_m, dq_n = 64, (64 if bd <= 64 else 16), 16, (32 if bd <= 64 else 16)
    else:  # fp32 (exact fp32 dots) or D = 256: small tiles
        rows_cap, rows_n, keys_m, dq_n = 32, 16, 16, 16
    keys_cap = 128 if elem_size == 2 and bd <= 128 else 32
    if rows <= rows_cap:
        return [_backward_pass("rows", False, _fits(rows, rows_cap), _fits(run, rows_n), bd)]
    if n_runs == 1 and run <= keys_cap:
        return [_backward_pass("keys", True, keys_m, _fits(run, keys_cap), bd)]
    return [_backward_pass("keys", False, keys_m, _fits(run, min(keys_cap, 64)), bd),
            _backward_pass("dq", False, rows_cap, _fits(run, dq_n), bd)]


def _backward_pass(sweep: str, dq_too: bool, block_m: int, block_n: int, bd: int) -> tuple[dict, list[Config]]:
    # At D <= 64 one warpgroup holds every tile without spilling. At D = 128 the "keys"
    # sweep's fp32 dK and dV tiles (BLOCK_N x 128 each) need two warpgroups; the other
    # sweeps keep 4 warps on their 64-row tiles, and a third pipeline stage spills the
    # "dq" sweep there (triton 3.6).
    warps = 8 if sweep == "keys" and bd > 64 else 4
    stages = (2, 1) if sweep == "dq" and bd > 64 else (2, 1, 3)
    fixed = dict(SWEEP=sweep, DQ_TOO=dq_too, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd)
    return fixed, [Config((), warps, s) for s in stages]


# ---------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------

def autotuning(n_programs: int) -> bool:
    return (not triton_interpreting() and n_programs >= AUTOTUNE_MIN_PROGRAMS
            and os.environ.get("RETRO_KERNELS_TRITON_AUTOTUNE", "1") != "0")


@functools.lru_cache(maxsize=None)
def _autotuner(kernel, configs: tuple[Config, ...], key: tuple[str, ...]):
    return triton.autotune(
        configs=[triton.Config(dict(c.meta), num_warps=c.num_warps, num_stages=c.num_stages) for c in configs],
        key=list(key),
    )(kernel)


def launch(kernel, n_programs: int, args, fixed: dict, configs: list[Config], key: tuple[str, ...]):
    """Run n_programs programs of `kernel` with configs[0], or autotuned over `configs` (module docstring).

    The grid is 1-D: CUDA's y and z dimensions stop at 65,535, x at 2^31 - 1.
    Larger launches are split into slices; args(pid_base) gives the kernel's
    arguments for the slice whose first program is pid_base.
    """
    if len(configs) > 1 and autotuning(n_programs):
        kernel, meta = _autotuner(kernel, tuple(configs), key), fixed
    else:
        meta = dict(fixed, **configs[0].kwargs())
    for pid_base in range(0, n_programs, MAX_GRID_X):
        kernel[(min(MAX_GRID_X, n_programs - pid_base),)](*args(pid_base), **meta)


def launch_forward(kernel, q, rows: int, run: int, n_sets: int, args, consts: dict, key: tuple[str, ...]):
    """Launch a forward `kernel` (module docstring's tiles) over n_sets key sets of `rows` query rows
    and runs of `run` keys, one program per (key set, BLOCK_M rows); q gives head dim, dtype, device."""
    fixed, configs = forward_tiles(rows, run, q.shape[-1], q.element_size())
    configs = prune_by_smem(configs, lambda c: forward_smem(fixed, c, q.element_size()), q.device)
    with on_device(q):
        launch(kernel, n_sets * triton.cdiv(rows, fixed["BLOCK_M"]), args, _meta(fixed, consts, q), configs,
               ("HEAD_DIM", "HAS_MASK", *key))


def launch_backward(kernel, q, rows: int, run: int, n_runs: int, n_sets: int, args, consts: dict,
                    key: tuple[str, ...]):
    """Launch a backward `kernel`, one program per key set, in the one or two launches that
    `backward_plan` picks for key sets of `rows` query rows and n_runs runs of `run` keys."""
    with on_device(q):
        for fixed, configs in backward_plan(rows, run, n_runs, q.shape[-1], q.element_size()):
            launch(kernel, n_sets, args, _meta(fixed, consts, q), configs,
                   ("HEAD_DIM", "HAS_MASK", *key, "SWEEP", "DQ_TOO"))


def _meta(fixed: dict, consts: dict, q: torch.Tensor) -> dict:
    return dict(fixed, **consts, HEAD_DIM=q.shape[-1], IEEE_DOT=q.dtype == torch.float32)


def prune_by_smem(configs: list[Config], smem_of, device: torch.device) -> list[Config]:
    """The configs whose estimated shared memory fits the device (the default is always kept)."""
    limit = max_shared_memory(device)
    return configs[:1] + [c for c in configs[1:] if smem_of(c) <= limit]


def max_shared_memory(device: torch.device) -> int:
    """Shared memory one block may use on `device` (sm_90: 227 KB, sm_80: 163 KB)."""
    if device.type != "cuda":
        return 227 * 1024
    return _max_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _max_shared_memory(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    if optin:
        return int(optin)
    return {8: 163 * 1024, 9: 227 * 1024}.get(props.major, 99 * 1024)


def on_device(t: torch.Tensor):
    """Make t's GPU the current device (its stream is where Triton launches); nothing on the CPU."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def mask_as_bytes(mask: torch.Tensor | None, placeholder: torch.Tensor, ndim: int):
    """(tensor, strides, has_mask): the bool mask viewed as bytes (Triton reads bool
    pointers as int8); with no mask, a placeholder that is never read and `ndim` zero strides."""
    if mask is None:
        return placeholder, (0,) * ndim, False
    as_bytes = mask.view(torch.uint8)
    return as_bytes, as_bytes.stride(), True
