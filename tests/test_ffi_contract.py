"""The FFI contract between the Python wrappers and the C++ handlers, checked without running a kernel.

Each handler's binding (csrc/ffi/*.cc: ``XLA_FFI_DEFINE_HANDLER_SYMBOL(... ffi::Ffi::Bind().Arg<>()...)``) fixes
its operand count, result count and attribute names and types. A mismatch with what the Python side emits only
fails when the call runs, which for the CUDA targets means on a GPU; here every target is lowered on any machine
(CUDA through ``lowering_platforms``) and each emitted custom call is compared with the binding of its target.
"""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import pytest

import jax_dmattn
from jax_dmattn import _ffi

FFI_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "ffi")
ATTR_TYPES = {"float": "f32", "bool": "i1", "int64_t": "i64"}  # C++ attribute type -> MLIR attribute type


# a helper returning a partial binding chain, and a handler's binding (from Bind() or from such a helper)
BIND_HELPER = re.compile(r"(?:inline\s+)?auto\s+(\w+)\(\)\s*\{\s*return\s+(?:xla::)?ffi::Ffi::Bind\(\)(.*?);\s*\}",
                         re.S)
HANDLER = re.compile(r"XLA_FFI_DEFINE_HANDLER_SYMBOL\(\s*(\w+),\s*\w+,\s*(?:ffi::Ffi::Bind\(\)|(\w+)\(\))(.*?)\);",
                     re.S)


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", text)


def handler_bindings() -> dict[str, dict]:
    """{target name: {"args": n, "rets": n, "attrs": {name: mlir type}}} from the handler sources. A binding may
    start from a helper that returns a partial ``Ffi::Bind()`` chain (the operands handlers share), defined in the
    handler's own file or in a header of csrc/ffi; the file's own definition wins."""
    headers = {}
    for name in sorted(os.listdir(FFI_DIR)):
        if name.endswith(".h"):
            headers.update(BIND_HELPER.findall(_strip_comments(open(os.path.join(FFI_DIR, name)).read())))
    symbols, targets = {}, {}
    for name in sorted(os.listdir(FFI_DIR)):
        if not name.endswith(".cc"):
            continue
        text = _strip_comments(open(os.path.join(FFI_DIR, name)).read())
        helpers = dict(headers, **dict(BIND_HELPER.findall(text)))
        for symbol, helper, chain in HANDLER.findall(text):
            body = (helpers[helper] if helper else "") + chain
            symbols[symbol] = {
                "args": len(re.findall(r"\.Arg<", body)),
                "rets": len(re.findall(r"\.Ret<", body)),
                "attrs": {a: ATTR_TYPES[t] for t, a in re.findall(r'\.Attr<(\w+)>\("(\w+)"\)', body)},
            }
        for target, symbol in re.findall(r'\{"(dmattn_\w+)",\s*reinterpret_cast<void\*>\((\w+)\)\}', text):
            targets[target] = symbol
    return {t: symbols[s] for t, s in targets.items()}


def emitted_calls(text: str) -> list[tuple[str, int, int, dict]]:
    """(target, operand count, result count, {attribute: mlir type}) of every dmattn custom call in StableHLO."""
    calls = []
    for line in text.splitlines():
        m = re.search(r"custom_call @(dmattn_\w+)\((.*?)\) \{(.*)\} : \((.*?)\) -> (.*)$", line)
        if not m:
            continue
        target, operands, attrs, _, results = m.groups()
        config = re.search(r"mhlo\.backend_config = \{(.*?)\}", attrs)
        found = {}
        for item in (config.group(1).split(", ") if config and config.group(1) else []):
            name, value = item.split(" = ")
            typed = re.search(r": (\w+)$", value)
            found[name] = typed.group(1) if typed else "i1"  # true / false print without a type
        n_operands = len([o for o in operands.split(",") if o.strip()])
        n_results = len(re.findall(r"tensor<", results))
        calls.append((target, n_operands, n_results, found))
    return calls


B, L, H, HKV, D = 1, 200, 4, 2, 64


def _lowered(implementation, mask, bias_shape, *, is_causal=True, deterministic=False):
    dtype = jnp.float32 if implementation == "cpu" else jnp.bfloat16
    q = jnp.zeros((B, L, H, D), dtype)
    k = jnp.zeros((B, L, HKV, D), dtype)
    bias = None if bias_shape is None else jnp.zeros(bias_shape, dtype)

    def loss(q, k, v, b):
        out = jax_dmattn.attention(q, k, v, bias=b, mask=mask, is_causal=is_causal, deterministic=deterministic,
                                   implementation=implementation)
        return out.astype(jnp.float32).sum()

    argnums = (0, 1, 2) + ((3,) if bias_shape else ())
    platform = "cuda" if implementation == "cuda" else "cpu"
    return jax.jit(jax.grad(loss, argnums=argnums)).trace(q, k, k, bias).lower(
        lowering_platforms=(platform,)).as_text()


def _masks():
    scores = jnp.arange(B * HKV * L, dtype=jnp.float32).reshape(B, HKV, L)
    indices = jnp.tile(jnp.arange(0, L, 3, dtype=jnp.int32), (B, HKV, 1))
    return {
        "none": None,
        "bool": jnp.ones((B, HKV, L, L), jnp.bool_),
        "padding": jnp.ones((B, 1, 1, L), jnp.bool_),
        "topk": jax_dmattn.TopKMask(scores, 16),
        "indices": jax_dmattn.KeyIndices(indices),
    }


CASES = [(mask, bias, causal, det) for mask in ("none", "bool", "padding", "topk", "indices")
         for bias, causal, det in (((B, HKV, 1, L), True, False), ((B, HKV, L, L), False, True), (None, True, True))]


def test_bindings_are_parsed():
    bindings = handler_bindings()
    # the parse must see every registered target (CPU always; CUDA when the sources exist, which they do here)
    assert {"dmattn_fwd_cpu", "dmattn_bwd_cpu", "dmattn_fwd_cuda", "dmattn_bwd_cuda", "dmattn_key_lists_cuda",
            "dmattn_topk_key_lists_cuda"} <= set(bindings), sorted(bindings)
    assert set(_ffi.register_targets()["cpu"]) <= set(bindings)
    assert bindings["dmattn_fwd_cpu"]["attrs"]["scale"] == "f32"


@pytest.mark.parametrize("implementation", ["cpu", "cuda"])
@pytest.mark.parametrize("mask_name,bias_shape,is_causal,deterministic", CASES)
def test_emitted_calls_match_handler_bindings(monkeypatch, implementation, mask_name, bias_shape, is_causal,
                                               deterministic):
    if implementation == "cuda":
        # lowering emits custom calls by name: no compiled CUDA kernel is needed to check them
        monkeypatch.setattr(_ffi, "has_cuda_kernels", lambda: True)
    text = _lowered(implementation, _masks()[mask_name], bias_shape, is_causal=is_causal,
                    deterministic=deterministic)
    calls = emitted_calls(text)
    assert {c[0] for c in calls} >= {f"dmattn_fwd_{implementation}", f"dmattn_bwd_{implementation}"}, calls
    bindings = handler_bindings()
    for target, n_operands, n_results, attrs in calls:
        want = bindings[target]
        assert (n_operands, n_results) == (want["args"], want["rets"]), (target, n_operands, n_results, want)
        assert attrs == want["attrs"], (target, attrs, want["attrs"])
