"""Exact merges of partial attention results: the (out, lse) of the same query rows over disjoint key sets.

Used by context parallelism (key chunks on other devices) and by the split over the keys of one-row calls
(jax_dmattn/_decode.py). Rows that keep no key in a part (lse -inf) take nothing from it; a row with no key in any
part stays out 0, lse -inf, with zero gradients.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _to_rows(w):
    """Weights [..., B, H, Lq] -> [..., B, Lq, H, 1], to scale outputs [..., B, Lq, H, D]."""
    return jnp.swapaxes(w, -1, -2)[..., None]


def combine(out, lse, out_s, lse_s):
    """Merges one part's (out_s, lse_s) into the running (out f32 [B, Lq, H, D], lse [B, H, Lq])."""
    new = jnp.logaddexp(lse, lse_s)
    safe = jnp.where(jnp.isneginf(new), 0.0, new)
    w_old = jnp.where(jnp.isneginf(lse), 0.0, jnp.exp(lse - safe))
    w_new = jnp.where(jnp.isneginf(lse_s), 0.0, jnp.exp(lse_s - safe))
    return out * _to_rows(w_old) + out_s.astype(jnp.float32) * _to_rows(w_new), new


def merge(outs, lses):
    """The merge of S parts stacked on a leading axis: outs [S, B, Lq, H, D], lses [S, B, H, Lq] (float32) ->
    (out [B, Lq, H, D] in outs' dtype, lse [B, H, Lq])."""
    top = jax.lax.stop_gradient(jnp.max(lses, axis=0))
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # all parts empty (-inf), or a NaN that the sums carry anyway
    w = jnp.where(jnp.isneginf(lses), 0.0, jnp.exp(lses - top))
    total = jnp.sum(w, axis=0)
    kept = total > 0
    safe_total = jnp.where(kept, total, 1.0)
    out = jnp.sum(outs.astype(jnp.float32) * _to_rows(w / safe_total), axis=0)
    lse = jnp.where(kept, top + jnp.log(safe_total), -jnp.inf)
    # A NaN part (a NaN or +inf logit) makes the row NaN, as one call over every key would.
    lse = jnp.where(jnp.any(jnp.isnan(lses), axis=0), jnp.nan, lse)
    return out.astype(outs.dtype), lse
