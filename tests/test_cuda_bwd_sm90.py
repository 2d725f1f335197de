"""The Hopper backward (csrc/cuda/sm90/): calls without softcap, with no bias, one constant along query rows (the
paper's per-key bias and its broadcasts) or one with query rows (dbias included), that one also beside a bool mask
(Lk a multiple of 16), deterministic=False, D in 64 / 128, on a compute-capability-9.0 GPU, and row bounds (segment
ids, windows, lengths).

Every case runs twice, through the default route and with the sm80 kernels forced (JAX_DMATTN_CUDA_KERNELS=sm80),
against the float64 oracle (all three gradients, dlse folded); each route must really reach the kernels it names on
such a device (the Hopper backward's launch counter moves or not). Covers both dtypes, GQA, Lq != Lk both ways
(bottom-right causal, rows with no key), odd lengths, one query row, one key, and the calls it leaves to the sm80
kernels (softcap, deterministic, D = 96 / 256, a mask on the key-tile path whose Lk is not a multiple of 16, and the
biases with query rows it does not take: f32, another dtype than q's, unaligned rows, dbias summed over batch elements
or kv heads), a per-key bias with -inf keys, a bias with query rows with -inf pairs, and masked rows with no key.
Inputs with an inf or NaN in q, dout or k go through the Hopper route's scan to the sm80 main kernel: the gradients
match the forced sm80 route's, NaN for NaN.

GPU only (skipped elsewhere).
"""
from __future__ import annotations

import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import cuda_kernel_marks, hopper_kernels_available, sm90_bwd_head_dims, sm90_launches  # noqa: E402
import oracle  # noqa: E402
from test_cuda_bwd import (BF16, F16, TOL, check_against_oracle, make_case, oracle_fwd, rel_err,  # noqa: E402
                           run_bwd)

pytestmark = cuda_kernel_marks("dmattn_bwd_cuda")


# (B, Lq, Lk, H, Hkv, D, dtype, causal, softcap, bias (shape code, dtype name) or None, mask code or None)
SERVED = [
    (1, 256, 256, 4, 1, 128, BF16, True, 0.0, None, None),
    (2, 300, 300, 8, 2, 128, BF16, True, 0.0, None, None),       # GQA 4, odd length
    (1, 1000, 1000, 4, 4, 64, F16, True, 0.0, None, None),
    (2, 77, 203, 4, 2, 128, F16, True, 0.0, None, None),         # Lq < Lk
    (1, 333, 129, 2, 1, 64, BF16, True, 0.0, None, None),        # Lq > Lk: the top rows see no key
    (1, 129, 517, 6, 3, 128, BF16, False, 0.0, None, None),
    (3, 1, 700, 4, 2, 128, BF16, True, 0.0, None, None),         # one query row
    (1, 513, 1, 2, 2, 64, BF16, False, 0.0, None, None),         # one key
    (1, 640, 384, 2, 2, 64, F16, False, 0.0, None, None),
    (2, 300, 300, 8, 2, 128, BF16, True, 0.0, ("BK1N", "bf16"), None),   # the paper's per-key bias: dbias direct
    (2, 200, 333, 8, 2, 64, F16, True, 0.0, ("1H1N", "f16"), None),      # per query head, batch-broadcast: fp32 sums
    (1, 260, 1000, 2, 1, 128, BF16, True, 0.0, ("111N", "f32"), None),   # one f32 row for all heads
    (3, 1, 700, 4, 2, 128, BF16, True, 0.0, ("B11N", "bf16"), None),     # one query row, head-broadcast bias
    (1, 150, 170, 4, 4, 64, BF16, False, 0.0, ("BH11", "f32"), None),    # constant per head: dbias exactly 0
    # Biases with query rows in q's dtype (16-byte rows): dbias per element, summed over the heads sharing it.
    (2, 200, 200, 8, 2, 128, BF16, True, 0.0, ("BKMN", "bf16"), None),   # per kv head: summed over the group
    (1, 301, 264, 4, 2, 64, F16, False, 0.0, ("1HMN", "f16"), None),     # per query head, Lq > Lk, odd Lq
    (2, 129, 328, 4, 4, 128, F16, True, 0.0, ("BHMN", "f16"), None),     # MHA, Lq < Lk
    (1, 190, 136, 4, 1, 128, BF16, True, 0.0, ("11MN", "bf16"), None),   # one bias for all heads of one kv head
    (3, 1, 704, 4, 2, 128, BF16, True, 0.0, ("BKMN", "bf16"), None),     # one query row
    # A bool mask beside a bias with query rows (the key-tile path): empty, partial and full 64 x 64 tiles.
    (2, 200, 208, 8, 2, 128, BF16, True, 0.0, ("BKMN", "bf16"), "BKMN"),  # per kv head, GQA 4
    (1, 301, 256, 4, 2, 64, F16, False, 0.0, ("1HMN", "f16"), "BHMN"),    # per query head, Lq > Lk, odd Lq
    (2, 129, 320, 4, 4, 128, F16, True, 0.0, ("BHMN", "f16"), "11MN"),    # one mask for all heads, Lq < Lk
    (1, 190, 144, 4, 1, 128, BF16, False, 0.0, ("11MN", "bf16"), "B11N"), # constant along query rows
    (2, 96, 400, 8, 2, 64, BF16, True, 0.0, ("BKMN", "bf16"), "1KMN"),    # batch-broadcast mask, Lq < Lk
]
LEFT_TO_SM80 = [
    (1, 200, 200, 8, 2, 128, BF16, True, 0.0, ("BKMN", "f32"), None),    # a bias with query rows: f32
    (1, 200, 200, 4, 2, 64, BF16, False, 0.0, ("BKMN", "f16"), None),    # another 16-bit dtype than q's
    (1, 100, 203, 4, 2, 64, BF16, True, 0.0, ("BKMN", "bf16"), None),    # rows not 16-byte aligned
    (2, 120, 160, 4, 2, 128, BF16, True, 0.0, ("1KMN", "bf16"), None),   # dbias summed over the batch
    (1, 120, 160, 4, 2, 128, F16, True, 0.0, ("11MN", "f16"), None),     # dbias summed over kv heads
    (1, 128, 256, 4, 4, 64, BF16, False, 30.0, None, None),              # softcap
    (1, 190, 260, 4, 2, 96, BF16, True, 0.0, None, None),                # D = 96
    (1, 150, 170, 2, 2, 256, F16, True, 0.0, None, None),                # D = 256
    (2, 100, 100, 4, 2, 64, F16, False, 0.0, None, "BHMN"),              # a mask (the key-list path)
    (1, 100, 200, 4, 2, 64, BF16, True, 0.0, ("BKMN", "bf16"), "BKMN"),  # a mask whose Lk is not a multiple of 16
]


@pytest.mark.parametrize("case", SERVED + LEFT_TO_SM80, ids=[f"served{i}" for i in range(len(SERVED))] +
                         [f"sm80_{i}" for i in range(len(LEFT_TO_SM80))])
def test_backward_matches_oracle(case, kernel_route):
    before = sm90_launches("bwd")
    check_against_oracle(case)
    served = sm90_launches("bwd") > before
    d = case[5]
    hopper = hopper_kernels_available() and kernel_route == "default" and case in SERVED and d in sm90_bwd_head_dims()
    assert served == hopper, (f"route {kernel_route}: the Hopper backward "
                              f"{'did not serve' if hopper else 'served'} the call")


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_masked_rows_with_no_key(dtype, kernel_route):
    """Rows whose mask keeps no key (a whole 64-row tile and parts of the next) beside a bias with query rows: zero
    dq, no dk / dv / dbias contribution, on either route."""
    name = "bf16" if dtype == BF16 else "f16"
    before = sm90_launches("bwd")
    check_against_oracle((2, 190, 256, 4, 2, 128, dtype, False, 0.0, ("BKMN", name), "BKMN"), empty_rows=True)
    assert (sm90_launches("bwd") > before) == (hopper_kernels_available() and kernel_route == "default")


def test_deterministic_stays_on_sm80_kernels():
    before = sm90_launches("bwd")
    check_against_oracle((1, 200, 200, 4, 2, 128, BF16, True, 0.0, None, None), deterministic=True)
    assert sm90_launches("bwd") == before


def bias_grads_match_oracle(q, k, v, bias, dout, dlse, dtype, kernel_route, *, is_causal):
    """The Hopper backward's gradients (served unless the sm80 kernels are forced) of a call with this bias, each
    against the float64 oracle; returns (dq, dk, dv, dbias) as float32 arrays."""
    d = q.shape[-1]
    scale = d ** -0.5
    out, lse = oracle_fwd(q, k, v, bias, None, scale=scale, softcap=0.0, is_causal=is_causal, dtype=dtype)
    before = sm90_launches("bwd")
    grads = run_bwd(q, k, v, bias, None, out, lse, dout, dlse, scale=scale, softcap=0.0, is_causal=is_causal,
                    deterministic=False)
    assert (sm90_launches("bwd") > before) == (hopper_kernels_available() and kernel_route == "default")
    kw = dict(scale=scale, is_causal=is_causal, dlse=np.asarray(dlse))
    ref = oracle.oracle_grads(q, k, v, bias, None, dout, **kw)
    mag = oracle.oracle_grads(q, k, v, bias, None, dout, magnitude=True, **kw)
    for name, got, exp, m in zip(("dq", "dk", "dv", "dbias"), grads, ref, mag):
        assert rel_err(got, exp, floor=0.02 * np.linalg.norm(m)) < TOL[dtype], name
    return tuple(np.asarray(g, np.float32) for g in grads)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_minus_inf_key_bias_drops_keys(dtype, kernel_route):
    """A -inf per-key bias drops its key in every row (P and dS exactly 0 there, also for rows that keep no key):
    gradients against the oracle, dbias exactly 0 at the dropped keys."""
    b, lq, lk, h, hkv, d = 2, 190, 260, 4, 2, 128
    q, k, v, _, _, dout, dlse = make_case(5, b, lq, lk, h, hkv, d, dtype, None, None)
    rng = np.random.default_rng(6)
    bias = rng.standard_normal((b, hkv, 1, lk)).astype(np.float32)
    bias[rng.random(bias.shape) < 0.3] = -np.inf
    bias[1, 0, 0, :100] = -np.inf  # batch 1, kv head 0: the first rows keep no key under causality
    bias = jax.numpy.asarray(bias)
    dq, dk, dv, dbias = bias_grads_match_oracle(q, k, v, bias, dout, dlse, dtype, kernel_route, is_causal=True)
    assert (dbias[np.isneginf(np.asarray(bias))] == 0).all()
    dropped = np.isneginf(np.asarray(bias))[:, :, 0, :].transpose(0, 2, 1)  # [B, Lk, Hkv]
    assert (dk[dropped] == 0).all() and (dv[dropped] == 0).all()


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_minus_inf_row_bias_drops_pairs(dtype, kernel_route):
    """A -inf element of a bias with query rows drops its pair (P and dS exactly 0, also in rows that keep no key,
    whose lse is -inf, and in a whole 64 x 64 tile): gradients against the oracle, dbias exactly 0 at the dropped
    pairs, dK and dV exactly 0 at keys that every row drops."""
    b, lq, lk, h, hkv, d = 2, 190, 264, 4, 2, 128
    q, k, v, _, _, dout, dlse = make_case(7, b, lq, lk, h, hkv, d, dtype, None, None)
    rng = np.random.default_rng(8)
    bias = rng.standard_normal((b, hkv, lq, lk)).astype(np.float32)
    bias[rng.random(bias.shape) < 0.3] = -np.inf
    bias[0, 1, 64:128, 128:192] = -np.inf  # a whole tile of one warpgroup
    bias[1, 0, 10:20, :] = -np.inf          # rows that keep no key
    bias[1, 1, :, 7] = -np.inf              # a key no row keeps
    bias = jax.numpy.asarray(bias, dtype)
    dq, dk, dv, dbias = bias_grads_match_oracle(q, k, v, bias, dout, dlse, dtype, kernel_route, is_causal=False)
    assert (dbias[np.isneginf(np.asarray(bias, np.float32))] == 0).all()
    assert np.isfinite(dbias).all()
    assert (dk[1, 7, 1] == 0).all() and (dv[1, 7, 1] == 0).all()


@pytest.mark.parametrize("where", ["q", "dout", "k", "v"])
def test_nonfinite_inputs_match_the_sm80_route(where, monkeypatch):
    """An inf or NaN in q, dout or k sets the scan's word and the sm80 main kernel does the work; one in v needs no
    fallback (v enters only dP, whose dropped pairs are zeroed by select). Either way the gradients are those of the
    forced sm80 route: NaN and inf exactly where they are, the finite rest close."""
    b, lq, lk, h, hkv, d = 1, 200, 230, 4, 2, 128
    q, k, v, _, _, dout, dlse = make_case(11, b, lq, lk, h, hkv, d, BF16, None, None)
    x = {"q": q, "dout": dout, "k": k, "v": v}[where]
    x = x.at[0, 37, 0, 5].set(np.nan).at[0, 150, 1, 9].set(np.inf)
    args = {"q": q, "k": k, "v": v, "dout": dout}
    args[where] = x
    scale = d ** -0.5
    out, lse = oracle_fwd(args["q"], args["k"], args["v"], None, None, scale=scale, softcap=0.0, is_causal=True,
                          dtype=BF16)
    call = lambda: run_bwd(args["q"], args["k"], args["v"], None, None, out, lse, args["dout"], dlse, scale=scale,
                           softcap=0.0, is_causal=True, deterministic=False)
    monkeypatch.delenv("JAX_DMATTN_CUDA_KERNELS", raising=False)
    got = call()
    monkeypatch.setenv("JAX_DMATTN_CUDA_KERNELS", "sm80")
    want = call()
    for name, g, w in zip(("dq", "dk", "dv"), got[:3], want[:3]):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert (np.isnan(g) == np.isnan(w)).all(), name
        assert (np.isinf(g) == np.isinf(w)).all(), name
        fin = np.isfinite(w)  # a NaN of k reaches every dk: the rows that see it have a NaN delta
        if fin.any():
            err = np.linalg.norm(g[fin] - w[fin]) / max(np.linalg.norm(w[fin]), 1e-30)
            assert err < 2e-2, f"{name}: rel err {err:.3e}"


# Row bounds (segment ids, windows, lengths) on the Hopper backward, through the public API: query tiles found by
# bisection, key tiles no row keeps (dK = dV = 0), tiles inside every row's range (no per-element test) and partly
# inside, unsorted ids (compared per element), a per-key bias and its dbias. (B, Lq, Lk, H, Hkv, D, dtype, causal,
# keywords: window, segments "packed" | "random", q_lens, kv_lens)
BOUNDS_CASES = {
    "window-causal": (1, 700, 700, 4, 2, 128, BF16, True, dict(window=(200, 0))),
    "window-lq-lt-lk": (2, 300, 650, 2, 1, 64, F16, False, dict(window=(100, 40))),
    "packed-causal-gqa": (2, 520, 520, 8, 2, 128, BF16, True, dict(segments="packed")),
    "segments-unsorted-window": (1, 390, 390, 2, 2, 64, F16, True, dict(segments="random", window=(150, 0))),
    "lengths-zero-and-partial": (3, 333, 500, 4, 2, 128, BF16, True,
                                 dict(q_lens=(333, 0, 120), kv_lens=(500, 260, 0))),
    "lengths-aligned": (2, 333, 504, 4, 2, 128, F16, True, dict(q_lens=(333, 100), kv_lens=(504, 0))),
}
# The cases whose keys fill 16-byte rows also run with a bias with query rows ([B, Hkv, Lq, Lk]).
ROW_BIAS_BOUNDS = ["packed-causal-gqa", "lengths-aligned"]


@pytest.mark.parametrize("name,bias_rows", [(n, False) for n in BOUNDS_CASES] + [(n, True) for n in ROW_BIAS_BOUNDS],
                         ids=list(BOUNDS_CASES) + [f"{n}-row-bias" for n in ROW_BIAS_BOUNDS])
def test_row_bounds_backward(name, bias_rows, kernel_route):
    import jax.numpy as jnp
    import jax_dmattn
    from helpers import DEFAULT_FLOOR_RMS, GRAD_FLOOR_FRAC, assert_close, seed_from, sequence_keywords, split_static

    b, lq, lk, h, hkv, d, dtype, causal, seq = BOUNDS_CASES[name]
    rng = np.random.default_rng(seed_from(f"test_cuda_bwd_sm90::bounds::{name}"))
    q, k, v, dout = (jnp.asarray(rng.standard_normal((b, n, heads, d)), dtype)
                     for n, heads in ((lq, h), (lk, hkv), (lk, hkv), (lq, h)))
    bias = (jnp.asarray(rng.standard_normal((b, hkv, lq, lk)), dtype) if bias_rows else
            jnp.asarray(rng.standard_normal((b, hkv, 1, lk)), jnp.float32))
    kw, dense = sequence_keywords(rng, b, lq, lk, is_causal=causal, **seq)
    kw, window = split_static(kw)

    def loss(q, k, v, bias, kw):
        out = jax_dmattn.attention(q, k, v, bias, is_causal=causal, implementation="cuda", **window, **kw)
        return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32))

    before = sm90_launches("bwd")
    got = jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias, kw))
    served = sm90_launches("bwd") > before
    hopper = hopper_kernels_available() and d in sm90_bwd_head_dims() and kernel_route == "default"
    assert served == hopper, (f"route {kernel_route}: the Hopper backward "
                              f"{'did not serve' if hopper else 'served'} the call")

    expected = oracle.oracle_grads(q, k, v, bias, dense, dout)
    floors = oracle.oracle_grads(q, k, v, bias, dense, dout, magnitude=True)
    for nm, g, e, fl in zip(("dq", "dk", "dv", "dbias"), got, expected, floors):
        floor = max(GRAD_FLOOR_FRAC * float(np.linalg.norm(fl)), DEFAULT_FLOOR_RMS * np.sqrt(e.size))
        assert_close(g, e, dtype, "grad", floor=floor, name=nm)
    seen_keys = dense.any(axis=2)[:, 0]  # [B, Lk]: keys no row keeps get exactly zero dk and dv
    assert (np.asarray(got[1], np.float32)[~seen_keys] == 0).all()
    assert (np.asarray(got[2], np.float32)[~seen_keys] == 0).all()
