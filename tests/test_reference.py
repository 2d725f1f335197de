"""The pure-jnp reference (``jax_dmattn.reference.attention_reference``) against the float64 oracle: in float64
(x64 enabled only inside a fixture, restored after) with a tight tolerance, and in float32; gradients from
JAX autodiff; NaN-freedom of gradients on rows with no kept key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from cases import CASES
from helpers import assert_close, make_cotangent, make_inputs

TOL64 = 1e-10


@pytest.fixture
def x64():
    before = jax.config.jax_enable_x64
    with jax.enable_x64(True):
        yield
    assert jax.config.jax_enable_x64 == before


def _ref():
    from jax_dmattn.reference import attention_reference

    return attention_reference


def _kw(case):
    return dict(scale=case.scale, is_causal=case.is_causal, softcap=case.softcap)


# A representative slice of the shared sweep (every axis but dtype, which float64 replaces).
_REF_IDS = [
    "bias-1x1x1x100", "bias-2x4x65x1", "bias-2x2x1x100-mask", "mask-1x2x1x100", "gqa-8-1", "len-1-1",
    "len-100-17", "d40", "causal-129-17", "scale-softcap", "mask-rows-empty-bcast", "mask-block-causal",
]
REF_CASES = [p for p in CASES if p.id in _REF_IDS]
assert len(REF_CASES) == len(_REF_IDS), sorted(set(_REF_IDS) - {p.id for p in CASES})


@pytest.mark.parametrize("case", REF_CASES)
def test_reference_float64_forward_and_grads(case, rng, x64):
    case = case.replace(dtype="f32", bias_dtype=None)
    q, k, v, bias, mask = make_inputs(case, rng)
    dout = make_cotangent(case, rng)
    # fresh float64 values (not rounded to float32)
    q, k, v, dout = (rng.standard_normal(x.shape) for x in (q, k, v, dout))
    bias = None if bias is None else rng.standard_normal(bias.shape)
    ref = _ref()
    args = [jnp.asarray(x, jnp.float64) for x in (q, k, v)]
    jb = None if bias is None else jnp.asarray(bias, jnp.float64)
    out, lse = jax.jit(lambda *a: ref(*a, return_lse=True, **_kw(case)))(*args, jb, mask)
    assert out.dtype == jnp.float64
    eo, el = oracle.oracle_attention(q, k, v, bias, mask, **_kw(case))
    assert_close(out, eo, np.float64, "out", tol=TOL64)
    assert_close(lse, el, np.float64, "lse", tol=TOL64)

    if bias is None:
        fn = lambda q, k, v: ref(q, k, v, None, mask, **_kw(case))
        got = jax.jit(lambda *a: jax.vjp(fn, *a)[1](jnp.asarray(dout)))(*args) + (None,)
    else:
        fn = lambda q, k, v, b: ref(q, k, v, b, mask, **_kw(case))
        got = jax.jit(lambda *a: jax.vjp(fn, *a)[1](jnp.asarray(dout)))(*args, jb)
    exp = oracle.oracle_grads(q, k, v, bias, mask, dout, **_kw(case))
    for name, g, e in zip(("dq", "dk", "dv", "dbias"), got, exp):
        if e is None:
            continue
        assert g.dtype == jnp.float64, name
        per_row = name == "dbias" and bias.shape[-1] == 1  # exact 0: compare on an O(1) scale
        floor = np.sqrt(e.size) if per_row else 1e-6 * np.sqrt(e.size)
        assert_close(g, e, np.float64, "grad", tol=TOL64, name=name, floor=floor)


@pytest.mark.parametrize("case", REF_CASES[1:5])
def test_reference_float32(case, rng):
    q, k, v, bias, mask = make_inputs(case, rng)
    dout = make_cotangent(case, rng)
    ref = _ref()
    out, lse = jax.jit(lambda *a: ref(*a, return_lse=True, **_kw(case)))(q, k, v, bias, mask)
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    eo, el = oracle.oracle_attention(q, k, v, bias, mask, **_kw(case))
    assert_close(out, eo, np.float32, "out")
    assert_close(lse, el, np.float32, "lse")
    if bias is not None:
        fn = lambda q, k, v, b: ref(q, k, v, b, mask, **_kw(case))
        got = jax.jit(lambda *a: jax.vjp(fn, *a)[1](jnp.asarray(dout)))(q, k, v, bias)
        exp = oracle.oracle_grads(q, k, v, bias, mask, dout, **_kw(case))
        for name, g, e in zip(("dq", "dk", "dv", "dbias"), got, exp):
            assert_close(g, e, np.float32, "grad", name=name, floor=None if bias.shape[-1] != 1 else np.sqrt(e.size))


@pytest.mark.parametrize(
    "precision, variant",
    [("f64", "rows"), ("f64", "all-masked"), ("f64", "causal-lq-gt-lk"), ("f64", "softcap-rows"), ("f32", "rows"),
     ("f32", "all-masked")],
)
def test_reference_grads_nan_free_on_empty_rows(precision, variant, rng):
    B, Lq, Lk, H, Hkv, D = 2, 20, 12, 4, 2, 16
    is_causal = variant == "causal-lq-gt-lk"
    softcap = 3.0 if variant == "softcap-rows" else None
    mask = rng.random((B, H, Lq, Lk)) < 0.6
    if variant in ("rows", "softcap-rows"):
        mask[:, :, ::3] = False
    elif variant == "all-masked":
        mask[:] = False
    q, k, v = (rng.standard_normal(s) for s in [(B, Lq, H, D), (B, Lk, Hkv, D), (B, Lk, Hkv, D)])
    bias = rng.standard_normal((B, Hkv, Lq, Lk))
    dout = rng.standard_normal((B, Lq, H, D))
    ref = _ref()

    def run():
        dt = jnp.float64 if precision == "f64" else jnp.float32
        args = [jnp.asarray(x, dt) for x in (q, k, v, bias)]
        loss = lambda q, k, v, b: jnp.sum(ref(q, k, v, b, mask, is_causal=is_causal, softcap=softcap)
                                          * jnp.asarray(dout, dt))
        out, lse = jax.jit(lambda *a: ref(*a, mask, is_causal=is_causal, softcap=softcap, return_lse=True))(*args)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
        return out, lse, grads

    if precision == "f64":
        with jax.enable_x64(True):
            out, lse, grads = run()
    else:
        out, lse, grads = run()
    _, el = oracle.oracle_attention(q, k, v, bias, mask, is_causal=is_causal, softcap=softcap)
    empty = np.isneginf(el)
    assert empty.any()
    assert np.all(np.isneginf(np.asarray(lse)[empty]))
    assert np.all(np.asarray(out).transpose(0, 2, 1, 3)[empty] == 0)
    for name, g in zip(("dq", "dk", "dv", "dbias"), grads):
        g = np.asarray(g)
        assert not np.isnan(g).any(), f"{name} has NaN"
    assert np.all(np.asarray(grads[0]).transpose(0, 2, 1, 3)[empty] == 0)
    if variant == "all-masked":
        for name, g in zip(("dq", "dk", "dv", "dbias"), grads):
            assert np.all(np.asarray(g) == 0), name
    exp = oracle.oracle_grads(q, k, v, bias, mask, dout, is_causal=is_causal, softcap=softcap)
    dt = np.float64 if precision == "f64" else np.float32
    for name, g, e in zip(("dq", "dk", "dv", "dbias"), grads, exp):
        assert_close(g, e, dt, "grad", name=name, tol=TOL64 if precision == "f64" else None)


def test_reference_matches_xla_implementation(rng):
    """implementation="xla" is the reference."""
    import jax_dmattn

    q = rng.standard_normal((2, 33, 4, 32)).astype(np.float32)
    k = rng.standard_normal((2, 40, 2, 32)).astype(np.float32)
    v = rng.standard_normal((2, 40, 2, 32)).astype(np.float32)
    bias = rng.standard_normal((2, 2, 33, 40)).astype(np.float32)
    mask = rng.random((2, 1, 33, 40)) < 0.7
    a = jax_dmattn.attention(q, k, v, bias, mask, is_causal=True, implementation="xla", return_lse=True)
    b = _ref()(q, k, v, bias, mask, is_causal=True, return_lse=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_x64_fixture_restores(x64):
    assert jax.config.jax_enable_x64
    assert jnp.asarray(np.ones(2)).dtype == jnp.float64
