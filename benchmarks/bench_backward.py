"""Backward timings of jax_dmattn's CUDA kernels against the cuDNN anchors, on the cases of common.py.

Passes: "fwd+bwd" (jax.grad of sum(out) w.r.t. q, k, v, bias) and, for jax_dmattn and jax_dmattn_det, "bwd" (the
backward alone: attention's pullback given its residuals and dout). --lengths applies to every case.

--peak-lengths L,...: the peak memory of jax_dmattn's fwd+bwd on the standard case at each L from compilation
alone (nothing runs), against the bytes of inputs + output + gradients: one row each with peak_ratio.

Rows {gpu, case, impl, pass, L, ms, tflops, peak_bytes, io_bytes, device_*, jax, commit, date} are appended to
benchmarks/results/<gpu>.json (or --out).
"""
from __future__ import annotations

import argparse

import jax

import common
from jax_dmattn import _timing


def peak_ratio_row(case, l, implementation):
    """The compiled peak bytes of jax_dmattn's fwd+bwd against inputs + output + gradients (what any
    implementation holds while the backward runs)."""
    args = common.input_shapes(case, l)
    fn = common.grad_fn("jax_dmattn", case, implementation)
    out = jax.eval_shape(common.impl_fn("jax_dmattn", case, implementation), *args)
    peak = _timing.peak_bytes(fn, args)
    io = common.nbytes(args) + common.nbytes(out) + common.nbytes(jax.eval_shape(fn, *args))
    return dict(case=case, impl="jax_dmattn", **{"pass": "fwd+bwd"}, L=l, ms=None, tflops=None, peak_bytes=peak,
                io_bytes=io, peak_ratio=round(peak / io, 4))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__ + "\n" + common.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_arguments(ap, cases=("standard", "paper", "block_sparse_1/16"),
                         impls=("jax_dmattn", "jax_dmattn_det", "cudnn_bias", "cudnn_nobias"),
                         passes=("fwd+bwd", "bwd"), lengths="4096,16384")
    ap.add_argument("--peak-lengths", default="32768",
                    help="comma-separated L of the compile-only peak-memory rows (empty: none; default %(default)s)")
    args = ap.parse_args(argv)
    cases, impls, passes = common.parse_lists(ap, args)
    rows = common.run(cases, impls, passes, args.lengths, args.implementation)
    for l in (int(x) for x in args.peak_lengths.split(",") if x):
        try:
            row = peak_ratio_row("standard", l, args.implementation)
        except Exception as e:
            print(f"# peak L={l} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        print(f"# peak fwd+bwd standard L={l}: {row['peak_bytes'] / 2**30:.2f} GiB vs inputs+outputs+grads "
              f"{row['io_bytes'] / 2**30:.2f} GiB = {row['peak_ratio']:.3f}x", flush=True)
        rows.append(row)
    return common.write_rows(rows, args.out)


if __name__ == "__main__":
    main()
