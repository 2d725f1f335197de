"""The CUDA path's Python plumbing, checked without a GPU: forward + backward through ``jax_dmattn.attention``
lowered for the "cuda" platform on any machine, then the custom calls read from the StableHLO text.

This catches, in CI, what the GPU tests would only see on the device: which FFI target each call reaches, which
mask pre-pass / backward path it picks (live-key lists or tile classes), and the workspace output shapes the
handlers check (csrc/ffi/cuda_handlers.cc, csrc/ffi/cuda_bwd_handlers.cc).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import jax_dmattn
from jax_dmattn import _cuda, _ffi

B, L, H, HKV, D = 1, 300, 4, 2, 64


@pytest.fixture(autouse=True)
def _pretend_cuda_kernels(monkeypatch):
    # Lowering emits custom calls by name; it needs no compiled kernel, so a CPU-only build can be checked too.
    monkeypatch.setattr(_ffi, "has_cuda_kernels", lambda: True)


def lowered_calls(bias_shape, mask_shape, *, deterministic=False, grad=True):
    """{target: [the custom call's full StableHLO line, ...]} for fwd (+ bwd) of one attention call."""
    q = jnp.zeros((B, L, H, D), jnp.bfloat16)
    k = jnp.zeros((B, L, HKV, D), jnp.bfloat16)
    bias = None if bias_shape is None else jnp.zeros(bias_shape, jnp.bfloat16)
    mask = None if mask_shape is None else jnp.ones(mask_shape, jnp.bool_)

    def out(q, k, v, b):
        return jax_dmattn.attention(q, k, v, bias=b, mask=mask, is_causal=True, deterministic=deterministic,
                                    implementation="cuda")

    if grad:
        fn = jax.grad(lambda *a: out(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2) + ((3,) if bias_shape else ()))
    else:
        fn = out
    text = jax.jit(fn).trace(q, k, k, bias).lower(lowering_platforms=("cuda",)).as_text()
    calls = {}
    for line in text.splitlines():
        m = re.search(r'custom_call @(\w+)|call_target_name = "(\w+)"', line)
        if m and "dmattn" in line:
            calls.setdefault(m.group(1) or m.group(2), []).append(line)
    return calls


def result_types(line):
    """The result tensor types of a custom-call line, in order."""
    return re.findall(r"tensor<[^>]*>", line.split("->")[-1])


def test_forward_takes_key_lists_for_a_full_key_mask():
    calls = lowered_calls((B, HKV, 1, L), (B, HKV, L, L), grad=False)
    (line,) = calls["dmattn_fwd_cuda"]
    assert "key_lists = true" in line
    n_keys, n_words = _cuda.key_list_sizes((B, HKV, L, L))
    assert n_keys == 2 * 3 * (1 + L) and n_words == 2 * 3 * 5 * 128
    types = result_types(line)
    assert types[2] == "tensor<0xui8>"  # no tile map
    assert types[3] == f"tensor<{n_keys}xi32>" and types[4] == f"tensor<{2 * n_words}xui32>"


def test_forward_takes_tile_classes_for_a_key_broadcast_mask():
    calls = lowered_calls(None, (B, HKV, L, 1), grad=False)
    (line,) = calls["dmattn_fwd_cuda"]
    assert "key_lists = false" in line
    types = result_types(line)
    assert types[2] == f"tensor<{B}x{HKV}x3x1xui8>"  # [Bm, Hm, ceil(L / 128), ceil(1 / 64)]
    assert types[3] == "tensor<0xi32>" and types[4] == "tensor<0xui32>"


def test_forward_without_mask_has_no_pre_pass_outputs():
    (line,) = lowered_calls(None, None, grad=False)["dmattn_fwd_cuda"]
    assert result_types(line)[2:5] == ["tensor<0xui8>", "tensor<0xi32>", "tensor<0xui32>"]


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_path_choice(deterministic):
    calls = lowered_calls((B, HKV, 1, L), (B, HKV, L, L), deterministic=deterministic)
    (line,) = calls["dmattn_bwd_cuda"]
    assert f"deterministic = {str(deterministic).lower()}" in line
    types = result_types(line)
    n_keys, n_words = _cuda.key_list_sizes((B, HKV, L, L))
    # Results: dq, dk, dv, dbias, dq_accum, delta, tile classes, dbias_accum, dkv_accum, key lists, bit words.
    # Both modes take the sparse path here; deterministic mode accumulates int64 fixed-point counts (as uint32
    # pairs) with the stats words after them, the atomic mode fp32.
    assert len(types) == 11
    assert types[4] == "tensor<0xf32>" and types[6] == "tensor<0xui8>"
    assert types[9] == f"tensor<{n_keys}xi32>" and types[10] == f"tensor<{2 * n_words}xui32>"
    if deterministic:
        assert types[8] == f"tensor<{4 * B * L * HKV * D + 8}xui32>"
        assert types[7] == f"tensor<{2 * B * HKV * L}xui32>"  # dbias counts
    else:
        assert types[8] == f"tensor<2x{B}x{L}x{HKV}x{D}xf32>"


def test_backward_full_bias_takes_the_key_tile_path():
    """A bias that varies over query rows needs per-element dbias: the sparse path does not take it."""
    (line,) = lowered_calls((B, HKV, L, L), (B, HKV, L, L))["dmattn_bwd_cuda"]
    types = result_types(line)
    assert types[9] == "tensor<0xi32>" and types[6] == f"tensor<{B}x{HKV}x5x5xui8>"
