"""dmattn_topk_key_lists_cuda: the live-key lists (csrc/cuda/key_lists.h layout) of a top-k mask given by per-key
scores, built without any [Lq, Lk] array: causal (csrc/cuda/topk_key_lists.h, per 128-row query tile) and shared by
every row (csrc/cuda/topk_shared_key_lists.h, one list per (b, h), the radix select).

The lists and bit words are decoded into a dense [Bs, Hs, Lq, Lk] mask in numpy and compared, bit for bit, with
jax_dmattn.topk_mask of the scores broadcast over the query rows; each list must also be strictly ascending, fit
the capacity, and hold only keys that some row of its unit keeps. Scores: continuous, heavily tied (a few
distinct values: the index tie-break decides), and bf16-rounded (ties plus near-ties).

The decode reads only what the layout defines (list entries < count, bit words of the chunks < ceil(count / 64)),
so nothing the kernel leaves unwritten can reach a comparison. GPU only (skipped elsewhere).
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import cuda_kernel_marks  # noqa: E402

import jax_dmattn  # noqa: E402
from jax_dmattn import _ffi  # noqa: E402

TARGET = "dmattn_topk_key_lists_cuda"
pytestmark = cuda_kernel_marks(TARGET)

BLOCK_M, CHUNK = _ffi.kernel_facts()["key_list_block_m"], _ffi.kernel_facts()["key_list_chunk"]


def roundup64(n: int) -> int:
    return -(-n // CHUNK) * CHUNK


def capacity_for(k: int, kv_len: int) -> int:
    """The capacity the caller passes: k keys below a unit's diagonal plus up to 127 on it, at most every key."""
    return min(roundup64(k + BLOCK_M - 1), roundup64(kv_len))


def key_order(scores):
    """Per (b, h), the key indices by (score desc, index asc): lax.sort is stable, so equal scores keep iota's
    ascending order."""
    iota = lax.broadcasted_iota(jnp.int32, scores.shape, 2)
    return lax.sort((-scores, iota), dimension=2, is_stable=True, num_keys=1)[1]


def call(scores, order, *, k: int, q_len: int, capacity: int, is_causal: bool = True):
    bs, hs, _ = scores.shape
    rows = q_len if is_causal else 1
    units = bs * hs * -(-rows // BLOCK_M)
    out_types = (jax.ShapeDtypeStruct((units * (1 + capacity),), jnp.int32),
                 jax.ShapeDtypeStruct((2 * units * (capacity // CHUNK) * min(rows, BLOCK_M),), jnp.uint32))
    return jax.ffi.ffi_call(TARGET, out_types)(scores, order, k=np.int64(k), is_causal=np.bool_(is_causal),
                                               q_len=np.int64(q_len), capacity=np.int64(capacity))


def decode(keys, bits, *, bs: int, hs: int, q_len: int, kv_len: int, capacity: int, k: int):
    """The dense [Bs, Hs, Lq, Lk] mask the lists describe, checking the layout's invariants on the way."""
    m_tiles = -(-q_len // BLOCK_M)
    rows_per_unit = min(q_len, BLOCK_M)
    keys = np.asarray(keys).reshape(bs * hs * m_tiles, 1 + capacity)
    words = np.asarray(bits).view(np.uint64).reshape(bs * hs * m_tiles, capacity // CHUNK, rows_per_unit)
    dense = np.zeros((bs, hs, q_len, kv_len), bool)
    shifts = np.arange(CHUNK, dtype=np.uint64)
    for unit in range(keys.shape[0]):
        bh, t = divmod(unit, m_tiles)
        b, h = divmod(bh, hs)
        rows = min(BLOCK_M, q_len - t * BLOCK_M)
        count = int(keys[unit, 0])
        assert 0 <= count <= capacity, (unit, count)
        # A unit lists at most k keys left of its diagonal and rows_per_unit - 1 on it (the capacity's reason).
        assert count <= min(k + rows_per_unit - 1, kv_len), (unit, count)
        listed = keys[unit, 1:1 + count]
        assert np.all((listed >= 0) & (listed < kv_len)), unit
        assert np.all(np.diff(listed) > 0), f"unit {unit}: list not strictly ascending"
        chunks = -(-count // CHUNK)
        w = words[unit, :chunks]  # [chunks, rows_per_unit]: only the chunks the list reaches are defined
        unpacked = ((w[:, :, None] >> shifts) & np.uint64(1)).astype(bool)  # [chunks, rows_per_unit, 64]
        unpacked = unpacked.transpose(1, 0, 2).reshape(rows_per_unit, chunks * CHUNK)
        assert not unpacked[:, count:].any(), f"unit {unit}: bits set past the list's count"
        assert not unpacked[rows:].any(), f"unit {unit}: bits set for rows past Lq"
        kept = unpacked[:rows, :count]
        assert kept.any(axis=0).all(), f"unit {unit}: a listed key no row keeps"
        dense[b, h, t * BLOCK_M:t * BLOCK_M + rows][:, listed] = kept
    return dense


def make_scores(rng, shape, kind: str) -> np.ndarray:
    if kind == "normal":
        s = rng.standard_normal(shape).astype(np.float32)
    elif kind == "ties":  # a few distinct values: most of the ranking is the index tie-break
        s = rng.choice(np.array([-1.5, 0.0, 0.25, 2.0], np.float32), size=shape)
    elif kind == "bf16":
        s = np.asarray(jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))
    elif kind == "lowest":  # canonical NaN / -inf (the lowest finite float32) beside negatives and positives
        s = rng.standard_normal(shape).astype(np.float32)
        s[..., ::3] = np.finfo(np.float32).min
    elif kind == "raw":  # not canonical (the shared builder ranks NaN and -inf lowest, -0.0 as 0.0): returned as is
        s = rng.standard_normal(shape).astype(np.float32)
        s[..., ::5] = np.nan
        s[..., 1::7] = -np.inf
        s[..., 2::11] = -0.0
        s[..., 3::13] = 0.0
        s[..., 4::97] = np.inf
        return s
    else:
        raise ValueError(kind)
    return np.where(s == 0, np.float32(0), s).astype(np.float32)  # canonical: no -0.0


def check(rng, bs, hs, q_len, kv_len, k, kind):
    scores = jnp.asarray(make_scores(rng, (bs, hs, kv_len), kind))
    order = key_order(scores)
    capacity = capacity_for(k, kv_len)
    keys, bits = call(scores, order, k=k, q_len=q_len, capacity=capacity)
    got = decode(keys, bits, bs=bs, hs=hs, q_len=q_len, kv_len=kv_len, capacity=capacity, k=k)
    assert_same_mask(got, np.asarray(jax_dmattn.topk_mask(scores[:, :, None, :], k, is_causal=True, query_len=q_len)))


def assert_same_mask(got, want):
    assert want.shape == got.shape
    if not np.array_equal(got, want):
        diff = np.argwhere(got != want)
        raise AssertionError(f"{len(diff)} entries differ, first [b, h, i, j] = {diff[:5].tolist()} "
                             f"(got {got[tuple(diff[0])]}, want {want[tuple(diff[0])]})")


# (Bs, Hs, Lq, Lk): Lq == Lk, Lq < Lk and Lq > Lk (off < 0: the first rows see nothing), partial last tiles.
SQUARE = [(1, 1, 64, 64), (2, 1, 127, 127), (1, 3, 128, 128), (3, 2, 300, 300), (2, 2, 1000, 1000)]
# Lk = 10000 with Lq = 300: A's index range [0, p] outgrows a bitmap of 32 k bits, so A is bitonic-sorted.
RECT = [(1, 2, 1, 500), (2, 1, 200, 1000), (1, 1, 129, 700), (3, 1, 300, 100), (1, 2, 1000, 257), (2, 3, 130, 65),
        (1, 1, 300, 10000)]
KINDS = ["normal", "ties", "bf16"]


def cases():
    out = []
    for n, (bs, hs, lq, lk) in enumerate(SQUARE + RECT):
        for m, k in enumerate((1, 7, 64, 200)):
            if k < lk:
                kind = KINDS[(n + m) % len(KINDS)]
                out.append(pytest.param(bs, hs, lq, lk, k, kind, id=f"b{bs}h{hs}-q{lq}-k{lk}-top{k}-{kind}"))
    return out


@pytest.mark.parametrize("bs,hs,q_len,kv_len,k,kind", cases())
def test_lists_match_topk_mask(rng, bs, hs, q_len, kv_len, k, kind):
    check(rng, bs, hs, q_len, kv_len, k, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_every_score_kind(rng, kind):
    check(rng, 2, 2, 300, 300, 7, kind)


@pytest.mark.parametrize("q_len,kv_len", [(8400, 8400), (300, 10000)], ids=["square", "short_queries"])
def test_large_k(rng, q_len, kv_len):
    # k = 8192 needs ~75 KiB of shared memory per CTA (opt-in above 48 KiB).
    check(rng, 1, 1, q_len, kv_len, 8192, "ties")


def test_order_is_score_desc_index_asc(rng):
    s = make_scores(rng, (2, 3, 500), "ties")
    order = np.asarray(key_order(jnp.asarray(s)))
    for b in range(2):
        for h in range(3):
            np.testing.assert_array_equal(order[b, h], np.lexsort((np.arange(500), -s[b, h])))


def test_empty_query_len():
    scores = jnp.zeros((2, 2, 100), jnp.float32)
    keys, bits = call(scores, key_order(scores), k=5, q_len=0, capacity=capacity_for(5, 100))
    assert keys.size == 0 and bits.size == 0


@pytest.mark.parametrize("k,capacity,match", [(60, 64, "cannot hold"), (100, 192, "k = 100"), (0, 64, "k = 0"),
                                              (5, 96, "multiple of 64")])
def test_bad_sizes_are_rejected(k, capacity, match):
    scores = jnp.zeros((1, 1, 100), jnp.float32)
    with pytest.raises(Exception, match=match):
        jax.block_until_ready(call(scores, key_order(scores), k=k, q_len=50, capacity=capacity))


# ------------------------------------------------------------------------------------------ shared lists
def check_shared(rng, bs, hs, kv_len, k, kind, scores=None):
    """The non-causal call: one list per (b, h) holding exactly the k best keys, ascending, the first k bits set."""
    if scores is None:
        scores = make_scores(rng, (bs, hs, kv_len), kind)
    capacity = roundup64(k)
    keys, bits = call(jnp.asarray(scores), jnp.zeros((0,), jnp.int32), k=k, q_len=1, capacity=capacity,
                      is_causal=False)
    got = decode(keys, bits, bs=bs, hs=hs, q_len=1, kv_len=kv_len, capacity=capacity, k=k)
    assert_same_mask(got, np.asarray(jax_dmattn.topk_mask(jnp.asarray(scores)[:, :, None, :], k)))
    listed = np.asarray(keys).reshape(bs * hs, 1 + capacity)
    assert np.all(listed[:, 0] == k)
    assert np.all(listed[:, 1 + k:] == 0), "list entries past k must be zero"


# Lk: below one step of the streaming kernel (4096 keys), not a multiple of 4 (scalar loads), several steps; rows that
# the resident kernel reads with one CTA (up to 32K keys: 20001), a cluster of 2 (40000; 64K, and 64 rows of 64K are a
# decoding step's lists), 4 (100000) and 8 (150000; 300000 at 40 keys a thread) on sm_90; 136 rows, more than an
# H100 / H200 has multiprocessors; 200 rows of 60000 keys (teams of 2, several waves). 1M keys a row outgrow the
# resident slices: the streaming kernel.
SHARED = [(2, 3, 100, 1), (1, 2, 257, 64), (3, 1, 1001, 200), (2, 2, 8192, 2048), (1, 3, 20001, 777),
          (2, 2, 65536, 2048), (1, 1, 65536, 65535), (1, 2, 1 << 20, 2048), (1, 2, 40000, 3000),
          (17, 8, 16384, 1000), (8, 8, 65536, 2048), (25, 8, 60000, 1500), (1, 2, 100000, 3000),
          (1, 2, 150000, 3000), (1, 1, 300000, 5000)]


@pytest.mark.parametrize("kind", KINDS + ["lowest", "raw"])
@pytest.mark.parametrize("bs,hs,kv_len,k", SHARED, ids=[f"b{b}h{h}-k{lk}-top{k}" for b, h, lk, k in SHARED])
def test_shared_lists_match_topk_mask(rng, bs, hs, kv_len, k, kind):
    check_shared(rng, bs, hs, kv_len, k, kind)


@pytest.mark.parametrize("rows,kv_len,k", [(2, 3000, 1000), (2, 40000, 3000), (150, 60000, 5000), (2, 300000, 9000),
                                           (2, 1 << 20, 70000)],
                         ids=["one_cta", "team2_40k", "team2_waves", "team8", "team8_streaming"])
def test_shared_lists_all_tied(rng, rows, kv_len, k):
    # One value everywhere: the k lowest indices, decided by the tie-break alone; in a team, every member's keys
    # equal T, and only the first members' are kept.
    check_shared(rng, rows, 1, kv_len, k, "normal", scores=np.full((rows, 1, kv_len), 0.5, np.float32))


# 16-bit keys: the teams of float32 scores up to 256K keys (at most 32 keys a thread), then up to 64 a thread in
# teams of 8 (300000; 512K, the longest resident row), streaming past 512K.
SHARED_16BIT = [(2, 3, 100, 1), (3, 1, 1001, 200), (1, 3, 20001, 777), (8, 8, 65536, 2048), (25, 8, 60000, 1500),
                (1, 2, 100000, 3000), (1, 1, 300000, 5000), (1, 2, 1 << 19, 2048), (1, 1, (1 << 19) + 12, 4000),
                (1, 2, 1 << 20, 2048)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("kind", ["normal", "raw"])
@pytest.mark.parametrize("bs,hs,kv_len,k", SHARED_16BIT, ids=[f"b{b}h{h}-k{lk}-top{k}" for b, h, lk, k in SHARED_16BIT])
def test_shared_lists_of_16bit_scores(rng, bs, hs, kv_len, k, kind, dtype):
    # 16-bit scores are read as they are (4 a vector load of 8 bytes, or one at a time where Lk % 4 != 0) and rank as
    # their float32 values: rounding makes ties, which the index tie-break decides.
    scores = np.asarray(jnp.asarray(make_scores(rng, (bs, hs, kv_len), kind)).astype(dtype))
    check_shared(rng, bs, hs, kv_len, k, kind, scores=scores)


@pytest.mark.parametrize("rows,kv_len,k", [(2, 3000, 1000), (2, 1 << 19, 9000), (2, 1 << 20, 70000)],
                         ids=["one_cta", "team8", "team8_streaming"])
def test_shared_lists_of_16bit_scores_all_tied(rng, rows, kv_len, k):
    check_shared(rng, rows, 1, kv_len, k, "normal", scores=np.asarray(jnp.full((rows, 1, kv_len), 0.5, jnp.bfloat16)))


def test_causal_lists_reject_16bit_scores():
    scores = jnp.zeros((1, 1, 100), jnp.bfloat16)
    order = key_order(scores.astype(jnp.float32))
    with pytest.raises(Exception, match="f32 scores"):
        jax.block_until_ready(call(scores, order, k=5, q_len=50, capacity=192))


def test_shared_lists_reject_an_order():
    scores = jnp.zeros((1, 1, 100), jnp.float32)
    with pytest.raises(Exception, match="zero-size"):
        jax.block_until_ready(call(scores, key_order(scores), k=5, q_len=1, capacity=64, is_causal=False))
