"""The kernels as JAX primitives, and the ``jax.custom_vjp`` that ties forward and backward together.

Two primitives, ``dmattn_fwd`` and ``dmattn_bwd``, take the canonical layout of docs/design.md. Each lowers,
per platform, to an XLA FFI custom call (``mlir.lower_fun`` over ``jax.ffi.ffi_call``), and has a batching
rule that folds vmapped dims into the batch dim, so vmap never becomes a loop. Absent bias / mask travel as
zero-size placeholders so the primitives always have the same operands.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import dispatch
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_dmattn import _ffi, reference


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    scale: float
    softcap: float  # 0.0: off
    is_causal: bool
    deterministic: bool
    implementation: str  # "cpu" | "cuda"


def _absent(dtype):
    return jnp.zeros((0,), dtype)


def _is_absent(x) -> bool:
    return x.ndim == 1 and x.shape[0] == 0


# ----------------------------------------------------------------------------------------------- forward
dmattn_fwd_p = Primitive("dmattn_fwd")
dmattn_fwd_p.multiple_results = True
dmattn_fwd_p.def_impl(functools.partial(dispatch.apply_primitive, dmattn_fwd_p))


@dmattn_fwd_p.def_abstract_eval
def _fwd_abstract(q, k, v, bias, mask, *, config):
    b, lq, h, _ = q.shape
    return (jax.core.ShapedArray(q.shape, q.dtype), jax.core.ShapedArray((b, h, lq), jnp.float32))


def _attrs(config: KernelConfig):
    return dict(scale=np.float32(config.scale), softcap=np.float32(config.softcap),
                is_causal=np.bool_(config.is_causal))


def _check_platform(config: KernelConfig, platform: str):
    if config.implementation != platform:
        raise ValueError(f"implementation={config.implementation!r} cannot run on the {platform} platform; "
                         f"use implementation=None to pick the kernels of the platform in use")


def _fwd_cpu(q, k, v, bias, mask, *, config):
    _check_platform(config, "cpu")
    b, lq, h, _ = q.shape
    out_types = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, lq), jnp.float32))
    return jax.ffi.ffi_call("dmattn_fwd", out_types)(q, k, v, bias, mask, **_attrs(config))


def _fwd_cuda(q, k, v, bias, mask, *, config):
    _check_platform(config, "cuda")
    from jax_dmattn import _cuda

    out, lse = _cuda.flash_fwd(q, k, v, None if _is_absent(bias) else bias, None if _is_absent(mask) else mask,
                               scale=config.scale, softcap=config.softcap, is_causal=config.is_causal)
    return out, lse


mlir.register_lowering(dmattn_fwd_p, mlir.lower_fun(_fwd_cpu, multiple_results=True), platform="cpu")
mlir.register_lowering(dmattn_fwd_p, mlir.lower_fun(_fwd_cuda, multiple_results=True), platform="cuda")


# ---------------------------------------------------------------------------------------------- backward
dmattn_bwd_p = Primitive("dmattn_bwd")
dmattn_bwd_p.multiple_results = True
dmattn_bwd_p.def_impl(functools.partial(dispatch.apply_primitive, dmattn_bwd_p))


@dmattn_bwd_p.def_abstract_eval
def _bwd_abstract(q, k, v, bias, mask, out, lse, dout, dlse, *, config):
    return tuple(jax.core.ShapedArray(x.shape, x.dtype) for x in (q, k, v, bias))


def _bwd_cpu(q, k, v, bias, mask, out, lse, dout, dlse, *, config):
    _check_platform(config, "cpu")
    out_types = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, bias))
    return jax.ffi.ffi_call("dmattn_bwd", out_types)(q, k, v, bias, mask, out, lse, dout, dlse,
                                                     deterministic=np.bool_(config.deterministic),
                                                     **_attrs(config))


def _bwd_cuda(q, k, v, bias, mask, out, lse, dout, dlse, *, config):
    """Until the CUDA backward kernel lands, the GPU backward is the reference's VJP (dense, O(L^2) memory)."""
    _check_platform(config, "cuda")
    has_bias, has_mask = not _is_absent(bias), not _is_absent(mask)

    def f(q, k, v, bias):
        return reference.reference_core(q, k, v, bias if has_bias else None, mask if has_mask else None,
                                        scale=config.scale, is_causal=config.is_causal, softcap=config.softcap)

    _, vjp = jax.vjp(f, q, k, v, bias)
    dq, dk, dv, dbias = vjp((dout, dlse))
    return dq, dk, dv, dbias


mlir.register_lowering(dmattn_bwd_p, mlir.lower_fun(_bwd_cpu, multiple_results=True), platform="cpu")
mlir.register_lowering(dmattn_bwd_p, mlir.lower_fun(_bwd_cuda, multiple_results=True), platform="cuda")


# ---------------------------------------------------------------------------------------------- batching
def _fold(x, bdim, n, full_batch, keep_broadcast):
    """Moves the vmapped dim of x to the front and merges it into x's batch dim (dim 0 of the rest).

    An operand whose batch dim is 1 may stay broadcast when it is not vmapped and keep_broadcast is set.
    Otherwise it is broadcast to [n, full_batch, ...] first, so batch index n_i * full_batch + b lines up.
    """
    if _is_absent(x) if bdim is None else False:
        return x
    if bdim is None:
        if keep_broadcast and x.shape[0] == 1:
            return x
        x = jnp.broadcast_to(x[None], (n,) + x.shape)
    else:
        x = jnp.moveaxis(x, bdim, 0)
    if x.shape[1] != full_batch:
        x = jnp.broadcast_to(x, (n, full_batch) + x.shape[2:])
    return x.reshape((n * full_batch,) + x.shape[2:])


def _unfold(x, n):
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])


def _batch_size(args, dims):
    return next(a.shape[d] for a, d in zip(args, dims) if d is not None)


def _fwd_batch(args, dims, *, config):
    q, k, v, bias, mask = args
    n = _batch_size(args, dims)
    b = (q if dims[0] is None else jnp.moveaxis(q, dims[0], 0)[0]).shape[0]
    q, k, v = (_fold(x, d, n, b, keep_broadcast=False) for x, d in zip((q, k, v), dims[:3]))
    bias = _fold(bias, dims[3], n, b, keep_broadcast=True)
    mask = _fold(mask, dims[4], n, b, keep_broadcast=True)
    out, lse = dmattn_fwd_p.bind(q, k, v, bias, mask, config=config)
    return (_unfold(out, n), _unfold(lse, n)), (0, 0)


def _bwd_batch(args, dims, *, config):
    q, k, v, bias, mask, out, lse, dout, dlse = args
    n = _batch_size(args, dims)
    b = (q if dims[0] is None else jnp.moveaxis(q, dims[0], 0)[0]).shape[0]
    q, k, v, out, lse, dout, dlse = (_fold(x, d, n, b, keep_broadcast=False)
                                     for x, d in zip((q, k, v, out, lse, dout, dlse), dims[:3] + dims[5:]))
    # dbias must come out per vmapped example, so a batch-broadcast bias is expanded; the mask may stay shared.
    bias_batch = bias.shape[0] if dims[3] is None else jnp.moveaxis(bias, dims[3], 0).shape[1]
    has_bias = not (dims[3] is None and _is_absent(bias))
    bias = _fold(bias, dims[3], n, b, keep_broadcast=False) if has_bias else bias
    mask = _fold(mask, dims[4], n, b, keep_broadcast=True)
    dq, dk, dv, dbias = dmattn_bwd_p.bind(q, k, v, bias, mask, out, lse, dout, dlse, config=config)
    if has_bias:
        dbias = _unfold(dbias, n)
        if bias_batch == 1 and b != 1:
            dbias = jnp.sum(dbias, axis=1, keepdims=True)
    else:
        dbias = jnp.broadcast_to(dbias[None], (n,) + dbias.shape)
    return (_unfold(dq, n), _unfold(dk, n), _unfold(dv, n), dbias), (0, 0, 0, 0)


batching.primitive_batchers[dmattn_fwd_p] = _fwd_batch
batching.primitive_batchers[dmattn_bwd_p] = _bwd_batch


# ---------------------------------------------------------------------------------------------- custom_vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def flash_attention(q, k, v, bias, mask, config: KernelConfig):
    """Canonical-layout attention through the kernels: returns (out, lse). bias/mask may be None."""
    return _forward(q, k, v, bias, mask, config)


def _forward(q, k, v, bias, mask, config):
    bias_arg = _absent(jnp.float32) if bias is None else bias
    mask_arg = _absent(jnp.bool_) if mask is None else mask
    out, lse = dmattn_fwd_p.bind(q, k, v, bias_arg, mask_arg, config=config)
    return out, lse


def _vjp_fwd(q, k, v, bias, mask, config):
    out, lse = _forward(q, k, v, bias, mask, config)
    return (out, lse), (q, k, v, bias, mask, out, lse)


def _vjp_bwd(config, residuals, cotangents):
    q, k, v, bias, mask, out, lse = residuals
    dout, dlse = cotangents
    bias_arg = _absent(jnp.float32) if bias is None else bias
    mask_arg = _absent(jnp.bool_) if mask is None else mask
    dout = jnp.asarray(dout, out.dtype)
    dlse = jnp.asarray(dlse, jnp.float32)
    dq, dk, dv, dbias = dmattn_bwd_p.bind(q, k, v, bias_arg, mask_arg, out, lse, dout, dlse, config=config)
    return dq, dk, dv, (None if bias is None else dbias), None


flash_attention.defvjp(_vjp_fwd, _vjp_bwd)
