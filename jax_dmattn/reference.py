"""Pure-jnp attention with the whole jax_dmattn contract; also ``implementation="xla"``.

It materialises the [B, H, Lq, Lk] scores: use it as the ground truth and for small problems, not at long
context. Gradients come from JAX autodiff and are NaN-free on rows with no kept key. Its products are dense, so a
NaN or inf in q, k or v of a pair that the row drops still reaches that row's results (0 * NaN = NaN), where the
CPU kernels leave it out (docs/design.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_dmattn import _compact, _validation

__all__ = ["attention_reference"]


def _grouped(x, num_kv_heads: int, group: int):
    """[Bx, Hx, M, N] -> [Bx, Hkv | 1, group | 1, M, N] so query head h = kvh * group + g indexes it."""
    bx, hx, m, n = x.shape
    if hx == 1:
        return x.reshape(bx, 1, 1, m, n)
    if hx == num_kv_heads:
        return x.reshape(bx, num_kv_heads, 1, m, n)
    return x.reshape(bx, num_kv_heads, group, m, n)


def reference_core(q, k, v, bias, mask, *, scale, is_causal, softcap):
    """q [B, Lq, H, D], k/v [B, Lk, Hkv, D]; bias/mask rank 4 or None.

    Returns out (q.dtype) and lse [B, H, Lq] (float32, or float64 for float64 inputs).
    """
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    acc = jnp.promote_types(q.dtype, jnp.float32)  # float64 inputs stay float64
    qf = q.astype(acc).reshape(b, lq, hkv, g, d)
    kf = k.astype(acc)
    vf = v.astype(acc)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qf, kf, precision=jax.lax.Precision.HIGHEST) * scale
    if softcap:
        logits = softcap * jnp.tanh(logits / softcap)
    if bias is not None:
        bias = _grouped(bias.astype(acc), hkv, g)
        # A -inf bias drops its key like a False mask, also where q.k is NaN or inf (NaN + -inf is NaN).
        logits = jnp.where(bias == -jnp.inf, -jnp.inf, logits + bias)
    keep = None
    if mask is not None:
        keep = _grouped(mask, hkv, g)
    if is_causal:
        causal = jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None] + (lk - lq)
        keep = causal if keep is None else jnp.logical_and(keep, causal)
    if keep is not None:
        keep = jnp.broadcast_to(keep, logits.shape)
        logits = jnp.where(keep, logits, -jnp.inf)
    # initial: Lk = 0 gives rows with no key (max -inf) rather than a reduction error
    row_max = jnp.max(logits, axis=-1, keepdims=True, initial=-jnp.inf)
    # Rows with no kept key have max -inf: shift by 0 instead so exp gives exact zeros and no NaN. A NaN or +inf
    # max (a NaN or +inf logit) stays, so out and lse of that row are NaN.
    row_max = jax.lax.stop_gradient(jnp.where(row_max == -jnp.inf, 0.0, row_max))
    # logits - max is <= 0, but XLA may fuse the logit scaling into it as an FMA (jaxlib 0.10's CPU compiler
    # does), leaving the product's rounding error, ~100 at logits of 1e9, and exp overflows. Clip that residue
    # in value only (the gradient stays 1); NaN stays NaN, -inf stays -inf.
    shifted = logits - row_max
    p = jnp.exp(shifted - jax.lax.stop_gradient(jnp.maximum(shifted, 0.0)))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    empty = denom == 0
    safe_denom = jnp.where(empty, 1.0, denom)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p / safe_denom, vf, precision=jax.lax.Precision.HIGHEST)
    lse = jnp.where(empty, -jnp.inf, jnp.log(safe_denom) + row_max)[..., 0]
    return out.reshape(b, lq, h, d).astype(q.dtype), lse.reshape(b, h, lq)


def attention_reference(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                        softcap=None, return_lse=False):
    """Same contract as :func:`jax_dmattn.attention`, computed densely in float32 (float64 if inputs are)."""
    is_causal = _validation.check_flag("is_causal", is_causal)
    return_lse = _validation.check_flag("return_lse", return_lse)
    call = _validation.normalize_call(query, key, value, bias, mask, scale=scale, softcap=softcap,
                                      implementation="xla")
    mask = _compact.to_dense(call.mask, call.mask_kind, call.mask_k, q_len=call.q_len, kv_len=call.kv_len,
                             is_causal=is_causal)
    out, lse = reference_core(query, key, value, call.bias, mask, scale=call.scale,
                              is_causal=is_causal, softcap=call.softcap)
    return (out, lse) if return_lse else out
