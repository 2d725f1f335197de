"""The compact masks (``TopKMask``, ``KeyIndices``) from the user's call down to what each kernel reads.

No function here builds anything of size Lq x Lk except ``to_dense``, which only the pure-jnp reference and the
one CUDA fallback documented in docs/compact_masks.md use.

Normal forms (``normalize``; the mask operand of the primitives, always rank 4 so that the batching and sharding
rules treat it like a bool mask: batch dim 0, head dim 1):

- "topk": scores [Bs, Hs, 1, Lk] as given (no gradient) in float32, bfloat16 or float16 (SCORE_DTYPES; others cast
  to float32), and k < Lk (a k >= Lk keeps every visible key: no mask at all). Every consumer ranks their canonical
  float32 form (NaN / -inf as the lowest finite float32, -0.0 as 0.0): XLA consumers through ``canonical_scores``
  (fused into their own passes), the CUDA shared-list builder in the kernel, so that a decoding step pays no pass
  over its scores before the list builder reads them.
- "indices": int32 [Bm, Hm, Mq, K] (Mq = 1 or Lq), each row sorted ascending with duplicates and invalid entries
  (-1, out of range) replaced by INDEX_PAD, which sorts last and never matches a key.

What each kernel reads:

- CPU kernels: "topk" gets per-row thresholds (``topk_row_thresholds``): row i keeps key j iff
  (s_j, -j) >= (t_i, -jt_i) lexicographically, t_i = -inf keeping every key; "indices" reads the sorted rows.
- CUDA kernels: the live-key lists of csrc/cuda/key_lists.h (``cuda_key_lists``), built without any mask: by the
  ``dmattn_topk_key_lists_cuda`` pre-pass for a TopKMask (lists per 128-row query tile under causality, else one
  list per (b, h) that every row shares), by XLA sorts for KeyIndices.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_dmattn import _bounds, _ffi, masks

INDEX_PAD = np.iinfo(np.int32).max
# The pure-jnp reference materialises [B, H, Lq, Lk] float32 logits; past this many scores a compact mask is
# refused there (the kernels never need that array).
REFERENCE_MAX_SCORES = 1 << 31
# A TopKMask under row bounds ranks each row's visible keys in chunks of rows of at most this many scores (64 MiB),
# with candidates gathered per unit of SELECT_ROWS query rows where the bounds allow (bounded_topk).
BOUNDED_TOPK_SCORES = 1 << 24
SELECT_ROWS = 128
# TopKMask score dtypes the normal form keeps (each ranks as its exact float32 value); others are cast to float32.
SCORE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _repeats(x):
    """bool, x's shape: the entry equals the one before it along the last axis (x sorted: a later copy). A pad,
    not a concatenate with a fresh array: under Explicit sharding that array would be unsharded."""
    return jnp.pad(x[..., 1:] == x[..., :-1], [(0, 0)] * (x.ndim - 1) + [(1, 0)], constant_values=False)


def _check_dims(name, shape, dims, with_rows: bool):
    b, h, hkv, lq, _ = dims
    ok = shape[0] in (1, b) and shape[1] in (1, hkv, h) and (not with_rows or shape[2] in (1, lq))
    if not ok:
        rows = ", Lq|1" if with_rows else ""
        raise ValueError(f"{name} of shape {_shape_str(shape)} does not fit [B|1, 1|Hkv|H{rows}, ...] = "
                         f"[{b}|1, 1|{hkv}|{h}{', ' + str(lq) + '|1' if with_rows else ''}, ...]: the batch dim must "
                         f"be 1 or {b}, the head dim 1, {hkv} (kv heads) or {h} (query heads)")


def canonical_scores(scores):
    """float32 ranking scores: what the rankings compare (NaN / -inf rank lowest, -0.0 equals 0.0)."""
    s = masks._canonical_scores(lax.stop_gradient(scores).astype(jnp.float32))
    return s


def _normalize_topk(m: masks.TopKMask, dims):
    b, h, hkv, lq, lk = dims
    k = m.k
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"TopKMask.k must be a static Python int >= 1, got {k!r} of type {type(k).__name__}")
    k = int(k)
    if k < 1:
        raise ValueError(f"TopKMask.k must be >= 1, got {k}")
    s = m.scores
    if not hasattr(s, "shape") or not hasattr(s, "dtype"):
        raise TypeError(f"TopKMask.scores must be an array, got {type(s).__name__}")
    if not jnp.issubdtype(s.dtype, jnp.floating):
        raise TypeError(f"TopKMask.scores must have a floating dtype, got {s.dtype}")
    if s.ndim != 3:
        raise ValueError(f"TopKMask.scores must have rank 3 [B|1, 1|Hkv|H, Lk], got shape {_shape_str(s.shape)}")
    if s.shape[2] != lk:
        raise ValueError(f"TopKMask.scores key dim must be the key length {lk}, got shape {_shape_str(s.shape)}")
    _check_dims("TopKMask.scores", s.shape, dims, with_rows=False)
    if k >= lk:  # every row keeps every key it sees
        return None, "bool", 0
    s = lax.stop_gradient(s)
    if s.dtype not in SCORE_DTYPES:
        s = s.astype(jnp.float32)
    return s[:, :, None, :], "topk", k


def _normalize_indices(m: masks.KeyIndices, dims):
    b, h, hkv, lq, lk = dims
    x = m.indices
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"KeyIndices.indices must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"KeyIndices.indices must have an integer dtype (int32), got {x.dtype}")
    if x.ndim not in (3, 4):
        raise ValueError(f"KeyIndices.indices must have rank 4 [B|1, 1|Hkv|H, Lq|1, K] or rank 3 [B|1, 1|Hkv|H, K], "
                         f"got shape {_shape_str(x.shape)}")
    if x.ndim == 3:
        x = x[:, :, None, :]
    _check_dims("KeyIndices.indices", tuple(x.shape), dims, with_rows=True)
    if not isinstance(x, jax.core.Tracer):
        host = np.asarray(x)
        bad = (host < -1) | (host >= lk)
        if bad.any():
            where = tuple(int(i[0]) for i in np.nonzero(bad))
            raise ValueError(f"KeyIndices.indices must lie in [-1, {lk}) (-1 pads; key length {lk}), got "
                             f"{int(host[where])} at position {where}")
    if x.shape[3] == 0:  # no key anywhere: an all-False mask
        return jnp.zeros((1, 1, 1, 1), jnp.bool_), "bool", 0
    x = x.astype(jnp.int32)
    x = jnp.where((x >= 0) & (x < lk), x, INDEX_PAD)
    x = jnp.sort(x, axis=-1)
    x = jnp.sort(jnp.where(_repeats(x), INDEX_PAD, x), axis=-1)
    return x, "indices", 0


def normalize(m, dims):
    """(mask operand, mask_kind, k) of a TopKMask / KeyIndices for a call of dims (B, H, Hkv, Lq, Lk)."""
    if isinstance(m, masks.TopKMask):
        return _normalize_topk(m, dims)
    return _normalize_indices(m, dims)


# ------------------------------------------------------------------------------------------------ reference
def check_cuda_support(kind: str, k: int, is_causal: bool):
    max_k = _ffi.kernel_facts()["topk_lists_max_k"]
    if kind == "topk" and is_causal and k > max_k:
        raise ValueError(f"TopKMask.k = {k} with is_causal=True exceeds what the CUDA pre-pass holds "
                         f"(k <= {max_k}); use a smaller k or implementation='cpu'")


def check_reference_size(kind: str, b: int, h: int, lq: int, lk: int):
    if kind != "bool" and b * h * lq * lk > REFERENCE_MAX_SCORES:
        raise ValueError(f"implementation='xla' materialises [B, H, Lq, Lk] = {_shape_str((b, h, lq, lk))} scores, "
                         f"too many for a compact mask (> {REFERENCE_MAX_SCORES}); use implementation='cuda' or "
                         f"'cpu', whose kernels never build that array")


def to_dense(mask, kind: str, k: int, *, q_len: int, kv_len: int, is_causal: bool, visible=None):
    """The bool mask [Bm, Hm, Mm, Lk] that a normal-form compact mask stands for (reference and fallbacks).
    ``visible``: the row bounds' bool [Bb, 1, Lq, Lk] (which hold causality): the result keeps only keys inside
    them, and a top-k row picks its k among them."""
    if visible is not None:
        if kind == "topk":
            return masks.topk_mask(mask, k, mask=visible)
        return _bounds.and_masks(to_dense(mask, kind, k, q_len=q_len, kv_len=kv_len, is_causal=False), visible)
    if kind == "bool":
        return mask
    if kind == "topk":
        return masks.topk_mask(mask, k, is_causal=is_causal, query_len=q_len if is_causal else None)
    bm, hm, mq, kk = mask.shape
    dense = jnp.zeros((bm, hm, mq, kv_len + 1), jnp.bool_)
    idx = jnp.minimum(mask, kv_len)  # INDEX_PAD -> the dropped column kv_len
    # iotas, not numpy index arrays: inside custom_partitioning's lowering a captured constant is not allowed
    bi, hi, ri = (lax.broadcasted_iota(jnp.int32, idx.shape, d) for d in range(3))
    dense = dense.at[bi, hi, ri, idx].set(True)
    return dense[..., :kv_len]


# ------------------------------------------------------------------------------------------------ CPU
def _order_key(x):
    """uint32 keys of float32 x whose unsigned order is x's order (-inf lowest; x holds no NaN and no -0.0)."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def kth_best(x, k: int):
    """Per row of x [..., N] (float32, canonical or -inf, 1 <= k <= N), its k-th best entry in (value desc,
    index asc) order: (t [...] float32, jt [...] int32), so that x_j > t or (x_j == t and j <= jt) holds for
    exactly the k best; keep_best builds the k best from it. On CPU a radix select (kth_best_radix), which
    beats lax.top_k's sort there; elsewhere lax.top_k (kth_best_sorted): on an H200 the radix select's
    histogram scatters made a 64K-key decoding step's selection ~0.5 ms slower."""
    return lax.platform_dependent(x, cpu=lambda x: kth_best_radix(x, k), default=lambda x: kth_best_sorted(x, k))


def kth_best_sorted(x, k: int):
    """kth_best by lax.top_k, which keeps ties in index order."""
    values, indices = lax.top_k(x, k)
    return values[..., k - 1], indices[..., k - 1].astype(jnp.int32)


def kth_best_radix(x, k: int):
    """kth_best by a radix select over the value's bits (four 8-bit digits from the top, each a histogram of
    the rows' entries that still tie), O(N) per row."""
    lead = x.shape[:-1]
    key = _order_key(x)
    prefix = jnp.zeros(lead, jnp.uint32)
    need = jnp.full(lead, k, jnp.int32)  # how many of the still-tied entries the k best take
    count = lambda d, m: jnp.zeros((256,), jnp.int32).at[d].add(m)  # noqa: E731
    for _ in lead:  # one histogram per row, batched (no reshape: the rows keep their operand's sharding)
        count = jax.vmap(count)
    for shift in (24, 16, 8, 0):
        top = shift + 8
        tied = (key >> top) == (prefix[..., None] >> top) if top < 32 else jnp.ones_like(key, dtype=bool)
        hist = count(((key >> shift) & 0xFF).astype(jnp.int32), tied.astype(jnp.int32))
        at_least = jnp.flip(jnp.cumsum(jnp.flip(hist, -1), axis=-1), -1)  # tied entries with a digit >= d
        d = jnp.sum(at_least >= need[..., None], axis=-1) - 1
        pick = lambda a: jnp.take_along_axis(a, d[..., None], axis=-1)[..., 0]  # noqa: E731
        need = need - (pick(at_least) - pick(hist))
        prefix = prefix | (d.astype(jnp.uint32) << shift)
    # the need-th (by index) of the entries equal to the k-th value
    equal = key == prefix[..., None]
    last = equal & (jnp.cumsum(equal, axis=-1, dtype=jnp.int32) == need[..., None])
    jt = jnp.argmax(last, axis=-1).astype(jnp.int32)
    t = jnp.take_along_axis(x, jt[..., None], axis=-1)[..., 0]
    return t, jt


def _gather_kept(kept, values, k: int):
    """Per row of kept (bool [..., N], at most k True), the values [..., N] of its kept entries in row order, in k
    slots: int32 [..., k], INDEX_PAD after the last."""
    at = jnp.where(kept, jnp.cumsum(kept, axis=-1, dtype=jnp.int32) - 1, k)
    fill = lambda a, v: jnp.full((k + 1,), INDEX_PAD, jnp.int32).at[a].set(v)[:k]  # noqa: E731
    for _ in range(kept.ndim - 1):
        fill = jax.vmap(fill)
    return fill(at, values)


def keep_best(x, k: int, t, jt):
    """The k best entries' indices of each row of x [..., N], ascending, from kth_best's (t, jt): int32 [..., k],
    INDEX_PAD where fewer than k entries are above -inf."""
    # positions with x's sharding (the batched fill wants equal ones); an iota, which XLA does not fold into a
    # constant of x's size as it does a cumsum of ones
    j = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1, out_sharding=jax.typeof(x).sharding)
    kept = ((x > t[..., None]) | ((x == t[..., None]) & (j <= jt[..., None]))) & (x > -jnp.inf)
    return _gather_kept(kept, j, k)


def topk_row_thresholds(scores, k: int, *, q_len: int, is_causal: bool):
    """Per query row, the k-th best (score, index) of the keys it sees: (t float32 [Bs, Hs, Lq], jt int32
    [Bs, Hs, Lq]); t = -inf where the row sees <= k keys (it keeps them all). scores: normal form [Bs, Hs, 1, Lk]."""
    bs, hs, _, lk = scores.shape
    s = canonical_scores(scores).reshape(bs * hs, lk)
    if not is_causal:
        t, jt = kth_best(s, k)
        t = jnp.broadcast_to(t[:, None], (bs * hs, q_len))
        jt = jnp.broadcast_to(jt[:, None], (bs * hs, q_len))
    else:
        t_prefix, jt_prefix = masks._prefix_kth(s, k, chunk=max(k, 64))
        rows = jnp.clip(jnp.arange(q_len) + (lk - q_len), 0, lk - 1)
        t, jt = t_prefix[:, rows], jt_prefix[:, rows]
    return t.reshape(bs, hs, q_len).astype(jnp.float32), jt.reshape(bs, hs, q_len).astype(jnp.int32)


def bounded_topk(scores, k: int, rows, key_segments, *, form: str):
    """Per query row, its k best keys by (score, lower index) among the keys its row bounds leave it
    (jax_dmattn/_bounds.py), all of them where it sees at most k. ``form`` "thresholds": the k-th best (t float32,
    jt int32), each [B', Hs, Lq] (B' = max(Bs, Bb)), t = -inf where the row sees at most k keys (it keeps them
    all); "indices": the keys, int32 [B', Hs, Lq, k] ascending, INDEX_PAD after the last.
    scores: normal form [Bs, Hs, 1, Lk]; rows int32 [Bb, Lq, 4]; key_segments int32 [Bb, Lk] or None.

    A bounded row's keys are not a prefix of the keys, which the unbounded causal pass relies on. Where every
    unit of SELECT_ROWS rows has bounds that move by at most SELECT_ROWS keys at either end (causality, windows,
    lengths, packed segments; ``_units_cover``), each row chooses among k + 2 * SELECT_ROWS candidates: the top k
    of the range every wide row of its unit sees, and the keys at the unit's two ends (``_by_unit_candidates``).
    Otherwise (segment ids not in contiguous runs, a segment boundary in a non-causal unit) every row ranks all
    Lk keys (``_by_all_keys``). Both go in chunks of at most BOUNDED_TOPK_SCORES scores: no [Lq, Lk] array exists
    whole."""
    s, rows, ks, unit_rows, geometry, covered = _selection_units(scores, rows, key_segments)
    lq = rows.shape[1]

    def by_units():
        return tuple(x[:, :, :lq] for x in _by_unit_candidates(s, unit_rows, ks, k, geometry, form))

    if ks is None:  # every unit is covered (bounded_topk_unit_keys says why)
        return by_units()
    return lax.cond(jnp.all(covered), by_units, lambda: _by_all_keys(s, rows, ks, k, form))


def _selection_units(scores, rows, key_segments):
    """bounded_topk's operands broadcast to one batch B' = max(Bs, Bb): (s [B', Hs, Lk], rows [B', Lq, 4], ks
    [B', Lk] or None, unit_rows [B', U, SELECT_ROWS, 4] (padded rows see no key: lo = hi = 0), the units' candidate
    geometry and whether their candidates cover them (_units_cover))."""
    bs, hs, _, lk = scores.shape
    bb, lq, _ = rows.shape
    b = max(bs, bb)
    s = jnp.broadcast_to(canonical_scores(scores[:, :, 0, :]), (b, hs, lk))
    rows = jnp.broadcast_to(rows, (b, lq, 4))
    ks = None if key_segments is None else jnp.broadcast_to(key_segments, (b, lk))
    units = -(-lq // SELECT_ROWS)
    unit_rows = jnp.pad(rows, [(0, 0), (0, units * SELECT_ROWS - lq), (0, 0)]).reshape(b, units, SELECT_ROWS, 4)
    geometry, covered = _units_cover(unit_rows)
    return s, rows, ks, unit_rows, geometry, covered


def bounded_topk_unit_keys(k: int, key_segments) -> int:
    """A bound on the distinct keys that the rows of one key-list unit keep under bounded_topk, or 0 where there is
    none short of the rows' own k each: with segment ids a unit may need the all-keys route.

    Without segment ids, a row's lo and hi (jax_dmattn/_bounds.py: causality, windows, lengths, each a clipped
    i + constant) grow by at most 1 per row within a batch element, and rows past the query length see no key, so
    the wide rows of a unit of SELECT_ROWS rows spread their lo and hi over fewer than SELECT_ROWS keys and need no
    segment test: every unit is covered (_units_cover), and its rows keep only its k + 2 * SELECT_ROWS candidates.
    A key-list unit of the kernels is a whole number of selection units from row 0."""
    block, _ = _list_geometry()
    if key_segments is not None or block % SELECT_ROWS:
        return 0
    return block // SELECT_ROWS * (k + 2 * SELECT_ROWS)


def _visible(keys, r, ks):
    """bool [..., rows, keys]: row r = (lo, hi, segment, compare) [..., rows, 4] sees key ``keys``."""
    lo, hi, seg, compare = (r[..., t, None] for t in range(4))
    visible = (keys >= lo) & (keys < hi)
    if ks is not None:
        visible = visible & ((compare == 0) | (seg == ks))
    return visible


def _in_chunks(fn, operands, per_item: int):
    """lax.map of ``fn`` over chunks of dim 1 of each operand ([b, n, ...]), at most BOUNDED_TOPK_SCORES scores
    (``per_item`` per element of dim 1) at a time; results [b, hs, n, ...] (fn returns [b, hs, chunk, ...])."""
    n = operands[0].shape[1]
    chunk = max(1, min(n, BOUNDED_TOPK_SCORES // per_item))
    m = -(-n // chunk)
    split = [jnp.moveaxis(jnp.pad(x, [(0, 0), (0, m * chunk - n)] + [(0, 0)] * (x.ndim - 2))
                          .reshape((x.shape[0], m, chunk) + x.shape[2:]), 1, 0) for x in operands]
    out = lax.map(lambda xs: fn(*xs), split)
    # [m, b, hs, chunk, ...] -> [b, hs, m * chunk, ...]
    return tuple(jnp.moveaxis(y, 0, 2).reshape(y.shape[1:3] + (m * chunk,) + y.shape[4:])[:, :, :n] for y in out)


def _by_all_keys(s, rows, ks, k, form):
    b, hs, lk = s.shape
    keys = jnp.arange(lk, dtype=jnp.int32)

    def one(r):  # r [b, chunk, 4] -> the chunk's selection
        visible = _visible(keys, r, None if ks is None else ks[:, None, :])
        # canonical scores are finite, so -inf ranks below every visible key
        x = jnp.where(visible[:, None], s[:, :, None, :], -jnp.inf)
        t, jt = kth_best(x, k)
        if form == "thresholds":  # jt 0 where t = -inf (any key passes), as the other route gives
            return t, jnp.where(t == -jnp.inf, 0, jt)
        return (keep_best(x, k, t, jt),)

    return _in_chunks(one, (rows,), b * hs * lk)


def _units_cover(unit_rows):
    """Per unit of SELECT_ROWS rows ([b, U, R, 4]): its candidate geometry (q_lo, q_hi, left, right, each [b, U]:
    the range Q = [q_lo, q_hi) inside every wide row's range, the first keys of the two end windows of
    SELECT_ROWS keys, left < 0 for none) and whether those candidates hold every row's top k.

    A narrow row (lo >= the unit's largest hi - R) sees only keys of the right window. A wide row sees Q, the keys
    of the left window before it and the keys of the right window after it, provided the wide rows' lo and hi
    each spread over at most R keys and their visible keys are their whole range (no segment test): then a key
    of Q in the row's top k is in Q's top k (Q is a subset of what the row sees), and every other key it sees is
    a window key."""
    r_ = SELECT_ROWS
    lo, hi, compare = unit_rows[..., 0], unit_rows[..., 1], unit_rows[..., 3]
    seen = lo < hi
    big_i = np.iinfo(np.int32).max
    hi_max = jnp.max(jnp.where(seen, hi, 0), axis=-1)
    wide = seen & (lo < hi_max[..., None] - r_)
    any_wide = jnp.any(wide, axis=-1)
    lo_min = jnp.min(jnp.where(wide, lo, big_i), axis=-1)
    lo_max = jnp.max(jnp.where(wide, lo, -1), axis=-1)
    hi_min = jnp.min(jnp.where(wide, hi, big_i), axis=-1)
    covered = ~any_wide | ((lo_max - lo_min <= r_) & (hi_max - hi_min <= r_)
                           & jnp.all(~wide | (compare == 0), axis=-1))
    q_lo, q_hi = jnp.where(any_wide, lo_max, 0), jnp.where(any_wide, hi_min, 0)
    left = jnp.where(any_wide, lo_min, -1)
    return (q_lo, q_hi, left, hi_max - r_), covered


def _by_unit_candidates(s, unit_rows, ks, k, geometry, form):
    b, hs, lk = s.shape
    r_ = SELECT_ROWS
    keys = jnp.arange(lk, dtype=jnp.int32)
    window = jnp.arange(r_, dtype=jnp.int32)

    def one(r, q_lo, q_hi, left, right):  # r [b, u, R, 4]; the others [b, u]
        in_q = (keys >= q_lo[..., None]) & (keys < q_hi[..., None])
        in_q_scores = jnp.where(in_q[:, None], s[:, :, None, :], -jnp.inf)
        q_idx = keep_best(in_q_scores, k, *kth_best(in_q_scores, k))  # Q's top k, ascending, INDEX_PAD after
        lw = left[..., None] + window
        lw = jnp.where((left[..., None] >= 0) & (lw < lk), lw, lk)
        rw = right[..., None] + window
        rw = jnp.where((rw >= 0) & (rw < lk), rw, lk)
        # the windows take the heads' dim by a sum, not broadcast_to, so that they carry q_idx's sharding
        # (concatenate wants equal ones under Explicit axes)
        heads = jnp.zeros_like(q_idx[..., :1])
        cand = jnp.concatenate([jnp.minimum(q_idx, lk), lw[:, None] + heads, rw[:, None] + heads], axis=-1)
        # by key, each key once; lk marks no key
        cand = jnp.sort(cand, axis=-1)
        cand = jnp.where(_repeats(cand), lk, cand)
        safe = jnp.minimum(cand, lk - 1)
        score = jnp.where(cand < lk, jnp.take_along_axis(s[:, :, None, :], safe, axis=-1), -jnp.inf)
        # ks spread over the heads' dim first: a gather whose operand and indices share their sharding
        cand_ks = None if ks is None else jnp.take_along_axis(ks[:, None, None, :] + heads, safe, axis=-1)[
            ..., None, :]
        visible = _visible(cand[:, :, :, None, :], r[:, None], cand_ks) & (cand < lk)[:, :, :, None, :]
        # One ranking per unit, (score desc, key asc); a row keeps its first k visible candidates in that order:
        # a running count, no ranking per row.
        slot = lax.broadcasted_iota(jnp.int32, cand.shape, 3) + heads
        neg, by_rank, perm = lax.sort((-score, cand, slot), dimension=3, num_keys=2)
        seen_by_rank = jnp.take_along_axis(visible, perm[:, :, :, None, :], axis=-1)
        count = jnp.cumsum(seen_by_rank, axis=-1, dtype=jnp.int32)
        if form == "thresholds":
            kth = seen_by_rank & (count == k)
            has = jnp.any(kth, axis=-1)
            at = jnp.argmax(kth, axis=-1)[..., None]
            t = jnp.take_along_axis(jnp.broadcast_to(-neg[:, :, :, None, :], kth.shape), at, axis=-1)[..., 0]
            jt = jnp.take_along_axis(jnp.broadcast_to(by_rank[:, :, :, None, :], kth.shape), at, axis=-1)[..., 0]
            return jnp.where(has, t, -jnp.inf), jnp.where(has, jt, 0)
        kept_by_rank = seen_by_rank & (count <= k)
        # back to key order (perm's inverse), where the kept keys fill the row's k slots in ascending order
        _, inverse = lax.sort((perm, slot), dimension=3, num_keys=1)
        kept = jnp.take_along_axis(kept_by_rank, inverse[:, :, :, None, :], axis=-1)
        return (_gather_kept(kept, jnp.broadcast_to(cand[:, :, :, None, :], kept.shape), k),)

    per_item = b * hs * max(lk, r_ * (k + 2 * r_))
    out = _in_chunks(one, (unit_rows,) + tuple(geometry), per_item)
    # [b, hs, U, R, ...] -> [b, hs, U * R, ...]
    return tuple(x.reshape((b, hs, -1) + x.shape[4:]) for x in out)


def bounded_topk_indices(scores, k: int, rows, key_segments):
    """A normal-form KeyIndices operand [B', Hs, Lq, k] of a TopKMask under row bounds: each row's own top k."""
    return bounded_topk(scores, k, rows, key_segments, form="indices")[0]


def cpu_operands(mask, kind: str, k: int, *, q_len: int, is_causal: bool, rows=None, key_segments=None):
    """(mask, row_threshold, row_threshold_key) operands of the CPU targets for a normal-form mask. With row
    bounds (``rows``) a top-k row's threshold is its k-th best among the keys the bounds leave it."""
    if kind != "topk":
        return mask, jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.int32)
    # The CPU kernels compare the canonical scores with the thresholds; the rankings canonicalise the same scores
    # themselves (one expression, which XLA computes once).
    scores = canonical_scores(mask)
    if rows is not None:
        t, jt = bounded_topk(mask, k, rows, key_segments, form="thresholds")
        # the scores' batch grows to the thresholds': the kernels' tile classes read both on one grid
        return jnp.broadcast_to(scores, (t.shape[0],) + scores.shape[1:]), t, jt
    t, jt = topk_row_thresholds(mask, k, q_len=q_len, is_causal=is_causal)
    return scores, t, jt


# ------------------------------------------------------------------------------------------------ CUDA
def _list_geometry():
    """(query rows per key-list unit, keys per bit word) of the kernels (csrc/kernel_facts.h)."""
    facts = _ffi.kernel_facts()
    return facts["key_list_block_m"], facts["key_list_chunk"]


def _words_from_positions(valid):
    """Bit words (uint32 pairs, little end first) of a bool [..., C] with C % 64 == 0: [..., C / 64, 2]."""
    *lead, c = valid.shape
    bits = valid.reshape(*lead, c // 64, 2, 32).astype(jnp.uint32)
    return jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def _shared_lists(sorted_keys, count, capacity: int):
    """Lists of one key set per unit (a row-broadcast unit, rows_per_unit = 1): sorted_keys [N, >= capacity] with
    the count valid keys first. Returns (keys int32 [N * (1 + C)], bits uint32 [N * C / 64 * 1 * 2])."""
    listed = sorted_keys[:, :capacity]
    listed = jnp.where(jnp.arange(capacity) < count[:, None], listed, 0)
    keys = jnp.concatenate([count[:, None].astype(jnp.int32), listed.astype(jnp.int32)], axis=1)
    valid = jnp.arange(capacity)[None, :] < count[:, None]
    bits = _words_from_positions(valid)  # [N, C / 64, 2]: one row per unit
    return keys.reshape(-1), bits.reshape(-1)


def _pad_keys(x, width: int):
    if x.shape[-1] >= width:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])], constant_values=INDEX_PAD)


def _unit_bits(pos, kept, chunks: int):
    """One unit's bit words [chunks, rows, 2] uint32 (csrc/cuda/key_lists.h): row r's bit of list position pos[r, e]
    where kept[r, e] (pos, kept: [rows, E]; several entries may name one position)."""
    rows = kept.shape[0]
    size = chunks * rows * 2
    r = jnp.arange(rows, dtype=jnp.int32)[:, None]
    at = jnp.where(kept, ((pos // 64) * rows + r) * 2 + (pos % 64) // 32, size)  # past the end: dropped
    vals = jnp.where(kept, jnp.uint32(1) << (pos % 32).astype(jnp.uint32), jnp.uint32(0))
    return jnp.zeros((size,), jnp.uint32).at[at.reshape(-1)].add(vals.reshape(-1), mode="drop").reshape(
        chunks, rows, 2)


def _per_row_index_lists(idx, q_len: int, kv_len: int, unit_keys: int = 0):
    """Lists of per-row indices [Bm, Hm, Lq, K] (normal form): per 128-row unit, the union of its rows' keys, of at
    most unit_keys keys where that is known (> 0)."""
    bm, hm, lq, kk = idx.shape
    BLOCK, CHUNK = _list_geometry()
    rows = min(lq, BLOCK)
    t = -(-lq // BLOCK)
    capacity = min(_round_up(rows * kk, CHUNK), _round_up(kv_len, CHUNK))
    if unit_keys > 0:
        capacity = min(capacity, _round_up(unit_keys, CHUNK))
    n, m = bm * hm * t, rows * kk
    # units first, then each unit's entries: one reshape that splits the rows' dim would lose the units' sharding
    x = jnp.pad(idx, [(0, 0), (0, 0), (0, t * rows - lq), (0, 0)], constant_values=INDEX_PAD)
    x = x.reshape(n, rows, kk).reshape(n, m)
    # One sort of each unit's entries, carrying where each came from: a key's first copy opens its slot in the
    # union (a running count), and every copy takes that slot back to its row as the bit's position. The origins
    # take x's sharding by a sum (sort wants equal ones under Explicit axes).
    origin = lax.broadcasted_iota(jnp.int32, (n, m), 1) + jnp.zeros_like(x)
    sorted_keys, came_from = lax.sort((x, origin), dimension=1, num_keys=1)
    opens = ~_repeats(sorted_keys) & (sorted_keys != INDEX_PAD)
    slot = jnp.cumsum(opens, axis=1, dtype=jnp.int32) - 1
    count = jnp.sum(opens, axis=1, dtype=jnp.int32)
    put = jax.vmap(lambda at, v: jnp.zeros((capacity,), jnp.int32).at[at].set(v, mode="drop"))
    union = put(jnp.where(opens, slot, capacity), sorted_keys)  # ascending; 0 past the count
    keys = jnp.concatenate([count[:, None], union], axis=1)
    pos = jax.vmap(lambda at, v: jnp.zeros((m,), jnp.int32).at[at].set(v))(came_from, slot).reshape(n, rows, kk)
    # one scatter per unit, so that the units' dim keeps its sharding
    bits = jax.vmap(lambda p, valid: _unit_bits(p, valid, capacity // CHUNK))(pos, (x != INDEX_PAD).reshape(
        n, rows, kk))
    return keys.reshape(-1), bits.reshape(-1)


def cuda_bounded_topk_lists(scores, k: int, rows, key_segments, *, kv_len: int):
    """Live-key lists of a normal-form TopKMask [Bs, Hs, 1, Lk] under row bounds (rows [Bb, Lq, 4], key_segments
    [Bb, Lk] or None), as cuda_key_lists gives them, and whether they failed: a traced bool, or None where they
    cannot. One dmattn_topk_bounded_key_lists_cuda call (csrc/cuda/topk_bounded_key_lists.h): without segment ids
    a unit holds at most k + 2 * spread keys (k with one query row: each element's list is the top k of its key
    range); with them the capacity is 2 k + 4 * spread, which packed sequences never outgrow (a unit meets at most
    two long segments), and True says some unit did: per_row_topk_lists then serves the call. A k above the
    pre-pass's largest takes per_row_topk_lists (and None)."""
    from jax_dmattn import _cuda_fwd

    facts = _ffi.kernel_facts()
    if k > facts["topk_bounded_lists_max_k"]:
        return per_row_topk_lists(scores, k, rows, key_segments, kv_len=kv_len), None
    segments = key_segments is not None
    capacity = _ffi.extension().topk_bounded_list_capacity(k, rows.shape[1], segments, kv_len)
    s = scores[:, :, 0, :].astype(jnp.float32)  # the kernels rank the canonical form themselves
    keys, bits = _cuda_fwd.build_topk_bounded_key_lists(s, rows, key_segments, k=k, capacity=capacity,
                                                        may_overflow=segments)
    lists = keys, bits, (max(s.shape[0], rows.shape[0]), s.shape[1], rows.shape[1])
    if not segments:
        return lists, None
    return lists, jnp.any(keys.reshape(-1, 1 + capacity)[:, 0] == _cuda_fwd.KEY_LIST_DENSE)


def per_row_topk_lists(scores, k: int, rows, key_segments, *, kv_len: int):
    """Live-key lists of a TopKMask under row bounds from each row's own k keys (bounded_topk_indices, in XLA):
    O(Lq * k) numbers and lists of up to min(128 k, Lk) keys per unit with segment ids (bounded_topk_unit_keys
    otherwise). The route of a k above the bounded pre-pass's largest, and of a call whose units outgrow it."""
    idx = bounded_topk_indices(scores, k, rows, key_segments)
    keys, bits = _per_row_index_lists(idx, rows.shape[1], kv_len, bounded_topk_unit_keys(k, key_segments))
    return keys, bits, idx.shape[:3]


def cuda_key_lists(mask, kind: str, k: int, *, q_len: int, kv_len: int, is_causal: bool):
    """Live-key lists (csrc/cuda/key_lists.h layout) of a normal-form compact mask without row bounds, built
    without any mask: (keys int32, bits uint32 pairs, (Bm, Hm, Mm) the unit geometry, Mm = Lq or 1 for a
    row-broadcast list)."""
    from jax_dmattn import _cuda_fwd

    BLOCK, CHUNK = _list_geometry()
    bm, hm = mask.shape[:2]
    if kind == "topk":
        s = mask[:, :, 0, :]  # the shared builder ranks these scores' canonical form itself
        # One query row under bottom-right causality sees every key: its list is the shared one.
        if is_causal and q_len > 1:
            s = canonical_scores(s)
            # the iota takes the scores' sharding by a sum (sort wants equal ones under Explicit axes)
            iota = lax.broadcasted_iota(jnp.int32, s.shape, 2) + jnp.zeros_like(s, jnp.int32)
            _, order = lax.sort((-s, iota), dimension=2, num_keys=1, is_stable=True)
            capacity = min(_round_up(k + BLOCK - 1, CHUNK), _round_up(kv_len, CHUNK))
            keys, bits = _cuda_fwd.build_topk_key_lists(s, order, k=k, q_len=q_len, capacity=capacity)
            return keys, bits, (bm, hm, q_len)
        keys, bits = _cuda_fwd.build_topk_key_lists(s, None, k=k, q_len=q_len, capacity=_round_up(k, CHUNK))
        return keys, bits, (bm, hm, 1)
    mq, kk = mask.shape[2:]
    if mq == 1:
        capacity = min(_round_up(kk, CHUNK), _round_up(kv_len, CHUNK))
        x = _pad_keys(mask.reshape(bm * hm, kk), capacity)
        count = jnp.sum(x != INDEX_PAD, axis=-1, dtype=jnp.int32)
        keys, bits = _shared_lists(x, count, capacity)
        return keys, bits, (bm, hm, 1)
    keys, bits = _per_row_index_lists(mask, q_len, kv_len)
    return keys, bits, (bm, hm, q_len)
