"""Direct checks of the CUDA backward kernel (jax_dmattn._cuda_bwd), independent of the public API plumbing.

* a sweep of shapes / dtypes / head dims / bias and mask broadcasts / GQA / causal / softcap / fully masked
  rows / Lq = 1 / Lq > Lk against the float64 numpy oracle (tests/oracle.py), all four gradients, dlse folded;
* exact zeros where they must be (rows with no kept key, a key-broadcast bias);
* the kernel through jax.vjp of a custom_vjp wrapper around the CUDA forward;
* deterministic=True is bitwise reproducible and agrees with the atomic path, on the key-tile kernels and on the
  key-list path, whose deterministic mode accumulates int64 fixed-point counts;
* a long sequence against the float32 reference VJP on the GPU.

GPU only (skipped elsewhere).
"""
from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle  # noqa: E402
from helpers import cuda_kernel_marks  # noqa: E402


pytestmark = cuda_kernel_marks("dmattn_bwd_cuda")

F32 = jnp.float32
BF16, F16 = jnp.bfloat16, jnp.float16
TOL = {BF16: 4e-2, F16: 8e-3}
BIAS_DT = {"bf16": BF16, "f16": F16, "f32": F32}


def _dims(code, b, lq, lk, h, hkv):
    m = {"B": b, "H": h, "K": hkv, "M": lq, "N": lk, "1": 1}
    return tuple(m[c] for c in code)


def rel_err(actual, expected, floor=0.0):
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert np.isfinite(a).all(), "non-finite gradient"
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), floor, 1e-30))


def draw_qkv_bias(rng, b, lq, lk, h, hkv, d, dtype, bias_spec, bias_scale=1.0):
    """q, k, v (standard normal, in dtype) and the bias of bias_spec = (shape code, dtype name) or None."""
    q = jnp.asarray(rng.standard_normal((b, lq, h, d)), F32).astype(dtype)
    k = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), F32).astype(dtype)
    v = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), F32).astype(dtype)
    bias = None
    if bias_spec is not None:
        code, bdt = bias_spec
        noise = bias_scale * rng.standard_normal(_dims(code, b, lq, lk, h, hkv))
        bias = jnp.asarray(noise, F32).astype(BIAS_DT[bdt])
    return q, k, v, bias


def draw_cotangents(rng, b, lq, h, d, dtype):
    dout = jnp.asarray(rng.standard_normal((b, lq, h, d)), F32).astype(dtype)
    dlse = jnp.asarray(rng.standard_normal((b, h, lq)), F32)
    return dout, dlse


def make_case(seed, b, lq, lk, h, hkv, d, dtype, bias_spec, mask_code, empty_rows=False):
    rng = np.random.default_rng(seed)
    q, k, v, bias = draw_qkv_bias(rng, b, lq, lk, h, hkv, d, dtype, bias_spec)
    mask = None
    if mask_code is not None:
        shape = _dims(mask_code, b, lq, lk, h, hkv)
        # Block structure (whole 64 x 64 tiles dropped) plus element noise, so empty / partial / full all occur.
        tiles = rng.random((shape[0], shape[1], -(-shape[2] // 64), -(-shape[3] // 64))) < 0.7
        tile_keep = np.repeat(np.repeat(tiles, 64, axis=2), 64, axis=3)[:, :, :shape[2], :shape[3]]
        mask = tile_keep & (rng.random(shape) < 0.8)
        if empty_rows and shape[2] > 1:
            mask[:, :, 3:min(70, shape[2])] = False  # rows with no kept key (a whole tile's worth and parts)
        mask = jnp.asarray(mask)
    return (q, k, v, bias, mask) + draw_cotangents(rng, b, lq, h, d, dtype)


def oracle_fwd(q, k, v, bias, mask, *, scale, softcap, is_causal, dtype):
    out, lse = oracle.oracle_attention(q, k, v, bias, mask, scale=scale, is_causal=is_causal,
                                       softcap=softcap or None)
    return jnp.asarray(out, F32).astype(dtype), jnp.asarray(lse, F32)


def run_bwd(q, k, v, bias, mask, out, lse, dout, dlse, *, scale, softcap, is_causal, deterministic,
            capacity=None, dout_in_jit=False):
    """dout_in_jit: dout is made inside the jit (2 x the half of the given one, exact in bf16 / f16), so that its
    buffer dies at the call and XLA writes dq into it (the call aliases them) instead of copying dout first."""
    from jax_dmattn import _cuda_bwd

    fn = functools.partial(_cuda_bwd.flash_bwd, scale=scale, softcap=softcap, is_causal=is_causal,
                           deterministic=deterministic, key_list_capacity=capacity)
    if not dout_in_jit:
        return jax.jit(fn)(q, k, v, bias, mask, out, lse, dout, dlse)
    half = (dout.astype(F32) * 0.5).astype(dout.dtype)
    return jax.jit(lambda q, k, v, b, m, o, lse, h, dlse: fn(q, k, v, b, m, o, lse, h * 2, dlse))(
        q, k, v, bias, mask, out, lse, half, dlse)


def with_lse_term(grads, bias, lse, dlse):
    """The kernels' gradients as attention returns them: the kernels write exactly 0 for a bias constant along
    keys (softmax cancels it in the output) and the primitive adds its lse-cotangent term
    (_primitives.key_broadcast_dbias), which the oracle includes."""
    from jax_dmattn import _primitives

    dq, dk, dv, dbias = grads
    if bias is None or bias.shape[-1] != 1 or dk.shape[1] == 1:
        return grads
    term = _primitives.key_broadcast_dbias(bias.shape, lse, dlse)
    return dq, dk, dv, (dbias.astype(F32) + term).astype(dbias.dtype)


def assert_grads_match_oracle(grads, q, k, v, bias, mask, lse, dout, dlse, *, scale, causal, softcap, dtype):
    """The kernels' dq, dk, dv, dbias (lse-cotangent term added: with_lse_term) against the float64 oracle: None
    exactly where the input is, the input's shape and dtype, and a relative error below TOL[dtype] with a floor of
    2% of the gradient's magnitude."""
    kw = dict(scale=scale, is_causal=causal, softcap=softcap or None, dlse=np.asarray(dlse))
    ref = oracle.oracle_grads(q, k, v, bias, mask, dout, **kw)
    mag = oracle.oracle_grads(q, k, v, bias, mask, dout, magnitude=True, **kw)
    names = ("dq", "dk", "dv", "dbias")
    for name, got, exp, m, x in zip(names, with_lse_term(grads, bias, lse, dlse), ref, mag, (q, k, v, bias)):
        if x is None:
            assert got is None
            continue
        assert got.shape == x.shape and got.dtype == x.dtype, (name, got.shape, got.dtype)
        err = rel_err(got, exp, floor=0.02 * np.linalg.norm(m))
        assert err < TOL[dtype], f"{name}: rel err {err:.3e}"


def check_against_oracle(case, deterministic=False, empty_rows=False, dout_in_jit=False):
    b, lq, lk, h, hkv, d, dtype, causal, softcap, bias_spec, mask_code = case
    q, k, v, bias, mask, dout, dlse = make_case(hash(case) % 2**31, b, lq, lk, h, hkv, d, dtype, bias_spec,
                                                mask_code, empty_rows)
    scale = d ** -0.5
    out, lse = oracle_fwd(q, k, v, bias, mask, scale=scale, softcap=softcap, is_causal=causal, dtype=dtype)
    grads = run_bwd(q, k, v, bias, mask, out, lse, dout, dlse, scale=scale, softcap=softcap, is_causal=causal,
                    deterministic=deterministic, dout_in_jit=dout_in_jit)
    assert_grads_match_oracle(grads, q, k, v, bias, mask, lse, dout, dlse, scale=scale, causal=causal,
                              softcap=softcap, dtype=dtype)
    if bias is not None and bias.shape[-1] == 1 and lk != 1:
        assert (np.asarray(grads[3], np.float32) == 0).all(), "key-broadcast bias must get exact-zero dbias"
    return (q, k, v, bias, mask, out, lse, dout, dlse), grads


# (B, Lq, Lk, H, Hkv, D, dtype, causal, softcap, bias (shape code, dtype) or None, mask shape code or None)
# shape codes: "B"/"H"/"K"(Hkv)/"M"(Lq)/"N"(Lk) = full, "1" = broadcast.
CASES = [
    (2, 128, 128, 4, 2, 128, BF16, False, 0.0, ("BHMN", "bf16"), "BKMN"),
    (2, 200, 200, 4, 2, 128, BF16, True, 0.0, ("BK1N", "bf16"), "BKMN"),   # per-key bias (the paper's)
    (1, 77, 203, 4, 1, 64, F16, True, 0.0, ("1HMN", "f32"), "11MN"),
    (1, 300, 129, 2, 2, 32, BF16, True, 0.0, None, "BHMN"),                # Lq > Lk
    (1, 129, 300, 6, 3, 96, F16, False, 0.0, ("BKM1", "f16"), None),        # key-broadcast bias: dbias 0
    (2, 190, 190, 2, 1, 192, BF16, True, 0.0, ("B11N", "f32"), "B11N"),
    (1, 150, 170, 2, 2, 256, F16, True, 0.0, ("BHMN", "bf16"), "1KMN"),
    (1, 128, 256, 4, 4, 64, BF16, False, 30.0, ("BK1N", "bf16"), None),    # softcap
    (1, 64, 64, 2, 1, 128, F16, False, 5.0, None, None),
    (3, 129, 260, 4, 2, 128, BF16, True, 0.0, ("1KMN", "bf16"), "BKMN"),   # batch-broadcast bias, bf16 accum
    (2, 100, 100, 4, 2, 64, F16, False, 0.0, ("111N", "f16"), "BHMN"),     # everything-broadcast per-key bias
    (2, 96, 160, 4, 2, 96, BF16, True, 0.0, ("1H1N", "bf16"), None),       # per-head rows-broadcast, g > 1
    (1, 1, 333, 4, 2, 128, BF16, False, 0.0, ("BHMN", "f32"), "BKMN"),      # Lq = 1
    (1, 333, 1, 2, 1, 64, F16, False, 0.0, ("BHMN", "f16"), None),          # Lk = 1
    (1, 144, 144, 4, 4, 192, F16, True, 7.0, ("11MN", "bf16"), "BHMN"),
    (2, 70, 90, 2, 2, 32, F16, False, 0.0, ("B1MN", "f32"), "BHMN"),
    (1, 100, 220, 8, 2, 256, BF16, False, 0.0, ("1KMN", "f32"), "BK1N"),
    (1, 65, 65, 2, 2, 96, F16, True, 0.0, ("BHMN", "f16"), None),
]


@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_bwd_matches_oracle(case):
    check_against_oracle(case)


# A per-key bias [B, Hkv, 1, Lk] with a full-key mask takes the key-list path (fixed-point accumulation when
# deterministic); a bias with query rows takes the key-tile kernels (the dq kernel when deterministic).
@pytest.mark.parametrize("bias_code", ["BK1N", "BKMN"])
@pytest.mark.parametrize("d,dtype", [(32, BF16), (64, F16), (96, BF16), (128, F16), (192, F16), (256, BF16)])
def test_every_head_dim_deterministic(d, dtype, bias_code):
    check_against_oracle((2, 130, 150, 4, 2, d, dtype, True, 0.0, (bias_code, "bf16"), "BKMN"), deterministic=True)


@pytest.mark.parametrize("deterministic", [False, True])
def test_rows_with_no_kept_key_get_zero_gradients(deterministic):
    case = (1, 150, 140, 4, 2, 64, BF16, False, 0.0, ("BHMN", "f32"), "BHMN")
    (q, *_rest), grads = check_against_oracle(case, deterministic=deterministic, empty_rows=True)
    dq, _, _, dbias = grads
    assert (np.asarray(dq, np.float32)[:, 3:70] == 0).all()
    assert (np.asarray(dbias)[:, :, 3:70] == 0).all()


def test_deterministic_is_bitwise_reproducible():
    case = (2, 257, 300, 8, 2, 128, BF16, True, 0.0, ("1KMN", "bf16"), "BKMN")
    args, g1 = check_against_oracle(case, deterministic=True)
    kw = dict(scale=128 ** -0.5, softcap=0.0, is_causal=True)
    for _ in range(3):
        g2 = run_bwd(*args, deterministic=True, **kw)
        for a, b in zip(g1, g2):
            assert np.array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))
    ga = run_bwd(*args, deterministic=False, **kw)
    for a, b in zip(g1, ga):
        assert rel_err(a, b) < 1e-2


def test_through_vjp_of_cuda_forward():
    from jax_dmattn import _cuda_fwd, _cuda_bwd

    b, lq, lk, h, hkv, d = 2, 190, 250, 4, 2, 64
    causal, softcap, scale = True, 0.0, 64 ** -0.5
    q, k, v, bias, mask, dout, dlse = make_case(11, b, lq, lk, h, hkv, d, BF16, ("BK1N", "bf16"), "BKMN")

    @jax.custom_vjp
    def attn(q, k, v, bias):
        return _cuda_fwd.flash_fwd(q, k, v, bias, mask, scale=scale, softcap=softcap, is_causal=causal)

    def fwd(q, k, v, bias):
        out, lse = attn(q, k, v, bias)
        return (out, lse), (q, k, v, bias, out, lse)

    def bwd(res, cts):
        q, k, v, bias, out, lse = res
        dout, dlse = cts
        return _cuda_bwd.flash_bwd(q, k, v, bias, mask, out, lse, dout, dlse, scale=scale, softcap=softcap,
                                   is_causal=causal, deterministic=False)

    attn.defvjp(fwd, bwd)
    _, vjp = jax.jit(lambda *a: jax.vjp(attn, *a))(q, k, v, bias)
    grads = jax.jit(vjp)((dout, dlse))
    kw = dict(scale=scale, is_causal=causal, dlse=np.asarray(dlse))
    ref = oracle.oracle_grads(q, k, v, bias, mask, dout, **kw)
    for name, got, exp in zip(("dq", "dk", "dv", "dbias"), grads, ref):
        err = rel_err(got, exp, floor=1e-3)
        assert err < TOL[BF16], f"{name}: rel err {err:.3e}"


def test_long_sequence_against_f32_reference_vjp():
    from jax_dmattn import reference

    b, l, h, hkv, d = 1, 4096, 2, 1, 64
    q, k, v, bias, _, dout, dlse = make_case(5, b, l, l, h, hkv, d, BF16, ("BK1N", "bf16"), None)
    rng = np.random.default_rng(6)
    tiles = rng.random((1, 1, l // 64, l // 64)) < 0.25
    mask = jnp.asarray(np.repeat(np.repeat(tiles, 64, 2), 64, 3) | np.eye(l, dtype=bool)[None, None])
    scale = d ** -0.5

    def f(q, k, v, bias):
        return reference.reference_core(q, k, v, bias, mask, scale=scale, is_causal=True, softcap=None)

    up = lambda x: x.astype(F32)
    (out, lse), vjp = jax.vjp(f, up(q), up(k), up(v), up(bias))
    ref = vjp((up(dout), dlse))
    grads = run_bwd(q, k, v, bias, mask, out.astype(BF16), lse, dout, dlse, scale=scale, softcap=0.0,
                    is_causal=True, deterministic=False)
    for name, got, exp in zip(("dq", "dk", "dv", "dbias"), grads, ref):
        err = rel_err(got, exp, floor=1e-3)
        assert err < TOL[BF16], f"{name}: rel err {err:.3e}"


# ------------------------------------------------------------------------------------------------ key-list path
# With deterministic=False, a mask with a full key dim and a bias that is absent or broadcast over query rows,
# flash_bwd takes the key-list path (csrc/cuda/flash_bwd_key_list_kernel.cuh): per 128-row query tile it walks
# only the keys some row keeps, and adds dk / dv / dbias with fp32 atomics.


def key_list_mask(rng, kind, shape, *, lq, causal, bias_for_topk=None):
    """A bool mask of `shape` ([Bm, Hm, Mm, Lk]) of one of the kinds the key-list path must handle."""
    if kind.startswith("topk"):  # the paper's dynamic mask: the `window` keys of largest per-key bias per row
        from jax_dmattn import topk_mask

        window = int(kind[4:])
        return topk_mask(bias_for_topk, window, is_causal=causal, query_len=lq)
    if kind.startswith("rand"):  # scattered element mask of the given density
        return jnp.asarray(rng.random(shape) < float(kind[4:]))
    if kind == "mixed":  # 128-row tiles alternate: 40 keys shared by the rows (a list) / half-dense (dense unit)
        m = rng.random(shape) < 0.5
        for t in range(0, -(-shape[2] // 128), 2):
            rows = slice(t * 128, (t + 1) * 128)
            m[:, :, rows] = False
            for bi in range(shape[0]):
                for hi in range(shape[1]):
                    cols = rng.choice(shape[3], size=min(40, shape[3]), replace=False)
                    n = m[bi, hi, rows].shape[0]
                    m[bi, hi, rows][:, cols] = rng.random((n, cols.size)) < 0.9
        return jnp.asarray(m)
    if kind == "block":  # whole 64 x 64 tiles kept or dropped, element noise inside the kept ones
        tiles = rng.random((shape[0], shape[1], -(-shape[2] // 64), -(-shape[3] // 64))) < 0.4
        keep = np.repeat(np.repeat(tiles, 64, axis=2), 64, axis=3)[:, :, :shape[2], :shape[3]]
        return jnp.asarray(keep & (rng.random(shape) < 0.9))
    raise ValueError(kind)


def key_list_inputs(seed, b, lq, lk, h, hkv, d, dtype, causal, bias_spec, mask_kind, mask_code,
                  empty_rows=None):
    rng = np.random.default_rng(seed)
    q, k, v, bias = draw_qkv_bias(rng, b, lq, lk, h, hkv, d, dtype, bias_spec, bias_scale=2.0)
    topk_bias = bias if bias is not None and bias.shape[-1] == lk else \
        jnp.asarray(rng.standard_normal((b, hkv, 1, lk)), F32)
    mask = key_list_mask(rng, mask_kind, _dims(mask_code, b, lq, lk, h, hkv), lq=lq, causal=causal,
                       bias_for_topk=topk_bias)
    if empty_rows is not None:  # rows with no kept key at all
        m = np.array(np.broadcast_to(np.asarray(mask), mask.shape[:2] + (lq, lk)))
        m[:, :, empty_rows] = False
        mask = jnp.asarray(m)
    return (q, k, v, bias, mask) + draw_cotangents(rng, b, lq, h, d, dtype)


def check_key_list_path_against_oracle(case, seed=0, empty_rows=None, deterministic=False, scales=None, capacity=None,
                                       dout_in_jit=False):
    """Runs the key-list path (asserting it is the one taken) and compares all four gradients with the oracle.
    Also checks the exact zeros: dk / dv rows of keys that no kept (row, key) uses, dq rows with no kept key.
    scales: optional dict of factors applied to the inputs ("q", "v", "dout", "dlse") and to the softmax scale
    ("scale"), for the magnitude tests of the fixed-point accumulation."""
    b, lq, lk, h, hkv, d, dtype, causal, softcap, bias_spec, mask_kind, mask_code = case
    q, k, v, bias, mask, dout, dlse = key_list_inputs(seed, b, lq, lk, h, hkv, d, dtype, causal, bias_spec,
                                                    mask_kind, mask_code, empty_rows)
    from jax_dmattn import _cuda_bwd

    assert _cuda_bwd.uses_key_list_path(None if bias is None else bias.shape, mask.shape, lk)
    scale = d ** -0.5
    if scales:
        mul = lambda x, f: (x.astype(F32) * f).astype(x.dtype)
        q, v, dout = mul(q, scales.get("q", 1.0)), mul(v, scales.get("v", 1.0)), mul(dout, scales.get("dout", 1.0))
        dlse = dlse * scales.get("dlse", 1.0)
        scale = scale * scales.get("scale", 1.0)
    out, lse = oracle_fwd(q, k, v, bias, mask, scale=scale, softcap=softcap, is_causal=causal, dtype=dtype)
    grads = run_bwd(q, k, v, bias, mask, out, lse, dout, dlse, scale=scale, softcap=softcap, is_causal=causal,
                    deterministic=deterministic, capacity=capacity, dout_in_jit=dout_in_jit)
    assert_grads_match_oracle(grads, q, k, v, bias, mask, lse, dout, dlse, scale=scale, causal=causal,
                              softcap=softcap, dtype=dtype)

    keep = oracle.keep_matrix(mask, b, h, hkv, lq, lk, causal)                # [B, H, Lq, Lk]
    row_has_key = keep.any(axis=3).transpose(0, 2, 1)                           # [B, Lq, H]
    assert (np.asarray(grads[0], np.float32)[~row_has_key] == 0).all(), "dq of a row with no kept key"
    key_used = keep.reshape(b, hkv, h // hkv, lq, lk).any(axis=(2, 3)).transpose(0, 2, 1)  # [B, Lk, Hkv]
    for name, g in (("dk", grads[1]), ("dv", grads[2])):
        assert (np.asarray(g, np.float32)[~key_used] == 0).all(), f"{name} of a key no row keeps"
    if bias is not None and bias.shape[-1] == 1 and lk != 1:
        assert (np.asarray(grads[3], np.float32) == 0).all(), "key-broadcast bias must get exact-zero dbias"
    return (q, k, v, bias, mask, out, lse, dout, dlse), grads


# (B, Lq, Lk, H, Hkv, D, dtype, causal, softcap, bias (code, dtype) or None, mask kind, mask shape code)
KEY_LIST_CASES = [
    # the standard case in small: per-key bias, causal top-k mask built from it, GQA 4
    (1, 300, 300, 8, 2, 128, BF16, True, 0.0, ("BK1N", "bf16"), "topk48", "BKMN"),
    (1, 1000, 1000, 8, 2, 128, BF16, True, 0.0, ("BK1N", "bf16"), "topk128", "BKMN"),
    (2, 1000, 1000, 4, 4, 64, F16, True, 0.0, ("BK1N", "f32"), "topk100", "BKMN"),
    (1, 300, 300, 4, 2, 128, BF16, False, 0.0, ("BK1N", "bf16"), "topk40", "BKMN"),  # non-causal: [B,K,1,N]
    (1, 300, 300, 4, 1, 128, BF16, True, 0.0, None, "topk64", "BKMN"),               # no bias, MQA
    # element masks of density 0.05 and 0.5, every head dim, GQA 1 / 2 / 4
    (1, 257, 257, 2, 2, 32, F16, True, 0.0, ("BK1N", "f16"), "rand0.05", "BKMN"),
    (2, 200, 200, 4, 2, 64, BF16, False, 0.0, None, "rand0.5", "BHMN"),
    (1, 190, 190, 4, 1, 96, BF16, True, 0.0, ("1H1N", "bf16"), "rand0.5", "1KMN"),
    (1, 300, 300, 8, 2, 128, F16, False, 0.0, ("111N", "f32"), "rand0.05", "11MN"),
    (1, 160, 160, 4, 2, 192, BF16, True, 0.0, ("BK1N", "bf16"), "rand0.05", "BKMN"),
    (1, 140, 140, 2, 1, 256, F16, False, 0.0, ("BK1N", "f16"), "rand0.5", "BKMN"),
    # block masks, row-broadcast masks (one bit word shared by every row), key-broadcast bias
    (1, 300, 300, 4, 2, 128, BF16, True, 0.0, ("BK1N", "bf16"), "block", "BKMN"),
    (2, 129, 260, 4, 4, 64, BF16, True, 0.0, ("B11N", "f32"), "rand0.5", "B11N"),
    (1, 200, 200, 4, 2, 128, F16, False, 0.0, ("BK11", "bf16"), "rand0.5", "BK1N"),
    # Lq != Lk both ways (bottom-right causal: Lq > Lk leaves the top rows empty), odd lengths, Lq = 1
    (1, 77, 333, 4, 2, 128, BF16, True, 0.0, ("BK1N", "bf16"), "rand0.5", "BKMN"),
    (1, 333, 77, 4, 2, 64, F16, True, 0.0, ("BK1N", "f16"), "rand0.5", "BKMN"),
    (2, 191, 129, 6, 3, 96, BF16, False, 0.0, None, "block", "BHMN"),
    (1, 1, 333, 4, 2, 128, BF16, False, 0.0, ("BK1N", "f32"), "rand0.5", "BKMN"),
    (1, 1, 333, 4, 4, 256, F16, True, 0.0, None, "rand0.05", "BHMN"),
    # softcap
    (1, 300, 300, 4, 2, 128, BF16, True, 30.0, ("BK1N", "bf16"), "topk64", "BKMN"),
    (1, 150, 170, 2, 1, 64, F16, False, 5.0, None, "rand0.5", "BKMN"),
]


@pytest.mark.parametrize("index", range(len(KEY_LIST_CASES)), ids=[f"s{i}" for i in range(len(KEY_LIST_CASES))])
def test_key_list_path_bwd_matches_oracle(index):
    check_key_list_path_against_oracle(KEY_LIST_CASES[index], seed=100 + index)


# Dense units (more live keys than the list capacity): the kernel walks every key and stages the raw mask.
# Lk % 16 == 0 takes the 16-byte cp.async mask pieces, other lengths the plain byte loads.
DENSE_UNIT_CASES = [
    (1, 520, 512, 8, 2, 128, BF16, True, 0.0, ("BK1N", "bf16"), "mixed", "BKMN"),
    (2, 300, 333, 4, 1, 64, F16, False, 0.0, None, "mixed", "BHMN"),
    (1, 400, 704, 4, 2, 256, BF16, True, 0.0, ("BK1N", "f32"), "mixed", "BKMN"),
    (1, 260, 260, 4, 4, 96, F16, True, 5.0, ("1H1N", "f16"), "rand0.5", "1KMN"),
    (2, 129, 256, 4, 2, 32, BF16, True, 0.0, ("B11N", "f32"), "rand0.5", "B11N"),  # row-broadcast mask
    (1, 333, 77, 4, 2, 192, F16, True, 0.0, ("BK1N", "f16"), "rand0.5", "BKMN"),   # Lq > Lk
]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("index", range(len(DENSE_UNIT_CASES)), ids=[f"u{i}" for i in range(len(DENSE_UNIT_CASES))])
def test_key_list_path_dense_units_match_oracle(index, deterministic):
    """capacity 64: the half-dense tiles overflow it (dense units) while the 40-key tiles stay lists."""
    check_key_list_path_against_oracle(DENSE_UNIT_CASES[index], seed=300 + index, deterministic=deterministic,
                                capacity=64)


def test_key_list_path_dense_units_agree_with_lists():
    """The same gradients whether a unit is walked as a list (default capacity) or densely (capacity 64)."""
    case = DENSE_UNIT_CASES[0]
    inputs, listed = check_key_list_path_against_oracle(case, seed=7)
    dense = run_bwd(*inputs, scale=case[5] ** -0.5, softcap=case[8], is_causal=case[7], deterministic=False,
                    capacity=64)
    for name, a, e in zip(("dq", "dk", "dv", "dbias"), dense, listed):
        assert rel_err(a, e) < TOL[case[6]], name


@pytest.mark.parametrize("d", [32, 64, 96, 128, 192, 256])
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_key_list_path_every_head_dim(d, dtype):
    check_key_list_path_against_oracle((1, 260, 260, 4, 2, d, dtype, True, 0.0, ("BK1N", "bf16"), "topk40", "BKMN"),
                                seed=d)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_key_list_path_gqa_ratios(group):
    check_key_list_path_against_oracle((2, 230, 230, 4, 4 // group, 64, BF16, True, 0.0, ("BK1N", "bf16"),
                                 "rand0.05", "BKMN"), seed=group)


def test_key_list_path_rows_with_no_kept_key():
    # rows 3..69 (across the 64-row boundary) and 130..140 (second unit) keep nothing: exact-zero dq,
    # nothing added to dk / dv / dbias from them (checked inside).
    empty = np.r_[3:70, 130:141]
    check_key_list_path_against_oracle((1, 200, 200, 4, 2, 128, BF16, False, 0.0, ("BK1N", "f32"), "rand0.5", "BKMN"),
                                seed=3, empty_rows=empty)
    check_key_list_path_against_oracle((1, 200, 200, 4, 2, 192, F16, True, 0.0, ("BK1N", "bf16"), "topk32", "BKMN"),
                                seed=4, empty_rows=empty)


def test_key_list_path_path_is_taken_and_agrees_with_dense():
    """The lowered call carries the key-list workspaces in both modes (the handler rejects a call whose workspaces
    do not match its own choice of path, so a successful run means the key-list kernel ran), and the result agrees
    with the dense deterministic kernel, reached by giving the per-key bias its query rows explicitly
    ([B, Hkv, 1, Lk] broadcast to [B, Hkv, Lq, Lk]: dbias then has rows, summed here)."""
    from jax_dmattn import _cuda_bwd

    case = (1, 300, 300, 8, 2, 128, BF16, True, 0.0, ("BK1N", "bf16"), "topk48", "BKMN")
    args, g_key_list = check_key_list_path_against_oracle(case, seed=7)
    q, k, v, bias, mask, out, lse, dout, dlse = args
    n_keys, n_words = _cuda_bwd.key_list_sizes(mask.shape)
    kw = dict(scale=128 ** -0.5, softcap=0.0, is_causal=True)
    fn = functools.partial(_cuda_bwd.flash_bwd, deterministic=False, **kw)
    hlo = jax.jit(fn).lower(*args).as_text()
    assert f"tensor<{n_keys}xi32>" in hlo and f"tensor<{2 * n_words}xui32>" in hlo
    det_fn = functools.partial(_cuda_bwd.flash_bwd, deterministic=True, **kw)
    hlo_det = jax.jit(det_fn).lower(*args).as_text()
    n_fixed = 4 * k.size + _cuda_bwd.FIXED_STATS_WORDS
    assert f"tensor<{n_keys}xi32>" in hlo_det and f"tensor<{n_fixed}xui32>" in hlo_det
    bias_rows = jnp.broadcast_to(bias, bias.shape[:2] + (q.shape[1], bias.shape[3]))
    dense_args = (q, k, v, bias_rows, mask, out, lse, dout, dlse)
    assert f"tensor<{n_keys}xi32>" not in jax.jit(det_fn).lower(*dense_args).as_text()
    g_dense = list(run_bwd(*dense_args, deterministic=True, **kw))
    g_dense[3] = np.asarray(g_dense[3], np.float32).sum(axis=2, keepdims=True)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), g_key_list, g_dense):
        assert rel_err(a, b) < 1e-2, name


# ------------------------------------------------------------------------------- deterministic key-list path
# deterministic=True on the key-list path: dk / dv / dbias partials become int64 counts of a per-call
# power-of-two resolution (from bounds on max |q|, |v|, |dout|, |delta|), added with integer atomics.


def _bits(x):
    return np.asarray(x).tobytes()


DET_KEY_LIST_CASES = [
    # the standard case in small: causal top-k mask from the per-key bias, GQA 4
    (1, 1000, 1000, 8, 2, 128, BF16, True, 0.0, ("BK1N", "bf16"), "topk128", "BKMN"),
    # f32 per-key bias (its own fixed-point workspace), f16, MHA
    (2, 300, 300, 4, 4, 64, F16, True, 0.0, ("BK1N", "f32"), "topk40", "BKMN"),
    # everything-broadcast per-key bias (dbias sums batches and heads), element mask, non-causal
    (2, 300, 300, 8, 2, 128, BF16, False, 0.0, ("111N", "bf16"), "rand0.05", "BHMN"),
    # no bias, MQA, D = 256 (64-row CTAs), Lq != Lk
    (1, 190, 333, 4, 1, 256, BF16, True, 0.0, None, "rand0.5", "BKMN"),
    # key-broadcast bias (exact-zero dbias), softcap
    (1, 300, 300, 4, 2, 96, F16, True, 20.0, ("BK11", "bf16"), "rand0.5", "BK1N"),
]


@pytest.mark.parametrize("index", range(len(DET_KEY_LIST_CASES)),
                         ids=[f"d{i}" for i in range(len(DET_KEY_LIST_CASES))])
def test_key_list_path_deterministic_bitwise_and_accurate(index, kernel_route):
    """Matches the oracle (and the exact zeros, inside check_key_list_path_against_oracle), is bitwise identical over
    3 more runs, and agrees with the atomic (fp32) key-list path; on the Hopper key-list kernel where it serves the
    call and on the sm80 one (forced)."""
    case = DET_KEY_LIST_CASES[index]
    args, g1 = check_key_list_path_against_oracle(case, seed=200 + index, deterministic=True)
    d, causal, softcap = case[5], case[7], case[8]
    kw = dict(scale=d ** -0.5, softcap=softcap, is_causal=causal)
    for _ in range(3):
        g2 = run_bwd(*args, deterministic=True, **kw)
        for name, a, b in zip(("dq", "dk", "dv", "dbias"), g1, g2):
            if a is not None:
                assert _bits(a) == _bits(b), f"{name} differs between deterministic runs"
    ga = run_bwd(*args, deterministic=False, **kw)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), g1, ga):
        if a is not None:
            assert rel_err(a, b, floor=1e-6) < 1e-2, name


def test_key_list_path_deterministic_rows_with_no_kept_key():
    empty = np.r_[3:70, 130:141]
    check_key_list_path_against_oracle((1, 200, 200, 4, 2, 128, BF16, False, 0.0, ("BK1N", "f32"), "rand0.5", "BKMN"),
                                seed=13, empty_rows=empty, deterministic=True)
    check_key_list_path_against_oracle((1, 200, 200, 4, 2, 192, F16, True, 0.0, ("BK1N", "bf16"), "topk32", "BKMN"),
                                seed=14, empty_rows=empty, deterministic=True)


@pytest.mark.parametrize("scales", [
    # large magnitudes (scores unchanged): the dK and dbias bounds pass 2^60, so their resolutions exceed 1
    {"q": 1e3, "scale": 1e-3, "v": 1e8, "dout": 1e8},
    {"dout": 1e-6, "dlse": 1e-6},                       # tiny gradients: accurate relative to their own norm
    {"v": 1e-4, "q": 1e2, "scale": 1e-2},               # mixed
], ids=["huge", "tiny", "mixed"])
def test_key_list_path_deterministic_magnitudes(scales):
    """The per-call resolution follows the inputs' magnitudes: gradients stay accurate (relative to their own
    norm, against the oracle and against the fp32 atomic path) far from magnitude 1."""
    case = (1, 300, 300, 8, 2, 128, BF16, True, 0.0, ("BK1N", "f32"), "topk48", "BKMN")
    args, g_det = check_key_list_path_against_oracle(case, seed=21, deterministic=True, scales=scales)
    kw = dict(scale=128 ** -0.5 * scales.get("scale", 1.0), softcap=0.0, is_causal=True)
    g_atomic = run_bwd(*args, deterministic=False, **kw)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), g_det, g_atomic):
        assert rel_err(a, b) < 1e-2, name


def test_key_list_path_deterministic_peaked_softmax_agrees_with_atomic():
    """q scaled by 1e3 with the usual scale: a near one-hot softmax, dS mostly cancellation noise. Both modes add
    the same fp32 partials, so they must still agree (the oracle comparison is not meaningful here)."""
    case = (1, 300, 300, 8, 2, 128, BF16, True, 0.0, ("BK1N", "bf16"), "topk48", "BKMN")
    b, lq, lk, h, hkv, d, dtype, causal, softcap, bias_spec, mask_kind, mask_code = case
    q, k, v, bias, mask, dout, dlse = key_list_inputs(22, b, lq, lk, h, hkv, d, dtype, causal, bias_spec, mask_kind,
                                                    mask_code)
    q = (q.astype(F32) * 1e3).astype(dtype)
    scale = d ** -0.5
    out, lse = oracle_fwd(q, k, v, bias, mask, scale=scale, softcap=0.0, is_causal=causal, dtype=dtype)
    args = (q, k, v, bias, mask, out, lse, dout, dlse)
    kw = dict(scale=scale, softcap=0.0, is_causal=causal)
    g_det = run_bwd(*args, deterministic=True, **kw)
    g_det2 = run_bwd(*args, deterministic=True, **kw)
    g_atomic = run_bwd(*args, deterministic=False, **kw)
    for name, a, a2, c in zip(("dq", "dk", "dv", "dbias"), g_det, g_det2, g_atomic):
        assert _bits(a) == _bits(a2), name
        assert rel_err(a, c, floor=1e-3 * np.linalg.norm(np.asarray(c, np.float64))) < 2e-2, name


def test_key_list_path_deterministic_non_finite_input_gives_nan():
    """A NaN in dout poisons the bounds: the deterministic key-list path writes NaN into all of dk, dv and dbias
    (documented; the atomic path leaves NaN only where the NaN row contributes)."""
    case = (1, 200, 200, 4, 2, 64, BF16, True, 0.0, ("BK1N", "f32"), "topk32", "BKMN")
    b, lq, lk, h, hkv, d, dtype, causal, softcap, bias_spec, mask_kind, mask_code = case
    q, k, v, bias, mask, dout, dlse = key_list_inputs(23, b, lq, lk, h, hkv, d, dtype, causal, bias_spec, mask_kind,
                                                    mask_code)
    scale = d ** -0.5
    out, lse = oracle_fwd(q, k, v, bias, mask, scale=scale, softcap=0.0, is_causal=causal, dtype=dtype)
    dout = dout.at[0, 150, 1, 5].set(jnp.nan)
    dq, dk, dv, dbias = run_bwd(q, k, v, bias, mask, out, lse, dout, dlse, scale=scale, softcap=0.0,
                                is_causal=causal, deterministic=True)
    for name, g in (("dk", dk), ("dv", dv), ("dbias", dbias)):
        assert np.isnan(np.asarray(g, np.float32)).all(), name


# The choices made for a device with less shared memory per block (sm_80: 163 KB), run on this GPU through the
# JAX_DMATTN_MAX_DYNAMIC_SMEM override: D = 128 takes the 64-row key-list build, D = 192 / 256 the key-tile path.
A100_SMEM = 166912


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("index", [0, 2])
def test_sm80_choices_match_oracle(monkeypatch, index, deterministic):
    from jax_dmattn import _cuda_bwd

    monkeypatch.setenv(_cuda_bwd.SMEM_ENV, str(A100_SMEM))
    case = list(KEY_LIST_CASES[index])
    assert _cuda_bwd.key_list_rows_per_cta(case[5]) == (64 if case[5] == 128 else 128)
    check_key_list_path_against_oracle(tuple(case), seed=500 + index, deterministic=deterministic)
    case[5] = 256  # no key-list build fits: the key-tile path, same gradients
    assert _cuda_bwd.key_list_rows_per_cta(256) == 0
    check_key_list_path_against_oracle(tuple(case), seed=600 + index, deterministic=deterministic)


# dq shares dout's buffer (the call aliases them: _cuda_bwd.DOUT_OPERAND): with dout made inside the jit, XLA writes
# dq into it. Every kernel must have read a query tile's dout before that tile's dq lands: the key-tile path (atomic
# dq and the deterministic dq kernel; the Hopper main kernel where it serves) and the key-list path (both modes).
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("index", [0, 1, 3, 9])
def test_dq_into_dout_buffer_key_tiles(index, deterministic, kernel_route):
    check_against_oracle(CASES[index], deterministic=deterministic, dout_in_jit=True)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("index", [0, 2, 6, 19])
def test_dq_into_dout_buffer_key_lists(index, deterministic, kernel_route):
    check_key_list_path_against_oracle(KEY_LIST_CASES[index], seed=900 + index, deterministic=deterministic,
                                       dout_in_jit=True)


def test_dq_aliases_dout_in_the_compiled_call():
    """The compiled backward keeps the alias (dq is output 0, dout operand DOUT_OPERAND of the custom call)."""
    from jax_dmattn import _cuda_bwd

    case = KEY_LIST_CASES[0]
    b, lq, lk, h, hkv, d, dtype, causal, softcap, bias_spec, mask_kind, mask_code = case
    q, k, v, bias, mask, dout, dlse = key_list_inputs(31, b, lq, lk, h, hkv, d, dtype, causal, bias_spec, mask_kind,
                                                    mask_code)
    out, lse = oracle_fwd(q, k, v, bias, mask, scale=d ** -0.5, softcap=0.0, is_causal=causal, dtype=dtype)
    fn = functools.partial(_cuda_bwd.flash_bwd, scale=d ** -0.5, softcap=0.0, is_causal=causal, deterministic=False)
    text = jax.jit(lambda *a: fn(*a[:7], a[7] * 2, a[8])).lower(q, k, v, bias, mask, out, lse, dout, dlse)
    text = text.compile().as_text()
    (line,) = [ln for ln in text.splitlines() if 'custom_call_target="dmattn_bwd_cuda"' in ln]
    assert f"output_to_operand_aliasing={{{{0}}: ({_cuda_bwd.DOUT_OPERAND}, {{}})}}" in line, line


# The key-list backward in passes over the kv heads (csrc/kernel_facts.h: key_list_bwd_accum_kv_heads), forced at
# small sizes: accumulators of one kv head (Hkv passes) or of half of them. Deterministic mode adds the same int64
# counts per element however the heads are split, so its gradients are bitwise those of one pass.
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("index,heads", [(0, 1), (2, 2), (2, 1), (6, 1), (13, 1), (17, 1), (19, 1)])
def test_key_list_path_in_kv_head_passes(index, heads, deterministic, kernel_route, monkeypatch):
    from jax_dmattn import _cuda_bwd

    case = KEY_LIST_CASES[index]
    inputs, one_pass = check_key_list_path_against_oracle(case, seed=950 + index, deterministic=deterministic)
    monkeypatch.setattr(_cuda_bwd, "key_list_accum_kv_heads", lambda *args: heads)
    _, passes = check_key_list_path_against_oracle(case, seed=950 + index, deterministic=deterministic)
    if deterministic:
        for name, a, c in zip(("dq", "dk", "dv", "dbias"), one_pass, passes):
            assert _bits(a) == _bits(c), name


def test_key_list_path_dense_units_in_kv_head_passes(monkeypatch):
    from jax_dmattn import _cuda_bwd

    monkeypatch.setattr(_cuda_bwd, "key_list_accum_kv_heads", lambda *args: 1)
    for deterministic in (False, True):
        check_key_list_path_against_oracle(DENSE_UNIT_CASES[0], seed=990, deterministic=deterministic, capacity=64)
