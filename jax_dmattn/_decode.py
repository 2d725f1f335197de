"""One-row calls (a decoding step: Lq = 1) in the shape the kernels run fastest, inside the primitives' lowerings.

- GQA packing: the G = H / Hkv query heads that share a kv head become G query rows of one head, so each kv head's
  keys and values are read once per step instead of G times. Per-query-head biases and masks move to the rows;
  the packed call is not causal (the one query row sees every key under bottom-right causality; row bounds, which
  hold causality themselves, are the same for every packed row).
- Split over the keys (CUDA forward): with few (batch, kv head) pairs the kernels would leave most multiprocessors
  idle, so the keys are cut into S equal parts stacked along the batch (one kernel call) and the parts' (out, lse)
  are merged exactly (jax_dmattn/_partials.py): flash-decoding without a kernel of its own. S comes from the
  device's multiprocessor count and Lk (a divisor of Lk, at least MIN_SPLIT_KEYS keys a part). Masks whose keys are
  not positions of the part (TopKMask: one top-k over all keys; KeyIndices: global indices) are not cut by key
  range: their live-key list, one per (batch, mask head) that every row shares, is cut instead (``split_lists``):
  part p of kv head h runs as query head h * S + p, whose GQA kv head is h, with the p-th slice of the list, so
  each part reads only its slice of the kept keys. A bool mask with a full key dim and no row bounds is not cut
  either: the key-list pre-pass lists each part's key range apart, with the keys' positions in the whole key dim
  (``split_mask_lists``), and the parts run as the list slices do, so no operand is copied into parts. The backward
  of a decoding step runs packed, not split: it gets the merged out and lse, so it is exact as it is.

The lowerings run per device (after custom_partitioning), so this is invisible to sharding, vmap and autodiff: the
primitives keep their shapes and contract. Absent operands are the primitives' zero-size placeholders here.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jax_dmattn import _ffi, _partials

# Fewer keys than this per part and the merge costs more than the parallelism it buys.
MIN_SPLIT_KEYS = 1024
# A list part holds at least this many 64-key chunks (a part's fixed cost, loading Q and writing out, is about that
# of walking a few chunks).
MIN_SPLIT_CHUNKS = 4
# Work items (batch x kv heads x parts) per multiprocessor the split aims at; with row bounds (a ragged batch) more,
# smaller parts, since a part past its rows' bounds costs almost nothing and the long elements' parts set the time.
ITEMS_PER_CORE = 2
ITEMS_PER_CORE_BOUNDED = 8
# List parts per multiprocessor: the key-list tile forward holds one CTA per multiprocessor (its registers and shared
# memory), so its parts aim at one wave; the few-rows forward (csrc/cuda/flash_fwd_key_list_rows.h, up to
# kernel_facts()["key_list_rows_max"] rows) holds two up to D = 192, and its parts aim at one wave of them (one or
# four parts per multiprocessor were slower: docs/decoding.md).
ITEMS_PER_CORE_LISTS = 1
ITEMS_PER_CORE_LIST_ROWS = 2


def _present(x) -> bool:
    from jax_dmattn._primitives import _is_absent  # the primitives' placeholder rule (imported late: circular)

    return not _is_absent(x)


def packs(q, k, mask, config) -> bool:
    """Whether a call runs GQA-packed: one query row and several query heads per kv head, unless a TopKMask ranks
    keys per query head (its scores cannot move to the rows)."""
    if q.shape[1] != 1 or q.shape[2] == k.shape[2]:
        return False
    return not (config.mask_kind == "topk" and mask.shape[1] == q.shape[2])


def _wanted_parts(batch: int, kv_heads: int, items_per_core: int) -> int:
    cores = getattr(jax.devices()[0], "core_count", None) or 0
    return math.ceil(items_per_core * cores / max(batch * kv_heads, 1))


def _largest_divisor(n: int, at_most: int) -> int:
    return max([1] + [s for s in range(2, at_most + 1) if n % s == 0])


def split_count(*, batch: int, kv_heads: int, kv_len: int, implementation: str, bounded: bool = False) -> int:
    """S, the parts the keys of a packed one-row call (with row bounds: ``bounded``) are split into (1: no split)."""
    if implementation != "cuda":
        return 1
    want = _wanted_parts(batch, kv_heads, ITEMS_PER_CORE_BOUNDED if bounded else ITEMS_PER_CORE)
    return _largest_divisor(kv_len, min(want, kv_len // MIN_SPLIT_KEYS))


def list_split_count(*, batch: int, kv_heads: int, chunks: int, rows: int) -> int:
    """S, the parts a packed one-row call's shared key lists of ``chunks`` 64-key chunks are cut into (CUDA), for a
    packed call of ``rows`` query rows."""
    few_rows = rows <= _ffi.kernel_facts()["key_list_rows_max"]
    want = _wanted_parts(batch, kv_heads, ITEMS_PER_CORE_LIST_ROWS if few_rows else ITEMS_PER_CORE_LISTS)
    return _largest_divisor(chunks, min(want, chunks // MIN_SPLIT_CHUNKS))


def split_lists(run, q, lists):
    """``run(q, lists, q_head_repeat, q_heads_first) -> (out, lse)``, the CUDA forward of a packed one-row call
    (q [B, G, Hkv, D]; each head of q serves q_head_repeat query heads; q_heads_first: q given as [B, Hkv, G, D])
    with compact key lists ``(keys, bits, (Bm, Hm, Mm))``, run as S list parts when each (batch, head) has one list
    unit: shared by every row (Mm = 1: a TopKMask, with or without row bounds, or shared KeyIndices) or with a bit
    row per packed row (Mm = G: per-query-head KeyIndices, whose heads became the rows), with Hm in {1, Hkv}; the
    parts' (out, lse) merged. Other lists run as they are."""
    keys, bits, (bm, hm, mm) = lists
    b, g, hkv, d = q.shape
    n = bm * hm
    if mm not in (1, g) or n == 0 or hm not in (1, hkv):
        return run(q, lists, 1, False)
    capacity = keys.shape[0] // n - 1
    chunk = _ffi.kernel_facts()["key_list_chunk"]
    s = list_split_count(batch=b, kv_heads=hkv, chunks=capacity // chunk, rows=g)
    if s == 1:
        return run(q, lists, 1, False)
    part = capacity // s
    listed = keys.reshape(n, 1 + capacity)
    starts = jnp.arange(s, dtype=jnp.int32) * part
    counts = jnp.clip(listed[:, :1] - starts[None, :], 0, part)                       # [n, s]
    part_keys = jnp.concatenate([counts[..., None], listed[:, 1:].reshape(n, s, part)], axis=2)
    part_bits = bits.reshape(n, s, part // chunk * mm * 2)  # a part's words: [chunks, Mm rows, 2] in chunk order
    return _run_list_parts(run, q, part_keys, part_bits, (bm, hm, mm), s)


def split_mask_lists(run, q, mask):
    """``run(q, lists, q_head_repeat, q_heads_first) -> (out, lse)`` as for split_lists, for a packed one-row call
    with a bool mask [Bm, Hm, Mm, Lk] (Hm in {1, Hkv}, Mm in {1, G}), run as the parts of ``split_count``: the
    key-list pre-pass lists each part's key range apart (csrc/cuda/key_lists.h, parts), with each key's position in
    the whole key dim, so that neither the mask nor K, V or the bias is cut; the parts' (out, lse) merged."""
    from jax_dmattn import _cuda_fwd  # imported late: the CPU route needs none of it

    b, g, hkv, d = q.shape
    bm, hm, mm, lk = mask.shape
    s = split_count(batch=b, kv_heads=hkv, kv_len=lk, implementation="cuda")
    capacity = _cuda_fwd.key_list_capacity(lk // s, max_keys=lk)  # a part's keys rounded up to 64: never dense
    keys, bits = _cuda_fwd.build_key_lists(mask, q_len=q.shape[1], is_causal=False, capacity=capacity, parts=s)
    return _run_list_parts(run, q, keys.reshape(bm * hm, s, 1 + capacity), bits.reshape(bm * hm, s, -1),
                           (bm, hm, mm), s)


def _run_list_parts(run, q, part_keys, part_bits, geometry, s: int):
    """``run`` on key lists in s parts (part_keys [Bm * Hm, s, 1 + C], part_bits [Bm * Hm, s, words]; geometry
    (Bm, Hm, Mm)) as query heads: part p of kv head h is query head h * s + p (GQA maps it to kv head h, and the
    kernel to q's head h: q_head_repeat, no copy of q; q goes heads first, which undoes the packing's transpose, so
    XLA copies nothing; a mask head shared by the kv heads has its lists repeated for each); the parts' (out, lse)
    merged."""
    b, g, hkv, d = q.shape
    bm, hm, mm = geometry
    keys_len, words = part_keys.shape[-1], part_bits.shape[-1]
    part_keys = jnp.broadcast_to(part_keys.reshape(bm, hm, s, keys_len), (bm, hkv, s, keys_len)).reshape(-1)
    part_bits = jnp.broadcast_to(part_bits.reshape(bm, hm, s, words), (bm, hkv, s, words)).reshape(-1)
    out, lse = run(jnp.swapaxes(q, 1, 2), (part_keys, part_bits, (bm, hkv * s, mm)), s, True)
    return _partials.merge(jnp.moveaxis(out.reshape(b, g, hkv, s, d), 3, 0),
                           jnp.moveaxis(lse.reshape(b, hkv, s, g), 2, 0))


# ------------------------------------------------------------------------------------------ packing
def _heads_to_rows(x, heads: int, kv_heads: int):
    """A rank-4 [Bx, Hx, 1, N] bias / mask / key-index operand of the one-row call -> the packed call's: one entry
    per query head becomes [Bx, Hkv, G, N] (the G heads of a kv head as rows); 1 or Hkv heads stay (broadcast over
    the rows)."""
    if not _present(x) or x.shape[1] != heads:
        return x
    return x.reshape(x.shape[0], kv_heads, heads // kv_heads, x.shape[3])


def _rows_to_heads(x, heads: int):
    """Inverse of _heads_to_rows for dbias: [Bx, Hkv, G, N] -> [Bx, H, 1, N]."""
    return x.reshape(x.shape[0], heads, 1, x.shape[3])


def _pack_rows(x, kv_heads: int):
    """q-like [B, 1, H, D] -> [B, G, Hkv, D] (query head kvh * G + gi is row gi of head kvh)."""
    b, _, h, d = x.shape
    return x.reshape(b, kv_heads, h // kv_heads, d).transpose(0, 2, 1, 3)


def _unpack_rows(x):
    """[B, G, Hkv, D] -> [B, 1, H, D]."""
    b, g, hkv, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, 1, hkv * g, d)


def _pack_stats(x, kv_heads: int):
    """lse-like [B, H, 1] -> [B, Hkv, G]."""
    return x.reshape(x.shape[0], kv_heads, -1)


def _packed_operands(q, k, bias, mask, rows):
    h, hkv = q.shape[2], k.shape[2]
    if _present(rows):
        rows = jnp.broadcast_to(rows, (rows.shape[0], h // hkv, rows.shape[2]))
    return _pack_rows(q, hkv), _heads_to_rows(bias, h, hkv), _heads_to_rows(mask, h, hkv), rows


def _packed_config(config):
    # One row sees every key under bottom-right causality; row bounds hold the call's causality themselves.
    return dataclasses.replace(config, is_causal=False, packed_rows=True)


# ------------------------------------------------------------------------------------------ split over keys
def _parts_along_batch(x, key_axis: int, s: int, batch: int):
    """x with its key dim `key_axis` cut into s equal parts moved next to the batch dim: [Bx, ..., Lk, ...] ->
    [B * s, ..., Lk / s, ...], part p of batch entry b at b * s + p. A batch-broadcast x (Bx = 1) is expanded: its
    parts differ, the batch entries do not."""
    lk = x.shape[key_axis]
    x = jnp.moveaxis(x.reshape(x.shape[:key_axis] + (s, lk // s) + x.shape[key_axis + 1:]), key_axis, 1)
    x = jnp.broadcast_to(x, (batch,) + x.shape[1:])
    return x.reshape((batch * s,) + x.shape[2:])


def _split_bcast(x, s: int, batch: int):
    """A bias / mask [Bx, Hx, M, N] for the parts: its keys cut into them; one constant along keys (N = 1) follows
    the batch only."""
    if not _present(x):
        return x
    if x.shape[3] != 1:
        return _parts_along_batch(x, 3, s, batch)
    return x if x.shape[0] == 1 else jnp.repeat(x, s, axis=0)


def _split_rows(rows, s: int, part: int, batch: int):
    """Row bounds [Bb, Lq, 4] of the whole key range -> [B * s, Lq, 4]: each part's range in its own key positions,
    clipped to the part (still non-decreasing along the rows)."""
    offsets = jnp.arange(s, dtype=jnp.int32)[:, None] * part                        # [s, 1]
    lo = jnp.clip(rows[:, None, :, 0] - offsets, 0, part)                           # [Bb, s, Lq]
    hi = jnp.clip(rows[:, None, :, 1] - offsets, 0, part)
    rest = jnp.broadcast_to(rows[:, None, :, 2:], lo.shape + (2,))
    split = jnp.concatenate([lo[..., None], hi[..., None], rest], axis=-1)          # [Bb, s, Lq, 4]
    split = jnp.broadcast_to(split, (batch,) + split.shape[1:])
    return split.reshape((batch * s,) + split.shape[2:])


# ------------------------------------------------------------------------------------------ the two passes
def _mask_lists_split(mask, rows, key_segments, kv_heads: int, kv_len: int, config) -> bool:
    """Whether a packed CUDA call's bool mask is split by listing its parts' keys apart (split_mask_lists) instead of
    cutting every operand into parts along the batch: a mask with a full key dim, one head or one per kv head, rows
    that one list unit holds, and no row bounds (their lists come from another pre-pass)."""
    return (config.implementation == "cuda" and config.mask_kind == "bool" and _present(mask)
            and mask.shape[3] == kv_len and mask.shape[1] in (1, kv_heads)
            and mask.shape[2] <= _ffi.kernel_facts()["key_list_block_m"] and not _present(rows)
            and not _present(key_segments))


def forward(body, q, k, v, bias, mask, rows, key_segments, config):
    """``body(q, k, v, bias, mask, rows, key_segments, config) -> (out, lse)``, the platform's forward lowering, run
    packed (and on CUDA split over the keys) for a call that ``packs``."""
    if not packs(q, k, mask, config):
        return body(q, k, v, bias, mask, rows, key_segments, config)
    b, h, hkv, d, lk = q.shape[0], q.shape[2], k.shape[2], q.shape[3], k.shape[1]
    qp, bias, mask, rows = _packed_operands(q, k, bias, mask, rows)
    config = _packed_config(config)
    s = split_count(batch=b, kv_heads=hkv, kv_len=lk, implementation=config.implementation, bounded=_present(rows))
    if s > 1 and _mask_lists_split(mask, rows, key_segments, hkv, lk, config):
        out, lse = body(qp, k, v, bias, mask, rows, key_segments, dataclasses.replace(config, split_lists=True))
    elif s > 1 and config.mask_kind == "bool":
        part = lk // s
        ks, vs = (x.reshape(b * s, part, hkv, d) for x in (k, v))
        out, lse = body(jnp.repeat(qp, s, axis=0), ks, vs, _split_bcast(bias, s, b), _split_bcast(mask, s, b),
                        _split_rows(rows, s, part, b) if _present(rows) else rows,
                        _parts_along_batch(key_segments, 1, s, b) if _present(key_segments) else key_segments,
                        config)
        out, lse = _partials.merge(jnp.moveaxis(out.reshape((b, s) + out.shape[1:]), 1, 0),
                                   jnp.moveaxis(lse.reshape((b, s) + lse.shape[1:]), 1, 0))
    else:
        if config.mask_kind == "topk" or (config.mask_kind != "bool" and not _present(rows)):
            config = dataclasses.replace(config, split_lists=True)
        out, lse = body(qp, k, v, bias, mask, rows, key_segments, config)
    return _unpack_rows(out), lse.reshape(b, h, 1)


def backward(body, q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse, config):
    """``body(q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse, config) -> (dq, dk, dv, dbias)``, the
    platform's backward lowering, run packed for a call that ``packs`` (never split: out and lse are the merged
    ones, so the packed backward over every key is exact)."""
    if not packs(q, k, mask, config):
        return body(q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse, config)
    h, hkv = q.shape[2], k.shape[2]
    per_head_bias = _present(bias) and bias.shape[1] == h
    qp, bias_p, mask, rows = _packed_operands(q, k, bias, mask, rows)
    dq, dk, dv, dbias = body(qp, k, v, bias_p, mask, rows, key_segments, _pack_rows(out, hkv), _pack_stats(lse, hkv),
                             _pack_rows(dout, hkv), _pack_stats(dlse, hkv), _packed_config(config))
    return _unpack_rows(dq), dk, dv, (_rows_to_heads(dbias, h) if per_head_bias else dbias)
