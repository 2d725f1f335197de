"""Partitioning rules for the attention primitives under ``jit`` with sharded inputs.

Each primitive's per-platform lowering goes through a
:class:`jax.experimental.custom_partitioning.custom_partitioning` wrapper of the FFI call (see
``_primitives.py``). It carries

* a **Shardy sharding rule** (Shardy is JAX's default partitioner) that ties the batch dims of every operand
  and result together, the query-head dims of q / out / lse / bias together, and the kv-head dims of k / v
  (and of a bias or mask with ``Hkv`` heads) to the query heads as the major part of a compound factor
  ``(hkv, g)``: the query heads of one kv head are contiguous (GQA), so sharding ``H`` over n devices with
  ``n | Hkv`` shards ``Hkv`` the same way (used when the mesh size divides ``Hkv``, so Shardy never has to
  split a mesh axis into sub-axes; otherwise the kv heads get a factor of their own);
* a ``partition`` callback that receives the shardings the partitioner picked, checks them and returns the
  per-device computation: the same FFI call on the local shard, plus the collectives that gradients of
  replicated operands need;
* a GSPMD ``infer_sharding_from_operands`` callback for ``jax_use_shardy_partitioner=False``.

What the per-device computation is, for a mesh with batch axes ``bA`` (those sharding q's batch dim) and head
axes ``hA`` (those sharding q's head dim, n devices in all):

* q, out, dout, dq: ``P(bA, None, hA, None)``; lse, dlse: ``P(bA, hA, None)``.
* k, v, dk, dv: ``P(bA, None, hA, None)`` when ``n | Hkv`` ("split" kv heads). When ``Hkv | n`` instead (MQA, or
  more tensor-parallel ranks than kv heads) k and v stay replicated over hA, each device slices the one kv head
  its query heads read, and dk / dv are scattered back and summed over hA. Anything else is a ValueError.
* bias / mask: the batch dim follows bA when it is full (B), else (size 1) it is replicated; the head dim
  follows hA (H heads) or the kv layout (Hkv heads), or is replicated (1 head). dbias of a dim that is
  replicated while the matching dim of q is sharded is a partial sum per device and is ``psum``-ed over those
  axes, so dbias always equals the single-device result.
* Query and key lengths split over one and the same mesh axis: the call runs context-parallel on each device
  (``_lower_context_parallel``, jax_dmattn/context_parallel.py). Other sequence splits and head-dim (D) sharding
  raise a ValueError.

Under ``shard_map`` / ``pmap`` (all mesh axes manual) ``custom_partitioning`` lowers the plain FFI call on the
per-device blocks, so none of this runs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import (ArrayMapping, CompoundFactor, SdyShardingRule,
                                                  custom_partitioning)
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_dmattn import _jax_compat, _validation

# Operand / result layouts, one role per dim. "bcast" dims (bias / mask) are resolved from the shapes.
_Q = ("b", "lq", "h", "d")
_KV = ("b", "lk", "hkv", "d")
_LSE = ("b", "h", "lq")
_BCAST = ("bcast_b", "bcast_h", "bcast_lq", "bcast_lk")
# Row bounds (jax_dmattn/_bounds.py): rows [1|B, Lq, 3], key segment ids [1|B, Lk].
_ROWS = ("bcast_b", "lq", "one")
_KEY_SEGMENTS = ("bcast_b", "lk")

# fwd: (q, k, v, bias, mask, rows, key_segments) -> (out, lse)
# bwd: (q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse) -> (dq, dk, dv, dbias)
_LAYOUTS = {
    "fwd": ((_Q, _KV, _KV, _BCAST, _BCAST, _ROWS, _KEY_SEGMENTS), (_Q, _LSE)),
    "bwd": ((_Q, _KV, _KV, _BCAST, _BCAST, _ROWS, _KEY_SEGMENTS, _Q, _LSE, _Q, _LSE), (_Q, _KV, _KV, _BCAST)),
}
_OPERAND_NAMES = {
    "fwd": ("query", "key", "value", "bias", "mask", "row bounds", "kv_segment_ids"),
    "bwd": ("query", "key", "value", "bias", "mask", "row bounds", "kv_segment_ids", "out", "lse", "dout", "dlse"),
}
_DIM_NAMES = {"b": "batch", "lq": "query length", "lk": "key length", "h": "heads", "hkv": "kv heads",
              "d": "head_dim", "one": "broadcast", "empty": "placeholder"}
_UNSHARDABLE = ("lq", "lk", "d")


def _dims_from_shapes(shapes) -> _validation.CallDims:
    q, k = shapes[0], shapes[1]
    return _validation.CallDims(batch=q[0], q_len=q[1], kv_len=k[1], heads=q[2], kv_heads=k[2], head_dim=q[3])


def _bcast_roles(shape, dims: _validation.CallDims):
    """Roles of a rank-4 bias / mask ([1|B, 1|Hkv|H, 1|Lq, 1|Lk]); ("empty",) for the (0,) placeholder."""
    if len(shape) == 1:
        return ("empty",)
    b, h, m, n = shape
    rb = "b" if b == dims.batch else "one"
    rh = "h" if h == dims.heads else ("hkv" if h == dims.kv_heads else "one")
    rm = "lq" if m == dims.q_len else "one"
    rn = "lk" if n == dims.kv_len else "one"
    return (rb, rh, rm, rn)


def _roles(kind, shapes, mask_kind: str = "bool"):
    """Per-operand and per-result dim roles for concrete (global or local) shapes. A KeyIndices mask
    (``mask_kind`` "indices": [1|B, 1|Hkv|H, 1|Lq, K]) has no key dim: its last dim is a list of key positions."""
    dims = _dims_from_shapes(shapes)
    operand_layouts, result_layouts = _LAYOUTS[kind]

    def resolve(layout, shape):
        if layout is _BCAST:
            return _bcast_roles(shape, dims)
        if layout in (_ROWS, _KEY_SEGMENTS):  # batch dim 1 or B; the (0,) placeholder when absent
            if len(shape) == 1:
                return ("empty",)
            return ("b" if shape[0] == dims.batch else "one",) + layout[1:]
        return layout

    operands = tuple(resolve(lay, s) for lay, s in zip(operand_layouts, shapes))
    if mask_kind == "indices" and len(operands[4]) == 4:
        operands = operands[:4] + (operands[4][:3] + ("one",),) + operands[5:]
    bias_roles = operands[3]
    results = tuple(bias_roles if lay is _BCAST else lay for lay in result_layouts)
    return dims, operands, results


# ------------------------------------------------------------------------------------------ Shardy rule
def _sharding_rule(kind):
    """The Shardy rule as a callable of the concrete operand types (factors depend on GQA and broadcasts)."""

    def rule(config, mesh, operand_types, result_types):
        ir = _jax_compat.mlir_ir()
        shapes = [tuple(ir.RankedTensorType(t).shape) for t in operand_types]
        dims, operand_roles, result_roles = _roles(kind, shapes, config.mask_kind)
        h, hkv = dims.heads, dims.kv_heads
        factor_sizes = {}
        n_devices = math.prod(dict(getattr(mesh, "shape", {}) or {}).values())
        if hkv == h:
            head_factor, kv_factor = "h", "h"
        elif hkv == 1 or hkv % n_devices:
            # MQA, or a head sharding (over any subset of the mesh axes) might not divide the kv heads: the
            # kv-head dims get a factor of their own. Otherwise Shardy could split a mesh axis into sub-axes over
            # (hkv, g), which custom_partitioning cannot hand to partition(). partition() still shards k / v
            # like q's heads when that divides Hkv, and else replicates and slices them per device.
            head_factor, kv_factor = "h", ("hkv" if hkv > 1 else None)
        else:
            head_factor, kv_factor = CompoundFactor("hkv", "g"), "hkv"
            factor_sizes["g"] = h // hkv
        counter = iter(range(1_000_000))

        def mapping(roles):
            out = []
            for role in roles:
                if role == "h":
                    out.append(head_factor)
                elif role == "hkv":
                    out.append(kv_factor if kv_factor is not None else f"u{next(counter)}")
                elif role in ("one", "empty"):
                    out.append(f"u{next(counter)}")  # size 1 or 0: a factor of its own, never sharded
                else:
                    out.append(role)
            return ArrayMapping(*out)

        operand_mappings = tuple(mapping(r) for r in operand_roles)
        result_mappings = tuple(mapping(r) for r in result_roles)
        used = {f for m in operand_mappings + result_mappings for d in m
                for f in ((d,) if isinstance(d, str) else d)}
        # In the forward the key length is contracted away: a reduction factor (if sharded, partition() says
        # clearly that context parallelism does not exist yet, instead of Shardy gathering silently).
        reduction = ("lk",) if kind == "fwd" and "lk" in used else ()
        factor_sizes = {k: v for k, v in factor_sizes.items() if k in used}
        return SdyShardingRule(operand_mappings, result_mappings, reduction_factors=reduction, **factor_sizes)

    return rule


# ----------------------------------------------------------------------------------------- partitioning
def _spec_axes(sharding, ndim):
    """The mesh axes sharding each dim, as tuples of names."""
    if sharding is None:  # GSPMD asks before every operand has a sharding: treat as replicated
        return [()] * ndim
    if not isinstance(sharding, NamedSharding):
        raise ValueError(
            f"jax_dmattn.attention under jit got an operand sharding it cannot read ({sharding}); shard the "
            f"inputs with jax.sharding.NamedSharding over a jax.sharding.Mesh")
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    out = []
    for entry in spec[:ndim]:
        if entry is None:
            out.append(())
        elif isinstance(entry, str):
            out.append((entry,))
        else:
            out.append(tuple(entry))
    return out


def _axes_entry(axes):
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


def _axes_size(mesh, axes):
    return math.prod(mesh.shape[a] for a in axes)


def _check_unshardable_dims(name, roles, dim_axes, allowed=()):
    for i, (role, ax) in enumerate(zip(roles, dim_axes)):
        if ax and role in _UNSHARDABLE and role not in allowed:
            raise ValueError(
                f"jax_dmattn.attention: {name} is sharded along its {_DIM_NAMES[role]} dim (dim {i}) over "
                f"mesh axes {tuple(ax)}. A sequence split needs query and key lengths split over the same single "
                f"mesh axis (then the call runs context-parallel, as jax_dmattn.context_parallel.attention does "
                f"inside shard_map); head_dim sharding is not supported. Under jit the sharding may also have "
                f"been propagated from a sequence-sharded "
                f"consumer of the output (out_shardings, a later sharding constraint). Pin query, key and value "
                f"with jax.lax.with_sharding_constraint(x, P(batch_axes, None, head_axes, None)) before the "
                f"call (XLA then reshards the output afterwards).")


def check_input_shardings(q, k, v, bias, mask, rows=None, key_segments=None):
    """Raises the sequence / head_dim sharding ValueError as early as the shardings are known: for concrete
    arrays (eager calls) and for explicit-sharding avals. Under jit with auto sharding the shardings only
    exist inside XLA's partitioner, where the same check runs (see partition())."""
    xs = (q, k, v, bias, mask, rows, key_segments)
    shapes = [(0,) if x is None else tuple(x.shape) for x in xs]
    _, roles, _ = _roles("fwd", shapes)

    def axes_of(x):
        """The mesh axes of each dim where they are known now, else None: a concrete array's, or a tracer's
        under Explicit axes (under Auto axes a tracer's type says nothing about its sharding)."""
        if isinstance(x, jax.core.Tracer):
            sharding = _jax_compat.sharding_of(x)
            axis_types = getattr(getattr(sharding, "mesh", None), "axis_types", ())
            if not any(t == jax.sharding.AxisType.Explicit for t in axis_types):
                return None
        else:
            sharding = getattr(x, "sharding", None)
        return _spec_axes(sharding, len(x.shape)) if isinstance(sharding, NamedSharding) else None

    q_axes, k_axes = axes_of(q), axes_of(k)
    # Query and key lengths split over one axis: the partitioner runs it context-parallel. Where their shardings
    # are not known yet (tracers under jit with Auto axes), the partitioner decides, with the same message.
    seq = q_axes is None or k_axes is None or (len(q_axes[1]) == 1 and q_axes[1] == k_axes[1])
    for name, x, r in zip(_OPERAND_NAMES["fwd"], xs, roles):
        if x is None or axes_of(x) is None:
            continue
        _check_unshardable_dims(name, r, axes_of(x), allowed=("lq", "lk") if seq else ())


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The per-device layout chosen for one call."""

    dims: _validation.CallDims
    operand_roles: tuple
    result_roles: tuple
    batch_axes: tuple
    head_axes: tuple
    kv_mode: str  # "split": kv heads sharded like the query heads; "slice": kv replicated, sliced per device
    seq_axes: tuple = ()  # the mesh axis query and key lengths are split over: context parallelism

    @property
    def kv_axes(self):
        return self.head_axes if self.kv_mode == "split" else ()

    def spec(self, roles):
        entries = []
        # A bias / mask with a query dim stays with its rows (all keys, sliced per chunk); one without travels
        # with its keys (context_parallel's layouts).
        keys_follow = "lq" not in roles
        for role in roles:
            if role == "b":
                entries.append(_axes_entry(self.batch_axes))
            elif role == "h":
                entries.append(_axes_entry(self.head_axes))
            elif role == "hkv":
                entries.append(_axes_entry(self.kv_axes))
            elif role == "lq" or (role == "lk" and keys_follow):
                entries.append(_axes_entry(self.seq_axes))
            else:
                entries.append(None)
        return P(*entries)


def _plan(kind, mesh, arg_shapes, mask_kind: str = "bool") -> _Plan:
    shapes = [tuple(a.shape) for a in arg_shapes]
    dims, operand_roles, result_roles = _roles(kind, shapes, mask_kind)
    axes = [_spec_axes(a.sharding, len(a.shape)) for a in arg_shapes]
    names = _OPERAND_NAMES[kind]
    seq_axes = tuple(axes[0][1])
    if seq_axes and (len(seq_axes) != 1 or tuple(axes[1][1]) != seq_axes):
        seq_axes = ()  # not one axis for both query and key lengths: the clear error below
    for name, roles, dim_axes in zip(names, operand_roles, axes):
        _check_unshardable_dims(name, roles, dim_axes, allowed=("lq", "lk") if seq_axes else ())
    batch_axes, head_axes = tuple(axes[0][0]), tuple(axes[0][2])
    n = _axes_size(mesh, head_axes)
    hkv = dims.kv_heads
    if n == 1 or hkv % n == 0:
        kv_mode = "split"
    elif n % hkv == 0:
        kv_mode = "slice"
    else:
        raise ValueError(
            f"jax_dmattn.attention: query heads ({dims.heads}) are sharded over {n} devices (mesh axes "
            f"{head_axes}) but there are {hkv} kv heads: the head sharding must divide the kv heads, or the kv "
            f"heads must divide it (then k/v are replicated over those axes). Shard the heads {hkv}-way or "
            f"replicate them.")
    if seq_axes and kv_mode != "split":
        raise ValueError(
            f"jax_dmattn.attention: a sequence split over {seq_axes} (context parallelism) needs the kv heads "
            f"sharded like the query heads; got {dims.heads} query heads over {n} devices and {hkv} kv heads")
    return _Plan(dims=dims, operand_roles=operand_roles, result_roles=result_roles, batch_axes=batch_axes,
                 head_axes=head_axes, kv_mode=kv_mode, seq_axes=seq_axes)


def _no_ambient_mesh():
    """The partitioned body is per-device (manual) code. Traced under the user's Explicit-axes mesh context
    (jax.set_mesh), jax 0.11 gives its values mesh shardings, and XLA then rejects the psum reducer
    ("Unsupported reduction computation") or finds unpartitioned Sharding custom calls. So trace it without one."""
    return _jax_compat.no_abstract_mesh()


def _psum(x, axes):
    if not axes:
        return x
    if x.dtype in (jnp.bfloat16, jnp.float16):
        return jax.lax.psum(x.astype(jnp.float32), axes).astype(x.dtype)
    return jax.lax.psum(x, axes)


def _slice_kv_operands(plan, idx, args):
    """kv_mode "slice": keep only kv head idx of k, v and of a bias / mask with Hkv heads."""
    args = list(args)
    for i in (1, 2):
        args[i] = jax.lax.dynamic_slice_in_dim(args[i], idx, 1, axis=2)
    for i in (3, 4):
        if plan.operand_roles[i][1:2] == ("hkv",) and plan.dims.kv_heads > 1:
            args[i] = jax.lax.dynamic_slice_in_dim(args[i], idx, 1, axis=1)
    return args


def _unslice(x, idx, axis, size):
    full = jnp.zeros(x.shape[:axis] + (size,) + x.shape[axis + 1:], x.dtype)
    return jax.lax.dynamic_update_slice_in_dim(full, x, idx, axis=axis)


def _lower_context_parallel(kind, plan, mesh, config, args):
    """The per-device body of a call whose sequence is split over plan.seq_axes: jax_dmattn.context_parallel's
    ring over that axis, then the same dbias sums over broadcast batch / head axes. KeyIndices arrive with their
    rows sharded like the query's (global key positions, as context_parallel takes them); a TopKMask's scores
    sharded like the keys, and each device ranks its rows' keys over the gathered scores (as
    context_parallel.attention does)."""
    from jax_dmattn import context_parallel, masks
    from jax_dmattn._primitives import _is_absent  # (a module-level import would be circular)

    (axis,) = plan.seq_axes
    q, k, v, bias, mask, rows, key_segments = (None if _is_absent(x) else x for x in args[:7])
    n, chunk = mesh.shape[axis], k.shape[1]
    if config.mask_kind == "topk":
        mask = masks.TopKMask(mask[:, :, 0, :], config.mask_k)
    mask, config, rows, key_segments = context_parallel.compact_operands(
        mask, config, rows, key_segments, axis, n, (q.shape[0], q.shape[2], k.shape[2], q.shape[1], chunk))
    layout = context_parallel.layout_for(config, axis, n, q.shape[1], chunk, bias, mask)
    if kind == "fwd":
        return context_parallel.forward(q, k, v, bias, mask, layout, rows, key_segments)
    out, lse, dout, dlse = args[7:]
    dq, dk, dv, dbias = context_parallel.backward(q, k, v, bias, mask, out, lse, dout, dlse, layout, rows,
                                                  key_segments, lse_term=False)
    if bias is None:
        return dq, dk, dv, jnp.zeros_like(args[3])
    return dq, dk, dv, _psum(dbias, _dbias_sum_axes(plan))


def _dbias_sum_axes(plan) -> tuple:
    """The mesh axes whose devices each hold a part of dbias: those a batch- or head-broadcast bias is replicated
    over (with kv_mode "slice", also those a kv-head bias is)."""
    bias_roles = plan.operand_roles[3]
    axes = plan.batch_axes if bias_roles[0] == "one" else ()
    if bias_roles[1] == "one" or (bias_roles[1] == "hkv" and plan.kv_mode == "slice"):
        axes += plan.head_axes
    return axes


def _partition(kind, body):
    def partition(config, mesh, arg_shapes, result_shape):
        plan = _plan(kind, mesh, arg_shapes, config.mask_kind)
        n_heads = _axes_size(mesh, plan.head_axes)
        arg_shardings = tuple(NamedSharding(mesh, plan.spec(r)) for r in plan.operand_roles)
        result_shardings = tuple(NamedSharding(mesh, plan.spec(r)) for r in plan.result_roles)
        bias_roles = plan.operand_roles[3]
        has_bias = bias_roles != ("empty",)

        def kv_index():
            local_heads = plan.dims.heads // n_heads
            group = plan.dims.heads // plan.dims.kv_heads
            return (jax.lax.axis_index(plan.head_axes) * local_heads) // group

        def lower_fn(*args):
            with _no_ambient_mesh():
                return _lower(*args)

        def _lower(*args):
            if plan.seq_axes:
                return _lower_context_parallel(kind, plan, mesh, config, args)
            idx = None
            if plan.kv_mode == "slice":
                idx = kv_index()
                args = _slice_kv_operands(plan, idx, args)
            outs = body(*args, config=config)
            if kind == "fwd":
                return tuple(outs)
            dq, dk, dv, dbias = outs
            if plan.kv_mode == "slice":
                hkv = plan.dims.kv_heads
                dk = _psum(_unslice(dk, idx, 2, hkv), plan.head_axes)
                dv = _psum(_unslice(dv, idx, 2, hkv), plan.head_axes)
            if has_bias:
                if bias_roles[1] == "hkv" and plan.kv_mode == "slice" and plan.dims.kv_heads > 1:
                    dbias = _unslice(dbias, idx, 1, plan.dims.kv_heads)
                dbias = _psum(dbias, _dbias_sum_axes(plan))
            return dq, dk, dv, dbias

        return mesh, lower_fn, result_shardings, arg_shardings

    return partition


def _infer_sharding_from_operands(kind):
    """GSPMD (``jax_use_shardy_partitioner=False``) propagation: results follow the plan."""

    def infer(config, mesh, arg_shapes, result_shape):
        # An exception here aborts the process (XLA CHECK), so never raise: errors are reported by partition().
        try:
            plan = _plan(kind, mesh, arg_shapes, config.mask_kind)
            return tuple(NamedSharding(mesh, plan.spec(r)) for r in plan.result_roles)
        except Exception:  # noqa: BLE001
            return tuple(NamedSharding(mesh, P()) for _ in jax.tree.leaves(result_shape))

    return infer


def partitioned(kind: str, body: Callable) -> Callable:
    """Wraps a per-platform lowering body ``body(*operands, config=...)`` of primitive ``kind`` ("fwd"/"bwd")
    in ``custom_partitioning``; returns ``f(*operands, config=...)`` to hand to ``mlir.lower_fun``."""
    n_operands = len(_LAYOUTS[kind][0])

    if kind == "fwd":
        def fun(q, k, v, bias, mask, rows, key_segments, config):
            return tuple(body(q, k, v, bias, mask, rows, key_segments, config=config))
    else:
        def fun(q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse, config):
            return tuple(body(q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse, config=config))

    cp = custom_partitioning(fun, static_argnums=(n_operands,))
    cp.def_partition(partition=_partition(kind, body),
                     infer_sharding_from_operands=_infer_sharding_from_operands(kind),
                     sharding_rule=_sharding_rule(kind))

    def call(*operands, config):
        return cp(*operands, config)

    return call
