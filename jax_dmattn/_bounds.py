"""Segment ids, a local window and sequence lengths as per-row key bounds: O(B * (Lq + Lk)) numbers that every
implementation applies in-kernel, never an [Lq, Lk] mask (docs/sequences.md).

The bounds operand of the primitives is int32 ``rows`` [Bb, Lq, 4] (Bb = 1 or B): per query row i the key range
[lo_i, hi_i), its segment id and whether that id must be compared. Row i keeps key j iff lo_i <= j < hi_i and,
where it compares, its segment id equals key j's (``key_segments`` [Bb, Lk]). A row compares only where its range
does not already hold its segment exactly (ids not in contiguous runs), so the kernels load no key ids for packed
sequences. lo and hi are non-decreasing in i: the kernels find the keys of a query
tile and the query rows of a key tile from the first and last rows alone (or by bisection).

What goes into them:
- causality, bottom-right on each batch element's own lengths: row i sees key j iff
  j <= i + kv_len_b - q_len_b. With no lengths that is the kernels' own rule (kv_len_b = Lk, q_len_b = Lq); with
  key lengths alone q_len_b = min(Lq, kv_len_b), so that decoding (the query rows are the last ones) and padded
  prefill (query and keys padded alike) both come out right.
- the window (left, right) around that same diagonal: i + off_b - left <= j <= i + off_b + right;
- key lengths: j < kv_len_b; query lengths: rows i >= q_len_b keep no key (output 0, lse -inf, zero gradients);
- segment ids: where each key id of an element forms one contiguous run (packed documents, a padding id at the
  end included) and the runs come in the query rows' order, the segment's key span narrows [lo, hi) and no id is
  compared; otherwise the kernels' id comparison alone applies, so any ids are exact.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["RowBounds", "make_row_bounds", "dense_keep", "filter_key_indices"]


@dataclasses.dataclass(frozen=True)
class RowBounds:
    rows: jax.Array                  # int32 [Bb, Lq, 4]: lo, hi, query segment id, compare (0 / 1)
    key_segments: jax.Array | None   # int32 [Bb, Lk], or None without segment ids


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_int_array(name, x, shape_desc, shape):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an integer array {shape_desc}, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
        raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {shape_desc} = {_shape_str(shape)}, got {_shape_str(x.shape)}")
    return jnp.asarray(x).astype(jnp.int32)


def check_window(local_window_size):
    """(left, right) static non-negative ints, or None. An int w is (w, w), as in jax.nn.dot_product_attention."""
    if local_window_size is None:
        return None
    w = local_window_size
    if isinstance(w, (int, np.integer)) and not isinstance(w, (bool, np.bool_)):
        w = (w, w)
    if (not isinstance(w, (tuple, list)) or len(w) != 2
            or any(isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) for x in w)):
        raise TypeError(f"local_window_size must be a static int or a pair (left, right) of ints, got "
                        f"{local_window_size!r}")
    left, right = int(w[0]), int(w[1])
    if left < 0 or right < 0:
        raise ValueError(f"local_window_size must be >= 0 on both sides, got ({left}, {right})")
    return left, right


def any_given(*xs) -> bool:
    return any(x is not None for x in xs)


def _non_decreasing(x):
    """[B, L] -> bool [B]: the row is non-decreasing."""
    return jnp.all(x[:, 1:] >= x[:, :-1], axis=1) if x.shape[1] > 1 else jnp.ones(x.shape[:1], bool)


def _whole_positions(ids):
    """Segment ids [B, L] with their position dim whole on every device where an Explicit-axes mesh splits it (a
    sequence split: context parallelism): the spans sort the key ids and compare them with the query ids, which
    wants every position in one sharding; O(B * L) ints."""
    sharding = jax.typeof(ids).sharding
    spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
    if spec is None or len(spec) < 2 or spec[1] is None:
        return ids
    split = spec[1] if isinstance(spec[1], tuple) else (spec[1],)
    explicit = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ())))
    if not all(explicit.get(a) == jax.sharding.AxisType.Explicit for a in split):
        return ids
    return jax.sharding.reshard(ids, jax.sharding.PartitionSpec(spec[0], None))


def _segment_spans(q_seg, kv_seg):
    """Per query row, the key span [lo, hi) of its segment id (int32 [B, Lq] each) and whether the spans are exact
    and usable as row bounds (bool [B, 1]): each key id forms one contiguous run (packed documents, padding ids
    included, in any order) and the spans are non-decreasing over the rows. A row whose id no key has gets an
    empty span at the end of the previous row's."""
    lk = kv_seg.shape[1]
    # positions with kv_seg's sharding (sort wants equal ones); an iota, which XLA does not constant-fold as it
    # does a cumsum of ones
    iota = jax.lax.broadcasted_iota(kv_seg.dtype, kv_seg.shape, 1, out_sharding=jax.typeof(kv_seg).sharding)
    # stable: within one id the positions stay ascending, so the first and last of a run are its ends
    ids, pos = jax.lax.sort((kv_seg, iota), dimension=1, num_keys=1, is_stable=True)
    runs = jnp.sum(kv_seg[:, 1:] != kv_seg[:, :-1], axis=1)
    distinct = jnp.sum(ids[:, 1:] != ids[:, :-1], axis=1)
    contiguous = runs == distinct
    # method="sort": the default's scan does not trace under an Explicit-axes mesh
    find = lambda side: jax.vmap(lambda s, x: jnp.searchsorted(s, x, side=side, method="sort"))  # noqa: E731
    first = find("left")(ids, q_seg).astype(jnp.int32)
    end = find("right")(ids, q_seg).astype(jnp.int32)
    present = end > first
    take = lambda at: jnp.take_along_axis(pos, jnp.clip(at, 0, lk - 1), axis=1)  # noqa: E731
    run_lo, run_hi = take(first), take(end - 1) + 1
    fill = jax.lax.cummax(jnp.where(present, run_hi, 0), axis=1)
    span_lo = jnp.where(present, run_lo, fill)
    span_hi = jnp.where(present, run_hi, fill)
    exact = contiguous & _non_decreasing(span_lo) & _non_decreasing(span_hi)
    return span_lo, span_hi, exact[:, None]


def make_row_bounds(*, batch: int, q_len: int, kv_len: int, is_causal: bool, q_segment_ids=None,
                    kv_segment_ids=None, local_window_size=None, query_seq_lengths=None,
                    key_value_seq_lengths=None) -> RowBounds | None:
    """The RowBounds of one call (validated), or None when none of the five arguments is given. Causality is
    folded in, so the kernels of a call with bounds apply no causal rule of their own."""
    window = check_window(local_window_size)
    if not any_given(q_segment_ids, kv_segment_ids, window, query_seq_lengths, key_value_seq_lengths):
        return None
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    b, lq, lk = batch, q_len, kv_len
    q_seg = kv_seg = None
    if q_segment_ids is not None:
        q_seg = check_int_array("q_segment_ids", q_segment_ids, "[batch, q_len]", (b, lq))
        kv_seg = check_int_array("kv_segment_ids", kv_segment_ids, "[batch, kv_len]", (b, lk))
        q_seg, kv_seg = _whole_positions(q_seg), _whole_positions(kv_seg)
    q_lens = kv_lens = None
    if query_seq_lengths is not None:
        q_lens = jnp.clip(check_int_array("query_seq_lengths", query_seq_lengths, "[batch]", (b,)), 0, lq)
    if key_value_seq_lengths is not None:
        kv_lens = jnp.clip(check_int_array("key_value_seq_lengths", key_value_seq_lengths, "[batch]", (b,)), 0, lk)
    per_batch = any_given(q_seg, q_lens, kv_lens)
    bb = b if per_batch else 1

    i = jnp.arange(lq, dtype=jnp.int32)[None, :]                     # [1, Lq]
    kv_b = (jnp.full((bb,), lk, jnp.int32) if kv_lens is None else kv_lens)[:, None]
    if q_lens is not None:
        q_b = q_lens[:, None]
    elif kv_lens is not None:
        q_b = jnp.minimum(lq, kv_b)
    else:
        q_b = jnp.full((bb, 1), lq, jnp.int32)
    off = kv_b - q_b                                                  # the diagonal of each element
    # zeros_like: every field carries the lengths' sharding (stack wants equal ones under Explicit axes)
    hi = jnp.broadcast_to(kv_b, (bb, lq)) + jnp.zeros_like(i)
    lo = jnp.zeros_like(hi)
    if is_causal:
        hi = jnp.minimum(hi, i + off + 1)
    if window is not None:
        left, right = window
        lo = jnp.maximum(lo, i + off - left)
        hi = jnp.minimum(hi, i + off + right + 1)
    seg = compare = jnp.zeros_like(hi)
    if q_seg is not None:
        seg = q_seg
        span_lo, span_hi, narrow = _segment_spans(q_seg, kv_seg)
        lo = jnp.where(narrow, jnp.maximum(lo, span_lo), lo)
        hi = jnp.where(narrow, jnp.minimum(hi, span_hi), hi)
        compare = jnp.broadcast_to(jnp.where(narrow, 0, 1), (bb, lq)).astype(jnp.int32)
    lo = jnp.clip(lo, 0, lk)
    hi = jnp.clip(hi, 0, lk)
    if q_lens is not None:
        # Rows past the length keep no key. Their empty range sits at the last live row's upper end, so lo and hi
        # stay non-decreasing.
        last = jnp.clip(q_lens - 1, 0, max(lq - 1, 0))[:, None]
        end = jnp.where(q_lens[:, None] > 0,
                        jnp.maximum(jnp.take_along_axis(lo, last, 1), jnp.take_along_axis(hi, last, 1)), 0)
        dead = i >= q_b
        lo = jnp.where(dead, end, lo)
        hi = jnp.where(dead, end, hi)
    rows = jnp.stack([lo, hi, seg, compare], axis=-1).astype(jnp.int32)
    return RowBounds(rows=jax.lax.stop_gradient(rows),
                     key_segments=None if kv_seg is None else jax.lax.stop_gradient(kv_seg))


def dense_keep(bounds: RowBounds, kv_len: int):
    """bool [Bb, 1, Lq, Lk]: the keys each row keeps (the reference's mask; O(Lq * Lk), nothing else builds it)."""
    j = jnp.arange(kv_len, dtype=jnp.int32)
    lo, hi, seg, compare = (bounds.rows[..., t, None] for t in range(4))
    keep = (j >= lo) & (j < hi)
    if bounds.key_segments is not None:
        keep = keep & ((compare == 0) | (seg == bounds.key_segments[:, None, :]))
    return keep[:, None]


def and_masks(a, b):
    """The intersection of two rank-4 bool masks (None: keeps everything)."""
    if a is None:
        return b
    if b is None:
        return a
    return jnp.logical_and(a, b)


def filter_key_indices(indices, bounds: RowBounds, pad: int):
    """A normal-form KeyIndices operand int32 [Bm, Hm, Mq, K] with every key outside the bounds replaced by ``pad``,
    rows re-sorted: [max(Bm, Bb), Hm, Lq, K]. The CUDA key-list kernels, which take no bounds, read this."""
    bm, hm, _, kk = indices.shape
    bb, lq, _ = bounds.rows.shape
    b = max(bm, bb)
    idx = jnp.broadcast_to(indices, (b, hm, lq, kk))
    rows = jnp.broadcast_to(bounds.rows, (b, lq, 4))
    lo, hi, seg, compare = (rows[:, None, :, t, None] for t in range(4))
    keep = (idx >= lo) & (idx < hi)
    if bounds.key_segments is not None:
        ks = jnp.broadcast_to(bounds.key_segments, (b, bounds.key_segments.shape[1]))
        key_seg = jax.vmap(lambda k, ix: k[ix])(ks, jnp.clip(idx, 0, ks.shape[1] - 1))
        keep = keep & ((compare == 0) | (key_seg == seg))
    return jnp.sort(jnp.where(keep, idx, pad), axis=-1).astype(jnp.int32)
