"""Flax NNX twin of :class:`jax_dmattn.flax.DynamicMaskAttention`.

Same math and the same parameter tree (``q_proj/kernel`` [E, H, D], ``k_proj``,
``v_proj`` [E, Hkv, D], ``o_proj/kernel`` [H, D, E_out], ``dt_proj/kernel``
[Hkv, D], ``dt_proj/bias`` [Hkv], ``A`` [Hkv]), so linen parameters can be
loaded into it leaf by leaf.  Import ``jax_dmattn.nnx`` explicitly (needs flax).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

try:
    from flax import nnx
except ImportError as e:  # pragma: no cover - exercised only without flax
    raise ImportError(
        "jax_dmattn.nnx needs Flax; install it with `pip install flax` "
        "(or `pip install jax_dmattn[flax]`)"
    ) from e

from jax_dmattn.flax import (check_decode_segments, decode_step, dynamic_bias, module_attention, resolve_heads,
                             rope_qk)

__all__ = ["DynamicMaskAttention", "HeadwiseLinear"]

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]


class HeadwiseLinear(nnx.Module):
    """Per-head projection of each head's vector [D] to a scalar (``dt_proj``).

    Parameters: ``kernel`` [num_heads, D] (each row initialised like a [D, 1]
    fan-in kernel), ``bias`` [num_heads] (or None).
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        *,
        use_bias: bool = True,
        param_dtype: Dtype = jnp.float32,
        kernel_init: Initializer = nnx.initializers.lecun_normal(),
        bias_init: Initializer = nnx.initializers.zeros_init(),
        rngs: nnx.Rngs,
    ):
        k = kernel_init(rngs.params(), (num_heads, head_dim, 1), param_dtype)
        self.kernel = nnx.Param(k.reshape(num_heads, head_dim))
        self.bias = (
            nnx.Param(bias_init(rngs.params(), (num_heads,), param_dtype)) if use_bias else None
        )

    def __call__(self, value: Array) -> Array:
        """value [..., H, D] -> [..., H]."""
        out = jnp.einsum("...hd,hd->...h", value.astype(jnp.float32), self.kernel[...].astype(jnp.float32))
        if self.bias is not None:
            out = out + self.bias[...].astype(jnp.float32)
        return out


class DynamicMaskAttention(nnx.Module):
    """Self-attention with a learned dynamic bias and a top-k dynamic mask (nnx).

    ``DynamicMaskAttention(in_features, num_heads, num_kv_heads, head_dim,
    window_size, is_causal=True, *, rngs, ...)``, called on ``x`` [B, L, E] with
    optional ``mask`` (bool, broadcastable to [B, 1|Hkv|H, L, L]) and
    ``positions`` (for RoPE), returns [B, L, out_features or E].  See
    :class:`jax_dmattn.flax.DynamicMaskAttention` for the math and every option;
    like it, the element top-k (alone or with a key-broadcast ``mask``) reaches
    attention as a compact ``TopKMask``, not an [L, L] array.
    ``decode=True`` (or ``decode=True`` at call time) with :meth:`init_cache` decodes one token per call over a KV
    cache, as nnx's own attention does; see :func:`jax_dmattn.flax.decode_step`.
    With ``sow_bias=True`` the bias is sown as ``nnx.Intermediate``
    ``dynamic_bias`` (collect it with ``nnx.capture(model, nnx.Intermediate)``).
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        window_size: Optional[int] = None,
        is_causal: bool = True,
        *,
        use_dynamic_bias: bool = True,
        use_block_topk: bool = False,
        block_q: int = 128,
        block_k: int = 128,
        rope_theta: Optional[float] = None,
        scale: Optional[float] = None,
        softcap: Optional[float] = None,
        implementation: Optional[str] = None,
        deterministic_backward: bool = False,
        decode: bool = False,
        sow_bias: bool = False,
        out_features: Optional[int] = None,
        use_proj_bias: bool = False,
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = nnx.initializers.lecun_normal(),
        a_init: Initializer = nnx.initializers.ones_init(),
        dt_kernel_init: Initializer = nnx.initializers.lecun_normal(),
        dt_bias_init: Initializer = nnx.initializers.zeros_init(),
        rngs: nnx.Rngs,
    ):
        h, hkv, d = resolve_heads(num_heads, num_kv_heads, head_dim, in_features)
        self.in_features = in_features
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, d
        self.window_size = window_size
        self.is_causal = is_causal
        self.use_dynamic_bias = use_dynamic_bias
        self.use_block_topk = use_block_topk
        self.block_q, self.block_k = block_q, block_k
        self.rope_theta = rope_theta
        self.scale, self.softcap = scale, softcap
        self.implementation = implementation
        self.deterministic_backward = deterministic_backward
        self.decode = decode
        self.sow_bias = sow_bias
        self.out_features = out_features or in_features

        def linear(in_f, out_f, **kw):
            return nnx.LinearGeneral(
                in_f, out_f, use_bias=use_proj_bias, dtype=dtype, param_dtype=param_dtype,
                precision=precision, kernel_init=kernel_init, rngs=rngs, **kw,
            )

        self.q_proj = linear(in_features, (h, d))
        self.k_proj = linear(in_features, (hkv, d))
        self.v_proj = linear(in_features, (hkv, d))
        self.o_proj = linear((h, d), self.out_features, axis=(-2, -1))
        if use_dynamic_bias:
            self.dt_proj = HeadwiseLinear(
                hkv, d, param_dtype=param_dtype, kernel_init=dt_kernel_init,
                bias_init=dt_bias_init, rngs=rngs,
            )
            self.A = nnx.Param(a_init(rngs.params(), (hkv,), param_dtype))
        else:
            self.dt_proj = None
            self.A = None

    def init_cache(self, input_shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> None:
        """Creates the decoding cache for inputs of ``input_shape`` [B, T, E] (nnx's convention): ``cached_key`` and
        ``cached_value`` [B, T, Hkv, D] in ``dtype``, with the dynamic bias ``cached_bias`` [B, Hkv, 1, T] in float32,
        and ``cache_index`` 0."""
        b, t = input_shape[0], input_shape[1]
        shape = (b, t, self.num_kv_heads, self.head_dim)
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
        if self.use_dynamic_bias:
            self.cached_bias = nnx.Cache(jnp.zeros((b, self.num_kv_heads, 1, t), jnp.float32))
        self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))

    def __call__(self, x: Array, mask: Array | None = None, *, positions: Array | None = None,
                 segment_ids: Array | None = None, decode: bool | None = None) -> Array:
        """``decode`` (default: the constructor's): one decoding step of one token ``x`` [B, 1, E] over the cache
        of :meth:`init_cache` (see :func:`jax_dmattn.flax.decode_step`). ``segment_ids`` (int [B, L]): packed
        documents, as in the linen module (not with decode)."""
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must be [batch, length, {self.in_features}], got shape {tuple(x.shape)}"
            )
        decode = self.decode if decode is None else decode
        if decode and not hasattr(self, "cached_key"):
            raise ValueError("decode: call init_cache(input_shape) before the first decoding step")
        q = self.q_proj(x)
        k = self.k_proj(x)
        v = self.v_proj(x)
        bias = None
        if self.use_dynamic_bias:
            dt = self.dt_proj
            bias = dynamic_bias(
                v, dt.kernel[...], None if dt.bias is None else dt.bias[...], self.A[...]
            )
        if decode:
            check_decode_segments(segment_ids)
            cache = (self.cached_key[...], self.cached_value[...],
                     self.cached_bias[...] if bias is not None else None, self.cache_index[...])
            out, (key, value, bias_cache, index) = decode_step(self, q, k, v, bias, mask, positions, cache)
            self.cached_key[...] = key
            self.cached_value[...] = value
            if bias is not None:
                self.cached_bias[...] = bias_cache
            self.cache_index[...] = index
            return self.o_proj(out)
        q, k = rope_qk(q, k, positions, self.rope_theta)
        if bias is not None and self.sow_bias:
            self.sow(nnx.Intermediate, "dynamic_bias", bias)
        return self.o_proj(module_attention(self, q, k, v, bias, mask, segment_ids=segment_ids))
