"""Forward+backward timings of the CUDA backward kernel (jax_dmattn._cuda_bwd) against the cuDNN anchors.

Our impls wrap the CUDA forward (jax_dmattn._cuda_fwd.flash_fwd) and the CUDA backward in a jax.custom_vjp, so the
numbers do not depend on how jax_dmattn._primitives dispatches:
  cuda            forward + backward kernels, dq by fp32 atomics (default)
  cuda_det        the same with deterministic=True (dq by a second, query-tile-parallel kernel)
  cudnn_bias      jax.nn.dot_product_attention(implementation="cudnn"), bias and mask folded into one bias
  cudnn_nobias    cuDNN without bias or mask (the flash ceiling)
Cases and inputs are those of bench_attention.py (SPEC.md section 6): bf16, causal, B=1, per-key bias
[B, Hkv, 1, L]. Passes: "fwd+bwd" (jax.grad of sum(out) w.r.t. q, k, v, bias) and, for our kernels, "bwd" (the
backward FFI call alone, given out / lse / dout). peak_bytes: XLA's compiled memory analysis. TFLOP/s use the
spec's causal count (fwd 2*B*H*L*L*D; fwd+bwd 3.5x; bwd alone 2.5x), dense-equivalent for sparse cases.

Rows {gpu, case, impl, pass, L, ms, tflops, peak_bytes} go to benchmarks/results/<gpu>_bwd.json (or --out).
--peak-only L computes the peak-memory ratio of fwd+bwd at length L from compilation alone (no run).
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import re
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention as ba  # noqa: E402  (inputs, masks, timing helpers, cuDNN anchors)

IMPLS = ("cuda", "cuda_det", "cudnn_bias", "cudnn_nobias")


def ours(deterministic):
    from jax_dmattn import _cuda_fwd, _cuda_bwd

    def fwd_call(q, k, v, bias, mask):
        d = q.shape[-1]
        return _cuda_fwd.flash_fwd(q, k, v, bias, mask, scale=d ** -0.5, softcap=0.0, is_causal=True)

    @jax.custom_vjp
    def attn(q, k, v, bias, mask):
        return fwd_call(q, k, v, bias, mask)

    def fwd(q, k, v, bias, mask):
        out, lse = fwd_call(q, k, v, bias, mask)
        return (out, lse), (q, k, v, bias, mask, out, lse)

    def bwd(res, cts):
        q, k, v, bias, mask, out, lse = res
        dout, dlse = cts
        dq, dk, dv, dbias = _cuda_bwd.flash_bwd(q, k, v, bias, mask, out, lse, dout, dlse,
                                                scale=q.shape[-1] ** -0.5, softcap=0.0, is_causal=True,
                                                deterministic=deterministic)
        return dq, dk, dv, dbias, None

    attn.defvjp(fwd, bwd)
    return lambda q, k, v, bias, mask: attn(q, k, v, bias, mask)[0]


def fwd_bwd_fn(impl, case):
    f = ours(impl == "cuda_det") if impl in ("cuda", "cuda_det") else ba.impl_fn(impl, case)

    def loss(q, k, v, bias, mask):
        return jnp.sum(f(q, k, v, bias, mask).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2) if impl == "cudnn_nobias" else (0, 1, 2, 3)))


def bwd_only_fn(impl):
    from jax_dmattn import _cuda_bwd

    def f(q, k, v, bias, mask, out, lse, dout, dlse):
        return _cuda_bwd.flash_bwd(q, k, v, bias, mask, out, lse, dout, dlse, scale=q.shape[-1] ** -0.5,
                                   softcap=0.0, is_causal=True, deterministic=impl == "cuda_det")

    return jax.jit(f)


def peak_ratio(case, l, impl="cuda"):
    """(peak bytes of fwd+bwd, bytes of inputs + outputs + gradients) from compilation alone."""
    c = ba.CASES[case]
    sds = jax.ShapeDtypeStruct
    args = (sds((1, l, c["h"], c["d"]), jnp.bfloat16), sds((1, l, c["hkv"], c["d"]), jnp.bfloat16),
            sds((1, l, c["hkv"], c["d"]), jnp.bfloat16), sds((1, c["hkv"], 1, l), jnp.bfloat16),
            sds((1, c["hkv"], l, l), jnp.bool_))
    fn = fwd_bwd_fn(impl, case)
    ma = fn.lower(*args).compile().memory_analysis()
    peak = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - getattr(
        ma, "alias_size_in_bytes", 0)
    nbytes = lambda s: s.size * jnp.dtype(s.dtype).itemsize
    io = sum(nbytes(a) for a in args) + nbytes(args[0])  # inputs + out
    io += sum(nbytes(a) for a in args[:4])  # gradients of q, k, v, bias
    return int(peak), int(io)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="standard,paper,block_sparse_1/16")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--passes", default="fwd+bwd,bwd")
    ap.add_argument("--peak-lengths", default="32768")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    gpu = ba.gpu_name()
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        re.sub(r"[^A-Za-z0-9_.-]+", "_", gpu) + "_bwd.json")
    rows = []
    print(f"# {gpu}  jax {jax.__version__}", flush=True)
    print(f"{'case':18s} {'impl':13s} {'pass':8s} {'L':>6s} {'ms':>9s} {'TFLOP/s':>8s} {'peak GiB':>9s}", flush=True)

    def emit(row):
        rows.append(row)
        gib = "" if row.get("peak_bytes") is None else f"{row['peak_bytes'] / 2**30:9.2f}"
        ms = "ERR" if row.get("ms") is None else f"{row['ms']:9.3f}"
        tf = "" if row.get("tflops") is None else f"{row['tflops']:8.1f}"
        print(f"{row['case']:18s} {row['impl']:13s} {row['pass']:8s} {row['L']:6d} {ms:>9s} {tf:>8s} {gib:>9s}"
              + (f"  {row['error'][:100]}" if "error" in row else ""), flush=True)

    for case in args.cases.split(","):
        c = ba.CASES[case]
        for l in (int(x) for x in args.lengths.split(",")):
            inputs = ba.make_inputs(case, l)
            fwd_flops = 2.0 * c["h"] * l * l * c["d"]
            for pas in args.passes.split(","):
                for impl in args.impls.split(","):
                    if pas == "bwd" and impl not in ("cuda", "cuda_det"):
                        continue
                    if impl == "cudnn_bias" and c["h"] * l * l * 2 * 3 > 40e9:
                        continue
                    if impl == "cudnn_bias" and case != "standard":
                        continue
                    row = dict(gpu=gpu, case=case, impl=impl, **{"pass": pas}, L=l)
                    try:
                        if pas == "fwd+bwd":
                            fn, fargs, mult = fwd_bwd_fn(impl, case), inputs, 3.5
                        else:
                            from jax_dmattn import _cuda_fwd

                            q, k, v, bias, mask = inputs
                            out, lse = jax.jit(functools.partial(_cuda_fwd.flash_fwd, scale=c["d"] ** -0.5, softcap=0.0,
                                                                 is_causal=True))(q, k, v, bias, mask)
                            dout = jax.random.normal(jax.random.PRNGKey(3), q.shape, jnp.float32).astype(q.dtype)
                            dlse = jnp.zeros(lse.shape, jnp.float32)
                            fn, fargs, mult = bwd_only_fn(impl), (q, k, v, bias, mask, out, lse, dout, dlse), 2.5
                        ms = ba.timed(fn, fargs)
                        row.update(ms=round(ms, 4), tflops=round(mult * fwd_flops / (ms * 1e-3) / 1e12, 2),
                                   peak_bytes=ba.peak_bytes(fn, fargs))
                    except Exception as e:
                        row.update(ms=None, tflops=None, peak_bytes=None, error=f"{type(e).__name__}: {str(e)[:300]}")
                    emit(row)
                    gc.collect()
            del inputs
            gc.collect()
    for l in (int(x) for x in args.peak_lengths.split(",") if x):
        try:
            peak, io = peak_ratio("standard", l)
            print(f"# peak fwd+bwd standard L={l}: {peak / 2**30:.2f} GiB vs inputs+outputs+grads "
                  f"{io / 2**30:.2f} GiB = {peak / io:.3f}x", flush=True)
            rows.append(dict(gpu=gpu, case="standard", impl="cuda", **{"pass": "fwd+bwd"}, L=l, ms=None, tflops=None,
                             peak_bytes=peak, io_bytes=io, peak_ratio=round(peak / io, 4)))
        except Exception as e:
            print(f"# peak L={l} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    ba.write_rows(rows, out_path)
    return rows


if __name__ == "__main__":
    main()
