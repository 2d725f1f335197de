"""Dynamic (top-k) attention masks built from a bias.

``topk_mask`` is the paper's dynamic mask: per query row, keep the ``window_size``
keys with the largest bias among the keys that the optional boolean ``mask`` and
(bottom-right) causality allow.  ``block_topk_mask`` makes the same selection at
tile granularity, so that the kept set is made of whole tiles and the attention
kernels can skip every other tile.

Both functions

* return a ``bool`` array that :func:`jax_dmattn.attention` takes directly as
  ``mask=``, in the numpy broadcast shape of ``bias`` and ``mask`` (the query
  dimension is expanded to ``query_len`` only when causality needs it; a head dim
  of Hkv on one and H on the other combine by attention's GQA rule, query head
  ``h`` reading kv head ``h // (H // Hkv)``, giving H);
* are deterministic: among equal biases the key with the lower index wins;
* carry no gradient (the bias goes through ``jax.lax.stop_gradient``);
* work under ``jit``/``vmap``; ``window_size``, ``block_q``, ``block_k``,
  ``is_causal``, ``query_len`` and ``pool`` must be static Python values.

The selection runs in float32 (float64 for a float64 bias), so bfloat16/float16
biases are ranked exactly.  ``-inf`` and ``NaN`` biases on allowed keys rank
below every finite bias (they tie with the most negative finite float32, ties go
to the lower index), and ``-0.0`` ranks equal to ``0.0``.

Memory: besides the boolean output, the element-level selection materialises one
float32 score per output element plus ``lax.top_k``'s working set; no
``[..., Lq, Lk, k]`` or sorted-copy-per-k buffers are built.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["topk_mask", "block_topk_mask", "TopKMask", "KeyIndices"]


# --------------------------------------------------------------------------
# argument checking
# --------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"{name} must be a positive Python int (a static value), got {value!r} "
            f"of type {type(value).__name__}"
        )
    value = operator.index(value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_bias(bias: Any) -> None:
    if bias is None:
        raise TypeError("bias is required: the mask is chosen from the largest bias values")
    if not hasattr(bias, "shape") or not hasattr(bias, "dtype"):
        raise TypeError(f"bias must be a JAX or NumPy array, got {type(bias).__name__}")
    if not jnp.issubdtype(bias.dtype, jnp.floating):
        raise TypeError(f"bias must have a floating dtype, got {bias.dtype}")
    if bias.ndim < 1:
        raise ValueError(
            f"bias must have rank >= 1 (its last dim is the key dim), got shape {tuple(bias.shape)}"
        )


def _check_mask(mask: Any) -> None:
    if mask is None:
        return
    if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
        raise TypeError(f"mask must be a JAX or NumPy bool array, got {type(mask).__name__}")
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must have dtype bool (True = attend), got {mask.dtype}")
    if mask.ndim < 1:
        raise ValueError(f"mask must have rank >= 1, got shape {tuple(mask.shape)}")


def _head_repeats(bias_shape, mask_shape) -> tuple[int, int]:
    """GQA head rule of :func:`jax_dmattn.attention` for rank >= 3 operands.

    A bias with Hkv heads and a mask with H heads (or the reverse, H % Hkv == 0)
    are combined by mapping query head h to kv head h // (H // Hkv), i.e. by
    repeating the Hkv-sized one.  Returns the repeat factors (bias, mask).
    """
    if mask_shape is None or len(bias_shape) < 3 or len(mask_shape) < 3:
        return 1, 1
    hb, hm = bias_shape[-3], mask_shape[-3]
    if hb == hm or hb == 1 or hm == 1:
        return 1, 1
    if hm % hb == 0:
        return hm // hb, 1
    if hb % hm == 0:
        return 1, hb // hm
    return 1, 1  # incompatible: reported by the broadcast check


def _repeat_heads(x: jax.Array | None, reps: int) -> jax.Array | None:
    if x is None or reps == 1:
        return x
    return jnp.repeat(x, reps, axis=x.ndim - 3)


def _output_shape(bias_shape, mask_shape, is_causal: bool, query_len: int | None) -> tuple[int, ...]:
    """Broadcast shape of bias and mask; the query dim is expanded when causality needs it."""
    rb, rm = _head_repeats(bias_shape, mask_shape)
    if rb != 1 or rm != 1:
        bias_shape = bias_shape[:-3] + (bias_shape[-3] * rb,) + bias_shape[-2:]
        mask_shape = mask_shape[:-3] + (mask_shape[-3] * rm,) + mask_shape[-2:]
    shapes = [tuple(bias_shape)] + ([tuple(mask_shape)] if mask_shape is not None else [])
    try:
        shape = tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ValueError(
            f"bias shape {tuple(bias_shape)} and mask shape {tuple(mask_shape)} do not broadcast "
            "together (numpy rule: each dim must be equal or 1)"
        ) from None
    if is_causal and len(shape) < 2:
        shape = (1,) * (2 - len(shape)) + shape
    if len(shape) >= 2:
        lq = shape[-2]
        if query_len is not None and lq != 1 and lq != query_len:
            raise ValueError(
                f"query_len={query_len} disagrees with the query dim {lq} of the bias/mask "
                f"broadcast shape {shape}"
            )
        if is_causal and lq == 1:
            if query_len is None:
                raise ValueError(
                    "is_causal=True with a bias/mask whose query dim is 1 (e.g. a per-key bias "
                    f"[B, H, 1, Lk], broadcast shape {shape}) needs query_len= to know the query "
                    "length Lq (causality depends on the row)"
                )
            shape = shape[:-2] + (query_len,) + shape[-1:]
    return shape


def _selection_operands(bias, mask, is_causal: bool, query_len: int | None):
    """``(bias, mask, shape)`` as the jitted selections take them: jnp arrays whose head dims are repeated to a
    common count (so that one broadcast covers both), and the selection's output shape (:func:`_output_shape`)."""
    mask_shape = None if mask is None else tuple(mask.shape)
    shape = _output_shape(tuple(bias.shape), mask_shape, is_causal, query_len)
    rb, rm = _head_repeats(tuple(bias.shape), mask_shape)
    bias, mask = _repeat_heads(jnp.asarray(bias), rb), _repeat_heads(mask, rm)
    return jnp.asarray(bias), None if mask is None else jnp.asarray(mask), shape


# --------------------------------------------------------------------------
# shared pieces (traced)
# --------------------------------------------------------------------------


def _score_dtype(dtype) -> Any:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _canonical_scores(bias: jax.Array) -> jax.Array:
    """Bias in the ranking dtype with -inf/NaN -> most negative finite and -0.0 -> 0.0."""
    dtype = _score_dtype(bias.dtype)
    s = lax.stop_gradient(bias).astype(dtype)
    lowest = jnp.finfo(dtype).min
    s = jnp.where(s > lowest, s, lowest)  # NaN and -inf compare False
    return jnp.where(s == 0, jnp.zeros((), dtype), s)


def _allowed(mask: jax.Array | None, is_causal: bool, shape: tuple[int, ...]) -> jax.Array | None:
    """Element-level allowed set (mask & bottom-right causality), broadcastable to shape."""
    allowed = None
    if is_causal:
        lq, lk = shape[-2], shape[-1]
        i = lax.broadcasted_iota(jnp.int32, (lq, lk), 0)
        j = lax.broadcasted_iota(jnp.int32, (lq, lk), 1)
        allowed = j <= i + (lk - lq)
    if mask is not None:
        allowed = mask if allowed is None else jnp.logical_and(mask, allowed)
    return allowed


def top_k_unfused(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k`` whose results XLA may not fuse into a consumer.

    Fusing a [..., k-1] slice into top_k's sort breaks XLA's sort+slice -> TopK
    rewrite and falls back to a full sort (6x slower on CPU), hence the barrier.
    The barrier also carries a scalar: a barrier over exactly the TopK's two
    results is simplified to consume the TopK tuple itself, which jaxlib 0.10's
    CPU TopkDecomposer aborts on once the program is SPMD-partitioned.
    """
    vals, idx = lax.top_k(x, k)
    vals, idx, _ = lax.optimization_barrier((vals, idx, jnp.zeros((), jnp.int32)))
    return vals, idx


def _topk_rows(score: jax.Array, k: int) -> jax.Array:
    """Boolean keep-set of the k largest entries of each row of ``score`` (last axis).

    Order is (value desc, index asc), the documented order of ``lax.top_k``; the
    kept set is everything that precedes or equals the k-th element in that order.
    ``score`` must hold no NaN and no -0.0.  Rows with fewer than k entries above
    -inf keep all of them plus (possibly) some -inf entries; the caller intersects
    with the allowed set.
    """
    vals, idx = top_k_unfused(score, k)
    thresh = vals[..., k - 1 : k]
    last = idx[..., k - 1 : k]
    j = lax.broadcasted_iota(jnp.int32, score.shape, score.ndim - 1)
    return (score > thresh) | ((score == thresh) & (j <= last))


# --------------------------------------------------------------------------
# topk_mask
# --------------------------------------------------------------------------


def _per_key(x: jax.Array | None) -> bool:
    """True when x (bias or mask) does not vary along the query dim."""
    return x is None or x.ndim < 2 or x.shape[-2] == 1


def _key_rows(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A per-key operand as [N, Lk] rows, N = prod(shape[:-2])."""
    lead = shape[:-2]
    x = x.reshape((1,) * (len(shape) - x.ndim) + x.shape)  # rank of shape
    x = jnp.broadcast_to(x[..., 0, :], lead + (shape[-1],))
    return x.reshape((math.prod(lead), shape[-1]))


def _prefix_kth(s: jax.Array, k: int, chunk: int):
    """For every prefix s[:, :e+1] of the rows of s [N, Lk], the k-th entry in
    (value desc, index asc) order: its value t [N, Lk] and key index jk [N, Lk].

    A scan over key chunks of size ``chunk`` carries the sorted top-k (values,
    indices) of all earlier chunks; each prefix ending in the chunk ranks that
    buffer together with its part of the chunk: O(N * Lk * (k + chunk)) work and
    O(N * chunk * (k + chunk)) memory per step, never [Lq, Lk].  ``lax.top_k``
    breaks value ties by position, and every candidate list is laid out in key
    index order among equal values (buffer keys precede chunk keys, the buffer
    itself is kept in (value desc, index asc) order), so position order is index
    order.  Prefixes with fewer than k entries get t = -inf.
    """
    n, lk = s.shape
    nc = -(-lk // chunk)
    sp = _pad_axis(s, -1, nc * chunk, -jnp.inf)
    xs = (jnp.moveaxis(sp.reshape(n, nc, chunk), 1, 0), jnp.arange(nc, dtype=jnp.int32) * chunk)
    big = jnp.int32(np.iinfo(np.int32).max)
    tri = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1) <= lax.broadcasted_iota(
        jnp.int32, (chunk, chunk), 0)  # [e, j]: chunk key j is in prefix e

    def step(carry, x):
        bv, bi = carry  # [n, k]
        cv, c0 = x  # [n, chunk], scalar
        ci = c0 + lax.broadcasted_iota(jnp.int32, (chunk,), 0)
        cand_v = jnp.concatenate(
            [jnp.broadcast_to(bv[:, None, :], (n, chunk, k)),
             jnp.where(tri[None], cv[:, None, :], -jnp.inf)], axis=-1)
        cand_i = jnp.concatenate(
            [jnp.broadcast_to(bi[:, None, :], (n, chunk, k)),
             jnp.broadcast_to(ci[None, None, :], (n, chunk, chunk))], axis=-1)
        v, pos = top_k_unfused(cand_v, k)
        t = v[..., k - 1]
        jk = jnp.take_along_axis(cand_i, pos[..., k - 1 :], axis=-1)[..., 0]
        allv = jnp.concatenate([bv, cv], axis=-1)
        alli = jnp.concatenate([bi, jnp.broadcast_to(ci[None], (n, chunk))], axis=-1)
        nv, npos = lax.top_k(allv, k)
        ni = jnp.take_along_axis(alli, npos, axis=-1)
        return (nv, ni), (t, jk)

    init = (jnp.full((n, k), -jnp.inf, s.dtype), jnp.full((n, k), big, jnp.int32))
    _, (t, jk) = lax.scan(step, init, xs)
    t = jnp.moveaxis(t, 0, 1).reshape(n, nc * chunk)[:, :lk]
    jk = jnp.moveaxis(jk, 0, 1).reshape(n, nc * chunk)[:, :lk]
    return t, jk


def _topk_causal_per_key(bias, mask, k: int, shape: tuple[int, ...]):
    """topk_mask for a causal, per-key bias and mask: no [Lq, Lk] scores.

    Causality makes row i's candidates the key prefix [0, i + Lk - Lq], so the
    row's threshold is the k-th entry of that prefix (see _prefix_kth); the mask
    is then one fused elementwise pass over the output.
    """
    lq, lk = shape[-2], shape[-1]
    s = _key_rows(_canonical_scores(bias), shape)
    if mask is not None:
        m = _key_rows(mask, shape)
        s = jnp.where(m, s, -jnp.inf)
    t, jk = _prefix_kth(s, k, chunk=max(k, 64))
    rows = jnp.clip(jnp.arange(lq) + (lk - lq), 0, lk - 1)
    t, jk = t[:, rows], jk[:, rows]  # [N, Lq]
    j = lax.broadcasted_iota(jnp.int32, (lq, lk), 1)
    i = lax.broadcasted_iota(jnp.int32, (lq, lk), 0)
    sv = s[:, None, :]
    keep = (sv > t[..., None]) | ((sv == t[..., None]) & (j <= jk[..., None]))
    keep = keep & (j <= i + (lk - lq)) & (sv > -jnp.inf)
    return keep.reshape(shape)


def _within(keep, allowed):
    """A selection cut to the allowed entries (None: all of them)."""
    return keep if allowed is None else keep & allowed


@functools.partial(jax.jit, static_argnames=("k", "is_causal", "shape"))
def _topk_mask_impl(bias, mask, *, k: int, is_causal: bool, shape: tuple[int, ...]):
    allowed = _allowed(mask, is_causal, shape)
    if k >= shape[-1]:  # every allowed key fits in the window
        if allowed is None:
            return jnp.ones(shape, jnp.bool_)
        return jnp.broadcast_to(allowed, shape)
    if is_causal and _per_key(bias) and _per_key(mask) and 2 * k < shape[-2]:
        return _topk_causal_per_key(bias, mask, k, shape)
    s = jnp.broadcast_to(_canonical_scores(bias), shape)
    if allowed is not None:
        s = jnp.where(allowed, s, -jnp.inf)
    return _within(_topk_rows(s, k), allowed)


def topk_mask(
    bias: jax.Array,
    window_size: int,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    query_len: int | None = None,
) -> jax.Array:
    """Per query row, keep the ``window_size`` keys of largest ``bias``.

    Args:
      bias: float array, broadcastable like :func:`jax_dmattn.attention`'s bias,
        e.g. ``[B, Hkv, 1, Lk]`` (per-key, as in the paper) or ``[B, H, Lq, Lk]``.
        Its last dim is the key dim and must be full (size ``Lk``) unless ``mask``
        supplies it.
      window_size: how many keys each query row keeps (static int >= 1).
      mask: optional bool array (True = may attend) broadcastable with ``bias``;
        only allowed keys compete and are kept.
      is_causal: restrict each row to the bottom-right causal keys,
        key ``j`` visible from query ``i`` iff ``j <= i + Lk - Lq``.
      query_len: ``Lq``; required when ``is_causal`` and the query dim of
        ``bias``/``mask`` is 1 (a per-key bias), otherwise only checked.

    Returns:
      A bool array in the broadcast shape of ``bias`` and ``mask`` (with the
      query dim expanded to ``query_len`` under causality): True for kept keys.
      A row keeps ``min(window_size, #allowed keys)`` keys; among equal biases the
      lower key index wins.  No gradient flows through it.
    """
    _check_bias(bias)
    _check_mask(mask)
    k = _check_positive_int("window_size", window_size)
    query_len = _check_positive_int("query_len", query_len, allow_none=True)
    is_causal = bool(is_causal)
    bias, mask, shape = _selection_operands(bias, mask, is_causal, query_len)
    return _topk_mask_impl(bias, mask, k=min(k, shape[-1]), is_causal=is_causal, shape=shape)


# --------------------------------------------------------------------------
# block_topk_mask
# --------------------------------------------------------------------------


def _pad_axis(x: jax.Array, axis: int, size: int, value) -> jax.Array:
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _block_max_causal_per_key(bias, mask, bq: int, bk: int, shape: tuple[int, ...]):
    """Max-pooled tile scores [..., nq, nk] for a causal, per-key bias and mask.

    The allowed keys of tile (qb, kb) are those of key block kb up to the causal
    limit of the tile's last row, so its max is a within-block running max read
    at that limit: O(Lk + nq * nk), no [Lq, Lk] scores.
    """
    lq, lk = shape[-2], shape[-1]
    nq, nk = -(-lq // bq), -(-lk // bk)
    s = _key_rows(_canonical_scores(bias), shape)
    if mask is not None:
        s = jnp.where(_key_rows(mask, shape), s, -jnp.inf)
    s = _pad_axis(s, -1, nk * bk, -jnp.inf).reshape(-1, nk, bk)
    run = lax.cummax(s, axis=2)  # [N, nk, bk]
    last_row = jnp.minimum((jnp.arange(nq) + 1) * bq, lq) - 1
    limit = last_row + (lk - lq)  # last visible key of each query block
    off = limit[:, None] - (jnp.arange(nk) * bk)[None, :]  # [nq, nk]
    idx = jnp.clip(off, 0, bk - 1)
    pooled = run[:, jnp.arange(nk)[None, :], idx]  # [N, nq, nk]
    pooled = jnp.where(off >= 0, pooled, -jnp.inf)
    return pooled.reshape(shape[:-2] + (nq, nk))


@functools.partial(
    jax.jit, static_argnames=("kb", "bq", "bk", "is_causal", "shape", "pool")
)
def _block_topk_mask_impl(bias, mask, *, kb: int, bq: int, bk: int, is_causal: bool,
                          shape: tuple[int, ...], pool: str):
    lq, lk = shape[-2], shape[-1]
    nq, nk = -(-lq // bq), -(-lk // bk)
    allowed = _allowed(mask, is_causal, shape)
    if kb >= nk:  # every allowed key block fits in the window
        if allowed is None:
            return jnp.ones(shape, jnp.bool_)
        return jnp.broadcast_to(allowed, shape)

    if is_causal and pool == "max" and _per_key(bias) and _per_key(mask):
        pooled = _block_max_causal_per_key(bias, mask, bq, bk, shape)
        any_ok = pooled > -jnp.inf
        keep_blocks = _topk_rows(pooled, kb) & any_ok
        keep = jnp.repeat(jnp.repeat(keep_blocks, bq, axis=-2), bk, axis=-1)
        return keep[..., :lq, :lk] & allowed

    s = jnp.broadcast_to(_canonical_scores(bias), shape)
    ok = jnp.ones(shape, jnp.bool_) if allowed is None else jnp.broadcast_to(allowed, shape)
    # pad to whole blocks; padding is "not allowed"
    s = _pad_axis(_pad_axis(s, -2, nq * bq, 0), -1, nk * bk, 0)
    ok = _pad_axis(_pad_axis(ok, -2, nq * bq, False), -1, nk * bk, False)
    blocked = shape[:-2] + (nq, bq, nk, bk)
    s = s.reshape(blocked)
    ok = ok.reshape(blocked)
    axes = (s.ndim - 3, s.ndim - 1)
    any_ok = jnp.any(ok, axis=axes)
    if pool == "max":
        pooled = jnp.max(jnp.where(ok, s, -jnp.inf), axis=axes)
    else:  # mean over the block's allowed entries
        total = jnp.sum(jnp.where(ok, s, 0), axis=axes)
        count = jnp.sum(ok, axis=axes, dtype=s.dtype)
        pooled = total / jnp.maximum(count, 1)
        lowest = jnp.finfo(s.dtype).min
        pooled = jnp.where(pooled > lowest, pooled, lowest)  # overflow / NaN guard
        pooled = jnp.where(pooled == 0, jnp.zeros((), s.dtype), pooled)
    pooled = jnp.where(any_ok, pooled, -jnp.inf)
    keep_blocks = _topk_rows(pooled, kb) & any_ok  # [..., nq, nk]
    keep = jnp.repeat(jnp.repeat(keep_blocks, bq, axis=-2), bk, axis=-1)
    return _within(keep[..., :lq, :lk], allowed)


def block_topk_mask(
    bias: jax.Array,
    window_size: int,
    *,
    block_q: int = 128,
    block_k: int = 128,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    query_len: int | None = None,
    pool: str = "max",
) -> jax.Array:
    """:func:`topk_mask` at tile granularity: keep whole ``block_q x block_k`` tiles.

    The ``[Lq, Lk]`` plane is cut into tiles of ``block_q`` rows and ``block_k``
    keys, aligned at the top-left corner (the last row/column of tiles may be
    ragged).  Each tile is scored by pooling the bias over its *allowed* entries
    (``pool="max"``, the default, or ``"mean"``); a tile with no allowed entry is
    never kept.  Each query block then keeps the ``ceil(window_size / block_k)``
    key blocks of highest score (ties: lower key-block index wins), so every row
    of it keeps up to that many whole key blocks, i.e. at least ``window_size``
    keys when that many are allowed and at most
    ``ceil(window_size / block_k) * block_k``.

    The kept tiles are finally intersected, element by element, with ``mask``
    and causality, so the result never lets a query see a key that ``mask`` or
    ``is_causal`` hides.  Hence every tile is all-False except kept tiles, which
    are all-True unless they cross the causal diagonal, the user mask, or the
    ragged end of the sequence.  The default 128 x 128 blocks are a multiple of
    every kernel tile (CPU 64x64, CUDA 64/128), so each kernel tile lies inside
    one block and is either fully skipped or (off the diagonal) fully kept.

    When the broadcast query dim is 1 (per-key bias, not causal), the selection is
    the same for every query and the result keeps query dim 1.

    Args:
      bias, window_size, mask, is_causal, query_len: as in :func:`topk_mask`.
      block_q, block_k: tile size (static ints >= 1; default 128).
      pool: ``"max"`` or ``"mean"`` pooling of the bias over a tile.

    Returns:
      A bool array in the broadcast shape of ``bias`` and ``mask`` (query dim
      expanded to ``query_len`` under causality).
    """
    _check_bias(bias)
    _check_mask(mask)
    window_size = _check_positive_int("window_size", window_size)
    block_q = _check_positive_int("block_q", block_q)
    block_k = _check_positive_int("block_k", block_k)
    query_len = _check_positive_int("query_len", query_len, allow_none=True)
    if pool not in ("max", "mean"):
        raise ValueError(f"pool must be 'max' or 'mean', got {pool!r}")
    is_causal = bool(is_causal)
    bias, mask, shape = _selection_operands(bias, mask, is_causal, query_len)
    if len(shape) < 2:  # a rank-1 selection has a single query row
        shape2 = (1,) + shape
        out = _block_topk_mask_impl(
            bias, mask, kb=math.ceil(window_size / block_k), bq=1, bk=block_k,
            is_causal=False, shape=shape2, pool=pool,
        )
        return out.reshape(shape)
    bq = 1 if shape[-2] == 1 else block_q
    return _block_topk_mask_impl(
        bias, mask, kb=math.ceil(window_size / block_k), bq=bq, bk=block_k,
        is_causal=is_causal, shape=shape, pool=pool,
    )


# --------------------------------------------------------------------------
# compact masks: no [Lq, Lk] array
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TopKMask:
    """The top-k dynamic mask given by per-key scores, without any ``[Lq, Lk]`` array.

    ``scores``: float ``[B|1, 1|Hkv|H, Lk]``; ``k``: static Python int >= 1.
    Query row ``i`` keeps the ``k`` keys of largest score among the keys it may
    see (all keys, or the bottom-right causal prefix when ``is_causal``); ties go
    to the lower key index; a row that sees ``<= k`` keys keeps all of them. This
    is :func:`topk_mask` of the scores broadcast over query rows, bit for bit
    (the kernels rank in float32: scores are cast to float32 first). NaN and
    ``-inf`` scores rank below every finite score. The scores get no gradient.

    Pass it as ``mask=`` to :func:`jax_dmattn.attention`. A pytree (``scores``
    is a leaf, ``k`` static), so it crosses ``jit``, ``vmap`` and ``shard_map``.
    """

    scores: Any
    k: int


@dataclasses.dataclass(frozen=True)
class KeyIndices:
    """A sparse mask given by the key indices each query row keeps.

    ``indices``: integer ``[B|1, 1|Hkv|H, Lq|1, K]`` (per query row, as in
    DeepSeek-style sparse attention; a query dim of 1 shares one key set with all
    rows) or ``[B|1, 1|Hkv|H, K]`` (one shared key set). ``-1`` pads; duplicates
    count once; causality still applies on top. Concrete indices outside
    ``[-1, Lk)`` raise a ValueError in :func:`jax_dmattn.attention`; traced ones
    outside ``[0, Lk)`` are ignored like ``-1``. The indices get no gradient.
    """

    indices: Any


jax.tree_util.register_dataclass(TopKMask, data_fields=["scores"], meta_fields=["k"])
jax.tree_util.register_dataclass(KeyIndices, data_fields=["indices"], meta_fields=[])

COMPACT_MASKS = (TopKMask, KeyIndices)
