"""CPU kernel vs the pure-jnp reference: forward and forward+backward time and peak memory.

Case (issue 2): causal, B=1, H=8, Hkv=2, D=64, float32, per-key bias [1, Hkv, 1, L], L = 1024..4096.
Each (implementation, pass, L) runs in a fresh subprocess. Peak memory is the resident set size sampled every
millisecond by a background thread while the compiled function runs (it counts the kernels' own buffers too,
unlike XLA's memory analysis), minus the resident size once the inputs exist and the function is compiled. Time: median of --reps runs after one warm-up.

    python benchmarks/bench_cpu.py [--lengths 1024 2048 4096] [--reps 3] [--out benchmarks/results/cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

B, H, HKV, D = 1, 8, 2, 64


def _single(impl: str, pass_name: str, length: int, reps: int) -> dict:
    import threading
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jax_dmattn

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, length, H, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, length, HKV, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, length, HKV, D)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((1, HKV, 1, length)), jnp.float32)

    def fwd(q, k, v, bias):
        return jax_dmattn.attention(q, k, v, bias, is_causal=True, implementation=impl)

    fn = jax.jit(fwd if pass_name == "fwd" else
                 jax.grad(lambda *a: jnp.sum(fwd(*a) ** 2), argnums=(0, 1, 2, 3)))
    compiled = fn.lower(q, k, v, bias).compile()
    jax.block_until_ready((q, k, v, bias))
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base_rss = rss()
    peak = [base_rss]
    running = threading.Event()
    running.set()

    def sample():
        while running.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    jax.block_until_ready(compiled(q, k, v, bias))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, bias))
        times.append(time.perf_counter() - t0)
    running.clear()
    sampler.join()
    flops = 2 * B * H * length * length * D * (3.5 if pass_name == "fwd+bwd" else 1.0)  # causal: half of 4BHLLD
    ms = float(np.median(times)) * 1e3
    return {"impl": impl, "pass": pass_name, "L": length, "ms": ms, "gflops": flops / ms / 1e6,
            "peak_bytes": max(0, peak[0] - base_rss)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--impls", nargs="*", default=["cpu", "xla"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu.json"))
    parser.add_argument("--single", nargs=3, metavar=("IMPL", "PASS", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        impl, pass_name, length = args.single
        print(json.dumps(_single(impl, pass_name, int(length), args.reps)))
        return

    rows = []
    cpu = platform.processor() or platform.machine()
    print(f"causal B={B} H={H} Hkv={HKV} D={D} float32, per-key bias; {os.cpu_count()} cores")
    print(f"{'impl':>5s} {'pass':>8s} {'L':>6s} {'ms':>10s} {'GFLOP/s':>8s} {'peak MiB':>9s}")
    for length in args.lengths:
        for pass_name in ("fwd", "fwd+bwd"):
            for impl in args.impls:
                res = subprocess.run([sys.executable, __file__, "--single", impl, pass_name, str(length),
                                      "--reps", str(args.reps)], capture_output=True, text=True, check=True)
                row = json.loads(res.stdout.strip().splitlines()[-1])
                row.update(case="cpu_standard", device=cpu, cores=os.cpu_count())
                rows.append(row)
                print(f"{impl:>5s} {pass_name:>8s} {length:6d} {row['ms']:10.1f} {row['gflops']:8.2f} "
                      f"{row['peak_bytes'] / 2**20:9.1f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
