"""Compact masks (TopKMask, KeyIndices) on every implementation, against the float64 oracle.

The oracle gets a dense bool mask that this file builds in numpy from the compact form, independently of the
package (``dense_topk`` / ``dense_indices``); the package's own dense form (``topk_mask``) must equal it bit for bit.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from helpers import (
    DTYPES,
    GRAD_FLOOR_FRAC,
    DEFAULT_FLOOR_RMS,
    assert_close,
    check_dtype_supported,
    decode_lists,
    poison,
    random_qkv_bias,
    seed_from,
    tolerance,
)

import jax_dmattn
from jax_dmattn import KeyIndices, TopKMask, _compact, _ffi


# ------------------------------------------------------------------------------------------ numpy semantics
def _canonical_f32(s):
    s = np.asarray(s, np.float32).copy()
    lowest = np.finfo(np.float32).min
    s[~(s > lowest)] = lowest  # NaN, -inf
    s[s == 0] = 0.0
    return s


def dense_topk(scores, k, lq, is_causal):
    """[Bs, Hs, Lq, Lk]: row i keeps the k keys of largest (score, -index) among those it sees."""
    s = _canonical_f32(scores)
    bs, hs, lk = s.shape
    out = np.zeros((bs, hs, lq, lk), bool)
    for b in range(bs):
        for h in range(hs):
            order = np.lexsort((np.arange(lk), -s[b, h].astype(np.float64)))  # score desc, index asc
            for i in range(lq):
                end = i + lk - lq if is_causal else lk - 1
                if end < 0:
                    continue
                visible = order[order <= end]
                out[b, h, i, visible[:k]] = True
    return out


def dense_indices(indices, lq, lk):
    x = np.asarray(indices)
    if x.ndim == 3:
        x = x[:, :, None, :]
    bm, hm, mq, kk = x.shape
    out = np.zeros((bm, hm, mq, lk), bool)
    for idx in np.ndindex(bm, hm, mq):
        row = x[idx]
        row = row[(row >= 0) & (row < lk)]
        out[idx + (row,)] = True
    return out


# ------------------------------------------------------------------------------------------ cases
@dataclasses.dataclass(frozen=True)
class CompactCase:
    form: str = "topk"          # topk | indices
    B: int = 2
    Lq: int = 70
    Lk: int = 100
    H: int = 4
    Hkv: int = 2
    D: int = 32
    dtype: str = "f32"
    mask_heads: str = "hkv"     # 1 | hkv | h
    mask_batch: int = 2         # 1 or B
    k: int = 9                  # topk: k; indices: K per row
    rows: str = "per_row"       # indices: per_row | shared | shared3 (rank-3 form)
    is_causal: bool = True
    bias: str | None = "key"    # None | key ([B, Hkv, 1, Lk]) | full ([B, H, Lq, Lk])
    ties: bool = False          # topk: scores drawn from a few values
    empty_rows: bool = False    # indices: some rows only -1

    @property
    def jdtype(self):
        return DTYPES[self.dtype]

    def heads(self, which):
        return {"1": 1, "hkv": self.Hkv, "h": self.H}[which]


CASES = {
    "topk-causal": CompactCase(),
    "topk-causal-ties-h": CompactCase(ties=True, mask_heads="h", mask_batch=1),
    "topk-noncausal": CompactCase(is_causal=False, mask_heads="1"),
    "topk-decode-causal": CompactCase(Lq=1, Lk=300, k=40),
    "topk-k1": CompactCase(k=1, Lq=130, Lk=130, bias=None),
    "topk-k-ge-visible": CompactCase(k=90, Lq=100, Lk=100),
    "topk-lq-gt-lk": CompactCase(Lq=150, Lk=64, k=20),
    "topk-mqa-full-bias": CompactCase(H=4, Hkv=1, bias="full", k=33, Lq=129, Lk=200),
    "topk-long": CompactCase(B=1, Lq=300, Lk=300, H=2, Hkv=2, k=40, mask_batch=1),
    "idx-per-row": CompactCase(form="indices", k=12),
    "idx-per-row-empty": CompactCase(form="indices", k=6, empty_rows=True, mask_heads="h", bias="full"),
    "idx-shared": CompactCase(form="indices", rows="shared", k=30, is_causal=False, mask_heads="1"),
    "idx-shared3-causal": CompactCase(form="indices", rows="shared3", k=50, Lq=130, Lk=160),
    "idx-dups-gqa": CompactCase(form="indices", k=40, H=6, Hkv=3, Lq=33, Lk=47, mask_batch=1),
}


def make_case_inputs(case: CompactCase, rng):
    q, k, v, bias = random_qkv_bias(rng, B=case.B, Lq=case.Lq, Lk=case.Lk, H=case.H, Hkv=case.Hkv, D=case.D,
                                    bias=case.bias, dtype=case.jdtype)
    hm, bm = case.heads(case.mask_heads), case.mask_batch
    if case.form == "topk":
        if case.ties:
            scores = rng.integers(0, 4, (bm, hm, case.Lk)).astype(np.float32)
        else:
            scores = rng.standard_normal((bm, hm, case.Lk)).astype(np.float32)
        scores[..., ::17] = -np.inf  # rank lowest, still kept by rows that see <= k keys
        mask = TopKMask(jnp.asarray(scores), case.k)
        dense = dense_topk(scores, case.k, case.Lq, case.is_causal)
    else:
        rows = 1 if case.rows != "per_row" else case.Lq
        idx = rng.integers(-1, case.Lk, (bm, hm, rows, case.k)).astype(np.int32)
        idx[..., -1] = idx[..., 0]  # a duplicate in every row
        if case.empty_rows:
            idx[:, :, ::4, :] = -1
        if case.rows == "shared3":
            idx = idx[:, :, 0, :]
        mask = KeyIndices(jnp.asarray(idx))
        dense = dense_indices(idx, case.Lq, case.Lk)
    return q, k, v, bias, mask, dense


def _kw(case):
    return dict(is_causal=case.is_causal)


def _oracle_fwd(case, q, k, v, bias, dense):
    return oracle.oracle_attention(q, k, v, bias, dense, **_kw(case))


# ------------------------------------------------------------------------------------------ semantics
@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("topk")])
def test_topk_dense_form_equals_topk_mask(name):
    """TopKMask is topk_mask of the scores broadcast over query rows, bit for bit."""
    case = CASES[name]
    rng = make_rng_for(name)
    *_, mask, dense = make_case_inputs(case, rng)
    got = jax_dmattn.topk_mask(mask.scores[:, :, None, :], case.k, is_causal=case.is_causal,
                               query_len=case.Lq if case.is_causal else None)
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(got), dense.shape), dense)


def make_rng_for(name):
    return np.random.default_rng(seed_from(f"test_compact_masks::{name}"))


def case_on(implementation, case):
    """``case`` as ``implementation`` runs it: the CUDA kernels take bf16 / f16, so there it runs in bf16. Skips the
    test where the implementation lacks the dtype."""
    if implementation == "cuda":
        case = dataclasses.replace(case, dtype="bf16")
    check_dtype_supported(implementation, case.jdtype)
    return case


# ------------------------------------------------------------------------------------------ values and gradients
@pytest.mark.parametrize("name", list(CASES))
def test_forward(implementation, name):
    case = case_on(implementation, CASES[name])
    rng = make_rng_for(name)
    q, k, v, bias, mask, dense = make_case_inputs(case, rng)
    f = jax.jit(lambda q, k, v, b, m: jax_dmattn.attention(q, k, v, b, m, return_lse=True,
                                                            implementation=implementation, **_kw(case)))
    out, lse = f(q, k, v, bias, mask)
    eo, el = _oracle_fwd(case, q, k, v, bias, dense)
    assert_close(out, eo, case.jdtype, "out", name="out")
    assert_close(lse, el, case.jdtype, "lse", name="lse")


@pytest.mark.parametrize("name", list(CASES))
def test_grads(implementation, name):
    case = case_on(implementation, CASES[name])
    rng = make_rng_for(name)
    q, k, v, bias, mask, dense = make_case_inputs(case, rng)
    dout = rng.standard_normal(q.shape).astype(q.dtype)

    def f(q, k, v, b, m):
        def fn(q, k, v, *b):
            return jax_dmattn.attention(q, k, v, *b, mask=m, implementation=implementation, **_kw(case))

        out, vjp = jax.vjp(fn, q, k, v, *b)
        return (out,) + vjp(jnp.asarray(dout))

    got = jax.jit(f)(q, k, v, () if bias is None else (bias,), mask)[1:]
    grads = oracle.oracle_grads(q, k, v, bias, dense, dout, **_kw(case))
    mags = oracle.oracle_grads(q, k, v, bias, dense, dout, magnitude=True, **_kw(case))
    for name_, g, exp, m in zip(("dq", "dk", "dv", "dbias"), got, grads, mags):
        fl = max(GRAD_FLOOR_FRAC * float(np.linalg.norm(m)), DEFAULT_FLOOR_RMS * np.sqrt(m.size))
        tol = tolerance(case.jdtype, "grad") * (2 if name_ == "dbias" else 1)
        got, exp = g, exp
        assert_close(got, exp, case.jdtype, "grad", name=name_, floor=fl, tol=tol)


def test_nan_in_masked_out_key_does_not_leak(implementation):
    """A key no row keeps may hold NaN in k / v: it must not reach any output (it is never read as kept)."""
    if implementation == "xla":
        pytest.skip("the dense reference multiplies a masked value row by weight 0 (NaN * 0 = NaN)")
    case = case_on(implementation, CASES["idx-shared"])
    rng = make_rng_for("nan")
    q, k, v, bias, mask, dense = make_case_inputs(case, rng)
    never = ~dense.any(axis=(0, 1, 2))  # keys no row of any (batch, head) keeps
    assert never.any()
    k = poison(k, never[None, :, None, None])
    v = poison(v, never[None, :, None, None])
    out = jax_dmattn.attention(q, k, v, bias, mask, implementation=implementation, **_kw(case))
    finite = lambda x: np.nan_to_num(x.astype(np.float32))  # ml_dtypes bf16 is no numpy float for nan_to_num
    eo, _ = _oracle_fwd(case, q, finite(k), finite(v), bias, dense)
    assert_close(out, eo, case.jdtype, "out", name="out")


def test_scores_get_no_gradient():
    rng = make_rng_for("nograd")
    case = CASES["topk-causal"]
    q, k, v, bias, mask, _ = make_case_inputs(case, rng)

    def loss(scores):
        out = jax_dmattn.attention(q, k, v, bias, TopKMask(scores, case.k), implementation="xla", is_causal=True)
        return jnp.sum(out)

    g = jax.grad(loss)(mask.scores)
    assert g.shape == mask.scores.shape and not np.any(np.asarray(g))


def test_vmap_over_mask(implementation):
    """vmap over a batch of TopKMask / KeyIndices pytrees equals a loop over the examples."""
    case = case_on(implementation, dataclasses.replace(CASES["topk-causal"], B=1, mask_batch=1))
    rng = make_rng_for("vmap")
    ex = [make_case_inputs(case, rng) for _ in range(3)]
    stack = lambda i: jnp.stack([jnp.asarray(e[i]) for e in ex])
    q, k, v, bias = stack(0), stack(1), stack(2), stack(3)
    masks = jax.tree.map(lambda *xs: jnp.stack(xs), *[e[4] for e in ex])
    f = lambda q, k, v, b, m: jax_dmattn.attention(q, k, v, b, m, implementation=implementation, is_causal=True)
    got = jax.jit(jax.vmap(f))(q, k, v, bias, masks)
    for i, e in enumerate(ex):
        eo, _ = _oracle_fwd(case, e[0], e[1], e[2], e[3], e[5])
        assert_close(got[i], eo, case.jdtype, "out", name=f"out[{i}]")


# ------------------------------------------------------------------------------------------ the CUDA key lists
@pytest.mark.parametrize("name", ["idx-per-row", "idx-per-row-empty", "idx-shared",
                                  "idx-shared3-causal", "idx-dups-gqa"])
def test_cuda_key_lists_built_by_xla(name):
    """The lists that XLA builds for the CUDA kernels (KeyIndices; a TopKMask has pre-pass kernels of its own)
    decode to the mask they stand for; this runs on any backend."""
    case = CASES[name]
    rng = make_rng_for(name)
    q, k, v, bias, mask, dense = make_case_inputs(case, rng)
    dims = (case.B, case.H, case.Hkv, case.Lq, case.Lk)
    norm, kind, kk = _compact.normalize(mask, dims)
    keys, bits, geometry = _compact.cuda_key_lists(norm, kind, kk, q_len=case.Lq, kv_len=case.Lk,
                                                   is_causal=case.is_causal)
    got = decode_lists(keys, bits, geometry, case.Lq, case.Lk)
    expected = dense if geometry[2] == dense.shape[2] else dense[:, :, :1]
    if case.is_causal and expected.shape[2] == case.Lq:  # lists may hold keys past the causal cut
        causal = np.arange(case.Lk)[None, :] <= np.arange(case.Lq)[:, None] + case.Lk - case.Lq
        got, expected = got & causal, expected & causal
    np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------------------------------ no [Lq, Lk] array
def _lowered_text(platform, lq, lk, mask, arrays=None, **kw):
    """The lowering of jax.grad of a causal call with ``mask``, the traced keyword ``arrays`` and the static ``kw``
    (fwd + bwd, lowered without running; lowering for cuda needs no GPU and no CUDA build: the custom calls are
    emitted by name)."""
    b, h, hkv, d = 1, 2, 1, 64
    dt = jnp.bfloat16
    q = jax.ShapeDtypeStruct((b, lq, h, d), dt)
    kv = jax.ShapeDtypeStruct((b, lk, hkv, d), dt)
    bias = jax.ShapeDtypeStruct((b, hkv, 1, lk), jnp.float32)

    def loss(q, k, v, bias, mask, arrays):
        return jnp.sum(jax_dmattn.attention(q, k, v, bias, mask, is_causal=True, implementation=platform,
                                            **arrays, **kw).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(q, kv, kv, bias, mask, arrays or {}).lower(
        lowering_platforms=(platform,)).as_text()


def _largest_lowered_array(platform, lq, lk, mask, arrays=None, **kw):
    """Elements of the largest array in _lowered_text's lowering."""
    import re

    text = _lowered_text(platform, lq, lk, mask, arrays, **kw)
    return max(int(np.prod([int(x) for x in m.group(1).split("x")]))
               for m in re.finditer(r"tensor<([0-9x]+)x[a-z]+[0-9]*>", text))


@pytest.mark.parametrize("form", ["topk", "indices"])
@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_lowering_has_no_lq_by_lk_array(form, platform, monkeypatch):
    """The kernel paths never build an array with Lq * Lk elements."""
    monkeypatch.setattr(_ffi, "has_cuda_kernels", lambda: True)
    lq = lk = 1024
    if form == "topk":
        mask = TopKMask(jax.ShapeDtypeStruct((1, 1, lk), jnp.float32), 64)
    else:
        mask = KeyIndices(jax.ShapeDtypeStruct((1, 1, lq, 16), jnp.int32))
    biggest = _largest_lowered_array(platform, lq, lk, mask)
    assert biggest < lq * lk // 4, f"an array of {biggest} elements (Lq * Lk = {lq * lk}) in the {platform} lowering"


@pytest.mark.parametrize("bounds", ["lengths", "window"])
def test_bounded_topk_lowering_grows_linearly(bounds, monkeypatch):
    """A TopKMask under row bounds on CUDA (key lists from the scores and the bounds): its largest array grows
    linearly in L at a fixed k, as the lists hold at most k + 2 * 128 keys per unit without segment ids."""
    monkeypatch.setattr(_ffi, "has_cuda_kernels", lambda: True)

    def largest(n):
        mask = TopKMask(jax.ShapeDtypeStruct((1, 1, n), jnp.float32), 32)
        if bounds == "lengths":
            return _largest_lowered_array("cuda", n, n, mask,
                                          dict(key_value_seq_lengths=jax.ShapeDtypeStruct((1,), jnp.int32)))
        return _largest_lowered_array("cuda", n, n, mask, local_window_size=(n // 2, 0))

    small, large = largest(1024), largest(4096)
    assert large <= 4.5 * small, f"largest array {small} elements at L = 1024, {large} at L = 4096"


@pytest.mark.parametrize("segments", [False, True])
def test_bounded_topk_lowers_to_its_cuda_pre_pass(segments, monkeypatch):
    """A TopKMask under row bounds lowers for CUDA to its own list pre-pass (dmattn_topk_bounded_key_lists_cuda) in
    forward and backward. With segment ids a conditional runs the per-row route should a unit outgrow the lists;
    without them no unit can, and the lowering has no conditional."""
    monkeypatch.setattr(_ffi, "has_cuda_kernels", lambda: True)
    n = 1024
    mask = TopKMask(jax.ShapeDtypeStruct((1, 1, n), jnp.float32), 32)
    ids = jax.ShapeDtypeStruct((1, n), jnp.int32)
    arrays = (dict(q_segment_ids=ids, kv_segment_ids=ids) if segments else
              dict(key_value_seq_lengths=jax.ShapeDtypeStruct((1,), jnp.int32)))
    text = _lowered_text("cuda", n, n, mask, arrays)
    assert text.count("@dmattn_topk_bounded_key_lists_cuda(") == 2, "one pre-pass call in each of fwd and bwd"
    assert ("stablehlo.case" in text or "stablehlo.if" in text) == segments


@pytest.mark.parametrize("lq, segments, route", [(1, False, "one range"), (64, False, "unit"),
                                                 (64, True, "unit with segments")])
def test_bounded_topk_list_capacity(lq, segments, route, monkeypatch):
    """The bounded pre-pass's list capacity comes from the rule its handler routes by (csrc/kernel_facts.h:
    topk_bounded_list_capacity): k on the one-range route of a decoding step (one query row, no segment ids), k plus
    a unit's two ends otherwise, twice that with segment ids; whole 64-key chunks."""
    monkeypatch.setattr(_ffi, "has_cuda_kernels", lambda: True)
    facts = _ffi.kernel_facts()
    spread, chunk = facts["topk_bounded_group_spread"], facts["key_list_chunk"]
    n, k = 4096, 100
    mask = TopKMask(jax.ShapeDtypeStruct((1, 1, n), jnp.float32), k)
    ids = jax.ShapeDtypeStruct((1, lq), jnp.int32), jax.ShapeDtypeStruct((1, n), jnp.int32)
    arrays = (dict(q_segment_ids=ids[0], kv_segment_ids=ids[1]) if segments else
              dict(key_value_seq_lengths=jax.ShapeDtypeStruct((1,), jnp.int32)))
    need = {"one range": k, "unit": k + 2 * spread, "unit with segments": 2 * k + 4 * spread}[route]
    text = _lowered_text("cuda", lq, n, mask, arrays)
    capacities = [int(c) for line in text.splitlines() if "@dmattn_topk_bounded_key_lists_cuda(" in line
                  for c in re.findall(r"capacity = (\d+)", line)]
    assert capacities and set(capacities) == {-(-need // chunk) * chunk}


# ------------------------------------------------------------------------------------------ errors
def _qkv(lq=8, lk=10, h=4, hkv=2):
    z = lambda *s: jnp.zeros(s, jnp.float32)
    return z(2, lq, h, 16), z(2, lk, hkv, 16), z(2, lk, hkv, 16)


@pytest.mark.parametrize("mask, err, match", [
    (TopKMask(jnp.zeros((2, 2, 10)), 0), ValueError, "k must be >= 1"),
    (TopKMask(jnp.zeros((2, 2, 10)), 2.0), TypeError, "static Python int"),
    (TopKMask(jnp.zeros((2, 2, 10)), True), TypeError, "static Python int"),
    (TopKMask(jnp.zeros((2, 2, 10), jnp.int32), 2), TypeError, "floating dtype"),
    (TopKMask(jnp.zeros((2, 2, 1, 10)), 2), ValueError, "rank 3"),
    (TopKMask(jnp.zeros((2, 2, 9)), 2), ValueError, "key length 10"),
    (TopKMask(jnp.zeros((2, 3, 10)), 2), ValueError, "head dim"),
    (TopKMask(jnp.zeros((3, 2, 10)), 2), ValueError, "batch dim"),
    (KeyIndices(jnp.zeros((2, 2, 8, 3), jnp.float32)), TypeError, "integer dtype"),
    (KeyIndices(jnp.zeros((2, 2, 3), jnp.int32)[0]), ValueError, "rank 4"),
    (KeyIndices(jnp.zeros((2, 2, 5, 3), jnp.int32)), ValueError, "Lq|1"),
    (KeyIndices(jnp.full((2, 2, 8, 3), 10, jnp.int32)), ValueError, r"\[-1, 10\)"),
    (KeyIndices(jnp.full((2, 2, 8, 3), -2, jnp.int32)), ValueError, r"\[-1, 10\)"),
])
@pytest.mark.parametrize("implementation", ["xla", "cpu"])
def test_errors(mask, err, match, implementation):
    q, k, v = _qkv()
    with pytest.raises(err, match=match):
        jax_dmattn.attention(q, k, v, mask=mask, implementation=implementation)


def test_reference_refuses_huge_compact_mask(monkeypatch):
    monkeypatch.setattr(_compact, "REFERENCE_MAX_SCORES", 100)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="implementation='cuda' or 'cpu'"):
        jax_dmattn.attention(q, k, v, mask=TopKMask(jnp.zeros((2, 2, 10)), 3), implementation="xla")


def test_traced_out_of_range_indices_are_ignored():
    q, k, v = _qkv()
    idx = np.array([[[[0, 3, 11, -5]]]], np.int32)  # 11 and -5 are outside [-1, 10)
    f = jax.jit(lambda idx: jax_dmattn.attention(q + 1, k + 1, v + jnp.arange(10.)[None, :, None, None],
                                                  mask=KeyIndices(idx), implementation="xla"))
    out = f(idx)
    ref = jax_dmattn.attention(q + 1, k + 1, v + jnp.arange(10.)[None, :, None, None],
                               mask=KeyIndices(np.array([[[[0, 3, -1, -1]]]], np.int32)), implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref))


def test_cuda_topk_k_limit(monkeypatch):
    monkeypatch.setattr(_ffi, "has_cuda_kernels", lambda: True)
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(lk=40000))
    mask = TopKMask(jnp.zeros((2, 2, 40000)), _ffi.kernel_facts()["topk_lists_max_k"] + 1)
    with pytest.raises(ValueError, match="CUDA pre-pass"):
        jax_dmattn.attention(q, k, v, mask=mask, is_causal=True, implementation="cuda")


@pytest.mark.parametrize("form", ["topk", "indices"])
def test_cuda_full_bias_backward_lowers(form, monkeypatch):
    """With a bias that has a query dim the CUDA backward takes the key-tile path on the expanded mask; that
    expansion lowers inside custom_partitioning (no captured constants)."""
    monkeypatch.setattr(_ffi, "has_cuda_kernels", lambda: True)
    lq = lk = 256
    q = jax.ShapeDtypeStruct((1, lq, 2, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, lk, 1, 64), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((1, 2, lq, lk), jnp.float32)
    if form == "topk":
        mask = TopKMask(jax.ShapeDtypeStruct((1, 1, lk), jnp.float32), 16)
    else:
        mask = KeyIndices(jax.ShapeDtypeStruct((1, 2, lq, 8), jnp.int32))

    def loss(q, k, v, bias, mask):
        return jnp.sum(jax_dmattn.attention(q, k, v, bias, mask, is_causal=True, implementation="cuda")
                       .astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(q, kv, kv, bias, mask).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "dmattn_bwd_cuda" in text


@pytest.mark.parametrize("select", ["kth_best", "kth_best_radix", "kth_best_sorted"])
@pytest.mark.parametrize("values", ["normal", "ties", "minus_inf"])
def test_kth_best_and_keep_best_match_lax_top_k(values, select):
    """Both selections behind the TopKMask thresholds and lists (the radix select CPU runs, lax.top_k's other
    platforms run) and the per-platform choice: the k-th best (value desc, index asc) and the k best indices,
    equal to lax.top_k's, for any k, with ties and rows of fewer than k finite entries."""
    rng = np.random.default_rng(seed_from(f"kth_best::{values}"))
    for n, k in ((2, 1), (7, 7), (300, 1), (300, 299), (2500, 1024), (4096, 37)):
        x = rng.standard_normal((3, 2, n)).astype(np.float32)
        if values == "ties":
            x = np.round(x * 2)
        elif values == "minus_inf":
            x[rng.random(x.shape) < 0.6] = -np.inf
        x = jnp.asarray(np.where(x == 0, np.float32(0), x))  # no -0.0 (canonical); -inf stays (not visible)
        t, jt = getattr(_compact, select)(x, k)
        vals, idx = jax.lax.top_k(x, k)
        np.testing.assert_array_equal(np.asarray(t), np.asarray(vals[..., k - 1]))
        finite = np.asarray(vals[..., k - 1]) > -np.inf
        np.testing.assert_array_equal(np.asarray(jt)[finite], np.asarray(idx[..., k - 1])[finite])
        want = np.sort(np.where(np.asarray(vals) == -np.inf, _compact.INDEX_PAD, np.asarray(idx)), axis=-1)
        np.testing.assert_array_equal(np.asarray(_compact.keep_best(x, k, t, jt)), want)
