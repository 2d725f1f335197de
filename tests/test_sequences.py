"""Segment ids, local windows and sequence lengths on every implementation, against the float64 oracle.

The oracle gets a dense bool mask that ``helpers.dense_sequences`` builds in numpy from the arguments' documented
meaning (docs/sequences.md), independently of jax_dmattn/_bounds.py, and no causal flag (the mask holds causality).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from helpers import (GRAD_FLOOR_FRAC, DEFAULT_FLOOR_RMS, assert_close, decode_lists, dense_sequences,
                     packed_segments, random_qkv_bias, seed_from, sequence_keywords, split_static)

import jax_dmattn
from jax_dmattn import KeyIndices, TopKMask


# ------------------------------------------------------------------------------------------ cases
@dataclasses.dataclass(frozen=True)
class SeqCase:
    B: int = 2
    Lq: int = 150
    Lk: int = 150
    H: int = 4
    Hkv: int = 2
    D: int = 32
    is_causal: bool = True
    window: object = None          # None | int | (left, right)
    segments: str | None = None    # None | packed (sorted) | random (unsorted) | packed_q (self-attention only)
    q_lens: tuple | None = None
    kv_lens: tuple | None = None
    bias: str | None = "key"       # None | key [B, Hkv, 1, Lk] | full [B, H, Lq, Lk]
    mask: str | None = None        # None | bool | indices | topk (TopKMask of per-key scores [B, Hkv, Lk], k = 12)


CASES = {
    "window-causal": SeqCase(window=(40, 0)),
    "window-symmetric": SeqCase(is_causal=False, window=23, Lq=100, Lk=170),
    "window-lq-gt-lk": SeqCase(window=(30, 10), Lq=200, Lk=90, is_causal=False),
    "window-zero": SeqCase(window=0, bias=None),
    "packed-causal": SeqCase(segments="packed", bias="full"),
    "packed-noncausal-gqa": SeqCase(segments="packed", is_causal=False, H=6, Hkv=2),
    "segments-unsorted": SeqCase(segments="random", is_causal=False),
    "segments-unsorted-causal-window": SeqCase(segments="random", window=(50, 0)),
    "lengths-both": SeqCase(q_lens=(150, 63), kv_lens=(150, 63)),
    "lengths-zero-and-full": SeqCase(q_lens=(0, 150), kv_lens=(150, 0), is_causal=False),
    "lengths-kv-only-decode": SeqCase(Lq=1, Lk=300, kv_lens=(300, 129), H=8, Hkv=2),
    "lengths-kv-only-chunk": SeqCase(Lq=40, Lk=260, kv_lens=(200, 77)),
    "lengths-q-shorter": SeqCase(q_lens=(70, 10), kv_lens=(140, 150), Lq=90, Lk=150),
    "lengths-window-packed": SeqCase(q_lens=(120, 150), kv_lens=(120, 150), window=(33, 0), segments="packed"),
    "bool-mask-window": SeqCase(window=(60, 5), mask="bool", is_causal=False),
    "bool-mask-packed": SeqCase(segments="packed", mask="bool"),
    "indices-lengths": SeqCase(q_lens=(150, 90), kv_lens=(150, 90), mask="indices"),
    "indices-packed": SeqCase(segments="packed", mask="indices", is_causal=False),
    "topk-packed-causal": SeqCase(segments="packed", mask="topk"),
    "topk-packed-full-bias": SeqCase(segments="packed", mask="topk", bias="full", is_causal=False),
    "topk-unsorted-noncausal": SeqCase(segments="random", mask="topk", is_causal=False, bias=None),
    "topk-window-lengths": SeqCase(window=(40, 0), q_lens=(150, 70), kv_lens=(150, 70), mask="topk"),
    "topk-decode-lengths": SeqCase(Lq=1, Lk=300, kv_lens=(300, 9), H=8, Hkv=2, mask="topk"),
}
TOPK_K = 12


def topk_dense(scores, visible, k):
    """bool [B, Hkv, Lq, Lk]: per row, its k best keys by (score desc, index asc) among ``visible`` [B, 1, Lq, Lk]."""
    b_, hkv, lk = scores.shape
    lq = visible.shape[2]
    out = np.zeros((b_, hkv, lq, lk), bool)
    for b, h, i in np.ndindex(b_, hkv, lq):
        seen = np.nonzero(visible[b, 0, i])[0]
        order = seen[np.lexsort((seen, -scores[b, h, seen]))]
        out[b, h, i, order[:k]] = True
    return out


def make_inputs(case: SeqCase, rng, dtype):
    q, k, v, bias = random_qkv_bias(rng, B=case.B, Lq=case.Lq, Lk=case.Lk, H=case.H, Hkv=case.Hkv, D=case.D,
                                    bias=case.bias, dtype=dtype)
    kw, dense = sequence_keywords(rng, case.B, case.Lq, case.Lk, is_causal=case.is_causal, window=case.window,
                                  segments=case.segments, q_lens=case.q_lens, kv_lens=case.kv_lens)
    mask = None
    if case.mask == "bool":
        m = rng.random((case.B, case.Hkv, case.Lq, case.Lk)) < 0.6
        mask, dense = jnp.asarray(m), dense & np.repeat(m, case.H // case.Hkv, axis=1)
    elif case.mask == "indices":
        idx = rng.integers(-1, case.Lk, (case.B, case.Hkv, case.Lq, 24)).astype(np.int32)
        m = np.zeros((case.B, case.Hkv, case.Lq, case.Lk + 1), bool)
        for ix in np.ndindex(idx.shape[:3]):
            m[ix + (idx[ix],)] = True
        m = m[..., :case.Lk]
        if case.is_causal:  # the causal cut of the call applies to key indices too
            m &= np.arange(case.Lk)[None, :] <= np.arange(case.Lq)[:, None] + case.Lk - case.Lq
        mask, dense = KeyIndices(jnp.asarray(idx)), dense & np.repeat(m, case.H // case.Hkv, axis=1)
    elif case.mask == "topk":
        # a coarse grid of values, so that ties (broken towards the lower key) are common
        scores = np.round(rng.standard_normal((case.B, case.Hkv, case.Lk)) * 2).astype(np.float32)
        m = topk_dense(scores, dense, TOPK_K)
        mask, dense = TopKMask(jnp.asarray(scores), TOPK_K), np.repeat(m, case.H // case.Hkv, axis=1)
    return (q, k, v, bias, mask), kw, dense


def _dtype(implementation):
    return jnp.bfloat16 if implementation == "cuda" else jnp.float32


def _rng(name, what):
    return np.random.default_rng(seed_from(f"test_sequences::{name}::{what}"))


# ------------------------------------------------------------------------------------------ values and gradients
@pytest.mark.parametrize("name", list(CASES))
def test_forward(implementation, name):
    case = CASES[name]
    dtype = _dtype(implementation)
    (q, k, v, bias, mask), kw, dense = make_inputs(case, _rng(name, "fwd"), dtype)
    arrays, window = split_static(kw)
    f = jax.jit(lambda q, k, v, b, m, arrays: jax_dmattn.attention(
        q, k, v, b, m, is_causal=case.is_causal, return_lse=True, implementation=implementation, **window,
        **arrays))
    out, lse = f(q, k, v, bias, mask, arrays)
    eo, el = oracle.oracle_attention(q, k, v, bias, dense)
    assert_close(out, eo, dtype, "out", name="out")
    assert_close(lse, el, dtype, "lse", name="lse")


@pytest.mark.parametrize("name", list(CASES))
def test_grads(implementation, name):
    case = CASES[name]
    dtype = _dtype(implementation)
    rng = _rng(name, "bwd")
    (q, k, v, bias, mask), kw, dense = make_inputs(case, rng, dtype)
    dout = rng.standard_normal(q.shape).astype(q.dtype)
    args = (q, k, v) if bias is None else (q, k, v, bias)

    def f(*a):
        return jax_dmattn.attention(*a[:3], a[3] if len(a) > 3 else None, mask, is_causal=case.is_causal,
                                    implementation=implementation, **kw)

    _, vjp = jax.vjp(jax.jit(f), *args)
    grads = vjp(jnp.asarray(dout))
    expected = oracle.oracle_grads(q, k, v, bias, dense, dout)
    floors = oracle.oracle_grads(q, k, v, bias, dense, dout, magnitude=True)
    for nm, g, e, fl in zip(("dq", "dk", "dv", "dbias"), grads, expected, floors):
        floor = max(GRAD_FLOOR_FRAC * float(np.linalg.norm(fl)), DEFAULT_FLOOR_RMS * np.sqrt(e.size))
        assert_close(g, e, dtype, "grad", floor=floor, name=nm)


@pytest.mark.parametrize("name", ["packed-causal", "lengths-window-packed", "bool-mask-window"])
def test_deterministic_grads(implementation, name):
    """deterministic=True (on CUDA its own dQ kernel) with row bounds, against the oracle; twice, bit for bit."""
    case = CASES[name]
    dtype = _dtype(implementation)
    rng = _rng(name, "det")
    (q, k, v, bias, mask), kw, dense = make_inputs(case, rng, dtype)
    dout = jnp.asarray(rng.standard_normal(q.shape).astype(q.dtype))
    f = jax.jit(lambda q, k, v, b: jax.vjp(lambda *a: jax_dmattn.attention(
        *a, mask=mask, is_causal=case.is_causal, deterministic=True, implementation=implementation, **kw),
        q, k, v, b)[1](dout))
    grads = f(q, k, v, bias)
    again = f(q, k, v, bias)
    expected = oracle.oracle_grads(q, k, v, bias, dense, dout)
    floors = oracle.oracle_grads(q, k, v, bias, dense, dout, magnitude=True)
    for nm, g, g2, e, fl in zip(("dq", "dk", "dv", "dbias"), grads, again, expected, floors):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(g2, np.float32))
        floor = max(GRAD_FLOOR_FRAC * float(np.linalg.norm(fl)), DEFAULT_FLOOR_RMS * np.sqrt(e.size))
        assert_close(g, e, dtype, "grad", floor=floor, name=nm)


def test_rows_past_query_length_have_zero_output_and_gradient(implementation):
    """Rows at positions >= query_seq_lengths: out 0, lse -inf, dq 0; keys past the key length get dk = dv = 0,
    even where the inputs there are NaN (they are never read into a kept pair)."""
    if implementation == "xla":
        pytest.skip("the reference's dense products let a dropped pair's NaN reach its row (documented)")
    dtype = _dtype(implementation)
    rng = _rng("zero-rows", implementation)
    B, L, H, D = 2, 130, 2, 32
    q = rng.standard_normal((B, L, H, D)).astype(np.dtype(dtype))
    k = rng.standard_normal((B, L, H, D)).astype(np.dtype(dtype))
    v = rng.standard_normal((B, L, H, D)).astype(np.dtype(dtype))
    lens = np.array([100, 37], np.int32)
    for b in range(B):  # padding holds NaN: none of it may reach a result
        q[b, lens[b]:] = np.nan
        k[b, lens[b]:] = np.nan
        v[b, lens[b]:] = np.nan
    kw = dict(query_seq_lengths=jnp.asarray(lens), key_value_seq_lengths=jnp.asarray(lens), is_causal=True,
              implementation=implementation)
    out, lse = jax_dmattn.attention(q, k, v, return_lse=True, **kw)
    dq, dk, dv = jax.grad(lambda q, k, v: jnp.sum(jnp.where(jnp.isnan(q), 0, 1) * jax_dmattn.attention(
        q, k, v, **kw).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)
    for b in range(B):
        n = lens[b]
        assert np.all(np.asarray(out[b, n:], np.float32) == 0)
        assert np.all(np.isneginf(np.asarray(lse[b, :, n:])))
        assert np.all(np.isfinite(np.asarray(out[b, :n], np.float32)))
        for g in (dq, dk, dv):
            assert np.all(np.asarray(g[b, n:], np.float32) == 0)
            assert np.all(np.isfinite(np.asarray(g[b, :n], np.float32)))


def _vmap_equals_each(one, *args):
    """jit(vmap(one)) over the leading dim of args equals jit(one) on each example."""
    got = jax.jit(jax.vmap(one))(*args)
    for e in range(args[0].shape[0]):
        want = jax.jit(one)(*(x[e] for x in args))
        np.testing.assert_allclose(np.asarray(got[e]), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.cpu_kernels
def test_traced_lengths_and_ids_under_jit_and_vmap():
    """Lengths and segment ids are ordinary traced arrays: one compiled function serves any values, and vmap over
    them (with q / k / v) equals the per-example calls."""
    rng = _rng("vmap", "cpu")
    n, B, L, H, D = 3, 2, 70, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((n, B, L, H, D)).astype(np.float32)) for _ in range(3))
    lens = jnp.asarray(rng.integers(0, L + 1, (n, B)).astype(np.int32))
    seg = jnp.asarray(np.stack([packed_segments(rng, B, L, 3) for _ in range(n)]))

    def one(q, k, v, lens, seg):
        return jax_dmattn.attention(q, k, v, is_causal=True, key_value_seq_lengths=lens, query_seq_lengths=lens,
                                    q_segment_ids=seg, kv_segment_ids=seg, local_window_size=(20, 0),
                                    implementation="cpu")

    _vmap_equals_each(one, q, k, v, lens, seg)


@pytest.mark.cpu_kernels
def test_topk_mask_with_ids_under_vmap():
    """vmap over q / k / v, TopKMask scores and segment ids equals the per-example calls (the selection under the
    bounds runs batched: lax.cond becomes a select of both routes)."""
    rng = _rng("vmap-topk", "cpu")
    n, B, L, H, D = 3, 2, 150, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((n, B, L, H, D)).astype(np.float32)) for _ in range(3))
    scores = jnp.asarray(rng.standard_normal((n, B, H, L)).astype(np.float32))
    seg = jnp.asarray(np.stack([packed_segments(rng, B, L, 3) for _ in range(n)]))
    seg = seg.at[0, 0, :10].set(-1)  # the padding id in two runs (here and at the end): that example ranks all keys

    def one(q, k, v, s, seg):
        return jax_dmattn.attention(q, k, v, mask=TopKMask(s, 7), is_causal=True, q_segment_ids=seg,
                                    kv_segment_ids=seg, implementation="cpu")

    _vmap_equals_each(one, q, k, v, scores, seg)


@pytest.mark.cpu_kernels
def test_window_matches_an_explicit_mask_bit_for_bit():
    """A window is the same computation as the bool mask it stands for: the CPU kernels give equal bits."""
    rng = _rng("window-bits", "cpu")
    B, L, H, D = 1, 200, 2, 32
    q, k, v = (jnp.asarray(rng.standard_normal((B, L, H, D)).astype(np.float32)) for _ in range(3))
    mask = jnp.asarray(dense_sequences(B, L, L, is_causal=True, window=(64, 0)))
    a = jax_dmattn.attention(q, k, v, is_causal=True, local_window_size=(64, 0), implementation="cpu")
    b = jax_dmattn.attention(q, k, v, mask=mask, implementation="cpu")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kw, exc, text", [
    (dict(q_segment_ids=np.zeros((2, 8), np.int32)), ValueError, "given together"),
    (dict(q_segment_ids=np.zeros((2, 8), np.int32), kv_segment_ids=np.zeros((2, 9), np.int32)), ValueError,
     "kv_segment_ids must have shape"),
    (dict(q_segment_ids=np.zeros((2, 8), np.float32), kv_segment_ids=np.zeros((2, 8), np.int32)), TypeError,
     "integer dtype"),
    (dict(local_window_size=-1), ValueError, ">= 0"),
    (dict(local_window_size=(3, 2, 1)), TypeError, "local_window_size"),
    (dict(local_window_size=2.5), TypeError, "local_window_size"),
    (dict(query_seq_lengths=np.zeros((3,), np.int32)), ValueError, "query_seq_lengths must have shape"),
    (dict(key_value_seq_lengths=[4, 4]), TypeError, "key_value_seq_lengths must be an integer array"),
])
def test_invalid_arguments(kw, exc, text):
    q = jnp.zeros((2, 8, 2, 16))
    with pytest.raises(exc, match=text):
        jax_dmattn.attention(q, q, q, implementation="cpu", **kw)


def test_topk_mask_keeps_k_keys_of_each_document(implementation):
    """A TopKMask with packed segment ids: every row keeps min(k, its visible keys) keys, all of its own document,
    as if each document ran alone (its top k chosen among its own keys, not among all earlier keys). With v the
    identity, row i's output is its attention weights, nonzero exactly on the keys it keeps."""
    dtype = _dtype(implementation)
    rng = _rng("topk-documents", implementation)
    B, L, H, k, docs = 1, 96, 2, 5, 4
    seg = jnp.asarray(np.repeat(np.arange(docs, dtype=np.int32), L // docs)[None])
    scores = jnp.asarray(rng.standard_normal((B, H, L)).astype(np.float32))
    q, kk = (jnp.asarray(rng.standard_normal((B, L, H, L)) * 0.1, dtype) for _ in range(2))
    v = jnp.broadcast_to(jnp.eye(L, dtype=dtype)[None, :, None, :], (B, L, H, L))
    w = np.asarray(jax_dmattn.attention(q, kk, v, mask=TopKMask(scores, k), is_causal=True, q_segment_ids=seg,
                                        kv_segment_ids=seg, implementation=implementation), np.float32)
    for i, h in np.ndindex(L, H):
        kept = np.nonzero(w[0, i, h] > 0)[0]
        start = (i // (L // docs)) * (L // docs)
        assert len(kept) == min(k, i - start + 1), (i, h, kept)
        assert np.all((kept >= start) & (kept <= i)), (i, h, kept)


def test_topk_mask_whose_key_lists_overflow(implementation):
    """One query row per document against documents of 20 keys each (packed cross-attention, ids in contiguous
    runs): the 128 rows of a unit keep 12 keys each, all different, more than a unit's CUDA lists hold with segment
    ids (2 k + 512), so the call takes the per-row route (the lax.cond of _compact.cuda_bounded_topk_lists); out and
    lse equal the oracle's on the selection, as every other route."""
    dtype = _dtype(implementation)
    rng = _rng("topk-overflow", implementation)
    B, H, Hkv, D, k, per_doc = 1, 2, 1, 32, 12, 20
    lq = 140
    lk = lq * per_doc
    q_ids = np.arange(lq, dtype=np.int32)[None]
    kv_ids = np.repeat(np.arange(lq, dtype=np.int32), per_doc)[None]
    q, kk, v, _ = random_qkv_bias(rng, B=B, Lq=lq, Lk=lk, H=H, Hkv=Hkv, D=D, bias=None, dtype=dtype)
    scores = np.round(rng.standard_normal((B, Hkv, lk)) * 2).astype(np.float32)
    visible = (q_ids[0][:, None] == kv_ids[0][None, :])[None, None]
    dense = np.repeat(topk_dense(scores, visible, k), H // Hkv, axis=1)
    if implementation == "cuda":
        from jax_dmattn import _bounds, _compact

        bounds = _bounds.make_row_bounds(batch=B, q_len=lq, kv_len=lk, is_causal=False,
                                         q_segment_ids=jnp.asarray(q_ids), kv_segment_ids=jnp.asarray(kv_ids))
        s = _compact.canonical_scores(jnp.asarray(scores))[:, :, None]
        _, failed = _compact.cuda_bounded_topk_lists(s, k, bounds.rows, bounds.key_segments, kv_len=lk)
        assert bool(failed), "the lists were expected to overflow"
    out, lse = jax.jit(lambda q, kx, v, s, qi, ki: jax_dmattn.attention(
        q, kx, v, mask=TopKMask(s, k), q_segment_ids=qi, kv_segment_ids=ki, return_lse=True,
        implementation=implementation))(q, kk, v, jnp.asarray(scores), jnp.asarray(q_ids), jnp.asarray(kv_ids))
    eo, el = oracle.oracle_attention(q, kk, v, None, dense)
    assert_close(out, eo, dtype, "out", name="out")
    assert_close(lse, el, dtype, "lse", name="lse")


@pytest.mark.parametrize("name, causal, kw, covered", [
    ("packed-causal", True, dict(segments="packed"), True),
    ("packed-noncausal", False, dict(segments="packed"), False),
    ("unsorted-causal", True, dict(segments="random"), False),
    ("window-causal", True, dict(window=(150, 0)), True),
    ("window-both-sides", False, dict(window=(150, 30)), True),
    ("lengths", True, dict(q_lens=(700, 333), kv_lens=(700, 333)), True),
    ("everything", True, dict(segments="packed", window=(60, 0), q_lens=(700, 333), kv_lens=(700, 333)), True),
])
def test_topk_selection_by_unit_candidates_equals_all_keys(name, causal, kw, covered):
    """The TopKMask selection under bounds: where a unit's candidates cover its rows (_units_cover), ranking
    k + 2 * SELECT_ROWS candidates per row gives the same k best as ranking every key; where they do not, the
    call must take the all-keys route (the cases say which)."""
    from jax_dmattn import _bounds, _compact

    rng = _rng(name, "selection")
    B, L, H, k = 2, 700, 2, 20
    arrays, window = split_static(sequence_keywords(rng, B, L, L, is_causal=causal, **kw)[0])
    bounds = _bounds.make_row_bounds(batch=B, q_len=L, kv_len=L, is_causal=causal,
                                     **{n: jnp.asarray(x) for n, x in arrays.items()}, **window)
    # coarse: many ties; canonical, as the selection gets them (-0.0 ranks equal to 0.0)
    s = _compact.canonical_scores(jnp.asarray(np.round(rng.standard_normal((B, H, L)) * 2).astype(np.float32)))
    _, rows, ks, unit_rows, geometry, cover = _compact._selection_units(s[:, :, None], bounds.rows,
                                                                        bounds.key_segments)
    assert bool(jnp.all(cover)) == covered
    for form in ("thresholds", "indices"):
        want = _compact._by_all_keys(s, rows, ks, k, form)
        if covered:
            got = tuple(x[:, :, :L] for x in _compact._by_unit_candidates(s, unit_rows, ks, k, geometry, form))
            for g, w in zip(got, want):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        # the public entry takes whichever route applies and agrees with the all-keys ranking
        got = _compact.bounded_topk(s[:, :, None], k, bounds.rows, bounds.key_segments, form=form)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("seed", range(6))
def test_units_covered_and_lists_bounded_without_segments(seed):
    """Without segment ids every unit of SELECT_ROWS rows is covered by its candidates, whatever the causality,
    window and lengths (bounded_topk takes that route without a test), so the CUDA lists of a bounded TopKMask hold
    at most bounded_topk_unit_keys keys per unit: built at that capacity they decode to the same rows as at the
    full one."""
    from jax_dmattn import _bounds, _compact

    rng = np.random.default_rng(seed_from(f"test_sequences::units_covered::{seed}"))
    B, H, k = 2, 2, int(rng.integers(1, 40))
    lq, lk = int(rng.integers(130, 700)), int(rng.integers(130, 700))
    causal = bool(rng.integers(0, 2))
    kw = {}
    if rng.integers(0, 2):
        kw["local_window_size"] = (int(rng.integers(0, 300)), int(rng.integers(0, 300)))
    if rng.integers(0, 2):
        kw["query_seq_lengths"] = jnp.asarray(rng.integers(0, lq + 1, B), jnp.int32)
    if rng.integers(0, 2) or not kw:
        kw["key_value_seq_lengths"] = jnp.asarray(rng.integers(0, lk + 1, B), jnp.int32)
    bounds = _bounds.make_row_bounds(batch=B, q_len=lq, kv_len=lk, is_causal=causal, **kw)
    s = _compact.canonical_scores(jnp.asarray(np.round(rng.standard_normal((B, H, lk)) * 2).astype(np.float32)))
    assert bool(jnp.all(_compact._selection_units(s[:, :, None], bounds.rows, None)[5])), kw

    idx = _compact.bounded_topk_indices(s[:, :, None], k, bounds.rows, None)
    bound = _compact.bounded_topk_unit_keys(k, None)
    assert bound == k + 2 * _compact.SELECT_ROWS
    full = _compact.cuda_key_lists(idx, "indices", 0, q_len=lq, kv_len=lk, is_causal=False)
    short = (*_compact._per_row_index_lists(idx, lq, lk, bound), full[2])
    chunk = _compact._list_geometry()[1]
    capacity = min(-(-bound // chunk) * chunk, -(-lk // chunk) * chunk, -(-128 * k // chunk) * chunk)
    assert short[0].size == B * H * -(-lq // 128) * (capacity + 1)
    np.testing.assert_array_equal(decode_lists(*short, lq, lk), decode_lists(*full, lq, lk))
    assert _compact.bounded_topk_unit_keys(k, jnp.zeros((B, lk), jnp.int32)) == 0


@pytest.mark.parametrize("name, q_ids, kv_ids, narrowed", [
    ("sorted", [0, 0, 1, 1, 1, 2], [0, 0, 1, 1, 1, 2], True),
    ("padding-after", [3, 3, 5, 5, -1, -1], [3, 3, 5, 5, -1, -1], True),
    ("cross-shorter-queries", [7, 9, 9], [7, 7, 9, 9, 9, -1], True),
    ("query-id-without-keys", [1, 4, 4, 2], [1, 1, 2, 2, 2, 2], True),
    ("runs-reordered", [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], False),
    ("id-in-two-runs", [0, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0], False),
])
def test_segment_spans_narrow_contiguous_runs(name, q_ids, kv_ids, narrowed):
    """Segment ids whose key runs are contiguous and in the query rows' order become exact key spans (no id
    comparison); others keep the comparison. Either way each row keeps exactly its own segment's keys."""
    from jax_dmattn import _bounds

    q_seg, kv_seg = jnp.asarray([q_ids], jnp.int32), jnp.asarray([kv_ids], jnp.int32)
    bounds = _bounds.make_row_bounds(batch=1, q_len=len(q_ids), kv_len=len(kv_ids), is_causal=False,
                                     q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    rows = np.asarray(bounds.rows[0])
    assert np.all(rows[:, 3] == (0 if narrowed else 1))
    assert np.all(np.diff(rows[:, 0]) >= 0) and np.all(np.diff(rows[:, 1]) >= 0)
    want = np.asarray(q_ids)[:, None] == np.asarray(kv_ids)[None, :]
    np.testing.assert_array_equal(np.asarray(_bounds.dense_keep(bounds, len(kv_ids)))[0, 0], want)
