"""jax_dmattn.attention on 8 CPU devices: jit with NamedSharding inputs (custom_partitioning + Shardy rules),
shard_map, pmap, explicit sharding; results equal the single-device ones, the compiled HLO of batch / head
sharded calls has no all-gather, dbias of a bias replicated over a sharded axis is summed across devices, and
sequence / head_dim sharding raises a clear error.

The checks need 8 CPU devices (tests/multi_device.py: here, or this file once more in a subprocess).
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_dmattn
from multi_device import N_DEVICES, multi_device

IMPL = "cpu"
_COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


# ------------------------------------------------------------------------------------------------ helpers
def _mesh(shape=(2, 4), names=("dp", "tp"), axis_type="auto"):
    """jax.make_mesh defaults to Explicit axes in recent JAX; the partitioning rules are about Auto axes (plain
    jit with NamedSharding inputs), so that is the default here, Explicit is tested on its own."""
    kind = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}[axis_type]
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape))


def _put(mesh, x, spec):
    return None if x is None else jax.device_put(x, NamedSharding(mesh, spec))


def _inputs(b=4, lq=32, lk=48, h=8, hkv=8, d=16, bias_shape=None, mask_shape=None, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, lq, h, d)), dtype)
    k = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), dtype)
    v = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), dtype)
    bias = None if bias_shape is None else jnp.asarray(rng.standard_normal(bias_shape), dtype)
    mask = None if mask_shape is None else jnp.asarray(rng.random(mask_shape) < 0.8)
    ct = jnp.asarray(rng.standard_normal((b, lq, h, d)), dtype)
    return q, k, v, bias, mask, ct


def _attn(q, k, v, bias, mask, **kw):
    return jax_dmattn.attention(q, k, v, bias, mask, implementation=IMPL, **kw)


def _vjp_fn(has_bias, **kw):
    """(q, k, v, bias, mask, ct) -> (out, dq, dk, dv[, dbias]); no loss reduction, so the only collectives in
    the HLO are the ones the attention itself needs."""

    def f(q, k, v, bias, mask, ct):
        if has_bias:
            out, vjp = jax.vjp(lambda q, k, v, b: _attn(q, k, v, b, mask, **kw), q, k, v, bias)
        else:
            out, vjp = jax.vjp(lambda q, k, v: _attn(q, k, v, None, mask, **kw), q, k, v)
        return (out,) + tuple(vjp(ct))

    return jax.jit(f)


def _collectives(compiled_text):
    return {c for c in _COLLECTIVES if re.search(rf"\b{c}(-start)?\(", compiled_text)}


def _assert_close(actual, expected, rtol=1e-5, name=""):
    a = np.asarray(jax.device_get(actual), np.float64)
    e = np.asarray(jax.device_get(expected), np.float64)
    assert a.shape == e.shape, (name, a.shape, e.shape)
    err = np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-6)
    assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol}"


def _spec4(spec):
    return tuple(spec) + (None,) * (4 - len(spec))


def _check_sharded_vjp(mesh, q, k, v, bias, mask, ct, qspec, kspec, bspec, mspec=P(), expect_allreduce=None,
                       rtol=1e-5, **kw):
    f = _vjp_fn(bias is not None, **kw)
    ref = f(q, k, v, bias, mask, ct)  # single device
    args = (_put(mesh, q, qspec), _put(mesh, k, kspec), _put(mesh, v, kspec), _put(mesh, bias, bspec),
            _put(mesh, mask, mspec), _put(mesh, ct, qspec))
    compiled = f.lower(*args).compile().as_text()
    got = f(*args)
    names = ("out", "dq", "dk", "dv", "dbias")
    for name, g, r in zip(names, got, ref):
        _assert_close(g, r, rtol, name)
    colls = _collectives(compiled)
    assert "all-gather" not in colls, f"all-gather in the compiled HLO ({colls})"
    assert not colls & {"all-to-all", "collective-permute"}, colls
    if expect_allreduce is not None:
        assert ("all-reduce" in colls) == expect_allreduce, colls
    assert _spec4(got[0].sharding.spec) == _spec4(qspec), got[0].sharding.spec  # out keeps q's sharding
    assert _spec4(got[1].sharding.spec) == _spec4(qspec), got[1].sharding.spec
    return got


# -------------------------------------------------------------------------------------------------- tests
@multi_device
def test_has_eight_devices():
    assert jax.device_count() == N_DEVICES
    from jax_dmattn import _ffi

    assert _ffi.has_cpu_kernels(), f"{jax_dmattn.__file__} was imported without its compiled extension"


_FWD_SPECS = {"batch": P("dp"), "heads": P(None, None, "tp"), "batch+heads": P("dp", None, "tp"),
              "batch-2axes": P(("dp", "tp")), "heads-2axes": P(None, None, ("dp", "tp"))}
_FWD_CASES = [(name, "auto") for name in _FWD_SPECS] + [("batch+heads", "explicit"), ("heads-2axes", "explicit")]


@multi_device
@pytest.mark.parametrize("spec_name,axis_type", _FWD_CASES, ids=[f"{a}-{n}" for n, a in _FWD_CASES])
def test_forward_no_gather_and_keeps_sharding(spec_name, axis_type):
    qspec = _FWD_SPECS[spec_name]
    mesh = _mesh(axis_type=axis_type)
    q, k, v, bias, mask, _ = _inputs(b=8, bias_shape=(1, 8, 32, 48), mask_shape=(8, 1, 32, 48))
    f = jax.jit(lambda q, k, v, b, m: _attn(q, k, v, b, m, is_causal=True, return_lse=True))
    ref = f(q, k, v, bias, mask)
    qs = _spec4(qspec)
    bspec, mspec = P(None, qs[2]), P(qs[0])
    args = (_put(mesh, q, qspec), _put(mesh, k, qspec), _put(mesh, v, qspec), _put(mesh, bias, bspec),
            _put(mesh, mask, mspec))
    compiled = f.lower(*args).compile().as_text()
    out, lse = f(*args)
    _assert_close(out, ref[0], name="out")
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref[1]), rtol=1e-5, atol=1e-5)
    assert _collectives(compiled) == set(), _collectives(compiled)  # the forward needs no communication
    assert _spec4(out.sharding.spec) == qs
    assert (tuple(lse.sharding.spec) + (None,) * 3)[:3] == (qs[0], qs[2], None)


_BIAS_CASES = [
    ((4, 8, 32, 48), P("dp", "tp"), False),  # full bias, sharded like q: dbias local
    ((1, 8, 32, 48), P(None, "tp"), True),  # batch-broadcast: dbias psum over dp
    ((4, 1, 32, 48), P("dp"), True),  # head-broadcast: dbias psum over tp
    ((1, 1, 32, 48), P(), True),  # shared: psum over dp and tp
    ((8, 32, 48), P("tp"), True),  # rank 3 (heads, Lq, Lk): psum over dp
    ((1, 1, 1, 48), P(), True),  # key-only bias
    ((1, 8, 32, 1), P(None, "tp"), None),  # query-only bias: zero gradient
]
_GRAD_CASES = [c + ("auto",) for c in _BIAS_CASES] + [c + ("explicit",) for c in _BIAS_CASES[:4]]


@multi_device
@pytest.mark.parametrize("bias_shape,bspec,reduced,axis_type", _GRAD_CASES,
                         ids=[f"{c[3]}-bias{'x'.join(map(str, c[0]))}" for c in _GRAD_CASES])
def test_grads_batch_and_head_sharding(bias_shape, bspec, reduced, axis_type):
    mesh = _mesh(axis_type=axis_type)
    q, k, v, bias, mask, ct = _inputs(bias_shape=bias_shape, mask_shape=(1, 1, 32, 48))
    qspec = P("dp", None, "tp")
    _check_sharded_vjp(mesh, q, k, v, bias, mask, ct, qspec, qspec, bspec, expect_allreduce=reduced,
                       is_causal=True)


@multi_device
def test_grads_no_bias_no_collectives():
    mesh = _mesh()
    q, k, v, _, mask, ct = _inputs(mask_shape=(4, 8, 32, 48))
    qspec = P("dp", None, "tp")
    _check_sharded_vjp(mesh, q, k, v, None, mask, ct, qspec, qspec, None, mspec=P("dp", "tp"),
                       expect_allreduce=False, softcap=5.0)


@multi_device
def test_dbias_psum_bf16():
    """A bf16 bias shared by all devices: its gradient is the sum of every device's part (summed in f32)."""
    mesh = _mesh()
    q, k, v, bias, _, ct = _inputs(bias_shape=(1, 1, 32, 48), dtype=jnp.bfloat16)
    qspec = P("dp", None, "tp")
    got = _check_sharded_vjp(mesh, q, k, v, bias, None, ct, qspec, qspec, P(), expect_allreduce=True, rtol=2e-2)
    assert got[-1].dtype == jnp.bfloat16 and got[-1].shape == (1, 1, 32, 48)
    assert got[-1].sharding.is_fully_replicated


@multi_device
@pytest.mark.parametrize("hkv,bias_heads,kv_sharded", [
    (4, 4, True),  # tp=4 divides Hkv: kv heads sharded with the query heads
    (2, 2, False),  # Hkv=2 < tp=4: k/v replicated over tp, each device slices its kv head, dk/dv summed
    (2, 1, False),
    (1, 1, False),  # MQA
    (1, 8, False),
])
def test_gqa_head_sharding(hkv, bias_heads, kv_sharded):
    mesh = _mesh()
    q, k, v, bias, mask, ct = _inputs(hkv=hkv, bias_shape=(1, bias_heads, 32, 48), mask_shape=(4, hkv, 32, 48))
    qspec = P("dp", None, "tp")
    kspec = qspec if kv_sharded else P("dp")
    bspec = P(None, "tp") if (bias_heads == 8 or (bias_heads == hkv and kv_sharded)) else P()
    got = _check_sharded_vjp(mesh, q, k, v, bias, mask, ct, qspec, kspec, bspec, mspec=P("dp"))
    assert _spec4(got[2].sharding.spec) == _spec4(kspec)  # dk keeps k's layout


@multi_device
@pytest.mark.parametrize("h,hkv,qspec,kspec", [
    (16, 8, P("dp", None, "tp"), P("dp", None, "tp")),  # mesh size divides Hkv: compound (hkv, g) Shardy factor
    (8, 4, P(None, None, ("dp", "tp")), P()),  # heads over 2 axes (8-way) > Hkv: k/v replicated and sliced
    (8, 2, P(None, None, ("tp", "dp")), P()),
])
def test_gqa_head_sharding_layouts(h, hkv, qspec, kspec):
    mesh = _mesh()
    q, k, v, bias, _, ct = _inputs(h=h, hkv=hkv, bias_shape=(1, hkv, 32, 48))
    bspec = P(None, _spec4(kspec)[2])
    _check_sharded_vjp(mesh, q, k, v, bias, None, ct, qspec, kspec, bspec, is_causal=True)


@multi_device
def test_gqa_kv_heads_incompatible_with_head_sharding():
    mesh = _mesh()
    q, k, v, _, _, _ = _inputs(h=12, hkv=3)
    f = jax.jit(lambda q, k, v: _attn(q, k, v, None, None))
    with pytest.raises(Exception, match="kv heads"):
        f(_put(mesh, q, P("dp", None, "tp")), _put(mesh, k, P("dp")), _put(mesh, v, P("dp")))


@multi_device
@pytest.mark.parametrize("which,spec,what", [
    ("q", P(None, "tp"), "query length"),
    ("k", P("dp", "tp"), "key length"),
    ("q", P(None, None, None, "tp"), "head_dim"),
    ("bias", P(None, None, "tp"), "query length"),
])
def test_sequence_and_head_dim_sharding_raise(which, spec, what):
    mesh = _mesh()
    q, k, v, bias, _, _ = _inputs(bias_shape=(1, 1, 32, 48))
    specs = {"q": P("dp"), "k": P("dp"), "bias": P()}
    specs[which] = spec
    args = (_put(mesh, q, specs["q"]), _put(mesh, k, specs["k"]), _put(mesh, v, specs["k"]),
            _put(mesh, bias, specs["bias"]))
    # Eager call on committed arrays: a ValueError before anything is compiled.
    with pytest.raises(ValueError, match=f"{what} dim .*context_parallel.attention"):
        _attn(*args, None)
    # Under jit the shardings only exist in XLA's partitioner: the same message, inside a JaxRuntimeError.
    f = jax.jit(lambda q, k, v, b: _attn(q, k, v, b, None))
    with pytest.raises(Exception, match=f"{what} dim .*context_parallel.attention"):
        f(*args)


@multi_device
def test_sequence_sharded_output_propagation():
    """A sequence-sharded consumer (out_shardings) propagates into q when nothing pins it: the clear error; with
    q / k / v pinned to batch/head sharding it compiles and XLA reshards the output afterwards."""
    mesh = _mesh()
    q, _, _, _, _, _ = _inputs(lk=32)
    w = jnp.eye(16)
    out_sharding = NamedSharding(mesh, P("dp", "tp"))
    qs = _put(mesh, q, P("dp"))
    free = jax.jit(lambda q, w: _attn(q @ w, q @ w, q @ w, None, None), out_shardings=out_sharding)
    with pytest.raises(Exception, match="query length dim .*propagated"):
        free(qs, w)
    pin = lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("dp", None, "tp")))  # noqa: E731
    pinned = jax.jit(lambda q, w: _attn(pin(q @ w), pin(q @ w), pin(q @ w), None, None), out_shardings=out_sharding)
    out = pinned(qs, w)
    _assert_close(out, jax.jit(lambda q: _attn(q, q, q, None, None))(q), name="out")
    assert _spec4(out.sharding.spec) == ("dp", "tp", None, None)


@multi_device
def test_explicit_sharding_mesh_context():
    mesh = _mesh(axis_type="explicit")
    q, k, v, bias, _, ct = _inputs(bias_shape=(1, 8, 32, 48))
    f = _vjp_fn(True, is_causal=True)
    ref = f(q, k, v, bias, None, ct)
    set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    with set_mesh(mesh):
        qspec = P("dp", None, "tp")
        args = (_put(mesh, q, qspec), _put(mesh, k, qspec), _put(mesh, v, qspec), _put(mesh, bias, P(None, "tp")),
                None, _put(mesh, ct, qspec))
        got = f(*args)
        for name, g, r in zip(("out", "dq", "dk", "dv", "dbias"), got, ref):
            _assert_close(g, r, name=name)
        assert _spec4(jax.typeof(got[0]).sharding.spec) == _spec4(qspec)
        bad = _put(mesh, q, P("dp", "tp"))
        with pytest.raises(ValueError, match="query length dim .*context_parallel.attention"):
            jax.jit(lambda q, k, v: _attn(q, k, v, None, None))(bad, args[1], args[2])


def _shard_map():
    sm = getattr(jax, "shard_map", None)
    if sm is None:  # pragma: no cover - older jax
        from jax.experimental.shard_map import shard_map as sm
    return sm


@multi_device
@pytest.mark.parametrize("check_vma", [True, False])
def test_shard_map_forward_and_grads(check_vma):
    """Inside shard_map each device runs the kernel on its block. The bias is replicated over dp: with
    check_vma (the default) JAX sums its gradient over dp, like for any invariant operand; without it the
    per-device part comes back and the user sums it (as for any parameter)."""
    mesh = _mesh()
    q, k, v, bias, mask, _ = _inputs(bias_shape=(1, 8, 32, 48), mask_shape=(4, 1, 32, 48))

    def loss(q, k, v, bias, mask):
        out = _attn(q, k, v, bias, mask, is_causal=True)
        return jnp.sum(out * jnp.cos(out))

    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    ref_out = jax.jit(lambda *a: _attn(*a, is_causal=True))(q, k, v, bias, mask)
    ref = jax.jit(grad)(q, k, v, bias, mask)
    qs, bs, ms = P("dp", None, "tp"), P(None, "tp"), P("dp")
    specs = (qs, qs, qs, bs, ms)
    smap = functools.partial(_shard_map(), mesh=mesh, in_specs=specs, check_vma=check_vma)

    def local_grads(*a):
        dq, dk, dv, db = grad(*a)
        return dq, dk, dv, (db if check_vma else jax.lax.psum(db, "dp"))

    fwd = jax.jit(smap(lambda *a: _attn(*a, is_causal=True), out_specs=qs))
    bwd = jax.jit(smap(local_grads, out_specs=(qs, qs, qs, bs)))
    args = [_put(mesh, x, s) for x, s in zip((q, k, v, bias, mask), specs)]
    _assert_close(fwd(*args), ref_out, name="out")
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), bwd(*args), ref):
        _assert_close(g, r, name=name)


@multi_device
def test_pmap_forward_and_grads():
    q, k, v, bias, _, _ = _inputs(b=8, bias_shape=(1, 8, 32, 48))

    def loss(q, k, v, bias):
        out = _attn(q, k, v, bias, None)
        return jnp.sum(out * jnp.cos(out))

    def step(q, k, v, bias):
        out = _attn(q, k, v, bias, None)
        dq, dk, dv, db = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)
        return out, dq, dk, dv, jax.lax.psum(db, "i")

    ref_out = jax.jit(lambda *a: _attn(*a, None))(q, k, v, bias)
    ref = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
    split = lambda x: x.reshape((N_DEVICES, 1) + x.shape[1:])  # noqa: E731
    got = jax.pmap(step, axis_name="i", in_axes=(0, 0, 0, None))(split(q), split(k), split(v), bias)
    _assert_close(got[0].reshape(ref_out.shape), ref_out, name="out")
    for name, g, r in zip(("dq", "dk", "dv"), got[1:4], ref[:3]):
        _assert_close(g.reshape(r.shape), r, name=name)
    _assert_close(got[4][0], ref[3], name="dbias")


@multi_device
@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_vmap_inside_sharded_jit(axis_type):
    """vmap folds into the batch dim (batch-major, so a sharded batch stays sharded), then the folded call is
    partitioned like any other."""
    mesh = _mesh(axis_type=axis_type)
    n = 2
    q, k, v, bias, _, _ = _inputs(b=4, bias_shape=(1, 8, 32, 48))
    qn = jnp.stack([q, q[::-1]])
    f = jax.jit(jax.vmap(lambda q, k, v, b: _attn(q, k, v, b, None), in_axes=(0, None, None, None)))
    ref = jnp.stack([jax.jit(lambda q: _attn(q, k, v, bias, None))(qn[i]) for i in range(n)])
    spec = P("dp", None, "tp")
    args = (_put(mesh, qn, P(None, "dp", None, "tp")), _put(mesh, k, spec), _put(mesh, v, spec),
            _put(mesh, bias, P(None, "tp")))
    compiled = f.lower(*args).compile().as_text()
    _assert_close(f(*args), ref, name="out")
    assert "all-gather" not in _collectives(compiled)


@multi_device
def test_gspmd_partitioner():
    """The GSPMD callbacks (jax_use_shardy_partitioner=False, deprecated in JAX) give the same results."""
    mesh = _mesh()
    q, k, v, bias, _, ct = _inputs(bias_shape=(1, 8, 32, 48))
    qspec = P("dp", None, "tp")
    previous = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", False)
    try:
        _check_sharded_vjp(mesh, q, k, v, bias, None, ct, qspec, qspec, P(None, "tp"), expect_allreduce=True)
    finally:
        jax.config.update("jax_use_shardy_partitioner", previous)


@multi_device
@pytest.mark.parametrize("window_size,tensor_parallel", [(None, True), (8, False)], ids=["dense-dp+tp", "topk-dp"])
def test_flax_training_step(window_size, tensor_parallel):
    """A training step of jax_dmattn.flax.DynamicMaskAttention (learned bias + top-k mask, GQA) under jit:
    data parallel (batch over dp, params replicated) and data + tensor parallel (heads over tp via the
    projection kernels). Loss and gradients equal the single-device ones; without the top-k mask there is
    no all-gather (jax.lax.top_k, used by the top-k mask builders, is gathered by XLA's CPU TopK)."""
    pytest.importorskip("flax")
    from jax_dmattn.flax import DynamicMaskAttention

    mesh = _mesh()
    model = DynamicMaskAttention(num_heads=8, num_kv_heads=4, head_dim=16, window_size=window_size,
                                 implementation=IMPL)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 64)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]

    def loss(params, x):
        return jnp.mean(model.apply({"params": params}, x) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    ref_loss, ref_grads = step(params, x)

    def spec(path, _):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if not tensor_parallel:
            return P()
        if name.startswith(("q_proj", "k_proj", "v_proj")):
            return P(None, "tp", None)  # [E, heads, D]
        if name.startswith("o_proj"):
            return P("tp", None, None)  # [H, D, E]
        if name.startswith("dt_proj") or name == "A":
            return P("tp")  # per kv head
        return P()

    sharded = jax.tree_util.tree_map_with_path(lambda p, v: _put(mesh, v, spec(p, v)), params)
    xs = _put(mesh, x, P("dp"))
    compiled = step.lower(sharded, xs).compile().as_text()
    got_loss, got_grads = step(sharded, xs)
    _assert_close(got_loss, ref_loss, name="loss")
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(got_grads)[0], jax.tree.leaves(ref_grads)):
        _assert_close(g, r, rtol=2e-5, name=jax.tree_util.keystr(path))
    if window_size is None:
        assert "all-gather" not in _collectives(compiled), _collectives(compiled)


@multi_device
def test_vmap_over_sharded_axis_explicit():
    """Under an Explicit mesh, vmap over a sharded axis folds example-major, so the fold stays sharded."""
    mesh = _mesh(shape=(8,), names=("dp",), axis_type="explicit")
    q, k, v, _, _, _ = _inputs(b=2, lq=16, lk=16, h=4, hkv=2, d=8)
    stack = lambda x: jnp.stack([x * (1 + 0.1 * i) for i in range(8)])  # noqa: E731
    qn, kn, vn = stack(q), stack(k), stack(v)

    def loss(q, k, v):
        return jnp.sum(jnp.sin(_attn(q, k, v, None, None)))

    f = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1, 2))))
    ref = f(qn, kn, vn)
    set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    with set_mesh(mesh):
        args = [_put(mesh, x, P("dp")) for x in (qn, kn, vn)]
        compiled = f.lower(*args).compile().as_text()
        got = f(*args)
    _assert_close(got[0], ref[0], name="loss")
    for name, g, r in zip(("dq", "dk", "dv"), got[1], ref[1]):
        _assert_close(g, r, name=name)
        assert _spec4(g.sharding.spec)[0] == "dp"
    assert not _collectives(compiled), _collectives(compiled)


@multi_device
@pytest.mark.parametrize("form", ["topk", "indices"])
def test_compact_masks_batch_and_head_sharding(form):
    """TopKMask / KeyIndices shard with the batch and heads like a bool mask: no gather, dbias local."""
    mesh = _mesh()
    q, k, v, bias, _, ct = _inputs(bias_shape=(4, 8, 1, 48))
    rng = np.random.default_rng(3)
    if form == "topk":
        mask = jax_dmattn.TopKMask(jnp.asarray(rng.standard_normal((4, 8, 48)), jnp.float32), 7)
    else:
        mask = jax_dmattn.KeyIndices(jnp.asarray(rng.integers(-1, 48, (4, 8, 32, 6)), jnp.int32))
    qspec = P("dp", None, "tp")
    _check_sharded_vjp(mesh, q, k, v, bias, mask, ct, qspec, qspec, P("dp", "tp"), mspec=P("dp", "tp"),
                       expect_allreduce=False, is_causal=True)


@multi_device
@pytest.mark.parametrize("topk", [False, True], ids=["no-mask", "topk"])
@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_row_bounds_batch_and_head_sharding(axis_type, topk):
    """Segment ids and lengths sharded with the batch, a window, batch + head sharded q / k / v (and a TopKMask,
    chosen within the bounds, sharded like them): the values and gradients of one device, and no gather (the row
    bounds stay with their batch shard)."""
    mesh = _mesh(axis_type=axis_type)
    q, k, v, bias, _, ct = _inputs(b=4, lq=40, lk=40, bias_shape=(4, 8, 1, 40))
    rng = np.random.default_rng(7)
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (4, 40)), axis=1).astype(np.int32))
    lens = jnp.asarray(rng.integers(0, 41, (4,)).astype(np.int32))
    scores = jnp.asarray(rng.standard_normal((4, 8, 40)), jnp.float32)

    def f(q, k, v, bias, seg, lens, scores, ct):
        mask = jax_dmattn.TopKMask(scores, 6) if topk else None
        out, vjp = jax.vjp(lambda q, k, v, b: _attn(q, k, v, b, mask, is_causal=True, q_segment_ids=seg,
                                                    kv_segment_ids=seg, local_window_size=(9, 0),
                                                    query_seq_lengths=lens, key_value_seq_lengths=lens),
                           q, k, v, bias)
        return (out,) + tuple(vjp(ct))

    f = jax.jit(f)
    ref = f(q, k, v, bias, seg, lens, scores, ct)
    qspec = P("dp", None, "tp")
    set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    with set_mesh(mesh):
        args = (_put(mesh, q, qspec), _put(mesh, k, qspec), _put(mesh, v, qspec), _put(mesh, bias, P("dp", "tp")),
                _put(mesh, seg, P("dp")), _put(mesh, lens, P("dp")), _put(mesh, scores, P("dp", "tp")),
                _put(mesh, ct, qspec))
        got = f(*args)
        compiled = f.lower(*args).compile().as_text()
    for name, g, r in zip(("out", "dq", "dk", "dv", "dbias"), got, ref):
        _assert_close(g, r, 1e-5, name)
    assert "all-gather" not in _collectives(compiled)
    assert _spec4(got[0].sharding.spec) == _spec4(qspec)


@multi_device
@pytest.mark.parametrize("hkv", [2, 8])
def test_decode_step_head_sharding(hkv):
    """A one-row GQA call (packed: the query heads of a kv head become rows) with batch and head sharding: the values
    and gradients of one device, without gathers."""
    mesh = _mesh()
    q, k, v, bias, _, ct = _inputs(b=4, lq=1, lk=64, h=16, hkv=hkv, bias_shape=(4, hkv, 1, 64))
    _check_sharded_vjp(mesh, q, k, v, bias, None, ct, P("dp", None, "tp"), P("dp", None, "tp" if hkv == 8 else None),
                       P("dp", "tp" if hkv == 8 else None), is_causal=True)


@multi_device
def test_topk_under_bounds_cuda_operands_keep_explicit_sharding():
    """What the per-row route of a CUDA call builds from a TopKMask under row bounds (each row's own top k as key
    indices: _compact.per_row_topk_lists, the route of segment ids whose units outgrow the pre-pass's lists) traces
    under an Explicit-axes mesh with batch- and head-sharded scores and gives the values of one device (the CPU
    kernels build theirs inside the lowering, the test above)."""
    from jax_dmattn import _bounds, _compact

    mesh = _mesh(axis_type="explicit")
    rng = np.random.default_rng(11)
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (4, 40)), axis=1).astype(np.int32))
    lens = jnp.asarray(rng.integers(0, 41, (4,)).astype(np.int32))
    scores = jnp.asarray(rng.standard_normal((4, 8, 1, 40)), jnp.float32)

    def f(scores, seg, lens):
        bounds = _bounds.make_row_bounds(batch=4, q_len=40, kv_len=40, is_causal=True, q_segment_ids=seg,
                                         kv_segment_ids=seg, local_window_size=(9, 0), query_seq_lengths=lens,
                                         key_value_seq_lengths=lens)
        return _compact.bounded_topk_indices(_compact.canonical_scores(scores), 6, bounds.rows, bounds.key_segments)

    ref = jax.jit(f)(scores, seg, lens)
    set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    with set_mesh(mesh):
        got = jax.jit(f)(_put(mesh, scores, P("dp", "tp")), _put(mesh, seg, P("dp")), _put(mesh, lens, P("dp")))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


@multi_device
@pytest.mark.parametrize("form", ["indices-per-row", "indices-shared", "topk", "topk-noncausal", "topk-lengths",
                                  "topk-segments"])
def test_compact_masks_cuda_lower_under_explicit_sharding(form, monkeypatch):
    """A CUDA call with a compact mask builds its key lists in its lowering: fwd + bwd trace and lower under an
    Explicit-axes mesh with batch- and head-sharded operands (one sort and scatter per unit, with the units'
    sharding; lowering needs no GPU, and the attention is partitioned at compile time)."""
    from jax_dmattn import _ffi

    monkeypatch.setattr(_ffi, "has_cuda_kernels", lambda: True)
    mesh = _mesh(axis_type="explicit")
    q, k, v, bias, _, _ = _inputs(b=4, lq=40, lk=40, bias_shape=(4, 8, 1, 40), dtype=jnp.bfloat16)
    rng = np.random.default_rng(13)
    kw, causal = {}, form != "topk-noncausal"
    if form.startswith("indices"):
        shape = (4, 8, 40, 5) if form == "indices-per-row" else (4, 8, 5)
        mask = jax_dmattn.KeyIndices(jnp.asarray(rng.integers(-1, 40, shape), jnp.int32))
        mspec = P("dp", "tp")
    else:
        mask = jax_dmattn.TopKMask(jnp.asarray(rng.standard_normal((4, 8, 40)), jnp.float32), 6)
        mspec = P("dp", "tp")
    if form == "topk-lengths":
        kw["key_value_seq_lengths"] = jnp.asarray(rng.integers(0, 41, (4,)), jnp.int32)
    if form == "topk-segments":
        kw["q_segment_ids"] = kw["kv_segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (4, 40)), axis=1),
                                                                 jnp.int32)

    def f(q, k, v, bias, mask, kw):
        def loss(q, k, v, b):
            out = jax_dmattn.attention(q, k, v, b, mask, is_causal=causal, implementation="cuda", **kw)
            return jnp.sum(out.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)

    qspec = P("dp", None, "tp")
    set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    with set_mesh(mesh):
        mask = jax.tree_util.tree_map(lambda x: _put(mesh, x, mspec), mask)
        args = (_put(mesh, q, qspec), _put(mesh, k, qspec), _put(mesh, v, qspec), _put(mesh, bias, P("dp", "tp")),
                mask, {n: _put(mesh, x, P("dp")) for n, x in kw.items()})
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "CustomSPMDPartitioning" in text


@multi_device
@pytest.mark.parametrize("given", ["key_value_seq_lengths", "query_seq_lengths"])
def test_row_bounds_of_lengths_alone_under_explicit_sharding(given):
    """Row bounds from one batch-sharded lengths argument alone (no segment ids, no window): every field takes the
    lengths' sharding, and the values are those of one device."""
    from jax_dmattn import _bounds

    mesh = _mesh(axis_type="explicit")
    lens = jnp.asarray(np.random.default_rng(17).integers(0, 41, (4,)), jnp.int32)

    def f(lens):
        return _bounds.make_row_bounds(batch=4, q_len=40, kv_len=40, is_causal=True, **{given: lens}).rows

    ref = jax.jit(f)(lens)
    set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    with set_mesh(mesh):
        got = jax.jit(f)(_put(mesh, lens, P("dp")))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
