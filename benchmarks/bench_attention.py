"""Forward (and, where it fits, forward+backward) timings of jax_dmattn against the cuDNN anchors.

Cases (SPEC.md section 6), all bf16, causal, per-key bias [B, Hkv, 1, L] (B=1 unless given):
  standard           H=16, Hkv=4, D=128, top-k 1024 mask (per query row, among the causally visible keys), as a
                     [B, Hkv, L, L] bool mask
  paper              H=2,  Hkv=1, D=64,  same mask rule
  block_sparse_1/4   standard shapes, mask of whole random 128x64 tiles kept with probability 1/4
  block_sparse_1/16  the same at 1/16
  dense_mask         standard shapes, an all-True mask (the dense-mask time the block-sparse cases compare to)
  topk_compact       standard shapes and mask rule, given as jax_dmattn.TopKMask(scores = the bias's values,
                     k=1024): no [L, L] array; L = 16K, 64K, 128K, 256K by default
  topk_compact_train the same mask at training shapes: B=8, H=32, Hkv=8, D=128, L = 32K
A case's default lengths are its "lengths" entry (1K, 4K, 16K, 32K when it has none); --lengths overrides them
for every case.
Impls: jax_dmattn (jax_dmattn.attention, implementation --implementation, default "cuda"), jax_dmattn_det (the
same with deterministic=True, fwd+bwd only), jax_dmattn_tiles (forward only, bool masks only: the CUDA forward
with the tile-class pre-pass instead of the live-key lists, called directly), cudnn_bias
(jax.nn.dot_product_attention, cuDNN, bias and mask folded into one additive [B, H, L, L] bias; a TopKMask is
expanded to its bool mask by jax_dmattn.topk_mask before timing, as the other cases' masks are built before
timing), cudnn_nobias (the flash ceiling: no bias, no mask, causal; any L), reference (jax_dmattn's pure-jnp
reference). A row that would not fit (the reference's [B, H, L, L] scores, cudnn_bias's folded bias) is recorded
with "skipped" and the reason.

Timing: jit, warm-up, then the median over repetitions of (wall time of `inner` back-to-back calls, ended by
block_until_ready) / inner. TFLOP/s use the spec's causal count: fwd 2*B*H*L*L*D, fwd+bwd 3.5x that (also for
sparse cases, so their TFLOP/s are "dense-equivalent").

Memory, per row:
  peak_bytes           XLA's compiled memory analysis (arguments + outputs + temporaries) of the timed function;
                       our kernels allocate nothing outside XLA, cuDNN's workspace is an XLA temporary.
  io_bytes             the timed function's arguments + outputs (fwd: q, k, v, bias, mask, out; fwd+bwd: the
                       gradients instead of out): what any implementation holds.
  device_peak_bytes    the device's peak_bytes_in_use after the row (jax Device.memory_stats(), None where the
                       backend has none). It is a high-water mark since the process started and cannot be reset:
  device_peak_increase device_peak_bytes - the bytes in use before the row (inputs made), when the row raised the
                       high-water mark; None when an earlier row (or making the inputs) had a higher peak.
  --isolate runs every row in a fresh process, so that each row's device_peak_* are its own.

Rows {gpu, case, impl, pass, L, ms, tflops, peak_bytes, io_bytes, device_*} (plus "error" when a run failed,
e.g. OOM, or "skipped") go to benchmarks/results/<gpu>.json (or --out).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

CASES = {
    "standard": dict(b=1, h=16, hkv=4, d=128, mask="topk"),
    "paper": dict(b=1, h=2, hkv=1, d=64, mask="topk"),
    "block_sparse_1/4": dict(b=1, h=16, hkv=4, d=128, mask="block", density=0.25),
    "block_sparse_1/16": dict(b=1, h=16, hkv=4, d=128, mask="block", density=1.0 / 16),
    "dense_mask": dict(b=1, h=16, hkv=4, d=128, mask="dense"),
    "topk_compact": dict(b=1, h=16, hkv=4, d=128, mask="topk_compact", lengths=(16384, 65536, 131072, 262144)),
    "topk_compact_train": dict(b=8, h=32, hkv=8, d=128, mask="topk_compact", lengths=(32768,)),
}
DEFAULT_LENGTHS = (1024, 4096, 16384, 32768)
IMPLS = ("jax_dmattn", "jax_dmattn_det", "jax_dmattn_tiles", "cudnn_bias", "cudnn_nobias", "reference")
WINDOW = 1024
COMMIT_ENV = "DMATTN_BENCH_COMMIT"
ROW_PREFIX = "#row "  # how an --isolate child hands its row to the parent


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
    b = c["b"]
    q = jax.random.normal(ks[0], (b, l, c["h"], c["d"]), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, l, c["hkv"], c["d"]), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, l, c["hkv"], c["d"]), jnp.float32).astype(jnp.bfloat16)
    bias = jax.random.normal(ks[3], (b, c["hkv"], 1, l), jnp.float32).astype(jnp.bfloat16)
    if c["mask"] == "topk":
        mask = jax.jit(topk_causal_mask, static_argnums=1)(bias, WINDOW)
    elif c["mask"] == "topk_compact":
        import jax_dmattn

        mask = jax_dmattn.TopKMask(bias[:, :, 0, :], WINDOW)
    elif c["mask"] == "dense":
        mask = jnp.ones((b, c["hkv"], l, l), jnp.bool_)
    else:
        mask = jax.jit(block_sparse_mask, static_argnums=(1, 2, 3, 4))(ks[4], b, c["hkv"], l, c["density"])
    jax.block_until_ready(mask)
    return q, k, v, bias, mask


def bool_mask(mask, l):
    """The bool [B, Hkv, L, L] mask for the impls that take no compact mask (a TopKMask is expanded)."""
    import jax_dmattn

    if not isinstance(mask, jax_dmattn.TopKMask):
        return mask
    expand = jax.jit(lambda s: jax_dmattn.topk_mask(s[:, :, None, :], mask.k, is_causal=True, query_len=l))
    return jax.block_until_ready(expand(mask.scores))


def impl_fn(impl, case, implementation="cuda"):
    c = CASES[case]
    g = c["h"] // c["hkv"]

    if impl in ("jax_dmattn", "jax_dmattn_det"):
        import jax_dmattn

        def f(q, k, v, bias, mask):
            return jax_dmattn.attention(q, k, v, bias=bias, mask=mask, is_causal=True,
                                        implementation=implementation, deterministic=impl == "jax_dmattn_det")
    elif impl == "jax_dmattn_tiles":
        from jax_dmattn import _cuda_fwd

        def f(q, k, v, bias, mask):
            return _cuda_fwd.flash_fwd(q, k, v, bias, mask, scale=c["d"] ** -0.5, softcap=0.0, is_causal=True,
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


def device_memory():
    """(bytes_in_use, peak_bytes_in_use) of device 0, or (None, None) where the backend keeps no stats."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # pragma: no cover
        stats = {}
    return stats.get("bytes_in_use"), stats.get("peak_bytes_in_use")


def nbytes(tree):
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def run_one(case, impl, pas, l, inputs, implementation="cuda"):
    c = CASES[case]
    f = impl_fn(impl, case, implementation)
    q, k, v, bias, mask = inputs
    if impl == "cudnn_bias":
        mask = bool_mask(mask, l)
    args = (q, k, v, bias, mask)
    if pas == "fwd":
        fn = jax.jit(f)
    else:
        def loss(q, k, v, bias, mask):
            return jnp.sum(f(q, k, v, bias, mask).astype(jnp.float32))

        diff = (0, 1, 2) if impl == "cudnn_nobias" else (0, 1, 2, 3)
        fn = jax.jit(jax.grad(loss, argnums=diff))
    in_use0, peak0 = device_memory()
    ms = timed(fn, args)
    _, peak1 = device_memory()
    flops = 2.0 * c["b"] * c["h"] * l * l * c["d"] * (3.5 if pas == "fwd+bwd" else 1.0)
    raised = peak1 is not None and peak0 is not None and peak1 > peak0
    return dict(ms=round(ms, 4), tflops=round(flops / (ms * 1e-3) / 1e12, 2), peak_bytes=peak_bytes(fn, args),
                io_bytes=nbytes(args) + nbytes(jax.eval_shape(fn, *args)), device_peak_bytes=peak1,
                device_peak_increase=peak1 - in_use0 if raised else None)


def write_rows(rows, out_path):
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as fh:
        json.dump(rows, fh, indent=1)
    print(f"# wrote {len(rows)} rows to {out_path}", flush=True)


def not_applicable(case, impl, pas):
    """Rows that do not exist (left out silently)."""
    if impl == "jax_dmattn_tiles" and (pas != "fwd" or CASES[case]["mask"] == "topk_compact"):
        return True  # forward only, and the tile pre-pass reads a bool mask
    return impl == "jax_dmattn_det" and pas == "fwd"  # the forward has no nondeterminism


def should_skip(case, impl, pas, l):
    """Why a row would not fit in memory (recorded), or None."""
    c = CASES[case]
    dense_scores = c["b"] * c["h"] * l * l * 4  # one f32 [B, H, L, L] buffer
    if impl == "reference" and dense_scores * (3 if pas == "fwd" else 6) > 60e9:
        return "would not fit (dense [B, H, L, L] scores)"
    if impl == "cudnn_bias" and c["b"] * c["h"] * l * l * 2 * (1 if pas == "fwd" else 3) > 40e9:
        return "folded [B, H, L, L] bias would not fit"
    return None


def case_lengths(case, lengths_arg):
    if lengths_arg:
        return [int(x) for x in lengths_arg.split(",")]
    return list(CASES[case].get("lengths", DEFAULT_LENGTHS))


def measure_row(case, impl, pas, l, inputs, implementation):
    """One row's measurements, or an "error" entry (e.g. OOM) instead of raising."""
    try:
        return run_one(case, impl, pas, l, inputs, implementation)
    except Exception as e:
        if os.environ.get("BENCH_TRACE"):
            traceback.print_exc()
        return dict(ms=None, tflops=None, peak_bytes=None, error=f"{type(e).__name__}: {str(e)[:200]}")


def measure_isolated(case, impl, pas, l, implementation):
    """measure_row in a fresh process (its device peak is its own); the child makes its own inputs."""
    cmd = [sys.executable, os.path.abspath(__file__), "--row", f"{case},{impl},{pas},{l}",
           "--implementation", implementation]
    res = subprocess.run(cmd, capture_output=True, text=True)
    for line in res.stdout.splitlines()[::-1]:
        if line.startswith(ROW_PREFIX):
            return json.loads(line[len(ROW_PREFIX):])
    tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [""]
    return dict(ms=None, tflops=None, peak_bytes=None, error=f"child exited {res.returncode}: {tail[0][:200]}")


def run_provenance():
    """jax version, the commit the run measured ($DMATTN_BENCH_COMMIT, else git describe of this checkout, "+dirty"
    with local changes; None outside a checkout) and the UTC date, for every row of the run. A copy of the tree
    whose git metadata is not its own (a remote GPU machine's) must name the commit in the environment variable."""
    import datetime
    import subprocess

    commit = os.environ.get(COMMIT_ENV)
    try:
        commit = commit or subprocess.run(
            ["git", "describe", "--always", "--dirty=+dirty"], capture_output=True, text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return dict(jax=jax.__version__, commit=commit,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))


def child_row(spec, implementation):
    case, impl, pas, l = spec.split(",")
    l = int(l)
    row = dict(gpu=gpu_name())
    try:
        inputs = make_inputs(case, l)
    except Exception as e:
        row.update(ms=None, tflops=None, peak_bytes=None, error=f"inputs: {type(e).__name__}: {str(e)[:200]}")
    else:
        row.update(measure_row(case, impl, pas, l, inputs, implementation))
    print(ROW_PREFIX + json.dumps(row), flush=True)


def print_row(row):
    gib = lambda key: "" if row.get(key) is None else f"{row[key] / 2**30:.2f}"
    ms = "ERR" if row.get("ms") is None else f"{row['ms']:9.3f}"
    if "skipped" in row:
        ms = "skip"
    tf = "" if row.get("tflops") is None else f"{row['tflops']:8.1f}"
    note = row.get("error") or row.get("skipped") or ""
    print(f"{row['case']:18s} {row['impl']:16s} {row['pass']:8s} {row['L']:6d} {ms:>9s} {tf:>8s} "
          f"{gib('peak_bytes'):>9s} {gib('io_bytes'):>8s} {gib('device_peak_increase'):>8s}"
          + (f"  {note[:80]}" if note else ""), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--lengths", default=None,
                    help="comma-separated L for every case (default: each case's own lengths)")
    ap.add_argument("--passes", default="fwd,fwd+bwd")
    ap.add_argument("--implementation", default="cuda", choices=("cuda", "cpu", "xla"),
                    help="jax_dmattn's implementation for the jax_dmattn rows (cpu / xla: smoke runs)")
    ap.add_argument("--isolate", action="store_true",
                    help="run every row in a fresh process, so that its device peak memory is its own")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)  # an --isolate child: CASE,IMPL,PASS,L
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<gpu>.json)")
    args = ap.parse_args(argv)
    if args.row:
        return child_row(args.row, args.implementation)
    cases = args.cases.split(",")
    for case in cases:
        if case not in CASES:
            ap.error(f"unknown case {case!r}; cases: {', '.join(CASES)}")

    # An --isolate parent leaves the device alone: the children need all of its memory.
    gpu = None if args.isolate else gpu_name()
    rows = []
    print(f"# {gpu or 'device: see the rows'}  jax {jax.__version__}", flush=True)
    print(f"{'case':18s} {'impl':16s} {'pass':8s} {'L':>6s} {'ms':>9s} {'TFLOP/s':>8s} {'peak GiB':>9s} "
          f"{'io GiB':>8s} {'dev+ GiB':>8s}", flush=True)
    for case in cases:
        for l in case_lengths(case, args.lengths):
            inputs = None
            if not args.isolate:
                try:
                    inputs = make_inputs(case, l)
                except Exception as e:  # pragma: no cover
                    print(f"{case} L={l}: input generation failed: {e}", flush=True)
                    continue
            for pas in args.passes.split(","):
                for impl in args.impls.split(","):
                    if not_applicable(case, impl, pas):
                        continue
                    row = dict(gpu=gpu, case=case, impl=impl, **{"pass": pas}, L=l)
                    skip = should_skip(case, impl, pas, l)
                    if skip:
                        row.update(ms=None, tflops=None, peak_bytes=None, skipped=skip)
                    elif args.isolate:
                        row.update(measure_isolated(case, impl, pas, l, args.implementation))
                    else:
                        row.update(measure_row(case, impl, pas, l, inputs, args.implementation))
                    rows.append(row)
                    print_row(row)
                    gc.collect()
            del inputs
            gc.collect()
    gpu = gpu or next((r["gpu"] for r in rows if r.get("gpu")), "unknown")
    provenance = run_provenance()
    for r in rows:
        r["gpu"] = r.get("gpu") or gpu
        r.update(provenance)
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        re.sub(r"[^A-Za-z0-9_.-]+", "_", gpu) + ".json")
    write_rows(rows, out_path)
    return rows


if __name__ == "__main__":
    main()
