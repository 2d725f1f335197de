"""jax_dmattn.flax: DynamicMaskAttention (linen) and the attention_fn drop-in."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flax = pytest.importorskip("flax")
import flax.linen as nn  # noqa: E402

import jax_dmattn  # noqa: E402
import jax_dmattn.flax as jflax  # noqa: E402
from jax_dmattn.flax import (  # noqa: E402
    DynamicMaskAttention,
    apply_rope,
    attention_fn,
    dynamic_mask,
    make_attention_fn,
)
from jax_dmattn.masks import TopKMask, block_topk_mask, topk_mask  # noqa: E402

# float32 modules and calls with float32 tolerances: on a GPU host they run on the CPU device (tests/conftest.py)
pytestmark = pytest.mark.cpu_kernels

B, L, E = 2, 24, 32


def _x(seed=0, shape=(B, L, E), dtype=jnp.float32):
    # numpy RNG: eager jax.random calls each compile, which is slow on a small CPU
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


# --------------------------------------------------------------------------
# dense reference of the module math (independent of the kernels)
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("h", "hkv", "d", "window", "is_causal", "rope_theta", "block"))
def reference_module(p, x, *, h, hkv, d, window, is_causal=True, rope_theta=None, mask=None,
                     block=None):
    q = jnp.einsum("ble,ehd->blhd", x, p["q_proj"]["kernel"])
    k = jnp.einsum("ble,ehd->blhd", x, p["k_proj"]["kernel"])
    v = jnp.einsum("ble,ehd->blhd", x, p["v_proj"]["kernel"])
    if rope_theta is not None:
        pos = jnp.arange(x.shape[1])
        q, k = apply_rope(q, pos, rope_theta), apply_rope(k, pos, rope_theta)
    dt = jnp.einsum("blhd,hd->bhl", v, p["dt_proj"]["kernel"]) + p["dt_proj"]["bias"][None, :, None]
    bias = (p["A"][None, :, None] * jax.nn.softplus(dt))[:, :, None, :]  # [B, Hkv, 1, L]
    n = x.shape[1]
    allowed = jnp.ones((1, 1, n, n), bool)
    if is_causal:
        allowed = jnp.tril(allowed)
    if mask is not None:
        allowed = allowed & mask
    if window is not None and window < n:
        if block is None:
            sel = topk_mask(bias, window, mask=mask, is_causal=is_causal, query_len=n)
        else:
            sel = block_topk_mask(bias, window, block_q=block, block_k=block, mask=mask,
                                  is_causal=is_causal, query_len=n)
        allowed = allowed & sel
    g = h // hkv
    kk = jnp.repeat(k, g, axis=2)
    vv = jnp.repeat(v, g, axis=2)
    bb = jnp.repeat(bias, g, axis=1)
    allowed = jnp.broadcast_to(allowed, (x.shape[0], allowed.shape[1], n, n))
    if allowed.shape[1] not in (1, h):
        allowed = jnp.repeat(allowed, g, axis=1)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kk) * d**-0.5 + bb
    s = jnp.where(allowed, s, -jnp.inf)
    pr = jax.nn.softmax(s, axis=-1)
    pr = jnp.where(allowed.any(-1, keepdims=True), pr, 0.0)
    o = jnp.einsum("bhqk,bkhd->bqhd", pr, vv)
    return jnp.einsum("bqhd,hde->bqe", o, p["o_proj"]["kernel"])


# --------------------------------------------------------------------------
# DynamicMaskAttention
# --------------------------------------------------------------------------


def test_param_shapes_gqa():
    m = DynamicMaskAttention(num_heads=4, num_kv_heads=2, head_dim=16, window_size=8)
    params = jax.eval_shape(m.init, jax.random.key(0), _x())["params"]
    shapes = jax.tree.map(lambda a: a.shape, params)
    assert shapes == {
        "q_proj": {"kernel": (E, 4, 16)},
        "k_proj": {"kernel": (E, 2, 16)},
        "v_proj": {"kernel": (E, 2, 16)},
        "o_proj": {"kernel": (4, 16, E)},
        "dt_proj": {"kernel": (2, 16), "bias": (2,)},
        "A": (2,),
    }
    # defaults: Hkv = H, D = E // H; options
    m2 = DynamicMaskAttention(4, out_features=12, use_proj_bias=True, param_dtype=jnp.bfloat16)
    p2 = jax.eval_shape(m2.init, jax.random.key(0), _x())["params"]
    assert p2["q_proj"]["kernel"].shape == (E, 4, 8) and p2["q_proj"]["bias"].shape == (4, 8)
    assert p2["o_proj"]["kernel"].shape == (4, 8, 12)
    assert p2["A"].dtype == jnp.bfloat16
    # dense baseline: no dynamic-bias parameters
    m3 = DynamicMaskAttention(4, use_dynamic_bias=False)
    p3 = jax.eval_shape(m3.init, jax.random.key(0), _x())["params"]
    assert set(p3) == {"q_proj", "k_proj", "v_proj", "o_proj"}


@pytest.mark.parametrize(
    "h,hkv,window,is_causal,rope,block",
    [
        (4, 2, 6, True, 10000.0, None),
        (2, 1, 5, False, None, None),
        (4, 4, 10, True, None, 8),
        (4, 2, 100, True, None, None),  # window >= L: no top-k mask
    ],
)
def test_forward_matches_reference(h, hkv, window, is_causal, rope, block):
    d = 8
    m = DynamicMaskAttention(h, hkv, d, window, is_causal=is_causal, rope_theta=rope,
                             use_block_topk=block is not None, block_q=block or 128,
                             block_k=block or 128, dt_kernel_init=nn.initializers.normal(1.0))
    x = _x(1)
    params = jax.jit(m.init)(jax.random.key(0), x)["params"]
    out = jax.jit(m.apply)({"params": params}, x)
    ref = reference_module(params, x, h=h, hkv=hkv, d=d, window=window, is_causal=is_causal,
                           rope_theta=rope, block=block)
    assert out.shape == (B, L, E) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_padding_and_per_head_mask():
    m = DynamicMaskAttention(4, 2, 8, 5, dt_kernel_init=nn.initializers.normal(1.0))
    x = _x(2)
    params = jax.jit(m.init)(jax.random.key(0), x)["params"]
    valid = jnp.arange(L)[None, :] < jnp.array([[L], [L - 7]])  # [B, L]
    pad = valid[:, None, None, :]  # [B, 1, 1, L]
    out = jax.jit(m.apply)({"params": params}, x, pad)
    ref = reference_module(params, x, h=4, hkv=2, d=8, window=5, mask=pad)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    # per-query-head mask [B, H, L, L] with H != Hkv
    head_mask = jnp.asarray((np.random.default_rng(3).random((B, 4, L, L)) < 0.8) | np.eye(L, dtype=bool))
    out = jax.jit(m.apply)({"params": params}, x, head_mask)
    ref = reference_module(params, x, h=4, hkv=2, d=8, window=5, mask=head_mask)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_gradients_finite_and_nonzero():
    m = DynamicMaskAttention(4, 2, 8, 6, rope_theta=10000.0)
    x = _x(4)
    params = jax.jit(m.init)(jax.random.key(0), x)["params"]

    @jax.jit
    def loss(p):
        return jnp.mean(m.apply({"params": p}, x) ** 2)

    grads = jax.grad(loss)(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        assert np.isfinite(g).all(), path
        assert np.abs(g).max() > 0, path

    # matches autodiff through the dense reference
    ref_grads = jax.jit(jax.grad(
        lambda p: jnp.mean(reference_module(p, x, h=4, hkv=2, d=8, window=6, rope_theta=10000.0) ** 2)
    ))(params)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_bf16_and_sow():
    m = DynamicMaskAttention(4, 2, 8, 6, dtype=jnp.bfloat16)
    x = _x(5)
    params = jax.jit(m.init)(jax.random.key(0), x)["params"]
    out, state = jax.jit(functools.partial(m.apply, mutable=["intermediates"]))({"params": params}, x)
    assert out.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out, np.float32)).all()
    (bias,) = state["intermediates"]["dynamic_bias"]
    assert bias.shape == (B, 2, 1, L) and bias.dtype == jnp.float32


def test_checkpoint_roundtrip(tmp_path):
    from flax import serialization

    m = DynamicMaskAttention(4, 2, 8, 6)
    x = _x(6)
    params = jax.jit(m.init)(jax.random.key(0), x)["params"]
    blob = serialization.to_bytes(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    restored = serialization.from_bytes(zeros, blob)
    np.testing.assert_array_equal(m.apply({"params": restored}, x), m.apply({"params": params}, x))

    ocp = pytest.importorskip("orbax.checkpoint")
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "params", params)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "params", zeros)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_module_errors():
    with pytest.raises(ValueError, match="num_kv_heads"):
        jax.eval_shape(DynamicMaskAttention(4, 3).init, jax.random.key(0), _x())
    with pytest.raises(ValueError, match="head_dim"):
        jax.eval_shape(DynamicMaskAttention(5).init, jax.random.key(0), _x())
    with pytest.raises(ValueError, match="x must be"):
        jax.eval_shape(DynamicMaskAttention(4).init, jax.random.key(0), jnp.ones((L, E)))


# --------------------------------------------------------------------------
# the compact TopKMask path against the dense bool-mask path
# --------------------------------------------------------------------------


def dense_attention_inputs(bias, window_size, *, mask, segment_ids=None, **kw):
    """What the modules passed to attention before the compact path: the bias and the dense bool mask (the tests
    that swap it in pass no segment ids)."""
    assert segment_ids is None
    return bias, dynamic_mask(bias, window_size, mask=mask, **kw)


def padding_masks(b, n):
    """Key-broadcast masks [b, 1, 1, n] for b >= 4: full, right-padded, left-padded (causal rows with no
    visible key), every key hidden (rows with no key at all)."""
    valid = np.ones((b, n), bool)
    valid[1, n - 9:] = False
    valid[2, :7] = False
    valid[2, n // 2: n // 2 + 3] = False
    valid[3] = False
    return jnp.asarray(valid)[:, None, None, :]


def key_masks(b, h, n):
    """None, a padding mask, a shared [n] key mask and a per-query-head key mask [b, h, 1, n]."""
    per_head = np.random.default_rng(21).random((b, h, 1, n)) < 0.6
    return {
        "none": None,
        "padding": padding_masks(b, n),
        "shared": jnp.asarray(np.arange(n) % 5 != 3),
        "per_head": jnp.asarray(per_head),
    }


def spy_attention(monkeypatch, calls, stub=False):
    """Record the (bias, mask) every jax_dmattn.attention call gets; stub=True returns zeros instead of
    attending (so a traced program holds only what the module built)."""
    real = jax_dmattn.attention

    def spy(q, k, v, bias=None, mask=None, **kw):
        calls.append((bias, mask))
        return jnp.zeros_like(q) if stub else real(q, k, v, bias, mask, **kw)

    monkeypatch.setattr(jax_dmattn, "attention", spy)


def jaxpr_shapes(jaxpr):
    """Shapes of every value in a jaxpr, nested jaxprs (jit, custom_vjp, scan, ...) included."""
    for v in list(jaxpr.invars) + list(jaxpr.constvars):
        yield tuple(v.aval.shape)
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield tuple(getattr(v.aval, "shape", ()))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    yield from jaxpr_shapes(sub)


def has_square(closed_jaxpr, n):
    return any(len(s) >= 2 and s[-2:] == (n, n) for s in jaxpr_shapes(closed_jaxpr.jaxpr))


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("mask_name", ["none", "padding", "shared", "per_head"])
def test_compact_path_matches_dense_path(monkeypatch, is_causal, mask_name):
    b, n = 4, 40
    mask = key_masks(b, 4, n)[mask_name]
    m = DynamicMaskAttention(4, 2, 8, 6, is_causal=is_causal, rope_theta=10000.0, implementation="xla",
                             dt_kernel_init=nn.initializers.normal(1.0))
    x = _x(30, (b, n, E))
    params = jax.jit(m.init)(jax.random.key(0), x)["params"]

    def run():  # fresh jits each time: the two paths must not share a trace
        out = jax.jit(lambda p: m.apply({"params": p}, x, mask))(params)
        grads = jax.jit(jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x, mask) ** 2)))(params)
        return out, grads

    calls = []
    spy_attention(monkeypatch, calls)
    out, grads = run()
    assert calls and all(isinstance(mk, TopKMask) for _, mk in calls)
    monkeypatch.setattr(jflax, "dynamic_attention_inputs", dense_attention_inputs)
    calls.clear()
    ref, ref_grads = run()
    assert calls and all(mk.dtype == jnp.bool_ for _, mk in calls)

    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        r = ref_grads
        for k in path:
            r = r[k.key]
        assert np.isfinite(g).all(), path
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6, err_msg=str(path))


def test_compact_path_builds_no_square_array(monkeypatch):
    b, n = 2, 256
    x = _x(31, (b, n, E))
    pad = padding_masks(4, n)[1:3]
    calls = []
    spy_attention(monkeypatch, calls, stub=True)

    def jaxpr(mask=None, **kw):
        m = DynamicMaskAttention(4, 2, 8, 32, **kw)
        params = jax.eval_shape(m.init, jax.random.key(0), x)["params"]
        calls.clear()
        return jax.make_jaxpr(lambda p: m.apply({"params": p}, x, mask))(params)

    for is_causal in (True, False):
        for mask in (None, pad):
            assert not has_square(jaxpr(mask, is_causal=is_causal), n)
            ((bias, mk),) = calls
            assert isinstance(mk, TopKMask) and mk.k == 32 and mk.scores.shape == (b, 2, n)
            assert bias.shape == (b, 2, 1, n)
    # the scan does see [n, n] arrays where the module still builds them
    assert has_square(jaxpr(use_block_topk=True, block_q=64, block_k=64), n)
    monkeypatch.setattr(jflax, "dynamic_attention_inputs", dense_attention_inputs)
    assert has_square(jaxpr(pad), n)


@pytest.mark.parametrize("kw", [dict(), dict(is_causal=False)])
def test_segment_ids_equal_separate_documents(kw):
    """Packed documents (segment_ids) give each document's tokens what the module gives that document alone:
    attention and the top-k both stay inside the document. (Block top-k is not in this list: its blocks pool
    scores across a document boundary, so packing changes which blocks win.)"""
    docs = (20, 9, 35)
    n = sum(docs)
    m = DynamicMaskAttention(4, 2, 8, 6, dt_kernel_init=nn.initializers.normal(1.0), implementation="xla", **kw)
    x = _x(40, (2, n, E))
    params = jax.jit(m.init)(jax.random.key(0), x)["params"]
    seg = jnp.asarray(np.repeat(np.arange(len(docs)), docs)[None].repeat(2, 0), jnp.int32)
    packed = jax.jit(lambda p, x, s: m.apply({"params": p}, x, segment_ids=s))(params, x, seg)
    start = 0
    for d in docs:
        alone = m.apply({"params": params}, x[:, start:start + d])
        np.testing.assert_allclose(packed[:, start:start + d], alone, rtol=1e-5, atol=1e-5)
        start += d
    # without the ids the documents mix: the test can fail
    assert not np.allclose(m.apply({"params": params}, x)[:, docs[0]:], packed[:, docs[0]:], atol=1e-3)


def test_segment_ids_on_the_cpu_kernels_match_xla():
    docs = (50, 14, 64)
    n = sum(docs)
    seg = jnp.asarray(np.repeat(np.arange(len(docs)), docs)[None].repeat(2, 0), jnp.int32)
    x = _x(41, (2, n, E))
    outs = []
    for impl in ("xla", "cpu"):
        m = DynamicMaskAttention(4, 2, 8, 8, dt_kernel_init=nn.initializers.normal(1.0), implementation=impl)
        params = jax.jit(m.init)(jax.random.key(0), x)["params"]
        f = jax.jit(jax.value_and_grad(lambda p: jnp.sum(m.apply({"params": p}, x, segment_ids=seg) ** 2)))
        outs.append(f(params))
    (v0, g0), (v1, g1) = outs
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):  # norm-wise: fp32 sums in another order
        assert np.linalg.norm(np.asarray(a) - np.asarray(b)) <= 1e-5 * np.linalg.norm(np.asarray(b))


# --------------------------------------------------------------------------
# attention_fn drop-in
# --------------------------------------------------------------------------


def _mha(attention_fn_=nn.dot_product_attention, **kw):
    return nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32, attention_fn=attention_fn_, **kw)


def test_drop_in_matches_flax_self_attention_causal():
    x = _x(7)
    mask = nn.make_causal_mask(jnp.ones((B, L)))
    ref_mod = _mha()
    params = jax.jit(ref_mod.init)(jax.random.key(0), x, mask=mask)
    ref = jax.jit(ref_mod.apply)(params, x, mask=mask)
    out = jax.jit(_mha(attention_fn).apply)(params, x, mask=mask)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    # the same through is_causal instead of a mask
    out2 = jax.jit(_mha(make_attention_fn(is_causal=True)).apply)(params, x)
    np.testing.assert_allclose(out2, ref, rtol=2e-5, atol=2e-5)
    # gradients agree too
    g_ref = jax.jit(jax.grad(lambda p: jnp.sum(ref_mod.apply(p, x, mask=mask) ** 2)))(params)
    g_out = jax.jit(jax.grad(lambda p: jnp.sum(_mha(attention_fn).apply(p, x, mask=mask) ** 2)))(params)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_ref))
    for a, b in zip(jax.tree.leaves(g_out), jax.tree.leaves(g_ref)):
        # (the key-projection bias gradient is mathematically 0: compare at the global scale)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_drop_in_bound_causal_keeps_flax_keywords():
    """linen passes only the keywords in attention_fn's signature: make_attention_fn's function keeps them all
    (a mask still arrives), and its bound is_causal combines with that mask."""
    import inspect

    fn = make_attention_fn(is_causal=True, softcap=30.0)
    params_ = inspect.signature(fn).parameters
    assert set(params_) == set(inspect.signature(attention_fn).parameters)
    assert params_["is_causal"].default is True and params_["softcap"].default == 30.0
    x = _x(8)
    pad = (jnp.arange(L)[None, :] < jnp.array([[L], [L - 5]]))[:, None, None, :]
    params = jax.jit(_mha().init)(jax.random.key(0), x)
    out = jax.jit(_mha(make_attention_fn(is_causal=True)).apply)(params, x, mask=pad)
    ref = jax.jit(_mha(attention_fn).apply)(params, x, mask=pad & nn.make_causal_mask(jnp.ones((B, L)), dtype=bool))
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_drop_in_direct_call_multi_batch_bias_mask():
    batch = (2, 3)
    q = _x(12, batch + (7, 4, 16))
    k = _x(13, batch + (11, 4, 16))
    v = _x(14, batch + (11, 4, 16))
    bias = _x(15, (2, 1, 4, 7, 11))  # partly broadcast batch dims
    mask = jnp.asarray((np.random.default_rng(16).random((1, 3, 1, 7, 11)) < 0.7) | (np.arange(11) == 0))
    ref = jax.jit(nn.dot_product_attention)(q, k, v, bias=bias, mask=mask)
    out = jax.jit(attention_fn)(q, k, v, bias=bias, mask=mask)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    # no batch dims at all, rank-2 bias
    ref = jax.jit(nn.dot_product_attention)(q[0, 0], k[0, 0], v[0, 0], bias=bias[0, 0, 0])
    out = jax.jit(attention_fn)(q[0, 0], k[0, 0], v[0, 0], bias=bias[0, 0, 0])
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_drop_in_cross_attention_dtype():
    xq, xkv = _x(9, (B, 6, E)), _x(10, (B, 13, E))
    mod = _mha(dtype=jnp.bfloat16)
    params = jax.jit(mod.init)(jax.random.key(0), xq, xkv)
    ref = jax.jit(mod.apply)(params, xq, xkv)
    out = jax.jit(_mha(attention_fn, dtype=jnp.bfloat16).apply)(params, xq, xkv)
    assert out.dtype == ref.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=3e-2, atol=3e-2)


def test_drop_in_errors():
    x = _x(11)
    mod = _mha(attention_fn, dropout_rate=0.1)
    params = jax.jit(_mha().init)(jax.random.key(0), x)
    with pytest.raises(ValueError, match="dropout"):
        mod.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    # deterministic=True is fine with a dropout rate set
    mod.apply(params, x, deterministic=True)
    with pytest.raises(ValueError, match="sow"):
        _mha(attention_fn).apply(params, x, sow_weights=True)
    q = jnp.ones((2, 5, 4, 8))
    with pytest.raises(ValueError, match="einsum"):
        attention_fn(q, q, q, einsum_dot_general=jax.lax.dot_general)
    with pytest.raises(ValueError, match="batch"):
        attention_fn(q, q[:1], q[:1])


# --------------------------------------------------------------------------
# the training example, a handful of steps
# --------------------------------------------------------------------------


def test_train_lm_example_smoke(tmp_path):
    import importlib.util
    import os

    pytest.importorskip("optax")
    pytest.importorskip("orbax.checkpoint")
    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "train_lm.py")
    spec = importlib.util.spec_from_file_location("train_lm_example", path)
    mod = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    tiny = ["--seq-len", "48", "--pairs", "3", "--queries", "2", "--num-keys", "6", "--num-values", "6",
            "--num-filler", "6", "--d-model", "16", "--heads", "2", "--kv-heads", "1", "--layers", "1",
            "--batch-size", "2", "--window-size", "8", "--eval-every", "2", "--eval-batches", "1",
            "--quiet", "--out-dir", str(tmp_path)]
    # one mode keeps this fast (compiles dominate); "both" only adds the dense model's compile
    (r,) = mod.main(["--steps", "2", "--attention", "dynamic"] + tiny)
    assert r["mode"] == "dynamic" and r["history"]["step"] == [1, 2]
    assert np.isfinite(r["eval_loss"]) and r["checkpoint_restore_matches"] is True
    assert 0 < r["kept_key_fraction"] < 1
    assert (tmp_path / "metrics.json").exists()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "loss_curve.png").exists()
