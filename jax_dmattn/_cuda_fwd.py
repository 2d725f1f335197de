"""The CUDA forward kernel as a traced JAX function (used inside the cuda lowering of ``dmattn_fwd``).

The forward FFI call, ``dmattn_fwd_cuda``, runs on a mask pre-pass. Two pre-passes exist:

- live-key lists (default for a mask with a full key dim): per 128-row query tile, the keys that some row keeps,
  with the tile's mask re-packed over them as bit words (csrc/cuda/key_lists.h); the kernel walks the list 64
  keys at a time, so a top-k mask costs ~k keys per row instead of Lk. The lists are built by their own FFI call,
  ``dmattn_key_lists_cuda`` (``build_key_lists``), and passed to the forward (and to the key-list backward) as
  inputs: the call is side-effect free, so XLA's CSE merges identical ones and a jitted forward + backward, or
  several layers with one mask, read the mask once. Workspace: ``key_list_capacity`` keys per 128-row unit
  (units whose live keys exceed it are "dense" and the kernels read the mask for them).
- tile classes: every (query tile, key tile) of the mask is empty / partial / full; the kernel skips empty tiles
  and loads no mask for full ones. Used for key-broadcast masks, or with ``key_lists=False``. Built inside the
  forward call, returned as an extra output (XLA-owned workspace, no allocation in the handler).

Inputs are the canonical layout of docs/design.md: q [B, Lq, H, D], k/v [B, Lk, Hkv, D] (bf16 or f16,
D in {32, 64, 96, 128, 192, 256}); bias None or rank 4 [Bb, Hb, Mb, Nb] (bf16 / f16 / f32); mask None or rank
4 bool with the same broadcast rule.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_dmattn import _ffi

_FACTS = _ffi.kernel_facts()  # csrc/kernel_facts.h
# Tile sizes of the forward kernel and of its tile-class map.
BLOCK_M = _FACTS["fwd_block_m"]
BLOCK_N = _FACTS["fwd_block_n"]
HEAD_DIMS = _FACTS["cuda_head_dims"]
TARGET = "dmattn_fwd_cuda"
KEY_LISTS_TARGET = "dmattn_key_lists_cuda"



def tile_class_shape(mask_shape) -> tuple[int, ...]:
    """Shape of the tile-class map of a rank-4 mask (broadcast dims stay broadcast)."""
    bm, hm, mm, nm = mask_shape
    return (bm, hm, -(-mm // BLOCK_M), -(-nm // BLOCK_N))


KEY_LIST_BLOCK_M = _FACTS["key_list_block_m"]  # query rows per key-list unit
KEY_LIST_CHUNK = _FACTS["key_list_chunk"]      # keys per bit word
# Default cap on the keys listed per 128-row unit. The lists' workspace is then O(B * H * Lq), not a fraction of
# the O(Lq * Lk) mask: 4096 keys x (4 bytes of key + 128 rows / 8 bytes of bit words) = 4096 x 20 bytes per unit.
# A unit whose live keys exceed the capacity is "dense": the kernels walk all of its keys and read the mask
# itself, which is what such a unit costs anyway (lists only pay off when few keys are live).
KEY_LIST_MAX_KEYS = _FACTS["key_list_max_keys"]
# On Hopper, lists of most of the keys a unit sees go to the forward's key tiles only past this many keys.
KEY_LIST_TILE_MIN_VISIBLE = _FACTS["key_list_tile_min_visible"]
KEY_LIST_DENSE = _FACTS["key_list_dense"]  # the count of a unit that is not listed


def key_list_capacity(kv_len: int, max_keys: int | None = None) -> int:
    """The list capacity C for a key length: min(kv_len rounded up to 64, max_keys or KEY_LIST_MAX_KEYS), rounded
    down to a multiple of 64 and at least 64 (what the handlers accept: csrc/cuda/key_lists.h, capacity_ok)."""
    cap = KEY_LIST_MAX_KEYS if max_keys is None else int(max_keys)
    full = -(-int(kv_len) // KEY_LIST_CHUNK) * KEY_LIST_CHUNK
    c = min(full, cap) // KEY_LIST_CHUNK * KEY_LIST_CHUNK
    return max(c, KEY_LIST_CHUNK)


def _resolve_capacity(caller: str, kv_len: int, capacity) -> int:
    """A user's key_list_capacity (None: the default) as the capacity the calls use, capped at kv_len rounded up
    to 64. Forward and backward resolve it the same way, so that their pre-pass calls are identical."""
    if capacity is None:
        return key_list_capacity(kv_len)
    if (isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity <= 0
            or capacity % KEY_LIST_CHUNK):
        raise ValueError(f"{caller}: key_list_capacity must be a positive multiple of {KEY_LIST_CHUNK}, "
                         f"got {capacity!r}")
    return key_list_capacity(kv_len, int(capacity))


def key_list_sizes(mask_shape, capacity: int | None = None, parts: int = 1) -> tuple[int, int]:
    """(int32 elements of the key lists, uint64 bit words) for a rank-4 mask with a full key dim, a list capacity
    (None: key_list_capacity of a part's keys) and its key dim listed in ``parts`` parts."""
    bm, hm, mm, nm = mask_shape
    if capacity is None:
        capacity = key_list_capacity(nm // parts)
    units = bm * hm * parts * -(-mm // KEY_LIST_BLOCK_M)
    return units * (1 + capacity), units * (capacity // KEY_LIST_CHUNK) * min(mm, KEY_LIST_BLOCK_M)


def build_key_lists(mask, *, q_len: int, is_causal: bool, capacity: int, parts: int = 1):
    """The live-key lists of a rank-4 bool mask [Bm, Hm, Mm, Lk] (one ``dmattn_key_lists_cuda`` call):
    (keys int32 [units * (1 + capacity)], bit words as uint32 pairs [2 * units * capacity / 64 * min(Mm, 128)]).

    ``q_len`` is the attention call's query length (the causal cut applies when Mm == q_len). ``parts`` > 1 lists
    each of that many equal key ranges apart, as heads hm * parts + p of the units (csrc/cuda/key_lists.h: a
    decoding step's split over the keys). Every caller passing the same mask value, q_len, is_causal, capacity and
    parts emits an identical call, which XLA's CSE merges."""
    _ffi.register_targets()
    n_keys, n_words = key_list_sizes(mask.shape, capacity, parts)
    out_types = (jax.ShapeDtypeStruct((n_keys,), jnp.int32), jax.ShapeDtypeStruct((2 * n_words,), jnp.uint32))
    keys, bits = jax.ffi.ffi_call(KEY_LISTS_TARGET, out_types)(
        mask, is_causal=np.bool_(is_causal), q_len=np.int64(q_len), capacity=np.int64(capacity),
        parts=np.int64(parts))
    return keys, bits


TOPK_KEY_LISTS_TARGET = "dmattn_topk_key_lists_cuda"


def build_topk_key_lists(scores, order, *, k: int, q_len: int, capacity: int):
    """The live-key lists of a TopKMask (one ``dmattn_topk_key_lists_cuda`` call) from scores [Bs, Hs, Lk]
    (causal: float32, canonical; shared: float32, bfloat16 or float16, whose canonical form the kernel ranks).
    Causal: order int32 [Bs, Hs, Lk] (keys by score desc, index asc), lists per 128-row query tile over the unit
    geometry (Bs, Hs, Lq) (csrc/cuda/topk_key_lists.h). order None: every row keeps the k best keys,
    one list per (b, h) over (Bs, Hs, 1) (csrc/cuda/topk_shared_key_lists.h). Deterministic and side-effect free:
    the forward's and the backward's calls merge."""
    _ffi.register_targets()
    bs, hs, lk = scores.shape
    is_causal = order is not None
    n_keys, n_words = key_list_sizes((bs, hs, q_len if is_causal else 1, lk), capacity)
    out_types = (jax.ShapeDtypeStruct((n_keys,), jnp.int32), jax.ShapeDtypeStruct((2 * n_words,), jnp.uint32))
    return jax.ffi.ffi_call(TOPK_KEY_LISTS_TARGET, out_types)(
        scores, jnp.zeros((0,), jnp.int32) if order is None else order, k=np.int64(k),
        is_causal=np.bool_(is_causal), q_len=np.int64(q_len), capacity=np.int64(capacity))


TOPK_BOUNDED_KEY_LISTS_TARGET = "dmattn_topk_bounded_key_lists_cuda"


def build_topk_bounded_key_lists(scores, rows, key_segments, *, k: int, capacity: int, may_overflow: bool):
    """The live-key lists of a TopKMask under row bounds (one ``dmattn_topk_bounded_key_lists_cuda`` call,
    csrc/cuda/topk_bounded_key_lists.h): scores float32 [Bs, Hs, Lk] (the kernel ranks their canonical form), rows
    int32 [Bb, Lq, 4], key segment ids int32 [Bb, Lk] or None; lists over the unit geometry (max(Bs, Bb), Hs, Lq).
    With ``may_overflow`` a unit whose keys exceed the capacity has count ``KEY_LIST_DENSE`` (not a list the kernels
    can take).
    Deterministic and side-effect free: the forward's and the backward's calls merge."""
    _ffi.register_targets()
    bs, hs, lk = scores.shape
    bb, lq, _ = rows.shape
    n_keys, n_words = key_list_sizes((max(bs, bb), hs, lq, lk), capacity)
    out_types = (jax.ShapeDtypeStruct((n_keys,), jnp.int32), jax.ShapeDtypeStruct((2 * n_words,), jnp.uint32))
    return jax.ffi.ffi_call(TOPK_BOUNDED_KEY_LISTS_TARGET, out_types)(
        scores, *bounds_operands(rows, key_segments), k=np.int64(k), capacity=np.int64(capacity),
        may_overflow=np.bool_(may_overflow))


def bounds_operands(rows, key_segments):
    """The row-bounds operands of the CUDA targets: int32 rows [1|B, Lq, 4] and key segment ids [1|B, Lk], each
    zero-size when absent (csrc/row_bounds.h)."""
    absent = jnp.zeros((0,), jnp.int32)
    return (absent if rows is None else rows), (absent if key_segments is None else key_segments)


def no_key_lists():
    """The zero-size key-list operands of a call that does not take the list path."""
    return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.uint32)


def uses_key_lists(mask_shape, kv_len: int, key_lists: bool = True) -> bool:
    return key_lists and mask_shape is not None and mask_shape[3] == kv_len and kv_len > 0


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


def list_geometry_attrs(compact_lists):
    """The list_batch / list_heads / list_rows attributes: the unit geometry of lists given without a mask
    (a compact mask), all 0 for lists built from the mask operand."""
    b, h, m = (0, 0, 0) if compact_lists is None else compact_lists[2]
    return dict(list_batch=np.int64(b), list_heads=np.int64(h), list_rows=np.int64(m))


def flash_fwd_with_tiles(q, k, v, bias, mask, *, scale: float, softcap: float, is_causal: bool,
                         skip_empty_tiles: bool = True, key_lists: bool = True, key_list_capacity=None,
                         compact_lists=None, rows=None, key_segments=None, q_head_repeat: int = 1,
                         q_heads_first: bool = False):
    """Returns (out [B, Lq, H, D], lse [B, H, Lq] f32, tile classes uint8 or a zero-size array, key lists int32
    or zero-size, their bit words as uint32 pairs or zero-size).

    ``key_lists=False`` forces the tile-class pre-pass (``skip_empty_tiles=False`` then treats every tile as
    partial: the bitwise reference of tile skipping). ``key_list_capacity``: keys listed per 128-row unit, a
    positive multiple of 64 (None: ``key_list_capacity(Lk)``; capped at Lk rounded up to 64).
    ``compact_lists``: (keys, bits, (Bm, Hm, Mm)) of a compact mask (jax_dmattn/_compact.py: cuda_key_lists),
    given instead of a mask; they never hold a dense unit. ``rows`` / ``key_segments``: row bounds
    (jax_dmattn/_bounds.py), which only the tile path takes: with them a mask goes through tile classes.
    ``q_head_repeat``: each head of q serves that many consecutive query heads (out and lse have H * q_head_repeat
    heads; with compact_lists only: a decoding step's key parts, jax_dmattn/_decode.py); ``q_heads_first``: q is
    [B, Hq, Lq, D] (compact_lists only: a packed step's q as the reshape of its query heads, with no transpose)."""
    check_operands("flash_fwd", q, k, v, bias, mask)
    if (q_head_repeat != 1 or q_heads_first) and compact_lists is None:
        raise ValueError("flash_fwd: q_head_repeat and q_heads_first are taken with compact_lists only")
    if compact_lists is not None and mask is not None:
        raise ValueError("flash_fwd: give a mask or compact_lists, not both")
    if rows is not None and compact_lists is not None:
        raise ValueError("flash_fwd: row bounds are taken on the tile path only, not with compact_lists")
    key_lists = key_lists and rows is None
    _ffi.register_targets()
    b, lq, hq, d = (q.shape[0], q.shape[2], q.shape[1], q.shape[3]) if q_heads_first else q.shape
    h = hq * q_head_repeat
    lk = k.shape[1]
    capacity = _resolve_capacity("flash_fwd", lk, key_list_capacity)
    bias_arg = jnp.zeros((0,), jnp.float32) if bias is None else bias
    mask_arg = jnp.zeros((0,), jnp.bool_) if mask is None else mask
    # An empty mask (Lq = 0) has nothing to list; the handler sees no mask then.
    lists = mask is not None and mask.size > 0 and uses_key_lists(mask.shape, lk, key_lists)
    cls_shape = tile_class_shape(mask.shape) if mask is not None and not lists else (0,)
    if compact_lists is not None:
        keys, bits, _ = compact_lists
        lists = lq > 0
        if not lists:
            keys, bits = no_key_lists()
    elif lists:
        keys, bits = build_key_lists(mask, q_len=lq, is_causal=is_causal, capacity=capacity)
    else:
        keys, bits = no_key_lists()
    out_types = (
        jax.ShapeDtypeStruct((b, lq, h, d), q.dtype),
        jax.ShapeDtypeStruct((b, h, lq), jnp.float32),
        jax.ShapeDtypeStruct(cls_shape, jnp.uint8),
    )
    out, lse, classes = jax.ffi.ffi_call(TARGET, out_types)(
        q, k, v, bias_arg, mask_arg, keys, bits, *bounds_operands(rows, key_segments),
        scale=np.float32(scale), softcap=np.float32(softcap or 0.0), is_causal=np.bool_(is_causal),
        skip_empty_tiles=np.bool_(skip_empty_tiles), key_lists=np.bool_(lists),
        **list_geometry_attrs(compact_lists if lists else None), q_head_repeat=np.int64(q_head_repeat),
        q_heads_first=np.bool_(q_heads_first))
    return out, lse, classes, keys, bits


def flash_fwd(q, k, v, bias, mask, *, scale: float, softcap: float, is_causal: bool,
              skip_empty_tiles: bool = True, key_lists: bool = True, key_list_capacity=None, compact_lists=None,
              rows=None, key_segments=None, q_head_repeat: int = 1, q_heads_first: bool = False):
    """out [B, Lq, H, D] (q dtype), lse [B, H, Lq] f32 (natural log; empty rows: out 0, lse -inf)."""
    out, lse, *_ = flash_fwd_with_tiles(q, k, v, bias, mask, scale=scale, softcap=softcap, is_causal=is_causal,
                                        skip_empty_tiles=skip_empty_tiles, key_lists=key_lists,
                                        key_list_capacity=key_list_capacity, compact_lists=compact_lists,
                                        rows=rows, key_segments=key_segments, q_head_repeat=q_head_repeat,
                                        q_heads_first=q_heads_first)
    return out, lse
