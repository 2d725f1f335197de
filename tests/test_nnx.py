"""jax_dmattn.nnx.DynamicMaskAttention: shapes, linen parity, gradients, jit, checkpoints."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import nnx  # noqa: E402

import jax_dmattn  # noqa: E402
import jax_dmattn.flax as jflax  # noqa: E402
from jax_dmattn.masks import TopKMask  # noqa: E402
from jax_dmattn.nnx import DynamicMaskAttention  # noqa: E402
from test_flax import dense_attention_inputs, padding_masks, spy_attention  # noqa: E402

# float32 modules and calls with float32 tolerances: on a GPU host they run on the CPU device (tests/conftest.py)
pytestmark = pytest.mark.cpu_kernels

B, L, E = 2, 24, 32


def _x(seed=0, shape=(B, L, E)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _linen_twin(**kw):
    return jflax.DynamicMaskAttention(4, 2, 8, 6, **kw)


def _nnx(seed=0, **kw):
    return DynamicMaskAttention(E, 4, 2, 8, 6, rngs=nnx.Rngs(seed), **kw)


def _pure(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _load(model, pure):
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def test_param_shapes_match_linen():
    model = nnx.eval_shape(lambda: _nnx())
    shapes = jax.tree.map(lambda a: a.shape, _pure(model))
    assert shapes == {
        "q_proj": {"kernel": (E, 4, 8)},
        "k_proj": {"kernel": (E, 2, 8)},
        "v_proj": {"kernel": (E, 2, 8)},
        "o_proj": {"kernel": (4, 8, E)},
        "dt_proj": {"kernel": (2, 8), "bias": (2,)},
        "A": (2,),
    }
    linen = jax.eval_shape(_linen_twin().init, jax.random.key(0), _x())["params"]
    assert jax.tree.map(lambda a: a.shape, linen) == shapes
    dense = nnx.eval_shape(lambda: DynamicMaskAttention(E, 4, use_dynamic_bias=False, rngs=nnx.Rngs(0)))
    assert set(_pure(dense)) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert dense.head_dim == 8 and dense.num_kv_heads == 4


@pytest.mark.parametrize("kw", [dict(rope_theta=10000.0), dict(use_block_topk=True, block_q=8, block_k=8)])
def test_same_math_as_linen(kw):
    x = _x(1)
    linen_mod = _linen_twin(dt_kernel_init=jax.nn.initializers.normal(1.0), **kw)
    params = jax.jit(linen_mod.init)(jax.random.key(0), x)["params"]
    ref = jax.jit(linen_mod.apply)({"params": params}, x)
    model = _nnx(**kw)
    _load(model, params)
    out = nnx.jit(lambda m, x: m(x))(model, x)
    assert out.shape == (B, L, E)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # with a padding mask
    pad = (jnp.arange(L)[None, :] < jnp.array([[L], [L - 5]]))[:, None, None, :]
    ref = jax.jit(linen_mod.apply)({"params": params}, x, pad)
    out = nnx.jit(lambda m, x, pad: m(x, pad))(model, x, pad)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_gradients_finite_and_nonzero():
    model = _nnx(rope_theta=10000.0)
    x = _x(2)

    @nnx.jit
    def step(m, x):
        return nnx.grad(lambda m: jnp.mean(m(x) ** 2))(m)

    grads = step(model, x)
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads)):
        g = np.asarray(g)
        assert np.isfinite(g).all(), path
        assert np.abs(g).max() > 0, path


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_compact_path_matches_dense_path(monkeypatch, is_causal, padded):
    b, n = 4, 40
    mask = padding_masks(b, n) if padded else None
    model = _nnx(is_causal=is_causal, rope_theta=10000.0, implementation="xla",
                 dt_kernel_init=jax.nn.initializers.normal(1.0))
    x = _x(5, (b, n, E))

    def run():  # fresh jits each time: the two paths must not share a trace
        out = nnx.jit(lambda m: m(x, mask))(model)
        grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, mask) ** 2)))(model)
        return out, nnx.to_pure_dict(grads)

    calls = []
    spy_attention(monkeypatch, calls)
    out, grads = run()
    assert calls and all(isinstance(mk, TopKMask) for _, mk in calls)
    monkeypatch.setattr(jflax, "dynamic_attention_inputs", dense_attention_inputs)  # shared by linen and nnx
    calls.clear()
    ref, ref_grads = run()
    assert calls and all(mk.dtype == jnp.bool_ for _, mk in calls)

    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    flat, ref_flat = (dict(jax.tree_util.tree_leaves_with_path(t)) for t in (grads, ref_grads))
    assert flat.keys() == ref_flat.keys()
    for path, g in flat.items():
        assert np.isfinite(g).all(), path
        np.testing.assert_allclose(g, ref_flat[path], rtol=1e-6, atol=1e-6, err_msg=str(path))


def test_optimizer_step_and_intermediates():
    optax = pytest.importorskip("optax")
    model = _nnx()
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x = _x(3)

    @nnx.jit
    def train_step(m, opt, x):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - x) ** 2))(m)
        opt.update(m, g)
        return loss

    losses = [float(train_step(model, opt, x)) for _ in range(3)]
    assert losses[-1] < losses[0]
    if hasattr(nnx, "capture"):
        model = _nnx(sow_bias=True)
        _, inter = nnx.capture(model, nnx.Intermediate)(x)
        (bias,) = jax.tree.leaves(inter)
        assert bias.shape == (B, 2, 1, L) and bias.dtype == jnp.float32


def test_checkpoint_roundtrip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    model = _nnx(seed=0)
    x = _x(4)
    state = nnx.state(model, nnx.Param)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "state", state)
    ckpt.wait_until_finished()
    other = _nnx(seed=1)
    # Restored onto the devices the live state is on (orbax would pick the default backend's otherwise).
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = ckpt.restore(tmp_path / "state", abstract)
    nnx.update(other, restored)
    f = nnx.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(f(other, x), f(model, x))


def test_errors():
    with pytest.raises(ValueError, match="num_kv_heads"):
        DynamicMaskAttention(E, 4, 3, rngs=nnx.Rngs(0))
    model = _nnx()
    with pytest.raises(ValueError, match="x must be"):
        model(jnp.ones((B, L, E + 1)))


# --------------------------------------------------------------------------
# make_attention_fn as the attention_fn of flax.nnx.MultiHeadAttention
# --------------------------------------------------------------------------


def _nnx_mha(attention_fn, decode=False):
    return nnx.MultiHeadAttention(num_heads=4, in_features=E, qkv_features=32, attention_fn=attention_fn,
                                  decode=decode, rngs=nnx.Rngs(0))


def _by_hand(mha, x, **attention_kw):
    """mha's projections around a direct jax_dmattn.attention call."""
    q, k, v = mha.query(x), mha.key(x), mha.value(x)
    return mha.out(jax_dmattn.attention(q, k, v, **attention_kw))


def test_nnx_mha_bound_causal():
    """nnx passes is_causal=False on every call; a bound is_causal=True must survive it."""
    x = _x(20)
    mha = _nnx_mha(jflax.make_attention_fn(is_causal=True))
    out = mha(x)
    causal = _by_hand(mha, x, is_causal=True)
    np.testing.assert_allclose(out, causal, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, _by_hand(mha, x, is_causal=False), atol=1e-3)
    # the module's own is_causal=True agrees with the bound value; under nnx.jit too
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x, is_causal=True))(mha, x), causal, rtol=1e-5, atol=1e-5)
    # nothing bound: the module's call-time value decides
    unbound = _nnx_mha(jflax.make_attention_fn())
    np.testing.assert_allclose(unbound(x), _by_hand(unbound, x, is_causal=False), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(unbound(x, is_causal=True), causal, rtol=1e-5, atol=1e-5)
    # and the plain drop-in takes nnx's keyword as it is
    plain = _nnx_mha(jflax.attention_fn)
    np.testing.assert_allclose(plain(x, is_causal=True), causal, rtol=1e-5, atol=1e-5)


def test_nnx_mha_bound_causal_decode():
    """During decode nnx passes is_causal=False and a cache mask; a bound True still gives causal steps."""
    x = _x(21, (B, 6, E))
    fn = jflax.make_attention_fn(is_causal=True)
    full = _nnx_mha(fn)(x)
    mha = _nnx_mha(fn, decode=True)
    mha.init_cache(x.shape)
    steps = [mha(x[:, i:i + 1]) for i in range(x.shape[1])]
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)


def test_nnx_mha_contradicting_causal_raises():
    x = _x(22)
    mha = _nnx_mha(jflax.make_attention_fn(is_causal=False))
    np.testing.assert_allclose(mha(x), _by_hand(mha, x, is_causal=False), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"is_causal=True.*is_causal=False"):
        mha(x, is_causal=True)
    with pytest.raises(TypeError, match="is_causal"):
        jflax.make_attention_fn(is_causal="yes")
    with pytest.raises(TypeError, match="is_causal"):
        jflax.make_attention_fn(is_causal=True)(*(jnp.ones((1, 4, 2, 8)),) * 3, is_causal=1)
