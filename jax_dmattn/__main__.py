"""``python -m jax_dmattn``: check the installed kernels against the reference, then time them.

Runs on the default JAX device. The self-check compares outputs and all four gradients with the pure-jnp
reference on fresh random inputs; the table times plain attention (ours, the reference and
``jax.nn.dot_product_attention`` with bias and mask folded into one additive bias, as users do today) next to
the dynamic-mask case: ours with ``TopKMask`` of the per-key bias (each query row keeps its ``--window`` keys
of largest bias).
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_dmattn
from jax_dmattn import _ffi, _timing

# (name, B, Lq, Lk, H, Hkv, D, bias shape, causal, softcap, mask density)
CHECKS = (
    ("per-key bias, GQA 4, causal", 2, 200, 200, 8, 2, 64, "key", True, None, None),
    ("full bias, random mask, Lq<Lk", 1, 70, 150, 4, 4, 40, "full", False, None, 0.7),
    ("head-broadcast bias, softcap", 2, 129, 65, 4, 1, 128, "head", False, 20.0, None),
)


def _inputs(rng, b, lq, lk, h, hkv, d, bias_kind, density, dtype):
    q = jnp.asarray(rng.standard_normal((b, lq, h, d)), dtype)
    k = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), dtype)
    v = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), dtype)
    bias_shape = {"key": (b, hkv, 1, lk), "full": (b, h, lq, lk), "head": (1, 1, lq, lk)}[bias_kind]
    bias = jnp.asarray(rng.standard_normal(bias_shape), jnp.float32)
    mask = None if density is None else jnp.asarray(rng.random((b, 1, lq, lk)) < density)
    return q, k, v, bias, mask


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def self_check(implementation, dtype, tol) -> bool:
    rng = np.random.default_rng()
    ok = True
    for name, b, lq, lk, h, hkv, d, bias_kind, causal, softcap, density in CHECKS:
        q, k, v, bias, mask = _inputs(rng, b, lq, lk, h, hkv, d, bias_kind, density, dtype)
        cot = jnp.asarray(rng.standard_normal((b, lq, h, d)), dtype)

        def loss(impl):
            def f(q, k, v, bias):
                out = jax_dmattn.attention(q, k, v, bias, mask, is_causal=causal, softcap=softcap,
                                           implementation=impl)
                return jnp.sum(out.astype(jnp.float32) * cot.astype(jnp.float32)), out
            return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))

        (_, out), grads = loss(implementation)(q, k, v, bias)
        (_, ref_out), ref_grads = loss("xla")(*(x.astype(jnp.float32) for x in (q, k, v)), bias)
        errs = [_rel(out, ref_out)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
        passed = errs[0] <= tol and max(errs[1:]) <= 4 * tol
        ok &= passed
        print(f"  {'PASS' if passed else 'FAIL'}  {name:34s} out {errs[0]:.1e}  dq {errs[1]:.1e}  dk {errs[2]:.1e}"
              f"  dv {errs[3]:.1e}  dbias {errs[4]:.1e}")
    return ok


# What the command does, for --help (the module docstring carries reST markup).
DESCRIPTION = ("Check the installed jax_dmattn kernels against the pure-jnp reference (outputs and the gradients of "
               "query, key, value and bias), then time them on the default JAX device.")
EPILOG = ("Timing table: causal attention with a per-key bias [B, Hkv, 1, L]. Columns: jax_dmattn (plain "
          "attention), top-k (jax_dmattn with the dynamic mask TopKMask(bias, window): each query row keeps the "
          "window keys of largest bias), reference (implementation='xla', plain), jax.nn.dpa "
          "(jax.nn.dot_product_attention, plain). Exit status 0 when the self-check passes.")
DEFAULT_LENGTHS = {"cpu": (512, 1024, 2048), "gpu": (1024, 4096, 16384)}
DEFAULT_WINDOW = 256


def timing_table(implementation, dtype, lengths, reps, window=DEFAULT_WINDOW):
    rng = np.random.default_rng(0)
    b, h, hkv, d = 1, 8, 2, 64
    print(f"\n  causal, B={b} H={h} Hkv={hkv} D={d} {jnp.dtype(dtype).name}, per-key bias [B, Hkv, 1, L]; "
          f"top-k: TopKMask of the bias, {window} keys per row; median of {reps} (ms)")
    print(f"  {'L':>6s} {'pass':>8s} {'jax_dmattn':>11s} {'top-k':>9s} {'reference':>10s} {'jax.nn.dpa':>11s}")
    for length in lengths:
        q, k, v, bias, _ = _inputs(rng, b, length, length, h, hkv, d, "key", None, dtype)

        def ours(q, k, v, bias):
            return jax_dmattn.attention(q, k, v, bias, is_causal=True, implementation=implementation)

        def topk(q, k, v, bias):
            # the paper's dynamic mask: selected from the detached bias, which still trains through attention
            mask = jax_dmattn.TopKMask(jax.lax.stop_gradient(bias[:, :, 0, :]), window)
            return jax_dmattn.attention(q, k, v, bias, mask, is_causal=True, implementation=implementation)

        def ref(q, k, v, bias):
            return jax_dmattn.attention(q, k, v, bias, is_causal=True, implementation="xla")

        def dpa(q, k, v, bias):
            full_bias = jnp.repeat(bias, h // hkv, axis=1).astype(q.dtype)
            return jax.nn.dot_product_attention(q, k, v, bias=full_bias, is_causal=True)

        for pass_name in ("fwd", "fwd+bwd"):
            row = []
            for fn in (ours, topk, ref, dpa):
                if pass_name == "fwd":
                    f = jax.jit(fn)
                else:
                    f = jax.jit(jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a).astype(jnp.float32)),
                                         argnums=(0, 1, 2, 3)))
                row.append(_timing.timed(f, (q, k, v, bias), reps=reps, max_inner=1))
            print(f"  {length:6d} {pass_name:>8s} {row[0]:11.1f} {row[1]:9.1f} {row[2]:10.1f} {row[3]:11.1f}")


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1 (a clean usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jax_dmattn", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--lengths", type=_positive_int, nargs="+", metavar="L",
                        help="sequence lengths to time (default: "
                             + "; ".join(f"{' '.join(map(str, v))} on {k}" for k, v in DEFAULT_LENGTHS.items()) + ")")
    parser.add_argument("--reps", type=_positive_int, default=3, metavar="N",
                        help="timed runs per entry, after one warm-up run; the table shows their median "
                             "(default: %(default)s)")
    parser.add_argument("--window", type=_positive_int, default=DEFAULT_WINDOW, metavar="K",
                        help="keys each query row keeps in the top-k column (default: %(default)s)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    platform = jax.default_backend()
    dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
    print(f"jax_dmattn {jax_dmattn.__version__} on {jax.devices()[0].device_kind} ({platform}), jax {jax.__version__}")
    built = {name: "yes" if has() else "no" for name, has in (("cpu", _ffi.has_cpu_kernels),
                                                             ("cuda", _ffi.has_cuda_kernels))}
    print(f"  kernels: cpu={built['cpu']} cuda={built['cuda']}")
    expected = {"cpu": _ffi.has_cpu_kernels, "gpu": _ffi.has_cuda_kernels}.get(platform)
    if expected is not None and not expected():
        print(f"\nFAILED: the compiled {platform} kernels of jax_dmattn are not installed or did not load "
              f"(extension: {'missing' if _ffi.extension() is None else 'loaded, no ' + platform + ' kernels'}). "
              "Reinstall from source (see README).")
        return 1
    try:
        implementation = jax_dmattn.default_implementation(dtype, 64)
    except ValueError as e:  # a platform without kernels
        print(f"\nFAILED: {e}")
        return 1
    print(f"  default implementation for {jnp.dtype(dtype).name}: {implementation}")
    tol = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}[dtype]
    print(f"\nself-check vs reference ({implementation}, {jnp.dtype(dtype).name}, norm-wise relative error):")
    ok = self_check(implementation, dtype, tol)
    lengths = args.lengths or DEFAULT_LENGTHS.get(platform, DEFAULT_LENGTHS["gpu"])
    timing_table(implementation, dtype, lengths, args.reps, args.window)
    print("\nself-check " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
