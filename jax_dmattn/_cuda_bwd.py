"""The CUDA backward kernel as a traced JAX function (used inside the cuda lowering of ``dmattn_bwd``).

One FFI call, ``dmattn_bwd_cuda``, runs: the mask tile classification (64 x 64 tiles), delta =
rowsum(dout * out) - dlse, the main kernel (parallel over key tiles: dk, dv of the whole GQA group, dbias reduced
over its broadcast dims without atomics, dq by fp32 atomics), and either the dq conversion or, when
``deterministic``, a second kernel that computes dq over query tiles in a fixed order (bitwise reproducible).
Scratch buffers are extra FFI outputs (XLA-owned workspace; the handler never allocates or synchronises).

With a mask whose key dim is full and a bias that is absent or broadcast over query rows, the same call takes the
key-list path instead (``uses_key_list_path``): the live keys of every 128-row query tile of the mask are listed
by the forward's pre-pass call (``_cuda_fwd.build_key_lists``, its own FFI call whose results are inputs here; inside
one jit it is the very call of the forward, merged by XLA's CSE), and a query-tile-parallel kernel walks only those
keys, adding dk / dv / dbias by fp32 atomics (``deterministic=False``) or by int64 fixed-point atomics of a
per-call power-of-two resolution (``deterministic=True``: integer addition is associative, so the result is
bitwise reproducible) (docs/cuda_backward.md, "Key-list path" and "Deterministic key-list path"). At long
sequences it works through the kv heads in passes, so that its dk / dv accumulators hold a slice of them
(``key_list_accum_kv_heads``).

dq is aliased to dout: XLA writes dq into dout's buffer when nothing reads dout after the call, and copies dout
first otherwise.

Inputs are the canonical layout of docs/design.md: q [B, Lq, H, D], k/v [B, Lk, Hkv, D] (bf16 or f16,
D in {32, 64, 96, 128, 192, 256}); bias None or rank 4 [Bb, Hb, Mb, Nb] (bf16 / f16 / f32); mask None or rank
4 bool with the same broadcast rule; out, dout [B, Lq, H, D]; lse, dlse [B, H, Lq] float32.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jax_dmattn import _cuda_fwd, _ffi

_FACTS = _ffi.kernel_facts()  # csrc/kernel_facts.h
# Tile sizes of the key-tile backward and of its tile-class map.
BLOCK_M = _FACTS["bwd_block_m"]
BLOCK_N = _FACTS["bwd_block_n"]
TARGET = "dmattn_bwd_cuda"
# Position of dout among the call's operands (q, k, v, bias, mask, out, lse, dout, ...: flash_bwd's ffi_call).
DOUT_OPERAND = 7
# uint32 words after the int64 dK / dV counts of the deterministic key-list path.
FIXED_STATS_WORDS = _FACTS["fixed_stats_words"]


def tile_class_shape(mask_shape) -> tuple[int, ...]:
    bm, hm, mm, nm = mask_shape
    return (bm, hm, -(-mm // BLOCK_M), -(-nm // BLOCK_N))


def dbias_needs_workspace(bias_shape, bias_dtype, b: int, h: int, hkv: int, lk: int) -> bool:
    """The key-tile backward's rule (csrc/kernel_facts.h: dbias_tiles_get_several_flushes, as the handler applies
    it): a bf16 / f16 dbias whose tiles get several partial sums is accumulated in an fp32 buffer of bias's shape
    and converted at the end."""
    if bias_shape[3] == 1 and lk != 1:
        return False  # dbias of a key-broadcast bias is exactly 0
    several = _ffi.extension().dbias_tiles_get_several_flushes(tuple(bias_shape), b, h, hkv)
    return several and jnp.dtype(bias_dtype) != jnp.float32


# The key-list kernel's builds: query rows per CTA by head dim, preferred first (csrc/kernel_facts.h:
# key_list_bwd_has_rows).
KEY_LIST_ROWS = {d: tuple(r for dd, r in _FACTS["key_list_bwd_rows"] if dd == d) for d in _FACTS["cuda_head_dims"]}
# Opt-in dynamic shared memory per block by compute capability (CUDA programming guide, "Technical
# Specifications per Compute Capability"). JAX_DMATTN_MAX_DYNAMIC_SMEM (bytes) overrides the lookup, e.g. to run
# the sm_80 choices on an H100.
_SMEM_OPTIN = {(8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448,
               (10, 0): 232448, (10, 3): 232448, (12, 0): 101376}
SMEM_ENV = "JAX_DMATTN_MAX_DYNAMIC_SMEM"
_SMEM_DEFAULT = 232448  # no GPU to ask (lowering on a CPU machine): the sm_90 value, the kernels' design point


def key_list_smem_bytes(head_dim: int, rows: int) -> int:
    """Dynamic shared memory of a key-list backward build (csrc/kernel_facts.h: key_list_bwd_smem_bytes, which the
    kernel static_asserts against its own layout)."""
    return _ffi.extension().key_list_bwd_smem_bytes(head_dim, rows)


def device_smem_limit() -> int:
    """The opt-in shared memory per block of the first local CUDA device (JAX_DMATTN_MAX_DYNAMIC_SMEM overrides)."""
    env = os.environ.get(SMEM_ENV)
    if env:
        return int(env)
    try:
        cc = jax.local_devices(backend="cuda")[0].compute_capability
        major, minor = (int(x) for x in str(cc).split(".")[:2])
    except Exception:  # no CUDA backend here, or a jax without compute_capability
        return _SMEM_DEFAULT
    if (major, minor) in _SMEM_OPTIN:
        return _SMEM_OPTIN[(major, minor)]
    return 101376 if major in (8, 12) else _SMEM_DEFAULT


def key_list_rows_per_cta(head_dim: int, smem_limit: int | None = None) -> int:
    """The key-list kernel's rows per CTA for this head dim on this device: its preferred build that fits the
    device's shared memory, or 0 when none does (then the key-tile path runs)."""
    limit = device_smem_limit() if smem_limit is None else smem_limit
    for rows in KEY_LIST_ROWS.get(head_dim, ()):
        if key_list_smem_bytes(head_dim, rows) <= limit:
            return rows
    return 0


def uses_key_list_path(bias_shape, mask_shape, lk: int) -> bool:
    """The handler's rule (csrc/kernel_facts.h: uses_key_list_path, exported by the extension): the key-list backward
    serves a mask with a full key dim and a bias that is absent or broadcast over query rows (Mb == 1), in both modes
    (``deterministic`` only changes how it accumulates: fp32 atomics or int64 fixed-point atomics). flash_bwd also
    needs one of its builds to fit the device's shared memory (``key_list_rows_per_cta``)."""
    return _ffi.extension().uses_key_list_path(
        mask_shape is not None, 0 if mask_shape is None else int(mask_shape[3]), bias_shape is not None,
        0 if bias_shape is None else int(bias_shape[2]), int(lk))


def key_list_path_serves(head_dim: int, bias_shape, kv_len: int) -> bool:
    """Whether the key-list backward takes key lists given without a mask (a compact mask) on this device: the lists
    stand in for a mask with a full key dim in ``uses_key_list_path``, and a build of the head dim fits the device's
    shared memory."""
    return key_list_rows_per_cta(head_dim) > 0 and uses_key_list_path(bias_shape, (1, 1, 1, kv_len), kv_len)


def key_list_accum_kv_heads(batch: int, q_len: int, heads: int, kv_len: int, kv_heads: int, head_dim: int,
                            deterministic: bool) -> int:
    """kv heads per pass of the key-list backward (csrc/kernel_facts.h: key_list_bwd_accum_kv_heads, exported by the
    extension): its dK / dV accumulators hold that many kv heads, and the call works through the kv heads in
    ``kv_heads // result`` passes. The handler reads the count back from the workspace's size."""
    return int(_ffi.extension().key_list_bwd_accum_kv_heads(
        int(batch), int(q_len), int(heads), int(kv_len), int(kv_heads), int(head_dim), bool(deterministic)))


# The key lists are the forward pre-pass's (csrc/cuda/key_lists.h); one size rule for both calls.
key_list_sizes = _cuda_fwd.key_list_sizes


def _check(q, k, v, bias, mask, out, lse, dout, dlse):
    _cuda_fwd.check_operands("flash_bwd", q, k, v, bias, mask)
    if out.shape != q.shape or dout.shape != q.shape:
        raise ValueError(f"flash_bwd: out / dout must have q's shape {q.shape}, got {out.shape} / {dout.shape}")
    b, lq, h, _ = q.shape
    if lse.shape != (b, h, lq) or dlse.shape != (b, h, lq):
        raise ValueError(f"flash_bwd: lse / dlse must have shape {(b, h, lq)}, got {lse.shape} / {dlse.shape}")


def flash_bwd(q, k, v, bias, mask, out, lse, dout, dlse, *, scale: float, softcap: float, is_causal: bool,
              deterministic: bool, key_list_capacity=None, compact_lists=None, rows=None, key_segments=None):
    """Returns (dq, dk, dv, dbias); dbias has bias's shape and dtype, None when bias is None.

    ``key_list_capacity`` as in ``_cuda_fwd.flash_fwd`` (pass the forward's value: the two pre-pass calls are then
    identical and XLA's CSE makes one of them). ``compact_lists`` as in ``_cuda_fwd.flash_fwd``, instead of a mask;
    only where ``key_list_path_serves``. ``rows`` / ``key_segments`` (row bounds) as in ``_cuda_fwd.flash_fwd``:
    the key-tile path only."""
    _check(q, k, v, bias, mask, out, lse, dout, dlse)
    bounds_rows = rows  # (`rows` below is the key-list rows per CTA)
    if compact_lists is not None:
        if mask is not None:
            raise ValueError("flash_bwd: give a mask or compact_lists, not both")
        if not key_list_path_serves(q.shape[3], None if bias is None else bias.shape, k.shape[1]):
            raise ValueError("flash_bwd: compact_lists need the key-list backward (a bias broadcast over query rows "
                             "and a key-list build that fits the device)")
        if q.shape[1] == 0:  # no query row: nothing to list, and the handler sees no mask
            compact_lists = None
    _ffi.register_targets()
    b, lq, h, _ = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    capacity = _cuda_fwd._resolve_capacity("flash_bwd", lk, key_list_capacity)
    bias_arg = jnp.zeros((0,), jnp.float32) if bias is None else bias
    mask_arg = jnp.zeros((0,), jnp.bool_) if mask is None else mask
    rows = key_list_rows_per_cta(q.shape[3])
    if bounds_rows is not None and compact_lists is not None:
        raise ValueError("flash_bwd: row bounds are taken on the key-tile path only, not with compact_lists")
    key_list_path = rows > 0 and bounds_rows is None and (compact_lists is not None or uses_key_list_path(
        None if bias is None else bias.shape, None if mask is None else mask.shape, lk))
    fixed = key_list_path and deterministic  # int64 fixed-point accumulators, declared as uint32 pairs (no x64 needed)
    dbias_computed = bias is not None and not (bias.shape[3] == 1 and lk != 1)
    if key_list_path:
        # dbias columns are added atomically: in fp32, into dbias itself for an f32 bias; in deterministic mode as
        # int64 counts for every bias dtype.
        ws_bias = dbias_computed and (fixed or jnp.dtype(bias.dtype) != jnp.float32)
        # The dK / dV accumulators hold the kv heads of one pass (key_list_accum_kv_heads).
        accum_shape = (b, lk, key_list_accum_kv_heads(b, lq, h, lk, hkv, k.shape[3], fixed), k.shape[3])
    else:
        ws_bias = bias is not None and dbias_needs_workspace(bias.shape, bias.dtype, b, h, hkv, lk)
    if compact_lists is not None:
        keys, bits, _ = compact_lists  # the forward's own lists: the same ops on the same operands, merged by CSE
    elif key_list_path and mask.size > 0:
        # Exactly the forward's call (same mask value, q_len, is_causal, capacity): CSE merges the two.
        keys, bits = _cuda_fwd.build_key_lists(mask, q_len=lq, is_causal=is_causal, capacity=capacity)
    else:  # an empty mask (Lq = 0) has nothing to list, and the handler sees no mask
        keys, bits = _cuda_fwd.no_key_lists()
    if fixed:
        dbias_ws = jax.ShapeDtypeStruct((2 * int(np.prod(bias.shape)),) if ws_bias else (0,), jnp.uint32)
        # [dK counts | dV counts | stats words]: int64 as uint32 pairs.
        dkv_ws = jax.ShapeDtypeStruct((4 * int(np.prod(accum_shape)) + FIXED_STATS_WORDS,), jnp.uint32)
    else:
        dbias_ws = jax.ShapeDtypeStruct(bias.shape if ws_bias else (0,), jnp.float32)
        dkv_ws = jax.ShapeDtypeStruct((2,) + accum_shape if key_list_path else (0,), jnp.float32)
    out_types = (
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct(k.shape, k.dtype),
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        jax.ShapeDtypeStruct(bias_arg.shape, bias_arg.dtype),
        jax.ShapeDtypeStruct((0,) if deterministic or key_list_path else q.shape, jnp.float32),   # dq_accum
        jax.ShapeDtypeStruct((b, h, lq), jnp.float32),                                     # delta
        jax.ShapeDtypeStruct((0,) if mask is None or key_list_path else tile_class_shape(mask.shape), jnp.uint8),
        dbias_ws,                                                                          # dbias_accum
        # Key-list path: dK / dV accumulators (fp32, or int64 counts + stats words when deterministic).
        dkv_ws,                                                                            # dkv_accum
        # One word: set when q, dout or k holds an inf or NaN, on the route through the Hopper backward.
        jax.ShapeDtypeStruct((1,), jnp.uint32),                                            # nonfinite
    )
    # dq takes dout's buffer where XLA can give it (dout dead after this call, as a layer's output cotangent is):
    # every kernel reads a query tile's dout before it writes that tile's dq (docs/cuda_backward.md, "Buffers").
    dq, dk, dv, dbias, *_ = jax.ffi.ffi_call(TARGET, out_types, input_output_aliases={DOUT_OPERAND: 0})(
        q, k, v, bias_arg, mask_arg, out, lse.astype(jnp.float32), dout.astype(q.dtype), dlse.astype(jnp.float32),
        keys, bits, *_cuda_fwd.bounds_operands(bounds_rows, key_segments),
        scale=np.float32(scale), softcap=np.float32(softcap or 0.0), is_causal=np.bool_(is_causal),
        deterministic=np.bool_(deterministic), key_list_rows=np.int64(rows if key_list_path else 0),
        **_cuda_fwd.list_geometry_attrs(compact_lists))
    return dq, dk, dv, (None if bias is None else dbias)
