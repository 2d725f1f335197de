"""CPU kernel vs the pure-jnp reference: forward and forward+backward time and peak memory.

Case cpu_standard of common.py: causal, B=1, H=8, Hkv=2, D=64, float32, per-key bias [1, Hkv, 1, L],
L = 1024..4096; fwd+bwd = jax.grad of sum(out) w.r.t. q, k, v and bias. --impls are jax_dmattn.attention's
implementations. Each (implementation, pass, L) runs in a fresh subprocess. Peak memory is the resident set size
sampled every millisecond by a background thread while the compiled function runs (it counts the kernels' own
buffers too, unlike XLA's memory analysis), minus the resident size once the inputs exist and the function is
compiled. Time: median of --reps runs after one warm-up (jax_dmattn._timing.timed, one call per run).
Rows are appended to --out.

    python benchmarks/bench_cpu.py [--lengths 1024 2048 4096] [--reps 3] [--out benchmarks/results/cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import common

CASE = "cpu_standard"


def _single(impl: str, pass_name: str, length: int, reps: int) -> dict:
    import threading
    import time

    from jax_dmattn import _timing

    inputs = common.make_inputs(CASE, length)
    fn, args = common.pass_fn("jax_dmattn", CASE, pass_name, inputs, implementation=impl)
    compiled = fn.lower(*args).compile()
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
    ms = _timing.timed(compiled, args, reps=reps, max_inner=1)
    running.clear()
    sampler.join()
    return {"impl": impl, "pass": pass_name, "L": length, "ms": ms,
            "gflops": common.flops(CASE, pass_name, length) / ms / 1e6, "peak_bytes": max(0, peak[0] - base_rss)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="*", default=list(common.CASES[CASE]["lengths"]))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--impls", nargs="*", default=["cpu", "xla"])
    parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "cpu.json"))
    parser.add_argument("--single", nargs=3, metavar=("IMPL", "PASS", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single:
        impl, pass_name, length = args.single
        print(json.dumps(_single(impl, pass_name, int(length), args.reps)))
        return

    rows = []
    cpu = platform.processor() or platform.machine()
    c = common.CASES[CASE]
    print(f"causal B={c['b']} H={c['h']} Hkv={c['hkv']} D={c['d']} float32, per-key bias; {os.cpu_count()} cores")
    print(f"{'impl':>5s} {'pass':>8s} {'L':>6s} {'ms':>10s} {'GFLOP/s':>8s} {'peak MiB':>9s}")
    for length in args.lengths:
        for pass_name in ("fwd", "fwd+bwd"):
            for impl in args.impls:
                res = subprocess.run([sys.executable, os.path.abspath(__file__), "--single", impl, pass_name,
                                      str(length), "--reps", str(args.reps)], capture_output=True, text=True,
                                     check=True)
                row = json.loads(res.stdout.strip().splitlines()[-1])
                row.update(case=CASE, device=cpu, cores=os.cpu_count())
                rows.append(row)
                print(f"{impl:>5s} {pass_name:>8s} {length:6d} {row['ms']:10.1f} {row['gflops']:8.2f} "
                      f"{row['peak_bytes'] / 2**20:9.1f}")
    return common.write_rows(rows, args.out)


if __name__ == "__main__":
    main()
