"""Gradients of ``jax_dmattn.attention`` (dq, dk, dv, dbias) against the analytic float64 oracle.

The loss is ``sum(out * dout)`` for a random cotangent ``dout`` (``jax.vjp``), so every element of every
gradient is checked. Every test takes the ``implementation`` fixture.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from cases import BASE, CASES, masked_bias_case
from helpers import (
    assert_close,
    check_dtype_supported,
    check_grads,
    get_attention,
    make_cotangent,
    make_inputs,
    native_dtype,
    oracle_bwd,
    oracle_fwd,
    poison,
    run_vjp,
    sweep_params,
)


@pytest.mark.parametrize("implementation, case", sweep_params(CASES))
def test_grads_match_oracle(implementation, case, rng):
    check_grads(implementation, case, rng)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("bias_shape", [(2, 2, 65, 100), (2, 2, 65, 1), (1, 4, 1, 1), (1, 1, 65, 1)],
                         ids=["full", "per-row", "per-head", "rows-shared"])
def test_grads_through_lse(implementation, dtype, bias_shape, rng):
    """lse is differentiable too: cotangents on (out, lse) together. A bias constant along keys leaves out
    unchanged but moves lse one for one: its gradient is the lse cotangent of the rows with a kept key."""
    case = BASE.replace(dtype=dtype, bias=bias_shape, mask=(2, 1, 65, 100), mask_kind="rows", softcap=4.0)
    check_dtype_supported(implementation, case.jdtype)
    q, k, v, bias, mask = make_inputs(case, rng)
    dout = make_cotangent(case, rng)
    dlse = rng.standard_normal((2, 4, 65)).astype(np.float32)
    attention = get_attention()

    @jax.jit
    def f(q, k, v, bias, dout, dlse):
        fn = lambda q, k, v, b: attention(q, k, v, b, mask, softcap=4.0, return_lse=True,
                                          implementation=implementation)
        _, vjp = jax.vjp(fn, q, k, v, bias)
        return vjp((dout, dlse))

    got = f(q, k, v, bias, dout, dlse)
    exp = oracle.oracle_grads(q, k, v, bias, mask, dout, softcap=4.0, dlse=dlse)
    for name, g, e in zip(("dq", "dk", "dv", "dbias"), got, exp):
        assert_close(g, e, case.jdtype, "grad", name=name)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("variant", ["mask-none-kept", "mask-none-kept-bcast", "causal-and-mask"])
def test_fully_masked_input_grads(implementation, dtype, variant, rng):
    """All-False mask: every gradient exactly 0 (dbias too, in bias's shape and dtype), never NaN."""
    if variant == "mask-none-kept":
        case = BASE.replace(dtype=dtype, mask=(2, 4, 65, 100), mask_kind="none_kept", bias=(2, 2, 65, 100))
    elif variant == "mask-none-kept-bcast":
        case = BASE.replace(dtype=dtype, mask=(1, 1, 1, 100), mask_kind="none_kept", bias=(1, 1, 65, 100),
                            bias_dtype="f32")
    else:
        case = BASE.replace(dtype=dtype, Lq=100, Lk=30, is_causal=True, mask=(2, 1, 100, 30), mask_kind="none_kept",
                            bias=(1, 4, 1, 30))
    check_dtype_supported(implementation, case.jdtype)
    q, k, v, bias, mask = make_inputs(case, rng)
    dout = make_cotangent(case, rng)
    out, dq, dk, dv, db = run_vjp(implementation, case, q, k, v, bias, mask, dout)
    for name, x, like in (("out", out, q), ("dq", dq, q), ("dk", dk, k), ("dv", dv, v), ("dbias", db, bias)):
        x = np.asarray(x)
        assert x.shape == like.shape and x.dtype == like.dtype, f"{name}: {x.shape} {x.dtype}"
        xf = x.astype(np.float32)
        assert not np.isnan(xf).any(), f"{name} has NaN"
        assert np.all(xf == 0), f"{name} must be exactly 0, max |.| = {np.abs(xf).max()}"


def test_empty_rows_grads(implementation, rng):
    """Rows with no kept key (mask rows + causal Lq > Lk) touch no gradient; the rest match the oracle."""
    case = BASE.replace(dtype=native_dtype(implementation), Lq=100, Lk=40, is_causal=True, bias=(2, 4, 100, 40),
                        mask=(2, 4, 100, 40), mask_kind="rows")
    q, k, v, bias, mask = make_inputs(case, rng)
    dout = make_cotangent(case, rng)
    (out, dq, dk, dv, db), _ = check_grads(implementation, case, rng, inputs=(q, k, v, bias, mask), dout=dout)
    _, lse = oracle_fwd(case, q, k, v, bias, mask)
    empty = np.isneginf(lse)  # [B, H, Lq]
    assert empty.any()
    dq_h = np.asarray(dq).transpose(0, 2, 1, 3)
    assert np.all(dq_h[empty] == 0), "dq of an empty row must be exactly 0"
    assert np.all(np.asarray(db)[empty] == 0), "dbias of an empty row must be exactly 0"


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 4, 65, 1), (1, 2, 65, 1), (1, 1, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_per_row_bias_grad_is_zero(implementation, dtype, shape, rng):
    """A bias broadcast along keys is a per-row constant that softmax cancels: dbias is 0. The kernels write
    exact zeros (docs/design.md); the autodiff reference gets float32 rounding noise only."""
    case = BASE.replace(dtype=dtype, bias=shape, mask=(2, 1, 65, 100))
    check_dtype_supported(implementation, case.jdtype)
    q, k, v, bias, mask = make_inputs(case, rng)
    dout = make_cotangent(case, rng)
    out, dq, dk, dv, db = run_vjp(implementation, case, q, k, v, bias, mask, dout)
    db = np.asarray(db).astype(np.float64)
    assert db.shape == shape
    if implementation == "xla":
        assert np.abs(db).max() <= 1e-4, f"|dbias| max {np.abs(db).max()}"
    else:
        assert np.all(db == 0), f"kernels must write exact zeros, |dbias| max {np.abs(db).max()}"


@pytest.mark.parametrize(
    "bias_shape", [(2, 2, 130, 200), (1, 1, 130, 200), (1, 2, 1, 200)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_deterministic_backward_is_bitwise_reproducible(implementation, dtype, bias_shape, rng):
    """deterministic=True: two runs give bitwise-identical gradients (and they match the oracle)."""
    case = BASE.replace(dtype=dtype, H=8, Hkv=2, Lq=130, Lk=200, bias=bias_shape, mask=(2, 1, 130, 200),
                        mask_kind="block_random", is_causal=True, bias_dtype="f32")
    check_dtype_supported(implementation, case.jdtype)
    q, k, v, bias, mask = make_inputs(case, rng)
    dout = make_cotangent(case, rng)
    r1 = run_vjp(implementation, case, q, k, v, bias, mask, dout, deterministic=True)
    r2 = run_vjp(implementation, case, q, k, v, bias, mask, dout, deterministic=True)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dbias"), r1, r2):
        a, b = np.asarray(a), np.asarray(b)
        assert a.tobytes() == b.tobytes(), f"{name} differs between two deterministic runs"
    edq, edk, edv, edb = oracle_bwd(case, q, k, v, bias, mask, dout)
    for name, g, e in zip(("dq", "dk", "dv"), r1[1:4], (edq, edk, edv)):
        assert_close(g, e, case.jdtype, "grad", name=name)
    if bias_shape[-1] != 1:
        assert_close(r1[4], edb, case.jdtype, "grad", name="dbias")


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_deterministic_flag_does_not_change_values(implementation, dtype, rng):
    case = BASE.replace(dtype=dtype, bias=(1, 2, 65, 100), mask=(2, 1, 65, 100))
    check_dtype_supported(implementation, case.jdtype)
    q, k, v, bias, mask = make_inputs(case, rng)
    dout = make_cotangent(case, rng)
    r0 = run_vjp(implementation, case, q, k, v, bias, mask, dout, deterministic=False)
    r1 = run_vjp(implementation, case, q, k, v, bias, mask, dout, deterministic=True)
    np.testing.assert_array_equal(np.asarray(r0[0]), np.asarray(r1[0]))  # forward is unaffected
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), r0[1:], r1[1:]):
        assert_close(a, np.asarray(b).astype(np.float64), case.jdtype, "grad", name=name)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_skipping_changes_nothing_grads(implementation, dtype, rng):
    """Block-structured mask vs the same mask as an additive 0/-inf bias: both backward passes match the
    oracle, and dbias is 0 wherever the mask is False."""
    Lq, Lk = 192, 320
    case = masked_bias_case(dtype, Lq, Lk, "block")
    check_dtype_supported(implementation, case.jdtype)
    q, k, v, bias, mask = make_inputs(case, rng)
    dout = make_cotangent(case, rng)
    rm = run_vjp(implementation, case, q, k, v, bias, mask, dout)
    bias_inf = np.where(mask, bias, -np.inf).astype(np.float32)
    rb = run_vjp(implementation, case.replace(mask=None), q, k, v, bias_inf, None, dout)
    exp = oracle_bwd(case, q, k, v, bias, mask, dout)
    for tag, r in (("mask", rm), ("-inf bias", rb)):
        for name, g, e in zip(("dq", "dk", "dv", "dbias"), r[1:], exp):
            assert_close(g, e, case.jdtype, "grad", name=f"{name} ({tag})")
        assert np.all(np.asarray(r[4])[~mask] == 0), f"dbias under a False mask must be 0 ({tag})"


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_masked_bias_values_are_ignored_grads(implementation, dtype, rng):
    """Poison: NaN / inf / huge bias under a False mask changes no gradient, and dbias there is exactly 0."""
    Lq, Lk = 130, 200
    case = masked_bias_case(dtype, Lq, Lk, "block_random")
    check_dtype_supported(implementation, case.jdtype)
    q, k, v, bias, mask = make_inputs(case, rng)
    dout = make_cotangent(case, rng)
    exp = oracle_bwd(case, q, k, v, bias, mask, dout)
    for value in (1e4, np.inf, np.nan):
        r = run_vjp(implementation, case, q, k, v, poison(bias, ~mask, value), mask, dout)
        for name, g, e in zip(("dq", "dk", "dv", "dbias"), r[1:], exp):
            assert_close(g, e, case.jdtype, "grad", name=f"{name} (masked bias = {value})")
        assert np.all(np.asarray(r[4])[~mask] == 0)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_invisible_keys_get_zero_grads(implementation, dtype, rng):
    """Poison: keys no query may see carry huge k/v; their dk, dv are exactly 0 and nothing else changes."""
    case = BASE.replace(dtype=dtype, Lq=70, Lk=200, mask=(2, 1, 1, 200), bias=(2, 2, 70, 200))
    check_dtype_supported(implementation, case.jdtype)
    q, k, v, bias, mask = make_inputs(case, rng)
    mask[..., 64:128] = False
    hidden = ~mask[:, 0, 0, :]
    k = poison(k, hidden[:, :, None, None], 300.0)
    v = poison(v, hidden[:, :, None, None], 3e4)
    (out, dq, dk, dv, db), _ = check_grads(implementation, case, rng, inputs=(q, k, v, bias, mask))
    assert np.all(np.asarray(dk)[hidden] == 0)
    assert np.all(np.asarray(dv)[hidden] == 0)


def test_grad_buffers_are_fully_written(implementation, rng):
    """Poison: donate NaN-filled buffers shaped like dq/dk/dv/dbias; whatever XLA reuses must be overwritten,
    empty rows and invisible keys included."""
    case = BASE.replace(dtype=native_dtype(implementation), Lq=100, Lk=40, is_causal=True, bias=(2, 4, 100, 40),
                        mask=(2, 4, 100, 40), mask_kind="rows")
    q, k, v, bias, mask = make_inputs(case, rng)
    dout = make_cotangent(case, rng)
    attention = get_attention()

    def f(j1, j2, j3, j4, q, k, v, bias, mask, dout):
        del j1, j2, j3, j4
        fn = lambda q, k, v, b: attention(q, k, v, b, mask, is_causal=True, implementation=implementation)
        _, vjp = jax.vjp(fn, q, k, v, bias)
        return vjp(dout)

    g = jax.jit(f, donate_argnums=(0, 1, 2, 3))
    junk = [jnp.full(x.shape, jnp.nan, x.dtype) for x in (q, k, v, bias)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = g(*junk, q, k, v, bias, mask, dout)
    exp = oracle_bwd(case, q, k, v, bias, mask, dout)
    for name, a, e in zip(("dq", "dk", "dv", "dbias"), got, exp):
        assert_close(a, e, case.jdtype, "grad", name=name)


def test_mask_gets_no_gradient(implementation, rng):
    """mask is bool: differentiating w.r.t. it is not possible (float0 / error), and the other grads are fine."""
    case = BASE.replace(dtype=native_dtype(implementation), bias=(2, 2, 65, 100), mask=(2, 1, 65, 100))
    q, k, v, bias, mask = make_inputs(case, rng)
    attention = get_attention()
    loss = lambda q, m: jnp.sum(attention(q, k, v, bias, m, implementation=implementation).astype(jnp.float32))
    g = jax.jit(jax.grad(loss, argnums=0))(q, mask)
    assert g.shape == q.shape and not np.isnan(np.asarray(g)).any()
    with pytest.raises(TypeError):
        jax.grad(loss, argnums=1)(q, mask)


@pytest.mark.parametrize(
    "bias_shape, mask_shape",
    [((2, 2, 1, 100), (2, 1, 65, 100)), ((2, 2, 65, 100), (1, 1, 65, 100)), ((1, 1, 65, 100), None),
     (None, (2, 2, 65, 100))],
    ids=["key-bias", "full-bias", "shared-bias", "mask-only"],
)
def test_no_full_size_score_buffers(implementation, bias_shape, mask_shape, rng):
    """Kernels never materialise [B, H, Lq, Lk] (or any scores-sized buffer larger than the bias/mask
    given), forward or backward: checked on the compiled HLO of the jitted forward + VJP."""
    import re

    if implementation == "xla":
        pytest.skip("the pure-jnp reference materialises the scores by design")
    case = BASE.replace(dtype=native_dtype(implementation), bias=bias_shape, mask=mask_shape)
    q, k, v, bias, mask = make_inputs(case, rng)
    dout = make_cotangent(case, rng)
    attention = get_attention()

    def f(q, k, v, bias, mask, dout):
        fn = lambda q, k, v, b: attention(q, k, v, b, mask, implementation=implementation)
        return jax.vjp(fn, q, k, v, bias)[1](dout)

    if bias is None:
        bias = np.zeros((), np.float32)  # scalar bias: a broadcast [1, 1, 1, 1]
    txt = jax.jit(f).lower(q, k, v, bias, mask, dout).compile().as_text()
    limit = max(np.size(bias), 0 if mask is None else mask.size)
    for dims in set(re.findall(r"\b(?:f64|f32|bf16|f16|pred|s8|u8|s32)\[([\d,]+)\]", txt)):
        shape = [int(d) for d in dims.split(",")]
        if 65 in shape and 100 in shape:
            assert np.prod(shape) <= limit, f"a scores-sized buffer {shape} appears in the compiled HLO"


def test_float64_bias_under_x64(implementation, rng):
    """With x64 on, a float64 bias is accepted (the kernels read it as float32) and dbias comes back float64."""
    case = BASE.replace(dtype="bf16" if implementation == "cuda" else "f32", bias=(2, 2, 65, 100),
                        mask=(2, 1, 65, 100))
    q, k, v, _, mask = make_inputs(case, rng)
    dout = make_cotangent(case, rng)
    bias = rng.standard_normal((2, 2, 65, 100))
    attention = get_attention()
    with jax.enable_x64(True):
        fn = lambda q, k, v, b: attention(q, k, v, b, mask, implementation=implementation)
        f = jax.jit(lambda q, k, v, b, d: jax.vjp(fn, q, k, v, b)[1](d))
        dq, dk, dv, db = f(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(bias, jnp.float64),
                           jnp.asarray(dout))
        assert db.dtype == jnp.float64 and db.shape == bias.shape
        assert dq.dtype == q.dtype
    exp = oracle.oracle_grads(q, k, v, bias, mask, dout)
    for name, g, e in zip(("dq", "dk", "dv", "dbias"), (dq, dk, dv, db), exp):
        assert_close(g, e, case.jdtype, "grad", name=name)
