"""The benchmark toolkit behind bench_attention.py, bench_backward.py, profile_fwd.py and bench_cpu.py: cases and
their inputs, the implementations and passes timed, the row loop and the results writer. Timing, compiled peak
memory and run provenance come from jax_dmattn._timing (shared with ``python -m jax_dmattn``).

Cases (README.md, section Performance), bf16, causal, per-key bias [B, Hkv, 1, L] (B=1 unless given):
  standard           H=16, Hkv=4, D=128, top-k 1024 mask (per query row, among the causally visible keys:
                     jax_dmattn.topk_mask of the bias), as a [B, Hkv, L, L] bool mask
  paper              H=2,  Hkv=1, D=64,  same mask rule
  block_sparse_1/4   standard shapes, mask of whole random 128x64 tiles kept with probability 1/4
  block_sparse_1/16  the same at 1/16
  dense_mask         standard shapes, an all-True mask (the dense-mask time the block-sparse cases compare to)
  topk_compact       standard shapes and mask rule, given as jax_dmattn.TopKMask(scores = the bias's values,
                     k=1024): no [L, L] array; L = 16K, 64K, 128K, 256K by default
  topk_compact_train the same mask at training shapes: B=8, H=32, Hkv=8, D=128, L = 32K
  plain              standard shapes, no bias and no mask (plain causal attention)
  plain_noncausal    plain without causality (every row sees every key); L = 4K, 16K
  bias_only          standard shapes, the per-key bias and no mask
  full_bias          standard shapes, a bias [B, Hkv, L, L] and no mask (dbias of that shape in fwd+bwd)
  rowwise_topk       standard shapes, a bias [B, Hkv, L, L] and the top-1024 mask of each row of it (the rows keep
                     different keys: the mask the key lists cannot shrink); L = 4K, 16K
  plain_d256         plain at D = 256; L = 4K, 16K
  cpu_standard       bench_cpu.py's case: H=8, Hkv=2, D=64, float32, no mask; L = 1K, 2K, 4K
  decode             one decoding step: B=8, H=32, Hkv=8, D=128, one query row against L = 8K, 64K, 512K keys,
                     not causal (one row sees every key), no bias, no mask; forward only
  decode_topk        the same with a per-key bias and a top-2048 mask (jax_dmattn.topk_mask of the bias) as a
                     bool [B, Hkv, 1, L] mask
  decode_topk_compact the same mask as jax_dmattn.TopKMask(scores = the bias's values, k=2048)
  decode_topk_compact_1m the same at B=1 against L = 1M keys
  decode_ragged      decode with ragged lengths: element b's cache holds (b + 1) / B of the L slots
  decode_topk_compact_ragged decode_topk_compact over the ragged lengths of decode_ragged
  packed_docs        8 documents of L / 8 tokens packed by segment ids, no bias, no mask; L = 16K
  sliding_window     a causal window of 4096 keys (local_window_size), no bias, no mask; L = 64K
  packed_docs_topk   packed_docs with the per-key bias and TopKMask(k=1024) chosen within each document
A case's default lengths are its "lengths" entry (1K, 4K, 16K, 32K when it has none). L is the key length; the
query length is L too, except for the decode cases (one row).

Impls: jax_dmattn (jax_dmattn.attention, implementation as given, default "cuda"), jax_dmattn_det (the same with
deterministic=True; not the forward), jax_dmattn_sm80 (the same with the sm80 kernels forced on every device:
JAX_DMATTN_CUDA_KERNELS=sm80 while the row runs, to compare with the Hopper kernels in one run), jax_dmattn_tiles
(forward only, bool masks only: the CUDA forward with the tile-class pre-pass instead of the live-key lists, called
directly), cudnn_bias (jax.nn.dot_product_attention,
cuDNN, bias and mask folded into one additive [B, H, L, L] bias; a TopKMask is expanded to its bool mask by
jax_dmattn.topk_mask before timing, as the other cases' masks are built before timing), cudnn_nobias (the flash
ceiling: no bias, no mask, causal; any L), reference (jax_dmattn's pure-jnp reference). A row that would not fit
(the reference's [B, H, L, L] scores, cudnn_bias's folded bias) is recorded with "skipped" and the reason.

Passes: fwd; fwd+bwd (jax.grad of sum(out) w.r.t. q, k, v and bias); bwd (jax_dmattn and jax_dmattn_det only: the
backward alone, jax.vjp's pullback of attention given its residuals and a random dout). TFLOP/s use the dense
causal count: fwd 2*B*H*L*L*D, fwd+bwd 3.5x that, bwd 2.5x (also for sparse cases: "dense-equivalent"); the decode
cases count 4*B*H*L*D. The decode rows also carry read_gbps: the bytes a decoding step must read (K and V of every
kept key; with a top-k mask only the k kept keys of each (batch, kv head) and their bias entries) over the time, in
GB/s, to compare with the card's copy bandwidth.

Memory, per row:
  peak_bytes           XLA's compiled memory analysis (arguments + outputs + temporaries) of the timed function;
                       our kernels allocate nothing outside XLA, cuDNN's workspace is an XLA temporary.
  io_bytes             the timed function's arguments + outputs (fwd: q, k, v, bias, mask, out; fwd+bwd: the
                       gradients instead of out; bwd: the residuals, dout and the gradients): what any
                       implementation holds.
  device_peak_bytes    the device's peak_bytes_in_use after the row (jax Device.memory_stats(), None where the
                       backend has none). It is a high-water mark since the process started and cannot be reset:
  device_peak_increase device_peak_bytes - the bytes in use before the row (inputs made), when the row raised the
                       high-water mark; None when an earlier row (or making the inputs) had a higher peak.

Results: one JSON list per device, benchmarks/results/<device>.json; a run appends its rows, each carrying gpu
(the device kind), jax, commit and date.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import traceback

import jax
import jax.numpy as jnp

import jax_dmattn
from jax_dmattn import _timing

CASES = {
    "standard": dict(b=1, h=16, hkv=4, d=128, mask="topk"),
    "paper": dict(b=1, h=2, hkv=1, d=64, mask="topk"),
    "block_sparse_1/4": dict(b=1, h=16, hkv=4, d=128, mask="block", density=0.25),
    "block_sparse_1/16": dict(b=1, h=16, hkv=4, d=128, mask="block", density=1.0 / 16),
    "dense_mask": dict(b=1, h=16, hkv=4, d=128, mask="dense"),
    "topk_compact": dict(b=1, h=16, hkv=4, d=128, mask="topk_compact", lengths=(16384, 65536, 131072, 262144)),
    "topk_compact_train": dict(b=8, h=32, hkv=8, d=128, mask="topk_compact", lengths=(32768,)),
    "plain": dict(b=1, h=16, hkv=4, d=128, mask=None, bias=None),
    "plain_noncausal": dict(b=1, h=16, hkv=4, d=128, mask=None, bias=None, causal=False, lengths=(4096, 16384)),
    "bias_only": dict(b=1, h=16, hkv=4, d=128, mask=None),
    "full_bias": dict(b=1, h=16, hkv=4, d=128, mask=None, bias="full", lengths=(1024, 4096, 16384)),
    "rowwise_topk": dict(b=1, h=16, hkv=4, d=128, mask="topk", bias="full", lengths=(4096, 16384)),
    "plain_d256": dict(b=1, h=16, hkv=4, d=256, mask=None, bias=None, lengths=(4096, 16384)),
    "cpu_standard": dict(b=1, h=8, hkv=2, d=64, mask=None, dtype=jnp.float32, lengths=(1024, 2048, 4096)),
    "decode": dict(b=8, h=32, hkv=8, d=128, mask=None, bias=None, q_len=1, causal=False,
                   lengths=(8192, 65536, 524288)),
    "decode_topk": dict(b=8, h=32, hkv=8, d=128, mask="topk", window=2048, q_len=1, causal=False,
                        lengths=(8192, 65536, 524288)),
    "decode_topk_compact": dict(b=8, h=32, hkv=8, d=128, mask="topk_compact", window=2048, q_len=1, causal=False,
                                lengths=(8192, 65536, 524288)),
    "decode_topk_compact_1m": dict(b=1, h=32, hkv=8, d=128, mask="topk_compact", window=2048, q_len=1,
                                   causal=False, lengths=(1048576,)),
    # A decoding step over a ragged batch: element b's cache holds (b + 1) / B of the L slots (key_value_seq_lengths).
    "decode_ragged": dict(b=8, h=32, hkv=8, d=128, mask=None, bias=None, q_len=1, causal=False, ragged=True,
                          lengths=(65536, 524288)),
    "decode_topk_compact_ragged": dict(b=8, h=32, hkv=8, d=128, mask="topk_compact", window=2048, q_len=1,
                                       causal=False, ragged=True, lengths=(65536,)),
    # Row bounds: 8 packed documents of equal length (segment ids), and a causal sliding window of 4096 keys.
    "packed_docs": dict(b=1, h=16, hkv=4, d=128, mask=None, bias=None, segments=8, lengths=(16384,)),
    "sliding_window": dict(b=1, h=16, hkv=4, d=128, mask=None, bias=None, local_window=(4096, 0),
                           lengths=(65536,)),
    # The dynamic mask over packed documents: each row's top 1024 among its own document's keys.
    "packed_docs_topk": dict(b=1, h=16, hkv=4, d=128, mask="topk_compact", segments=8, lengths=(16384,)),
}
# What bench_attention.py runs by default: the GPU cases (cpu_standard is bench_cpu.py's).
GPU_CASES = tuple(name for name in CASES if name != "cpu_standard")
DEFAULT_LENGTHS = (1024, 4096, 16384, 32768)
IMPLS = ("jax_dmattn", "jax_dmattn_det", "jax_dmattn_sm80", "jax_dmattn_tiles", "cudnn_bias", "cudnn_nobias",
         "reference")
PASSES = ("fwd", "fwd+bwd", "bwd")
PASS_FLOPS = {"fwd": 1.0, "fwd+bwd": 3.5, "bwd": 2.5}  # multiples of the causal forward count
WINDOW = 1024
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")


def block_sparse_mask(key, b, hkv, l, density, bm=128, bn=64):
    mt, nt = -(-l // bm), -(-l // bn)
    keep = jax.random.bernoulli(key, density, (b, hkv, mt, nt))
    # The diagonal tiles are always kept so that no causal row is empty.
    diag = (jnp.arange(nt)[None, :] * bn) // bm == jnp.arange(mt)[:, None]
    keep = keep | diag
    return jnp.repeat(jnp.repeat(keep, bm, axis=2), bn, axis=3)[:, :, :l, :l]


def q_len(case, l):
    """The query length of a case at key length l."""
    return CASES[case].get("q_len", l)


def is_causal(case):
    return CASES[case].get("causal", True)


def window(case):
    """k of a case's top-k mask."""
    return CASES[case].get("window", WINDOW)


def input_shapes(case, l):
    """(q, k, v, bias, mask) of a case as jax.ShapeDtypeStructs (the mask: a bool struct, a TopKMask of one, or
    None): what make_inputs builds, for compiling without inputs."""
    c = CASES[case]
    b, dtype, sds = c["b"], jnp.dtype(c.get("dtype", jnp.bfloat16)), jax.ShapeDtypeStruct
    lq = q_len(case, l)
    bias_kind = c.get("bias", "per_key")
    bias = None if bias_kind is None else sds((b, c["hkv"], lq if bias_kind == "full" else 1, l), dtype)
    if c["mask"] is None:
        mask = None
    elif c["mask"] == "topk_compact":
        mask = jax_dmattn.TopKMask(sds((b, c["hkv"], l), dtype), window(case))
    else:
        mask = sds((b, c["hkv"], lq, l), jnp.bool_)
    return (sds((b, lq, c["h"], c["d"]), dtype), sds((b, l, c["hkv"], c["d"]), dtype),
            sds((b, l, c["hkv"], c["d"]), dtype), bias, mask)


def make_inputs(case, l, seed=0):
    c = CASES[case]
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k, v, bias = (None if s is None else jax.random.normal(key, s.shape, jnp.float32).astype(s.dtype)
                     for key, s in zip(keys, input_shapes(case, l)[:4]))
    if c["mask"] is None:
        mask = None
    elif c["mask"] == "topk":
        mask = jax_dmattn.topk_mask(bias, window(case), is_causal=is_causal(case), query_len=q_len(case, l))
    elif c["mask"] == "topk_compact":
        mask = jax_dmattn.TopKMask(bias[:, :, 0, :], window(case))
    elif c["mask"] == "dense":
        mask = jnp.ones((c["b"], c["hkv"], l, l), jnp.bool_)
    else:
        mask = jax.jit(block_sparse_mask, static_argnums=(1, 2, 3, 4))(keys[4], c["b"], c["hkv"], l, c["density"])
    return jax.block_until_ready((q, k, v, bias, mask))


def bool_mask(mask, case, l):
    """The bool [B, Hkv, Lq, L] mask for the impls that take no compact mask (a TopKMask is expanded)."""
    if not isinstance(mask, jax_dmattn.TopKMask):
        return mask
    expand = jax.jit(lambda s: jax_dmattn.topk_mask(s[:, :, None, :], mask.k, is_causal=is_causal(case),
                                                    query_len=q_len(case, l)))
    return jax.block_until_ready(expand(mask.scores))


def sequence_kwargs(case, l):
    """attention()'s segment-id / window keywords of a case: "segments": n documents of l / n tokens packed in each
    row; "local_window": (left, right)."""
    c = CASES[case]
    kw = {}
    if "segments" in c:
        ids = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32) // -(-l // c["segments"]), (c["b"], l))
        kw.update(q_segment_ids=ids, kv_segment_ids=ids)
    if "local_window" in c:
        kw["local_window_size"] = c["local_window"]
    if c.get("ragged"):
        kw["key_value_seq_lengths"] = ragged_lengths(case, l)
    return kw


def ragged_lengths(case, l):
    """A ragged case's key lengths: element b holds (b + 1) / B of the l keys."""
    b = CASES[case]["b"]
    return jnp.asarray([l * (i + 1) // b for i in range(b)], jnp.int32)


def impl_fn(impl, case, implementation="cuda"):
    """The impl as f(q, k, v, bias, mask) -> out. cuDNN gets a case's window; it has no segment ids in
    jax.nn.dot_product_attention, so a packed case times its dense causal attention (what packing costs without them)."""
    c = CASES[case]
    g = c["h"] // c["hkv"]
    causal = is_causal(case)
    cudnn_kw = {"local_window_size": c["local_window"]} if "local_window" in c else {}

    if impl in ("jax_dmattn", "jax_dmattn_det") + tuple(FORCED_KERNELS):
        def f(q, k, v, bias, mask):
            return jax_dmattn.attention(q, k, v, bias=bias, mask=mask, is_causal=causal,
                                        implementation=implementation, deterministic=impl == "jax_dmattn_det",
                                        **sequence_kwargs(case, k.shape[1]))
    elif impl == "jax_dmattn_tiles":
        from jax_dmattn import _cuda_fwd

        def f(q, k, v, bias, mask):
            return _cuda_fwd.flash_fwd(q, k, v, bias, mask, scale=c["d"] ** -0.5, softcap=0.0, is_causal=causal,
                                       key_lists=False)[0]
    elif impl == "reference":
        def f(q, k, v, bias, mask):
            return jax_dmattn.attention_reference(q, k, v, bias=bias, mask=mask, is_causal=causal)
    elif impl == "cudnn_bias":
        def f(q, k, v, bias, mask):
            folded = bias if mask is None else jnp.where(mask, bias, jnp.asarray(-1e9, bias.dtype))
            # cuDNN wants the query-head count and a full [Lq, Lk] bias (it refuses a per-key bias [B, H, 1, L]).
            folded = jnp.broadcast_to(folded, folded.shape[:2] + (q.shape[1], k.shape[1]))
            folded = jnp.repeat(folded, g, axis=1)
            return jax.nn.dot_product_attention(q, k, v, bias=folded, is_causal=causal, implementation="cudnn",
                                                **cudnn_kw)
    elif impl == "cudnn_nobias":
        def f(q, k, v, bias, mask):
            lengths = {"key_value_seq_lengths": ragged_lengths(case, k.shape[1])} if c.get("ragged") else {}
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn", **cudnn_kw,
                                                **lengths)
    else:
        raise ValueError(impl)
    return f


def grad_fn(impl, case, implementation="cuda"):
    """jit of the fwd+bwd pass: the gradients of sum(out) w.r.t. q, k, v and bias (cudnn_nobias takes no bias)."""
    f = impl_fn(impl, case, implementation)

    def loss(q, k, v, bias, mask):
        return jnp.sum(f(q, k, v, bias, mask).astype(jnp.float32))

    no_bias = impl == "cudnn_nobias" or CASES[case].get("bias", "per_key") is None
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2) if no_bias else (0, 1, 2, 3)))


def pass_fn(impl, case, pas, inputs, implementation="cuda"):
    """(jitted function, its arguments) that one row times."""
    f = impl_fn(impl, case, implementation)
    if pas == "fwd":
        return jax.jit(f), inputs
    if pas == "fwd+bwd":
        return grad_fn(impl, case, implementation), inputs
    if pas != "bwd":
        raise ValueError(pas)
    q, k, v, bias, mask = inputs
    # The pullback holds attention's residuals (q, k, v, bias, mask, out, lse) as jit arguments, so the timed
    # function is the backward call alone, made by the library's own custom_vjp.
    out, pullback = jax.vjp(lambda q, k, v, bias: f(q, k, v, bias, mask), q, k, v, bias)
    dout = jax.random.normal(jax.random.PRNGKey(3), out.shape, jnp.float32).astype(out.dtype)
    return jax.jit(lambda pullback, dout: pullback(dout)), jax.block_until_ready((pullback, dout))


def mean_keys(case, l):
    """The mean number of keys a query row sees (before any mask): all, half under causality, a causal window's
    left + 1 less its ramp at the start, half a packed document's length."""
    c = CASES[case]
    if "segments" in c:
        return l / c["segments"] / 2
    if "local_window" in c:
        w = c["local_window"][0] + 1
        return w - w * w / (2.0 * l)
    return l / 2 if is_causal(case) else l


def flops(case, pas, l):
    """The matmul flops of the attention a case asks for (the mask's sparsity not counted)."""
    c = CASES[case]
    return 4.0 * c["b"] * c["h"] * q_len(case, l) * mean_keys(case, l) * c["d"] * PASS_FLOPS[pas]


def read_bytes(case, l):
    """The bytes a decode case's forward must read: K and V of the keys it keeps (all, or the top-k of each
    (batch, kv head)) and their bias entries; None for the other cases."""
    c = CASES[case]
    if "q_len" not in c:
        return None
    item = jnp.dtype(c.get("dtype", jnp.bfloat16)).itemsize
    lens = [l * (i + 1) // c["b"] for i in range(c["b"])] if c.get("ragged") else [l]
    keys = sum(x if c["mask"] is None else min(window(case), x) for x in lens) / len(lens)
    per_key = 2 * c["d"] * item + (0 if c.get("bias", "per_key") is None else item)
    return c["b"] * c["hkv"] * keys * per_key


def device_memory():
    """(bytes_in_use, peak_bytes_in_use) of device 0, or (None, None) where the backend keeps no stats."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # pragma: no cover
        stats = {}
    return stats.get("bytes_in_use"), stats.get("peak_bytes_in_use")


def nbytes(tree):
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


# The rows that force a set of kernels through JAX_DMATTN_CUDA_KERNELS (the handlers read it at every run).
FORCED_KERNELS = {"jax_dmattn_sm80": "sm80"}


@contextlib.contextmanager
def kernels_forced(impl):
    """JAX_DMATTN_CUDA_KERNELS set as FORCED_KERNELS says for the row's impl, for the duration of the row."""
    if impl not in FORCED_KERNELS:
        yield
        return
    old = os.environ.get("JAX_DMATTN_CUDA_KERNELS")
    os.environ["JAX_DMATTN_CUDA_KERNELS"] = FORCED_KERNELS[impl]
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("JAX_DMATTN_CUDA_KERNELS")
        else:
            os.environ["JAX_DMATTN_CUDA_KERNELS"] = old


def run_one(case, impl, pas, l, inputs, implementation="cuda"):
    if impl == "cudnn_bias":
        q, k, v, bias, mask = inputs
        inputs = (q, k, v, bias, bool_mask(mask, case, l))
    fn, args = pass_fn(impl, case, pas, inputs, implementation)
    in_use0, peak0 = device_memory()
    with kernels_forced(impl):
        ms = _timing.timed(fn, args)
    _, peak1 = device_memory()
    raised = peak1 is not None and peak0 is not None and peak1 > peak0
    read = read_bytes(case, l)
    extra = {} if read is None else dict(read_gbps=round(read / (ms * 1e-3) / 1e9, 1))
    return dict(ms=round(ms, 4), tflops=round(flops(case, pas, l) / (ms * 1e-3) / 1e12, 2), **extra,
                peak_bytes=_timing.peak_bytes(fn, args), io_bytes=nbytes(args) + nbytes(jax.eval_shape(fn, *args)),
                device_peak_bytes=peak1, device_peak_increase=peak1 - in_use0 if raised else None)


def not_applicable(case, impl, pas):
    """Rows that do not exist (left out silently)."""
    if impl == "jax_dmattn_tiles" and (pas != "fwd" or CASES[case]["mask"] in ("topk_compact", None)):
        return True  # forward only, and the tile pre-pass reads a bool mask
    if impl == "cudnn_bias" and CASES[case].get("bias", "per_key") is None:
        return True  # nothing to fold: cudnn_nobias is the row
    if "q_len" in CASES[case] and pas != "fwd":
        return True  # a decoding step is a forward
    if pas == "bwd" and impl in FORCED_KERNELS:
        return True  # the backward has one set of kernels
    if pas == "bwd" and impl not in ("jax_dmattn", "jax_dmattn_det"):
        return True  # the backward alone is timed for our kernels only
    return impl == "jax_dmattn_det" and pas == "fwd"  # the forward has no nondeterminism


def should_skip(case, impl, pas, l):
    """Why a row would not fit in memory (recorded), or None."""
    c = CASES[case]
    lq = q_len(case, l)
    dense_scores = c["b"] * c["h"] * lq * l * 4  # one f32 [B, H, Lq, L] buffer
    if impl == "reference" and dense_scores * (3 if pas == "fwd" else 6) > 60e9:
        return "would not fit (dense [B, H, L, L] scores)"
    if impl == "cudnn_bias" and c["b"] * c["h"] * lq * l * 2 * (1 if pas == "fwd" else 3) > 40e9:
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


def print_header(gpu):
    print(f"# {gpu or 'device: see the rows'}  jax {jax.__version__}", flush=True)
    print(f"{'case':18s} {'impl':16s} {'pass':8s} {'L':>6s} {'ms':>9s} {'TFLOP/s':>8s} {'peak GiB':>9s} "
          f"{'io GiB':>8s} {'dev+ GiB':>8s}", flush=True)


def print_row(row):
    gib = lambda key: "" if row.get(key) is None else f"{row[key] / 2**30:.2f}"
    ms = "ERR" if row.get("ms") is None else f"{row['ms']:9.3f}"
    if "skipped" in row:
        ms = "skip"
    tf = "" if row.get("tflops") is None else f"{row['tflops']:8.1f}"
    note = row.get("error") or row.get("skipped") or ""
    print(f"{row['case']:18s} {row['impl']:16s} {row['pass']:8s} {row['L']:6d} {ms:>9s} {tf:>8s} "
          f"{gib('peak_bytes'):>9s} {gib('io_bytes'):>8s} {gib('device_peak_increase'):>8s}"
          + (f"  {row['read_gbps']:.0f} GB/s read" if row.get("read_gbps") else "")
          + (f"  {note[:80]}" if note else ""), flush=True)


def run(cases, impls, passes, lengths_arg=None, implementation="cuda", measure_apart=None):
    """The rows of every (case, L, pass, impl) that exists, printed as they come.

    ``measure_apart(case, impl, pas, l)``, when given, measures each row in a fresh process and this one leaves the
    device alone (no inputs, no device name; the rows carry the children's): the children need all of its memory,
    and each row's device_peak_* are then its own."""
    gpu = None if measure_apart else _timing.device_name()
    print_header(gpu)
    rows = []
    for case in cases:
        for l in case_lengths(case, lengths_arg):
            inputs = None
            if not measure_apart:
                try:
                    inputs = make_inputs(case, l)
                except Exception as e:  # pragma: no cover
                    print(f"{case} L={l}: input generation failed: {e}", flush=True)
                    continue
            for pas in passes:
                for impl in impls:
                    if not_applicable(case, impl, pas):
                        continue
                    row = dict(gpu=gpu, case=case, impl=impl, **{"pass": pas}, L=l)
                    skip = should_skip(case, impl, pas, l)
                    if skip:
                        row.update(ms=None, tflops=None, peak_bytes=None, skipped=skip)
                    elif measure_apart:
                        row.update(measure_apart(case, impl, pas, l))
                    else:
                        row.update(measure_row(case, impl, pas, l, inputs, implementation))
                    rows.append(row)
                    print_row(row)
                    gc.collect()
            del inputs
            gc.collect()
    return rows


def add_arguments(ap, *, cases, impls, passes, lengths=None):
    """The options every row-loop CLI shares, with that CLI's defaults (comma-separated lists)."""
    ap.add_argument("--cases", default=",".join(cases), help="comma-separated, of: " + ", ".join(CASES))
    ap.add_argument("--impls", default=",".join(impls), help="comma-separated, of: " + ", ".join(IMPLS))
    ap.add_argument("--lengths", default=lengths,
                    help="comma-separated L for every case (default: "
                         + ("each case's own lengths)" if lengths is None else "%(default)s)"))
    ap.add_argument("--passes", default=",".join(passes), help="comma-separated, of: " + ", ".join(PASSES))
    ap.add_argument("--implementation", default="cuda", choices=("cuda", "cpu", "xla"),
                    help="jax_dmattn's implementation for the jax_dmattn rows (cpu / xla: smoke runs)")
    ap.add_argument("--out", default=None,
                    help="JSON file the rows are appended to (default benchmarks/results/<device>.json)")


def parse_lists(ap, args):
    """(cases, impls, passes) of parsed add_arguments options; unknown names are usage errors."""
    chosen = []
    for name, one, known in (("cases", "case", CASES), ("impls", "impl", IMPLS), ("passes", "pass", PASSES)):
        values = getattr(args, name).split(",")
        for value in values:
            if value not in known:
                ap.error(f"unknown {one} {value!r}; {name}: {', '.join(known)}")
        chosen.append(values)
    return chosen


def results_path(gpu):
    return os.path.join(RESULTS_DIR, re.sub(r"[^A-Za-z0-9_.-]+", "_", gpu) + ".json")


def write_rows(rows, out=None):
    """Gives every row the run's provenance (gpu where the row has none, jax, commit, date) and appends the rows to
    ``out`` (default: the device's results file), after the rows already there: one file per device holds every
    run."""
    provenance = _timing.run_provenance(next((r["gpu"] for r in rows if r.get("gpu")), None), checkout=HERE)
    rows = [dict(gpu=r.get("gpu") or provenance["gpu"], **{k: v for k, v in r.items() if k != "gpu"},
                 jax=provenance["jax"], commit=provenance["commit"], date=provenance["date"]) for r in rows]
    out = out or results_path(provenance["gpu"])
    kept = []
    if os.path.exists(out):
        with open(out) as fh:
            kept = json.load(fh)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as fh:
        json.dump(kept + rows, fh, indent=1)
        fh.write("\n")
    print(f"# wrote {len(rows)} rows to {out} ({len(kept) + len(rows)} in all)", flush=True)
    return rows
