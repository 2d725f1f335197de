"""The live-key list pre-pass is its own FFI call (dmattn_key_lists_cuda) whose results the forward and the key-list
backward take as inputs: XLA's CSE merges the identical calls, so a jitted forward + backward reads the mask once
for its lists, and so do layers that share one mask. Checked on the compiled (optimized) HLO, and the reuse must
change nothing numerically: the gradients equal, bitwise (deterministic=True), those of a backward in a separate
jit, which has to rebuild the lists.

The lowering side (the two calls are identical) is checked without a GPU in tests/test_cuda_lowering.py.

GPU only (skipped elsewhere).
"""
from __future__ import annotations

import functools
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import cuda_kernel_marks, random_topk_mask  # noqa: E402

import jax_dmattn  # noqa: E402

TARGETS = ("dmattn_key_lists_cuda", "dmattn_fwd_cuda", "dmattn_bwd_cuda")
pytestmark = cuda_kernel_marks(*TARGETS)

B, L, H, HKV, D, TOPK = 2, 512, 4, 2, 64, 32


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32).astype(jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((B, L, HKV, D)), jnp.float32).astype(jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((B, L, HKV, D)), jnp.float32).astype(jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal((B, HKV, 1, L)), jnp.float32).astype(jnp.bfloat16)  # per key
    mask = jnp.asarray(random_topk_mask(rng, (B, HKV, L, L), TOPK))
    return q, k, v, bias, mask


def loss(q, k, v, bias, mask, *, layers=1):
    x = q
    for _ in range(layers):
        x = jax_dmattn.attention(x, k, v, bias=bias, mask=mask, is_causal=True, deterministic=True,
                                 implementation="cuda")
    return x.astype(jnp.float32).sum()


def n_key_list_calls(compiled_text: str) -> int:
    return len(re.findall(r'custom_call_target="dmattn_key_lists_cuda"', compiled_text))


def joint(layers):
    return jax.jit(jax.value_and_grad(functools.partial(loss, layers=layers), argnums=(0, 1, 2, 3)))


@pytest.mark.parametrize("layers", [1, 2], ids=["one_layer", "two_layers_one_mask"])
def test_compiled_step_builds_the_key_lists_once(layers):
    args = inputs()
    text = joint(layers).lower(*args).compile().as_text()
    assert "dmattn_fwd_cuda" in text and "dmattn_bwd_cuda" in text
    assert n_key_list_calls(text) == 1


@pytest.mark.parametrize("layers", [1, 2], ids=["one_layer", "two_layers_one_mask"])
def test_reuse_changes_nothing_numerically(layers):
    args = inputs(seed=layers)
    q, k, v, bias, mask = args
    value, grads = joint(layers)(*args)

    # The forward in its own jit: the backward's jit has to rebuild the lists (no CSE across jits).
    fwd = jax.jit(lambda q, k, v, b, m: jax.vjp(functools.partial(loss, mask=m, layers=layers), q, k, v, b))
    bwd = jax.jit(lambda pullback: pullback(jnp.ones((), jnp.float32)))
    value_sep, pullback = fwd(q, k, v, bias, mask)
    assert n_key_list_calls(bwd.lower(pullback).compile().as_text()) == 1
    grads_sep = bwd(pullback)

    assert np.asarray(value) == np.asarray(value_sep)
    for name, g, g_sep in zip(("dq", "dk", "dv", "dbias"), grads, grads_sep):
        g, g_sep = np.asarray(g.astype(jnp.float32)), np.asarray(g_sep.astype(jnp.float32))
        assert np.isfinite(g).all(), name
        assert np.abs(g).max() > 0, name
        np.testing.assert_array_equal(g, g_sep, err_msg=name)
