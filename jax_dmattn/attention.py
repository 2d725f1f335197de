"""``jax_dmattn.attention``: the public entry point (validation, normalisation, dispatch)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_dmattn import _bounds, _compact, _ffi, _jax_compat, _primitives, _validation, masks, reference

__all__ = ["attention", "default_implementation"]


def default_implementation(dtype, head_dim: int, platform: str | None = None) -> str:
    """The implementation ``implementation=None`` runs: the kernels of the platform (by default the default device's,
    ``jax.default_device``, else the default backend's), never the reference.

    "cpu" on CPU (float32, bfloat16, float16; any head dim), "cuda" on GPU (bfloat16, float16; head_dim <= 256).
    Raises ValueError when those kernels cannot serve the call (dtype, head dim, not built in this install, or a
    platform without kernels), saying what they support: implementation="xla" then has to be asked for by name,
    since the reference materialises the [B, H, Lq, Lk] scores.
    """
    platform = platform or _default_platform()
    implementation = _validation.PLATFORM_KERNELS.get(platform)
    if implementation is None:
        raise ValueError(f"jax_dmattn has kernels for the {' and '.join(_validation.PLATFORM_KERNELS)} platforms, "
                         f"not {platform!r}: pass {_validation.REFERENCE_HINT}")
    if not _kernels_built(implementation):
        raise ValueError(_validation.missing_kernels_message(implementation, platform))
    _validation.check_backend_support(implementation, dtype, head_dim, platform=platform)
    return implementation


def _default_platform() -> str:
    """The platform a call runs on when its inputs do not say: the default device's (``jax.default_device``, so that
    a CPU device on a GPU host runs the CPU kernels), else the default backend's."""
    device = jax.config.jax_default_device
    if isinstance(device, str):
        return jax.devices(device)[0].platform
    return device.platform if device is not None else jax.default_backend()


def _kernels_built(implementation: str) -> bool:
    return {"cpu": _ffi.has_cpu_kernels, "cuda": _ffi.has_cuda_kernels}[implementation]()


def kernel_operands(query, key, value, bias, implementation: str):
    """q, k, v zero-padded along D to a head dim the kernels are built for (the CPU kernels take any; the CUDA
    ones the next instantiated one), and bias in a dtype they read (others as float32: autodiff casts dbias
    back to bias's dtype)."""
    d = query.shape[-1]
    d_pad = d if implementation != "cuda" else next(x for x in _validation.cuda_head_dims() if x >= d)
    if d_pad != d:
        pad = [(0, 0)] * 3 + [(0, d_pad - d)]
        query, key, value = (jnp.pad(x, pad) for x in (query, key, value))
    if bias is not None and bias.dtype not in _validation.KERNEL_BIAS_DTYPES:
        bias = bias.astype(jnp.float32)
    return query, key, value, bias


def _explicit_spec(x):
    """The PartitionSpec in x's type under an Explicit-axes mesh (None otherwise), padded to x's rank."""
    sharding = _jax_compat.sharding_of(x)
    mesh = getattr(sharding, "mesh", None)
    axis_types = getattr(mesh, "axis_types", ())
    if not isinstance(sharding, jax.sharding.NamedSharding) or not any(
            t == jax.sharding.AxisType.Explicit for t in axis_types):
        return None
    return jax.sharding.PartitionSpec(*(tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))))


def _explicit_sequence_axis(query, key):
    """The mesh axis the sequence of query and key is split over, visible in their types (Explicit axes), or None.
    Such a call runs as context parallelism (jax_dmattn.context_parallel)."""
    qs, ks = _explicit_spec(query), _explicit_spec(key)
    if qs is None or ks is None or (qs[1] is None and ks[1] is None):
        return None
    if qs[1] != ks[1] or not isinstance(qs[1], str):
        raise ValueError(f"jax_dmattn.attention: query is split along its query length dim over {qs[1]!r} and key "
                         f"along its key length dim over {ks[1]!r}; context parallelism "
                         f"(jax_dmattn.context_parallel.attention) needs both split over the same single mesh axis")
    if qs[2] != ks[2]:
        raise ValueError(f"jax_dmattn.attention: with a split sequence, query and key heads must be sharded alike "
                         f"(query heads over {qs[2]!r}, key heads over {ks[2]!r})")
    return qs[1]


def _context_parallel_call(query, key, value, bias, mask, rows, key_segments, axis, *, return_lse, **kwargs):
    """attention() on a sequence split over Explicit mesh axis ``axis``: context_parallel.attention in a
    shard_map over the operands' own shardings; row bounds (rows [1|B, Lq, 4], key_segments [1|B, Lk] or None)
    follow the query's rows and the keys."""
    from jax_dmattn import context_parallel

    rebuild = lambda m: m  # noqa: E731
    if isinstance(mask, masks.COMPACT_MASKS):
        # a TopKMask / KeyIndices is no JAX type: it crosses shard_map as its one array, in that array's sharding
        (mask,), tree = jax.tree_util.tree_flatten(mask)
        rebuild = lambda m: jax.tree_util.tree_unflatten(tree, [m])  # noqa: E731
    P = jax.sharding.PartitionSpec
    qspec, kspec = _explicit_spec(query), _explicit_spec(key)
    specs = [None if x is None else (_explicit_spec(x) or P()) for x in (query, key, value, bias, mask)]
    specs.append(None if rows is None else P(qspec[0] if rows.shape[0] > 1 else None, qspec[1], None))
    specs.append(None if key_segments is None else P(kspec[0] if key_segments.shape[0] > 1 else None, kspec[1]))
    # the bounds are built over the whole sequence: split them like the rows and keys they belong to
    rows, key_segments = (None if x is None else jax.sharding.reshard(x, spec)
                          for x, spec in zip((rows, key_segments), specs[5:]))
    lse_spec = P(qspec[0], qspec[2], qspec[1])

    def local(q, k, v, b, m, r, s):
        return context_parallel._attention(q, k, v, b, rebuild(m), r, s, axis_name=axis, strategy="ring",
                                           chunk_order="contiguous", return_lse=True, **kwargs)

    shard_map = _jax_compat.shard_map()
    mesh = jax.typeof(query).sharding.mesh
    out, lse = shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=(qspec, lse_spec))(
        query, key, value, bias, mask, rows, key_segments)
    return (out, lse) if return_lse else out


def attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False, softcap=None,
              q_segment_ids=None, kv_segment_ids=None, local_window_size=None, query_seq_lengths=None,
              key_value_seq_lengths=None, return_lse=False, deterministic=False, implementation=None):
    """Exact softmax attention with an additive broadcastable bias and a boolean mask.

    Args:
      query: [B, Lq, H, D]. key, value: [B, Lk, Hkv, D], H % Hkv == 0 (GQA / MQA). One shared float dtype.
      bias: optional float array broadcastable to [B, H, Lq, Lk] (rank <= 4, each dim 1 or full; the head dim
        may be 1, Hkv or H, a size-Hkv dim maps query head h to h // (H // Hkv)). Trainable: gets a gradient
        of its own shape and dtype.
      mask: optional bool array, same broadcast rule; True = attend. Tiles that are all False are skipped.
        Or a compact mask that never becomes an [Lq, Lk] array: ``TopKMask(scores, k)`` (per row, the k keys of
        largest per-key score among those it sees: causality, segment ids, window and lengths all narrow that)
        or ``KeyIndices(indices)`` (the keys each row keeps); see docs/compact_masks.md.
      scale: logit scale, default D ** -0.5.
      is_causal: bottom-right causal: query i sees key j iff j <= i + Lk - Lq.
      softcap: if set (> 0), logits = softcap * tanh(scale * q.k / softcap), before the bias is added.
      q_segment_ids, kv_segment_ids: optional integer [B, Lq] / [B, Lk], given together: query i sees key j only
        where their ids are equal (packed sequences).
      local_window_size: optional static int w or pair (left, right): query i sees keys j with
        i + off - left <= j <= i + off + right, off the causal diagonal's offset (w means (w, w)).
      query_seq_lengths, key_value_seq_lengths: optional integer [B]: keys at positions >= their element's length
        are not seen; query rows at positions >= theirs keep no key (out 0, lse -inf, zero gradients). With
        lengths, is_causal is bottom-right on each element's own lengths (docs/sequences.md).
        These five are applied in-kernel from O(B * (Lq + Lk)) numbers, never as an [Lq, Lk] mask, and combine
        with bias, every mask form and each other (a TopKMask row picks its k among the keys they leave it).
      return_lse: also return the float32 natural-log log-sum-exp [B, H, Lq] (-inf for rows with no key).
      deterministic: bitwise-reproducible backward.
      implementation: None (the kernels of the platform: ``default_implementation``), "cuda" (bf16/f16,
        D <= 256), "cpu" (f32/bf16/f16, any D) or "xla" (the pure-jnp reference, O(Lq * Lk) memory, any float
        dtype and D). None never falls back to the reference: a call the platform's kernels cannot serve
        raises ValueError.

    is_causal, return_lse and deterministic are Python (or numpy) bools; anything else is a TypeError.

    Returns:
      out [B, Lq, H, D] in query's dtype, or (out, lse) when return_lse. A row with no kept key gives 0 and
      lse -inf, and all gradients it touches are 0. Lk = 0 is that for every row; B, H or Lq = 0 gives empty
      results. D = 0 is a ValueError.

    NaN and inf: a row drops a key where the mask or causality does and where the bias (or the logit) is -inf; a
    dropped key contributes nothing to the row, whatever its values. A NaN or +inf logit makes the row's out and
    lse NaN, and NaN reaches exactly the gradients the row touches. "xla" computes dense products, so a NaN in a
    dropped pair still reaches the row (0 * NaN); "cuda" does not follow this yet (README, known limitations).
    """
    is_causal = _validation.check_flag("is_causal", is_causal)
    return_lse = _validation.check_flag("return_lse", return_lse)
    deterministic = _validation.check_flag("deterministic", deterministic)
    call = _validation.normalize_call(query, key, value, bias, mask, scale=scale, softcap=softcap,
                                      implementation=implementation)
    if implementation is None:
        implementation = default_implementation(query.dtype, call.head_dim)
    elif implementation != "xla" and not _kernels_built(implementation):
        raise ValueError(_validation.missing_kernels_message(implementation))
    bounds = _bounds.make_row_bounds(batch=call.batch, q_len=call.q_len, kv_len=call.kv_len, is_causal=is_causal,
                                     q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                     local_window_size=local_window_size, query_seq_lengths=query_seq_lengths,
                                     key_value_seq_lengths=key_value_seq_lengths)
    if implementation == "cuda" and bounds is None:
        _compact.check_cuda_support(call.mask_kind, call.mask_k, is_causal)
    seq_axis = _explicit_sequence_axis(query, key)
    if seq_axis is not None and implementation != "xla":
        rows, key_segments = (None, None) if bounds is None else (bounds.rows, bounds.key_segments)
        return _context_parallel_call(query, key, value, bias, mask, rows, key_segments, seq_axis, scale=scale,
                                      is_causal=is_causal, softcap=softcap, return_lse=return_lse,
                                      deterministic=deterministic, implementation=implementation)
    # Nothing to compute (no key, or an empty output): the reference's closed form (out 0, lse -inf, zero
    # gradients) on every implementation, whose cost is nil here, instead of kernel launches over empty grids.
    empty = call.kv_len == 0 or call.batch * call.heads * call.q_len == 0
    if implementation == "xla" or empty:
        _compact.check_reference_size(call.mask_kind, call.batch, call.heads, call.q_len, call.kv_len)
        visible = None if bounds is None else _bounds.dense_keep(bounds, call.kv_len)
        mask = _compact.to_dense(call.mask, call.mask_kind, call.mask_k, q_len=call.q_len, kv_len=call.kv_len,
                                 is_causal=is_causal, visible=visible)
        is_causal = is_causal and bounds is None  # the bounds hold causality
        out, lse = reference.reference_core(query, key, value, call.bias, mask, scale=call.scale,
                                            is_causal=is_causal, softcap=call.softcap)
        return (out, lse.astype(jnp.float32)) if return_lse else out

    q, k, v, bias_arg = kernel_operands(query, key, value, call.bias, implementation)
    mask = call.mask
    if implementation == "cuda" and bounds is not None and call.mask_kind == "indices":
        # The CUDA key-list kernels take no row bounds: KeyIndices without their keys outside the bounds become
        # per-row KeyIndices that hold the bounds (and their causality) themselves. A TopKMask keeps its bounds, from
        # which its pre-pass builds the key lists (_compact.cuda_bounded_topk_lists).
        mask, bounds, is_causal = _bounds.filter_key_indices(mask, bounds, _compact.INDEX_PAD), None, False
    config = _primitives.KernelConfig(scale=call.scale, softcap=call.softcap, is_causal=is_causal,
                                      deterministic=deterministic, implementation=implementation,
                                      mask_kind=call.mask_kind, mask_k=call.mask_k)
    rows, key_segments = (None, None) if bounds is None else (bounds.rows, bounds.key_segments)
    out, lse = _primitives.flash_attention(q, k, v, bias_arg, mask, config, rows, key_segments)
    out = out[..., :call.head_dim]
    return (out, lse) if return_lse else out
