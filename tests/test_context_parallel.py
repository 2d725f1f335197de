"""jax_dmattn.context_parallel.attention on 8 CPU devices (tests/multi_device.py): a sequence split over a mesh
axis inside shard_map gives the single-device attention's output, lse and all four gradients, for both
strategies, causal and not, GQA, biases and masks laid out along keys (travelling with their chunk) or along
queries (sliced per chunk), KeyIndices of global key positions; the ring strategy never gathers K/V; bad calls
raise clear errors.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_dmattn
from jax_dmattn import context_parallel
from helpers import packed_segments
from multi_device import N_DEVICES, multi_device

B, L, H, D = 2, 64, 4, 16
IMPL = "cpu"
ROWS, KEYS = P(None, None, "sp", None), P(None, None, None, "sp")  # a bias / mask sharded along queries / keys


def _shard_map(*args, **kwargs):
    sm = getattr(jax, "shard_map", None)
    if sm is None:  # pragma: no cover - older jax
        from jax.experimental.shard_map import shard_map as sm
    return sm(*args, **kwargs)


def _mesh(shape=(N_DEVICES,), names=("sp",)):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _mesh_context(mesh):
    """The context a call on ``mesh`` runs in: the mesh set (jax.set_mesh) when its axes are Explicit, nothing for
    Auto axes (the shardings travel with the arrays)."""
    if all(t != jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return contextlib.nullcontext()
    set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    return set_mesh(mesh)


def _inputs(hkv, bias_shape, mask_shape, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, L, hkv, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, L, hkv, D)), jnp.float32)
    bias = None if bias_shape is None else jnp.asarray(rng.standard_normal(bias_shape), jnp.float32)
    mask = None if mask_shape is None else jnp.asarray(rng.random(mask_shape) < 0.7)
    ct = jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32)
    ct_lse = jnp.asarray(rng.standard_normal((B, H, L)), jnp.float32)
    return q, k, v, bias, mask, ct, ct_lse


def _close(got, want, name, rtol=2e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=name)
    fin = np.isfinite(want)
    err = np.linalg.norm((got - want)[fin]) / max(np.linalg.norm(want[fin]), 1e-30)
    assert err <= rtol, f"{name}: relative error {err:.2e}"


def _reorder(x, n, fn, seq_dims):
    """x with fn (to_zigzag / from_zigzag) applied along each of seq_dims of full sequence length L."""
    if x is None:
        return None
    for dim in seq_dims:
        if dim < x.ndim and x.shape[dim] == L:
            x = fn(x, n, axis=dim)
    return x


def _run(strategy, is_causal, hkv, bias_shape, bias_spec, mask_shape, mask_spec, mesh=None, seq_axis="sp",
         qspec=P(None, "sp"), chunk_order="contiguous", indices=None, topk=None, bounds=None):
    """Values and gradients (q, k, v, bias) of context-parallel attention against one device, with an lse
    cotangent as well (the loss uses out and lse). With chunk_order="zigzag" the sequence is laid out by
    context_parallel.to_zigzag before sharding and the results are put back in order for the comparison.
    ``indices`` (sharded by mask_spec) is passed as KeyIndices instead of a bool mask: under zigzag its query
    rows are reordered like a bias's, its values stay positions of the original sequence. ``bounds``: keyword
    arguments of row bounds (jax_dmattn.attention's), segment ids sharded and reordered like the sequence."""
    mesh = mesh or _mesh()
    q, k, v, bias, mask, ct, ct_lse = _inputs(hkv, bias_shape, mask_shape)
    wrap = lambda m: m  # noqa: E731
    if indices is not None:
        mask, wrap = indices, jax_dmattn.KeyIndices
    if topk is not None:  # (scores [B|1, Hs, L], k): sharded and reordered like the keys
        mask, wrap = topk[0], lambda m: jax_dmattn.TopKMask(m, topk[1])  # noqa: E731
    n = dict(zip(mesh.axis_names, mesh.devices.shape))[seq_axis]
    if chunk_order == "zigzag":
        order = lambda x, dims: _reorder(x, n, context_parallel.to_zigzag, dims)  # noqa: E731
        back = lambda x, dims: _reorder(x, n, context_parallel.from_zigzag, dims)  # noqa: E731
    else:
        order = back = lambda x, dims: x  # noqa: E731

    def loss_of(attn):
        def loss(q, k, v, bias):
            out, lse = attn(q, k, v, bias)
            lse = jnp.where(jnp.isneginf(lse), 0.0, lse)
            return jnp.sum(out * ct) + jnp.sum(lse * ct_lse), (out, lse)
        return loss

    bounds = bounds or {}
    static = {name: x for name, x in bounds.items() if not hasattr(x, "ndim")}
    names = sorted(set(bounds) - set(static))
    ids_spec = lambda x: P(qspec[0], seq_axis) if x.ndim == 2 else P()  # noqa: E731

    def one_device(q, k, v, bias):
        return jax_dmattn.attention(q, k, v, bias, wrap(mask), is_causal=is_causal, return_lse=True,
                                    implementation=IMPL, **bounds)

    in_specs = (qspec, qspec, qspec, bias_spec, mask_spec) + tuple(ids_spec(bounds[name]) for name in names)
    lse_spec = P(qspec[0], None, seq_axis)

    def local(q, k, v, bias, mask, *ids):
        return context_parallel.attention(q, k, v, bias, wrap(mask), axis_name=seq_axis, strategy=strategy,
                                          chunk_order=chunk_order, is_causal=is_causal, return_lse=True,
                                          implementation=IMPL, **static, **dict(zip(names, ids)))

    sharded = _shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(qspec, lse_spec))
    argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
    want_grads, (want_out, want_lse) = jax.jit(jax.grad(loss_of(one_device), argnums, has_aux=True))(q, k, v, bias)
    put = lambda x, s: None if x is None else jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    seq = (1,)
    laid_out = [order(q, seq), order(k, seq), order(v, seq), order(bias, (2, 3)), order(mask, (2, 3))]
    laid_out += [order(bounds[name], seq) for name in names]
    args = [put(x, s) for x, s in zip(laid_out, in_specs)]
    ct, ct_lse = order(ct, seq), order(ct_lse, (2,))
    cp_loss = loss_of(lambda q, k, v, bias: sharded(q, k, v, bias, *args[4:]))
    got_grads, (got_out, got_lse) = jax.jit(jax.grad(cp_loss, argnums, has_aux=True))(*args[:4])
    got_out, got_lse = back(got_out, seq), back(got_lse, (2,))
    got_grads = [back(g, seq) for g in got_grads[:3]] + [back(g, (2, 3)) for g in got_grads[3:]]
    _close(got_out, want_out, "out")
    _close(got_lse, want_lse, "lse")
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got_grads, want_grads):
        _close(g, w, name)
    return sharded, args


STRATEGIES = ["ring", "all_gather"]
ORDERS = ["contiguous", "zigzag"]


@multi_device
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("hkv", [4, 2, 1])
@pytest.mark.parametrize("chunk_order", ORDERS)
def test_no_bias_no_mask(strategy, is_causal, hkv, chunk_order):
    _run(strategy, is_causal, hkv, None, None, None, None, chunk_order=chunk_order)


# (bias shape, its sharding): along keys the bias travels with its chunk; along queries each device holds its
# rows over all keys and slices the chunk it attends to; a query-broadcast or key-broadcast bias stays put.
BIASES = {
    "per-key": ((B, 2, 1, L), KEYS),
    "per-key-heads1": ((1, 1, 1, L), KEYS),
    "full-rows": ((B, H, L, L), ROWS),
    "full-rows-kvheads": ((1, 2, L, L), ROWS),
    "per-query": ((B, H, L, 1), ROWS),
}
MASKS = {
    "padding": ((B, 1, 1, L), KEYS),
    "full-rows": ((B, 2, L, L), ROWS),
}


# (bias, mask) of each layout case: a bias alone, or a mask with a per-key bias
LAYOUTS = {**{f"bias-{name}": ((shape, spec), (None, None)) for name, (shape, spec) in BIASES.items()},
           **{f"mask-{name}": (((B, 2, 1, L), KEYS), (shape, spec)) for name, (shape, spec) in MASKS.items()}}


@multi_device
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("chunk_order", ORDERS)
def test_bias_and_mask_layouts(strategy, is_causal, layout, chunk_order):
    (bias_shape, bias_spec), (mask_shape, mask_spec) = LAYOUTS[layout]
    _run(strategy, is_causal, 2, bias_shape, bias_spec, mask_shape, mask_spec, chunk_order=chunk_order)


def _key_indices(shape, seed=1):
    """Random global key positions in [-1, L) (-1 pads), each row with a repeated entry."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(-1, L, shape).astype(np.int32)
    idx[..., 1] = idx[..., 0]
    return jnp.asarray(idx)


K_IDX = 12  # keys per row, != L so that the zigzag reorder of the test touches the query rows only
# (indices shape, its sharding): per-row indices are sharded along queries like a bias's rows; shared ones (no
# query dim, or one of size 1) are replicated.
KEY_INDICES = {
    "per-row": ((B, 2, L, K_IDX), P(None, None, "sp", None)),
    "per-row-qheads": ((1, H, L, K_IDX), P(None, None, "sp", None)),
    "shared": ((B, 2, K_IDX), P()),
    "shared-heads1": ((B, 1, 1, K_IDX), P()),
}


@multi_device
@pytest.mark.parametrize("indices,strategy,is_causal,chunk_order", [
    ("per-row", "ring", True, "contiguous"),
    ("per-row", "all_gather", False, "zigzag"),
    ("per-row", "ring", True, "zigzag"),
    ("per-row-qheads", "all_gather", True, "zigzag"),
    ("shared", "all_gather", True, "contiguous"),
    ("shared", "ring", False, "zigzag"),
    ("shared-heads1", "ring", True, "zigzag"),
])
def test_key_indices_with_per_key_bias(indices, strategy, is_causal, chunk_order):
    """KeyIndices of global key positions (padding, duplicates) under context parallelism equal the same
    KeyIndices on one device over the whole sequence: out, lse and dq / dk / dv / dbias."""
    shape, spec = KEY_INDICES[indices]
    _run(strategy, is_causal, 2, (B, 2, 1, L), KEYS, None, spec, chunk_order=chunk_order,
         indices=_key_indices(shape))


@multi_device
@pytest.mark.parametrize("strategy, is_causal, chunk_order, k, score_shape", [
    ("ring", True, "contiguous", 5, (B, 2, L)),
    ("all_gather", True, "zigzag", 5, (1, 1, L)),
    ("ring", True, "zigzag", 1, (B, 4, L)),
    ("ring", False, "zigzag", 7, (B, 2, L)),
    ("all_gather", False, "contiguous", 20, (1, 2, L)),
    ("ring", True, "contiguous", L, (B, 2, L)),  # k >= Lk: every key it sees, no mask
])
def test_topk_mask_with_per_key_bias(strategy, is_causal, chunk_order, k, score_shape):
    """A TopKMask whose scores are sharded like the keys: each row keeps the k best of all the keys it sees, as on
    one device over the whole sequence (coarse scores: ties go to the lower global key). out, lse and dq / dk / dv /
    dbias."""
    scores = jnp.asarray(np.round(np.random.default_rng(7).standard_normal(score_shape) * 2), jnp.float32)
    _run(strategy, is_causal, 2, (B, 2, 1, L), KEYS, None, P(None, None, "sp"), chunk_order=chunk_order,
         topk=(scores, k))


@multi_device
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deterministic(strategy):
    """deterministic=True reaches every backward kernel call of the ring (their lowered attributes say so), two runs
    give bitwise-equal gradients, and they equal one device's deterministic gradients."""
    mesh = _mesh()
    q, k, v, bias, _, ct, _ = _inputs(2, (B, 2, 1, L), None)
    spec = P(None, "sp")

    def local(q, k, v, bias):
        return context_parallel.attention(q, k, v, bias, axis_name="sp", strategy=strategy, is_causal=True,
                                          deterministic=True, implementation=IMPL)

    sharded = _shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, KEYS), out_specs=spec)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(sharded(*a) * ct), argnums=(0, 1, 2, 3)))
    args = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip((q, k, v, bias), (spec, spec, spec, KEYS))]
    bwd_calls = [line for line in grads.lower(*args).as_text().splitlines() if "custom_call @dmattn_bwd" in line]
    assert bwd_calls and all("deterministic = true" in line for line in bwd_calls)
    first, second = grads(*args), grads(*args)
    want = jax.jit(jax.grad(lambda *a: jnp.sum(jax_dmattn.attention(*a, is_causal=True, deterministic=True,
                                                                      implementation=IMPL) * ct),
                            argnums=(0, 1, 2, 3)))(q, k, v, bias)
    for name, a, b_, w in zip(("dq", "dk", "dv", "dbias"), first, second, want):
        assert np.asarray(a).tobytes() == np.asarray(b_).tobytes(), f"{name} differs between two runs"
        _close(a, w, name)


@multi_device
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batch_and_sequence_mesh(strategy):
    """dp x sp mesh: the batch over dp, the sequence over sp; the ring runs within each dp group."""
    mesh = _mesh((2, 4), ("dp", "sp"))
    _run(strategy, True, 2, (B, 2, 1, L), P("dp", None, None, "sp"), None, None, mesh=mesh,
         qspec=P("dp", "sp"))


def _collectives(compiled_text):
    return {c for c in ("all-gather", "collective-permute", "reduce-scatter", "all-reduce")
            if c in compiled_text}


@multi_device
def test_zigzag_round_trip_and_balance():
    x = jnp.arange(2 * 4 * 3).reshape(1, 24, 1)
    z = context_parallel.to_zigzag(x, 4)
    np.testing.assert_array_equal(context_parallel.from_zigzag(z, 4), x)
    # device d's chunk holds sequence halves d and 2n - 1 - d
    np.testing.assert_array_equal(z[0, :6, 0], [0, 1, 2, 21, 22, 23])
    with pytest.raises(ValueError, match="multiple of 2"):
        context_parallel.to_zigzag(jnp.zeros((1, 10)), 4)


@multi_device
def test_ring_never_gathers_kv():
    sharded, args = _run("ring", True, 2, (B, 2, 1, L), KEYS, None, None)
    text = jax.jit(sharded).lower(*args).compile().as_text()
    assert "all-gather" not in _collectives(text) and "collective-permute" in _collectives(text), \
        _collectives(text)


@multi_device
def test_explicit_mesh_routes_to_context_parallel():
    """Under an Explicit-axes mesh a sequence split visible in the types makes jax_dmattn.attention itself run
    context-parallel (no shard_map written): values and gradients equal one device, the output keeps q's
    sharding."""
    q, k, v, bias, _, ct, _ = _inputs(2, (B, 2, 1, L), None)

    def loss_of(ct):
        def loss(q, k, v, bias):
            return jnp.sum(jax_dmattn.attention(q, k, v, bias, is_causal=True, implementation=IMPL) * ct)
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))

    want_loss, want_grads = jax.jit(loss_of(ct))(q, k, v, bias)
    mesh = jax.make_mesh((2, 4), ("dp", "sp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    with _mesh_context(mesh):
        put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
        seq = P("dp", "sp")
        args = (put(q, seq), put(k, seq), put(v, seq), put(bias, P("dp", None, None, "sp")))
        got_loss, got_grads = jax.jit(loss_of(put(ct, seq)))(*args)
        out = jax.jit(lambda *a: jax_dmattn.attention(*a, is_causal=True, implementation=IMPL))(*args)
        assert tuple(jax.typeof(out).sharding.spec)[:2] == ("dp", "sp")
    _close(got_loss, want_loss, "loss")
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got_grads, want_grads):
        _close(g, w, name)


@multi_device
def test_explicit_mesh_compact_masks():
    """Under an Explicit-axes mesh jax_dmattn.attention with KeyIndices (rows sharded like q) or a TopKMask (scores
    sharded like the keys) runs context-parallel and equals one device."""
    q, k, v, bias, _, ct, _ = _inputs(2, (B, 2, 1, L), None)
    idx = _key_indices((B, 2, L, K_IDX))
    scores = jnp.asarray(np.round(np.random.default_rng(3).standard_normal((B, 2, L)) * 2), jnp.float32)
    forms = [(jax_dmattn.KeyIndices, idx, P(None, None, "sp")),
             (lambda s: jax_dmattn.TopKMask(s, 6), scores, P(None, None, "sp"))]
    for form, operand, spec in forms:
        def loss_of(ct, operand):
            def loss(q, k, v, bias):
                out = jax_dmattn.attention(q, k, v, bias, form(operand), is_causal=True, implementation=IMPL)
                return jnp.sum(out * ct)
            return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))

        want_loss, want_grads = jax.jit(loss_of(ct, operand))(q, k, v, bias)
        mesh = jax.make_mesh((N_DEVICES,), ("sp",), axis_types=(jax.sharding.AxisType.Explicit,))
        with _mesh_context(mesh):
            put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
            seq = P(None, "sp")
            args = (put(q, seq), put(k, seq), put(v, seq), put(bias, KEYS))
            got_loss, got_grads = jax.jit(loss_of(put(ct, seq), put(operand, spec)))(*args)
        _close(got_loss, want_loss, "loss")
        for name, g, w in zip(("dq", "dk", "dv", "dbias"), got_grads, want_grads):
            _close(g, w, name)


@multi_device
@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_flax_layer_on_a_sequence_split(axis_type):
    """The paper's Flax layer (its TopKMask of the learned per-key bias) on input split along the sequence, under an
    Explicit-axes mesh (a shard_map) or Auto axes (the partitioning rule), runs context-parallel and gives one
    device's output and parameter gradients."""
    pytest.importorskip("flax")
    from jax_dmattn.flax import DynamicMaskAttention

    layer = DynamicMaskAttention(num_heads=4, num_kv_heads=2, window_size=8, is_causal=True, rope_theta=10000.0,
                                 implementation=IMPL)
    x = jax.random.normal(jax.random.key(0), (B, L, 32))
    params = layer.init(jax.random.key(1), x)
    loss = jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x))))
    want_loss, want_grads = jax.jit(loss)(params, x)
    mesh = jax.make_mesh((N_DEVICES,), ("sp",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    xs = jax.device_put(x, NamedSharding(mesh, P(None, "sp")))
    f = jax.jit(loss)
    with _mesh_context(mesh):
        if axis_type == "Explicit":
            assert tuple(jax.typeof(jax.jit(layer.apply)(params, xs)).sharding.spec)[:2] == (None, "sp")
        got_loss, got_grads = f(params, xs)
    if axis_type == "Auto":
        assert "collective-permute" in _collectives(f.lower(params, xs).compile().as_text())  # the ring ran
    _close(got_loss, want_loss, "loss")
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        _close(g, w, jax.tree_util.keystr(path), rtol=1e-4)


def _bounds_kwargs(name):
    """Keyword arguments of jax_dmattn.attention that make row bounds (jax_dmattn/_bounds.py)."""
    rng = np.random.default_rng(7)
    if name == "packed":  # sorted ids: each row's range is its document
        ids = jnp.asarray(packed_segments(rng, B, L, 5))
        return dict(q_segment_ids=ids, kv_segment_ids=ids)
    if name == "unsorted":  # ids compared key by key
        ids = jnp.asarray(rng.integers(0, 3, (B, L)).astype(np.int32))
        return dict(q_segment_ids=ids, kv_segment_ids=ids)
    if name == "window":
        return dict(local_window_size=(9, 3))
    return dict(query_seq_lengths=jnp.asarray([L, L - 21], jnp.int32),
                key_value_seq_lengths=jnp.asarray([L, L - 13], jnp.int32))


def _bounds_mask(form, rng):
    """(mask as the one-device call takes it, the same as the sequence-split call takes it given a put(x, spec)):
    a bool mask along queries, per-row KeyIndices of global keys along queries, a TopKMask's scores along keys."""
    if form == "bool":
        mask = jnp.asarray(rng.random((B, 1, L, L)) < 0.7)
        return mask, lambda put: put(mask, ROWS)
    if form == "indices":
        idx = _key_indices((B, 2, L, K_IDX))
        return jax_dmattn.KeyIndices(idx), lambda put: jax_dmattn.KeyIndices(put(idx, P(None, None, "sp", None)))
    scores = jnp.asarray(np.round(rng.standard_normal((B, 2, L)) * 2), jnp.float32)
    return (jax_dmattn.TopKMask(scores, 6),
            lambda put: jax_dmattn.TopKMask(put(scores, P(None, None, "sp")), 6))


@multi_device
@pytest.mark.parametrize("axis_type, bounds, is_causal, form", [
    (axis, bounds, causal, "bool") for axis in ("Auto", "Explicit")
    for bounds, causal in (("packed", True), ("unsorted", False), ("window", True), ("lengths", False),
                           ("lengths", True))
] + [("Auto", "packed", True, "topk"), ("Explicit", "unsorted", False, "topk"),
     ("Explicit", "lengths", True, "indices"), ("Auto", "window", True, "indices")])
def test_row_bounds_on_a_sequence_split(axis_type, bounds, is_causal, form):
    """Segment ids, a window or sequence lengths with query and key split over one mesh axis (Auto axes: the
    partitioning rule; Explicit: the shard_map route) run context-parallel: each (query chunk, key chunk) pair
    takes the rows' key ranges clipped to its keys, the key segment ids travel with their chunk; a KeyIndices or
    TopKMask selects within the bounds (the selection holds them). Values and all four gradients equal one
    device, with a per-key bias."""
    q, k, v, bias, _, ct, _ = _inputs(2, (B, 2, 1, L), None)
    mask, sharded_mask = _bounds_mask(form, np.random.default_rng(3))
    kw = _bounds_kwargs(bounds)

    def grads(ct, mask, kw):
        def loss(q, k, v, bias):
            out = jax_dmattn.attention(q, k, v, bias, mask, is_causal=is_causal, implementation=IMPL, **kw)
            return jnp.sum(out * ct)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

    want_loss, want_grads = grads(ct, mask, kw)(q, k, v, bias)
    mesh = jax.make_mesh((N_DEVICES,), ("sp",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    seq = P(None, "sp")
    args = (put(q, seq), put(k, seq), put(v, seq), put(bias, KEYS))
    kw_sharded = {name: (put(x, seq) if getattr(x, "ndim", 0) == 2 else x) for name, x in kw.items()}
    f = grads(put(ct, seq), sharded_mask(put), kw_sharded)
    with _mesh_context(mesh):
        got_loss, got_grads = f(*args)
    if axis_type == "Auto":
        assert "collective-permute" in _collectives(f.lower(*args).compile().as_text())  # the ring ran
    _close(got_loss, want_loss, "loss")
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got_grads, want_grads):
        _close(g, w, name)


@multi_device
@pytest.mark.parametrize("strategy, chunk_order, bounds, is_causal, form", [
    ("ring", "zigzag", "packed", True, None),
    ("all_gather", "contiguous", "lengths", True, "topk"),
    ("ring", "contiguous", "unsorted", False, "indices"),
    ("ring", "zigzag", "window", True, "topk"),
])
def test_explicit_call_with_row_bounds(strategy, chunk_order, bounds, is_causal, form):
    """context_parallel.attention's own segment ids (this device's chunks), window and lengths, for shard_map
    users: out, lse and all four gradients equal one device over the whole sequence, in both chunk orders, with
    a per-key bias and no mask, per-row KeyIndices or a TopKMask."""
    kw = dict(chunk_order=chunk_order, bounds=_bounds_kwargs(bounds))
    if form == "indices":
        kw.update(indices=_key_indices((B, 2, L, K_IDX)))
    elif form == "topk":
        kw.update(topk=(jnp.asarray(np.round(np.random.default_rng(5).standard_normal((B, 2, L)) * 2)), 6))
    spec = {None: None, "indices": P(None, None, "sp", None), "topk": P(None, None, "sp")}[form]
    _run(strategy, is_causal, 2, (B, 2, 1, L), KEYS, None, spec, **kw)


@multi_device
def test_errors():
    mesh = _mesh()
    q, k, v, *_ = _inputs(2, None, None)

    def call(**kw):
        def local(q, k, v):
            return context_parallel.attention(q, k, v, axis_name="sp", implementation=IMPL, **kw)
        spec = P(None, "sp")
        return jax.jit(_shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec))(q, k, v)

    with pytest.raises(ValueError, match="strategy"):
        call(strategy="tree")
    with pytest.raises(TypeError, match="is_causal"):
        call(is_causal="yes")

    def local_topk(q, k, v):  # the scores of every key, where this device's key chunk's are expected
        scores = jnp.zeros((B, 2, L))
        return context_parallel.attention(q, k, v, mask=jax_dmattn.TopKMask(scores, 4), axis_name="sp",
                                          implementation=IMPL)
    spec = P(None, "sp")
    with pytest.raises(ValueError, match=rf"key chunk's scores .* Lk / n = {L // N_DEVICES}"):
        jax.jit(_shard_map(local_topk, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec))(q, k, v)

    def local_indices(indices):
        def local(q, k, v):
            return context_parallel.attention(q, k, v, mask=jax_dmattn.KeyIndices(indices), axis_name="sp",
                                              implementation=IMPL)
        return jax.jit(_shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec))

    # concrete indices are checked against the global key length (L), not the local chunk (L / n)
    local_indices(np.array([[[-1, L // 2, L - 1]]], np.int32))(q, k, v)
    with pytest.raises(ValueError, match=rf"\[-1, {L}\)"):
        local_indices(np.array([[[0, L]]], np.int32))(q, k, v)
    with pytest.raises(TypeError, match="integer dtype"):
        local_indices(np.array([[[0.0, 1.0]]], np.float32))(q, k, v)

    def local_unequal(q, k, v):
        return context_parallel.attention(q[:, :4], k, v, axis_name="sp", is_causal=True, implementation=IMPL)
    with pytest.raises(ValueError, match="equal query and key chunks"):
        jax.jit(_shard_map(local_unequal, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec))(q, k, v)

    def local_bad_bias(q, k, v):
        return context_parallel.attention(q, k, v, jnp.zeros((B, 2, 1, 3)), axis_name="sp", implementation=IMPL)
    with pytest.raises(ValueError, match="key dim"):
        jax.jit(_shard_map(local_bad_bias, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec))(q, k, v)


@multi_device
@pytest.mark.parametrize("bias,mask", [("per-key", None), ("full-rows", None), ("per-key", "padding"),
                                       ("per-key", "full-rows")])
def test_jit_auto_sequence_sharding(bias, mask):
    """Plain jax_dmattn.attention under jit on inputs whose sequence is split over an Auto mesh axis: the
    partitioner runs it context-parallel (ring): values and gradients equal one device, and the compiled program
    moves K/V by collective-permute, never by all-gather."""
    mesh = _mesh((2, 4), ("dp", "sp"))
    bias_shape, bias_spec = BIASES[bias]
    mask_shape, mask_spec = MASKS[mask] if mask else (None, None)
    q, k, v, b, m, ct, _ = _inputs(2, bias_shape, mask_shape)

    def grads(ct, m):
        def loss(q, k, v, b):
            return jnp.sum(jax_dmattn.attention(q, k, v, b, m, is_causal=True, implementation=IMPL) * ct)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

    want_loss, want_grads = grads(ct, m)(q, k, v, b)
    seq = P("dp", "sp")
    with_dp = lambda spec: P("dp", *tuple(spec)[1:])  # noqa: E731
    put = lambda x, s: None if x is None else jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    args = (put(q, seq), put(k, seq), put(v, seq), put(b, with_dp(bias_spec)))
    f = grads(put(ct, seq), put(m, with_dp(mask_spec)) if m is not None else None)
    got_loss, got_grads = f(*args)
    _close(got_loss, want_loss, "loss")
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got_grads, want_grads):
        _close(g, w, name)
    text = f.lower(*args).compile().as_text()
    assert "all-gather" not in _collectives(text) and "collective-permute" in _collectives(text), \
        _collectives(text)


@multi_device
@pytest.mark.parametrize("is_causal", [True, False])
def test_jit_auto_sequence_sharding_compact_masks(is_causal):
    """Under jit with Auto axes a sequence-split call with KeyIndices (per row, rows sharded like q; and shared by
    every row) or a TopKMask (scores sharded like the keys) runs context-parallel: values and gradients equal one
    device, and K/V move by collective-permute, never by all-gather."""
    mesh = _mesh((2, 4), ("dp", "sp"))
    q, k, v, bias, _, ct, _ = _inputs(2, (B, 2, 1, L), None)
    scores = jnp.asarray(np.round(np.random.default_rng(4).standard_normal((B, 2, L)) * 2), jnp.float32)
    forms = [("per-row KeyIndices", jax_dmattn.KeyIndices, _key_indices((B, 2, L, K_IDX)), P("dp", None, "sp")),
             ("shared KeyIndices", jax_dmattn.KeyIndices, _key_indices((B, 2, K_IDX)), P("dp")),
             ("TopKMask", lambda s: jax_dmattn.TopKMask(s, 6), scores, P("dp", None, "sp"))]
    seq = P("dp", "sp")
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    for what, form, operand, spec in forms:
        def grads(ct, operand):
            def loss(q, k, v, bias):
                out = jax_dmattn.attention(q, k, v, bias, form(operand), is_causal=is_causal, implementation=IMPL)
                return jnp.sum(out * ct)
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

        want_loss, want_grads = grads(ct, operand)(q, k, v, bias)
        args = (put(q, seq), put(k, seq), put(v, seq), put(bias, P("dp", None, None, "sp")))
        f = grads(put(ct, seq), put(operand, spec))
        got_loss, got_grads = f(*args)
        _close(got_loss, want_loss, f"{what}: loss")
        for name, g, w in zip(("dq", "dk", "dv", "dbias"), got_grads, want_grads):
            _close(g, w, f"{what}: {name}")
        kv_moves = _collectives(f.lower(*args).compile().as_text())
        assert "collective-permute" in kv_moves, (what, kv_moves)


@multi_device
def test_jit_auto_sequence_sharding_refuses_causal_with_unequal_chunks():
    """Under jit the partitioner's context-parallel route applies the same rule as the shard_map call: the causal
    pair rule needs equal query and key chunks."""
    mesh = _mesh()
    q, k, v, *_ = _inputs(2, None, None)
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P(None, "sp")))  # noqa: E731
    f = jax.jit(lambda q, k, v: jax_dmattn.attention(q, k, v, is_causal=True, implementation=IMPL))
    with pytest.raises(Exception, match="equal query and key chunks"):
        f(put(q[:, :L // 2]), put(k), put(v))
