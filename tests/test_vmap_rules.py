"""The batching rules of the attention primitives (jax_dmattn/_primitives.py).

vmap over any subset of query / key / value / bias / mask, at any axis, nested, and vmap of grad, must give the
per-example results (compared with a Python loop of single calls) and must stay ONE kernel call on a folded
batch (or, when only the query is vmapped, on folded query heads): no sequential loop in the jaxpr. Gradients
under vmap are per example, also for a bias shared by the examples or broadcast over the batch.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_dmattn

# float32 modules and calls with float32 tolerances: on a GPU host they run on the CPU device (tests/conftest.py)
pytestmark = pytest.mark.cpu_kernels

IMPL = "cpu"
N = 2  # vmapped size
B, LQ, LK, H, HKV, D = 2, 16, 24, 4, 2, 8
NAMES = ("q", "k", "v", "bias", "mask")


def _example(rng, bias_shape=(B, H, LQ, LK), mask_shape=(1, 1, LQ, LK), hkv=HKV):
    q = rng.standard_normal((B, LQ, H, D)).astype(np.float32)
    k = rng.standard_normal((B, LK, hkv, D)).astype(np.float32)
    v = rng.standard_normal((B, LK, hkv, D)).astype(np.float32)
    bias = None if bias_shape is None else rng.standard_normal(bias_shape).astype(np.float32)
    mask = None if mask_shape is None else rng.random(mask_shape) < 0.75
    if mask is not None:
        mask[..., 0] = True  # keep at least one key per row so no gradient is trivially zero
    return [q, k, v, bias, mask]


def _stacked(rng, mapped, n=N, **kw):
    """Inputs for vmap: the operands in `mapped` get a leading axis of n independent examples."""
    base = _example(rng, **kw)
    out = []
    for i, x in enumerate(base):
        if x is not None and NAMES[i] in mapped:
            out.append(np.stack([x] + [_example(rng, **kw)[i] for _ in range(n - 1)]))
        else:
            out.append(x)
    return out


def _attn(q, k, v, bias, mask, **kw):
    return jax_dmattn.attention(q, k, v, bias, mask, implementation=IMPL, **kw)


def _loss(q, k, v, bias, mask, ct, **kw):
    return jnp.sum(_attn(q, k, v, bias, mask, **kw) * ct)


# Per-example references, jitted once: every subset test calls them with the same shapes (cache hits).
_ref_fwd = jax.jit(lambda *a: _attn(*a, is_causal=True, return_lse=True))
_ref_grad = jax.jit(jax.grad(lambda q, k, v, b, m, c: _loss(q, k, v, b, m, c, is_causal=True), argnums=(0, 1, 2, 3)))


def _take(args, axes, i):
    return [x if (x is None or a is None) else np.take(x, i, axis=a) for x, a in zip(args, axes)]


def _close(actual, expected, rtol=2e-5, name=""):
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, (name, a.shape, e.shape)
    err = np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-6)
    assert err <= rtol, f"{name}: relative error {err:.3g}"


def _eqns(closed):
    """Every equation of a closed jaxpr, those of sub-jaxprs (custom_vjp, pjit, ...) included."""
    out = []

    def visit(jp):
        for eqn in jp.eqns:
            out.append(eqn)
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        visit(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        visit(sub)

    visit(closed.jaxpr)
    return out


def _primitives(closed):
    return [e.primitive.name for e in _eqns(closed)]


def _fwd_operand_shapes(closed):
    """Operand shapes of the (single) dmattn_fwd call."""
    return [tuple(v.aval.shape) for e in _eqns(closed) if e.primitive.name == "dmattn_fwd" for v in e.invars]


def _assert_single_kernel_call(jaxpr, fwd=1, bwd=0):
    names = _primitives(jaxpr)
    assert names.count("dmattn_fwd") == fwd, names
    assert names.count("dmattn_bwd") == bwd, names
    loops = {"while", "scan", "fori_loop"} & set(names)
    assert not loops, f"vmap became a loop: {loops}"


SUBSETS = [s for r in range(1, 6) for s in itertools.combinations(NAMES, r)]
# vmap of grad for every single operand, a few pairs and triples, and all of them (compiles are the cost)
GRAD_SUBSETS = [s for s in SUBSETS if len(s) == 1] + [("q", "bias"), ("k", "v"), ("bias", "mask"),
                                                      ("q", "k", "v"), ("k", "v", "mask"), NAMES]


@pytest.mark.parametrize("mapped", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_vmap_any_subset_forward_and_grad(mapped):
    """Forward for every subset of vmapped operands; vmap-of-grad (per-example gradients) for GRAD_SUBSETS."""
    rng = np.random.default_rng(len(mapped) * 31 + sum(map(len, mapped)))
    args = _stacked(rng, mapped)
    axes = [0 if n in mapped else None for n in NAMES]
    ct = rng.standard_normal((N, B, LQ, H, D)).astype(np.float32)  # cotangents always per example

    fwd = jax.vmap(lambda *a: _attn(*a, is_causal=True, return_lse=True), in_axes=axes)
    out, lse = jax.jit(fwd)(*args)
    for i in range(N):
        o_i, l_i = _ref_fwd(*_take(args, axes, i))
        _close(out[i], o_i, name=f"out[{i}]")
        _close(lse[i], l_i, name=f"lse[{i}]")
    _assert_single_kernel_call(jax.make_jaxpr(fwd)(*args))
    if mapped not in GRAD_SUBSETS:
        return

    grad = jax.vmap(jax.grad(lambda q, k, v, b, m, c: _loss(q, k, v, b, m, c, is_causal=True),
                             argnums=(0, 1, 2, 3)), in_axes=axes + [0])
    grads = jax.jit(grad)(*args, ct)
    for i in range(N):
        ref = _ref_grad(*_take(args, axes, i), ct[i])
        for name, g, r in zip(("dq", "dk", "dv", "dbias"), grads, ref):
            _close(g[i], r, name=f"{name}[{i}]")
    _assert_single_kernel_call(jax.make_jaxpr(grad)(*args, ct), fwd=1, bwd=1)


@pytest.mark.parametrize("bias_shape", [(1, H, LQ, LK), (B, 1, LQ, LK), (1, 1, 1, LK), (H, LQ, LK)],
                         ids=["batch-bcast", "head-bcast", "keys-only", "rank3"])
@pytest.mark.parametrize("bias_mapped", [False, True], ids=["shared", "vmapped"])
def test_per_example_dbias(bias_shape, bias_mapped):
    """vmap(grad) gives one dbias per example, in the bias's own (broadcast) shape, whether the bias is
    vmapped or shared; grad(vmap) of a shared bias is the sum of those."""
    rng = np.random.default_rng(7)
    mapped = ("q", "bias") if bias_mapped else ("q",)
    q, k, v, bias, mask = _stacked(rng, mapped, bias_shape=bias_shape)
    axes = (0, None, None, 0 if bias_mapped else None, None)
    ct = rng.standard_normal((N, B, LQ, H, D)).astype(np.float32)
    dbias = jax.jit(jax.vmap(jax.grad(_loss, argnums=3), in_axes=axes + (0,)))(q, k, v, bias, mask, ct)
    assert dbias.shape == (N,) + bias_shape
    refs = [jax.grad(_loss, argnums=3)(*_take((q, k, v, bias, mask), axes, i), ct[i]) for i in range(N)]
    for i in range(N):
        _close(dbias[i], refs[i], name=f"dbias[{i}]")
    if not bias_mapped:
        total = jax.jit(jax.grad(lambda *a: jnp.sum(jax.vmap(_loss, in_axes=axes + (0,))(*a)), argnums=3))(
            q, k, v, bias, mask, ct)
        _close(total, sum(refs), name="grad of vmap")


@pytest.mark.parametrize("in_axes", [(2, None, None, None, None), (1, 3, 3, None, None), (None, 0, 2, 4, None),
                                     (None, None, None, None, 1)], ids=["q@2", "qkv@1,3,3", "kvb@0,2,4", "mask@1"])
def test_vmap_non_leading_axes(in_axes):
    rng = np.random.default_rng(3)
    base = _example(rng)
    args = []
    for x, a in zip(base, in_axes):
        if a is None:
            args.append(x)
        else:
            args.append(np.stack([x, _example(rng)[NAMES.index("mask")] if x.dtype == bool else
                                  rng.standard_normal(x.shape).astype(x.dtype)], axis=a))
    f = jax.vmap(_attn, in_axes=in_axes, out_axes=1)
    out = jax.jit(f)(*args)
    assert out.shape == (B, N, LQ, H, D)
    for i in range(N):
        _close(out[:, i], _attn(*_take(args, in_axes, i)), name=f"out[{i}]")
    _assert_single_kernel_call(jax.make_jaxpr(f)(*args))


def test_nested_vmap_and_grad():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((3, N, B, LQ, H, D)).astype(np.float32)
    _, k, v, bias, mask = _example(rng, bias_shape=(1, H, LQ, LK))
    ct = rng.standard_normal(q.shape).astype(np.float32)
    g = jax.vmap(jax.vmap(jax.grad(_loss, argnums=(0, 3)), in_axes=(0, None, None, None, None, 0)),
                 in_axes=(0, None, None, None, None, 0))
    dq, db = jax.jit(g)(q, k, v, bias, mask, ct)
    assert dq.shape == q.shape and db.shape == (3, N, 1, H, LQ, LK)
    for i, j in [(0, 0), (2, 1)]:
        rq, rb = jax.grad(_loss, argnums=(0, 3))(q[i, j], k, v, bias, mask, ct[i, j])
        _close(dq[i, j], rq, name="dq")
        _close(db[i, j], rb, name="dbias")
    _assert_single_kernel_call(jax.make_jaxpr(g)(q, k, v, bias, mask, ct), fwd=1, bwd=1)


@pytest.mark.parametrize("hkv,bias_heads", [(2, 2), (1, 1), (4, 4), (2, None)])
def test_query_only_vmap_folds_into_heads(hkv, bias_heads):
    """Only q vmapped: the examples become query heads; k / v are not broadcast over the examples."""
    rng = np.random.default_rng(11)
    bias_shape = None if bias_heads is None else (B, bias_heads, LQ, LK)
    q, k, v, bias, mask = _stacked(rng, ("q",), bias_shape=bias_shape, hkv=hkv)
    f = jax.vmap(lambda q: _attn(q, k, v, bias, mask, return_lse=True, softcap=3.0, is_causal=True))
    out, lse = jax.jit(f)(q)
    for i in range(N):
        o, l = _attn(q[i], k, v, bias, mask, return_lse=True, softcap=3.0, is_causal=True)
        _close(out[i], o, name="out")
        _close(lse[i], l, name="lse")
    shapes = _fwd_operand_shapes(jax.make_jaxpr(f)(q))
    assert shapes[0] == (B, LQ, N * H, D) and shapes[1] == (B, LK, hkv, D), shapes
    # gradients: the forward folds into heads, the backward (per-example dk / dv) into the batch
    ct = rng.standard_normal(q.shape).astype(np.float32)
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    grads = jax.jit(jax.vmap(jax.grad(_loss, argnums=argnums), in_axes=(0, None, None, None, None, 0)))(
        q, k, v, bias, mask, ct)
    for i in range(N):
        ref = jax.grad(_loss, argnums=argnums)(q[i], k, v, bias, mask, ct[i])
        for name, g, r in zip(("dq", "dk", "dv", "dbias"), grads, ref):
            _close(g[i], r, name=f"{name}[{i}]")



def test_query_and_bias_per_head_vmap_folds_into_batch():
    """A per-query-head bias (H != Hkv) would need copying over the examples for the heads fold: batch fold."""
    rng = np.random.default_rng(12)
    q, k, v, bias, mask = _stacked(rng, ("q",), bias_shape=(1, H, LQ, LK))
    f = jax.vmap(lambda q: _attn(q, k, v, bias, mask))
    out = jax.jit(f)(q)
    for i in range(N):
        _close(out[i], _attn(q[i], k, v, bias, mask), name="out")
    shapes = _fwd_operand_shapes(jax.make_jaxpr(f)(q))
    assert shapes[0] == (N * B, LQ, H, D) and shapes[3] == (1, H, LQ, LK), shapes


def test_vmap_mask_only_keeps_bias_broadcast():
    """vmap over the mask alone: q/k/v are broadcast over the examples, a batch-broadcast bias is not."""
    rng = np.random.default_rng(13)
    q, k, v, bias, mask = _stacked(rng, ("mask",), bias_shape=(1, 1, LQ, LK), mask_shape=(B, 1, LQ, LK))
    f = jax.vmap(lambda m: _attn(q, k, v, bias, m))
    out = jax.jit(f)(mask)
    for i in range(N):
        _close(out[i], _attn(q, k, v, bias, mask[i]), name="out")
    shapes = _fwd_operand_shapes(jax.make_jaxpr(f)(mask))
    assert shapes[3] == (1, 1, LQ, LK) and shapes[4] == (N * B, 1, LQ, LK), shapes
