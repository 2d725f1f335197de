"""Cached decoding of the DynamicMaskAttention modules (linen and nnx): one token per call over a KV cache gives
what a causal call over the whole sequence gives each token (same top-k of the cached per-key bias), with RoPE, GQA,
a padding mask, without the dynamic bias, and with the errors a caller can hit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flax = pytest.importorskip("flax")
from flax import nnx  # noqa: E402

import jax_dmattn.nnx as jnnx  # noqa: E402
from jax_dmattn.flax import DynamicMaskAttention  # noqa: E402

pytestmark = pytest.mark.cpu_kernels

B, T, E = 2, 20, 32


def _x(seed, shape=(B, T, E)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _linen_steps(model, params, cache, x, mask=None):
    step = jax.jit(lambda c, xt: model.apply({"params": params, "cache": c}, xt, mask, mutable=["cache"]))
    outs = []
    for i in range(x.shape[1]):
        out, upd = step(cache, x[:, i:i + 1])
        cache = upd["cache"]
        outs.append(out)
    return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("window", [None, 5, 100])
@pytest.mark.parametrize("rope", [None, 10000.0])
@pytest.mark.parametrize("dynamic", [True, False])
def test_linen_cached_steps_match_the_full_causal_call(window, rope, dynamic):
    kw = dict(num_heads=4, num_kv_heads=2, window_size=window, rope_theta=rope, use_dynamic_bias=dynamic,
              implementation="cpu")
    x = _x(1)
    full_model = DynamicMaskAttention(**kw)
    params = full_model.init(jax.random.PRNGKey(0), x)["params"]
    if dynamic:  # a bias that varies across keys, so that the top-k selects something
        params = dict(params, A=jnp.asarray([0.7, -1.3], jnp.float32))
    want = full_model.apply({"params": params}, x)

    model = DynamicMaskAttention(decode=True, **kw)
    cache = model.init(jax.random.PRNGKey(0), x)["cache"]  # sizes the cache from the full-length input
    assert cache["cached_key"].shape == (B, T, 2, E // 4)
    assert ("cached_bias" in cache) == dynamic
    got, cache = _linen_steps(model, params, cache, x)
    assert int(cache["cache_index"]) == T
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_linen_decode_with_a_padding_mask():
    """A key-broadcast mask [B, 1, 1, T] hides keys in decoding exactly as in the full call."""
    kw = dict(num_heads=4, num_kv_heads=4, window_size=6, implementation="cpu")
    x = _x(2)
    pad = jnp.asarray(np.random.default_rng(3).random((B, 1, 1, T)) < 0.8)
    full_model = DynamicMaskAttention(**kw)
    params = full_model.init(jax.random.PRNGKey(0), x)["params"]
    params = dict(params, A=jnp.asarray([0.5, -2.0, 1.5, -0.2], jnp.float32))
    want = full_model.apply({"params": params}, x, pad)
    model = DynamicMaskAttention(decode=True, **kw)
    cache = model.init(jax.random.PRNGKey(0), x)["cache"]
    got, _ = _linen_steps(model, params, cache, x, pad)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_linen_decode_errors():
    model = DynamicMaskAttention(num_heads=4, window_size=4, decode=True, implementation="cpu")
    x = _x(4)
    variables = model.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="one token per step"):
        model.apply(variables, x[:, :2], mutable=["cache"])
    with pytest.raises(ValueError, match="broadcast over the query dim"):
        model.apply(variables, x[:, :1], jnp.ones((B, 1, T, T), bool), mutable=["cache"])
    with pytest.raises(ValueError, match="segment_ids"):
        model.apply(variables, x[:, :1], segment_ids=jnp.zeros((B, 1), jnp.int32), mutable=["cache"])
    block = DynamicMaskAttention(num_heads=4, window_size=4, use_block_topk=True, block_q=4, block_k=4, decode=True,
                                 implementation="cpu")
    block_vars = block.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="use_block_topk"):
        block.apply(block_vars, x[:, :1], mutable=["cache"])


@pytest.mark.parametrize("window", [None, 5])
def test_nnx_cached_steps_match_the_full_causal_call(window):
    x = _x(5)
    model = jnnx.DynamicMaskAttention(E, 4, 2, window_size=window, rope_theta=10000.0, implementation="cpu",
                                      rngs=nnx.Rngs(0))
    model.A[...] = jnp.asarray([0.9, -1.1], jnp.float32)
    want = model(x)
    model.init_cache(x.shape)
    step = nnx.jit(lambda m, xt: m(xt, decode=True))
    got = jnp.concatenate([step(model, x[:, i:i + 1]) for i in range(T)], axis=1)
    assert int(model.cache_index[...]) == T
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_nnx_decode_needs_a_cache():
    model = jnnx.DynamicMaskAttention(E, 4, window_size=4, decode=True, implementation="cpu", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="init_cache"):
        model(_x(6)[:, :1])
    model.init_cache(_x(6).shape)
    with pytest.raises(ValueError, match="segment_ids"):
        model(_x(6)[:, :1], segment_ids=jnp.zeros((B, 1), jnp.int32))


def test_generate_example_matches_full_recomputation():
    """examples/generate_lm.py, tiny: cached greedy decoding equals decoding by full recomputation."""
    import importlib.util
    import os
    import sys

    pytest.importorskip("optax")
    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "generate_lm.py")
    spec = importlib.util.spec_from_file_location("generate_lm_example", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    r = mod.main(["--steps", "3", "--seq-len", "24", "--pairs", "2", "--queries", "2", "--num-keys", "4",
                  "--num-values", "4", "--num-filler", "4", "--d-model", "16", "--heads", "2", "--kv-heads", "1",
                  "--layers", "1", "--batch-size", "2", "--window-size", "6", "--implementation", "cpu"])
    assert r["same_tokens"] and r["max_logit_diff"] < 1e-4
