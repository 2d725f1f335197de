"""The CUDA forward kernel as a traced JAX function (used inside the cuda lowering of ``dmattn_fwd``).

One FFI call, ``dmattn_fwd_cuda``, runs a pre-pass that classifies every (query tile, key tile) of the mask as
empty / partial / full and then the flash forward, which skips empty tiles and loads no mask for full ones.
The tile-class map comes back as an extra output (XLA-owned workspace, no allocation in the handler), so the
backward can reuse it as a residual.

Inputs are the canonical layout of docs/design.md: q [B, Lq, H, D], k/v [B, Lk, Hkv, D] (bf16 or f16,
D in {32, 64, 96, 128, 192, 256}); bias None or rank 4 [Bb, Hb, Mb, Nb] (bf16 / f16 / f32); mask None or rank
4 bool with the same broadcast rule.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_dmattn import _ffi, _validation

# Tile sizes of the forward kernel and of the tile-class map (csrc/cuda/flash_fwd.h: kFwdBlockM / kFwdBlockN).
BLOCK_M = 128
BLOCK_N = 64
HEAD_DIMS = _validation.CUDA_HEAD_DIMS
TARGET = "dmattn_fwd_cuda"

TILE_EMPTY, TILE_PARTIAL, TILE_FULL = 0, 1, 2


def tile_class_shape(mask_shape) -> tuple[int, ...]:
    """Shape of the tile-class map of a rank-4 mask (broadcast dims stay broadcast)."""
    bm, hm, mm, nm = mask_shape
    return (bm, hm, -(-mm // BLOCK_M), -(-nm // BLOCK_N))


def available() -> bool:
    return TARGET in _ffi.register_targets()["CUDA"]


def check_operands(caller, q, k, v, bias, mask):
    """The layout the CUDA kernels take (attention() normalises to it); shared by flash_fwd and flash_bwd."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{caller}: q, k, v must be rank 4")
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{caller}: q/k/v must share dtype bfloat16 or float16, got {q.dtype}/{k.dtype}/{v.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"{caller}: head dim {q.shape[-1]} not in {HEAD_DIMS}")
    if bias is not None and (bias.ndim != 4 or bias.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32)):
        raise TypeError(f"{caller}: bias must be rank 4 bf16/f16/f32, got {bias.shape} {bias.dtype}")
    if mask is not None and (mask.ndim != 4 or mask.dtype != jnp.bool_):
        raise TypeError(f"{caller}: mask must be rank 4 bool, got {mask.shape} {mask.dtype}")


def flash_fwd_with_tiles(q, k, v, bias, mask, *, scale: float, softcap: float, is_causal: bool,
                         skip_empty_tiles: bool = True):
    """Returns (out [B, Lq, H, D], lse [B, H, Lq] f32, tile classes uint8 or a zero-size array)."""
    check_operands("flash_fwd", q, k, v, bias, mask)
    _ffi.register_targets()
    b, lq, h, _ = q.shape
    bias_arg = jnp.zeros((0,), jnp.float32) if bias is None else bias
    mask_arg = jnp.zeros((0,), jnp.bool_) if mask is None else mask
    cls_shape = (0,) if mask is None else tile_class_shape(mask.shape)
    out_types = (
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((b, h, lq), jnp.float32),
        jax.ShapeDtypeStruct(cls_shape, jnp.uint8),
    )
    return jax.ffi.ffi_call(TARGET, out_types)(
        q, k, v, bias_arg, mask_arg,
        scale=np.float32(scale), softcap=np.float32(softcap or 0.0), is_causal=np.bool_(is_causal),
        skip_empty_tiles=np.bool_(skip_empty_tiles))


def flash_fwd(q, k, v, bias, mask, *, scale: float, softcap: float, is_causal: bool,
              skip_empty_tiles: bool = True):
    """out [B, Lq, H, D] (q dtype), lse [B, H, Lq] f32 (natural log; empty rows: out 0, lse -inf)."""
    out, lse, _ = flash_fwd_with_tiles(q, k, v, bias, mask, scale=scale, softcap=softcap, is_causal=is_causal,
                                       skip_empty_tiles=skip_empty_tiles)
    return out, lse
