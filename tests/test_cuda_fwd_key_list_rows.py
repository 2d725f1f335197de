"""The few-rows key-list forward (csrc/cuda/flash_fwd_key_list_rows.{h,cu}): calls with 1 <= Lq <= key_list_rows_max
query rows on the key-list path (a decoding step's G packed query heads), against the float32 reference.

Every case must reach the kernel (its launch counter moves). Masks: random, per-row top-k, a padding mask broadcast
over rows (one bit word per chunk), rows with no kept key, dense units (a capacity below the unit's live keys, so
the kernel reads the mask bytes), and the compact masks through the public API with a decoding step's GQA packing
and list parts. Also causal with Lq < Lk, GQA, softcap, per-key and full biases of every dtype, a -inf bias, both
dtypes, every head dim, and an inf / NaN in V that must reach exactly the rows that keep its key.

GPU only (skipped elsewhere).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import cuda_kernel_marks, rel_err_same_infinities as rel_err
from test_cuda_fwd_key_list_sm90 import TOL, assert_matches_reference, bias_of, check_nonfinite_v, mask_of

import jax_dmattn
from jax_dmattn import _ffi

pytestmark = cuda_kernel_marks("dmattn_fwd_cuda")

F32 = jnp.float32
ROWS_MAX = _ffi.kernel_facts()["key_list_rows_max"]


def rows_launches() -> int:
    return _ffi.extension().fwd_key_list_rows_launches()


# (B, Lq, Lk, H, Hkv, D, dtype, causal, softcap, mask kind, mask heads, bias spec or None, capacity)
CASES = [
    (2, 1, 700, 8, 2, 128, jnp.bfloat16, True, 0.0, "topk", "K", ("BK1N", jnp.bfloat16), None),
    (1, 4, 1000, 4, 1, 128, jnp.bfloat16, False, 0.0, "random", "K", ("BK1N", jnp.float32), None),
    (2, 3, 257, 6, 3, 64, jnp.float16, True, 0.0, "random", "H", ("BHMN", jnp.float32), None),  # causal, Lq < Lk
    (1, 8, 333, 4, 2, 256, jnp.bfloat16, False, 0.0, "padding", "1", ("1KMN", jnp.float16), None),
    (1, 5, 4100, 2, 1, 96, jnp.float16, True, 0.0, "random", "K", None, None),
    (2, 7, 130, 4, 4, 32, jnp.bfloat16, False, 30.0, "topk", "K", ("BK1N", jnp.bfloat16), None),  # softcap
    (1, 6, 900, 4, 2, 192, jnp.bfloat16, True, 0.0, "random", "K", ("BK1N", jnp.bfloat16), 64),  # dense units
    (2, 2, 513, 4, 2, 128, jnp.float16, False, 0.0, "random", "K", None, 128),                   # dense units
    (1, ROWS_MAX, 2000, 8, 1, 128, jnp.bfloat16, False, 0.0, "empty_rows", "K", None, None),
]


@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_forward_matches_reference(case, rng):
    from jax_dmattn import _cuda_fwd

    b, lq, lk, h, hkv, d, dtype, causal, softcap, kind, mheads, bias_spec, capacity = case
    assert lq <= ROWS_MAX
    q = jnp.asarray(rng.standard_normal((b, lq, h, d)), F32).astype(dtype)
    k = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), F32).astype(dtype)
    v = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), F32).astype(dtype)
    mask_np = mask_of(rng, kind, b, {"H": h, "K": hkv, "1": 1}[mheads], lq, lk)
    if kind == "empty_rows":  # its first 128 rows are all empty: keep the odd rows' keys instead
        mask_np[:, :, 1::2] = rng.random(mask_np[:, :, 1::2].shape) < 0.2
    mask = jnp.asarray(mask_np)
    bias = None if bias_spec is None else bias_of(rng, bias_spec[0], bias_spec[1], b, lq, lk, h, hkv)
    if bias is not None:  # a -inf bias drops its key whatever the mask says
        bias = bias.at[..., 3].set(-jnp.inf)
    scale = d ** -0.5
    fn = functools.partial(_cuda_fwd.flash_fwd, scale=scale, softcap=softcap, is_causal=causal,
                           key_list_capacity=capacity)
    before = rows_launches()
    out, lse = jax.block_until_ready(jax.jit(fn)(q, k, v, bias, mask))
    assert rows_launches() > before, "the few-rows key-list forward did not serve the call"

    assert_matches_reference(q, k, v, bias, mask, out, lse, scale=scale, causal=causal, softcap=softcap)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_v_reaches_exactly_the_rows_that_keep_it(value, rng):
    before = rows_launches()
    check_nonfinite_v(value, rng, lq=6)
    assert rows_launches() > before


def test_nan_logit_of_a_kept_key_reaches_its_row(rng):
    from jax_dmattn import _cuda_fwd

    b, lq, lk, h, hkv, d = 1, 3, 500, 2, 1, 64
    q_np = rng.standard_normal((b, lq, h, d)).astype(np.float32)
    q_np[0, 1, 0, 5] = np.nan  # row 1 of head 0: every logit NaN
    q = jnp.asarray(q_np).astype(jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), F32).astype(jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), F32).astype(jnp.bfloat16)
    mask = jnp.asarray(rng.random((b, hkv, lq, lk)) < 0.3)
    out, lse = jax.jit(functools.partial(_cuda_fwd.flash_fwd, scale=d ** -0.5, softcap=0.0, is_causal=False))(
        q, k, v, None, mask)
    out, lse = np.asarray(out, np.float32), np.asarray(lse)
    assert np.isnan(out[0, 1, 0]).all() and np.isnan(lse[0, 0, 1])
    bad = np.zeros(out.shape, bool)
    bad[0, 1, 0] = True
    assert np.isfinite(out[~bad]).all()


@pytest.mark.parametrize("form", ["bool", "topk", "key_indices"])
def test_decoding_step_through_the_api(form, rng):
    """A decoding step (Lq = 1, H / Hkv = 4 packed rows) with a 2048-key selection: the shared lists are cut into
    parts, each served by the few-rows forward, and merged."""
    b, lk, h, hkv, d, dtype = 2, 16384, 16, 4, 128, jnp.bfloat16
    q = jnp.asarray(rng.standard_normal((b, 1, h, d)), F32).astype(dtype)
    k = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), F32).astype(dtype)
    v = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), F32).astype(dtype)
    bias = jnp.asarray(rng.standard_normal((b, hkv, 1, lk)), F32).astype(dtype)
    scores = jnp.asarray(rng.standard_normal((b, hkv, lk)), F32)
    if form == "bool":
        mask = jax_dmattn.topk_mask(scores[:, :, None, :], 2048)
    elif form == "topk":
        mask = jax_dmattn.TopKMask(scores, 2048)
    else:
        idx = np.stack([rng.choice(lk, 2048, replace=False) for _ in range(b * hkv)]).reshape(b, hkv, 2048)
        mask = jax_dmattn.KeyIndices(jnp.asarray(idx, jnp.int32))
    before = rows_launches()
    out = jax.jit(lambda q, k, v, bias: jax_dmattn.attention(q, k, v, bias, mask, is_causal=True,
                                                             implementation="cuda"))(q, k, v, bias)
    assert rows_launches() > before
    up = lambda x: x.astype(F32)  # noqa: E731
    ref = jax_dmattn.attention(up(q), up(k), up(v), up(bias), mask, is_causal=True, implementation="xla")
    assert rel_err(out, ref) < TOL[jnp.dtype(dtype)]
