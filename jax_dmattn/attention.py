"""``jax_dmattn.attention``: the public entry point (validation, normalisation, dispatch)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_dmattn import _compact, _ffi, _primitives, _validation, reference

__all__ = ["attention", "default_implementation"]


def default_implementation(dtype, head_dim: int, platform: str | None = None) -> str:
    """The implementation ``implementation=None`` picks: the platform's kernels when they serve the call."""
    platform = platform or jax.default_backend()
    dtype = jnp.dtype(dtype)
    if head_dim <= _validation.MAX_HEAD_DIM:
        if platform == "gpu" and _ffi.has_cuda_kernels() and dtype in _validation.KERNEL_DTYPES["cuda"]:
            return "cuda"
        if platform == "cpu" and _ffi.has_cpu_kernels() and dtype in _validation.KERNEL_DTYPES["cpu"]:
            return "cpu"
    return "xla"


def _padded_head_dim(head_dim: int, implementation: str) -> int:
    if implementation != "cuda":
        return head_dim  # the CPU kernels take any head dim
    return next(d for d in _validation.CUDA_HEAD_DIMS if d >= head_dim)


def attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False, softcap=None,
              return_lse=False, deterministic=False, implementation=None):
    """Exact softmax attention with an additive broadcastable bias and a boolean mask.

    Args:
      query: [B, Lq, H, D]. key, value: [B, Lk, Hkv, D], H % Hkv == 0 (GQA / MQA). One shared float dtype.
      bias: optional float array broadcastable to [B, H, Lq, Lk] (rank <= 4, each dim 1 or full; the head dim
        may be 1, Hkv or H, a size-Hkv dim maps query head h to h // (H // Hkv)). Trainable: gets a gradient
        of its own shape and dtype.
      mask: optional bool array, same broadcast rule; True = attend. Tiles that are all False are skipped.
        Or a compact mask that never becomes an [Lq, Lk] array: ``TopKMask(scores, k)`` (per row, the k keys of
        largest per-key score it sees) or ``KeyIndices(indices)`` (the keys each row keeps); see
        docs/compact_masks.md.
      scale: logit scale, default D ** -0.5.
      is_causal: bottom-right causal: query i sees key j iff j <= i + Lk - Lq.
      softcap: if set (> 0), logits = softcap * tanh(scale * q.k / softcap), before the bias is added.
      return_lse: also return the float32 natural-log log-sum-exp [B, H, Lq] (-inf for rows with no key).
      deterministic: bitwise-reproducible backward.
      implementation: None (best for the platform and dtype), "cuda", "cpu" or "xla" (pure-jnp reference).

    Returns:
      out [B, Lq, H, D] in query's dtype, or (out, lse) when return_lse. A row with no kept key gives 0 and
      lse -inf, and all gradients it touches are 0.

    NaN and inf: a row drops a key where the mask or causality does and where the bias (or the logit) is -inf; a
    dropped key contributes nothing to the row, whatever its values. A NaN or +inf logit makes the row's out and
    lse NaN, and NaN reaches exactly the gradients the row touches. "xla" computes dense products, so a NaN in a
    dropped pair still reaches the row (0 * NaN); "cuda" does not follow this yet (README, known limitations).
    """
    call = _validation.normalize_call(query, key, value, bias, mask, scale=scale, softcap=softcap,
                                      implementation=implementation)
    if not isinstance(is_causal, (bool, jnp.bool_)):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if implementation is None:
        implementation = default_implementation(query.dtype, call.head_dim)
    if implementation == "xla":
        _compact.check_reference_size(call.mask_kind, call.batch, call.heads, call.q_len, call.kv_len)
        mask = _compact.to_dense(call.mask, call.mask_kind, call.mask_k, q_len=call.q_len, kv_len=call.kv_len,
                                 is_causal=bool(is_causal))
        out, lse = reference.reference_core(query, key, value, call.bias, mask, scale=call.scale,
                                            is_causal=bool(is_causal), softcap=call.softcap)
        return (out, lse.astype(jnp.float32)) if return_lse else out
    if implementation == "cpu" and not _ffi.has_cpu_kernels():
        raise ValueError("implementation='cpu' needs the compiled extension, which is not installed; "
                         "reinstall jax_dmattn from source or use implementation='xla'")
    if implementation == "cuda" and not _ffi.has_cuda_kernels():
        raise ValueError("implementation='cuda' needs the extension built with CUDA kernels; rebuild with "
                         "a CUDA toolkit and the CuTe headers (see README) or use implementation='xla'")

    if implementation == "cuda":
        _compact.check_cuda_support(call.mask_kind, call.mask_k, bool(is_causal))
    bias_arg = call.bias
    if bias_arg is not None and bias_arg.dtype not in _validation.KERNEL_BIAS_DTYPES:
        bias_arg = bias_arg.astype(jnp.float32)  # autodiff casts dbias back to bias's dtype
    d = call.head_dim
    d_pad = _padded_head_dim(d, implementation)
    q, k, v = query, key, value
    if d_pad != d:
        pad = [(0, 0)] * 3 + [(0, d_pad - d)]
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    config = _primitives.KernelConfig(scale=call.scale, softcap=call.softcap, is_causal=bool(is_causal),
                                      deterministic=bool(deterministic), implementation=implementation,
                                      mask_kind=call.mask_kind, mask_k=call.mask_k)
    out, lse = _primitives.flash_attention(q, k, v, bias_arg, call.mask, config)
    if d_pad != d:
        out = out[..., :d]
    return (out, lse) if return_lse else out
