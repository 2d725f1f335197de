"""``jax_dmattn.attention`` under JAX transformations: jit, grad, value_and_grad, vmap (q/k/v only, all inputs,
bias only, non-leading axes, nested), vmap of grad, grad of vmap, checkpoint (remat), lax.scan, eval_shape.
Each is compared with the untransformed (eager, per-example) result and, where cheap, with the oracle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from helpers import Case, assert_close, get_attention, make_cotangent, make_inputs, to_f64

N = 3  # vmapped size


def _case(implementation, **kw):
    dtype = "bf16" if implementation == "cuda" else "f32"
    base = dict(B=2, Lq=33, Lk=47, H=4, Hkv=2, D=32, dtype=dtype, bias=(2, 2, 33, 47), mask=(2, 1, 33, 47),
                mask_kind="rows", is_causal=True)
    base.update(kw)
    return Case(**base)


def _attn(implementation, case):
    attention = get_attention()
    return functools.partial(attention, is_causal=case.is_causal, softcap=case.softcap, scale=case.scale,
                             implementation=implementation)


def _batched_inputs(case, rng, n=N):
    """n independent input sets, stacked on a new leading axis."""
    sets = [make_inputs(case, rng) for _ in range(n)]
    return [None if sets[0][i] is None else np.stack([s[i] for s in sets]) for i in range(5)]


def _close(actual, expected, case, kind="out", name=""):
    assert_close(actual, to_f64(expected), case.jdtype, kind, name=name)


def test_eval_shape(implementation):
    case = _case(implementation)
    f = _attn(implementation, case)
    dt = case.jdtype
    q = jax.ShapeDtypeStruct((2, 33, 4, 32), dt)
    kv = jax.ShapeDtypeStruct((2, 47, 2, 32), dt)
    bias = jax.ShapeDtypeStruct((2, 2, 33, 47), jnp.float32)
    mask = jax.ShapeDtypeStruct((2, 1, 33, 47), jnp.bool_)
    out, lse = jax.eval_shape(lambda *a: f(*a, return_lse=True), q, kv, kv, bias, mask)
    assert out.shape == (2, 33, 4, 32) and out.dtype == dt
    assert lse.shape == (2, 4, 33) and lse.dtype == jnp.float32


def test_jit_matches_eager(implementation, rng):
    case = _case(implementation)
    q, k, v, bias, mask = make_inputs(case, rng)
    f = _attn(implementation, case)
    out_e, lse_e = f(q, k, v, bias, mask, return_lse=True)
    out_j, lse_j = jax.jit(lambda *a: f(*a, return_lse=True))(q, k, v, bias, mask)
    _close(out_j, out_e, case, name="out")
    _close(lse_j, lse_e, case, "lse", name="lse")
    eo, el = oracle.oracle_attention(q, k, v, bias, mask, is_causal=True)
    assert_close(out_j, eo, case.jdtype, "out")
    assert_close(lse_j, el, case.jdtype, "lse")


def _loss_fn(f, mask, w):
    def loss(q, k, v, bias):
        return jnp.sum(f(q, k, v, bias, mask).astype(jnp.float32) * w)

    return loss


def test_grad_and_value_and_grad(implementation, rng):
    case = _case(implementation, softcap=7.0)
    q, k, v, bias, mask = make_inputs(case, rng)
    w = make_cotangent(case, rng)
    f = _attn(implementation, case)
    loss = _loss_fn(f, mask, jnp.asarray(w, jnp.float32))
    grad_fn = jax.grad(loss, argnums=(0, 1, 2, 3))
    if implementation == "xla":  # eager is op-by-op for the pure-jnp path: slow and adds nothing there
        grad_fn = jax.jit(grad_fn)
    grads = grad_fn(q, k, v, bias)  # eager: the primitives' impl rules run outside jit
    val, grads_j = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
    eo, _ = oracle.oracle_attention(q, k, v, bias, mask, is_causal=True, softcap=7.0)
    exp = oracle.oracle_grads(q, k, v, bias, mask, w, is_causal=True, softcap=7.0)
    assert_close(val, (eo * w.astype(np.float64)).sum(), case.jdtype, "out", name="loss")
    for name, g, gj, e in zip(("dq", "dk", "dv", "dbias"), grads, grads_j, exp):
        assert_close(g, e, case.jdtype, "grad", name=name)
        _close(gj, g, case, "grad", name=name + " (jit value_and_grad vs grad)")


def _loop(f, *args, in_axes):
    """Apply f per example along each arg's axis (None = shared) and stack the results on axis 0."""
    n = next(a.shape[ax] for a, ax in zip(args, in_axes) if ax is not None)
    outs = []
    for i in range(n):
        sl = [a if (ax is None or a is None) else np.take(a, i, axis=ax) for a, ax in zip(args, in_axes)]
        outs.append(f(*sl))
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *outs)


@pytest.mark.parametrize(
    "which",
    ["qkv", "all", "bias_only", "mask_only", "qkv_bias", "axis1"],
)
def test_vmap(implementation, which, rng):
    case = _case(implementation)
    f = _attn(implementation, case)
    g = lambda q, k, v, b, m: f(q, k, v, b, m, return_lse=True)
    qs, ks, vs, bs, ms = _batched_inputs(case, rng)
    q, k, v, b, m = qs[0], ks[0], vs[0], bs[0], ms[0]
    if which == "qkv":
        args, axes = (qs, ks, vs, b, m), (0, 0, 0, None, None)
    elif which == "all":
        args, axes = (qs, ks, vs, bs, ms), (0, 0, 0, 0, 0)
    elif which == "bias_only":
        args, axes = (q, k, v, bs, m), (None, None, None, 0, None)
    elif which == "mask_only":
        args, axes = (q, k, v, b, ms), (None, None, None, None, 0)
    elif which == "qkv_bias":  # bias batched but broadcast over the inner batch: [N, 1, Hkv, Lq, Lk]
        args, axes = (qs, ks, vs, bs[:, :1], m), (0, 0, 0, 0, None)
    else:  # the vmapped axis is not the leading one
        args = (np.moveaxis(qs, 0, 1), np.moveaxis(ks, 0, 2), vs, np.moveaxis(bs, 0, 3), ms)
        axes = (1, 2, 0, 3, 0)
    out, lse = jax.jit(jax.vmap(g, in_axes=axes))(*args)
    exp_out, exp_lse = _loop(g, *args, in_axes=axes)
    assert out.shape == exp_out.shape and lse.shape == exp_lse.shape
    _close(out, exp_out, case, name="out")
    _close(lse, exp_lse, case, "lse", name="lse")
    # and the oracle, per example
    for i in range(N):
        sl = [a if ax is None else np.take(a, i, axis=ax) for a, ax in zip(args, axes)]
        eo, el = oracle.oracle_attention(*sl, is_causal=True)
        assert_close(out[i], eo, case.jdtype, "out", name=f"out[{i}] vs oracle")


def test_vmap_nested_leading_dims(implementation, rng):
    """Two extra leading dims (vmap of vmap) on q/k/v and bias."""
    case = _case(implementation, bias=(1, 2, 1, 47), mask=(2, 1, 33, 47))
    f = _attn(implementation, case)
    sets = [_batched_inputs(case, rng, n=2) for _ in range(2)]
    qs, ks, vs, bs = (np.stack([s[i] for s in sets]) for i in range(4))  # [2, 2, ...]
    m = sets[0][4][0]
    out = jax.vmap(jax.vmap(lambda q, k, v, b: f(q, k, v, b, m)))(qs, ks, vs, bs)
    assert out.shape == (2, 2, 2, 33, 4, 32)
    for i in range(2):
        for j in range(2):
            eo, _ = oracle.oracle_attention(qs[i, j], ks[i, j], vs[i, j], bs[i, j], m, is_causal=True)
            assert_close(out[i, j], eo, case.jdtype, "out", name=f"out[{i},{j}]")


@pytest.mark.parametrize("bias_axis", [0, None], ids=["bias-batched", "bias-shared"])
def test_vmap_of_grad(implementation, bias_axis, rng):
    case = _case(implementation)
    f = _attn(implementation, case)
    qs, ks, vs, bs, ms = _batched_inputs(case, rng)
    ws = np.stack([make_cotangent(case, rng) for _ in range(N)]).astype(np.float32)
    b = bs if bias_axis == 0 else bs[0]

    def grads(q, k, v, bias, mask, w):
        return jax.grad(_loss_fn(f, mask, w), argnums=(0, 1, 2, 3))(q, k, v, bias)

    axes = (0, 0, 0, bias_axis, 0, 0)
    got = jax.jit(jax.vmap(grads, in_axes=axes))(qs, ks, vs, b, ms, ws)
    for i in range(N):
        bi = b[i] if bias_axis == 0 else b
        exp = oracle.oracle_grads(qs[i], ks[i], vs[i], bi, ms[i], ws[i], is_causal=True)
        for name, g, e in zip(("dq", "dk", "dv", "dbias"), got, exp):
            assert g.shape[0] == N
            assert_close(g[i], e, case.jdtype, "grad", name=f"{name}[{i}]")


def test_grad_of_vmap_shared_bias(implementation, rng):
    """grad through vmap with a shared (unbatched) bias and mask: dbias sums over the vmapped examples."""
    case = _case(implementation, bias=(1, 2, 33, 47))
    f = _attn(implementation, case)
    qs, ks, vs, bs, ms = _batched_inputs(case, rng)
    b, m = bs[0], ms[0]
    ws = np.stack([make_cotangent(case, rng) for _ in range(N)]).astype(np.float32)

    def loss(q, k, v, bias):
        out = jax.vmap(lambda q, k, v: f(q, k, v, bias, m))(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * ws)

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(qs, ks, vs, b)
    exps = [oracle.oracle_grads(qs[i], ks[i], vs[i], b, m, ws[i], is_causal=True) for i in range(N)]
    for j, name in enumerate(("dq", "dk", "dv")):
        assert_close(got[j], np.stack([e[j] for e in exps]), case.jdtype, "grad", name=name)
    assert got[3].shape == b.shape
    assert_close(got[3], sum(e[3] for e in exps), case.jdtype, "grad", name="dbias")


def test_checkpoint(implementation, rng):
    case = _case(implementation, softcap=5.0)
    f = _attn(implementation, case)
    q, k, v, bias, mask = make_inputs(case, rng)
    w = jnp.asarray(make_cotangent(case, rng), jnp.float32)

    def block(q, k, v, bias):
        h = f(q, k, v, bias, mask)
        return f(h, k, v, bias, mask)  # two layers, so the remat has something to recompute

    def loss(fn):
        return lambda q, k, v, bias: jnp.sum(fn(q, k, v, bias).astype(jnp.float32) * w)

    ref = jax.jit(jax.grad(loss(block), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    for policy in (None, jax.checkpoint_policies.nothing_saveable):
        ck = jax.checkpoint(block, policy=policy)
        got = jax.jit(jax.grad(loss(ck), argnums=(0, 1, 2, 3)))(q, k, v, bias)
        for name, g, r in zip(("dq", "dk", "dv", "dbias"), got, ref):
            _close(g, r, case, "grad", name=f"{name} (remat, policy={policy})")


def test_scan(implementation, rng):
    """attention inside lax.scan (the carry feeds the next query), values and grads vs a Python loop."""
    case = _case(implementation, Lq=47)  # Lq == Lk so out can be the next query
    case = case.replace(bias=(2, 2, 47, 47), mask=(2, 1, 47, 47))
    f = _attn(implementation, case)
    steps = 3
    q, k, v, bias, mask = make_inputs(case, rng)
    biases = np.stack([make_inputs(case, rng)[3] for _ in range(steps)])

    def run_scan(q, k, v, biases):
        def body(h, b):
            o = f(h, k, v, b, mask)
            return (h + o).astype(h.dtype), jnp.sum(o.astype(jnp.float32))

        h, ys = jax.lax.scan(body, q, biases)
        return h, ys

    def run_loop(q, k, v, biases):
        h, ys = q, []
        for s in range(steps):
            o = f(h, k, v, biases[s], mask)
            ys.append(jnp.sum(o.astype(jnp.float32)))
            h = (h + o).astype(h.dtype)
        return h, jnp.stack(ys)

    h_s, y_s = jax.jit(run_scan)(q, k, v, biases)
    h_l, y_l = jax.jit(run_loop)(q, k, v, biases)
    _close(h_s, h_l, case, name="scan carry")
    _close(y_s, y_l, case, name="scan ys")

    loss_s = lambda *a: jnp.sum(run_scan(*a)[0].astype(jnp.float32) ** 2)
    loss_l = lambda *a: jnp.sum(run_loop(*a)[0].astype(jnp.float32) ** 2)
    g_s = jax.jit(jax.grad(loss_s, argnums=(0, 1, 2, 3)))(q, k, v, biases)
    g_l = jax.jit(jax.grad(loss_l, argnums=(0, 1, 2, 3)))(q, k, v, biases)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), g_s, g_l):
        _close(a, b, case, "grad", name=f"{name} (scan vs loop)")


def test_jit_with_transposed_and_sliced_inputs(implementation, rng):
    """Inputs produced inside jit by transposes / slices (non-default layouts upstream of the kernel call)."""
    case = _case(implementation)
    f = _attn(implementation, case)
    q, k, v, bias, mask = make_inputs(case, rng)
    qt = np.ascontiguousarray(q.transpose(0, 2, 1, 3))  # [B, H, Lq, D]
    kv = np.concatenate([k, v], axis=-1)  # [B, Lk, Hkv, 2D]
    bt = np.ascontiguousarray(bias.transpose(0, 1, 3, 2))  # [B, Hkv, Lk, Lq]

    @jax.jit
    def g(qt, kv, bt, mask):
        return f(qt.transpose(0, 2, 1, 3), kv[..., :32], kv[..., 32:], bt.transpose(0, 1, 3, 2), mask)

    out = g(qt, kv, bt, mask)
    eo, _ = oracle.oracle_attention(q, k, v, bias, mask, is_causal=True)
    assert_close(out, eo, case.jdtype, "out")
