"""NaN and +-inf in q, k, v and bias: forward and backward against the float64 oracle, NaN for NaN.

The contract (tests/oracle.py, docs/design.md): row i drops key j where the mask or causality does, where bias_ij
is -inf (whatever q_i . k_j is) and where the logit is -inf; a dropped key contributes nothing to the row, forward
or backward, whatever its values. A non-finite value reaches exactly the outputs and gradients it touches: each
result is NaN exactly where the oracle's is, and matches it elsewhere (inf for inf).

The "xla" reference computes dense matmuls, so it multiplies the zero weight of a dropped pair by that pair's
values (0 * NaN = NaN): it runs here only where no dropped pair holds a non-finite value.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from helpers import (
    DEFAULT_FLOOR_RMS,
    GRAD_FLOOR_FRAC,
    Case,
    assert_close,
    check_dtype_supported,
    make_cotangent,
    make_inputs,
    make_mask,
    native_dtype,
    run_forward,
    run_vjp,
    to_f64,
)

from jax_dmattn import KeyIndices, TopKMask

# Two key tiles (the second partial) and two query tiles (the second partial), GQA 2:1, a bias per query head.
BASE = Case(B=2, Lq=70, Lk=100, H=4, Hkv=2, D=32, bias=(2, 4, 70, 100))
VALUES = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}
# One element per operand, in the second key tile / second query tile.
PLANT = {"q": (1, 66, 1, 3), "k": (0, 70, 1, 3), "v": (0, 70, 1, 3), "bias": (1, 2, 5, 70)}
DENSE_REFERENCE_LEAKS = ("the dense reference multiplies the zero weight of a dropped pair by its values "
                         "(0 * NaN = NaN, 0 * inf = NaN)")


def assert_matches(actual, expected, dtype, kind, *, name, floor=None):
    """NaN exactly where ``expected`` has NaN; elsewhere assert_close (infinities equal, finite part close)."""
    a = to_f64(actual)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != expected {e.shape}"
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    for bad, what in ((nan_a & ~nan_e, "NaN where the oracle has none"),
                      (nan_e & ~nan_a, "no NaN where the oracle has NaN")):
        assert not bad.any(), (f"{name}: {what} at {int(bad.sum())} of {a.size} positions, first at "
                               f"{np.argwhere(bad)[0].tolist()} (actual {a[bad][0]}, expected {e[bad][0]})")
    if not nan_e.all():
        assert_close(a[~nan_e], e[~nan_e], dtype, kind, floor=floor, name=name)


def grad_floors(case, q, k, v, bias, mask, dout):
    """Absolute floors for (dq, dk, dv, dbias), as helpers.grad_floors, from the finite part of the magnitudes."""
    mags = oracle.oracle_grads(q, k, v, bias, mask, dout, magnitude=True, scale=case.scale,
                               is_causal=case.is_causal, softcap=case.softcap)
    return [None if m is None else max(GRAD_FLOOR_FRAC * float(np.linalg.norm(m[np.isfinite(m)])),
                                       DEFAULT_FLOOR_RMS * np.sqrt(m.size)) for m in mags]


def check_against_oracle(implementation, case, q, k, v, bias, mask, *, grads=True, oracle_mask=None, rng):
    """out, lse and (with grads) dq, dk, dv, dbias against the oracle, NaN for NaN. ``oracle_mask`` is the dense
    bool form of a compact ``mask``. Returns the oracle's (out, lse)."""
    dense = mask if oracle_mask is None else oracle_mask
    kw = dict(scale=case.scale, is_causal=case.is_causal, softcap=case.softcap)
    out, lse = run_forward(implementation, case, q, k, v, bias, mask)
    eo, el = oracle.oracle_attention(q, k, v, bias, dense, **kw)
    assert_matches(out, eo, case.jdtype, "out", name="out")
    assert_matches(lse, el, case.jdtype, "lse", name="lse")
    if grads:
        dout = make_cotangent(case, rng)
        _, *got = run_vjp(implementation, case, q, k, v, bias, mask, dout)
        expected = oracle.oracle_grads(q, k, v, bias, dense, dout, **kw)
        floors = grad_floors(case, q, k, v, bias, dense, dout)
        for name, g, e, fl in zip(("dq", "dk", "dv", "dbias"), got, expected, floors):
            if e is not None:
                assert_matches(g, e, case.jdtype, "grad", name=name, floor=fl)
    return eo, el


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("operand", list(PLANT))
def test_nonfinite_operand(implementation, operand, value, softcap, rng):
    """One NaN / +inf / -inf element in q, k, v or bias: out, lse and all four gradients match the oracle."""
    case = BASE.replace(dtype=native_dtype(implementation), softcap=softcap)
    check_dtype_supported(implementation, case.jdtype)
    inputs = dict(zip(("q", "k", "v", "bias", "mask"), make_inputs(case, rng)))
    inputs[operand][PLANT[operand]] = VALUES[value]
    # An infinite q.k is +-inf (some rows NaN, some keys dropped with an infinite q / k), or +-softcap when capped.
    infinite_qk = operand in ("q", "k") and value != "nan"
    grads = not (implementation == "xla" and infinite_qk and softcap is None)
    eo, _ = check_against_oracle(implementation, case, **inputs, grads=grads, rng=rng)
    finite_out = (operand, value) == ("bias", "-inf") or (infinite_qk and softcap is not None)
    assert np.isfinite(eo).all() == finite_out, "the planted value reaches out unless capped or a -inf bias"
    if not grads:
        pytest.skip(f"gradients on 'xla': {DENSE_REFERENCE_LEAKS}")


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_nan_in_key_reaches_exactly_its_query_heads(implementation, dtype, rng):
    """A NaN in k of (batch 0, kv head 1) makes NaN exactly the rows of query heads 2 and 3 of batch 0 (out, lse,
    dq, dbias) and every key of that kv head (dk, dv): nothing of batch 1 or of kv head 0."""
    case = BASE.replace(dtype=dtype)
    check_dtype_supported(implementation, case.jdtype)
    q, k, v, bias, mask = make_inputs(case, rng)
    k[0, 70, 1, 3] = np.nan
    dout = make_cotangent(case, rng)
    out, lse = run_forward(implementation, case, q, k, v, bias, mask)
    _, dq, dk, dv, dbias = run_vjp(implementation, case, q, k, v, bias, mask, dout)
    group = np.zeros((2, 4), bool)  # [B, H]
    group[0, 2:] = True
    kv = np.zeros((2, 2), bool)  # [B, Hkv]
    kv[0, 1] = True
    expected_nan = {
        "out": np.broadcast_to(group[:, None, :, None], out.shape),
        "lse": np.broadcast_to(group[:, :, None], lse.shape),
        "dq": np.broadcast_to(group[:, None, :, None], dq.shape),
        "dk": np.broadcast_to(kv[:, None, :, None], dk.shape),
        "dv": np.broadcast_to(kv[:, None, :, None], dv.shape),
        "dbias": np.broadcast_to(group[:, :, None, None], dbias.shape),
    }
    for name, x in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv), ("dbias", dbias)):
        got = np.isnan(to_f64(x))
        wrong = got != expected_nan[name]
        if wrong.any():
            first = tuple(np.argwhere(wrong)[0])
            raise AssertionError(f"{name}: NaN pattern wrong at {int(wrong.sum())} positions, first {list(first)} "
                                 f"(NaN there: {bool(got[first])})")
    check_against_oracle(implementation, case, q, k, v, bias, mask, rng=rng)


def test_neg_inf_bias_masks_keys(implementation, rng):
    """-inf bias entries drop their keys like a False mask: out and lse as with the bool mask and a finite bias, all
    results as the oracle's, exact zeros (out, dq) and lse -inf for rows that are -inf throughout, dbias 0 at -inf
    and dk, dv 0 for keys no row keeps."""
    case = BASE.replace(dtype=native_dtype(implementation), bias_dtype="f32", mask=(2, 4, 70, 100))
    check_dtype_supported(implementation, case.jdtype)
    q, k, v, bias, mask = make_inputs(case, rng)
    mask[0, 1, 10:13] = False  # rows with every key dropped
    mask[1, :, :, 64:] = False  # a key tile nobody sees
    bias_inf = np.where(mask, bias, -np.inf).astype(bias.dtype)
    dout = make_cotangent(case, rng)
    masked = run_forward(implementation, case, q, k, v, bias, mask)
    out, lse = run_forward(implementation, case.replace(mask=None), q, k, v, bias_inf, None)
    eo, el = check_against_oracle(implementation, case.replace(mask=None), q, k, v, bias_inf, None, rng=rng)
    assert_close(out, to_f64(masked[0]), case.jdtype, "out", name="out (-inf bias vs mask)")
    assert_close(lse, to_f64(masked[1]), case.jdtype, "lse", name="lse (-inf bias vs mask)")
    assert np.all(np.asarray(out)[0, 10:13, 1].astype(np.float32) == 0)
    assert np.all(np.isneginf(np.asarray(lse)[0, 1, 10:13]))
    _, dq, dk, dv, dbias = run_vjp(implementation, case.replace(mask=None), q, k, v, bias_inf, None, dout)
    assert np.all(np.asarray(dq)[0, 10:13, 1].astype(np.float32) == 0)
    assert np.all(np.asarray(dbias).astype(np.float32)[~mask] == 0)
    assert np.all(np.asarray(dk)[1, 64:].astype(np.float32) == 0)
    assert np.all(np.asarray(dv)[1, 64:].astype(np.float32) == 0)


@pytest.mark.parametrize("scale", [1e4, 1e9], ids=["q1e4", "q1e9"])
def test_large_logits(implementation, scale, rng):
    """Logits of order scale (up to ~1e9 in float32): out, lse and gradients match the float64 oracle. Keys are
    distinct sign vectors and each query row is scale times one of them, so its top logit beats the others by at
    least 2 * scale / sqrt(D): float32 rounding of the logits cannot change the result."""
    case = BASE.replace(dtype=native_dtype(implementation), bias=None)
    _, _, v, _, _ = make_inputs(case, rng)
    k = rng.choice([-1.0, 1.0], (case.B, case.Lk, case.Hkv, case.D))
    assert all(len(np.unique(k[b, :, h], axis=0)) == case.Lk for b in range(case.B) for h in range(case.Hkv))
    heads_kv = np.arange(case.H) // (case.H // case.Hkv)
    target = rng.integers(0, case.Lk, (case.B, case.Lq, case.H))
    q = (scale * k[np.arange(case.B)[:, None, None], target, heads_kv[None, None, :]]).astype(v.dtype)
    check_against_oracle(implementation, case, q, k.astype(v.dtype), v, None, None, rng=rng)


def _drop(kind, case, rng):
    """(case, bias, mask for the call, dense bool mask for the oracle) for one way of dropping keys."""
    q_len, kv_len = case.Lq, case.Lk
    bias = rng.standard_normal((case.B, case.H, q_len, kv_len)).astype(np.float32)
    if kind == "mask":
        mask = make_mask(rng, (case.B, case.H, q_len, kv_len), "block_random")
        return case, bias, mask, mask
    if kind == "causal":
        return case.replace(is_causal=True), bias, None, None
    if kind == "neg_inf_bias":
        keep = make_mask(rng, (case.B, case.H, q_len, kv_len), "block_random")
        return case, np.where(keep, bias, -np.inf).astype(np.float32), None, None
    if kind == "topk":
        scores = rng.standard_normal((case.B, case.Hkv, kv_len)).astype(np.float32)
        k = 12
        dense = np.zeros((case.B, case.Hkv, q_len, kv_len), bool)
        for b, h, i in np.ndindex(case.B, case.Hkv, q_len):  # causal: row i sees keys <= i + kv_len - q_len
            seen = i + kv_len - q_len + 1
            dense[b, h, i, np.argsort(-scores[b, h, :seen], kind="stable")[:k]] = True
        return case.replace(is_causal=True), bias, TopKMask(jnp.asarray(scores), k), dense
    assert kind == "key_indices"
    idx = np.stack([np.sort(rng.choice(kv_len, 16, replace=False)) for _ in range(case.B * q_len)])
    idx = idx.reshape(case.B, 1, q_len, 16).astype(np.int32)
    idx[..., :3] = -1  # padding
    dense = np.zeros((case.B, 1, q_len, kv_len), bool)
    for b, i in np.ndindex(case.B, q_len):
        dense[b, 0, i, idx[b, 0, i][idx[b, 0, i] >= 0]] = True
    return case, bias, KeyIndices(jnp.asarray(idx)), dense


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("operand", ["q", "k", "v"])
@pytest.mark.parametrize("kind", ["mask", "causal", "neg_inf_bias", "topk", "key_indices"])
def test_nonfinite_in_dropped_pairs_does_not_leak(implementation, kind, operand, head_dim, rng):
    """NaN in q of one row or in k / v of a few keys, with keys dropped by a mask (partial tiles), causality, -inf
    bias, TopKMask or KeyIndices: it reaches exactly the rows that keep those keys (and the gradients they touch),
    never a row that drops them. D = 64 also runs the Hopper forward on an sm_90 GPU (the calls without a mask)."""
    if implementation == "xla":
        pytest.skip(DENSE_REFERENCE_LEAKS)
    case = BASE.replace(dtype=native_dtype(implementation), Lq=130, Lk=130, D=head_dim, bias=(2, 4, 130, 130))
    check_dtype_supported(implementation, case.jdtype)
    q, k, v, _, _ = make_inputs(case, rng)
    case, bias, mask, dense = _drop(kind, case, rng)
    # kept[j]: the share of the rows of batch 0, query heads 0 and 1 (kv head 0) that keep key j.
    if kind == "causal":
        dense_keep = np.tril(np.ones((case.Lq, case.Lk), bool))[None, None]
    else:
        dense_keep = np.isfinite(bias) if dense is None else dense
    heads = oracle.expand_to_heads(np.broadcast_to(dense_keep, (case.B,) + dense_keep.shape[1:]), case.H, case.Hkv)
    kept = heads[0, :2].mean(axis=(0, 1))
    if operand == "q":
        row_kept = heads[0, 1].sum(axis=-1)
        partial = np.flatnonzero((row_kept > 0) & (row_kept < case.Lk))  # rows keeping some keys, dropping others
        assert partial.size, "some row must keep some keys and drop others (test bug)"
        q[0, partial[len(partial) // 2], 1, 5] = np.nan
    else:
        x = k if operand == "k" else v
        x[0, np.argsort(np.abs(kept - 0.5))[:2], 0, 3] = np.nan  # keys about half the rows keep
    eo, _ = check_against_oracle(implementation, case, q, k, v, bias, mask, oracle_mask=dense, rng=rng)
    nan_rows = np.isnan(eo).any(axis=-1)  # [B, Lq, H]
    assert nan_rows.any() and not nan_rows[0, :, :2].all(), "the NaN must reach some rows and not others (test bug)"


def test_no_state_left_by_a_nan_call(implementation, monkeypatch, rng):
    """A call that meets NaN leaves nothing behind: a clean softcapped call after it, with a key tile shorter than
    the tile buffers, is NaN-free (one thread, so both calls reuse the same buffers)."""
    monkeypatch.setenv("DMATTN_CPU_THREADS", "1")
    for lq_lk, poisoned in ((100, True), (40, False)):
        case = BASE.replace(dtype=native_dtype(implementation), Lq=lq_lk, Lk=lq_lk, bias=None, softcap=5.0)
        check_dtype_supported(implementation, case.jdtype)
        q, k, v, _, _ = make_inputs(case, rng)
        if poisoned:
            q[..., 3] = np.nan
        _, *grads = run_vjp(implementation, case, q, k, v, None, None, make_cotangent(case, rng))
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert not np.isnan(to_f64(g)).any(), f"{name} of the clean call has NaN"
