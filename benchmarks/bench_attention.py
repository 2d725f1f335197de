"""Forward and forward+backward timings of jax_dmattn against the cuDNN anchors, on the cases of common.py.

--lengths overrides every case's default lengths. Timing: jit, warm-up, then the median over repetitions of (wall
time of `inner` back-to-back calls, ended by block_until_ready) / inner (jax_dmattn._timing.timed).
--isolate runs every row in a fresh process, so that each row's device_peak_* are its own.

Rows {gpu, case, impl, pass, L, ms, tflops, peak_bytes, io_bytes, device_*, jax, commit, date} (plus "error" when
a run failed, e.g. OOM, or "skipped") are appended to benchmarks/results/<gpu>.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import common
from jax_dmattn import _timing

ROW_PREFIX = "#row "  # how an --isolate child hands its row to the parent


def measure_isolated(case, impl, pas, l, implementation):
    """common.measure_row in a fresh process (its device peak is its own); the child makes its own inputs."""
    cmd = [sys.executable, os.path.abspath(__file__), "--row", f"{case},{impl},{pas},{l}",
           "--implementation", implementation]
    res = subprocess.run(cmd, capture_output=True, text=True)
    for line in res.stdout.splitlines()[::-1]:
        if line.startswith(ROW_PREFIX):
            return json.loads(line[len(ROW_PREFIX):])
    tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [""]
    return dict(ms=None, tflops=None, peak_bytes=None, error=f"child exited {res.returncode}: {tail[0][:200]}")


def child_row(spec, implementation):
    case, impl, pas, l = spec.split(",")
    l = int(l)
    row = dict(gpu=_timing.device_name())
    try:
        inputs = common.make_inputs(case, l)
    except Exception as e:
        row.update(ms=None, tflops=None, peak_bytes=None, error=f"inputs: {type(e).__name__}: {str(e)[:200]}")
    else:
        row.update(common.measure_row(case, impl, pas, l, inputs, implementation))
    print(ROW_PREFIX + json.dumps(row), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__ + "\n" + common.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_arguments(ap, cases=common.GPU_CASES, impls=common.IMPLS, passes=("fwd", "fwd+bwd"))
    ap.add_argument("--isolate", action="store_true",
                    help="run every row in a fresh process, so that its device peak memory is its own")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)  # an --isolate child: CASE,IMPL,PASS,L
    args = ap.parse_args(argv)
    if args.row:
        return child_row(args.row, args.implementation)
    cases, impls, passes = common.parse_lists(ap, args)
    apart = (lambda *row: measure_isolated(*row, args.implementation)) if args.isolate else None
    rows = common.run(cases, impls, passes, args.lengths, args.implementation, measure_apart=apart)
    return common.write_rows(rows, args.out)


if __name__ == "__main__":
    main()
