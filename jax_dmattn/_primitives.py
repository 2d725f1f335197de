"""The kernels as JAX primitives, and the ``jax.custom_vjp`` that ties forward and backward together.

Two primitives, ``dmattn_fwd`` and ``dmattn_bwd``, take the canonical layout of docs/design.md. Each lowers,
per platform, to an XLA FFI custom call (``mlir.lower_fun`` over ``jax.ffi.ffi_call``) wrapped in
``custom_partitioning`` (``_sharding.py``: under jit with batch / head sharded inputs each device calls the
kernel on its shard, no gathers), and has a batching rule that folds vmapped dims into the batch dim (or, for a
vmapped query alone, into the query heads), so vmap never becomes a loop. Absent bias / mask travel as
zero-size placeholders so the primitives always have the same operands. Inside shard_map the operands are cast
to vary over the same manual axes (``_match_vma``), so a replicated bias gets its gradient summed like any
invariant operand. Distributed use: docs/distributed.md.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax import lax
from jax.interpreters import batching, mlir
from jax.sharding import PartitionSpec as P

from jax_dmattn import _compact, _decode, _jax_compat, _sharding


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    scale: float
    softcap: float  # 0.0: off
    is_causal: bool
    deterministic: bool
    implementation: str  # "cpu" | "cuda"
    mask_kind: str = "bool"  # what the mask operand is: "bool" | "topk" | "indices" (jax_dmattn/_compact.py)
    mask_k: int = 0          # k of a "topk" mask
    # Set inside the CUDA forward lowering only (jax_dmattn/_decode.py): a packed one-row call whose shared key
    # lists may be cut into parts along the heads, or whose bool mask's parts are listed apart.
    split_lists: bool = False
    # Set inside the lowerings only (jax_dmattn/_decode.py): a packed one-row call, whose query rows are the query
    # heads of one row and so share its row bounds.
    packed_rows: bool = False


def _operand(x, dtype):
    """An optional operand as the primitives take it: absent (None) is a zero-size array of ``dtype``, so the
    primitives always have the same operands."""
    return jnp.zeros((0,), dtype) if x is None else x


def _is_absent(x) -> bool:
    return x.ndim == 1 and x.shape[0] == 0


# ----------------------------------------------------------------------------------------------- forward
dmattn_fwd_p = Primitive("dmattn_fwd")
dmattn_fwd_p.multiple_results = True


def _derived_aval(aval, shape, dtype, spec_dims):
    """An output aval derived from input ``aval``: keeps its mesh, manual-axis (vma) type and, for explicit
    sharding, the sharding of the input dims listed in ``spec_dims`` (None: unsharded)."""
    try:
        sharding = aval.sharding
        spec = tuple(sharding.spec) + (None,) * (aval.ndim - len(sharding.spec))
        new_spec = P(*(None if i is None else spec[i] for i in spec_dims))
        return aval.update(shape=tuple(shape), dtype=jnp.dtype(dtype), weak_type=False,
                           sharding=sharding.update(spec=new_spec))
    except (AttributeError, TypeError, ValueError):  # pragma: no cover - avals without sharding (older jax)
        return jax.core.ShapedArray(tuple(shape), dtype)


def _fwd_abstract(q, k, v, bias, mask, rows, key_segments, *, config):
    b, lq, h, _ = q.shape
    return (_derived_aval(q, q.shape, q.dtype, (0, 1, 2, 3)), _derived_aval(q, (b, h, lq), jnp.float32, (0, 2, 1)))


def _with_cuda_mask(run, q, k, mask, rows, key_segments, config: KernelConfig):
    """``run(mask, lists, rows, key_segments, is_causal)`` on what the CUDA wrappers take for the call's mask and row
    bounds: a bool mask goes as it is, with the bounds; a compact one as its live-key lists (no mask), which hold the
    bounds. A TopKMask under bounds whose lists can fail (segment ids: _compact.cuda_bounded_topk_lists) runs in a
    lax.cond on their failure, the other branch on the per-row lists."""
    rows_arg, segments_arg = _bounds_args(rows, key_segments)
    if config.mask_kind == "bool":
        return run(None if _is_absent(mask) else mask, None, rows_arg, segments_arg, _kernel_causal(config, rows))
    if rows_arg is None:
        lists = _compact.cuda_key_lists(mask, config.mask_kind, config.mask_k, q_len=q.shape[1], kv_len=k.shape[1],
                                        is_causal=config.is_causal)
        return run(None, lists, None, None, config.is_causal)
    if config.mask_kind != "topk":
        raise ValueError("KeyIndices reach the CUDA kernels with their bounds applied (jax_dmattn.attention: "
                         "_bounds.filter_key_indices)")
    if config.packed_rows:
        rows_arg = rows_arg[:, :1]  # one row's bounds: its lists are shared by the packed rows
    lists, failed = _compact.cuda_bounded_topk_lists(mask, config.mask_k, rows_arg, segments_arg, kv_len=k.shape[1])
    if failed is None:
        return run(None, lists, None, None, False)
    return lax.cond(failed,
                    lambda: run(None, _compact.per_row_topk_lists(mask, config.mask_k, rows_arg, segments_arg,
                                                                   kv_len=k.shape[1]), None, None, False),
                    lambda: run(None, lists, None, None, False))


def _check_platform(config: KernelConfig, platform: str):
    if config.implementation != platform:
        raise ValueError(f"implementation={config.implementation!r} cannot run on the {platform} platform; "
                         f"use implementation=None to pick the kernels of the platform in use")


def _bounds_args(rows, key_segments):
    """The kernels' (rows, key_segments) of a call's row bounds (jax_dmattn/_bounds.py): None where absent."""
    return (None if _is_absent(rows) else rows), (None if _is_absent(key_segments) else key_segments)


def _kernel_causal(config: KernelConfig, rows) -> bool:
    """Row bounds carry causality themselves (on each element's own lengths): the kernels then apply none."""
    return config.is_causal and _is_absent(rows)


def _fwd_cpu(q, k, v, bias, mask, rows, key_segments, config):
    from jax_dmattn import _cpu

    return _cpu.flash_fwd(q, k, v, bias, mask, *_bounds_args(rows, key_segments), scale=config.scale,
                          softcap=config.softcap, is_causal=config.is_causal,
                          kernel_causal=_kernel_causal(config, rows), mask_kind=config.mask_kind,
                          mask_k=config.mask_k)


def _fwd_cuda(q, k, v, bias, mask, rows, key_segments, config):
    from jax_dmattn import _cuda_fwd

    def run(mask_arg, lists, rows_arg, segments_arg, is_causal):
        def call(q, lists, mask_arg=mask_arg, q_head_repeat=1, q_heads_first=False):
            return _cuda_fwd.flash_fwd(q, k, v, None if _is_absent(bias) else bias, mask_arg, rows=rows_arg,
                                       key_segments=segments_arg, compact_lists=lists, scale=config.scale,
                                       softcap=config.softcap, is_causal=is_causal, q_head_repeat=q_head_repeat,
                                       q_heads_first=q_heads_first)

        def call_parts(q, lists, q_head_repeat, q_heads_first):
            return call(q, lists, None, q_head_repeat, q_heads_first)

        if config.split_lists and lists is not None:
            return _decode.split_lists(call_parts, q, lists)
        if config.split_lists and mask_arg is not None:
            return _decode.split_mask_lists(call_parts, q, mask_arg)
        return call(q, lists)

    return _with_cuda_mask(run, q, k, mask, rows, key_segments, config)


# The lowerings: one-row calls run GQA-packed (and split over the keys on CUDA) inside them (jax_dmattn/_decode.py).
def _fwd_lowering_cpu(q, k, v, bias, mask, rows, key_segments, *, config):
    _check_platform(config, "cpu")
    return _decode.forward(_fwd_cpu, q, k, v, bias, mask, rows, key_segments, config)


def _fwd_lowering_cuda(q, k, v, bias, mask, rows, key_segments, *, config):
    _check_platform(config, "cuda")
    return _decode.forward(_fwd_cuda, q, k, v, bias, mask, rows, key_segments, config)


# ---------------------------------------------------------------------------------------------- backward
dmattn_bwd_p = Primitive("dmattn_bwd")
dmattn_bwd_p.multiple_results = True


def _bwd_abstract(q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse, *, config):
    return tuple(_derived_aval(x, x.shape, x.dtype, tuple(range(x.ndim))) for x in (q, k, v, bias))


def _bwd_cpu(q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse, config):
    from jax_dmattn import _cpu

    return _cpu.flash_bwd(q, k, v, bias, mask, *_bounds_args(rows, key_segments), out, lse, dout, dlse,
                          scale=config.scale, softcap=config.softcap, is_causal=config.is_causal,
                          kernel_causal=_kernel_causal(config, rows), deterministic=config.deterministic,
                          mask_kind=config.mask_kind, mask_k=config.mask_k)


def _bwd_cuda(q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse, config):
    from jax_dmattn import _bounds, _cuda_bwd

    has_bias = not _is_absent(bias)
    bias_arg = bias if has_bias else None

    def run(mask_arg, lists, rows_arg, segments_arg, is_causal):
        return _cuda_bwd.flash_bwd(q, k, v, bias_arg, mask_arg, out, lse, dout, dlse, rows=rows_arg,
                                   key_segments=segments_arg, compact_lists=lists, scale=config.scale,
                                   softcap=config.softcap, is_causal=is_causal, deterministic=config.deterministic)

    bias_shape = None if bias_arg is None else bias_arg.shape
    if config.mask_kind != "bool" and not _cuda_bwd.key_list_path_serves(q.shape[3], bias_shape, k.shape[1]):
        # The key-tile backward reads a bool mask: a bias with a query dim (already O(Lq * Lk) itself), or a device
        # whose shared memory fits no key-list build (docs/compact_masks.md).
        rows_arg, segments_arg = _bounds_args(rows, key_segments)
        visible = None if rows_arg is None else _bounds.dense_keep(_bounds.RowBounds(rows_arg, segments_arg),
                                                                   k.shape[1])
        dense = _compact.to_dense(mask, config.mask_kind, config.mask_k, q_len=q.shape[1], kv_len=k.shape[1],
                                  is_causal=config.is_causal, visible=visible)
        dq, dk, dv, dbias = run(dense, None, rows_arg, segments_arg, _kernel_causal(config, rows))
    else:
        dq, dk, dv, dbias = _with_cuda_mask(run, q, k, mask, rows, key_segments, config)
    return dq, dk, dv, (dbias if has_bias else jnp.zeros_like(bias))


def _bwd_lowering_cpu(q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse, *, config):
    _check_platform(config, "cpu")
    return _decode.backward(_bwd_cpu, q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse, config)


def _bwd_lowering_cuda(q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse, *, config):
    _check_platform(config, "cuda")
    return _decode.backward(_bwd_cuda, q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse, config)


# ---------------------------------------------------------------------------------------------- batching
def _fold(x, bdim, n, b, keep_broadcast, example_major=False):
    """Merges the vmapped dim (size n) of x into its batch dim (size b), one kernel call for all examples.

    Batch-major (folded index = batch * n + example) by default, example-major (example * b + batch) when
    example_major. A merge keeps a sharding only when the major of the two dims carries it: batch-major suits
    a sharded batch, example-major a sharded vmapped dim (see _example_major). An operand that is not vmapped
    is broadcast over the examples, except a batch-broadcast (size-1 batch) bias / mask when keep_broadcast.
    """
    if bdim is None:
        if _is_absent(x) or (keep_broadcast and x.shape[0] == 1):
            return x
        x = x[None] if example_major else x[:, None]
        x = jnp.broadcast_to(x, (n,) + x.shape[1:] if example_major else (x.shape[0], n) + x.shape[2:])
    else:
        x = jnp.moveaxis(x, bdim, 0 if example_major else 1)
    shape = (n, b) if example_major else (b, n)
    if x.shape[:2] != shape:
        x = jnp.broadcast_to(x, shape + x.shape[2:])
    return x.reshape((b * n,) + x.shape[2:])


def _unfold(x, n, example_major=False):
    """Inverse of _fold: [B * n, ...] -> [B, n, ...] (vmapped dim at 1), or [n, B, ...] (at 0)."""
    shape = (n, x.shape[0] // n) if example_major else (x.shape[0] // n, n)
    return x.reshape(shape + x.shape[1:])


def _dim_is_sharded(x, dim) -> bool:
    spec = getattr(_jax_compat.sharding_of(x), "spec", None)
    return spec is not None and dim < len(spec) and spec[dim] is not None


def _example_major(args, dims) -> bool:
    """Example-major folding when an operand's vmapped dim is sharded (explicit sharding) and its batch dim
    is not; batch-major otherwise (under Auto sharding the shardings are unknown while tracing)."""
    for x, d in zip(args, dims):
        if d is None:
            continue
        batch_dim = 1 if d == 0 else 0
        if _dim_is_sharded(x, d) and not _dim_is_sharded(x, batch_dim):
            return True
    return False


def _batch_size(args, dims):
    return next(a.shape[d] for a, d in zip(args, dims) if d is not None)


def _unbatched_dim0(x, bdim):
    shape = list(x.shape)
    if bdim is not None:
        del shape[bdim]
    return shape[0]


def _has_explicit_sharding(x) -> bool:
    return any(_dim_is_sharded(x, i) for i in range(x.ndim))


def _heads_fold_applies(args, dims) -> bool:
    """Only q is vmapped, and folding the examples into the query heads keeps every other operand as it is."""
    q, k, v, bias, mask = args[:5]
    if dims[0] is None or any(d is not None for d in dims[1:]):
        return False
    h, hkv = q.shape[2 if dims[0] > 2 else 3], k.shape[2]
    for x in (bias, mask):
        # a bias / mask with one entry per query head would have to be expanded over the examples
        if not _is_absent(x) and x.shape[1] not in (1, hkv):
            return False
    # explicit-sharding avals: splitting a sharded head dim into (Hkv, G) is not always expressible
    return h % hkv == 0 and not _has_explicit_sharding(q)


def _fwd_batcher_heads(args, dims, *, config):
    """vmap of q alone (k, v, bias, mask shared): the n examples become extra query heads, laid out
    [Hkv, n, G] so the query heads of one kv head stay contiguous (GQA); k and v are not copied n times."""
    q, k, v, bias, mask, rows, key_segments = args
    q = jnp.moveaxis(q, dims[0], 0)
    n, b, lq, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    qf = q.reshape(n, b, lq, hkv, g, d).transpose(1, 2, 3, 0, 4, 5).reshape(b, lq, hkv * n * g, d)
    out, lse = dmattn_fwd_p.bind(qf, k, v, bias, mask, rows, key_segments, config=config)
    out = out.reshape(b, lq, hkv, n, g, d).transpose(3, 0, 1, 2, 4, 5).reshape(n, b, lq, h, d)
    lse = lse.reshape(b, hkv, n, g, lq).transpose(2, 0, 1, 3, 4).reshape(n, b, h, lq)
    return (out, lse), (0, 0)


def _fwd_batcher(args, dims, *, config):
    """vmap of the forward: one kernel call on the folded batch (never a loop); when only q is vmapped the
    examples are folded into the query heads instead, so the shared k / v are not broadcast."""
    if _heads_fold_applies(args, dims):
        return _fwd_batcher_heads(args, dims, config=config)
    q, k, v = args[:3]
    n = _batch_size(args, dims)
    b = _unbatched_dim0(q, dims[0])
    em = _example_major(args, dims)
    q, k, v = (_fold(x, d, n, b, False, em) for x, d in zip((q, k, v), dims[:3]))
    # bias, mask and the row bounds keep a batch-broadcast (size-1 batch) form
    rest = (_fold(x, d, n, b, True, em) for x, d in zip(args[3:], dims[3:]))
    out, lse = dmattn_fwd_p.bind(q, k, v, *rest, config=config)
    out_dim = 0 if em else 1
    return (_unfold(out, n, em), _unfold(lse, n, em)), (out_dim, out_dim)


def _bwd_batcher(args, dims, *, config):
    """vmap of the backward (vmap of grad, per-example gradients): one kernel call on the folded batch.

    Every gradient comes out per vmapped example, also for operands that were not vmapped (JAX sums them where
    the primal was shared). dbias of a bias with a size-1 batch dim is therefore computed per folded batch
    entry (the bias is expanded over the batch) and summed over the original batch afterwards.
    """
    q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse = args
    n = _batch_size(args, dims)
    b = _unbatched_dim0(q, dims[0])
    em = _example_major(args, dims)
    q, k, v, out, lse, dout, dlse = (_fold(x, d, n, b, False, em)
                                     for x, d in zip((q, k, v, out, lse, dout, dlse), dims[:3] + dims[7:]))
    has_bias = not (dims[3] is None and _is_absent(bias))
    bias_batch = _unbatched_dim0(bias, dims[3]) if has_bias else 0
    bias = _fold(bias, dims[3], n, b, False, em) if has_bias else bias
    mask, rows, key_segments = (_fold(x, d, n, b, True, em) for x, d in zip(args[4:7], dims[4:7]))
    dq, dk, dv, dbias = dmattn_bwd_p.bind(q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse,
                                          config=config)
    out_dim = 0 if em else 1
    if has_bias:
        dbias = _unfold(dbias, n, em)  # [B, n, ...] or [n, B, ...]
        if bias_batch == 1 and b != 1:
            dbias = jnp.sum(dbias, axis=1 - out_dim, keepdims=True, dtype=jnp.float32).astype(dbias.dtype)
        dbias_dim = out_dim
    else:
        dbias, dbias_dim = jnp.broadcast_to(dbias[None], (n,) + dbias.shape), 0
    return (_unfold(dq, n, em), _unfold(dk, n, em), _unfold(dv, n, em), dbias), (out_dim,) * 3 + (dbias_dim,)


# ---------------------------------------------------------------------------------------------- custom_vjp
def _vma(x) -> frozenset:
    """The manual mesh axes x varies over inside shard_map (empty outside)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        mat = getattr(aval, "manual_axis_type", None)
        vma = getattr(mat, "varying", None)
    return frozenset(vma or ())


def _match_vma(*xs):
    """Inside shard_map (check_vma), casts every operand to vary over the union of their manual axes: the
    primitives' outputs vary like the inputs, and the transpose of the cast psums the gradient of an operand
    that was invariant (a bias replicated over the data-parallel axis gets its per-device dbias summed)."""
    present = [x for x in xs if x is not None]
    vmas = [_vma(x) for x in present]
    union = frozenset().union(*vmas)
    if all(v == union for v in vmas):
        return xs
    out = []
    for x in xs:
        missing = () if x is None else tuple(sorted(union - _vma(x), key=str))
        out.append(_jax_compat.to_varying(x, missing) if missing else x)
    return tuple(out)


def flash_attention(q, k, v, bias, mask, config: KernelConfig, rows=None, key_segments=None):
    """Canonical-layout attention through the kernels: returns (out, lse). bias / mask may be None, and so may the
    row bounds (rows, key_segments) of jax_dmattn/_bounds.py."""
    _sharding.check_input_shardings(q, k, v, bias, mask, rows, key_segments)
    q, k, v, bias, mask, rows, key_segments = _match_vma(q, k, v, bias, mask, rows, key_segments)
    return _attention(q, k, v, _operand(bias, jnp.float32), _operand(mask, jnp.bool_), _operand(rows, jnp.int32),
                      _operand(key_segments, jnp.int32), config)


def attention_vjp(forward, backward):
    """A differentiable attention over (q, k, v, bias, mask, rows, key_segments, static) from its two halves:
    ``forward(q, k, v, bias, mask, rows, key_segments, static)`` -> (out, lse) and ``backward(q, k, v, bias, mask,
    rows, key_segments, out, lse, dout, dlse, static)`` -> (dq, dk, dv, dbias). The residuals are the operands and
    (out, lse); masks and bounds get no gradient; the cotangents arrive in out's dtype and float32, varying over
    the residuals' manual axes (one may vary over fewer, e.g. an invariant one in shard_map)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
    def attention(q, k, v, bias, mask, rows, key_segments, static):
        return tuple(forward(q, k, v, bias, mask, rows, key_segments, static))

    def attention_fwd(q, k, v, bias, mask, rows, key_segments, static):
        out, lse = forward(q, k, v, bias, mask, rows, key_segments, static)
        return (out, lse), (q, k, v, bias, mask, rows, key_segments, out, lse)

    def attention_bwd(static, residuals, cotangents):
        *operands, out, lse = residuals
        dout, dlse = cotangents
        *_, dout, dlse = _match_vma(operands[0], jnp.asarray(dout, out.dtype), jnp.asarray(dlse, jnp.float32))
        dq, dk, dv, dbias = backward(*operands, out, lse, dout, dlse, static)
        return dq, dk, dv, dbias, None, None, None

    attention.defvjp(attention_fwd, attention_bwd)
    return attention


def _kernels_fwd(q, k, v, bias, mask, rows, key_segments, config: KernelConfig):
    return dmattn_fwd_p.bind(q, k, v, bias, mask, rows, key_segments, config=config)


def _kernels_bwd(q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse, config: KernelConfig):
    dq, dk, dv, dbias = dmattn_bwd_p.bind(q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse,
                                          config=config)
    if not _is_absent(bias) and bias.shape[3] == 1 and k.shape[1] != 1:
        dbias = (dbias.astype(jnp.float32) + key_broadcast_dbias(bias.shape, lse, dlse)).astype(dbias.dtype)
    return dq, dk, dv, dbias


def key_broadcast_dbias(bias_shape, lse, dlse):
    """The gradient of a bias [Bb, Hb, Mb, 1] (constant along keys) from the lse cotangent dlse [B, H, Lq]: softmax
    cancels a per-row constant in the output (the kernels write exactly 0 for it), while d lse_i / d b_i = 1 in
    every row that keeps a key (lse > -inf). Summed over the bias's broadcast dims, float32."""
    bb, hb, mb, _ = bias_shape
    b, h, lq = dlse.shape
    x = jnp.where(jnp.isneginf(lse), 0.0, dlse.astype(jnp.float32))
    if hb == 1:
        x = jnp.sum(x, axis=1, keepdims=True)
    elif hb != h:  # Hb = Hkv: query heads h * G .. h * G + G - 1 share bias head h
        x = jnp.sum(x.reshape(b, hb, h // hb, lq), axis=2)
    if bb == 1 and b != 1:
        x = jnp.sum(x, axis=0, keepdims=True)
    if mb == 1 and lq != 1:
        x = jnp.sum(x, axis=2, keepdims=True)
    return x[..., None]


_attention = attention_vjp(_kernels_fwd, _kernels_bwd)


# ---------------------------------------------------------------------------------------------- registration
def _register(prim, role, abstract, lowerings, batcher):
    prim.def_impl(functools.partial(_jax_compat.apply_primitive, prim))
    prim.def_abstract_eval(abstract)
    # Lowered through custom_partitioning (_sharding.py): under jit with sharded inputs the call runs per shard.
    for platform, lowering in lowerings.items():
        mlir.register_lowering(prim, mlir.lower_fun(_sharding.partitioned(role, lowering), multiple_results=True),
                               platform=platform)
    batching.primitive_batchers[prim] = batcher
    _jax_compat.require_devices_during_lowering(prim)


_register(dmattn_fwd_p, "fwd", _fwd_abstract, {"cpu": _fwd_lowering_cpu, "cuda": _fwd_lowering_cuda}, _fwd_batcher)
_register(dmattn_bwd_p, "bwd", _bwd_abstract, {"cpu": _bwd_lowering_cpu, "cuda": _bwd_lowering_cuda}, _bwd_batcher)
