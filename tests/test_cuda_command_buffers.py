"""The CUDA FFI handlers declare XLA's command-buffer trait (csrc/ffi/cuda_handler_common.h says what that
promises), so XLA may record them into CUDA graphs. Checked here end to end:

- with command buffers forced on for custom calls, the handlers run while XLA captures their stream into a
  command buffer (the extension counts host-side handler runs and those under capture:
  `_jax_dmattn_ext.cuda_handler_runs()`); with command buffers off, none does (the check can fail). XLA builds
  command buffers from its thunks, after the HLO passes, so the compiled HLO text does not show them;
- what runs inside the graphs equals what runs without them: bitwise for the forward and the deterministic
  backward, within bf16 rounding for the atomic backward;
- a second call with new inputs gives the new results (the recorded graph is updated, not replayed stale).

XLA reads XLA_FLAGS once per process, so each configuration runs in a child process. GPU only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import cuda_kernel_marks  # noqa: E402

TARGETS = ("dmattn_key_lists_cuda", "dmattn_fwd_cuda", "dmattn_bwd_cuda")
pytestmark = cuda_kernel_marks(*TARGETS)

FORCED = "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
OFF = "--xla_gpu_enable_command_buffer="

# One child: compile jit(value_and_grad) of attention for one configuration, note which jax_dmattn custom calls the
# optimized HLO holds, run it on two input seeds (twice each), and save every result and the handler run counts.
CHILD = textwrap.dedent("""
    import json, re, sys
    import numpy as np, jax, jax.numpy as jnp
    import jax_dmattn
    from jax_dmattn import _ffi

    out_dir, path, deterministic = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    B, L, H, HKV, D = 1, 384, 4, 2, 64

    def inputs(seed):
        rng = np.random.default_rng(seed)
        bf = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(jnp.bfloat16)
        q, k, v = bf((B, L, H, D)), bf((B, L, HKV, D)), bf((B, L, HKV, D))
        if path == "key_lists":  # per-key bias and a sparse mask: the key-list path
            bias = bf((B, HKV, 1, L))
            scores = rng.standard_normal((B, HKV, L, L))
            mask = jnp.asarray(scores >= np.partition(scores, -48, axis=-1)[..., -48:-47])
        else:  # a full bias: the key-tile backward with its in-kernel tile classes
            bias = bf((B, H, L, L))
            mask = jnp.asarray(rng.random((B, 1, L, L)) < 0.5)
        return q, k, v, bias, mask

    def loss(q, k, v, bias, mask):
        out = jax_dmattn.attention(q, k, v, bias=bias, mask=mask, is_causal=True, deterministic=deterministic,
                                   implementation="cuda")
        return (out.astype(jnp.float32) * jnp.cos(jnp.arange(D, dtype=jnp.float32))).sum(), out

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    text = step.lower(*inputs(0)).compile().as_text()
    targets = sorted(set(re.findall(r'custom_call_target="(dmattn_[a-z_]+)"', text)))
    ext = _ffi.extension()
    runs0, captured0 = ext.cuda_handler_runs()
    saved, steps = {}, 0
    for seed in (1, 2):
        for rep in range(2):  # the second run may replay what the first recorded
            (value, out), grads = step(*inputs(seed))
            steps += 1
        for name, x in zip(("value", "out", "dq", "dk", "dv", "dbias"), (value, out) + tuple(grads)):
            saved[f"{name}_{seed}"] = np.asarray(jnp.asarray(x, jnp.float32))
    runs1, captured1 = ext.cuda_handler_runs()
    json.dump(dict(targets=targets, steps=steps, runs=runs1 - runs0, captured=captured1 - captured0),
              open(out_dir + "/runs.json", "w"))
    np.savez(out_dir + "/results.npz", **saved)
""")


def run_child(tmp_path, xla_flags, path, deterministic):
    out_dir = tmp_path / ("forced" if xla_flags == FORCED else "off")
    out_dir.mkdir()
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip(),
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(out_dir), path, "1" if deterministic else "0"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = json.loads((out_dir / "runs.json").read_text())
    return runs, dict(np.load(out_dir / "results.npz"))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("path", ["key_lists", "key_tiles"])
def test_targets_run_inside_command_buffers(tmp_path, path, deterministic):
    on, got = run_child(tmp_path, FORCED, path, deterministic)
    off, want = run_child(tmp_path, OFF, path, deterministic)

    assert {"dmattn_fwd_cuda", "dmattn_bwd_cuda"} <= set(on["targets"]) and on["targets"] == off["targets"], (on, off)
    calls_per_step = len(on["targets"])
    # Without command buffers every step runs each handler once on the host, never under capture.
    assert off["runs"] == off["steps"] * calls_per_step and off["captured"] == 0, off
    # With them, XLA records the handlers by stream capture (it may also run the thunks directly, e.g. on a first
    # execution, and a replayed graph does not run them on the host at all).
    assert on["captured"] >= calls_per_step, f"the handlers were never recorded into a command buffer: {on}"

    for name, expect in want.items():
        actual = got[name]
        assert np.isfinite(actual).all(), name
        kind = name.split("_")[0]
        if kind == "out" or (deterministic and kind != "value"):
            # The forward has no atomics; the deterministic backward has no order dependence at all.
            np.testing.assert_array_equal(actual, expect, err_msg=name)
        else:  # XLA's own reduction (value) and fp32 atomics: the summation order may differ between runs
            err = np.linalg.norm(actual - expect) / max(np.linalg.norm(expect), 1e-30)
            assert err < (1e-6 if kind == "value" else 1e-2), (name, err)
    for name in ("out", "dk"):  # new inputs, new results: the graph was updated, not replayed stale
        assert not np.array_equal(got[f"{name}_1"], got[f"{name}_2"]), name
