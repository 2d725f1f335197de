"""Self-checks of the float64 oracle (independent of jax_dmattn): analytic gradients vs finite differences,
broadcast reduction, empty rows, and the documented semantics on hand-computable cases."""

import numpy as np
import pytest

import oracle
from helpers import make_mask


def _loss(q, k, v, bias, mask, dout, **kw):
    out, _ = oracle.oracle_attention(q, k, v, bias, mask, **kw)
    return float((out * dout).sum())


def _fd_grad(fn, x, eps=1e-6):
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        idx = it.multi_index
        xp = x.copy()
        xp[idx] += eps
        xm = x.copy()
        xm[idx] -= eps
        g[idx] = (fn(xp) - fn(xm)) / (2 * eps)
    return g


@pytest.mark.parametrize(
    "bias_shape",
    [(2, 4, 3, 5), (1, 2, 3, 5), (2, 1, 1, 5), (3, 5), (5,), (2, 4, 3, 1), (1, 1, 3, 1)],
    ids=lambda s: "bias" + "x".join(map(str, s)),
)
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("is_causal", [False, True])
def test_oracle_grads_match_finite_differences(bias_shape, softcap, is_causal):
    rng = np.random.default_rng(0)
    B, Lq, Lk, H, Hkv, D = 2, 3, 5, 4, 2, 3
    q = rng.standard_normal((B, Lq, H, D))
    k = rng.standard_normal((B, Lk, Hkv, D))
    v = rng.standard_normal((B, Lk, Hkv, D))
    bias = rng.standard_normal(bias_shape)
    mask = rng.random((B, 1, Lq, Lk)) < 0.7
    mask[0, 0, 1, :] = False  # an empty row
    dout = rng.standard_normal((B, Lq, H, D))
    kw = dict(scale=0.7, is_causal=is_causal, softcap=softcap)
    dq, dk, dv, db = oracle.oracle_grads(q, k, v, bias, mask, dout, **kw)
    fq = _fd_grad(lambda x: _loss(x, k, v, bias, mask, dout, **kw), q)
    fk = _fd_grad(lambda x: _loss(q, x, v, bias, mask, dout, **kw), k)
    fv = _fd_grad(lambda x: _loss(q, k, x, bias, mask, dout, **kw), v)
    fb = _fd_grad(lambda x: _loss(q, k, v, x, mask, dout, **kw), bias)
    np.testing.assert_allclose(dq, fq, atol=1e-7)
    np.testing.assert_allclose(dk, fk, atol=1e-7)
    np.testing.assert_allclose(dv, fv, atol=1e-7)
    np.testing.assert_allclose(db, fb, atol=1e-7)
    assert db.shape == bias.shape
    if bias_shape[-1] == 1:
        assert np.all(db == 0)
    # the empty row touches nothing
    out, lse = oracle.oracle_attention(q, k, v, bias, mask, **kw)
    assert np.all(out[0, 1] == 0) and np.all(np.isneginf(lse[0, :, 1]))
    assert np.all(dq[0, 1] == 0)


def test_oracle_lse_cotangent_matches_finite_differences():
    rng = np.random.default_rng(3)
    B, Lq, Lk, H, Hkv, D = 1, 3, 4, 2, 1, 2
    q, k, v = (rng.standard_normal(s) for s in [(B, Lq, H, D), (B, Lk, Hkv, D), (B, Lk, Hkv, D)])
    bias = rng.standard_normal((1, H, Lq, Lk))
    dout = rng.standard_normal((B, Lq, H, D))
    dlse = rng.standard_normal((B, H, Lq))
    kw = dict(softcap=1.5)

    def loss(q, k, v, b):
        out, lse = oracle.oracle_attention(q, k, v, b, None, **kw)
        return float((out * dout).sum() + (lse * dlse).sum())

    grads = oracle.oracle_grads(q, k, v, bias, None, dout, dlse=dlse, **kw)
    args = [q, k, v, bias]
    for i, g in enumerate(grads):
        def f(x, i=i):
            a = list(args)
            a[i] = x
            return loss(*a)

        np.testing.assert_allclose(g, _fd_grad(f, args[i]), atol=1e-7)


def test_oracle_small_hand_case():
    # one query, two keys, D=1: p = softmax([a, b]); out = p0 v0 + p1 v1
    q = np.array([1.0]).reshape(1, 1, 1, 1)
    k = np.array([1.0, 2.0]).reshape(1, 2, 1, 1)
    v = np.array([3.0, 5.0]).reshape(1, 2, 1, 1)
    bias = np.array([0.5, -0.5])
    out, lse = oracle.oracle_attention(q, k, v, bias, None, scale=1.0)
    s = np.array([1.5, 1.5])
    p = np.exp(s) / np.exp(s).sum()
    np.testing.assert_allclose(out.ravel(), [p @ np.array([3.0, 5.0])])
    np.testing.assert_allclose(lse.ravel(), [np.log(np.exp(s).sum())])
    # softcap applies before the bias
    out2, lse2 = oracle.oracle_attention(q, k, v, bias, None, scale=1.0, softcap=1.0)
    s2 = np.tanh(np.array([1.0, 2.0])) + bias
    np.testing.assert_allclose(lse2.ravel(), [np.log(np.exp(s2).sum())])


def test_oracle_non_finite_semantics():
    # one query, three keys, D=1; key 2 is dropped (mask, then -inf bias) and holds NaN in k and v
    q = np.array([1.0]).reshape(1, 1, 1, 1)
    k = np.array([1.0, 2.0, np.nan]).reshape(1, 3, 1, 1)
    v = np.array([3.0, 5.0, np.nan]).reshape(1, 3, 1, 1)
    dout = np.ones((1, 1, 1, 1))
    p = np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum()
    for bias, mask in ((None, np.array([True, True, False])), (np.array([0.0, 0.0, -np.inf]), None)):
        out, lse = oracle.oracle_attention(q, k, v, bias, mask, scale=1.0)
        np.testing.assert_allclose(out.ravel(), [p @ [3.0, 5.0]])
        np.testing.assert_allclose(lse.ravel(), [np.log(np.exp([1.0, 2.0]).sum())])
        dq, dk, dv, _ = oracle.oracle_grads(q, k, v, bias, mask, dout, scale=1.0)
        assert np.isfinite(dq).all() and np.all(dk.ravel()[2] == 0) and np.all(dv.ravel()[2] == 0)
    # kept, the NaN makes the row NaN, and every gradient the row touches
    out, lse = oracle.oracle_attention(q, k, v, None, None, scale=1.0)
    assert np.isnan(out).all() and np.isnan(lse).all()
    assert all(np.isnan(g).all() for g in oracle.oracle_grads(q, k, v, None, None, dout, scale=1.0)[:3])


def test_oracle_causal_is_bottom_right():
    B, Lq, Lk, H = 1, 2, 4, 1
    keep = oracle.keep_matrix(None, B, H, H, Lq, Lk, True)[0, 0]
    np.testing.assert_array_equal(keep, [[1, 1, 1, 0], [1, 1, 1, 1]])
    keep = oracle.keep_matrix(None, B, H, H, 4, 2, True)[0, 0]
    np.testing.assert_array_equal(keep, [[0, 0], [0, 0], [1, 0], [1, 1]])


def test_oracle_gqa_head_mapping():
    # bias with Hkv heads: query head h uses bias head h // g (and kv head h // g)
    rng = np.random.default_rng(1)
    B, L, H, Hkv, D = 1, 4, 4, 2, 3
    q = rng.standard_normal((B, L, H, D))
    k = rng.standard_normal((B, L, Hkv, D))
    v = rng.standard_normal((B, L, Hkv, D))
    bias = rng.standard_normal((1, Hkv, L, L))
    out, _ = oracle.oracle_attention(q, k, v, bias, None)
    for h in range(H):
        o1, _ = oracle.oracle_attention(q[:, :, h : h + 1], k[:, :, h // 2 : h // 2 + 1],
                                        v[:, :, h // 2 : h // 2 + 1], bias[:, h // 2 : h // 2 + 1], None)
        np.testing.assert_allclose(out[:, :, h : h + 1], o1, rtol=1e-12)


def test_make_mask_block_is_tile_structured():
    rng = np.random.default_rng(2)
    m = make_mask(rng, (2, 1, 130, 200), "block")
    for bq in range(0, 130, 64):
        for bk in range(0, 200, 64):
            t = m[..., bq : bq + 64, bk : bk + 64]
            assert np.all(t.all(axis=(-1, -2)) | (~t).all(axis=(-1, -2)))
