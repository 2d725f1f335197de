"""Direct checks of the CUDA forward kernel (jax_dmattn._cuda_fwd), independent of the public API plumbing.

* a grid of shapes / dtypes / head dims / bias and mask broadcasts / GQA / causal / softcap against the
  pure-jnp reference on float32-upcast inputs;
* both mask pre-passes: the live-key lists (default) and the tile-class map, each against numpy, and
  bitwise-identical results with and without tile skipping;
* long sequences (up to 32K) against a tiled float32 reference that never builds the [Lq, Lk] scores.

GPU only (skipped elsewhere).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import cuda_kernel_marks, rel_err_same_infinities as rel_err
from jax_dmattn import reference


pytestmark = cuda_kernel_marks("dmattn_fwd_cuda")

F32 = jnp.float32


TOL = {jnp.bfloat16: 1e-2, jnp.float16: 3e-3}


def make_operand(key, shape, kind):
    if kind == "bias_bf16":
        return jax.random.normal(key, shape, F32).astype(jnp.bfloat16)
    if kind == "bias_f16":
        return jax.random.normal(key, shape, F32).astype(jnp.float16)
    if kind == "bias_f32":
        return jax.random.normal(key, shape, F32)
    if kind == "mask":
        return jax.random.bernoulli(key, 0.6, shape)
    raise ValueError(kind)


def run_kernel(q, k, v, bias, mask, *, scale, softcap=0.0, is_causal=False, skip=True, tiles=False,
               key_lists=True, capacity=None):
    from jax_dmattn import _cuda_fwd

    fn = functools.partial(_cuda_fwd.flash_fwd_with_tiles, scale=scale, softcap=softcap, is_causal=is_causal,
                           skip_empty_tiles=skip, key_lists=key_lists, key_list_capacity=capacity)
    out = jax.jit(fn)(q, k, v, bias, mask)
    return out if tiles else out[:2]


def run_reference(q, k, v, bias, mask, *, scale, softcap=0.0, is_causal=False):
    f = lambda x: None if x is None else (x.astype(F32) if x.dtype != jnp.bool_ else x)
    out, lse = reference.reference_core(q.astype(F32), k.astype(F32), v.astype(F32), f(bias), f(mask),
                                        scale=scale, is_causal=is_causal, softcap=softcap or None)
    return out, lse


# (B, Lq, Lk, H, Hkv, D, dtype, causal, softcap, bias (shape code, kind), mask shape code)
# shape codes: letters per dim, "B"/"H"/"K"(Hkv)/"M"(Lq)/"N"(Lk) = full, "1" = broadcast.
CASES = [
    (2, 256, 256, 4, 2, 128, jnp.bfloat16, False, 0.0, ("BKMN", "bias_bf16"), "BKMN"),
    (2, 256, 256, 4, 2, 128, jnp.bfloat16, True, 0.0, ("BK1N", "bias_bf16"), "BKMN"),
    (1, 77, 203, 4, 1, 64, jnp.float16, True, 0.0, ("1HMN", "bias_f32"), "11MN"),
    (1, 300, 129, 2, 2, 32, jnp.bfloat16, True, 0.0, None, "BHMN"),
    (1, 129, 300, 6, 3, 96, jnp.float16, False, 0.0, ("BKM1", "bias_f16"), None),
    (2, 190, 190, 2, 1, 192, jnp.bfloat16, True, 0.0, ("B11N", "bias_f32"), "B11N"),
    (1, 250, 333, 2, 2, 256, jnp.float16, True, 0.0, ("BHMN", "bias_bf16"), "1KMN"),
    (1, 128, 512, 4, 4, 64, jnp.bfloat16, False, 30.0, ("BK1N", "bias_bf16"), None),
    (1, 64, 64, 2, 1, 128, jnp.float16, False, 5.0, None, None),
    (3, 513, 1029, 4, 2, 128, jnp.bfloat16, True, 0.0, ("BK1N", "bias_bf16"), "BKMN"),
    (1, 1000, 17, 2, 1, 64, jnp.bfloat16, True, 0.0, None, "BKMN"),  # Lq > Lk: top rows empty
    (1, 200, 200, 8, 2, 256, jnp.bfloat16, False, 0.0, ("1KMN", "bias_f32"), "BK1N"),
    (1, 333, 333, 2, 2, 32, jnp.float16, False, 0.0, ("BHMN", "bias_f16"), "BHMN"),
    (2, 64, 320, 4, 2, 96, jnp.bfloat16, True, 0.0, ("BK1N", "bias_bf16"), "BKMN"),
    (1, 144, 144, 4, 4, 192, jnp.float16, True, 0.0, None, None),
    # per-query-head bias and mask with H != Hkv (class-map head index h / (H / Hm))
    (2, 200, 260, 4, 2, 64, jnp.bfloat16, True, 0.0, ("BHMN", "bias_bf16"), "BHMN"),
    (1, 130, 700, 8, 2, 128, jnp.bfloat16, False, 0.0, ("BH1N", "bias_f32"), "BH1N"),
]


def _dims(code, b, lq, lk, h, hkv):
    m = {"B": b, "H": h, "K": hkv, "M": lq, "N": lk, "1": 1}
    return tuple(m[c] for c in code)


@pytest.mark.parametrize("key_lists", [True, False], ids=["lists", "tiles"])
@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_kernel_matches_reference(case, key_lists):
    b, lq, lk, h, hkv, d, dtype, causal, softcap, bias_spec, mask_code = case
    keys = jax.random.split(jax.random.PRNGKey(hash(case[:6]) % 2**31), 5)
    q = jax.random.normal(keys[0], (b, lq, h, d), F32).astype(dtype)
    k = jax.random.normal(keys[1], (b, lk, hkv, d), F32).astype(dtype)
    v = jax.random.normal(keys[2], (b, lk, hkv, d), F32).astype(dtype)
    bias = None if bias_spec is None else make_operand(keys[3], _dims(bias_spec[0], b, lq, lk, h, hkv), bias_spec[1])
    mask = None if mask_code is None else make_operand(keys[4], _dims(mask_code, b, lq, lk, h, hkv), "mask")
    scale = d ** -0.5
    out, lse = run_kernel(q, k, v, bias, mask, scale=scale, softcap=softcap, is_causal=causal, key_lists=key_lists)
    ref_out, ref_lse = run_reference(q, k, v, bias, mask, scale=scale, softcap=softcap, is_causal=causal)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (b, h, lq) and lse.dtype == F32
    assert not np.isnan(np.asarray(out, np.float32)).any()
    assert rel_err(out, ref_out) < TOL[dtype]
    assert rel_err(lse, ref_lse) < 1e-3


@pytest.mark.parametrize("key_lists", [True, False], ids=["lists", "tiles"])
def test_empty_rows_give_zero_and_neg_inf(key_lists):
    b, l, h, d = 1, 200, 2, 64
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    q, k, v = (jax.random.normal(kk, (b, l, h, d), F32).astype(jnp.bfloat16) for kk in keys[:3])
    mask = jax.random.bernoulli(keys[3], 0.5, (b, h, l, l))
    mask = mask.at[:, :, 10:150].set(False)  # whole query tiles and parts of tiles empty
    out, lse = run_kernel(q, k, v, None, mask, scale=0.125, key_lists=key_lists)
    out = np.asarray(out, np.float32)
    lse = np.asarray(lse)
    assert (out[:, 10:150] == 0).all()
    assert np.isneginf(lse[:, :, 10:150]).all()
    assert np.isfinite(lse[:, :, :10]).all() and np.isfinite(out).all()
    ref_out, ref_lse = run_reference(q, k, v, None, mask, scale=0.125)
    assert rel_err(out, ref_out) < 1e-2 and rel_err(lse, ref_lse) < 1e-3


def test_inside_scan_matches_single_calls():
    """The FFI call inside a loop (XLA may put it in a command buffer / CUDA graph) gives the same bits."""
    from jax_dmattn import _cuda_fwd

    b, l, h, hkv, d = 1, 384, 4, 2, 64
    keys = jax.random.split(jax.random.PRNGKey(3), 5)
    qs = jax.random.normal(keys[0], (3, b, l, h, d), F32).astype(jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, l, hkv, d), F32).astype(jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, l, hkv, d), F32).astype(jnp.bfloat16)
    bias = jax.random.normal(keys[3], (b, hkv, 1, l), F32).astype(jnp.bfloat16)
    mask = block_sparse_mask(keys[4], b, hkv, l, l, 0.5)
    f = functools.partial(_cuda_fwd.flash_fwd, scale=0.125, softcap=0.0, is_causal=True)

    @jax.jit
    def looped(qs):
        return jax.lax.scan(lambda c, q: (c, f(q, k, v, bias, mask)), 0, qs)[1]

    outs, lses = looped(qs)
    for i in range(3):
        o, lse = jax.jit(f)(qs[i], k, v, bias, mask)
        assert np.array_equal(np.asarray(outs[i]).view(np.uint16), np.asarray(o).view(np.uint16))
        assert np.array_equal(np.asarray(lses[i]).view(np.uint32), np.asarray(lse).view(np.uint32))


def block_sparse_mask(key, b, hm, lq, lk, density, bm=128, bn=64, partial_frac=0.3):
    """Whole tiles kept at `density`, a share of the kept ones made partial by element noise."""
    k1, k2, k3 = jax.random.split(key, 3)
    mt, nt = -(-lq // bm), -(-lk // bn)
    keep = jax.random.bernoulli(k1, density, (b, hm, mt, nt))
    partial = jax.random.bernoulli(k2, partial_frac, (b, hm, mt, nt))
    full = jnp.repeat(jnp.repeat(keep, bm, axis=2), bn, axis=3)[:, :, :lq, :lk]
    part = jnp.repeat(jnp.repeat(partial, bm, axis=2), bn, axis=3)[:, :, :lq, :lk]
    noise = jax.random.bernoulli(k3, 0.5, (b, hm, lq, lk))
    return jnp.where(part, full & noise, full)


def numpy_classes(mask, bm=128, bn=64):
    m = np.asarray(mask)
    b, h, lq, lk = m.shape
    mt, nt = -(-lq // bm), -(-lk // bn)
    out = np.zeros((b, h, mt, nt), np.uint8)
    for i in range(mt):
        for j in range(nt):
            t = m[:, :, i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            out[:, :, i, j] = np.where(~t.any((2, 3)), 0, np.where(t.all((2, 3)), 2, 1))
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_skipping_is_bitwise_identical(causal, d):
    b, lq, lk, h, hkv = 2, 1000, 1300, 4, 2
    keys = jax.random.split(jax.random.PRNGKey(7 + d + causal), 5)
    q = jax.random.normal(keys[0], (b, lq, h, d), F32).astype(jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, lk, hkv, d), F32).astype(jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, lk, hkv, d), F32).astype(jnp.bfloat16)
    bias = jax.random.normal(keys[3], (b, hkv, 1, lk), F32).astype(jnp.bfloat16)
    mask = block_sparse_mask(keys[4], b, hkv, lq, lk, 0.3)
    o1, l1, c1, *_ = run_kernel(q, k, v, bias, mask, scale=d ** -0.5, is_causal=causal, skip=True, tiles=True,
                                key_lists=False)
    o2, l2, *_ = run_kernel(q, k, v, bias, mask, scale=d ** -0.5, is_causal=causal, skip=False, tiles=True,
                            key_lists=False)
    np.testing.assert_array_equal(np.asarray(c1), numpy_classes(mask))
    assert (np.asarray(c1) == 0).mean() > 0.3  # the test really skips tiles
    assert np.array_equal(np.asarray(o1).view(np.uint16), np.asarray(o2).view(np.uint16))
    assert np.array_equal(np.asarray(l1).view(np.uint32), np.asarray(l2).view(np.uint32))
    ref_out, ref_lse = run_reference(q, k, v, bias, mask, scale=d ** -0.5, is_causal=causal)
    assert rel_err(o1, ref_out) < 1e-2 and rel_err(l1, ref_lse) < 1e-3


def numpy_key_lists(mask, *, is_causal, q_len, capacity, bm=128, chunk=64):
    """The live-key lists and bit words of csrc/cuda/key_lists.h, computed with numpy (a unit with more live
    keys than `capacity` is dense: count -1, nothing else written)."""
    m = np.asarray(mask)
    b, h, rows, cols = m.shape
    mt = -(-rows // bm)
    rpu = min(rows, bm)
    keys = np.zeros((b, h, mt, 1 + capacity), np.int32)
    bits = np.zeros((b, h, mt, capacity // chunk, rpu), np.uint64)
    for t in range(mt):
        blk = m[:, :, t * bm:(t + 1) * bm]
        live = blk.any(2)
        if is_causal and rows == q_len:
            live[..., max(0, min(rows, (t + 1) * bm) - 1 + cols - q_len + 1):] = False
        for bi in range(b):
            for hi in range(h):
                idx = np.nonzero(live[bi, hi])[0]
                if idx.size > capacity:
                    keys[bi, hi, t, 0] = -1
                    continue
                keys[bi, hi, t, 0] = idx.size
                keys[bi, hi, t, 1:1 + idx.size] = idx
                for c in range(-(-idx.size // chunk)):
                    sel = idx[c * chunk:(c + 1) * chunk]
                    w = blk[bi, hi][:, sel].astype(np.uint64) << np.arange(sel.size, dtype=np.uint64)
                    bits[bi, hi, t, c, :blk.shape[2]] = np.bitwise_or.reduce(w, axis=1) if sel.size else 0
    return keys, bits


@pytest.mark.parametrize("capacity", [None, 256, 8192])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 2, 300, 300), (1, 1, 1, 517), (1, 2, 130, 200), (1, 1, 400, 256),
                                   (1, 2, 200, 8208), (1, 1, 130, 5000), (1, 2, 3, 40000), (1, 1, 1, 20000)])
def test_key_lists_match_numpy(shape, causal, capacity):
    """The pre-pass's lists and bit words, read back from the workspace outputs, entry by entry (capacity 256:
    the units of ~270 live keys of the 300-key masks overflow and must be marked dense). The 8208- and 5000-key
    masks (16-byte rows and not) keep ~92% of their keys per 128-row unit: under capacity 8192 a unit lists more
    keys than one pass of the pre-pass's CTA examines (4096), and under the default capacity (4096) it overflows
    after the first pass. Units of at most 8 rows (the 3- and 1-row masks) take 4 mask words a thread and pass
    (16384 keys): 40000 and 20000 keys need three and two passes, the last one ending inside a thread's 64 keys."""
    from jax_dmattn import _cuda_fwd

    b, hm, rows, lk = shape
    lq = rows if rows > 1 else 97
    keys = jax.random.split(jax.random.PRNGKey(rows + lk + causal), 4)
    q = jax.random.normal(keys[0], (b, lq, 2, 64), F32).astype(jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, lk, 2, 64), F32).astype(jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, lk, 2, 64), F32).astype(jnp.bfloat16)
    mask = jax.random.bernoulli(keys[3], 0.02, (b, hm, rows, lk))  # sparse: most keys dead in a tile
    out, lse, cls, klist, kbits = run_kernel(q, k, v, None, mask, scale=0.125, is_causal=causal, tiles=True,
                                             capacity=capacity)
    assert cls.size == 0 and klist.size > 0
    cap = _cuda_fwd.key_list_capacity(lk, capacity)  # a capacity past the keys is cut to them
    exp_keys, exp_bits = numpy_key_lists(mask, is_causal=causal, q_len=lq, capacity=cap)
    got_keys = np.asarray(klist).reshape(exp_keys.shape)
    got_bits = np.asarray(kbits).view(np.uint64).reshape(exp_bits.shape)
    for idx in np.ndindex(exp_keys.shape[:3]):
        n = exp_keys[idx][0]
        assert got_keys[idx][0] == n
        if n < 0:
            continue
        np.testing.assert_array_equal(got_keys[idx][1:1 + n], exp_keys[idx][1:1 + n])
        nch = -(-n // 64)
        np.testing.assert_array_equal(got_bits[idx][:nch], exp_bits[idx][:nch])
    ref_out, ref_lse = run_reference(q, k, v, None, mask, scale=0.125, is_causal=causal)
    assert rel_err(out, ref_out) < 1e-2 and rel_err(lse, ref_lse) < 1e-3


@pytest.mark.parametrize("shape,parts,causal,density,capacity", [
    ((2, 2, 1, 40000), 4, False, 0.02, None),   # a decoding step's parts: 10000 keys each, 16-byte words
    ((1, 2, 3, 20000), 5, False, 0.1, None),    # several rows a unit
    ((1, 1, 1, 4100), 2, False, 0.3, None),     # 2050-key parts: no 16-byte words
    ((1, 1, 130, 1024), 4, True, 0.05, None),   # causal cut inside the parts (rows == q_len)
    ((1, 2, 2, 8192), 2, False, 0.5, 256),      # parts past the capacity: dense
])
def test_key_list_parts_match_numpy(shape, parts, causal, density, capacity):
    """The pre-pass with the key dim in parts (csrc/cuda/key_lists.h): unit (bm, hm * parts + p) lists part p's live
    keys by their positions in the whole key dim, as numpy lists the part's slice of the mask."""
    from jax_dmattn import _cuda_fwd

    b, hm, rows, lk = shape
    pc = lk // parts
    cap = _cuda_fwd.key_list_capacity(pc, max_keys=lk) if capacity is None else capacity
    mask = np.asarray(jax.random.bernoulli(jax.random.PRNGKey(lk + parts), density, shape))
    got_keys, got_bits = jax.jit(lambda m: _cuda_fwd.build_key_lists(m, q_len=rows, is_causal=causal, capacity=cap,
                                                                      parts=parts))(jnp.asarray(mask))
    mt = -(-rows // 128)
    got_keys = np.asarray(got_keys).reshape(b, hm, parts, mt, 1 + cap)
    got_bits = np.asarray(got_bits).view(np.uint64).reshape(b, hm, parts, mt, cap // 64, min(rows, 128))
    for p in range(parts):
        part_mask = mask[..., p * pc:(p + 1) * pc].copy()
        if causal:  # keys past the bound of a unit's last row are not live in it (q_len = rows here)
            for t in range(mt):
                last = min(rows, (t + 1) * 128) - 1 + (lk - rows)
                part_mask[:, :, t * 128:(t + 1) * 128, max(0, last + 1 - p * pc):] = False
        exp_keys, exp_bits = numpy_key_lists(part_mask, is_causal=False, q_len=rows, capacity=cap)
        for idx in np.ndindex(exp_keys.shape[:3]):
            n = exp_keys[idx][0]
            got = got_keys[idx[:2] + (p,) + idx[2:]]
            assert got[0] == n, (p, idx)
            if n < 0:
                continue
            np.testing.assert_array_equal(got[1:1 + n], exp_keys[idx][1:1 + n] + p * pc)
            np.testing.assert_array_equal(got_bits[idx[:2] + (p,) + idx[2:]][:-(-n // 64)], exp_bits[idx][:-(-n // 64)])


def mixed_mask(rng, shape, window):
    """Query tiles (128 rows) alternate between `window` random keys shared by the tile's rows (each row keeps
    ~90% of them: a short list) and a random half-dense mask (all keys live: a dense unit under a small
    capacity)."""
    b, hm, lq, lk = shape
    m = rng.random(shape) < 0.5
    for t in range(0, -(-lq // 128), 2):
        rows = slice(t * 128, (t + 1) * 128)
        m[:, :, rows] = False
        for bi in range(b):
            for hi in range(hm):
                cols = rng.choice(lk, size=min(window, lk), replace=False)
                n = m[bi, hi, rows].shape[0]
                m[bi, hi, rows][:, cols] = rng.random((n, cols.size)) < 0.9
    return jnp.asarray(m)


@pytest.mark.parametrize("case", [
    # (B, Lq, Lk, H, Hkv, D, dtype, causal, bias code, mask code, capacity): Lk % 16 == 0 takes the 16-byte
    # mask loads of a dense unit, other lengths the byte loads.
    (1, 520, 512, 4, 2, 128, jnp.bfloat16, True, "BK1N", "BKMN", 64),
    (2, 300, 333, 4, 1, 64, jnp.float16, False, "BHMN", "BKMN", 128),
    (1, 400, 700, 2, 2, 256, jnp.bfloat16, True, None, "BHMN", 64),
    (1, 256, 1024, 6, 3, 96, jnp.float16, False, "1KMN", "1KMN", 192),
    (1, 384, 384, 4, 2, 32, jnp.bfloat16, True, "BK1N", "BK1N", 64),   # row-broadcast mask: one unit
    (1, 390, 390, 2, 1, 192, jnp.bfloat16, True, "BK1N", "BKMN", 64),
])
def test_dense_units_match_reference(case):
    """Units whose live keys exceed the list capacity walk every key and read the mask themselves; on a mask
    that mixes list units and dense units the output matches the reference and the tile path."""
    from jax_dmattn import _cuda_fwd

    b, lq, lk, h, hkv, d, dtype, causal, bias_code, mask_code, capacity = case
    rng = np.random.default_rng(lq + lk + d)
    keys = jax.random.split(jax.random.PRNGKey(lq * 3 + lk), 4)
    q = jax.random.normal(keys[0], (b, lq, h, d), F32).astype(dtype)
    k = jax.random.normal(keys[1], (b, lk, hkv, d), F32).astype(dtype)
    v = jax.random.normal(keys[2], (b, lk, hkv, d), F32).astype(dtype)
    bias = None if bias_code is None else make_operand(keys[3], _dims(bias_code, b, lq, lk, h, hkv), "bias_f32")
    mshape = _dims(mask_code, b, lq, lk, h, hkv)
    mask = mixed_mask(rng, mshape, 40) if mshape[2] > 1 else jnp.asarray(rng.random(mshape) < 0.5)
    out, lse, _, klist, _ = run_kernel(q, k, v, bias, mask, scale=d ** -0.5, is_causal=causal, tiles=True,
                                       capacity=capacity)
    counts = np.asarray(klist).reshape(-1, 1 + capacity)[:, 0]
    assert (counts == -1).any(), "no dense unit: the test does not cover the fallback"
    if mshape[2] > 1:
        assert (counts >= 0).any(), "no list unit"
    ref_out, ref_lse = run_reference(q, k, v, bias, mask, scale=d ** -0.5, is_causal=causal)
    assert not np.isnan(np.asarray(out, np.float32)).any()
    assert rel_err(out, ref_out) < TOL[dtype] and rel_err(lse, ref_lse) < 1e-3
    tiles_out, tiles_lse = run_kernel(q, k, v, bias, mask, scale=d ** -0.5, is_causal=causal, key_lists=False)
    assert rel_err(out, tiles_out) < TOL[dtype] and rel_err(lse, tiles_lse) < 1e-3
    # The default capacity lists every unit of these short masks: same result through the lists.
    assert _cuda_fwd.key_list_capacity(lk) >= lk
    list_out, _ = run_kernel(q, k, v, bias, mask, scale=d ** -0.5, is_causal=causal)
    assert rel_err(out, list_out) < TOL[dtype]


@pytest.mark.parametrize("case", [
    # (Lq, Lk, H, Hkv, D, window, causal, dtype)
    (1000, 1000, 4, 2, 128, 100, True, jnp.bfloat16),
    (777, 1500, 4, 1, 64, 64, True, jnp.float16),
    (1500, 700, 2, 2, 256, 200, True, jnp.bfloat16),
    (640, 640, 2, 1, 32, 33, False, jnp.bfloat16),
    (513, 2048, 6, 3, 96, 500, False, jnp.float16),
    (300, 300, 2, 2, 192, 1, True, jnp.bfloat16),
])
def test_key_lists_on_topk_masks(case):
    """Top-k masks (the case the lists are for): scattered keys, every tile partial, a few hundred live keys."""
    import jax_dmattn

    lq, lk, h, hkv, d, window, causal, dtype = case
    keys = jax.random.split(jax.random.PRNGKey(lq * 7 + lk), 4)
    q = jax.random.normal(keys[0], (1, lq, h, d), F32).astype(dtype)
    k = jax.random.normal(keys[1], (1, lk, hkv, d), F32).astype(dtype)
    v = jax.random.normal(keys[2], (1, lk, hkv, d), F32).astype(dtype)
    bias = (2.0 * jax.random.normal(keys[3], (1, hkv, 1, lk), F32)).astype(dtype)
    mask = jax_dmattn.topk_mask(bias, window, is_causal=causal, query_len=lq)
    if mask.shape[2] == 1:
        mask = jnp.broadcast_to(mask, (1, hkv, lq, lk))
    scale = d ** -0.5
    out, lse, cls, klist, _ = run_kernel(q, k, v, bias, mask, scale=scale, is_causal=causal, tiles=True)
    assert cls.size == 0 and klist.size > 0
    ref_out, ref_lse = run_reference(q, k, v, bias, mask, scale=scale, is_causal=causal)
    assert not np.isnan(np.asarray(out, np.float32)).any()
    assert rel_err(out, ref_out) < TOL[dtype] and rel_err(lse, ref_lse) < 1e-3
    tiles_out, tiles_lse = run_kernel(q, k, v, bias, mask, scale=scale, is_causal=causal, key_lists=False)
    assert rel_err(out, tiles_out) < TOL[dtype]


def tiled_reference(q, k, v, bias, mask, *, scale, is_causal, block=1024):
    """float32 flash-style reference: loops over key blocks, never builds [Lq, Lk] scores for all keys."""
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    assert lk % block == 0
    qf = q.astype(F32)
    kf = jnp.repeat(k.astype(F32), g, axis=2)
    vf = jnp.repeat(v.astype(F32), g, axis=2)

    def expand(x):  # [Bx, Hx, M, N] -> broadcastable to [B, H, M, N]
        if x.shape[1] not in (1, h):
            x = jnp.repeat(x, h // x.shape[1], axis=1)
        return x

    bias_e = None if bias is None else expand(bias)
    mask_e = None if mask is None else expand(mask)
    rows = jnp.arange(lq)[:, None]

    def body(i, carry):
        m, l, acc = carry
        j0 = i * block
        kb = jax.lax.dynamic_slice_in_dim(kf, j0, block, axis=1)
        vb = jax.lax.dynamic_slice_in_dim(vf, j0, block, axis=1)
        s = jnp.einsum("bqhd,bkhd->bhqk", qf, kb, precision=jax.lax.Precision.HIGHEST) * scale
        if bias_e is not None:
            bb = bias_e if bias_e.shape[3] == 1 else jax.lax.dynamic_slice_in_dim(bias_e, j0, block, axis=3)
            s = s + bb.astype(F32)
        keep = jnp.ones(s.shape, bool)
        if mask_e is not None:
            mb = mask_e if mask_e.shape[3] == 1 else jax.lax.dynamic_slice_in_dim(mask_e, j0, block, axis=3)
            keep = keep & mb
        if is_causal:
            keep = keep & ((j0 + jnp.arange(block))[None, :] <= rows + (lk - lq))
        s = jnp.where(keep, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_use = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_use[..., None])
        corr = jnp.exp(m - m_use)
        l = l * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("bhqk,bkhd->bhqd", p, vb, precision=jax.lax.Precision.HIGHEST)
        return m_new, l, acc

    init = (jnp.full((b, h, lq), -jnp.inf, F32), jnp.zeros((b, h, lq), F32), jnp.zeros((b, h, lq, d), F32))
    m, l, acc = jax.lax.fori_loop(0, lk // block, body, init)
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    lse = jnp.where(l > 0, jnp.log(jnp.where(l > 0, l, 1.0)) + jnp.where(jnp.isfinite(m), m, 0.0), -jnp.inf)
    return jnp.transpose(out, (0, 2, 1, 3)), lse


LONG_CASES = [
    # (L, H, Hkv, D, causal, bias kind, mask kind)
    (32768, 4, 2, 128, True, "per_key", "block_sparse"),
    (32768, 2, 1, 64, False, "per_key", None),
    (16384, 4, 2, 128, True, "per_key", "topk_causal"),
    (16384, 2, 1, 64, True, "full", "dense_random"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", LONG_CASES, ids=[f"L{c[0]}_D{c[3]}_{c[6]}" for c in LONG_CASES])
def test_long_sequences_against_tiled_reference(case):
    l, h, hkv, d, causal, bias_kind, mask_kind = case
    keys = jax.random.split(jax.random.PRNGKey(l + d), 6)
    q = jax.random.normal(keys[0], (1, l, h, d), F32).astype(jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, l, hkv, d), F32).astype(jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, l, hkv, d), F32).astype(jnp.bfloat16)
    if bias_kind == "per_key":
        bias = (2.0 * jax.random.normal(keys[3], (1, hkv, 1, l), F32)).astype(jnp.bfloat16)
    else:
        bias = jax.random.normal(keys[3], (1, hkv, l, l), F32).astype(jnp.bfloat16)
    if mask_kind == "block_sparse":
        mask = block_sparse_mask(keys[4], 1, hkv, l, l, 0.25)
    elif mask_kind == "dense_random":
        mask = jax.random.bernoulli(keys[4], 0.5, (1, hkv, l, l))
    elif mask_kind == "topk_causal":
        # Per-row top-1024 keys by the per-key bias among the causally visible keys (the paper's dynamic mask).
        bk = bias[:, :, 0, :].astype(F32)  # [1, Hkv, L]
        order = jnp.argsort(-bk, axis=-1)
        rank = jnp.argsort(order, axis=-1)  # rank of each key among all keys
        # Row i keeps the 1024 best-ranked keys among the visible j <= i.
        j = jnp.arange(l)

        @jax.jit
        def topk_mask(rank):
            def row(i):
                visible = j <= i
                r = jnp.where(visible[None, None, :], rank, l + 1)
                kth = jnp.sort(r, axis=-1)[..., min(1023, l - 1)]
                return (r <= kth[..., None]) & visible[None, None, :]

            return jax.lax.map(row, jnp.arange(l), batch_size=256).transpose(1, 2, 0, 3)

        mask = topk_mask(rank)
    else:
        mask = None
    scale = d ** -0.5
    out, lse = run_kernel(q, k, v, bias, mask, scale=scale, is_causal=causal)
    ref_out, ref_lse = tiled_reference(q, k, v, bias, mask, scale=scale, is_causal=causal)
    assert rel_err(out, ref_out) < 1e-2
    assert rel_err(lse, ref_lse) < 1e-3
