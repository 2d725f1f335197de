"""Registers the extension's FFI handlers with XLA (CPU always; CUDA when built with it)."""
from __future__ import annotations

import functools

import jax


@functools.cache
def extension():
    """The compiled module, or None when the package was installed without it (pure-jnp use only)."""
    try:
        from jax_dmattn import _jax_dmattn_ext
    except ImportError:
        return None
    return _jax_dmattn_ext


@functools.cache
def register_targets() -> dict[str, tuple[str, ...]]:
    """Registers every handler once; returns the registered target names by platform."""
    ext = extension()
    if ext is None:
        return {"cpu": (), "CUDA": ()}
    registered = {}
    for platform, targets in (("cpu", ext.cpu_targets()), ("CUDA", ext.cuda_targets())):
        for name, capsule in targets.items():
            jax.ffi.register_ffi_target(name, capsule, platform=platform)
        registered[platform] = tuple(targets)
    return registered


@functools.cache
def kernel_facts() -> dict:
    """The kernels' tile sizes, head dims, key-list geometry and capacities (csrc/kernel_facts.h), as the
    extension exports them: the one source of these numbers for the Python side."""
    ext = extension()
    if ext is None:
        raise RuntimeError("jax_dmattn was installed without its compiled extension: the kernels (and their facts) "
                           "are unavailable; implementation='xla' runs the pure-jnp reference")
    return dict(ext.kernel_facts())


def has_cpu_kernels() -> bool:
    return bool(register_targets()["cpu"])


def has_cuda_kernels() -> bool:
    return "dmattn_fwd_cuda" in register_targets()["CUDA"]
