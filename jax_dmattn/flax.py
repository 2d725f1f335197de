"""Flax (linen) layers on top of :func:`jax_dmattn.attention`.

* :class:`DynamicMaskAttention` -- self-attention with the paper's learned per-key
  bias ``A * softplus(dt_proj(v))`` and a top-k (or block top-k) dynamic mask; the
  element top-k goes to attention as a compact :class:`jax_dmattn.TopKMask`, so no
  ``[L, L]`` mask is built (:func:`dynamic_attention_inputs`).
* :func:`attention_fn` -- a drop-in for
  ``flax.linen.MultiHeadDotProductAttention(attention_fn=...)``.

This module imports flax; ``import jax_dmattn`` does not (import
``jax_dmattn.flax`` explicitly).  The nnx twin lives in :mod:`jax_dmattn.nnx`.
See docs/masks_and_flax.md for the design notes.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

try:
    import flax.linen as nn
except ImportError as e:  # pragma: no cover - exercised only without flax
    raise ImportError(
        "jax_dmattn.flax needs Flax; install it with `pip install flax` "
        "(or `pip install jax_dmattn[flax]`)"
    ) from e

from jax_dmattn.masks import TopKMask, block_topk_mask, topk_mask

__all__ = ["DynamicMaskAttention", "attention_fn", "make_attention_fn", "apply_rope"]

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]


def _attention(*args, **kwargs):
    # looked up at call time so that this module never pins an old binding
    import jax_dmattn

    return jax_dmattn.attention(*args, **kwargs)


# --------------------------------------------------------------------------
# math shared by the linen and nnx modules
# --------------------------------------------------------------------------


def resolve_heads(num_heads, num_kv_heads, head_dim, features: int):
    """Validated (H, Hkv, D)."""
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    hkv = num_heads if num_kv_heads is None else num_kv_heads
    if not isinstance(hkv, int) or hkv < 1:
        raise ValueError(f"num_kv_heads must be a positive int or None, got {num_kv_heads!r}")
    if num_heads % hkv:
        raise ValueError(
            f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({hkv}) for GQA/MQA"
        )
    if head_dim is None:
        if features % num_heads:
            raise ValueError(
                f"head_dim=None needs the input features ({features}) to be divisible by "
                f"num_heads ({num_heads}); pass head_dim explicitly"
            )
        head_dim = features // num_heads
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int or None, got {head_dim!r}")
    return num_heads, hkv, head_dim


def apply_rope(x: Array, positions: Array, theta: float = 10000.0) -> Array:
    """Rotary position embedding (rotate-half convention) on ``x`` [B, L, H, D].

    ``positions``: int array [L] or [B, L].  D must be even.  Computed in
    float32, returned in ``x``'s dtype.
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {d}")
    half = d // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    pos = jnp.asarray(positions, jnp.float32)
    if pos.ndim == 1:
        pos = pos[None]
    angles = pos[..., None] * inv_freq  # [B|1, L, half]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def dynamic_bias(value: Array, dt_kernel: Array, dt_bias: Array | None, a: Array) -> Array:
    """The paper's per-key bias ``A * softplus(dt_proj(v))``.

    value [B, L, Hkv, D]; dt_kernel [Hkv, D] maps each kv head's value vector to a
    scalar; dt_bias [Hkv] or None; a [Hkv].  Returns float32 [B, Hkv, 1, L].
    """
    dt = jnp.einsum(
        "blhd,hd->bhl", value.astype(jnp.float32), dt_kernel.astype(jnp.float32)
    )
    if dt_bias is not None:
        dt = dt + dt_bias.astype(jnp.float32)[None, :, None]
    bias = a.astype(jnp.float32)[None, :, None] * jax.nn.softplus(dt)
    return bias[:, :, None, :]


def dynamic_mask(
    bias: Array,
    window_size: int | None,
    *,
    mask: Array | None,
    is_causal: bool,
    query_len: int,
    use_block_topk: bool = False,
    block_q: int = 128,
    block_k: int = 128,
) -> Array | None:
    """Dense bool top-k mask from the detached bias, combined with the user's ``mask``.

    Returns ``mask`` unchanged (None when there is none) when every key fits in
    the window.  The modules call :func:`dynamic_attention_inputs` instead, which
    makes the same selection without the ``[L, L]`` array where it can.
    """
    lk = bias.shape[-1]
    if window_size is None or window_size >= lk:
        return mask
    sel_bias = jax.lax.stop_gradient(bias)  # a per-query-head mask gives a per-query-head selection
    if use_block_topk:
        return block_topk_mask(
            sel_bias, window_size, block_q=block_q, block_k=block_k, mask=mask,
            is_causal=is_causal, query_len=query_len,
        )
    return topk_mask(sel_bias, window_size, mask=mask, is_causal=is_causal, query_len=query_len)


def rope_qk(q: Array, k: Array, positions: Array | None, theta: float | None) -> tuple[Array, Array]:
    """q, k [B, L, heads, D] with rotary embeddings at ``positions`` (default 0..L-1); unchanged without theta."""
    if theta is None:
        return q, k
    pos = jnp.arange(q.shape[1]) if positions is None else positions
    return apply_rope(q, pos, theta), apply_rope(k, pos, theta)


def module_attention(module, q: Array, k: Array, v: Array, bias: Array | None, mask: Array | None,
                     *, is_causal: bool | None = None, segment_ids: Array | None = None) -> Array:
    """The attention call of a DynamicMaskAttention module (linen or nnx: the same option names): with a dynamic
    ``bias``, its top-k selection (:func:`dynamic_attention_inputs`) combined with ``mask``; else ``mask`` alone.
    ``is_causal``: None for the module's own flag (a decoding step passes False: its mask says what is visible).
    ``segment_ids`` [B, L]: packed sequences; each token sees, and picks its top k among, its own document's keys."""
    causal = module.is_causal if is_causal is None else is_causal
    if bias is not None:
        bias, mask = dynamic_attention_inputs(
            bias, module.window_size, mask=mask, is_causal=causal, query_len=q.shape[1],
            use_block_topk=module.use_block_topk, block_q=module.block_q, block_k=module.block_k,
            segment_ids=segment_ids,
        )
    return _attention(q, k, v, bias, mask, scale=module.scale, is_causal=causal, softcap=module.softcap,
                      q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                      deterministic=module.deterministic_backward, implementation=module.implementation)


def check_decode_segments(segment_ids):
    if segment_ids is not None:
        raise ValueError("decode: segment_ids are for whole packed sequences; a decoding step continues one "
                         "sequence per batch row (pass segment_ids only without decode)")


def decode_step(
    module,
    q: Array,
    k: Array,
    v: Array,
    bias: Array | None,
    mask: Array | None,
    positions: Array | None,
    cache: tuple[Array, Array, Array | None, Array],
) -> tuple[Array, tuple[Array, Array, Array | None, Array]]:
    """One decoding step of a DynamicMaskAttention module (linen or nnx) over its KV cache.

    ``q`` [B, 1, H, D], ``k`` / ``v`` [B, 1, Hkv, D] (before RoPE) and ``bias`` [B, Hkv, 1, 1] (the step's per-key
    bias, or None) belong to the token at position ``index``; ``cache`` is ``(key [B, T, Hkv, D], value, bias
    [B, Hkv, 1, T] or None, index)``.  The step's key, value and bias are written at ``index`` and its query attends
    to the cache slots ``0 .. index`` (a key-broadcast mask, so the top-k stays a compact ``TopKMask``); with the
    top-k, the slots it keeps are the ``window_size`` of largest bias among them, the same keys row ``index`` keeps
    in a causal call over the whole sequence.  ``mask``: None, or a bool mask broadcast over the query dim
    ([B, 1|Hkv|H, 1, T], e.g. padding), True = attend.  ``positions`` (RoPE) default to ``[index]``.

    Returns the attention output [B, 1, H, D] and the new cache (index + 1).  The caller keeps the index below T.
    """
    key_cache, value_cache, bias_cache, index = cache
    if module.use_block_topk and bias is not None and module.window_size is not None:
        raise ValueError("decode: use_block_topk selects whole blocks of block_q query rows at once, which one-token "
                         "steps cannot reproduce; decode with the element top-k (use_block_topk=False)")
    if q.shape[1] != 1:
        raise ValueError(f"decode: one token per step (x of length 1), got length {q.shape[1]}; "
                         "call the module without decode for a whole sequence")
    t = key_cache.shape[1]
    pos = jnp.reshape(index, (1,)) if positions is None else positions
    q, k = rope_qk(q, k, pos, module.rope_theta)
    at = (0, index, 0, 0)
    key_cache = jax.lax.dynamic_update_slice(key_cache, k.astype(key_cache.dtype), at)
    value_cache = jax.lax.dynamic_update_slice(value_cache, v.astype(value_cache.dtype), at)
    if bias is not None:
        bias_cache = jax.lax.dynamic_update_slice(bias_cache, bias.astype(bias_cache.dtype), (0, 0, 0, index))
    visible = (jnp.arange(t) <= index)[None, None, None, :]
    if mask is not None:
        m4 = _as_rank4(jnp.asarray(mask))
        if m4 is None or m4.dtype != jnp.bool_ or m4.shape[2] != 1 or m4.shape[3] not in (1, t):
            raise ValueError(f"decode: mask must be a bool mask broadcast over the query dim, [B, 1|Hkv|H, 1, {t}], "
                             f"got {getattr(mask, 'dtype', type(mask))} {tuple(jnp.shape(mask))}")
        visible = visible & m4
    out = module_attention(module, q, key_cache, value_cache, bias_cache, visible, is_causal=False)
    return out, (key_cache, value_cache, bias_cache, index + 1)


def _as_rank4(mask: Array) -> Array | None:
    """``mask`` reshaped to rank 4, or None if it has more dims than [B, H, Lq, Lk]."""
    if mask.ndim > 4:
        return None
    return mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))


def dynamic_attention_inputs(
    bias: Array,
    window_size: int | None,
    *,
    mask: Array | None,
    is_causal: bool,
    query_len: int,
    use_block_topk: bool = False,
    block_q: int = 128,
    block_k: int = 128,
    segment_ids: Array | None = None,
) -> tuple[Array, Any]:
    """The ``(bias, mask)`` pair that the modules pass to :func:`jax_dmattn.attention`.

    ``bias`` is the trainable per-key bias [B, Hkv, 1, L] (or any attention bias);
    ``mask`` the user's optional bool mask.  The selection is the one of
    :func:`dynamic_mask`, and the attention result (values and gradients) equals
    ``attention(q, k, v, bias, dynamic_mask(bias, ...))``, but when the selection
    is per key (``bias`` query dim 1, element top-k) no ``[L, L]`` array is built:

    * no ``mask``: ``(bias, TopKMask(stop_gradient(bias)[:, :, 0, :], window_size))``;
    * a key-broadcast bool ``mask`` (query dim 1, e.g. a padding mask
      [B, 1, 1, L]): the keys it hides get score ``-inf`` in the TopKMask and
      ``-inf`` added to the returned bias (a masked key for attention), whose
      head dim grows to the mask's H when the mask is per query head;
    * anything else (a mask with a query dim, ``use_block_topk``, a bias with a
      query dim): the dense ``dynamic_mask``, with the bias unchanged.

    ``window_size`` None or >= the key length: ``(bias, mask)`` unchanged.

    ``segment_ids`` [B, L] (self-attention over packed sequences): the caller passes them to attention as
    ``q_segment_ids`` and ``kv_segment_ids``, under which a TopKMask picks each row's keys among its own
    document's; the dense selection gets the same restriction as a mask.
    """
    lk = bias.shape[-1]
    if window_size is None or window_size >= lk:
        return bias, mask

    def dense():
        allowed = mask
        if segment_ids is not None:
            seg = jnp.asarray(segment_ids)
            same = (seg[:, :, None] == seg[:, None, :])[:, None]
            allowed = same if mask is None else jnp.logical_and(mask, same)
        return dynamic_mask(bias, window_size, mask=allowed, is_causal=is_causal, query_len=query_len,
                            use_block_topk=use_block_topk, block_q=block_q, block_k=block_k)

    if use_block_topk or bias.ndim != 4 or bias.shape[2] != 1:
        return bias, dense()
    scores = jax.lax.stop_gradient(bias)[:, :, 0, :]
    if mask is None:
        return bias, TopKMask(scores, window_size)
    m4 = _as_rank4(mask) if getattr(mask, "dtype", None) == jnp.bool_ else None
    if m4 is None or m4.shape[2] != 1 or m4.shape[3] not in (1, lk):
        return bias, dense()
    hb, hm = bias.shape[1], m4.shape[1]
    if hb != 1 and hm not in (1, hb):
        if hm % hb:
            return bias, dense()  # heads that do not combine: topk_mask raises the error
        # query head h reads kv head h // (H // Hkv): attention's GQA rule
        bias = jnp.repeat(bias, hm // hb, axis=1)
        scores = jnp.repeat(scores, hm // hb, axis=1)
    keep = jnp.broadcast_to(m4[:, :, 0, :], m4.shape[:2] + (lk,))
    # Hidden keys rank last in the TopKMask, like disallowed keys in topk_mask, so a
    # row keeps the same allowed keys; the hidden keys it keeps on top (rows with
    # fewer than window_size allowed keys) are masked by their -inf bias.  Only
    # allowed keys whose bias itself ranks last (-inf, NaN, the lowest float32)
    # tie with hidden ones and may lose their slot to one.
    scores = jnp.where(keep, scores, -jnp.inf)
    bias = bias + jnp.where(keep, 0.0, -jnp.inf).astype(bias.dtype)[:, :, None, :]
    return bias, TopKMask(scores, window_size)


# --------------------------------------------------------------------------
# linen modules
# --------------------------------------------------------------------------


class HeadwiseDense(nn.Module):
    """Parameters of a per-head projection of each head's vector [D] to a scalar.

    Parameters: ``kernel`` [Hkv, D], ``bias`` [Hkv].  Used as ``dt_proj``; its
    ``__call__`` returns ``(kernel, bias)`` for :func:`dynamic_bias`.
    """

    num_heads: int
    use_bias: bool = True
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        kernel = self.param(
            "kernel", _headwise_init(self.kernel_init), (self.num_heads, d), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.num_heads,), self.param_dtype)
            if self.use_bias else None
        )
        return kernel, bias


def _headwise_init(init: Initializer) -> Initializer:
    """Initialise a [H, D] kernel as H independent [D, 1] fan-in kernels."""

    def wrapped(key, shape, dtype=jnp.float32):
        h, d = shape
        return init(key, (h, d, 1), dtype).reshape(h, d)

    return wrapped


class DynamicMaskAttention(nn.Module):
    """Self-attention with a learned dynamic bias and a top-k dynamic mask.

    Called on ``x`` [B, L, E]; returns [B, L, out_features or E].

    Steps: q/k/v projections (``q_proj`` [E, H, D], ``k_proj``/``v_proj``
    [E, Hkv, D]); optional RoPE on q and k; the per-key bias
    ``A * softplus(dt_proj(v))`` of shape [B, Hkv, 1, L] (``dt_proj`` maps each
    kv head's value vector to a scalar: kernel [Hkv, D], bias [Hkv]; ``A`` [Hkv]);
    a top-k mask (or block top-k with ``use_block_topk``) selected from the
    *detached* bias; then :func:`jax_dmattn.attention` with ``is_causal``; then
    ``o_proj`` [H, D, E_out].  The bias is trained through attention's dbias.

    The element top-k is passed as ``TopKMask(stop_gradient(bias)[:, :, 0, :],
    window_size)``, which never becomes an [L, L] array; a key-broadcast ``mask``
    (query dim 1, e.g. padding) is folded into it exactly (hidden keys: score
    ``-inf`` and ``-inf`` added to the bias).  A ``mask`` with a query dim, or
    ``use_block_topk``, builds the dense bool mask (:func:`dynamic_mask`).

    Attributes:
      num_heads: query heads H.
      num_kv_heads: key/value heads Hkv (GQA/MQA); default H.
      head_dim: D; default E // H.
      window_size: keys kept per query row; None = no top-k mask (all allowed keys).
      is_causal: bottom-right causal attention (default True).
      use_dynamic_bias: learn the bias (default True).  False gives a plain
        multi-head attention (no A/dt_proj parameters, no top-k mask) -- a dense baseline.
      use_block_topk, block_q, block_k: select whole tiles with block_topk_mask.
      rope_theta: apply rotary embeddings with this base to q and k (None = off).
      scale, softcap, implementation, deterministic_backward: passed to attention
        (``deterministic_backward`` is attention's ``deterministic``).
      decode: cached decoding (Flax's ``decode=True`` convention): the call that creates the ``cache`` collection
        (``init`` on a full-length ``x``) sizes the cache (key, value, per-key bias, index) and runs as without
        decode; every later call (``apply(..., mutable=["cache"])``) takes one token ``x`` [B, 1, E] at the cache
        index and attends to the slots filled so far (:func:`decode_step`), with the top-k of their cached bias:
        the same output as a causal call over the whole sequence gives that token.
      out_features: output width; default E.
      use_proj_bias: biases in the q/k/v/o projections.
      dtype: computation dtype (None: promote inputs and params); param_dtype:
        parameter dtype.  The bias is always computed and passed in float32.
      a_init, dt_kernel_init, dt_bias_init: initialisers of A and dt_proj.

    ``__call__(x, mask=None, *, positions=None, segment_ids=None)``: ``mask`` is an
    optional bool array broadcastable to [B, 1|Hkv|H, L, L] (e.g. a padding mask
    [B, 1, 1, L], the form that keeps the mask compact), True = attend;
    ``positions`` ([L] or [B, L], default ``arange(L)``) feed RoPE;
    ``segment_ids`` (int [B, L]) pack several documents in one row: a token
    attends only within its document and its top-k is chosen among that
    document's keys, as if each document ran alone (not with ``decode`` steps).
    The bias is sown as ``intermediates/dynamic_bias``.
    """

    num_heads: int
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    window_size: Optional[int] = None
    is_causal: bool = True
    use_dynamic_bias: bool = True
    use_block_topk: bool = False
    block_q: int = 128
    block_k: int = 128
    rope_theta: Optional[float] = None
    scale: Optional[float] = None
    softcap: Optional[float] = None
    implementation: Optional[str] = None
    deterministic_backward: bool = False
    decode: bool = False
    out_features: Optional[int] = None
    use_proj_bias: bool = False
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = nn.initializers.lecun_normal()
    a_init: Initializer = nn.initializers.ones_init()
    dt_kernel_init: Initializer = nn.initializers.lecun_normal()
    dt_bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None, *, positions: Array | None = None,
                 segment_ids: Array | None = None) -> Array:
        if x.ndim != 3:
            raise ValueError(f"x must be [batch, length, features], got shape {tuple(x.shape)}")
        features = x.shape[-1]
        h, hkv, d = resolve_heads(self.num_heads, self.num_kv_heads, self.head_dim, features)
        dense = functools.partial(
            nn.DenseGeneral, axis=-1, use_bias=self.use_proj_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, precision=self.precision, kernel_init=self.kernel_init,
        )
        q = dense(features=(h, d), name="q_proj")(x)
        k = dense(features=(hkv, d), name="k_proj")(x)
        v = dense(features=(hkv, d), name="v_proj")(x)
        bias = None
        if self.use_dynamic_bias:
            dt_kernel, dt_bias = HeadwiseDense(
                hkv, param_dtype=self.param_dtype, kernel_init=self.dt_kernel_init,
                bias_init=self.dt_bias_init, name="dt_proj",
            )(v)
            a = self.param("A", self.a_init, (hkv,), self.param_dtype)
            bias = dynamic_bias(v, dt_kernel, dt_bias, a)
        o_proj = nn.DenseGeneral(
            features=self.out_features or features, axis=(-2, -1), use_bias=self.use_proj_bias,
            dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
            kernel_init=self.kernel_init, name="o_proj",
        )
        if self.decode:
            # Flax's convention: the call that creates the cache (init, on a full-length x) sizes it and runs as
            # without decode; every later call is one step of one token.
            stepping = self.has_variable("cache", "cached_key")
            b, t = x.shape[0], x.shape[1]
            key_cache = self.variable("cache", "cached_key", jnp.zeros, (b, t, hkv, d), k.dtype)
            value_cache = self.variable("cache", "cached_value", jnp.zeros, (b, t, hkv, d), v.dtype)
            bias_cache = (self.variable("cache", "cached_bias", jnp.zeros, (b, hkv, 1, t), jnp.float32)
                          if bias is not None else None)
            index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            if stepping:
                check_decode_segments(segment_ids)
                out, (key_cache.value, value_cache.value, new_bias, index.value) = decode_step(
                    self, q, k, v, bias, mask, positions,
                    (key_cache.value, value_cache.value, None if bias_cache is None else bias_cache.value,
                     index.value))
                if bias_cache is not None:
                    bias_cache.value = new_bias
                return o_proj(out)
        q, k = rope_qk(q, k, positions, self.rope_theta)
        if bias is not None:
            self.sow("intermediates", "dynamic_bias", bias)
        return o_proj(module_attention(self, q, k, v, bias, mask, segment_ids=segment_ids))


# --------------------------------------------------------------------------
# attention_fn drop-in
# --------------------------------------------------------------------------


def _flatten_batch(x: Array | None, batch: tuple[int, ...], tail_rank: int, name: str) -> Array | None:
    """[batch..., *tail] (numpy-broadcastable) -> [1|prod(batch), *tail] rank 1 + tail_rank."""
    if x is None:
        return None
    nb = len(batch)
    if x.ndim > nb + tail_rank:
        raise ValueError(
            f"{name} has rank {x.ndim}, more than batch dims {batch} + {tail_rank} "
            f"([batch..., heads, q_length, kv_length]); got shape {tuple(x.shape)}"
        )
    x = x.reshape((1,) * (nb + tail_rank - x.ndim) + x.shape)
    lead = x.shape[:nb]
    tail = x.shape[nb:]
    if all(s == 1 for s in lead):
        return x.reshape((1,) + tail)
    try:
        np.broadcast_shapes(lead, batch)
    except ValueError:
        raise ValueError(
            f"{name} batch dims {lead} do not broadcast to the query batch dims {batch}"
        ) from None
    if lead != batch:  # partly broadcast: materialise along batch only
        x = jnp.broadcast_to(x, batch + tail)
    return x.reshape((math.prod(batch),) + tail)


def attention_fn(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Dtype | None = None,
    precision: Any = None,
    module: Any = None,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general: Callable[..., Array] | None = None,
    qk_attn_weights_einsum: Callable[..., Array] | None = None,
    attn_weights_value_einsum: Callable[..., Array] | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    implementation: str | None = None,
    deterministic_backward: bool = False,
) -> Array:
    """Drop-in for :func:`flax.linen.dot_product_attention`, backed by jax_dmattn.

    Use as ``nn.MultiHeadDotProductAttention(..., attention_fn=attention_fn)``, or
    ``make_attention_fn(is_causal=True, ...)`` for the extra keyword options.

    Flax layout: query [batch..., q_length, num_heads, depth], key/value
    [batch..., kv_length, num_kv_heads, depth] (num_heads divisible by
    num_kv_heads); ``bias`` (float) and ``mask`` (bool, or numeric as made by
    ``nn.make_causal_mask``: nonzero = attend) are broadcastable to
    [batch..., num_heads, q_length, kv_length].  Returns
    [batch..., q_length, num_heads, depth].  The logit scale defaults to
    depth ** -0.5, as in flax.

    Differences from flax's function: attention dropout is not supported
    (``dropout_rate > 0`` with ``deterministic=False`` raises ValueError);
    attention weights are never materialised, so ``sow_weights`` (``module``)
    and einsum overrides raise ValueError; ``precision`` and
    ``force_fp32_for_softmax`` are accepted and ignored (softmax always runs in
    float32); a query row whose keys are all masked gives 0, where flax gives the
    mean of the values.  A bias or mask whose batch dims are partly broadcast is
    expanded along the batch dims only.
    """
    del broadcast_dropout, dropout_rng, precision, force_fp32_for_softmax
    if dropout_rate and not isinstance(deterministic, (bool, np.bool_)):
        raise ValueError(
            "jax_dmattn attention_fn does not support attention dropout; "
            f"got dropout_rate={dropout_rate} with a traced `deterministic` flag. Use dropout_rate=0."
        )
    if dropout_rate > 0.0 and not deterministic:
        raise ValueError(
            f"jax_dmattn attention_fn does not support attention dropout (got dropout_rate={dropout_rate}, "
            "deterministic=False): the fused kernels never materialise the attention weights. "
            "Set dropout_rate=0.0 on the attention module, or call it with deterministic=True."
        )
    if module is not None:
        raise ValueError(
            "jax_dmattn attention_fn cannot sow attention weights (sow_weights=True): "
            "the weights are never materialised"
        )
    if einsum_dot_general is not None or qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
        raise ValueError(
            "jax_dmattn attention_fn does not take einsum / dot_general overrides "
            "(einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum)"
        )
    for name, arr in (("query", query), ("key", key), ("value", value)):
        if arr.ndim < 3:
            raise ValueError(
                f"{name} must be [batch..., length, heads, depth] (rank >= 3), got shape {tuple(arr.shape)}"
            )
    if not query.ndim == key.ndim == value.ndim:
        raise ValueError(
            f"query, key and value must have the same rank, got shapes {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    batch = tuple(query.shape[:-3])
    if tuple(key.shape[:-3]) != batch or tuple(value.shape[:-3]) != batch:
        raise ValueError(
            f"query, key and value batch dims must match, got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    if dtype is None:
        dtype = jnp.result_type(query, key, value)
    query, key, value = (x.astype(dtype) for x in (query, key, value))
    b = math.prod(batch)
    q = query.reshape((b,) + query.shape[-3:])
    k = key.reshape((b,) + key.shape[-3:])
    v = value.reshape((b,) + value.shape[-3:])
    bias4 = _flatten_batch(bias, batch, 3, "bias")
    if mask is not None and mask.dtype != jnp.bool_:
        mask = mask != 0  # flax masks are often float 0/1 (nn.make_causal_mask): nonzero = attend
    mask4 = _flatten_batch(mask, batch, 3, "mask")
    out = _attention(
        q, k, v, bias4, mask4, scale=scale, is_causal=is_causal, softcap=softcap,
        deterministic=deterministic_backward, implementation=implementation,
    )
    return out.reshape(batch + out.shape[1:])


def make_attention_fn(
    *,
    is_causal: bool | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    implementation: str | None = None,
    deterministic_backward: bool = False,
) -> Callable[..., Array]:
    """:func:`attention_fn` with jax_dmattn options bound (causality, softcap, backend, ...).

    Works as the ``attention_fn`` of ``flax.linen.MultiHeadDotProductAttention`` and of
    ``flax.nnx.MultiHeadAttention``.  The returned function has :func:`attention_fn`'s signature (linen
    filters the keywords it passes by that signature).

    ``is_causal``.  ``nnx.MultiHeadAttention`` passes ``is_causal=`` on every call: its own call
    argument, which defaults to False (and is False during ``decode``); linen passes none.  A call-time
    False therefore means "the module asks for no causal mask", not "make this attention non-causal",
    and the bound value combines with the call-time one as follows:

    * bound True: causal, whatever the module passes; a call-time False does not undo it.  During nnx
      ``decode`` (one query over the cache) bottom-right causality lets the query see every cached key,
      and nnx's cache mask hides the unwritten slots, so a bound True stays correct there.
    * bound False: non-causal; a call-time True contradicts it and raises ValueError naming both values.
    * None (the default, nothing bound): the call-time value decides (False when none is passed).

    ``scale``, ``softcap``, ``implementation`` and ``deterministic_backward`` are defaults that a
    call-time keyword replaces (no Flax module passes them).
    """
    if is_causal is not None and not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"make_attention_fn: is_causal must be a bool or None, got {type(is_causal).__name__}")
    bound_causal = None if is_causal is None else bool(is_causal)
    options = dict(scale=scale, softcap=softcap, implementation=implementation,
                   deterministic_backward=deterministic_backward)

    def bound_attention_fn(*args, is_causal: bool = False, **kwargs):
        if not isinstance(is_causal, (bool, np.bool_)):
            raise TypeError(f"attention_fn: is_causal must be a bool, got {type(is_causal).__name__}")
        if bound_causal is False and is_causal:
            raise ValueError(
                "attention_fn: the call asks for is_causal=True, but make_attention_fn bound "
                "is_causal=False; bind is_causal=True (or leave it unbound) for causal attention, "
                "or call without is_causal=True"
            )
        return attention_fn(*args, is_causal=bool(bound_causal or is_causal), **{**options, **kwargs})

    functools.update_wrapper(bound_attention_fn, attention_fn)
    # The signature Flax inspects: attention_fn's, with the bound options as defaults.
    defaults = dict(options, is_causal=bool(bound_causal))
    sig = inspect.signature(attention_fn)
    bound_attention_fn.__signature__ = sig.replace(parameters=[
        p.replace(default=defaults[p.name]) if p.name in defaults else p for p in sig.parameters.values()
    ])
    return bound_attention_fn
