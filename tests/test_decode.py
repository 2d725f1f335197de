"""One-row calls (decoding steps): GQA packing and the split over the keys (jax_dmattn/_decode.py), against the
float64 oracle, with every operand form that moves through the packing; the split is forced on the CPU kernels so
that its cutting and merging are checked without a GPU.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from helpers import GRAD_FLOOR_FRAC, DEFAULT_FLOOR_RMS, assert_close, decode_lists, seed_from

import jax_dmattn
from jax_dmattn import KeyIndices, TopKMask, _decode, _ffi, _primitives

pytestmark = pytest.mark.cpu_kernels


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    B: int = 3
    Lk: int = 256
    H: int = 8
    Hkv: int = 2
    D: int = 32
    is_causal: bool = True
    bias: str | None = "key"     # None | key [B, Hkv, 1, Lk] | head [B, H, 1, Lk] | one [1, 1, 1, Lk]
    mask: str | None = None      # None | bool_head [B, H, 1, Lk] | bool_kv [1, Hkv, 1, Lk] | bool_one [B, 1, 1, Lk]
    #                              | indices_head | topk_kv
    #                              | indices_kv (KeyIndices [B, Hkv, K], shared by every row)
    k: int = 30                  # topk_kv: k; indices_*: K
    lengths: bool = False        # key_value_seq_lengths (ragged cache fill)
    segments: bool = False       # unsorted segment ids (the id comparison, not the span)
    scores: str = "float32"      # topk_kv's scores: float32 | bfloat16 (read at that width) | raw (NaN, -inf, -0.0)


CASES = {
    "plain": DecodeCase(bias=None),
    "key-bias": DecodeCase(),
    "head-bias": DecodeCase(bias="head"),
    "one-bias-noncausal": DecodeCase(bias="one", is_causal=False),
    "bool-head": DecodeCase(mask="bool_head"),
    "bool-kv": DecodeCase(mask="bool_kv"),
    "bool-one": DecodeCase(mask="bool_one"),
    "bool-kv-lengths": DecodeCase(mask="bool_kv", lengths=True),
    "indices-head": DecodeCase(mask="indices_head", bias="head", k=40),
    "indices-kv": DecodeCase(mask="indices_kv", k=70),
    "topk-kv": DecodeCase(mask="topk_kv"),
    "topk-kv-bf16-scores": DecodeCase(mask="topk_kv", scores="bfloat16"),
    "topk-kv-raw-scores": DecodeCase(mask="topk_kv", scores="raw"),
    "lengths": DecodeCase(lengths=True, H=12, Hkv=3, Lk=512),
    "segments-lengths": DecodeCase(lengths=True, segments=True),
    "mqa": DecodeCase(H=4, Hkv=1, bias="head"),
}


def make(case: DecodeCase, rng):
    r = lambda shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    q, k, v = r((case.B, 1, case.H, case.D)), r((case.B, case.Lk, case.Hkv, case.D)), r((case.B, case.Lk, case.Hkv, case.D))
    bias = {None: None, "key": lambda: r((case.B, case.Hkv, 1, case.Lk)), "head": lambda: r((case.B, case.H, 1, case.Lk)),
            "one": lambda: r((1, 1, 1, case.Lk))}[case.bias]
    bias = bias() if bias else None
    keep = np.ones((case.B, case.H, 1, case.Lk), bool)
    mask, kw = None, {}
    g = case.H // case.Hkv
    if case.mask == "bool_head":
        mask = rng.random((case.B, case.H, 1, case.Lk)) < 0.5
        keep &= mask
    elif case.mask == "bool_kv":
        mask = rng.random((1, case.Hkv, 1, case.Lk)) < 0.5
        keep &= np.repeat(mask, g, axis=1)
    elif case.mask == "bool_one":
        mask = rng.random((case.B, 1, 1, case.Lk)) < 0.5
        keep &= mask
    elif case.mask in ("indices_head", "indices_kv"):
        heads = case.H if case.mask == "indices_head" else case.Hkv
        idx = rng.integers(-1, case.Lk, (case.B, heads, 1, case.k)).astype(np.int32)
        dense = np.zeros((case.B, heads, 1, case.Lk + 1), bool)
        for ix in np.ndindex(idx.shape[:3]):
            dense[ix + (idx[ix],)] = True
        keep &= np.repeat(dense[..., :case.Lk], case.H // heads, axis=1)
        mask = KeyIndices(jnp.asarray(idx if heads == case.H else idx[:, :, 0]))
    elif case.mask == "topk_kv":
        scores = r((case.B, case.Hkv, case.Lk))
        if case.scores == "bfloat16":
            scores = np.asarray(jnp.asarray(scores, jnp.bfloat16))
        elif case.scores == "raw":
            scores[..., ::5], scores[..., 1::7], scores[..., 2::11] = np.nan, -np.inf, -0.0
        top = np.asarray(jax_dmattn.topk_mask(jnp.asarray(scores)[:, :, None, :], case.k))
        keep &= np.repeat(top, g, axis=1)
        mask = TopKMask(jnp.asarray(scores), case.k)
    if case.lengths:
        lens = rng.integers(1, case.Lk + 1, (case.B,)).astype(np.int32)
        lens[0] = case.Lk
        keep &= np.arange(case.Lk)[None, None, None, :] < lens[:, None, None, None]
        kw["key_value_seq_lengths"] = jnp.asarray(lens)
    if case.segments:
        q_seg = rng.integers(0, 2, (case.B, 1)).astype(np.int32)
        kv_seg = rng.integers(0, 2, (case.B, case.Lk)).astype(np.int32)
        keep &= (kv_seg[:, None, None, :] == q_seg[:, None, :, None])
        kw.update(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg))
    return (q, k, v, bias, mask), kw, keep


@pytest.fixture(params=[1, 4], ids=["packed", "packed-split4"])
def splits(request, monkeypatch):
    """The packed call alone, and split into 4 key parts (forced: on the CPU kernels the split is otherwise off)."""
    monkeypatch.setattr(_decode, "split_count", lambda **kw: request.param)
    return request.param


@pytest.mark.parametrize("name", list(CASES))
def test_values_and_grads(name, splits):
    case = CASES[name]
    rng = np.random.default_rng(seed_from(f"test_decode::{name}"))
    (q, k, v, bias, mask), kw, keep = make(case, rng)
    args = (q, k, v) if bias is None else (q, k, v, bias)

    def f(*a):
        return jax_dmattn.attention(*a[:3], a[3] if len(a) > 3 else None, mask, is_causal=case.is_causal,
                                    return_lse=True, implementation="cpu", **kw)

    (out, lse), vjp = jax.vjp(jax.jit(f), *args)
    eo, el = oracle.oracle_attention(q, k, v, bias, keep)
    assert_close(out, eo, jnp.float32, "out", name="out")
    assert_close(lse, el, jnp.float32, "lse", name="lse")
    dout = rng.standard_normal(q.shape).astype(np.float32)
    dlse = rng.standard_normal(lse.shape).astype(np.float32)
    grads = vjp((jnp.asarray(dout), jnp.asarray(dlse)))
    expected = oracle.oracle_grads(q, k, v, bias, keep, dout, dlse=dlse)
    floors = oracle.oracle_grads(q, k, v, bias, keep, dout, dlse=dlse, magnitude=True)
    for nm, g, e, fl in zip(("dq", "dk", "dv", "dbias"), grads, expected, floors):
        floor = max(GRAD_FLOOR_FRAC * float(np.linalg.norm(fl)), DEFAULT_FLOOR_RMS * np.sqrt(e.size))
        assert_close(g, e, jnp.float32, "grad", floor=floor, name=nm)


def test_kernel_sees_the_packed_and_split_call(monkeypatch):
    """The CPU forward kernel gets G = H / Hkv query rows of Hkv heads, the keys cut into the parts along the batch;
    the backward the packed call over every key."""
    monkeypatch.setattr(_decode, "split_count", lambda **kw: 4)
    seen = []
    for name in ("_fwd_cpu", "_bwd_cpu"):
        real = getattr(_primitives, name)

        def spy(q, k, *rest, real=real, name=name):
            seen.append((name, q.shape, k.shape))
            return real(q, k, *rest)

        monkeypatch.setattr(_primitives, name, spy)
    q = jnp.ones((2, 1, 8, 32))
    k = jnp.ones((2, 4096, 2, 32))
    jax.grad(lambda q: jax_dmattn.attention(q, k, k, is_causal=True, implementation="cpu").sum())(q)
    assert seen == [("_fwd_cpu", (8, 4, 2, 32), (8, 1024, 2, 32)), ("_bwd_cpu", (2, 4, 2, 32), (2, 4096, 2, 32))]


def test_not_packed_where_it_cannot_be():
    """Several query rows, MHA, or a TopKMask ranking keys per query head: the call runs as it is."""
    cfg = _primitives.KernelConfig(scale=1.0, softcap=0.0, is_causal=True, deterministic=False, implementation="cpu")
    topk = _primitives.KernelConfig(scale=1.0, softcap=0.0, is_causal=True, deterministic=False,
                                    implementation="cpu", mask_kind="topk", mask_k=4)
    none = jnp.zeros((0,), bool)
    k = jnp.zeros((1, 64, 2, 16))
    assert not _decode.packs(jnp.zeros((1, 2, 8, 16)), k, none, cfg)
    assert not _decode.packs(jnp.zeros((1, 1, 2, 16)), k, none, cfg)
    assert _decode.packs(jnp.zeros((1, 1, 8, 16)), k, none, cfg)
    assert not _decode.packs(jnp.zeros((1, 1, 8, 16)), k, jnp.zeros((1, 8, 1, 64)), topk)
    assert _decode.packs(jnp.zeros((1, 1, 8, 16)), k, jnp.zeros((1, 2, 1, 64)), topk)


def test_split_count_follows_the_device(monkeypatch):
    class Dev:
        core_count = 132

    monkeypatch.setattr(jax, "devices", lambda *a: [Dev()])
    # B * Hkv = 64 items, 264 wanted: 4 parts (a divisor of Lk, each >= MIN_SPLIT_KEYS keys)
    assert _decode.split_count(batch=8, kv_heads=8, kv_len=65536, implementation="cuda") == 4
    assert _decode.split_count(batch=1, kv_heads=8, kv_len=65536, implementation="cuda") == 32
    assert _decode.split_count(batch=1, kv_heads=8, kv_len=3000, implementation="cuda") == 2
    assert _decode.split_count(batch=1, kv_heads=8, kv_len=1500, implementation="cuda") == 1
    assert _decode.split_count(batch=64, kv_heads=8, kv_len=65536, implementation="cuda") == 1
    assert _decode.split_count(batch=1, kv_heads=8, kv_len=65536, implementation="cpu") == 1
    # a ragged batch (row bounds): 8 items per multiprocessor, 1056 wanted of 64: 16 parts
    assert _decode.split_count(batch=8, kv_heads=8, kv_len=65536, implementation="cuda", bounded=True) == 16


def test_list_split_count_follows_the_device(monkeypatch):
    class Dev:
        core_count = 132

    monkeypatch.setattr(jax, "devices", lambda *a: [Dev()])
    rows_max = _ffi.kernel_facts()["key_list_rows_max"]
    # 64 items; a divisor of the 32 chunks of a top-2048 list, each >= MIN_SPLIT_CHUNKS chunks. The tile forward
    # (more rows than the few-rows forward takes): 132 wanted, one wave.
    assert _decode.list_split_count(batch=8, kv_heads=8, chunks=32, rows=rows_max + 1) == 2
    assert _decode.list_split_count(batch=1, kv_heads=8, chunks=32, rows=rows_max + 1) == 8
    assert _decode.list_split_count(batch=1, kv_heads=8, chunks=7, rows=rows_max + 1) == 1
    assert _decode.list_split_count(batch=64, kv_heads=8, chunks=32, rows=rows_max + 1) == 1
    # the few-rows forward: 264 wanted (one wave of two CTAs a multiprocessor)
    assert _decode.list_split_count(batch=8, kv_heads=8, chunks=32, rows=4) == 4
    assert _decode.list_split_count(batch=32, kv_heads=8, chunks=32, rows=4) == 2
    assert _decode.list_split_count(batch=64, kv_heads=8, chunks=32, rows=4) == 1


def _lists_reference(k, v, bias):
    """A stand-in for the CUDA forward with compact lists: decodes the lists to a dense mask, runs the oracle."""

    def run(q, lists, q_head_repeat=1, q_heads_first=False):
        if q_heads_first:
            q = jnp.swapaxes(q, 1, 2)
        run.calls.append((q.shape, q_head_repeat))
        q = jnp.repeat(q, q_head_repeat, axis=2)  # the kernel's q_head_div: query head h reads q's head h / repeat
        keys, bits, geometry = lists
        dense = decode_lists(keys, bits, geometry, q.shape[1], k.shape[1])  # [Bm, Hm, 1, Lk]
        keep = np.repeat(dense, q.shape[2] // dense.shape[1], axis=1)
        qh = q.shape[2]
        kk, vv = (np.repeat(np.asarray(x), qh // x.shape[2], axis=2) for x in (k, v))
        b = None if bias is None else np.repeat(np.asarray(bias), qh // bias.shape[1], axis=1)
        out, lse = oracle.oracle_attention(np.asarray(q), kk, vv, b, keep)
        return jnp.asarray(out, jnp.float32), jnp.asarray(lse, jnp.float32)

    run.calls = []
    return run


@pytest.mark.parametrize("mask_heads", [1, 2])
@pytest.mark.parametrize("per_row", [False, True])
def test_split_lists_merge_to_the_whole_list(monkeypatch, mask_heads, per_row):
    """Key lists with one unit per (batch, head), shared by the packed rows or with a row word each (per_row: what
    per-query-head KeyIndices give a packed step), cut into parts along the heads (some parts short or empty: the
    lists have pads and repeats) give the whole list's out and lse; each part is one query head per (kv head,
    part)."""
    from jax_dmattn import _compact

    monkeypatch.setattr(_decode, "_wanted_parts", lambda *a: 64)
    rng = np.random.default_rng(seed_from(f"test_decode::split_lists::{mask_heads}::{per_row}"))
    b, g, hkv, d, lk, kk = 2, 3, 2, 16, 700, 512
    rows = g if per_row else 1
    q = jnp.asarray(rng.standard_normal((b, g, hkv, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, lk, hkv, d)), jnp.float32) for _ in range(2))
    bias = jnp.asarray(rng.standard_normal((b, hkv, g, lk)), jnp.float32)
    idx = rng.integers(-1, lk, (b, mask_heads, rows, kk // rows if per_row else kk)).astype(np.int32)
    idx[0, 0, 0, :100] = -1  # a short list: its last parts are empty
    norm, kind, _ = _compact.normalize(KeyIndices(jnp.asarray(idx)), (b, hkv * g, hkv, rows, lk))
    lists = _compact.cuda_key_lists(norm, kind, 0, q_len=rows, kv_len=lk, is_causal=False)
    assert lists[2] == (b, mask_heads, rows)
    whole = _lists_reference(k, v, bias)
    want = whole(q, lists)
    parts = _lists_reference(k, v, bias)
    got = _decode.split_lists(parts, q, lists)
    assert parts.calls == [((b, g, hkv, d), 2)], parts.calls  # 512 keys: 8 chunks, 2 parts of >= 4 chunks
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5, atol=1e-5)


def _check_cuda_step(case, seed: str):
    """A decoding step of ``case`` on the CUDA route in bf16, against the oracle on the bf16-rounded inputs."""
    rng = np.random.default_rng(seed_from(seed))
    (q, k, v, bias, mask), kw, keep = make(case, rng)
    cast = lambda x: None if x is None else jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    q, k, v = (np.asarray(cast(x)).astype(np.float32) for x in (q, k, v))
    out, lse = jax.jit(lambda q, k, v, b: jax_dmattn.attention(
        q, k, v, b, mask, is_causal=case.is_causal, return_lse=True, implementation="cuda", **kw))(
        cast(q), cast(k), cast(v), bias)
    eo, el = oracle.oracle_attention(q, k, v, bias, keep)
    assert_close(out, eo, jnp.bfloat16, "out", name="out")
    assert_close(lse, el, jnp.bfloat16, "lse", name="lse")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("name", ["key-bias", "bool-kv-lengths", "segments-lengths", "head-bias", "bool-head", "bool-kv",
                                  "bool-one"])
def test_cuda_split_decode(name):
    """The CUDA route of a decoding step at a length the device splits, against the oracle (bool masks without
    row bounds: their parts' key lists; the others: every operand cut into parts along the batch)."""
    case = dataclasses.replace(CASES[name], Lk=8192, B=2)
    assert _decode.split_count(batch=case.B, kv_heads=case.Hkv, kv_len=case.Lk, implementation="cuda") > 1
    _check_cuda_step(case, f"test_decode::cuda::{name}")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("name,k", [("topk-kv", 1024), ("topk-kv", 2047), ("topk-kv-bf16-scores", 1024),
                                    ("topk-kv-raw-scores", 2047), ("indices-kv", 1500)])
def test_cuda_list_split_decode(name, k):
    """A decoding step whose compact mask's shared key list the device cuts into parts, against the oracle."""
    case = dataclasses.replace(CASES[name], Lk=8192, B=2, k=k)
    chunks = -(-min(k, case.Lk) // 64)
    assert _decode.list_split_count(batch=case.B, kv_heads=case.Hkv, chunks=chunks, rows=case.H // case.Hkv) > 1
    _check_cuda_step(case, f"test_decode::cuda::{name}::{k}")
