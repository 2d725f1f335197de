"""The Hopper key-list backward (csrc/cuda/sm90/flash_bwd_key_list_sm90_kernel.cuh): masked calls on the key-list
path in both modes (fp32 atomics, and deterministic=True's fixed-point counts), no softcap, D in 64 / 128, on a
compute-capability-9.0 GPU.

Every case runs through the default route and with the sm80 kernels forced (JAX_DMATTN_CUDA_KERNELS=sm80), against
the float64 oracle (all four gradients, dlse folded, and the exact zeros of rows with no kept key and of keys no
row keeps); each route must reach the kernel it names (the launch counter moves or not). Masks: per-row top-k,
random element masks of two densities, block masks, row-broadcast masks (one bit word per chunk), rows with no
kept key, dense units (a capacity below the unit's live keys: the kernel reads the mask itself); GQA 1 / 2 / 4,
Lq != Lk both ways, odd lengths, one query row, both dtypes, biases of every dtype and broadcast. The calls it
leaves to the sm80 kernel (softcap, other head dims) must not move the counter. Deterministic mode on the Hopper
kernel: the oracle, bitwise identical repeats, and agreement with the forced sm80 fixed-point kernel. Inputs with an inf
or NaN in q, dout or k go through the scan to the sm80 key-list kernel; one in v stays on the Hopper kernel; either
way the gradients are the forced sm80 route's, NaN for NaN. Gradients through the public API for the bool and the
compact masks: tests/test_cuda_fwd_key_list_sm90.py::test_gradients_through_the_api, which checks that both Hopper
key-list kernels served.

GPU only (skipped elsewhere).
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import cuda_kernel_marks, hopper_kernels_available, sm90_bwd_head_dims, sm90_launches
from test_cuda_bwd import (BF16, F16, _bits, check_key_list_path_against_oracle, key_list_inputs, oracle_fwd, rel_err,
                           run_bwd)

pytestmark = cuda_kernel_marks("dmattn_bwd_cuda")


# (B, Lq, Lk, H, Hkv, D, dtype, causal, softcap, bias (code, dtype) or None, mask kind, mask shape code)
SERVED = [
    (1, 300, 300, 8, 2, 128, BF16, True, 0.0, ("BK1N", "bf16"), "topk48", "BKMN"),   # the standard case in small
    (1, 1000, 1000, 8, 2, 128, BF16, True, 0.0, ("BK1N", "bf16"), "topk128", "BKMN"),
    (2, 1000, 1000, 4, 4, 64, F16, True, 0.0, ("BK1N", "f32"), "topk100", "BKMN"),
    (1, 300, 300, 4, 2, 128, BF16, False, 0.0, ("BK1N", "bf16"), "topk40", "BKMN"),
    (1, 300, 300, 4, 1, 128, BF16, True, 0.0, None, "topk64", "BKMN"),               # no bias, MQA
    (2, 200, 200, 4, 2, 64, BF16, False, 0.0, None, "rand0.5", "BHMN"),
    (1, 300, 300, 8, 2, 128, F16, False, 0.0, ("111N", "f32"), "rand0.05", "11MN"),
    (1, 300, 300, 4, 2, 128, BF16, True, 0.0, ("BK1N", "bf16"), "block", "BKMN"),
    (2, 129, 260, 4, 4, 64, BF16, True, 0.0, ("B11N", "f32"), "rand0.5", "B11N"),    # row-broadcast mask
    (1, 200, 200, 4, 2, 128, F16, False, 0.0, ("BK11", "bf16"), "rand0.5", "BK1N"),  # key-broadcast bias
    (1, 77, 333, 4, 2, 128, BF16, True, 0.0, ("BK1N", "bf16"), "rand0.5", "BKMN"),   # Lq < Lk
    (1, 333, 77, 4, 2, 64, F16, True, 0.0, ("BK1N", "f16"), "rand0.5", "BKMN"),      # Lq > Lk: empty top rows
    (1, 1, 333, 4, 2, 128, BF16, False, 0.0, ("BK1N", "f32"), "rand0.5", "BKMN"),    # one query row
    (2, 230, 230, 4, 1, 64, BF16, True, 0.0, ("BK1N", "bf16"), "rand0.05", "BKMN"),  # GQA 4
    (1, 260, 260, 4, 2, 64, F16, True, 0.0, ("BK1N", "bf16"), "topk40", "BKMN"),
]
# Dense units: the capacity of 64 keys is below the half-dense units' live keys.
SERVED_DENSE = [
    (1, 520, 512, 8, 2, 128, BF16, True, 0.0, ("BK1N", "bf16"), "mixed", "BKMN"),
    (2, 300, 333, 4, 1, 64, F16, False, 0.0, None, "mixed", "BHMN"),                 # unaligned mask rows
    (2, 129, 256, 4, 2, 64, BF16, True, 0.0, ("B11N", "f32"), "rand0.5", "B11N"),
]
LEFT_TO_SM80 = [
    (1, 300, 300, 4, 2, 128, BF16, True, 30.0, ("BK1N", "bf16"), "topk64", "BKMN"),  # softcap
    (1, 190, 190, 4, 1, 96, BF16, True, 0.0, ("1H1N", "bf16"), "rand0.5", "1KMN"),   # D = 96
    (1, 140, 140, 2, 1, 256, F16, False, 0.0, ("BK1N", "f16"), "rand0.5", "BKMN"),   # D = 256
]


def check_route(case, kernel_route, served_case, **kw):
    before = sm90_launches("bwd_key_list")
    result = check_key_list_path_against_oracle(case, **kw)
    served = sm90_launches("bwd_key_list") > before
    hopper = (hopper_kernels_available() and kernel_route == "default" and served_case and
              case[5] in sm90_bwd_head_dims())
    assert served == hopper, (f"route {kernel_route}: the Hopper key-list backward "
                              f"{'did not serve' if hopper else 'served'} the call")
    return result


@pytest.mark.parametrize("index", range(len(SERVED + LEFT_TO_SM80)),
                         ids=[f"served{i}" for i in range(len(SERVED))] +
                             [f"sm80_{i}" for i in range(len(LEFT_TO_SM80))])
def test_backward_matches_oracle(index, kernel_route):
    case = (SERVED + LEFT_TO_SM80)[index]
    check_route(case, kernel_route, index < len(SERVED), seed=700 + index)


@pytest.mark.parametrize("index", range(len(SERVED_DENSE)), ids=[f"dense{i}" for i in range(len(SERVED_DENSE))])
def test_dense_units_match_oracle(index, kernel_route):
    check_route(SERVED_DENSE[index], kernel_route, True, seed=800 + index, capacity=64)


def test_rows_with_no_kept_key(kernel_route):
    """Every third row and the whole first unit keep no key: dq exactly 0 there (checked inside)."""
    rows = np.concatenate([np.arange(0, 128), np.arange(128, 400, 3)])
    check_route((1, 400, 400, 4, 2, 128, BF16, True, 0.0, ("BK1N", "f32"), "rand0.05", "BKMN"), kernel_route, True,
                seed=9, empty_rows=rows)


# Deterministic mode: per-key biases of both float widths and a broadcast one (dbias counts), no bias, GQA 1 / 4,
# Lq != Lk, dense units.
DETERMINISTIC = [SERVED[0], SERVED[2], SERVED[4], SERVED[6], SERVED[10], SERVED[13]]


@pytest.mark.parametrize("index", range(len(DETERMINISTIC) + 1),
                         ids=[f"det{i}" for i in range(len(DETERMINISTIC))] + ["det_dense"])
def test_deterministic_mode(index, monkeypatch):
    """deterministic=True on the Hopper kernel: the oracle and its exact zeros, bitwise identical over two more runs,
    and close to the forced sm80 fixed-point kernel (the same counts up to the fp32 partials' rounding)."""
    monkeypatch.delenv("JAX_DMATTN_CUDA_KERNELS", raising=False)
    dense = index == len(DETERMINISTIC)
    case = SERVED_DENSE[0] if dense else DETERMINISTIC[index]
    kw = dict(capacity=64) if dense else {}
    args, got = check_route(case, "default", True, seed=600 + index, deterministic=True, **kw)
    d, causal = case[5], case[7]
    call = lambda: run_bwd(*args, scale=d ** -0.5, softcap=0.0, is_causal=causal, deterministic=True, **kw)
    for _ in range(2):
        for name, a, b in zip(("dq", "dk", "dv", "dbias"), got, call()):
            if a is not None:
                assert _bits(a) == _bits(b), f"{name} differs between deterministic runs"
    monkeypatch.setenv("JAX_DMATTN_CUDA_KERNELS", "sm80")
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), got, call()):
        if a is not None:
            assert rel_err(a, b, floor=1e-6) < 1e-2, name


def default_and_sm80_routes(call, monkeypatch):
    """call() through the default route (which must reach the Hopper key-list backward where it is available) and
    with the sm80 kernels forced."""
    monkeypatch.delenv("JAX_DMATTN_CUDA_KERNELS", raising=False)
    before = sm90_launches("bwd_key_list")
    got = call()
    assert (sm90_launches("bwd_key_list") > before) == hopper_kernels_available()
    monkeypatch.setenv("JAX_DMATTN_CUDA_KERNELS", "sm80")
    return got, call()


def test_agrees_with_sm80_kernel_at_4k(monkeypatch):
    """A longer causal top-k case: the Hopper and sm80 key-list backwards agree closely with each other (the same
    P and dS arithmetic; only the order of the fp32 sums differs)."""
    case = (1, 4096, 4096, 8, 2, 128, BF16, True, 0.0, ("BK1N", "bf16"), "topk256", "BKMN")
    b, lq, lk, h, hkv, d, dtype, causal, softcap, bias_spec, kind, code = case
    q, k, v, bias, mask, dout, dlse = key_list_inputs(31, b, lq, lk, h, hkv, d, dtype, causal, bias_spec, kind, code)
    scale = d ** -0.5
    out, lse = oracle_fwd(q, k, v, bias, mask, scale=scale, softcap=softcap, is_causal=causal, dtype=dtype)
    call = lambda: run_bwd(q, k, v, bias, mask, out, lse, dout, dlse, scale=scale, softcap=softcap,
                           is_causal=causal, deterministic=False)
    got, want = default_and_sm80_routes(call, monkeypatch)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
        assert rel_err(g, w) < 1e-2, name


@pytest.mark.parametrize("where", ["q", "dout", "k", "v"])
def test_nonfinite_inputs_match_the_sm80_route(where, monkeypatch):
    """An inf or NaN in q, dout or k sets the scan's word and the sm80 key-list kernel does the work; one in v stays
    on the Hopper kernel (v enters only dP, whose dropped pairs are zeroed by select). Either way the gradients are
    those of the forced sm80 route: NaN and inf exactly where they are, the finite rest close."""
    case = (1, 300, 300, 4, 2, 128, BF16, True, 0.0, ("BK1N", "bf16"), "rand0.05", "BKMN")
    b, lq, lk, h, hkv, d, dtype, causal, softcap, bias_spec, kind, code = case
    q, k, v, bias, mask, dout, dlse = key_list_inputs(41, b, lq, lk, h, hkv, d, dtype, causal, bias_spec, kind, code)
    args = {"q": q, "k": k, "v": v, "dout": dout}
    args[where] = args[where].at[0, 37, 0, 5].set(np.nan).at[0, 250, 1, 9].set(np.inf)
    scale = d ** -0.5
    out, lse = oracle_fwd(args["q"], args["k"], args["v"], bias, mask, scale=scale, softcap=softcap,
                          is_causal=causal, dtype=dtype)
    call = lambda: run_bwd(args["q"], args["k"], args["v"], bias, mask, out, lse, args["dout"], dlse, scale=scale,
                           softcap=softcap, is_causal=causal, deterministic=False)
    got, want = default_and_sm80_routes(call, monkeypatch)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert (np.isnan(g) == np.isnan(w)).all(), name
        assert (np.isinf(g) == np.isinf(w)).all(), name
        fin = np.isfinite(w)
        if fin.any():
            err = np.linalg.norm(g[fin] - w[fin]) / max(np.linalg.norm(w[fin]), 1e-30)
            assert err < 2e-2, f"{name}: rel err {err:.3e}"
