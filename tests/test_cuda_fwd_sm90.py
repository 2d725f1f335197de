"""The Hopper forward (csrc/cuda/sm90/): calls without a mask on a compute-capability-9.0 GPU.

Every case runs twice, through the default route (the Hopper forward serves every call without a mask) and with the
sm80 kernels forced (JAX_DMATTN_CUDA_KERNELS=sm80), against the float32 reference; each route must really reach the
kernels it names on such a device (the Hopper forward's launch counter moves or not). Covers head dims 64, 128,
256 (and 96, which stays on the sm80 kernels), both dtypes, GQA, Lq != Lk both ways (bottom-right causal, rows with no
key), odd lengths, softcap and every bias broadcast and dtype, and gradients through the public API (the backward
reads the Hopper forward's lse).

GPU only (skipped elsewhere).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import cuda_kernel_marks, hopper_kernels_available, rel_err_same_infinities as rel_err, sm90_launches
from jax_dmattn import reference

pytestmark = cuda_kernel_marks("dmattn_fwd_cuda")

F32 = jnp.float32
TOL = {jnp.bfloat16: 1e-2, jnp.float16: 3e-3}


def assert_route(out, before, kernel_route, *, hopper_head_dim=True):
    """The call that gave ``out`` ran the Hopper forward exactly when it should: on the default route of a device with
    the Hopper kernels, for their head dims (``before``: the launch counter before the call)."""
    jax.block_until_ready(out)
    served = sm90_launches("fwd") > before
    hopper = hopper_kernels_available() and hopper_head_dim and kernel_route == "default"
    assert served == hopper, (f"route {kernel_route}: the Hopper forward "
                              f"{'did not serve' if hopper else 'served'} the call")


def bias_of(key, code, dtype, b, lq, lk, h, hkv):
    dims = {"B": b, "H": h, "K": hkv, "M": lq, "N": lk, "1": 1}
    return (2.0 * jax.random.normal(key, tuple(dims[c] for c in code), F32)).astype(dtype)


# (B, Lq, Lk, H, Hkv, D, dtype, causal, softcap, bias (shape code, dtype) or None)
CASES = [
    (1, 256, 256, 4, 1, 128, jnp.bfloat16, True, 0.0, None),
    (2, 300, 300, 8, 2, 128, jnp.bfloat16, True, 0.0, ("BK1N", jnp.bfloat16)),   # the paper's per-key bias, GQA 4
    (1, 1000, 1000, 4, 4, 64, jnp.float16, True, 0.0, ("BHMN", jnp.float32)),    # full bias, MHA
    (2, 77, 203, 4, 2, 128, jnp.float16, True, 0.0, ("1KMN", jnp.float16)),      # Lq < Lk, batch-broadcast bias
    (1, 333, 129, 2, 1, 64, jnp.bfloat16, True, 0.0, ("B11N", jnp.float32)),     # Lq > Lk: top rows see no key
    (1, 129, 517, 6, 3, 256, jnp.bfloat16, False, 0.0, ("BKM1", jnp.bfloat16)),  # key-broadcast bias, D = 256
    (1, 250, 250, 2, 2, 256, jnp.float16, True, 0.0, None),
    (1, 128, 512, 4, 2, 64, jnp.bfloat16, False, 30.0, ("BK1N", jnp.bfloat16)),   # softcap
    (1, 64, 64, 2, 1, 128, jnp.float16, True, 5.0, ("11MN", jnp.bfloat16)),
    (3, 1, 700, 4, 2, 128, jnp.bfloat16, True, 0.0, ("BK1N", jnp.bfloat16)),     # one query row (decode)
    (2, 200, 333, 8, 2, 64, jnp.float16, True, 0.0, ("1H1N", jnp.float16)),      # per-key bias per query head
    (1, 260, 1000, 2, 1, 256, jnp.bfloat16, True, 0.0, ("111N", jnp.float32)),   # one f32 bias row for all heads
    (1, 513, 1, 2, 2, 64, jnp.bfloat16, False, 0.0, None),                       # one key
    (2, 190, 260, 4, 2, 96, jnp.bfloat16, True, 0.0, ("BK1N", jnp.bfloat16)),    # D = 96: sm80 kernels everywhere
    # Biases with query rows in 2-byte dtypes and Lk a multiple of 8 come in tiles by TMA (bias_tile_map.h): per kv
    # head with a partial last query tile, batch- and head-broadcast, D = 256 (one 64-key box a tile), softcap.
    (2, 300, 512, 8, 2, 128, jnp.bfloat16, True, 0.0, ("BKMN", jnp.bfloat16)),
    (1, 520, 256, 4, 4, 64, jnp.float16, False, 0.0, ("1HMN", jnp.float16)),     # Lq > Lk, not causal
    (1, 200, 328, 6, 3, 256, jnp.bfloat16, True, 0.0, ("BKMN", jnp.bfloat16)),   # partial last key tile
    (2, 128, 384, 4, 2, 128, jnp.float16, True, 4.0, ("B1MN", jnp.float16)),
]


@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_forward_matches_reference(case, kernel_route):
    from jax_dmattn import _cuda_fwd

    b, lq, lk, h, hkv, d, dtype, causal, softcap, bias_spec = case
    keys = jax.random.split(jax.random.PRNGKey(hash(case[:6]) % 2**31), 4)
    q = jax.random.normal(keys[0], (b, lq, h, d), F32).astype(dtype)
    k = jax.random.normal(keys[1], (b, lk, hkv, d), F32).astype(dtype)
    v = jax.random.normal(keys[2], (b, lk, hkv, d), F32).astype(dtype)
    bias = None if bias_spec is None else bias_of(keys[3], bias_spec[0], bias_spec[1], b, lq, lk, h, hkv)
    scale = d ** -0.5
    fn = functools.partial(_cuda_fwd.flash_fwd, scale=scale, softcap=softcap, is_causal=causal)
    before = sm90_launches("fwd")
    out, lse = jax.jit(fn)(q, k, v, bias, None)
    assert_route(out, before, kernel_route, hopper_head_dim=d in (64, 128, 256))

    up = lambda x: None if x is None else x.astype(F32)
    ref_out, ref_lse = reference.reference_core(up(q), up(k), up(v), up(bias), None, scale=scale, is_causal=causal,
                                                softcap=softcap or None)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (b, h, lq) and lse.dtype == F32
    assert rel_err(out, ref_out) < TOL[dtype]
    assert rel_err(lse, ref_lse) < 1e-4
    if causal and lq > lk:  # rows i < Lq - Lk see no key: exact zeros and -inf
        assert (np.asarray(out, np.float32)[:, :lq - lk] == 0).all()
        assert np.isneginf(np.asarray(lse)[:, :, :lq - lk]).all()


# The per-key bias [B, Hkv, 1, Lk] (staged per key tile) in every dtype, even and odd Lk, whole and partial last key
# tiles, with -inf entries that drop single keys, a run of 64 keys for one head and every key of the first causal
# rows (empty rows: out 0, lse -inf). (Lq = Lk, q dtype, bias dtype, D)
KEY_BIAS_CASES = {
    "even-bf16": (450, jnp.bfloat16, jnp.bfloat16, 128),
    "even-f16": (1000, jnp.float16, jnp.float16, 64),
    "even-f32-whole-tiles": (256, jnp.bfloat16, jnp.float32, 256),
    "odd-bf16": (301, jnp.bfloat16, jnp.bfloat16, 128),
    "odd-f16": (199, jnp.float16, jnp.float16, 64),
    "odd-f32": (333, jnp.float16, jnp.float32, 128),
}


def dropped_bias_inputs(tag, l, dtype, d, b=2, h=4, hkv=2):
    """(rng, q, k, v) of the dropped-bias tests: B = 2, H = 4, Hkv = 2, Lq = Lk = l, seeded by the test's tag."""
    from helpers import seed_from

    rng = np.random.default_rng(seed_from(f"test_cuda_fwd_sm90::{tag}"))
    q, k, v = (jnp.asarray(rng.standard_normal((b, l, heads, d)), dtype) for heads in (h, hkv, hkv))
    return rng, q, k, v


def causal_attention_with_lse(q, k, v, bias, kernel_route):
    """(out, lse) of the public API on CUDA, causal, after checking that the route reached the kernels it names."""
    import jax_dmattn

    before = sm90_launches("fwd")
    out, lse = jax.jit(lambda q, k, v, bias: jax_dmattn.attention(
        q, k, v, bias, is_causal=True, return_lse=True, implementation="cuda"))(q, k, v, bias)
    assert_route(out, before, kernel_route)
    return out, lse


@pytest.mark.parametrize("name", list(KEY_BIAS_CASES))
def test_per_key_bias_with_dropped_keys(name, kernel_route):
    from oracle import oracle_attention

    l, dtype, bias_dtype, d = KEY_BIAS_CASES[name]
    rng, q, k, v = dropped_bias_inputs(f"key_bias::{name}", l, dtype, d)
    b, hkv = 2, 2
    bias = 2.0 * rng.standard_normal((b, hkv, 1, l))
    bias[rng.random(bias.shape) < 0.2] = -np.inf  # single dropped keys
    bias[:, :, :, :5] = -np.inf                   # rows 0..4 see only these keys: empty
    bias[0, 1, :, 128:192] = -np.inf              # a run of 64 keys dropped for one head
    bias = jnp.asarray(bias, bias_dtype)

    out, lse = causal_attention_with_lse(q, k, v, bias, kernel_route)

    ref_out, ref_lse = oracle_attention(q, k, v, bias, None, is_causal=True)
    assert rel_err(out, ref_out) < TOL[dtype]
    assert rel_err(lse, ref_lse) < 1e-4
    assert (np.asarray(out, np.float32)[:, :5] == 0).all()
    assert np.isneginf(np.asarray(lse)[:, :, :5]).all()


# A bias with query rows in tiles by TMA (bias_tile_map.h) with -inf entries: single dropped pairs, rows whose keys
# are all dropped (out 0, lse -inf), a whole 64-key box of one head dropped, and a NaN at a kept pair that must reach
# its row's output and lse. (L, q dtype, bias dtype, D)
FULL_BIAS_CASES = {
    "bf16-d128": (392, jnp.bfloat16, jnp.bfloat16, 128),
    "f16-d64": (264, jnp.float16, jnp.float16, 64),
    "bf16-d256": (200, jnp.bfloat16, jnp.bfloat16, 256),
}


@pytest.mark.parametrize("name", list(FULL_BIAS_CASES))
def test_full_bias_tiles_with_dropped_pairs(name, kernel_route):
    from oracle import oracle_attention

    l, dtype, bias_dtype, d = FULL_BIAS_CASES[name]
    rng, q, k, v = dropped_bias_inputs(f"full_bias::{name}", l, dtype, d)
    b, hkv = 2, 2
    bias = 2.0 * rng.standard_normal((b, hkv, l, l))
    bias[rng.random(bias.shape) < 0.2] = -np.inf  # single dropped pairs
    bias[:, :, 7, :] = -np.inf                    # row 7 keeps no key
    bias[1, 0, :, 64:128] = -np.inf               # a whole box of keys dropped for one head
    bias[0, 1, 150, 3] = np.nan                   # a kept pair (causal: 3 <= 150): row 150 of heads 2, 3 is NaN
    bias = jnp.asarray(bias, bias_dtype)

    out, lse = causal_attention_with_lse(q, k, v, bias, kernel_route)

    out, lse = np.asarray(out, np.float32), np.asarray(lse)
    assert np.isnan(out[0, 150, 2:4]).all() and np.isnan(lse[0, 2:4, 150]).all()
    assert not np.isnan(np.delete(out, 150, axis=1)).any()
    assert (out[:, 7] == 0).all() and np.isneginf(lse[:, :, 7]).all()
    finite_bias = jnp.where(jnp.isnan(bias), 0.0, bias).astype(bias_dtype)
    ref_out, ref_lse = oracle_attention(q, k, v, finite_bias, None, is_causal=True)
    keep = np.ones(out.shape[1], bool)
    keep[150] = False
    assert rel_err(out[:, keep], np.asarray(ref_out, np.float32)[:, keep]) < TOL[dtype]
    assert rel_err(lse[:, :, keep], np.asarray(ref_lse)[:, :, keep]) < 1e-4


@pytest.mark.parametrize("case", [
    (2, 200, 200, 8, 2, 128, jnp.bfloat16, True, ("BK1N", jnp.bfloat16)),
    (1, 150, 300, 4, 4, 64, jnp.float16, False, ("BHMN", jnp.float32)),
], ids=["per_key_gqa", "full_bias"])
def test_gradients_through_the_api(case, kernel_route):
    """The backward (sm80 kernels) consumes the forward's residuals: out and the natural-log lse."""
    import jax_dmattn

    b, lq, lk, h, hkv, d, dtype, causal, bias_spec = case
    keys = jax.random.split(jax.random.PRNGKey(7), 5)
    q = jax.random.normal(keys[0], (b, lq, h, d), F32).astype(dtype)
    k = jax.random.normal(keys[1], (b, lk, hkv, d), F32).astype(dtype)
    v = jax.random.normal(keys[2], (b, lk, hkv, d), F32).astype(dtype)
    bias = bias_of(keys[3], bias_spec[0], bias_spec[1], b, lq, lk, h, hkv)
    dout = jax.random.normal(keys[4], q.shape, F32).astype(dtype)

    def loss(impl, q, k, v, bias):
        up = (lambda x: x.astype(F32)) if impl == "xla" else (lambda x: x)
        out = jax_dmattn.attention(up(q), up(k), up(v), up(bias), is_causal=causal, implementation=impl)
        return jnp.sum(out.astype(F32) * dout.astype(F32))

    got = jax.jit(jax.grad(functools.partial(loss, "cuda"), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    ref = jax.jit(jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), got, ref):
        assert g.dtype == {"dbias": bias.dtype}.get(name, dtype)
        assert rel_err(g, r) < 3 * TOL[dtype], name


# Row bounds (segment ids, windows, lengths) on the Hopper forward: spans that start past key tile 0, tiles inside
# every row's range (no per-element test) and partly inside, CTAs whose rows see no key, unsorted ids (compared per
# element), the decode path (one query row, GQA packing, split over keys). (B, Lq, Lk, H, Hkv, D, dtype, causal,
# keywords: window, segments "packed" | "random", q_lens, kv_lens)
BOUNDS_CASES = {
    "window-causal": (1, 1000, 1000, 4, 2, 128, jnp.bfloat16, True, dict(window=(300, 0))),
    "window-symmetric-lq-lt-lk": (2, 700, 900, 2, 1, 64, jnp.float16, False, dict(window=150)),
    "packed-causal-d256": (2, 777, 777, 4, 4, 256, jnp.bfloat16, True, dict(segments="packed")),
    "segments-unsorted-window": (1, 520, 520, 2, 1, 128, jnp.float16, True, dict(segments="random", window=(200, 0))),
    "lengths-zero-and-partial": (3, 600, 800, 4, 2, 64, jnp.bfloat16, True,
                                 dict(q_lens=(600, 0, 250), kv_lens=(800, 300, 0))),
    "decode-kv-lengths": (4, 1, 5000, 8, 2, 128, jnp.bfloat16, False, dict(kv_lens=(5000, 1, 2600, 4097))),
}


@pytest.mark.parametrize("name", list(BOUNDS_CASES))
def test_row_bounds_forward(name, kernel_route):
    import jax_dmattn
    from helpers import seed_from, sequence_keywords, split_static
    from oracle import oracle_attention

    b, lq, lk, h, hkv, d, dtype, causal, seq = BOUNDS_CASES[name]
    rng = np.random.default_rng(seed_from(f"test_cuda_fwd_sm90::bounds::{name}"))
    q, k, v = (jnp.asarray(rng.standard_normal((b, n, heads, d)), dtype)
               for n, heads in ((lq, h), (lk, hkv), (lk, hkv)))
    bias = jnp.asarray(2.0 * rng.standard_normal((b, hkv, 1, lk)), jnp.bfloat16)
    kw, dense = sequence_keywords(rng, b, lq, lk, is_causal=causal, docs=5, **seq)
    kw, window = split_static(kw)

    before = sm90_launches("fwd")
    out, lse = jax.jit(lambda q, k, v, bias, kw: jax_dmattn.attention(
        q, k, v, bias, is_causal=causal, return_lse=True, implementation="cuda", **window, **kw))(q, k, v, bias, kw)
    assert_route(out, before, kernel_route)

    ref_out, ref_lse = oracle_attention(q, k, v, bias, dense)
    assert rel_err(out, ref_out) < TOL[dtype]
    assert rel_err(lse, ref_lse) < 1e-4
    empty = ~dense.any(axis=-1)[:, 0]  # [B, Lq]: rows that see no key give 0 and -inf
    assert (np.asarray(out, np.float32)[empty] == 0).all()
    assert np.isneginf(np.asarray(lse).transpose(0, 2, 1)[empty]).all()


def test_row_bounds_gradients_through_the_api(kernel_route):
    """The sm80 backward with bounds consumes the Hopper forward's lse."""
    import jax_dmattn
    from helpers import dense_sequences, packed_segments

    b, l, h, hkv, d = 2, 400, 4, 2, 128
    rng = np.random.default_rng(11)
    q, k, v, dout = (jnp.asarray(rng.standard_normal((b, l, heads, d)), jnp.bfloat16)
                     for heads in (h, hkv, hkv, h))
    bias = jnp.asarray(rng.standard_normal((b, hkv, 1, l)), jnp.float32)
    seg = packed_segments(rng, b, l, 3)
    kw = dict(q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg))

    def loss(q, k, v, bias):
        out = jax_dmattn.attention(q, k, v, bias, is_causal=True, local_window_size=(90, 0), implementation="cuda",
                                   **kw)
        return jnp.sum(out.astype(F32) * dout.astype(F32))

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
    dense = jnp.asarray(dense_sequences(b, l, l, is_causal=True, window=(90, 0), q_seg=seg, kv_seg=seg))
    up = lambda x: x.astype(F32)
    ref = jax.grad(lambda q, k, v, bias: jnp.sum(jax_dmattn.reference.reference_core(
        q, k, v, bias, dense, scale=d ** -0.5, is_causal=False, softcap=None)[0] * up(dout)), argnums=(0, 1, 2, 3))(
        up(q), up(k), up(v), bias)
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), got, ref):
        assert rel_err(g, r) < 3 * TOL[jnp.bfloat16], name
