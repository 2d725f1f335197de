"""dmattn_topk_bounded_key_lists_cuda: the live-key lists (csrc/cuda/key_lists.h layout) of a TopKMask under row
bounds (segment ids, windows, sequence lengths), built from the scores and the bounds (csrc/cuda/topk_bounded_key_lists.h).

The lists are decoded into a dense mask in numpy and compared, bit for bit, with each row's k best keys (score desc,
index asc) among the keys its bounds leave it, ranked in numpy. Scores: continuous, and coarse (a few distinct
values, so the index tie-break decides). A unit whose keys outgrow the capacity is marked (count kKeyListDense):
with segment ids in contiguous runs on queries and keys alike (packed sequences) that never happens at the capacity
the library passes, and where it happens the other units must still be exact. GPU only (skipped elsewhere).
"""
from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import cuda_kernel_marks, packed_segments, seed_from  # noqa: E402

from jax_dmattn import _bounds, _compact, _cuda_fwd, _ffi  # noqa: E402

pytestmark = cuda_kernel_marks(_cuda_fwd.TOPK_BOUNDED_KEY_LISTS_TARGET)

BLOCK_M, CHUNK = _ffi.kernel_facts()["key_list_block_m"], _ffi.kernel_facts()["key_list_chunk"]
DENSE = _ffi.kernel_facts()["key_list_dense"]


def reference(scores, visible, k):
    """bool [B', Hs, Lq, Lk]: per row its k best keys by (score desc, index asc) among ``visible`` [Bb, 1, Lq, Lk]."""
    b_, hs, lk = scores.shape[0], scores.shape[1], scores.shape[2]
    bb, _, lq, _ = visible.shape
    b_ = max(b_, bb)
    out = np.zeros((b_, hs, lq, lk), bool)
    for b, h, i in np.ndindex(b_, hs, lq):
        seen = np.nonzero(visible[b if bb > 1 else 0, 0, i])[0]
        s = scores[b if scores.shape[0] > 1 else 0, h, seen]
        order = seen[np.lexsort((seen, -s))]
        out[b, h, i, order[:k]] = True
    return out


def decode(keys, bits, geometry, lq, lk):
    """(dense [B', Hs, Lq, Lk] of the listed units, bool [B', Hs, Lq] rows whose unit is marked over capacity),
    checking that each list is strictly ascending and inside [0, Lk)."""
    bm, hm, mm = geometry
    t = -(-mm // BLOCK_M)
    units = bm * hm * t
    keys, bits = np.asarray(keys), np.asarray(bits).view(np.uint64)
    cap = keys.size // units - 1
    rows = min(mm, BLOCK_M)
    keys = keys.reshape(units, 1 + cap)
    bits = bits.reshape(units, cap // CHUNK, rows)
    dense = np.zeros((bm * hm, t * BLOCK_M, lk), bool)
    marked = np.zeros((bm * hm, t * BLOCK_M), bool)
    shifts = np.arange(CHUNK, dtype=np.uint64)[None, :, None]
    for u in range(units):
        bh, ti = divmod(u, t)
        count = int(keys[u, 0])
        if count == DENSE:
            marked[bh, ti * BLOCK_M:(ti + 1) * BLOCK_M] = True
            continue
        assert 0 <= count <= cap, (u, count)
        listed = keys[u, 1:1 + count]
        assert np.all((listed >= 0) & (listed < lk)), u
        assert np.all(np.diff(listed) > 0), f"unit {u}: list not strictly ascending"
        kept = ((bits[u][:, None, :] >> shifts) & np.uint64(1)).astype(bool).reshape(cap, rows)
        assert not kept[count:].any(), f"unit {u}: bits past the count"
        dense[bh, ti * BLOCK_M:ti * BLOCK_M + rows][:, listed] = kept[:count].T
        # every listed key is kept by some row of the unit
        assert kept[:count].any(axis=1).all(), f"unit {u}: a listed key no row keeps"
    return dense[:, :mm].reshape(bm, hm, mm, lk), marked[:, :mm].reshape(bm, hm, mm)


def make_scores(rng, shape, kind):
    if kind == "coarse":
        return np.round(rng.standard_normal(shape) * 1.5).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def check(seed_text, *, b=2, hs=2, lq, lk, k, score_batch=None, kind="continuous", expect_listed=True, **bounds_kw):
    rng = np.random.default_rng(seed_from(seed_text))
    is_causal = bounds_kw.pop("is_causal", True)
    segments = bounds_kw.pop("segments", None)
    if segments is not None:
        q_ids, kv_ids = segments(rng)
        bounds_kw.update(q_segment_ids=jnp.asarray(q_ids), kv_segment_ids=jnp.asarray(kv_ids))
    bounds = _bounds.make_row_bounds(batch=b, q_len=lq, kv_len=lk, is_causal=is_causal, **bounds_kw)
    scores = make_scores(rng, (score_batch or b, hs, lk), kind)
    s = _compact.canonical_scores(jnp.asarray(scores))
    lists, failed = _compact.cuda_bounded_topk_lists(s[:, :, None], k, bounds.rows, bounds.key_segments, kv_len=lk)
    got, marked = decode(*lists, lq, lk)
    assert (failed is None) == (bounds.key_segments is None)
    if failed is not None:
        assert bool(failed) == bool(marked.any())
    if expect_listed:
        assert not marked.any(), "a unit outgrew the capacity"
    want = reference(np.asarray(s), np.asarray(_bounds.dense_keep(bounds, lk)), k)
    got, want = got[~marked], want[~marked]
    bad = np.argwhere(got != want)
    assert bad.size == 0, f"{len(bad)} bits differ, first at (row, key) {bad[:5].tolist()}"


def packed(docs, *, cross=False):
    """Sorted ids: the same documents on queries and keys (self-attention), or with cross=True key documents of
    other lengths (their runs still in the queries' order)."""
    def make(rng, b, lq, lk):
        q = packed_segments(rng, b, lq, docs)
        kv = packed_segments(rng, b, lk, docs) if cross or lk != lq else q
        return q, kv
    return make


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("docs, k", [(3, 20), (9, 7), (40, 30)])
def test_packed_documents(causal, docs, k):
    lq = lk = 700
    check(f"bounded::packed::{causal}::{docs}::{k}", lq=lq, lk=lk, k=k, is_causal=causal,
          segments=lambda rng: packed(docs)(rng, 2, lq, lk), kind="coarse")


@pytest.mark.parametrize("window, causal, lq, lk", [
    ((50, 0), True, 900, 900), ((100, 100), False, 300, 500), ((0, 0), False, 260, 260), ((300, 7), True, 130, 640),
])
def test_windows(window, causal, lq, lk):
    check(f"bounded::window::{window}::{causal}", lq=lq, lk=lk, k=24, is_causal=causal, local_window_size=window)


@pytest.mark.parametrize("lq, lk, q_lens, kv_lens, causal", [
    (400, 400, (400, 170), (400, 170), True),
    (1, 3000, None, (3000, 77), True),
    (5, 900, None, (900, 300), True),
    (300, 520, (0, 300), (520, 1), False),
    (200, 90, None, None, True),
])
def test_lengths(lq, lk, q_lens, kv_lens, causal):
    kw = {}
    if q_lens is not None:
        kw["query_seq_lengths"] = jnp.asarray(q_lens, jnp.int32)
    kw["key_value_seq_lengths"] = jnp.asarray(kv_lens if kv_lens is not None else (lk, lk - 13), jnp.int32)
    check(f"bounded::lengths::{lq}::{lk}::{causal}", lq=lq, lk=lk, k=16, is_causal=causal, kind="coarse", **kw)


@pytest.mark.parametrize("k", [1, 64, 200])
def test_windows_with_packed_documents_and_lengths(k):
    lq = lk = 640
    check(f"bounded::mixed::{k}", lq=lq, lk=lk, k=k, local_window_size=(90, 0),
          segments=lambda rng: packed(6)(rng, 2, lq, lk), query_seq_lengths=jnp.asarray([640, 500], jnp.int32),
          key_value_seq_lengths=jnp.asarray([640, 500], jnp.int32))


@pytest.mark.parametrize("causal", [True, False])
def test_unsorted_ids_and_cross_documents_are_exact_or_marked(causal):
    """Ids not in contiguous runs (every row compares) and key documents longer than the query ones can outgrow the
    capacity; units that fit are still exact, and the failure flag says whether any did not."""
    lq, lk = 300, 800
    check(f"bounded::unsorted::{causal}", lq=lq, lk=lk, k=40, is_causal=causal, expect_listed=False,
          segments=lambda rng: (rng.integers(0, 4, (2, lq)).astype(np.int32),
                                rng.integers(0, 4, (2, lk)).astype(np.int32)))
    check(f"bounded::cross::{causal}", lq=lq, lk=lk, k=150, is_causal=causal, expect_listed=False,
          segments=lambda rng: packed(60, cross=True)(rng, 2, lq, lk))


def test_large_k_and_scores_shared_over_the_batch():
    lq = lk = 2100
    check("bounded::large-k", b=2, hs=1, lq=lq, lk=lk, k=1500, score_batch=1, kind="coarse",
          segments=lambda rng: packed(2)(rng, 2, lq, lk))


@pytest.mark.parametrize("lk, k, kind, score_batch, window", [
    (70001, 2048, "continuous", None, None),   # several steps a member, teams of CTAs, an unaligned length
    (70000, 300, "coarse", 1, None),           # scores shared over the batch, the index tie-break
    (9000, 700, "continuous", None, (3000, 0)),  # a causal window: the range starts past 0
    (4097, 4096, "coarse", None, None),        # k just below Lk
])
def test_one_query_row_over_ragged_lengths(lk, k, kind, score_batch, window):
    """One query row per unit without segment ids (a decoding step over a ragged batch): the shared-list pre-pass
    over each element's key range. Lengths 0, below k, at k, above k and full."""
    lens = [0, 1, k - 1, k, k + 1, lk // 2 + 3, lk - 5, lk]
    kw = {"key_value_seq_lengths": jnp.asarray(lens, jnp.int32)}
    if window is not None:
        kw["local_window_size"] = window
    check(f"bounded::one-row::{lk}::{k}::{kind}", b=len(lens), hs=3, lq=1, lk=lk, k=k, kind=kind,
          score_batch=score_batch, **kw)
