"""Times the CUDA forward kernel directly (jax_dmattn._cuda_fwd, no API wrapper) on variants of the standard case
of common.py, to separate the cost of the mask path, the bias path and the core loop. One call per timing (warm-up,
then --reps calls), so that it runs under ncu as well:
  python3 benchmarks/profile_fwd.py --variants standard --reps 1
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import common
from jax_dmattn import _timing

VARIANTS = ("nomask_nobias", "nomask_bias", "allfull_mask", "standard", "standard_noskip", "block16")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--L", type=int, default=16384)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args(argv)
    from jax_dmattn import _cuda_fwd

    l = a.L
    c = common.CASES["standard"]
    q, k, v, bias, mask = common.make_inputs("standard", l)
    bs = common.make_inputs("block_sparse_1/16", l)[4]
    full = jnp.ones_like(mask)
    flops = common.flops("standard", "fwd", l)
    for name in a.variants.split(","):
        kw = dict(scale=c["d"] ** -0.5, softcap=0.0, is_causal=True)
        args = {
            "nomask_nobias": (q, k, v, None, None),
            "nomask_bias": (q, k, v, bias, None),
            "allfull_mask": (q, k, v, bias, full),
            "standard": (q, k, v, bias, mask),
            "standard_noskip": (q, k, v, bias, mask),
            "block16": (q, k, v, bias, bs),
        }[name]
        skip = name != "standard_noskip"
        fn = jax.jit(lambda q, k, v, b, m: _cuda_fwd.flash_fwd(q, k, v, b, m, skip_empty_tiles=skip, **kw))
        ms = _timing.timed(fn, args, reps=a.reps, max_inner=1)
        print(f"{name:18s} L={l} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s", flush=True)
        if args[4] is not None and name != "standard_noskip":
            prepass_report(_cuda_fwd, args[4], l, a.reps)


def prepass_report(_cuda_fwd, mask, l, reps):
    """The key-list pre-pass alone (its share of the forward) and what it produced: keys per 128-row unit and
    units past the capacity (walked densely)."""
    cap = _cuda_fwd.key_list_capacity(l)
    fn = jax.jit(lambda m: _cuda_fwd.build_key_lists(m, q_len=l, is_causal=True, capacity=cap))
    ms = _timing.timed(fn, (mask,), reps=reps, max_inner=1)
    keys = np.asarray(fn(mask)[0]).reshape(-1, 1 + cap)
    counts = keys[:, 0]
    live = counts[counts >= 0]
    print(f"{'':18s}   pre-pass {ms:8.3f} ms; units {len(counts)}, dense {int((counts < 0).sum())}, "
          f"keys per list unit mean {live.mean() if live.size else 0:.0f} max {live.max() if live.size else 0}",
          flush=True)


if __name__ == "__main__":
    main()
