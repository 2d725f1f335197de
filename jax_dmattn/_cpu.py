"""The CPU kernels as traced JAX functions (used inside the cpu lowerings of ``dmattn_fwd`` / ``dmattn_bwd``).

Two FFI targets, ``dmattn_fwd_cpu`` and ``dmattn_bwd_cpu`` (csrc/ffi/cpu_handlers.cc, kernels in csrc/cpu/), take
the canonical layout of docs/design.md: q [B, Lq, H, D], k / v [B, Lk, Hkv, D] (float32, bfloat16 or float16),
bias and mask rank 4 with broadcast dims of size 1, or zero-size when absent. A compact mask reaches the kernels
in its normal form (jax_dmattn/_compact.py) with the operands its kind needs: a TopKMask as its scores plus each
query row's k-th (score, key) threshold, key indices as they are. Nothing of size Lq x Lk is built for either.
Row bounds (segment ids, windows, lengths: jax_dmattn/_bounds.py) follow the mask operands as int32 rows
[1|B, Lq, 3] and key segment ids [1|B, Lk], zero-size when absent; with them the kernels apply no causal rule of
their own (``kernel_causal``), while ``is_causal`` still scopes a TopKMask's selection.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_dmattn import _compact, _ffi

FWD_TARGET = "dmattn_fwd_cpu"
BWD_TARGET = "dmattn_bwd_cpu"


def _mask_operands(mask, rows, key_segments, *, q_len: int, is_causal: bool, mask_kind: str, mask_k: int):
    """(mask, row_threshold, row_threshold_key) operands and the mask_kind attribute."""
    operands = _compact.cpu_operands(mask, mask_kind, mask_k, q_len=q_len, is_causal=is_causal, rows=rows,
                                     key_segments=key_segments)
    return operands, np.int64(_ffi.kernel_facts()["mask_kinds"][mask_kind])


def _attrs(scale: float, softcap: float, kernel_causal: bool):
    return dict(scale=np.float32(scale), softcap=np.float32(softcap), is_causal=np.bool_(kernel_causal))


def _bounds_operands(rows, key_segments):
    absent = jnp.zeros((0,), jnp.int32)
    return (absent if rows is None else rows), (absent if key_segments is None else key_segments)


def flash_fwd(q, k, v, bias, mask, rows=None, key_segments=None, *, scale: float, softcap: float, is_causal: bool,
              kernel_causal: bool | None = None, mask_kind: str = "bool", mask_k: int = 0):
    """out [B, Lq, H, D] (q dtype), lse [B, H, Lq] f32 (natural log; rows without a kept key: out 0, lse -inf).
    bias / mask: zero-size when absent; rows / key_segments: None when absent."""
    _ffi.register_targets()
    b, lq, h, _ = q.shape
    out_types = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, lq), jnp.float32))
    mask_operands, kind = _mask_operands(mask, rows, key_segments, q_len=lq, is_causal=is_causal, mask_kind=mask_kind,
                                         mask_k=mask_k)
    kernel_causal = is_causal if kernel_causal is None else kernel_causal
    return jax.ffi.ffi_call(FWD_TARGET, out_types)(q, k, v, bias, *mask_operands,
                                                   *_bounds_operands(rows, key_segments), mask_kind=kind,
                                                   **_attrs(scale, softcap, kernel_causal))


def flash_bwd(q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse, *, scale: float, softcap: float,
              is_causal: bool, deterministic: bool, kernel_causal: bool | None = None, mask_kind: str = "bool",
              mask_k: int = 0):
    """(dq, dk, dv, dbias), each in its operand's shape and dtype (dbias zero-size when bias is)."""
    _ffi.register_targets()
    out_types = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, bias))
    mask_operands, kind = _mask_operands(mask, rows, key_segments, q_len=q.shape[1], is_causal=is_causal,
                                         mask_kind=mask_kind, mask_k=mask_k)
    kernel_causal = is_causal if kernel_causal is None else kernel_causal
    return jax.ffi.ffi_call(BWD_TARGET, out_types)(q, k, v, bias, *mask_operands,
                                                   *_bounds_operands(rows, key_segments), out, lse, dout, dlse,
                                                   deterministic=np.bool_(deterministic), mask_kind=kind,
                                                   **_attrs(scale, softcap, kernel_causal))
