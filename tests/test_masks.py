"""topk_mask / block_topk_mask against brute-force numpy selections."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_dmattn.masks import block_topk_mask, topk_mask


# --------------------------------------------------------------------------
# brute force
# --------------------------------------------------------------------------


def _allowed_np(shape, mask, is_causal):
    allowed = np.ones(shape, bool)
    if mask is not None:
        allowed &= np.broadcast_to(np.asarray(mask), shape)
    if is_causal:
        lq, lk = shape[-2], shape[-1]
        i = np.arange(lq)[:, None]
        j = np.arange(lk)[None, :]
        allowed &= j <= i + lk - lq
    return allowed


def _rank_key(v):
    v = np.float32(v)
    if np.isnan(v) or v == -np.inf:
        return np.finfo(np.float32).min
    return v


def brute_topk(bias, k, shape, mask=None, is_causal=False):
    b = np.broadcast_to(np.asarray(bias, np.float32), shape)
    allowed = _allowed_np(shape, mask, is_causal)
    out = np.zeros(shape, bool)
    for idx in np.ndindex(*shape[:-1]):
        cand = [j for j in range(shape[-1]) if allowed[idx + (j,)]]
        cand.sort(key=lambda j: (-_rank_key(b[idx + (j,)]), j))
        for j in cand[:k]:
            out[idx + (j,)] = True
    return out


def brute_block_topk(bias, window, bq, bk, shape, mask=None, is_causal=False):
    b = np.broadcast_to(np.asarray(bias, np.float32), shape)
    allowed = _allowed_np(shape, mask, is_causal)
    lq, lk = shape[-2], shape[-1]
    if lq == 1:
        bq = 1
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    kb = math.ceil(window / bk)
    out = np.zeros(shape, bool)
    for idx in np.ndindex(*shape[:-2]):
        for qb in range(nq):
            rows = slice(qb * bq, min(lq, (qb + 1) * bq))
            scores = []
            for kbi in range(nk):
                cols = slice(kbi * bk, min(lk, (kbi + 1) * bk))
                a = allowed[idx][rows, cols]
                if a.any():
                    vals = [_rank_key(x) for x in b[idx][rows, cols][a]]
                    scores.append((-max(vals), kbi))
            scores.sort()
            for _, kbi in scores[:kb]:
                cols = slice(kbi * bk, min(lk, (kbi + 1) * bk))
                out[idx][rows, cols] = True
    return out & allowed


def _tie_bias(rng, shape, levels=4):
    """Bias with many exact ties (few distinct values)."""
    return rng.integers(0, levels, size=shape).astype(np.float32)


# --------------------------------------------------------------------------
# topk_mask
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bias_shape,mask_shape,is_causal,query_len,k",
    [
        ((2, 3, 5, 9), None, False, None, 3),  # full bias
        ((2, 3, 1, 9), None, False, None, 4),  # per-key bias, non-causal keeps row dim 1
        ((2, 2, 1, 11), None, True, 7, 3),  # per-key causal, Lq < Lk
        ((1, 2, 1, 6), None, True, 6, 2),  # per-key causal, Lq == Lk
        ((2, 1, 6, 6), (2, 1, 6, 6), True, None, 3),  # mask + causal
        ((1, 2, 1, 10), (2, 1, 4, 10), False, None, 5),  # mask supplies Lq and B
        ((3, 8), None, True, None, 3),  # rank-2 bias
        ((9,), None, False, None, 2),  # rank-1 bias
        ((2, 2, 5, 8), (2, 2, 5, 8), False, None, 8),  # window == Lk
        ((2, 2, 5, 8), None, True, None, 20),  # window > Lk
        ((1, 1, 9, 4), None, True, None, 2),  # Lq > Lk: early rows see nothing
    ],
)
def test_topk_matches_brute_force(bias_shape, mask_shape, is_causal, query_len, k):
    rng = np.random.default_rng(0)
    bias = _tie_bias(rng, bias_shape)
    mask = None if mask_shape is None else rng.random(mask_shape) < 0.6
    out = topk_mask(jnp.asarray(bias), k, mask=None if mask is None else jnp.asarray(mask),
                    is_causal=is_causal, query_len=query_len)
    shapes = [bias_shape] + ([mask_shape] if mask_shape else [])
    shape = np.broadcast_shapes(*shapes)
    if is_causal and len(shape) < 2:
        shape = (1,) + shape
    if is_causal and shape[-2] == 1:
        shape = shape[:-2] + (query_len,) + shape[-1:]
    assert out.dtype == jnp.bool_
    assert out.shape == shape
    np.testing.assert_array_equal(np.asarray(out), brute_topk(bias, k, shape, mask, is_causal))


def test_topk_row_counts_and_ties():
    # all-equal bias: the lowest allowed indices win
    bias = jnp.zeros((1, 1, 1, 10))
    out = np.asarray(topk_mask(bias, 3, is_causal=True, query_len=10))[0, 0]
    for i in range(10):
        expect = np.zeros(10, bool)
        expect[: min(3, i + 1)] = True
        np.testing.assert_array_equal(out[i], expect)
    # rows with fewer allowed keys than the window keep all of them
    rng = np.random.default_rng(1)
    b = jnp.asarray(rng.normal(size=(2, 2, 16, 32)).astype(np.float32))
    m = jnp.asarray(rng.random((2, 2, 16, 32)) < 0.3)
    out = np.asarray(topk_mask(b, 6, mask=m, is_causal=True))
    allowed = _allowed_np((2, 2, 16, 32), np.asarray(m), True)
    np.testing.assert_array_equal(out.sum(-1), np.minimum(allowed.sum(-1), 6))
    assert not (out & ~allowed).any()


def test_topk_special_values():
    # -0.0 == 0.0, -inf and NaN rank lowest but still count as allowed keys
    bias = jnp.asarray([[0.0, -0.0, -jnp.inf, jnp.nan, 1.0, -0.0]], jnp.float32)
    out = np.asarray(topk_mask(bias, 3))
    np.testing.assert_array_equal(out[0], [True, True, False, False, True, False])
    out = np.asarray(topk_mask(bias, 5))
    np.testing.assert_array_equal(out[0], [True, True, True, False, True, True])
    out = np.asarray(topk_mask(bias, 6))
    assert out.all()


def test_topk_low_precision_bias_and_jit_grad():
    rng = np.random.default_rng(2)
    b32 = rng.normal(size=(1, 2, 1, 40)).astype(np.float32)
    b16 = jnp.asarray(b32, jnp.bfloat16)
    ref = brute_topk(np.asarray(b16.astype(jnp.float32)), 7, (1, 2, 40, 40), is_causal=True)
    f = jax.jit(lambda b: topk_mask(b, 7, is_causal=True, query_len=40))
    np.testing.assert_array_equal(np.asarray(f(b16)), ref)

    # no gradient flows through the mask
    def loss(b):
        m = topk_mask(b, 5, is_causal=True, query_len=40)
        return jnp.sum(jnp.where(m, b, 0.0))

    g = jax.grad(loss)(jnp.asarray(b32))
    assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("lq,lk,k,key_mask", [(150, 150, 5, True), (97, 160, 30, False), (40, 200, 9, True)])
def test_topk_causal_per_key_many_chunks(lq, lk, k, key_mask):
    # per-key bias (and key mask) + causal takes the prefix-threshold path: check it across chunks
    rng = np.random.default_rng(lk)
    bias = _tie_bias(rng, (2, 1, 1, lk), levels=3)
    bias[0, 0, 0, ::7] = -np.inf
    mask = rng.random((1, 2, 1, lk)) < 0.8 if key_mask else None
    out = topk_mask(jnp.asarray(bias), k, mask=None if mask is None else jnp.asarray(mask),
                    is_causal=True, query_len=lq)
    shape = (2, 2 if key_mask else 1, lq, lk)
    assert out.shape == shape
    np.testing.assert_array_equal(np.asarray(out), brute_topk(bias, k, shape, mask, True))
    out = block_topk_mask(jnp.asarray(bias), k, block_q=16, block_k=8,
                          mask=None if mask is None else jnp.asarray(mask), is_causal=True, query_len=lq)
    np.testing.assert_array_equal(np.asarray(out), brute_block_topk(bias, k, 16, 8, shape, mask, True))


def test_topk_gqa_heads():
    # bias with Hkv = 2 heads, mask with H = 4 heads: query head h reads kv head h // 2
    rng = np.random.default_rng(7)
    b = rng.normal(size=(1, 2, 1, 12)).astype(np.float32)
    m = rng.random((1, 4, 12, 12)) < 0.7
    out = topk_mask(jnp.asarray(b), 3, mask=jnp.asarray(m), is_causal=True)
    assert out.shape == (1, 4, 12, 12)
    ref = brute_topk(np.repeat(b, 2, axis=1), 3, (1, 4, 12, 12), m, True)
    np.testing.assert_array_equal(np.asarray(out), ref)
    out = block_topk_mask(jnp.asarray(b), 3, block_q=4, block_k=4, mask=jnp.asarray(m), is_causal=True)
    ref = brute_block_topk(np.repeat(b, 2, axis=1), 3, 4, 4, (1, 4, 12, 12), m, True)
    np.testing.assert_array_equal(np.asarray(out), ref)


def test_topk_vmap():
    rng = np.random.default_rng(3)
    b = rng.normal(size=(3, 2, 1, 12)).astype(np.float32)
    out = jax.vmap(lambda x: topk_mask(x, 4, is_causal=True, query_len=12))(jnp.asarray(b))
    assert out.shape == (3, 2, 12, 12)
    np.testing.assert_array_equal(np.asarray(out), brute_topk(b, 4, (3, 2, 12, 12), is_causal=True))


def test_topk_errors():
    b = jnp.zeros((1, 1, 1, 8))
    with pytest.raises(ValueError, match="query_len"):
        topk_mask(b, 2, is_causal=True)
    with pytest.raises(ValueError, match="window_size"):
        topk_mask(b, 0)
    with pytest.raises(TypeError, match="window_size"):
        topk_mask(b, 2.5)
    with pytest.raises(TypeError, match="bias"):
        topk_mask(jnp.zeros((1, 8), jnp.int32), 2)
    with pytest.raises(TypeError, match="mask"):
        topk_mask(b, 2, mask=jnp.ones((1, 8)))
    with pytest.raises(ValueError, match="broadcast"):
        topk_mask(b, 2, mask=jnp.ones((1, 1, 3, 7), bool))
    with pytest.raises(ValueError, match="query_len"):
        topk_mask(jnp.zeros((1, 1, 4, 8)), 2, query_len=5)


# --------------------------------------------------------------------------
# block_topk_mask
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bias_shape,mask_shape,is_causal,query_len,window,bq,bk",
    [
        ((1, 2, 1, 40), None, True, 40, 12, 8, 8),  # per-key causal
        ((2, 1, 1, 37), None, True, 29, 10, 8, 8),  # ragged, Lq < Lk
        ((2, 2, 13, 37), (2, 1, 13, 37), False, None, 9, 4, 8),  # full bias + mask
        ((1, 2, 1, 30), None, False, None, 7, 8, 4),  # row-independent
        ((1, 1, 16, 16), None, True, None, 100, 4, 4),  # window covers everything
    ],
)
def test_block_topk_matches_brute_force(bias_shape, mask_shape, is_causal, query_len, window, bq, bk):
    rng = np.random.default_rng(4)
    bias = _tie_bias(rng, bias_shape, levels=6)
    mask = None if mask_shape is None else rng.random(mask_shape) < 0.7
    out = block_topk_mask(jnp.asarray(bias), window, block_q=bq, block_k=bk,
                          mask=None if mask is None else jnp.asarray(mask),
                          is_causal=is_causal, query_len=query_len)
    shapes = [bias_shape] + ([mask_shape] if mask_shape else [])
    shape = np.broadcast_shapes(*shapes)
    if is_causal and shape[-2] == 1:
        shape = shape[:-2] + (query_len,) + shape[-1:]
    assert out.shape == shape and out.dtype == jnp.bool_
    ref = brute_block_topk(bias, window, bq, bk, shape, mask, is_causal)
    np.testing.assert_array_equal(np.asarray(out), ref)


def test_block_topk_tile_structure():
    rng = np.random.default_rng(5)
    lq = lk = 512
    bq = bk = 128
    bias = jnp.asarray(rng.normal(size=(2, 2, 1, lk)).astype(np.float32))
    out = np.asarray(block_topk_mask(bias, 200, block_q=bq, block_k=bk, is_causal=True, query_len=lq))
    causal = _allowed_np((lq, lk), None, True)
    tiles = out.reshape(2, 2, lq // bq, bq, lk // bk, bk)
    ctiles = causal.reshape(lq // bq, bq, lk // bk, bk)
    for b in range(2):
        for h in range(2):
            kept_per_qblock = np.zeros(lq // bq, int)
            for qb in range(lq // bq):
                for kb in range(lk // bk):
                    t = tiles[b, h, qb, :, kb, :]
                    c = ctiles[qb, :, kb, :]
                    # a tile is either empty or equal to its causal part (whole-tile keep)
                    assert not t.any() or np.array_equal(t, c)
                    kept_per_qblock[qb] += t.any()
            # ceil(200 / 128) = 2 key blocks per query block, fewer when fewer are causal-visible
            np.testing.assert_array_equal(kept_per_qblock, np.minimum(2, np.arange(1, 5)))


def test_block_topk_mean_pool_and_jit():
    rng = np.random.default_rng(6)
    bias = jnp.asarray(rng.normal(size=(1, 1, 8, 16)).astype(np.float32))
    f = jax.jit(lambda b: block_topk_mask(b, 4, block_q=4, block_k=4, pool="mean"))
    out = np.asarray(f(bias))
    pooled = np.asarray(bias).reshape(2, 4, 4, 4).mean(axis=(1, 3))
    best = np.argmax(pooled, axis=-1)
    expect = np.zeros((2, 4), bool)
    expect[np.arange(2), best] = True
    np.testing.assert_array_equal(out[0, 0], np.repeat(np.repeat(expect, 4, 0), 4, 1))


def test_block_topk_errors():
    b = jnp.zeros((1, 1, 1, 8))
    with pytest.raises(ValueError, match="block_k"):
        block_topk_mask(b, 2, block_k=0)
    with pytest.raises(ValueError, match="pool"):
        block_topk_mask(b, 2, pool="min")
    with pytest.raises(ValueError, match="query_len"):
        block_topk_mask(b, 2, is_causal=True)
