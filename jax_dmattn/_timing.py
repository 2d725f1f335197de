"""Timing, compiled peak memory and run provenance: the one implementation that the benchmarks (benchmarks/) and
``python -m jax_dmattn`` share, so that their numbers mean the same thing."""
from __future__ import annotations

import datetime
import os
import statistics
import subprocess
import time

import jax

COMMIT_ENV = "DMATTN_BENCH_COMMIT"


def timed(fn, args, *, reps=10, target_ms=20.0, max_inner=50):
    """Median milliseconds per call of ``fn(*args)`` over ``reps`` repetitions, after one warm-up call.

    A repetition is ``inner`` back-to-back calls ended by one block_until_ready, divided by ``inner``: calls much
    shorter than ``target_ms`` are batched (up to ``max_inner``) so that host dispatch and the final sync do not
    dominate them. ``max_inner=1`` times one call per repetition (what a profiler attached to the run expects:
    warm-up + ``reps`` calls, nothing else)."""
    jax.block_until_ready(fn(*args))
    inner = 1
    if max_inner > 1:
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
    """XLA's compiled memory analysis of ``jitted(*args)``: arguments + outputs + temporaries - aliased bytes (None
    where the backend gives no analysis). ``args`` may be jax.ShapeDtypeStructs: nothing runs."""
    try:
        ma = jitted.lower(*args).compile().memory_analysis()
        return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
                   - getattr(ma, "alias_size_in_bytes", 0))
    except Exception:  # pragma: no cover
        return None


def device_name() -> str:
    """The default device's kind ("NVIDIA H100 80GB HBM3", "cpu"). Initialises the backend."""
    d = jax.devices()[0]
    return getattr(d, "device_kind", str(d))


def run_provenance(gpu=None, checkout=None):
    """What every result row of a run carries: the device (``gpu``; None: ``device_name()``), the jax version, the
    commit the run measured and the UTC date.

    The commit is $DMATTN_BENCH_COMMIT, else ``git describe`` of ``checkout`` (default: this package's directory),
    "+dirty" with local changes, None outside a checkout. A copy of the tree whose git metadata is not its own (a
    remote GPU machine's) must name the commit in the environment variable. A caller that must leave the device
    alone (a parent whose child processes need all its memory) passes ``gpu``."""
    commit = os.environ.get(COMMIT_ENV)
    try:
        commit = commit or subprocess.run(
            ["git", "describe", "--always", "--dirty=+dirty"], capture_output=True, text=True,
            cwd=checkout or os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return dict(gpu=gpu or device_name(), jax=jax.__version__, commit=commit,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
