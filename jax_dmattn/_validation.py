"""Argument checks and normalisation for :func:`jax_dmattn.attention`.

Every check raises before anything is traced into a kernel, with a message that names the argument, what it
got and what it needs. The result, :class:`NormalizedCall`, is the canonical FFI layout of docs/design.md.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_dmattn import _compact, _ffi, masks

IMPLEMENTATIONS = ("cuda", "cpu", "xla")
# The kernel implementation of each JAX platform: what implementation=None runs there.
PLATFORM_KERNELS = {"cpu": "cpu", "gpu": "cuda"}
KERNEL_DTYPES = {
    "cuda": (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)),
    "cpu": (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)),
}
# Bias dtypes the kernels read natively; other float dtypes are cast to float32 (and dbias cast back by autodiff).
KERNEL_BIAS_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def cuda_head_dims() -> tuple[int, ...]:
    """Head dims the CUDA kernels are instantiated for (csrc/kernel_facts.h); other D up to the largest are
    zero-padded up to the next one."""
    return _ffi.kernel_facts()["cuda_head_dims"]


def kernel_max_head_dim(implementation: str) -> int | None:
    """Largest head dim of a kernel implementation (None: any; the CPU kernels size their tile buffers by D)."""
    return cuda_head_dims()[-1] if implementation == "cuda" else None


@dataclasses.dataclass(frozen=True)
class CallDims:
    """The sizes of one attention call: q [batch, q_len, heads, head_dim], k / v [batch, kv_len, kv_heads, ...]."""
    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int


@dataclasses.dataclass(frozen=True)
class NormalizedCall(CallDims):
    scale: float
    softcap: float  # 0.0: off
    bias: jax.Array | None  # rank 4 [1|B, 1|Hkv|H, 1|Lq, 1|Lk]
    # rank 4, by mask_kind (jax_dmattn/_compact.py): "bool": bool, same rule as bias; "topk": scores
    # [1|B, 1|Hkv|H, 1, Lk] as given (f32, bf16 or f16), ranked by their canonical form, with mask_k = k < Lk;
    # "indices": int32 [1|B, 1|Hkv|H, 1|Lq, K], rows sorted, duplicates and invalid entries replaced by INDEX_PAD.
    mask: jax.Array | None
    mask_kind: str = "bool"
    mask_k: int = 0


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _check_qkv(query, key, value):
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if len(x.shape) != 4:
            raise ValueError(f"{name} must have rank 4 ([batch, length, heads, head_dim]), "
                             f"got shape {_shape_str(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, "
                        f"{value.dtype}")
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape, got {_shape_str(key.shape)} and "
                         f"{_shape_str(value.shape)}")
    b, _, h, d = query.shape
    bk, _, hkv, dk = key.shape
    if d == 0:
        # The default scale D ** -0.5 is undefined and no kernel has a use for it: one answer everywhere.
        raise ValueError(f"query/key/value head_dim must be >= 1, got 0 (query shape {_shape_str(query.shape)})")
    if bk != b:
        raise ValueError(f"key batch size {bk} does not match query batch size {b}")
    if dk != d:
        raise ValueError(f"key head_dim {dk} does not match query head_dim {d}")
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")


def _normalize_broadcast(name, x, dims):
    """Left-pads x to rank 4 and checks each dim is 1 or full (head dim: 1, Hkv or H)."""
    b, h, hkv, lq, lk = dims
    if x.ndim > 4:
        raise ValueError(f"{name} must have rank <= 4 (broadcastable to [batch, heads, q_len, kv_len]), "
                         f"got shape {_shape_str(x.shape)}")
    x4 = jnp.reshape(x, (1,) * (4 - x.ndim) + tuple(x.shape))
    ok = (x4.shape[0] in (1, b) and x4.shape[1] in (1, hkv, h) and x4.shape[2] in (1, lq)
          and x4.shape[3] in (1, lk))
    if not ok:
        raise ValueError(
            f"{name} of shape {_shape_str(x.shape)} is not broadcastable to [batch, heads, q_len, kv_len] = "
            f"{_shape_str((b, h, lq, lk))}: each dim must be 1 or full, and the head dim 1, {hkv} (kv heads) "
            f"or {h} (query heads)")
    return x4


def _check_positive_finite(name, value):
    if isinstance(value, (bool, np.bool_, str, bytes)) or np.ndim(value) != 0:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise TypeError(f"{name} must be a static Python number, got {type(value).__name__}") from e
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def check_implementation(implementation):
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")


# What implementation="xla" costs, for the messages that point to it.
REFERENCE_HINT = ("implementation='xla' for the pure-jnp reference, which materialises the [B, H, Lq, Lk] scores "
                  "(O(Lq * Lk) memory)")


def check_backend_support(implementation, dtype, head_dim, *, platform=None):
    """dtype / head-dim limits of a kernel implementation ("xla" has none).

    An explicit ``implementation`` raises TypeError (dtype) or ValueError (head dim). ``platform`` set means
    ``implementation`` is the one ``implementation=None`` picked for that platform: both then raise ValueError,
    saying that None runs those kernels and what implementation="xla" would cost.
    """
    if implementation == "xla":
        return
    dtype = jnp.dtype(dtype)
    allowed = KERNEL_DTYPES[implementation]
    max_d = kernel_max_head_dim(implementation)
    who = (f"implementation={implementation!r}" if platform is None else
           f"implementation=None on {platform} runs the {implementation!r} kernels, which")
    if dtype not in allowed:
        names = ", ".join(str(a) for a in allowed)
        if platform is None:
            raise TypeError(f"{who} supports query/key/value dtypes {names}, got {dtype}"
                            + ("; use implementation='cpu' or 'xla' for float32" if implementation == "cuda" else ""))
        raise ValueError(f"{who} support query/key/value dtypes {names}, got {dtype}: cast the inputs to one of "
                         f"them, or pass {REFERENCE_HINT}")
    if max_d is not None and head_dim > max_d:
        if platform is None:
            raise ValueError(f"{who} supports head_dim <= {max_d}, got {head_dim}; pass {REFERENCE_HINT}")
        raise ValueError(f"{who} support head_dim <= {max_d}, got {head_dim}: pass {REFERENCE_HINT}")


def missing_kernels_message(implementation, platform=None) -> str:
    """Why ``implementation`` ("cpu" / "cuda") cannot run in this install, and what to do."""
    who = (f"implementation={implementation!r} needs" if platform is None else
           f"implementation=None on {platform} runs the {implementation!r} kernels, which need")
    if implementation == "cpu":
        return (f"{who} the compiled extension, which is not installed; reinstall jax_dmattn from source, or "
                f"pass {REFERENCE_HINT}")
    return (f"{who} the extension built with CUDA kernels; rebuild with a CUDA toolkit and the CuTe headers "
            f"(see README), or pass {REFERENCE_HINT}")


def check_flag(name, value) -> bool:
    """A bool keyword of attention: a Python bool or numpy bool_ (it picks the kernel and the Python path, so it
    is static; an int, a string or None is a mistake, not a truth value)."""
    if not isinstance(value, (bool, np.bool_)):
        got = repr(value) if value is None or isinstance(value, (str, bytes, int, float)) else type(value).__name__
        raise TypeError(f"{name} must be a bool (True or False), got {got}")
    return bool(value)


def normalize_call(query, key, value, bias, mask, *, scale, softcap, implementation) -> NormalizedCall:
    check_implementation(implementation)
    _check_qkv(query, key, value)
    b, lq, h, d = query.shape
    lk, hkv = key.shape[1], key.shape[2]
    dims = (b, h, hkv, lq, lk)
    if bias is not None:
        if not hasattr(bias, "dtype") or not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"bias must have a floating dtype, got {getattr(bias, 'dtype', type(bias).__name__)}")
        bias = _normalize_broadcast("bias", jnp.asarray(bias), dims)
    mask_kind, mask_k = "bool", 0
    if isinstance(mask, masks.COMPACT_MASKS):
        mask, mask_kind, mask_k = _compact.normalize(mask, dims)
    elif mask is not None:
        if not hasattr(mask, "dtype") or mask.dtype != jnp.bool_:
            raise TypeError(f"mask must be a bool array (True = attend), a TopKMask or a KeyIndices, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        mask = _normalize_broadcast("mask", jnp.asarray(mask), dims)
    scale = d ** -0.5 if scale is None else _check_positive_finite("scale", scale)
    softcap = 0.0 if softcap is None else _check_positive_finite("softcap", softcap)
    if implementation is not None:
        check_backend_support(implementation, query.dtype, d)
    return NormalizedCall(batch=b, q_len=lq, kv_len=lk, heads=h, kv_heads=hkv, head_dim=d, scale=float(scale),
                          softcap=float(softcap), bias=bias, mask=mask, mask_kind=mask_kind, mask_k=mask_k)
