"""The Hopper key-list forward (csrc/cuda/sm90/flash_fwd_key_list_sm90_kernel.cuh): masked calls on a
compute-capability-9.0 GPU.

Every case runs through the default route (the Hopper key-list forward serves every call on the key-list path with
D in 64 / 128 / 256) and with the sm80 kernels forced (JAX_DMATTN_CUDA_KERNELS=sm80), against the float32 reference;
each route must reach the kernel it names (the launch counter moves or not). Masks: random, per-row top-k, block
structured, a padding mask broadcast over rows (one bit word per chunk), rows and whole units with no kept key, dense
units (a capacity below the unit's live keys, so the kernel reads the mask itself), plus the compact masks through
the public API. Where the mask has a row per query row, 16-byte aligned, the Hopper forward without a mask computes the tile units
(dense units and lists of most visible keys: key_lists.h, key_list_unit_on_tiles) beside the key-list kernel, and its
launch counter must move too; cases mix both kinds of unit. Also GQA, Lq != Lk both ways, odd lengths, softcap, per-key and full biases of every dtype, both
dtypes, an inf / NaN in V that must reach exactly the rows that keep its key, and gradients through the public API
(the backward reads this forward's lse).

GPU only (skipped elsewhere).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import cuda_kernel_marks, hopper_kernels_available, rel_err_same_infinities as rel_err, sm90_launches
from jax_dmattn import reference

pytestmark = cuda_kernel_marks("dmattn_fwd_cuda")

F32 = jnp.float32
TOL = {jnp.dtype(jnp.bfloat16): 1e-2, jnp.dtype(jnp.float16): 3e-3}  # looked up by jnp.dtype(...)
HOPPER_DIMS = (64, 128, 256)


def mask_of(rng, kind, b, hm, lq, lk):
    if kind == "random":
        return rng.random((b, hm, lq, lk)) < 0.3
    if kind == "topk":  # each row keeps the 40 keys of largest random score: scattered, nearly shared per tile
        s = rng.standard_normal((b, hm, 1, lk)) + 0.05 * rng.standard_normal((b, hm, lq, lk))
        kth = np.sort(s, axis=-1)[..., -min(40, lk)][..., None]
        return s >= kth
    if kind == "blocks":  # whole 128 x 64 blocks kept at density 1/3
        blocks = rng.random((b, hm, -(-lq // 128), -(-lk // 64))) < 1 / 3
        return np.repeat(np.repeat(blocks, 128, axis=2), 64, axis=3)[:, :, :lq, :lk]
    if kind == "padding":  # [B, 1, 1, Lk]: the first lengths[b] keys
        lengths = rng.integers(1, lk + 1, size=b)
        return (np.arange(lk)[None, :] < lengths[:, None])[:, None, None, :]
    if kind == "mixed":  # topk rows, then 256 random rows (units whose lists hold most keys) at the end
        m = mask_of(rng, "topk", b, hm, lq, lk)
        m[:, :, -256:] = rng.random((b, hm, min(256, lq), lk)) < 0.3
        return m
    if kind == "nearly_full":  # about one key in 10^4 dropped: most warps' 16 x 128 tiles keep every key, some not
        return rng.random((b, hm, lq, lk)) < 0.9999
    if kind == "shared_batch":  # random, one mask for every batch entry ([1, Hm, Lq, Lk])
        return rng.random((1, hm, lq, lk)) < 0.3
    if kind == "empty_rows":  # random, with every third row and the whole first 128-row unit empty
        m = rng.random((b, hm, lq, lk)) < 0.2
        m[:, :, ::3] = False
        m[:, :, :128] = False
        return m
    raise ValueError(kind)


def bias_of(rng, code, dtype, b, lq, lk, h, hkv):
    dims = {"B": b, "H": h, "K": hkv, "M": lq, "N": lk, "1": 1}
    return jnp.asarray(2.0 * rng.standard_normal(tuple(dims[c] for c in code)), F32).astype(dtype)


# (B, Lq, Lk, H, Hkv, D, dtype, causal, softcap, mask kind, mask heads ("H" or "K"), bias spec or None, capacity)
CASES = [
    (1, 256, 256, 4, 1, 128, jnp.bfloat16, True, 0.0, "topk", "K", ("BK1N", jnp.bfloat16), None),
    (2, 300, 300, 8, 2, 128, jnp.bfloat16, True, 0.0, "random", "K", ("BK1N", jnp.float32), None),
    (1, 1000, 1000, 4, 4, 64, jnp.float16, True, 0.0, "blocks", "H", ("BHMN", jnp.float32), None),
    (2, 77, 203, 4, 2, 128, jnp.float16, True, 0.0, "random", "K", ("1KMN", jnp.float16), None),   # Lq < Lk
    (1, 333, 129, 2, 1, 64, jnp.bfloat16, True, 0.0, "topk", "K", None, None),                   # Lq > Lk
    (1, 129, 517, 6, 3, 256, jnp.bfloat16, False, 0.0, "random", "K", ("BKM1", jnp.bfloat16), None),
    (2, 200, 333, 8, 2, 64, jnp.float16, False, 0.0, "padding", "1", ("BK1N", jnp.float16), None),
    (1, 300, 300, 4, 2, 128, jnp.bfloat16, True, 0.0, "empty_rows", "K", None, None),
    (1, 128, 512, 4, 2, 64, jnp.bfloat16, False, 30.0, "topk", "K", ("BK1N", jnp.bfloat16), None),  # softcap
    (1, 700, 700, 4, 2, 128, jnp.bfloat16, True, 0.0, "random", "K", ("BK1N", jnp.bfloat16), 64),   # dense units
    (2, 260, 390, 4, 4, 128, jnp.float16, False, 0.0, "blocks", "H", None, 128),                  # dense units
    (1, 190, 260, 4, 2, 96, jnp.bfloat16, True, 0.0, "random", "K", None, None),  # D = 96: sm80 kernels everywhere
    # The mask's rows 16-byte aligned (Lk % 16 == 0): on Hopper the forward without a mask serves the tile units (dense
    # units and lists of most visible keys), the TMA loading the mask's tiles, beside the key-list kernel's lists
    # (not for the row-broadcast padding mask, whose dense units the key-list kernel walks).
    (1, 700, 768, 4, 2, 128, jnp.bfloat16, True, 0.0, "random", "K", ("BKMN", jnp.float32), 64),
    (2, 260, 512, 4, 4, 64, jnp.float16, False, 0.0, "blocks", "H", None, 128),
    (1, 129, 320, 6, 3, 256, jnp.bfloat16, False, 0.0, "random", "K", ("BK1N", jnp.bfloat16), 64),
    (1, 333, 256, 4, 2, 256, jnp.float16, True, 0.0, "topk", "K", ("1KMN", jnp.float16), 64),     # Lq > Lk
    (1, 128, 512, 4, 2, 64, jnp.bfloat16, False, 30.0, "topk", "K", ("BK1N", jnp.bfloat16), 64),  # softcap
    (2, 200, 336, 8, 2, 128, jnp.float16, False, 0.0, "padding", "1", ("BK1N", jnp.float16), 64),  # row-broadcast
    (1, 300, 320, 4, 2, 128, jnp.bfloat16, True, 0.0, "empty_rows", "K", None, 64),
    (1, 77, 400, 4, 2, 128, jnp.bfloat16, True, 0.0, "random", "K", ("BKM1", jnp.bfloat16), 64),  # Lq < Lk
    (2, 300, 512, 4, 2, 128, jnp.bfloat16, True, 0.0, "random", "1", None, 64),  # one mask head for all
    (3, 200, 256, 4, 4, 64, jnp.float16, False, 0.0, "shared_batch", "H", ("BK1N", jnp.float16), 64),
    (2, 640, 640, 4, 2, 128, jnp.bfloat16, True, 0.0, "nearly_full", "K", ("BKMN", jnp.bfloat16), 64),
    (1, 300, 448, 4, 1, 256, jnp.float16, False, 0.0, "nearly_full", "K", None, 64),
    # Lists of most keys go to the tiles where a unit sees more than KEY_LIST_TILE_MIN_VISIBLE (1024) keys: the last
    # units of these (random rows) do, the others (top-k rows) keep their lists (causal: bottom-right, so the first
    # unit of the first case sees exactly 1024 keys, its second 1152).
    (1, 384, 1280, 4, 2, 128, jnp.bfloat16, True, 0.0, "mixed", "K", ("BK1N", jnp.bfloat16), None),
    (1, 384, 1280, 4, 2, 128, jnp.bfloat16, True, 0.0, "mixed", "K", ("BKMN", jnp.bfloat16), None),  # bias tiles
    (1, 384, 4352, 4, 2, 128, jnp.bfloat16, True, 0.0, "mixed", "K", ("BK1N", jnp.bfloat16), None),
    (2, 384, 4608, 8, 2, 64, jnp.float16, False, 0.0, "mixed", "K", ("BKMN", jnp.float16), None),
    (1, 512, 4608, 4, 1, 256, jnp.bfloat16, True, 0.0, "mixed", "K", None, None),
]


def tile_units_apart(case) -> bool:
    """Whether the forward without a mask runs beside the key-list kernel for the call's tile units (dense units,
    lists of most visible keys) on the default route of a Hopper GPU: D it serves, a mask with a row per query row
    (not the row-broadcast padding mask) whose rows are 16-byte aligned, and a unit that may go to the tiles (one
    seeing more than KEY_LIST_TILE_MIN_VISIBLE keys, or more keys than a list holds)."""
    from jax_dmattn import _cuda_fwd

    lk, d, kind, capacity = case[2], case[5], case[9], case[12]
    may_hold = lk > _cuda_fwd.KEY_LIST_TILE_MIN_VISIBLE or lk > _cuda_fwd.key_list_capacity(lk, capacity)
    return d in HOPPER_DIMS and lk % 16 == 0 and kind != "padding" and may_hold


@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_forward_matches_reference(case, kernel_route, rng):
    from jax_dmattn import _cuda_fwd

    b, lq, lk, h, hkv, d, dtype, causal, softcap, kind, mheads, bias_spec, capacity = case
    q = jnp.asarray(rng.standard_normal((b, lq, h, d)), F32).astype(dtype)
    k = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), F32).astype(dtype)
    v = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), F32).astype(dtype)
    mask = jnp.asarray(mask_of(rng, kind, b, {"H": h, "K": hkv, "1": 1}[mheads], lq, lk))
    bias = None if bias_spec is None else bias_of(rng, bias_spec[0], bias_spec[1], b, lq, lk, h, hkv)
    scale = d ** -0.5
    fn = functools.partial(_cuda_fwd.flash_fwd, scale=scale, softcap=softcap, is_causal=causal,
                           key_list_capacity=capacity)
    before = sm90_launches("fwd_key_list"), sm90_launches("fwd_tile_units")
    out, lse = jax.block_until_ready(jax.jit(fn)(q, k, v, bias, mask))
    served = sm90_launches("fwd_key_list") > before[0]
    hopper = hopper_kernels_available() and d in HOPPER_DIMS and kernel_route == "default"
    assert served == hopper, (f"route {kernel_route}: the Hopper key-list forward "
                              f"{'did not serve' if hopper else 'served'} the call")
    apart = hopper and tile_units_apart(case)
    assert (sm90_launches("fwd_tile_units") > before[1]) == apart, (
        f"the forward without a mask {'did not serve' if apart else 'served'} the tile units")

    assert_matches_reference(q, k, v, bias, mask, out, lse, scale=scale, causal=causal, softcap=softcap)


def assert_matches_reference(q, k, v, bias, mask, out, lse, *, scale, causal, softcap):
    """out / lse of the CUDA forward against the float32 reference; rows with no kept key exactly 0 / -inf."""
    b, lq, h, _ = q.shape
    up = lambda x: None if x is None else x.astype(F32)  # noqa: E731
    ref_out, ref_lse = reference.reference_core(up(q), up(k), up(v), up(bias), mask, scale=scale,
                                                is_causal=causal, softcap=softcap or None)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == (b, h, lq) and lse.dtype == F32
    assert rel_err(out, ref_out) < TOL[jnp.dtype(q.dtype)]
    assert rel_err(lse, ref_lse) < 1e-4
    empty = np.isneginf(np.asarray(ref_lse))  # rows with no kept key: exact zeros and -inf
    assert np.isneginf(np.asarray(lse)[empty]).all()
    out_rows = np.moveaxis(np.asarray(out, np.float32), 2, 1)  # [B, H, Lq, D]
    assert (out_rows[empty] == 0).all()


def check_nonfinite_v(value, rng, lq: int, capacity=None, keys_below=None):
    """A NaN or inf in one V element of kv head 1 reaches exactly the output rows that keep its key (the even
    rows of query heads 2, 3), as NaN or inf. The mask keeps 30% of the keys (of those below `keys_below` when given,
    so that the units' lists stay short); capacity 64 makes the units dense."""
    from jax_dmattn import _cuda_fwd

    b, lk, h, hkv, d = 1, 320, 4, 2, 128
    q = jnp.asarray(rng.standard_normal((b, lq, h, d)), F32).astype(jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), F32).astype(jnp.bfloat16)
    v_np = rng.standard_normal((b, lk, hkv, d)).astype(np.float32)
    v_np[0, 100, 1, 7] = value
    v = jnp.asarray(v_np).astype(jnp.bfloat16)
    mask_np = rng.random((b, hkv, lq, lk)) < 0.3
    if keys_below is not None:
        mask_np[..., keys_below:] = False
    mask_np[0, 1, :, 100] = np.arange(lq) % 2 == 0  # even rows keep key 100 of kv head 1
    out, _ = jax.jit(functools.partial(_cuda_fwd.flash_fwd, scale=d ** -0.5, softcap=0.0, is_causal=False,
                                       key_list_capacity=capacity))(q, k, v, None, jnp.asarray(mask_np))
    out = np.asarray(out, np.float32)
    hit = np.zeros(out.shape, bool)
    hit[0, 0::2, 2:4, 7] = True  # query heads 2, 3 read kv head 1
    assert np.array_equal(~np.isfinite(out), hit)
    if np.isnan(value):
        assert np.isnan(out[hit]).all()
    else:
        assert (out[hit] == np.inf).all()


# Short and long lists (the key-list kernel's own handling of a non-finite V) and dense units (on Hopper: the forward
# without a mask, whose P V gives the rows that drop the key a NaN too, 0 * NaN, and whose exact-rows pass recomputes
# them over their kept keys).
NONFINITE_LAYOUTS = {"lists": dict(keys_below=128), "long_lists": dict(), "dense": dict(capacity=64)}


@pytest.mark.parametrize("layout", list(NONFINITE_LAYOUTS))
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_v_reaches_exactly_the_rows_that_keep_it(value, layout, kernel_route, rng):
    check_nonfinite_v(value, rng, lq=256, **NONFINITE_LAYOUTS[layout])


@pytest.mark.parametrize("form", ["bool", "topk", "key_indices"])
def test_gradients_through_the_api(form, kernel_route, rng):
    """The backward consumes the forward's residuals (out and the natural-log lse) and the same key lists; on the
    default route both Hopper key-list kernels serve the call."""
    import jax_dmattn

    b, lq, lk, h, hkv, d, dtype = 1, 384, 384, 4, 2, 128, jnp.bfloat16
    q = jnp.asarray(rng.standard_normal((b, lq, h, d)), F32).astype(dtype)
    k = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), F32).astype(dtype)
    v = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), F32).astype(dtype)
    bias = jnp.asarray(rng.standard_normal((b, hkv, 1, lk)), F32).astype(dtype)
    dout = jnp.asarray(rng.standard_normal(q.shape), F32).astype(dtype)
    if form == "bool":
        mask = jnp.asarray(mask_of(rng, "topk", b, hkv, lq, lk))
    elif form == "topk":
        mask = jax_dmattn.TopKMask(jnp.asarray(rng.standard_normal((b, hkv, lk)), F32), 50)
    else:
        idx = np.stack([rng.choice(lk, 60, replace=False) for _ in range(b * hkv)]).reshape(b, hkv, 60)
        mask = jax_dmattn.KeyIndices(jnp.asarray(idx, jnp.int32))

    def loss(impl, q, k, v, bias):
        up = (lambda x: x.astype(F32)) if impl == "xla" else (lambda x: x)
        out = jax_dmattn.attention(up(q), up(k), up(v), up(bias), mask=mask, is_causal=True, implementation=impl)
        return jnp.sum(out.astype(F32) * dout.astype(F32))

    before = sm90_launches("fwd_key_list"), sm90_launches("bwd_key_list")
    got = jax.jit(jax.grad(functools.partial(loss, "cuda"), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    hopper = hopper_kernels_available() and kernel_route == "default"
    assert (sm90_launches("fwd_key_list") > before[0]) == hopper
    assert (sm90_launches("bwd_key_list") > before[1]) == hopper  # D = 128, not deterministic, no softcap
    ref = jax.jit(jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), got, ref):
        assert rel_err(g, r) < 3 * TOL[jnp.dtype(dtype)], name
