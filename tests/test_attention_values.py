"""Forward values of ``jax_dmattn.attention`` (out and lse) against the float64 oracle.

Every test takes the ``implementation`` fixture ("xla", "cpu", and "cuda" on a GPU), so each backend runs
the same body.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cases import BASE, CASES, masked_bias_case
from helpers import (
    DTYPES,
    assert_close,
    check_dtype_supported,
    check_forward,
    check_grads,
    get_attention,
    make_inputs,
    native_dtype,
    oracle_fwd,
    poison,
    run_forward,
    sweep_params,
)


@pytest.mark.parametrize("implementation, case", sweep_params(CASES))
def test_forward_matches_oracle(implementation, case, rng):
    check_forward(implementation, case, rng)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_return_lse_false_returns_out_only(implementation, dtype, rng):
    case = BASE.replace(dtype=dtype, bias=(2, 2, 65, 100), mask=(2, 1, 65, 100))
    check_dtype_supported(implementation, case.jdtype)
    q, k, v, bias, mask = make_inputs(case, rng)
    attention = get_attention()
    out = attention(q, k, v, bias, mask, implementation=implementation)
    assert isinstance(out, jax.Array), f"return_lse=False must return one array, got {type(out)}"
    out2, lse = attention(q, k, v, bias, mask, implementation=implementation, return_lse=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))
    eo, _ = oracle_fwd(case, q, k, v, bias, mask)
    assert_close(out, eo, case.jdtype, "out")


def test_default_implementation(rng):
    """implementation=None picks the best available backend; results obey the same contract."""
    attention = get_attention()
    case = BASE.replace(dtype="bf16", bias=(2, 2, 1, 100), mask=(2, 1, 65, 100), is_causal=True)
    q, k, v, bias, mask = make_inputs(case, rng)
    out, lse = attention(q, k, v, bias, mask, is_causal=True, return_lse=True)
    eo, el = oracle_fwd(case, q, k, v, bias, mask)
    assert out.dtype == jnp.bfloat16
    assert_close(out, eo, case.jdtype, "out")
    assert_close(lse, el, case.jdtype, "lse")


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize(
    "variant",
    ["mask-none-kept", "mask-none-kept-bias", "mask-none-kept-bcast", "causal-lq-gt-lk-all-empty"],
)
def test_fully_masked_input_forward(implementation, dtype, variant, rng):
    """All-False mask: out exactly 0, lse exactly -inf, no NaN."""
    if variant == "mask-none-kept":
        case = BASE.replace(dtype=dtype, mask=(2, 4, 65, 100), mask_kind="none_kept")
    elif variant == "mask-none-kept-bias":
        case = BASE.replace(dtype=dtype, mask=(2, 1, 65, 100), mask_kind="none_kept", bias=(2, 2, 65, 100))
    elif variant == "mask-none-kept-bcast":
        case = BASE.replace(dtype=dtype, mask=(1, 1, 1, 1), mask_kind="none_kept", bias=(1, 1, 1, 100))
    else:  # causal Lq > Lk (leading rows see no key) and the mask removes the rest
        case = BASE.replace(dtype=dtype, Lq=100, Lk=30, is_causal=True, mask=(1, 1, 100, 30), mask_kind="none_kept")
    check_dtype_supported(implementation, case.jdtype)
    q, k, v, bias, mask = make_inputs(case, rng)
    out, lse = run_forward(implementation, case, q, k, v, bias, mask)
    out, lse = np.asarray(out), np.asarray(lse)
    assert not np.isnan(out.astype(np.float32)).any()
    assert np.all(out == 0), "out must be exactly 0 where no key is kept"
    assert np.all(np.isneginf(lse)), "lse must be exactly -inf where no key is kept"


def test_empty_rows_exact(implementation, rng):
    """Rows with no kept key (mask rows, causal Lq > Lk) are exactly 0 / -inf; other rows are unaffected."""
    case = BASE.replace(Lq=100, Lk=40, is_causal=True, bias=(2, 2, 100, 40), mask=(2, 4, 100, 40), mask_kind="rows")
    q, k, v, bias, mask = make_inputs(case, rng)
    out, lse, (eo, el) = check_forward(implementation, case, rng, inputs=(q, k, v, bias, mask))
    empty = np.isneginf(el)  # [B, H, Lq]
    assert empty.any() and (~empty).any()
    out = np.asarray(out).transpose(0, 2, 1, 3)  # [B, H, Lq, D]
    assert np.all(out[empty] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[empty]))


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_skipping_changes_nothing(implementation, dtype, rng):
    """A block-structured mask gives the same result as the equivalent additive 0/-inf bias (no skipping
    possible there), and both match the oracle."""
    Lq, Lk = 192, 320
    case = masked_bias_case(dtype, Lq, Lk, "block")
    check_dtype_supported(implementation, case.jdtype)
    q, k, v, bias, mask = make_inputs(case, rng)
    out_m, lse_m = run_forward(implementation, case, q, k, v, bias, mask)
    bias_inf = np.where(mask, bias, -np.inf).astype(np.float32)
    out_b, lse_b = run_forward(implementation, case.replace(mask=None), q, k, v, bias_inf, None)
    eo, el = oracle_fwd(case, q, k, v, bias, mask)
    assert_close(out_m, eo, case.jdtype, "out", name="out(mask)")
    assert_close(out_b, eo, case.jdtype, "out", name="out(-inf bias)")
    assert_close(lse_m, el, case.jdtype, "lse", name="lse(mask)")
    assert_close(lse_b, el, case.jdtype, "lse", name="lse(-inf bias)")
    assert_close(out_m, np.asarray(out_b).astype(np.float64), case.jdtype, "out", name="mask vs -inf bias")


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_masked_bias_values_are_ignored(implementation, dtype, rng):
    """Poison: bias entries under a False mask (NaN there, huge elsewhere in excluded tiles) never
    influence the output."""
    Lq, Lk = 130, 200
    case = masked_bias_case(dtype, Lq, Lk, "block_random")
    check_dtype_supported(implementation, case.jdtype)
    q, k, v, bias, mask = make_inputs(case, rng)
    eo, el = oracle_fwd(case, q, k, v, bias, mask)
    for value in (1e4, np.inf, np.nan):
        poisoned = poison(bias, ~mask, value)
        out, lse = run_forward(implementation, case, q, k, v, poisoned, mask)
        assert_close(out, eo, case.jdtype, "out", name=f"out (masked bias = {value})")
        assert_close(lse, el, case.jdtype, "lse", name=f"lse (masked bias = {value})")


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_invisible_keys_are_ignored(implementation, dtype, rng):
    """Poison: keys that no query may see (per-key mask False) carry huge k and v; the output is unchanged."""
    case = BASE.replace(dtype=dtype, Lq=70, Lk=200, mask=(2, 1, 1, 200), bias=(2, 2, 1, 200))
    check_dtype_supported(implementation, case.jdtype)
    q, k, v, bias, mask = make_inputs(case, rng)
    mask[..., 64:128] = False  # a whole key tile
    hidden = ~mask[:, 0, 0, :]  # [B, Lk]
    k = poison(k, hidden[:, :, None, None], 300.0)
    v = poison(v, hidden[:, :, None, None], 3e4)
    check_forward(implementation, case, rng, inputs=(q, k, v, bias, mask))


def test_output_buffers_are_fully_written(implementation, rng):
    """Poison: donate NaN-filled buffers shaped like out/lse; if XLA reuses them for the outputs, every
    element (including empty rows) must still be written."""
    case = BASE.replace(dtype=native_dtype(implementation), Lq=100, Lk=40, is_causal=True, bias=(2, 2, 100, 40),
                        mask=(2, 4, 100, 40), mask_kind="rows")
    q, k, v, bias, mask = make_inputs(case, rng)
    attention = get_attention()

    def f(junk_out, junk_lse, q, k, v, bias, mask):
        del junk_out, junk_lse
        return attention(q, k, v, bias, mask, is_causal=True, return_lse=True, implementation=implementation)

    g = jax.jit(f, donate_argnums=(0, 1))
    junk_out = jnp.full(q.shape, jnp.nan, q.dtype)
    junk_lse = jnp.full((2, 4, 100), jnp.nan, jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, lse = g(junk_out, junk_lse, q, k, v, bias, mask)
    eo, el = oracle_fwd(case, q, k, v, bias, mask)
    assert_close(out, eo, case.jdtype, "out")
    assert_close(lse, el, case.jdtype, "lse")


def test_scale_default_uses_true_head_dim(implementation, rng):
    """scale=None means D ** -0.5 of the caller's D, also when the kernel pads D (40 -> 64)."""
    case = BASE.replace(dtype=native_dtype(implementation), D=40, Lq=20, Lk=30)
    q, k, v, bias, mask = make_inputs(case, rng)
    attention = get_attention()
    a = jax.jit(lambda *x: attention(*x, implementation=implementation))(q, k, v)
    b = jax.jit(lambda *x: attention(*x, scale=40 ** -0.5, implementation=implementation))(q, k, v)
    assert_close(a, np.asarray(b).astype(np.float64), case.jdtype, "out")


def test_gqa_equals_repeated_kv(implementation, rng):
    """GQA with Hkv heads equals MHA with each kv head repeated g times (and a Hkv-head bias likewise)."""
    case = BASE.replace(dtype=native_dtype(implementation), H=8, Hkv=2, bias=(2, 2, 65, 100), mask=(2, 2, 65, 100))
    q, k, v, bias, mask = make_inputs(case, rng)
    attention = get_attention()
    f = jax.jit(lambda *a: attention(*a, implementation=implementation))
    a = f(q, k, v, bias, mask)
    rep = lambda x: np.repeat(x, 4, axis=2)
    rep_b = lambda x: np.repeat(x, 4, axis=1)
    b = f(q, rep(k), rep(v), rep_b(bias), rep_b(mask))
    assert_close(a, np.asarray(b).astype(np.float64), case.jdtype, "out")


@pytest.mark.parametrize("d", [264, 320])
def test_head_dim_above_256_runs_the_cpu_kernels(implementation, d, rng):
    """The CPU kernels take any head dim (implementation=None on CPU runs them too); CUDA stops at 256."""
    if implementation == "cuda":
        pytest.skip("implementation='cuda' takes head_dim <= 256 (tests/test_errors.py)")
    case = BASE.replace(D=d, Lq=33, Lk=70, is_causal=True, bias=(2, 2, 1, 70), mask=(1, 1, 33, 70))
    check_forward(implementation, case, rng)
    check_grads(implementation, case, rng)


def _empty_inputs(implementation, b, lq, lk, h, hkv, bias_shape, rng):
    dtype = DTYPES[native_dtype(implementation)]
    q = jnp.asarray(rng.standard_normal((b, lq, h, 16)), dtype)
    k = jnp.asarray(rng.standard_normal((b, lk, hkv, 16)), dtype)
    v = jnp.asarray(rng.standard_normal((b, lk, hkv, 16)), dtype)
    bias = None if bias_shape is None else jnp.asarray(rng.standard_normal(bias_shape), jnp.float32)
    return q, k, v, bias


def _masks_without_keys(b, h, lq):
    """Every mask form for Lk = 0."""
    from jax_dmattn import KeyIndices, TopKMask

    return {
        "none": None,
        "bool": jnp.ones((b, 1, lq, 0), bool),
        "bool-bcast": jnp.ones((1, 1, 1, 1), bool),
        "topk": TopKMask(jnp.zeros((b, h, 0)), 3),
        "indices": KeyIndices(jnp.full((b, 1, lq, 2), -1, jnp.int32)),
    }


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("bias_shape", [None, (2, 2, 5, 0), (1, 1, 5, 1), (2, 4, 1, 1)])
def test_no_keys(implementation, is_causal, bias_shape, rng):
    """Lk = 0: every row sees no key, like a fully masked row: out exactly 0, lse -inf, dq 0, dk / dv empty,
    dbias 0 in the bias's own shape, on every implementation and with every mask form."""
    b, lq, h, hkv = 2, 5, 4, 2
    q, k, v, bias = _empty_inputs(implementation, b, lq, 0, h, hkv, bias_shape, rng)
    attention = get_attention()
    for name, mask in _masks_without_keys(b, h, lq).items():
        def f(q, k, v, bias):
            out, lse = attention(q, k, v, bias, mask, is_causal=is_causal, return_lse=True,
                                 implementation=implementation)
            return jnp.sum(out.astype(jnp.float32)), (out, lse)

        argnums = (0, 1, 2) + (() if bias is None else (3,))
        grads, (out, lse) = jax.jit(jax.grad(f, argnums=argnums, has_aux=True))(q, k, v, bias)
        assert out.shape == q.shape and out.dtype == q.dtype, name
        assert lse.shape == (b, h, lq) and lse.dtype == jnp.float32, name
        np.testing.assert_array_equal(np.asarray(out, np.float32), 0.0, err_msg=name)
        assert np.isneginf(np.asarray(lse)).all(), name
        for g, x in zip(grads, (q, k, v, bias)):
            assert g.shape == x.shape and g.dtype == x.dtype, name
            np.testing.assert_array_equal(np.asarray(g, np.float32), 0.0, err_msg=name)
    if implementation == "xla":  # the public reference takes the same contract
        from jax_dmattn import attention_reference

        out, lse = attention_reference(q, k, v, bias, is_causal=is_causal, return_lse=True)
        assert not np.any(np.asarray(out)) and np.isneginf(np.asarray(lse)).all()


@pytest.mark.parametrize("shape", [(0, 5, 4, 7), (2, 0, 4, 7), (2, 5, 0, 7)])
def test_empty_output(implementation, shape, rng):
    """B, Lq or H = 0: empty out / lse of the right shapes, gradients of the inputs' shapes."""
    b, lq, h, lk = shape
    hkv = 1
    q, k, v, bias = _empty_inputs(implementation, b, lq, lk, h, hkv, (b, 1, lq, lk), rng)
    attention = get_attention()

    def f(q, k, v, bias):
        out, lse = attention(q, k, v, bias, None, is_causal=True, return_lse=True, implementation=implementation)
        return jnp.sum(out.astype(jnp.float32)), (out, lse)

    grads, (out, lse) = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, bias)
    assert out.shape == q.shape and lse.shape == (b, h, lq)
    for g, x in zip(grads, (q, k, v, bias)):
        assert g.shape == x.shape
        np.testing.assert_array_equal(np.asarray(g, np.float32), 0.0)
