"""Shared test helpers: tolerances, comparison, input generation, calling the implementation under test.

conftest.py re-exports these; test modules import them from here (``from helpers import ...``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import oracle

IMPLEMENTATIONS = ("xla", "cpu", "cuda")

BF16 = jnp.bfloat16
F16 = jnp.float16
F32 = jnp.float32

DTYPES = {"f32": F32, "f16": F16, "bf16": BF16}

# Norm-wise relative tolerances ||actual - expected|| / ||expected||.
_TOL = {
    # dtype: (out / lse, gradients)
    np.dtype(np.float64): (1e-10, 1e-10),
    np.dtype(np.float32): (1e-5, 2e-5),
    np.dtype(np.float16): (2e-3, 8e-3),
    np.dtype(ml_dtypes.bfloat16): (1e-2, 4e-2),
}

# Below this RMS, ||expected|| is treated as "about zero" and the comparison becomes absolute.
DEFAULT_FLOOR_RMS = 1e-4
# Gradients that are ~0 by cancellation (Lk = 1, per-row bias) are compared on the scale of the terms that
# cancel: floor = GRAD_FLOOR_FRAC * ||oracle_grads(..., magnitude=True)||. Over the sweep, ||grad|| /
# ||magnitude|| is >= 0.047 whenever the gradient is not identically 0, so the floor never loosens those.
GRAD_FLOOR_FRAC = 0.02


def tolerance(dtype, kind="out"):
    """Relative norm-wise tolerance for results computed from inputs of ``dtype``.

    kind: "out" / "lse" (forward) or "grad" (any gradient).
    """
    fwd, bwd = _TOL[np.dtype(dtype)]
    if kind in ("out", "lse", "fwd"):
        return fwd
    if kind in ("grad", "dq", "dk", "dv", "dbias", "bwd"):
        return bwd
    raise ValueError(f"unknown tolerance kind {kind!r}")


def to_f64(x):
    return np.asarray(jax.device_get(x)).astype(np.float64)


def assert_close(actual, expected, dtype, kind="out", *, floor=None, tol=None, name=""):
    """Norm-wise relative comparison that fails on any NaN.

    * shapes must match exactly;
    * any NaN in ``actual`` fails;
    * infinities in ``expected`` (lse = -inf of empty rows) must be matched exactly, the finite part is
      compared norm-wise;
    * ``||actual - expected|| <= tol * max(||expected||, floor)`` where ``floor`` defaults to an RMS of
      ``DEFAULT_FLOOR_RMS`` (an absolute floor when the expected value is ~0).
    """
    label = f"{name or kind}"
    a = to_f64(actual)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{label}: shape {a.shape} != expected {e.shape}"
    nan = np.isnan(a)
    assert not nan.any(), f"{label}: {int(nan.sum())} NaN of {a.size} (first at {np.argwhere(nan)[0].tolist()})"
    assert not np.isnan(e).any(), f"{label}: oracle has NaN (test bug)"
    inf_e = np.isinf(e)
    inf_a = np.isinf(a)
    bad_inf = (inf_e | inf_a) & ~(a == e)
    assert not bad_inf.any(), (
        f"{label}: infinities differ at {int(bad_inf.sum())} positions, first "
        f"{np.argwhere(bad_inf)[0].tolist()}: actual {a[bad_inf][0]} expected {e[bad_inf][0]}"
    )
    fin = ~inf_e
    a_f, e_f = a[fin], e[fin]
    if tol is None:
        tol = tolerance(dtype, kind)
    if floor is None:
        floor = DEFAULT_FLOOR_RMS * np.sqrt(max(e_f.size, 1))
    err = float(np.linalg.norm(a_f - e_f))
    ref = float(np.linalg.norm(e_f))
    denom = max(ref, floor)
    if not err <= tol * denom:
        diff = np.abs(a - e)
        diff[~fin] = 0
        idx = np.unravel_index(int(np.argmax(diff)), diff.shape)
        raise AssertionError(
            f"{label}: ||a-e||/max(||e||, floor) = {err / denom:.3e} > tol {tol:.1e} "
            f"(||e|| = {ref:.3e}, floor = {floor:.3e}); worst at {list(idx)}: actual {a[idx]!r} "
            f"expected {e[idx]!r}"
        )


def rel_err_same_infinities(a, e):
    """Norm-wise relative error of a against e over e's finite entries, after asserting that both have the same
    infinities (position and sign); the denominator is floored for an all-zero e."""
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    fin = np.isfinite(e)
    assert np.array_equal(np.isfinite(a), fin), "infinities differ"
    assert np.array_equal(a[~fin], e[~fin]), "infinite values differ"
    a, e = a[fin], e[fin]
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-6 * np.sqrt(max(e.size, 1))))


def seed_from(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def make_rng(request) -> np.random.Generator:
    return np.random.default_rng(seed_from(request.node.nodeid))


def native_dtype(implementation) -> str:
    """The case dtype a dtype-agnostic test should use: float32 where supported, bfloat16 for "cuda"."""
    return "bf16" if implementation == "cuda" else "f32"


def check_dtype_supported(implementation, dtype):
    """float32 q/k/v are valid only for "cpu" and "xla"."""
    if implementation == "cuda" and np.dtype(dtype) == np.dtype(np.float32):
        pytest.skip("float32 inputs are not supported by implementation='cuda'")


def poison(x, where, value=np.nan):
    """Return a copy of numpy ``x`` with ``value`` written at the boolean positions ``where`` (broadcast).

    Used to plant values that must never influence a result (bias under a False mask, keys/values no
    query can see) or that an implementation must overwrite (donated output buffers).
    """
    x = np.array(x, copy=True)
    w = np.broadcast_to(np.asarray(where, dtype=bool), x.shape)
    x[w] = value
    return x


def on_gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except Exception:  # pragma: no cover - backend init failure
        return False


def cuda_targets_on_gpu(*targets: str) -> bool:
    """A GPU backend and an extension that registered these CUDA FFI targets (the direct kernel tests need both)."""
    if not on_gpu():
        return False
    try:
        from jax_dmattn import _ffi

        registered = _ffi.register_targets()["CUDA"]
        return all(t in registered for t in targets)
    except Exception:  # pragma: no cover
        return False


def cuda_kernel_marks(*targets: str) -> list:
    """pytestmark of a module that calls these CUDA FFI targets directly: a GPU test, skipped where
    cuda_targets_on_gpu is False."""
    return [pytest.mark.gpu, pytest.mark.skipif(not cuda_targets_on_gpu(*targets),
                                                reason="needs a GPU and the CUDA kernels")]


def sm90_bwd_head_dims():
    """The head dims the Hopper backwards are built for (DMATTN_FOR_EACH_SM90_BWD_HEAD_DIM, kernel_facts.h)."""
    from jax_dmattn import _ffi

    return _ffi.kernel_facts()["sm90_bwd_head_dims"]


def hopper_kernels_available() -> bool:
    """The Hopper kernels (csrc/cuda/sm90/) are in this build and the default device has compute capability 9.0."""
    from jax_dmattn import _ffi

    dev = jax.devices()[0]
    return _ffi.kernel_facts()["sm90_built"] and getattr(dev, "compute_capability", None) == "9.0"


def sm90_launches(direction: str) -> int:
    """Calls a Hopper kernel has served in this process: "fwd" (the forward without a mask), "fwd_key_list" (the
    key-list forward), "fwd_tile_units" (key-list calls whose tile units, key_lists.h: key_list_unit_on_tiles, the
    forward without a mask served), "bwd" (the backward without a mask) or "bwd_key_list" (the key-list backward)."""
    from jax_dmattn import _ffi

    return getattr(_ffi.extension(), f"sm90_{direction}_launches")()


def implementation_marks(impl):
    if impl != "cuda":
        return []
    return [
        pytest.mark.gpu,
        pytest.mark.skipif(not on_gpu(), reason="implementation='cuda' needs jax.default_backend() == 'gpu'"),
    ]


def implementation_params():
    """pytest params for the implementation axis (cuda marked gpu and skipped off-GPU)."""
    return [pytest.param(impl, marks=implementation_marks(impl), id=impl) for impl in IMPLEMENTATIONS]


def sweep_params(cases):
    """(implementation, case) params for a sweep: the kernels ("cpu", "cuda") run every case; "xla" (the
    pure-jnp reference, also checked in float64 by test_reference.py) runs the cases marked core, to keep
    the CPU time of the suite low. For "cuda", float32 cases run with bfloat16 q/k/v (bias dtype kept when
    it is given explicitly)."""
    params = []
    for impl in IMPLEMENTATIONS:
        for p in cases:
            (case,) = p.values
            if impl == "xla" and not case.core:
                continue
            if impl == "cuda" and case.dtype == "f32":  # cuda takes bf16/f16: run the float32 cases in bf16
                case = case.replace(dtype="bf16")
            params.append(pytest.param(impl, case, id=f"{impl}-{p.id}", marks=implementation_marks(impl) + list(p.marks)))
    return params


# ----------------------------------------------------------------------------------------------------
# Test cases


@dataclasses.dataclass(frozen=True)
class Case:
    B: int = 2
    Lq: int = 65
    Lk: int = 100
    H: int = 4
    Hkv: int = 2
    D: int = 64
    dtype: str = "f32"
    bias: Optional[Tuple[int, ...]] = None  # shape, "full" handled by callers
    mask: Optional[Tuple[int, ...]] = None
    bias_dtype: Optional[str] = None  # default: q's dtype
    mask_kind: str = "random"  # random | block | rows (random with some rows empty) | none_kept | all
    mask_density: float = 0.7
    is_causal: bool = False
    softcap: Optional[float] = None
    scale: Optional[float] = None
    bias_std: float = 1.0
    core: bool = False  # part of the reduced sweep run for implementation="xla"

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

    @property
    def jdtype(self):
        return DTYPES[self.dtype]

    @property
    def bias_jdtype(self):
        return DTYPES[self.bias_dtype or self.dtype]


def _round(x, dtype):
    """Round a float64 numpy array to ``dtype`` (numpy array of that dtype)."""
    return np.asarray(x, dtype=np.float64).astype(np.dtype(dtype))


def random_topk_mask(rng, shape, k):
    """A bool numpy mask of ``shape``: per row (last dim), the k keys of largest random score (a top-k-like mask
    with no tie to any bias; jax_dmattn.topk_mask builds the real thing)."""
    scores = rng.standard_normal(shape)
    return scores >= np.partition(scores, -k, axis=-1)[..., -k:-k + 1]


def make_mask(rng, shape, kind="random", density=0.7, tile=64):
    """A boolean numpy mask of ``shape`` (rank >= 2 uses the last two dims as [Lq, Lk])."""
    shape = tuple(shape)
    if kind == "all":
        return np.ones(shape, dtype=bool)
    if kind == "none_kept":
        return np.zeros(shape, dtype=bool)
    if kind == "random":
        return rng.random(shape) < density
    if kind == "rows":  # random, plus some rows with no kept key at all
        m = rng.random(shape) < density
        if len(shape) >= 2 and shape[-2] > 1:
            rows = rng.random(shape[:-1]) < 0.25
            m = m & ~rows[..., None]
        return m
    if kind == "block":  # whole tile x tile blocks on or off, diagonal blocks always on
        assert len(shape) >= 2
        Mq, Nk = shape[-2], shape[-1]
        nbq, nbk = -(-Mq // tile), -(-Nk // tile)
        blocks = rng.random(shape[:-2] + (nbq, nbk)) < 0.5
        if Mq > 1 and Nk > 1:
            d = np.arange(min(nbq, nbk))
            blocks[..., d, d] = True
        m = np.repeat(np.repeat(blocks, tile, axis=-2), tile, axis=-1)[..., :Mq, :Nk]
        return np.ascontiguousarray(m)
    if kind == "block_random":  # per-tile: empty, full, or random (partial)
        assert len(shape) >= 2
        Mq, Nk = shape[-2], shape[-1]
        nbq, nbk = -(-Mq // tile), -(-Nk // tile)
        cls = rng.integers(0, 3, size=shape[:-2] + (nbq, nbk))
        if Mq > 1 and Nk > 1:
            d = np.arange(min(nbq, nbk))
            cls[..., d, d] = 2
        cls_full = np.repeat(np.repeat(cls, tile, axis=-2), tile, axis=-1)[..., :Mq, :Nk]
        rnd = rng.random(shape) < 0.5
        return np.where(cls_full == 2, True, np.where(cls_full == 1, rnd, False))
    raise ValueError(kind)


def make_inputs(case: Case, rng: np.random.Generator):
    """numpy inputs (already in their final dtypes): q, k, v, bias (or None), mask (or None)."""
    dt = np.dtype(case.jdtype)
    q = _round(rng.standard_normal((case.B, case.Lq, case.H, case.D)), dt)
    k = _round(rng.standard_normal((case.B, case.Lk, case.Hkv, case.D)), dt)
    v = _round(rng.standard_normal((case.B, case.Lk, case.Hkv, case.D)), dt)
    bias = None
    if case.bias is not None:
        bias = _round(case.bias_std * rng.standard_normal(case.bias), np.dtype(case.bias_jdtype))
    mask = None
    if case.mask is not None:
        mask = make_mask(rng, case.mask, case.mask_kind, case.mask_density)
    return q, k, v, bias, mask


def make_cotangent(case: Case, rng):
    return _round(rng.standard_normal((case.B, case.Lq, case.H, case.D)), np.dtype(case.jdtype))


def case_kwargs(case: Case):
    return dict(scale=case.scale, is_causal=case.is_causal, softcap=case.softcap)


def oracle_fwd(case: Case, q, k, v, bias, mask):
    return oracle.oracle_attention(q, k, v, bias, mask, **case_kwargs(case))


def oracle_bwd(case: Case, q, k, v, bias, mask, dout):
    return oracle.oracle_grads(q, k, v, bias, mask, dout, **case_kwargs(case))


def grad_floors(case: Case, q, k, v, bias, mask, dout, **extra):
    """Absolute floors for (dq, dk, dv, dbias) from the magnitude of the terms that cancel."""
    kw = case_kwargs(case)
    kw.update(extra)
    mags = oracle.oracle_grads(q, k, v, bias, mask, dout, magnitude=True, **kw)
    return [None if m is None else max(GRAD_FLOOR_FRAC * float(np.linalg.norm(m)),
                                       DEFAULT_FLOOR_RMS * np.sqrt(max(m.size, 1))) for m in mags]


def get_attention():
    import jax_dmattn  # a missing or broken package is a failure, not a skip

    return jax_dmattn.attention


@functools.lru_cache(maxsize=64)
def _forward_fn(implementation, kw_items, jit):
    attention = get_attention()
    kw = dict(kw_items)

    def f(q, k, v, bias, mask):
        return attention(q, k, v, bias, mask, return_lse=True, implementation=implementation, **kw)

    return jax.jit(f) if jit else f


@functools.lru_cache(maxsize=64)
def _vjp_fn(implementation, kw_items, has_bias, jit):
    attention = get_attention()
    kw = dict(kw_items)

    def f(q, k, v, bias, mask, dout):
        if has_bias:
            fn = lambda q, k, v, b: attention(q, k, v, b, mask, implementation=implementation, **kw)
            out, vjp = jax.vjp(fn, q, k, v, bias)
            dq, dk, dv, db = vjp(dout)
        else:
            fn = lambda q, k, v: attention(q, k, v, None, mask, implementation=implementation, **kw)
            out, vjp = jax.vjp(fn, q, k, v)
            dq, dk, dv = vjp(dout)
            db = None
        return out, dq, dk, dv, db

    return jax.jit(f) if jit else f


def _kw_items(case, extra):
    kw = case_kwargs(case)
    kw.update(extra)
    return tuple(sorted(kw.items()))


def _as_jax(*xs):
    return [None if x is None else jax.tree.map(jnp.asarray, x) for x in xs]  # a compact mask is a pytree


def run_forward(implementation, case: Case, q, k, v, bias, mask, *, jit=True, **extra):
    """(out, lse) of attention(..., return_lse=True) under jit (functions cached per configuration)."""
    f = _forward_fn(implementation, _kw_items(case, extra), jit)
    return f(*_as_jax(q, k, v, bias, mask))


def run_vjp(implementation, case: Case, q, k, v, bias, mask, dout, *, jit=True, **extra):
    """(out, dq, dk, dv, dbias) of sum(out * dout) through jax.vjp; dbias is None without bias."""
    f = _vjp_fn(implementation, _kw_items(case, extra), bias is not None, jit)
    return f(*_as_jax(q, k, v, bias, mask, dout))


def check_forward(implementation, case: Case, rng, *, q=None, inputs=None):
    """Run the forward on fresh inputs and compare out and lse against the oracle. Returns the results."""
    check_dtype_supported(implementation, case.jdtype)
    if inputs is None:
        inputs = make_inputs(case, rng)
    q, k, v, bias, mask = inputs
    out, lse = run_forward(implementation, case, q, k, v, bias, mask)
    eo, el = oracle_fwd(case, q, k, v, bias, mask)
    assert out.dtype == case.jdtype, f"out dtype {out.dtype} != query dtype {case.jdtype}"
    assert out.shape == q.shape
    assert lse.dtype == jnp.float32, f"lse dtype {lse.dtype} != float32"
    assert lse.shape == (case.B, case.H, case.Lq)
    assert_close(out, eo, case.jdtype, "out", name="out")
    assert_close(lse, el, case.jdtype, "lse", name="lse")
    return out, lse, (eo, el)


def check_grads(implementation, case: Case, rng, *, inputs=None, dout=None):
    """Compare dq, dk, dv, dbias (and out) of sum(out * dout) against the oracle. Returns the results."""
    check_dtype_supported(implementation, case.jdtype)
    if inputs is None:
        inputs = make_inputs(case, rng)
    q, k, v, bias, mask = inputs
    if dout is None:
        dout = make_cotangent(case, rng)
    out, dq, dk, dv, db = run_vjp(implementation, case, q, k, v, bias, mask, dout)
    eo, _ = oracle_fwd(case, q, k, v, bias, mask)
    edq, edk, edv, edb = oracle_bwd(case, q, k, v, bias, mask, dout)
    fq, fk, fv, fb = grad_floors(case, q, k, v, bias, mask, dout)
    assert_close(out, eo, case.jdtype, "out", name="out")
    for name, got, exp, like, fl in (("dq", dq, edq, q, fq), ("dk", dk, edk, k, fk), ("dv", dv, edv, v, fv)):
        assert got.dtype == like.dtype, f"{name} dtype {got.dtype} != {like.dtype}"
        assert got.shape == like.shape, f"{name} shape {got.shape} != {like.shape}"
        assert_close(got, exp, case.jdtype, "grad", name=name, floor=fl)
    if bias is not None:
        assert db.shape == bias.shape, f"dbias shape {db.shape} != bias shape {bias.shape}"
        assert db.dtype == bias.dtype, f"dbias dtype {db.dtype} != bias dtype {bias.dtype}"
        # dbias is rounded to bias's dtype; the computation's precision is that of q. A per-row bias has
        # dbias exactly 0 (the floor makes that comparison absolute).
        tol = max(tolerance(case.jdtype, "grad"), tolerance(bias.dtype, "grad"))
        assert_close(db, edb, case.jdtype, "grad", name="dbias", tol=tol, floor=fb)
    return (out, dq, dk, dv, db), (eo, edq, edk, edv, edb)


def random_qkv_bias(rng, *, B, Lq, Lk, H, Hkv, D, bias, dtype):
    """Standard-normal q [B, Lq, H, D], k / v [B, Lk, Hkv, D] and a bias: None, "key" ([B, Hkv, 1, Lk], one score
    per key and kv head) or "full" ([B, H, Lq, Lk]), as numpy arrays of ``dtype``."""
    dt = np.dtype(dtype)
    r = lambda shape: rng.standard_normal(shape).astype(dt)  # noqa: E731
    q, k, v = r((B, Lq, H, D)), r((B, Lk, Hkv, D)), r((B, Lk, Hkv, D))
    shapes = {None: None, "key": (B, Hkv, 1, Lk), "full": (B, H, Lq, Lk)}
    return q, k, v, (None if shapes[bias] is None else r(shapes[bias]))


# ------------------------------------------------------------------------------------------ row bounds (numpy)
def dense_sequences(B, Lq, Lk, *, is_causal, q_seg=None, kv_seg=None, window=None, q_lens=None, kv_lens=None):
    """bool [B, 1, Lq, Lk]: the keys each query row sees under segment ids, a window and sequence lengths, from
    their documented meaning (docs/sequences.md): causality and the window align bottom-right to each element's own
    lengths; without query lengths an element's query length is min(Lq, its key length)."""
    out = np.zeros((B, 1, Lq, Lk), bool)
    if isinstance(window, int):
        window = (window, window)
    i, j = np.arange(Lq)[:, None], np.arange(Lk)[None, :]
    for b in range(B):
        kvl = Lk if kv_lens is None else min(max(int(kv_lens[b]), 0), Lk)
        if q_lens is not None:
            ql = min(max(int(q_lens[b]), 0), Lq)
        else:
            ql = Lq if kv_lens is None else min(Lq, kvl)
        off = kvl - ql
        seen = (j < kvl) & (i >= 0)
        if q_lens is not None:
            seen &= i < ql
        if is_causal:
            seen &= j <= i + off
        if window is not None:
            seen &= (i + off - window[0] <= j) & (j <= i + off + window[1])
        if q_seg is not None:
            seen &= np.asarray(q_seg)[b][:, None] == np.asarray(kv_seg)[b][None, :]
        out[b, 0] = seen
    return out


def sequence_keywords(rng, B, Lq, Lk, *, is_causal, window=None, segments=None, q_lens=None, kv_lens=None,
                      docs=4):
    """attention()'s sequence keywords for a case and the bool mask [B, 1, Lq, Lk] they stand for
    (dense_sequences): ``window`` as local_window_size; ``segments`` "packed" (sorted ids of ``docs`` documents,
    Lq == Lk, the same ids for queries and keys, packed_segments) or "random" (unsorted ids in 0..2 drawn for the
    queries, then for the keys); the lengths as int32 arrays. Returns (keywords, dense)."""
    kw, seq = {}, {}
    if window is not None:
        kw["local_window_size"] = seq["window"] = window
    if segments is not None:
        if segments == "packed":
            assert Lq == Lk
            q_seg = kv_seg = packed_segments(rng, B, Lq, docs)
        else:
            q_seg = rng.integers(0, 3, (B, Lq)).astype(np.int32)
            kv_seg = rng.integers(0, 3, (B, Lk)).astype(np.int32)
        kw.update(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg))
        seq.update(q_seg=q_seg, kv_seg=kv_seg)
    if q_lens is not None:
        kw["query_seq_lengths"] = jnp.asarray(q_lens, jnp.int32)
        seq["q_lens"] = q_lens
    if kv_lens is not None:
        kw["key_value_seq_lengths"] = jnp.asarray(kv_lens, jnp.int32)
        seq["kv_lens"] = kv_lens
    return kw, dense_sequences(B, Lq, Lk, is_causal=is_causal, **seq)


def split_static(kw):
    """attention() keywords -> (the traced array arguments, the static window argument)."""
    static = {n: x for n, x in kw.items() if n == "local_window_size"}
    return {n: x for n, x in kw.items() if n not in static}, static


def packed_segments(rng, B, L, docs):
    """Sorted ids of `docs` documents of random lengths per row, then padding (id -1) at the end."""
    ids = np.zeros((B, L), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, L), docs, replace=False))
        ids[b] = np.searchsorted(cuts, np.arange(L), side="right")
        ids[b, cuts[-1]:] = -1
    return ids


def decode_lists(keys, bits, geometry, lq, lk):
    """Dense [Bm, Hm, Mm, Lk] bool of key lists (csrc/cuda/key_lists.h layout: per unit of 128 rows its count, its
    ascending keys, and per chunk of 64 list positions a bit word per row)."""
    bm, hm, mm = geometry
    keys, bits = np.asarray(keys), np.asarray(bits).view(np.uint64)
    t = -(-mm // 128)
    units = bm * hm * t
    cap = keys.size // units - 1
    rows = min(mm, 128)
    keys = keys.reshape(units, 1 + cap)
    bits = bits.reshape(units, cap // 64, rows)
    out = np.zeros((bm * hm, t * 128 if mm > 1 else 1, lk), bool)
    shifts = np.arange(64, dtype=np.uint64)[None, :, None]
    for u in range(units):
        bh, ti = divmod(u, t)
        count = keys[u, 0]
        assert 0 <= count <= cap, f"unit {u}: count {count} (dense units must not occur)"
        listed = keys[u, 1:1 + count]
        assert np.all(np.diff(listed) > 0), f"unit {u}: list not strictly ascending"
        # [chunks, 64, rows] -> list position x row
        kept = ((bits[u][:, None, :] >> shifts) & np.uint64(1)).astype(bool).reshape(cap, rows)[:count]
        out[bh, ti * 128:ti * 128 + rows][:, listed] = kept.T
    return out[:, :mm].reshape(bm, hm, mm, lk)
