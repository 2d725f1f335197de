"""Forward (and, where it fits, forward+backward) timings of jax_dmattn against the cuDNN anchors.

Cases (SPEC.md section 6), all bf16, causal, B=1, per-key bias [B, Hkv, 1, L]:
  standard           H=16, Hkv=4, D=128, top-k 1024 mask (per query row, among the causally visible keys)
  paper              H=2,  Hkv=1, D=64,  same mask rule
  block_sparse_1/4   standard shapes, mask of whole random 128x64 tiles kept with probability 1/4
  block_sparse_1/16  the same at 1/16
  dense_mask         standard shapes, an all-True mask (the dense-mask time the block-sparse cases compare to)
Impls: jax_dmattn (the CUDA kernels through jax_dmattn.attention), jax_dmattn_det (the same with
deterministic=True, fwd+bwd only), jax_dmattn_tiles (forward only: the CUDA
forward with the tile-class pre-pass instead of the live-key lists, called directly), cudnn_bias (jax.nn.dot_product_attention,
cuDNN, bias and mask folded into one additive [B, H, L, L] bias), cudnn_nobias (the flash ceiling: no bias,
no mask, causal), reference (jax_dmattn's pure-jnp reference).

Timing: jit, warm-up, then the median over repetitions of (wall time of `inner` back-to-back calls, ended by
block_until_ready) / inner. peak_bytes: XLA's compiled memory analysis (arguments + outputs + temporaries)
of the timed function; our kernels allocate nothing outside XLA, cuDNN's workspace is an XLA temporary.
TFLOP/s use the spec's causal count: fwd 2*B*H*L*L*D, fwd+bwd 3.5x that (also for block-sparse cases, so
their TFLOP/s are "dense-equivalent").

Rows {gpu, case, impl, pass, L, ms, tflops, peak_bytes} (plus "error" when a run failed, e.g. OOM) go to
benchmarks/results/<gpu>.json (or --out).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

CASES = {
    "standard": dict(h=16, hkv=4, d=128, mask="topk"),
    "paper": dict(h=2, hkv=1, d=64, mask="topk"),
    "block_sparse_1/4": dict(h=16, hkv=4, d=128, mask="block", density=0.25),
    "block_sparse_1/16": dict(h=16, hkv=4, d=128, mask="block", density=1.0 / 16),
    "dense_mask": dict(h=16, hkv=4, d=128, mask="dense"),
}
IMPLS = ("jax_dmattn", "jax_dmattn_det", "jax_dmattn_tiles", "cudnn_bias", "cudnn_nobias", "reference")
WINDOW = 1024


def gpu_name() -> str:
    d = jax.devices()[0]
    return getattr(d, "device_kind", str(d))


def topk_causal_mask(bias_pk, window):
    """bias_pk [B, Hkv, 1, L] -> bool [B, Hkv, L, L]: row i keeps the `window` keys of largest bias among
    j <= i (ties broken by lower key index). Built row block by row block (lax.map)."""
    b, hkv, _, l = bias_pk.shape
    score = bias_pk[:, :, 0, :].astype(jnp.float32)
    order = jnp.argsort(-score, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1).astype(jnp.int32)  # 0 = best
    j = jnp.arange(l, dtype=jnp.int32)
    kk = min(window, l) - 1

    def row(i):
        visible = j <= i
        r = jnp.where(visible, rank, jnp.int32(l + 1))
        kth = jax.lax.top_k(-r, kk + 1)[0][..., kk] * -1  # kk-th smallest visible rank
        return (r <= kth[..., None]) & visible

    rows = jax.lax.map(row, jnp.arange(l, dtype=jnp.int32), batch_size=128)  # [L, B, Hkv, L]
    return jnp.transpose(rows, (1, 2, 0, 3))


def block_sparse_mask(key, b, hkv, l, density, bm=128, bn=64):
    mt, nt = -(-l // bm), -(-l // bn)
    keep = jax.random.bernoulli(key, density, (b, hkv, mt, nt))
    # The diagonal tiles are always kept so that no causal row is empty.
    diag = (jnp.arange(nt)[None, :] * bn) // bm == jnp.arange(mt)[:, None]
    keep = keep | diag
    return jnp.repeat(jnp.repeat(keep, bm, axis=2), bn, axis=3)[:, :, :l, :l]


def make_inputs(case, l, seed=0):
    c = CASES[case]
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    b = 1
    q = jax.random.normal(ks[0], (b, l, c["h"], c["d"]), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, l, c["hkv"], c["d"]), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, l, c["hkv"], c["d"]), jnp.float32).astype(jnp.bfloat16)
    bias = jax.random.normal(ks[3], (b, c["hkv"], 1, l), jnp.float32).astype(jnp.bfloat16)
    if c["mask"] == "topk":
        mask = jax.jit(topk_causal_mask, static_argnums=1)(bias, WINDOW)
    elif c["mask"] == "dense":
        mask = jnp.ones((b, c["hkv"], l, l), jnp.bool_)
    else:
        mask = jax.jit(block_sparse_mask, static_argnums=(1, 2, 3, 4))(ks[4], b, c["hkv"], l, c["density"])
    jax.block_until_ready(mask)
    return q, k, v, bias, mask


def impl_fn(impl, case):
    c = CASES[case]
    g = c["h"] // c["hkv"]

    if impl in ("jax_dmattn", "jax_dmattn_det"):
        import jax_dmattn

        def f(q, k, v, bias, mask):
            return jax_dmattn.attention(q, k, v, bias=bias, mask=mask, is_causal=True, implementation="cuda",
                                        deterministic=impl == "jax_dmattn_det")
    elif impl == "jax_dmattn_tiles":
        from jax_dmattn import _cuda

        def f(q, k, v, bias, mask):
            return _cuda.flash_fwd(q, k, v, bias, mask, scale=c["d"] ** -0.5, softcap=0.0, is_causal=True,
                                   key_lists=False)[0]
    elif impl == "reference":
        import jax_dmattn

        def f(q, k, v, bias, mask):
            return jax_dmattn.attention_reference(q, k, v, bias=bias, mask=mask, is_causal=True)
    elif impl == "cudnn_bias":
        def f(q, k, v, bias, mask):
            folded = jnp.where(mask, bias, jnp.asarray(-1e9, bias.dtype))  # [B, Hkv, L, L]
            folded = jnp.repeat(folded, g, axis=1)  # cuDNN wants the query-head count
            return jax.nn.dot_product_attention(q, k, v, bias=folded, is_causal=True, implementation="cudnn")
    elif impl == "cudnn_nobias":
        def f(q, k, v, bias, mask):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    else:
        raise ValueError(impl)
    return f


def timed(fn, args, *, target_ms=20.0, reps=10, max_inner=50):
    out = fn(*args)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = (time.perf_counter() - t0) * 1e3
    inner = int(max(1, min(max_inner, target_ms // max(one, 1e-3))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(times)


def peak_bytes(jitted, args):
    try:
        ma = jitted.lower(*args).compile().memory_analysis()
        return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
                   - getattr(ma, "alias_size_in_bytes", 0))
    except Exception:  # pragma: no cover
        return None


def run_one(case, impl, pas, l, inputs):
    c = CASES[case]
    f = impl_fn(impl, case)
    q, k, v, bias, mask = inputs
    if pas == "fwd":
        fn = jax.jit(f)
        args = (q, k, v, bias, mask)
    else:
        def loss(q, k, v, bias, mask):
            return jnp.sum(f(q, k, v, bias, mask).astype(jnp.float32))

        diff = (0, 1, 2) if impl == "cudnn_nobias" else (0, 1, 2, 3)
        fn = jax.jit(jax.grad(loss, argnums=diff))
        args = (q, k, v, bias, mask)
    ms = timed(fn, args)
    flops = 2.0 * 1 * c["h"] * l * l * c["d"] * (3.5 if pas == "fwd+bwd" else 1.0)
    return dict(ms=round(ms, 4), tflops=round(flops / (ms * 1e-3) / 1e12, 2), peak_bytes=peak_bytes(fn, args))


def write_rows(rows, out_path):
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as fh:
        json.dump(rows, fh, indent=1)
    print(f"# wrote {len(rows)} rows to {out_path}", flush=True)


def should_skip(case, impl, pas, l):
    c = CASES[case]
    dense_scores = c["h"] * l * l * 4  # one f32 [B, H, L, L] buffer
    if impl == "reference" and dense_scores * (3 if pas == "fwd" else 6) > 60e9:
        return "would not fit (dense [B, H, L, L] scores)"
    if impl == "cudnn_bias" and c["h"] * l * l * 2 * (1 if pas == "fwd" else 3) > 40e9:
        return "folded [B, H, L, L] bias would not fit"
    if impl == "jax_dmattn_tiles" and pas != "fwd":
        return "forward only"
    if impl == "jax_dmattn_det" and pas == "fwd":
        return "the forward has no nondeterminism"
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--lengths", default="1024,4096,16384,32768")
    ap.add_argument("--passes", default="fwd,fwd+bwd")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<gpu>.json)")
    args = ap.parse_args(argv)

    gpu = gpu_name()
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        re.sub(r"[^A-Za-z0-9_.-]+", "_", gpu) + ".json")
    rows = []
    print(f"# {gpu}  jax {jax.__version__}", flush=True)
    print(f"{'case':18s} {'impl':13s} {'pass':8s} {'L':>6s} {'ms':>9s} {'TFLOP/s':>8s} {'peak GiB':>9s}", flush=True)
    for case in args.cases.split(","):
        for l in (int(x) for x in args.lengths.split(",")):
            try:
                inputs = make_inputs(case, l)
            except Exception as e:  # pragma: no cover
                print(f"{case} L={l}: input generation failed: {e}", flush=True)
                continue
            for pas in args.passes.split(","):
                for impl in args.impls.split(","):
                    row = dict(gpu=gpu, case=case, impl=impl, **{"pass": pas}, L=l)
                    skip = should_skip(case, impl, pas, l)
                    if skip:
                        continue
                    try:
                        row.update(run_one(case, impl, pas, l, inputs))
                    except Exception as e:
                        row.update(ms=None, tflops=None, peak_bytes=None, error=f"{type(e).__name__}: {str(e)[:200]}")
                        if os.environ.get("BENCH_TRACE"):
                            traceback.print_exc()
                    rows.append(row)
                    gib = "" if row.get("peak_bytes") is None else f"{row['peak_bytes'] / 2**30:9.2f}"
                    ms = "ERR" if row.get("ms") is None else f"{row['ms']:9.3f}"
                    tf = "" if row.get("tflops") is None else f"{row['tflops']:8.1f}"
                    print(f"{case:18s} {impl:13s} {pas:8s} {l:6d} {ms:>9s} {tf:>8s} {gib:>9s}"
                          + (f"  {row['error'][:80]}" if "error" in row else ""), flush=True)
                    gc.collect()
            del inputs
            gc.collect()
    write_rows(rows, out_path)
    return rows


if __name__ == "__main__":
    main()
