"""Everything jax_dmattn takes from jax's private modules or that differs between the jax versions it supports
(0.10 and 0.11), in one place: when jax moves one of them, this file is the one to change."""
from __future__ import annotations

import jax
from jax._src import dispatch as _dispatch

# A primitive's eager implementation: compile the primitive alone and run it (jax has no public spelling).
apply_primitive = _dispatch.apply_primitive


def require_devices_during_lowering(prim) -> None:
    """Marks a primitive whose lowering needs the device assignment (custom_partitioning does)."""
    getattr(_dispatch, "prim_requires_devices_during_lowering", set()).add(prim)


def mlir_ir():
    """The MLIR Python bindings jax lowers with (the Shardy rule reads operand types through them)."""
    from jax._src.lib.mlir import ir

    return ir


def no_abstract_mesh():
    """A context in which nothing is traced under an abstract mesh (no public spelling in jax 0.10 / 0.11)."""
    from jax._src import mesh as mesh_lib

    return mesh_lib.use_abstract_mesh(mesh_lib.empty_abstract_mesh)


def to_varying(x, axes):
    """x cast to vary over the manual mesh `axes` (shard_map's check_vma): jax.lax.pcast, or pvary before it."""
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axes, to="varying")
    return jax.lax.pvary(x, axes)  # pragma: no cover - jax before pcast


def shard_map():
    """jax.shard_map, or the experimental one of older jax."""
    fn = getattr(jax, "shard_map", None)
    if fn is None:  # pragma: no cover - older jax
        from jax.experimental.shard_map import shard_map as fn
    return fn


def sharding_of(x):
    """The sharding in x's type (a tracer's under Explicit axes, a concrete array's), or None."""
    return getattr(jax.typeof(x), "sharding", None)
