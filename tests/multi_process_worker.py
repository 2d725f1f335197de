"""One process of tests/test_multi_process.py: ``python multi_process_worker.py PROCESS_ID NUM_PROCESSES PORT``.

Joins a jax.distributed CPU cluster on localhost (4 devices per process, gloo collectives), runs a training step
of jax_dmattn.attention sharded over the batch and heads of the global mesh, and context-parallel attention
(ring and all-gather) over a sequence split across every device of both processes; each is compared with the
same computation on this process's first device alone. Prints "OK <what>" per check; any mismatch raises.
"""
from __future__ import annotations

import functools
import os
import sys

LOCAL_DEVICES = 4


def main(process_id: int, num_processes: int, port: str) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=num_processes, process_id=process_id)
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_dmattn
    from jax_dmattn import context_parallel

    n = jax.device_count()
    assert n == LOCAL_DEVICES * num_processes, n
    rng = np.random.default_rng(0)  # the same inputs on every process
    b, seq, h, hkv, d = 4, 64, 8, 4, 16
    host = dict(q=rng.standard_normal((b, seq, h, d)), k=rng.standard_normal((b, seq, hkv, d)),
                v=rng.standard_normal((b, seq, hkv, d)), bias=rng.standard_normal((b, hkv, 1, seq)),
                ct=rng.standard_normal((b, seq, h, d)))
    host = {name: x.astype(np.float32) for name, x in host.items()}
    local = jax.local_devices()[0]

    def loss_of(attn):
        def loss(q, k, v, bias, ct):
            return jnp.sum(attn(q, k, v, bias) * ct)
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))

    def one_device(q, k, v, bias):
        return jax_dmattn.attention(q, k, v, bias, is_causal=True, implementation="cpu")

    with jax.default_device(local):
        want_loss, want_grads = jax.jit(loss_of(one_device))(*(jnp.asarray(host[x]) for x in
                                                               ("q", "k", "v", "bias", "ct")))
    want = [np.asarray(want_loss)] + [np.asarray(g) for g in want_grads]

    def global_array(x, mesh, spec):
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])

    def check(name, got):
        got = [np.asarray(multihost_utils.process_allgather(g, tiled=True)) for g in got]
        for what, g, w in zip(("loss", "dq", "dk", "dv", "dbias"), got, want):
            err = np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)
            assert err < 2e-5, f"{name} {what}: relative error {err:.2e}"
        print("OK", name, flush=True)

    # batch (dp) x heads (tp) sharding under jit: custom_partitioning runs each device's shard
    mesh = jax.make_mesh((2, n // 2), ("dp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    specs = dict(q=P("dp", None, "tp"), k=P("dp", None, "tp"), v=P("dp", None, "tp"), bias=P("dp", "tp"),
                 ct=P("dp", None, "tp"))
    args = [global_array(host[x], mesh, specs[x]) for x in ("q", "k", "v", "bias", "ct")]
    loss, grads = jax.jit(loss_of(one_device))(*args)
    check("jit batch x heads", [loss, *grads])

    # the sequence over every device of both processes
    mesh = jax.make_mesh((n,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,))
    seq_spec, key_spec = P(None, "sp"), P(None, None, None, "sp")
    specs = dict(q=seq_spec, k=seq_spec, v=seq_spec, bias=key_spec, ct=seq_spec)
    args = [global_array(host[x], mesh, specs[x]) for x in ("q", "k", "v", "bias", "ct")]
    for strategy in context_parallel.STRATEGIES:
        attend = functools.partial(context_parallel.attention, axis_name="sp", strategy=strategy, is_causal=True,
                                   implementation="cpu")
        sharded = jax.shard_map(attend, mesh=mesh, in_specs=(seq_spec, seq_spec, seq_spec, key_spec),
                                out_specs=seq_spec)
        loss, grads = jax.jit(loss_of(sharded))(*args)
        check(f"context parallel {strategy}", [loss, *grads])
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
