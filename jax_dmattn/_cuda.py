"""The CUDA forward kernel as a traced JAX function (used inside the cuda lowering of ``dmattn_fwd``).

One FFI call, ``dmattn_fwd_cuda``, runs a mask pre-pass and then the flash forward. Two pre-passes exist:

- live-key lists (default for a mask with a full key dim): per 128-row query tile, the keys that some row keeps,
  with the tile's mask re-packed over them as bit words (csrc/cuda/key_lists.h); the kernel walks the list 64
  keys at a time, so a top-k mask costs ~k keys per row instead of Lk. Workspace: ~5/32 of the mask's bytes.
- tile classes: every (query tile, key tile) of the mask is empty / partial / full; the kernel skips empty tiles
  and loads no mask for full ones. Used for key-broadcast masks, or with ``key_lists=False``.
The pre-pass's results come back as extra outputs (XLA-owned workspace, no allocation in the handler).

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


KEY_LIST_BLOCK_M = 128  # csrc/cuda/key_lists.h: kKeyListBlockM
KEY_LIST_CHUNK = 64     # kKeyListChunk


def key_list_sizes(mask_shape) -> tuple[int, int]:
    """(int32 elements of the key lists, uint64 bit words) for a rank-4 mask with a full key dim."""
    bm, hm, mm, nm = mask_shape
    units = bm * hm * -(-mm // KEY_LIST_BLOCK_M)
    return units * (1 + nm), units * -(-nm // KEY_LIST_CHUNK) * min(mm, KEY_LIST_BLOCK_M)


def uses_key_lists(mask_shape, kv_len: int, key_lists: bool = True) -> bool:
    return key_lists and mask_shape is not None and mask_shape[3] == kv_len and kv_len > 0


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
                         skip_empty_tiles: bool = True, key_lists: bool = True):
    """Returns (out [B, Lq, H, D], lse [B, H, Lq] f32, tile classes uint8 or a zero-size array, key lists int32
    or zero-size, their bit words as uint32 pairs or zero-size).

    ``key_lists=False`` forces the tile-class pre-pass (``skip_empty_tiles=False`` then treats every tile as
    partial: the bitwise reference of tile skipping)."""
    check_operands("flash_fwd", q, k, v, bias, mask)
    _ffi.register_targets()
    b, lq, h, _ = q.shape
    bias_arg = jnp.zeros((0,), jnp.float32) if bias is None else bias
    mask_arg = jnp.zeros((0,), jnp.bool_) if mask is None else mask
    lists = mask is not None and uses_key_lists(mask.shape, k.shape[1], key_lists)
    cls_shape = tile_class_shape(mask.shape) if mask is not None and not lists else (0,)
    n_keys, n_words = key_list_sizes(mask.shape) if lists else (0, 0)
    out_types = (
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((b, h, lq), jnp.float32),
        jax.ShapeDtypeStruct(cls_shape, jnp.uint8),
        jax.ShapeDtypeStruct((n_keys,), jnp.int32),
        jax.ShapeDtypeStruct((2 * n_words,), jnp.uint32),
    )
    return jax.ffi.ffi_call(TARGET, out_types)(
        q, k, v, bias_arg, mask_arg,
        scale=np.float32(scale), softcap=np.float32(softcap or 0.0), is_causal=np.bool_(is_causal),
        skip_empty_tiles=np.bool_(skip_empty_tiles), key_lists=np.bool_(lists))


def flash_fwd(q, k, v, bias, mask, *, scale: float, softcap: float, is_causal: bool,
              skip_empty_tiles: bool = True, key_lists: bool = True):
    """out [B, Lq, H, D] (q dtype), lse [B, H, Lq] f32 (natural log; empty rows: out 0, lse -inf)."""
    out, lse, *_ = flash_fwd_with_tiles(q, k, v, bias, mask, scale=scale, softcap=softcap, is_causal=is_causal,
                                        skip_empty_tiles=skip_empty_tiles, key_lists=key_lists)
    return out, lse
