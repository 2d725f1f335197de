"""The CUDA kernels on two or more GPUs: jit with batch- and head-sharded NamedSharding inputs (the
custom_partitioning rules), shard_map and pmap give the single-GPU results, on both backward paths (key lists:
per-key bias and a top-k mask; key tiles: a full bias), with a bias replicated over the sharded batch whose
gradient must be summed across devices.

Beyond the partitioning rules (tested on 8 CPU devices in tests/test_sharding.py) this checks what only real
GPUs show: every kernel launches on the second device too (its dynamic shared-memory limit must be raised there
as well: csrc/cuda/smem_limit.cuh), and the per-device buffers, streams and key-list pre-passes do not mix.

Forward outputs must match bitwise (each device computes its slice exactly as one GPU computes the whole). The
gradients are compared norm-wise at the bf16 tolerance, 1e-2: the deterministic fixed-point backward picks its
resolution from the magnitudes of the operands it sees, which differ between a shard and the whole batch, and a
replicated bias's gradient is rounded to bf16 on each device before the cross-device sum. A wrong shard, head
mapping or missing cross-device sum is an O(1) error.

GPU only; skipped with fewer than 2 GPUs.
"""
from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import cuda_targets_on_gpu, random_topk_mask  # noqa: E402

import jax_dmattn  # noqa: E402

TARGETS = ("dmattn_key_lists_cuda", "dmattn_fwd_cuda", "dmattn_bwd_cuda")
_READY = cuda_targets_on_gpu(*TARGETS)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _READY, reason="needs a GPU and the CUDA kernels"),
              pytest.mark.skipif(_READY and jax.device_count() < 2, reason="needs 2 or more GPUs")]

B, L, H, HKV, D, TOPK = 4, 384, 4, 2, 128, 48


def inputs(path, bias_batch, seed=0):
    """bf16 q, k, v; path "key_lists": per-key bias [bias_batch, Hkv, 1, L] and a per-row top-k mask [B, Hkv, L, L];
    path "key_tiles": a full bias [bias_batch, H, L, L] and a random mask [B, 1, L, L]."""
    rng = np.random.default_rng(seed)

    def bf(shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(jnp.bfloat16)

    q, k, v = bf((B, L, H, D)), bf((B, L, HKV, D)), bf((B, L, HKV, D))
    if path == "key_lists":
        bias = bf((bias_batch, HKV, 1, L))
        mask = jnp.asarray(random_topk_mask(rng, (B, HKV, L, L), TOPK))
    else:
        bias = bf((bias_batch, H, L, L))
        mask = jnp.asarray(rng.random((B, 1, L, L)) < 0.5)
    return q, k, v, bias, mask


def attend(q, k, v, bias, mask):
    return jax_dmattn.attention(q, k, v, bias=bias, mask=mask, is_causal=True, deterministic=True,
                                implementation="cuda")


def loss(q, k, v, bias, mask):
    out = attend(q, k, v, bias, mask).astype(jnp.float32)
    return jnp.sum(out * jnp.cos(jnp.arange(D, dtype=jnp.float32)))


grads = jax.grad(loss, argnums=(0, 1, 2, 3))


def single_gpu(args):
    dev = jax.devices()[0]
    args = [jax.device_put(x, dev) for x in args]
    return np.asarray(jax.jit(attend)(*args)), [np.asarray(g) for g in jax.jit(grads)(*args)]


def check(out, gs, ref):
    ref_out, ref_grads = ref
    np.testing.assert_array_equal(np.asarray(out), ref_out, err_msg="out")
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), gs, ref_grads):
        g = np.asarray(g, np.float32)
        r = np.asarray(r, np.float32)
        assert g.shape == r.shape, (name, g.shape, r.shape)
        assert np.isfinite(g).all(), name
        err = np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)
        assert err < 1e-2, (name, err)


def mesh_1d(name):
    n = 2  # the batch and head counts above divide by 2; more GPUs than that stay idle
    return jax.make_mesh((n,), (name,), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


@pytest.mark.parametrize("path", ["key_lists", "key_tiles"])
def test_jit_batch_sharded_with_replicated_bias(path):
    """Batch over 2 GPUs; the bias has batch 1 (replicated), so its gradient is a cross-device sum."""
    args = inputs(path, bias_batch=1)
    ref = single_gpu(args)
    mesh = mesh_1d("dp")
    specs = (P("dp"), P("dp"), P("dp"), P(), P("dp"))
    sharded = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(args, specs)]
    out = jax.jit(attend)(*sharded)
    assert len(out.sharding.device_set) == 2
    check(out, jax.jit(grads)(*sharded), ref)


@pytest.mark.parametrize("path", ["key_lists", "key_tiles"])
def test_jit_head_sharded(path):
    """Query heads and their KV group over 2 GPUs (H = 4, Hkv = 2: one KV head per device)."""
    args = inputs(path, bias_batch=B, seed=1)
    ref = single_gpu(args)
    mesh = mesh_1d("tp")
    head = P(None, None, "tp")
    specs = (head, head, head, P(None, "tp"), P(None, "tp") if path == "key_lists" else P())
    sharded = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(args, specs)]
    check(jax.jit(attend)(*sharded), jax.jit(grads)(*sharded), ref)


def test_shard_map_batch():
    args = inputs("key_lists", bias_batch=1, seed=2)
    ref = single_gpu(args)
    mesh = mesh_1d("dp")
    specs = (P("dp"), P("dp"), P("dp"), P(), P("dp"))
    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # pragma: no cover - older jax
        from jax.experimental.shard_map import shard_map
    smap = functools.partial(shard_map, mesh=mesh, in_specs=specs)
    fwd = jax.jit(smap(attend, out_specs=P("dp")))
    # With the default check_vma, JAX sums the replicated bias's gradient over dp itself.
    bwd = jax.jit(smap(grads, out_specs=(P("dp"), P("dp"), P("dp"), P())))
    sharded = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(args, specs)]
    check(fwd(*sharded), bwd(*sharded), ref)


def test_pmap_batch():
    q, k, v, bias, mask = args = inputs("key_lists", bias_batch=1, seed=3)
    ref = single_gpu(args)

    def step(q, k, v, bias, mask):
        dq, dk, dv, db = grads(q, k, v, bias, mask)
        return attend(q, k, v, bias, mask), dq, dk, dv, jax.lax.psum(db, "i")

    def split(x):
        return x.reshape((2, x.shape[0] // 2) + x.shape[1:])

    out, dq, dk, dv, db = jax.pmap(step, axis_name="i", in_axes=(0, 0, 0, None, 0), devices=jax.devices()[:2])(
        split(q), split(k), split(v), bias, split(mask))
    check(out.reshape(ref[0].shape), [dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape), db[0]], ref)
