"""Bad input gives a clear ValueError or TypeError, raised in Python before any kernel runs (so also while
tracing under jit / eval_shape), whose message names the offending argument (and, where natural, what it
got)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import get_attention

B, LQ, LK, H, HKV, D = 2, 16, 24, 4, 2, 32


def _good(dtype=jnp.float32, **over):
    a = dict(
        query=jnp.ones((B, LQ, H, D), dtype),
        key=jnp.ones((B, LK, HKV, D), dtype),
        value=jnp.ones((B, LK, HKV, D), dtype),
        bias=jnp.zeros((B, HKV, LQ, LK), jnp.float32),
        mask=jnp.ones((B, 1, LQ, LK), bool),
    )
    a.update(over)
    return a


def _expect_error(exc, pattern, implementation, got=None, **kwargs):
    """Call attention directly and under eval_shape (tracing only); both must raise ``exc`` matching
    ``pattern`` (the argument name) and, if given, containing ``got``."""
    attention = get_attention()
    arrays = {k: kwargs.pop(k) for k in ("query", "key", "value", "bias", "mask") if k in kwargs}
    kwargs.setdefault("implementation", implementation)

    def call(arrs):
        return attention(arrs["query"], arrs["key"], arrs["value"], arrs.get("bias"), arrs.get("mask"), **kwargs)

    for how in ("eager", "trace"):
        with pytest.raises(exc) as info:
            if how == "eager":
                call(arrays)
            else:
                jax.eval_shape(call, arrays)
        msg = str(info.value)
        assert re.search(pattern, msg, re.IGNORECASE), f"{how}: message does not name {pattern!r}: {msg!r}"
        if got is not None:
            assert got.lower() in msg.lower(), f"{how}: message does not say what it got ({got!r}): {msg!r}"


VALUE_ERRORS = {
    # rank
    "query-rank3": (dict(query=jnp.ones((LQ, H, D))), r"query"),
    "query-rank5": (dict(query=jnp.ones((1, B, LQ, H, D))), r"query"),
    "key-rank3": (dict(key=jnp.ones((LK, HKV, D))), r"key"),
    "value-rank5": (dict(value=jnp.ones((1, B, LK, HKV, D))), r"value"),
    # mismatched B / Lk / D / heads between q, k, v
    "key-batch": (dict(key=jnp.ones((B + 1, LK, HKV, D)), value=jnp.ones((B + 1, LK, HKV, D))), r"key|query"),
    "value-batch": (dict(value=jnp.ones((B + 1, LK, HKV, D))), r"value|key"),
    "value-len": (dict(value=jnp.ones((B, LK + 1, HKV, D))), r"value|key"),
    "key-head-dim": (dict(key=jnp.ones((B, LK, HKV, D // 2)), value=jnp.ones((B, LK, HKV, D // 2))),
                     r"key|query|head.?dim"),
    "value-head-dim": (dict(value=jnp.ones((B, LK, HKV, D // 2))), r"value|key"),
    "value-heads": (dict(value=jnp.ones((B, LK, 1, D))), r"value|key"),
    "heads-not-divisible": (dict(key=jnp.ones((B, LK, 3, D)), value=jnp.ones((B, LK, 3, D))), r"head"),
    "kv-heads-gt-q-heads": (dict(key=jnp.ones((B, LK, 2 * H, D)), value=jnp.ones((B, LK, 2 * H, D))), r"head"),
    # bias / mask not broadcastable
    "bias-head-3": (dict(bias=jnp.zeros((B, 3, LQ, LK))), r"bias"),
    "bias-batch": (dict(bias=jnp.zeros((B + 1, 1, LQ, LK))), r"bias"),
    "bias-qlen": (dict(bias=jnp.zeros((1, 1, LQ + 1, LK))), r"bias"),
    "bias-klen": (dict(bias=jnp.zeros((1, 1, LQ, LK - 1))), r"bias"),
    "bias-klen-rank1": (dict(bias=jnp.zeros((LQ,))), r"bias"),
    "bias-rank5": (dict(bias=jnp.zeros((1, B, HKV, LQ, LK))), r"bias"),
    "mask-head-3": (dict(mask=jnp.ones((B, 3, LQ, LK), bool)), r"mask"),
    "mask-batch": (dict(mask=jnp.ones((B + 1, 1, 1, LK), bool)), r"mask"),
    "mask-klen": (dict(mask=jnp.ones((1, 1, 1, LK + 1), bool)), r"mask"),
    "mask-qlen-rank2": (dict(mask=jnp.ones((LQ - 1, LK), bool)), r"mask"),
    "mask-rank5": (dict(mask=jnp.ones((1, B, 1, LQ, LK), bool)), r"mask"),
}


@pytest.mark.parametrize("name", list(VALUE_ERRORS))
def test_shape_errors(implementation, name):
    over, pattern = VALUE_ERRORS[name]
    dtype = jnp.bfloat16 if implementation == "cuda" else jnp.float32
    over = {k: (v.astype(dtype) if k in ("query", "key", "value") else v) for k, v in over.items()}
    _expect_error(ValueError, pattern, implementation, **_good(dtype, **over))


def test_head_dim_not_broadcastable_with_gqa(implementation):
    """H=8, Hkv=2: a bias/mask head dim of 3 (or 4) is neither 1, Hkv nor H."""
    dtype = jnp.bfloat16 if implementation == "cuda" else jnp.float32
    q = jnp.ones((B, LQ, 8, D), dtype)
    kv = jnp.ones((B, LK, 2, D), dtype)
    for hb in (3, 4):
        _expect_error(ValueError, r"bias", implementation, query=q, key=kv, value=kv,
                      bias=jnp.zeros((1, hb, 1, LK)))
        _expect_error(ValueError, r"mask", implementation, query=q, key=kv, value=kv,
                      mask=jnp.ones((1, hb, LQ, LK), bool))


TYPE_ERRORS = {
    "mask-int8": (dict(mask=jnp.ones((B, 1, LQ, LK), jnp.int8)), r"mask", "int8"),
    "mask-float": (dict(mask=jnp.ones((B, 1, LQ, LK), jnp.float32)), r"mask", "float32"),
    "mask-int32": (dict(mask=jnp.ones((LK,), jnp.int32)), r"mask", "int32"),
    "bias-int32": (dict(bias=jnp.zeros((B, HKV, LQ, LK), jnp.int32)), r"bias", "int32"),
    "bias-bool": (dict(bias=jnp.zeros((LK,), bool)), r"bias", "bool"),
    "key-dtype": (dict(key=jnp.ones((B, LK, HKV, D), jnp.float16)), r"key|dtype", None),
    "value-dtype": (dict(value=jnp.ones((B, LK, HKV, D), jnp.float16)), r"value|dtype", None),
    "int-qkv": (dict(query=jnp.ones((B, LQ, H, D), jnp.int32), key=jnp.ones((B, LK, HKV, D), jnp.int32),
                     value=jnp.ones((B, LK, HKV, D), jnp.int32)), r"query|dtype", "int32"),
}


@pytest.mark.parametrize("name", list(TYPE_ERRORS))
def test_type_errors(implementation, name):
    over, pattern, got = TYPE_ERRORS[name]
    dtype = jnp.bfloat16 if implementation == "cuda" else jnp.float32
    base = _good(dtype)
    if implementation == "cuda" and name in ("key-dtype", "value-dtype"):
        over = {k: v.astype(jnp.float16) for k, v in over.items()}
    base.update(over)
    _expect_error(TypeError, pattern, implementation, got=got, **base)


def test_float32_rejected_by_cuda():
    """float32 q/k/v with implementation="cuda" is a TypeError or ValueError on every machine (on one without
    the CUDA kernels it may be refused for that reason instead)."""
    attention = get_attention()
    a = _good(jnp.float32)
    with pytest.raises((TypeError, ValueError)) as info:
        attention(a["query"], a["key"], a["value"], a["bias"], a["mask"], implementation="cuda")
    assert re.search(r"float32|dtype|cuda", str(info.value), re.IGNORECASE), str(info.value)
    if jax.default_backend() == "gpu":
        assert re.search(r"float32|dtype", str(info.value), re.IGNORECASE), str(info.value)


@pytest.mark.parametrize("head_dim", [264, 512])
def test_head_dim_too_large_for_cuda(head_dim):
    """implementation="cuda" takes head_dim <= 256; the check runs before anything needs a GPU."""
    dtype = jnp.bfloat16
    a = _good(dtype, query=jnp.ones((B, LQ, H, head_dim), dtype), key=jnp.ones((B, LK, HKV, head_dim), dtype),
              value=jnp.ones((B, LK, HKV, head_dim), dtype))
    _expect_error(ValueError, r"head.?dim|query|\bD\b", "cuda", got=str(head_dim), **a)


def test_head_dim_zero(implementation):
    """D = 0 is a ValueError on every implementation (the default scale D ** -0.5 has no value)."""
    dtype = jnp.bfloat16 if implementation == "cuda" else jnp.float32
    a = _good(dtype, query=jnp.ones((B, LQ, H, 0), dtype), key=jnp.ones((B, LK, HKV, 0), dtype),
              value=jnp.ones((B, LK, HKV, 0), dtype))
    _expect_error(ValueError, r"head.?dim", implementation, got="0", **a)
    _expect_error(ValueError, r"head.?dim", implementation, got="0", scale=1.0, **a)


# ----------------------------------------------------------------------------------- bool keyword arguments
BOOL_FLAGS = ("is_causal", "return_lse", "deterministic")
NOT_BOOLS = {"str": "no", "int-1": 1, "int-0": 0, "none": None, "float": 1.0, "array": np.array([True])}


@pytest.mark.parametrize("value", list(NOT_BOOLS))
@pytest.mark.parametrize("flag", BOOL_FLAGS)
def test_bool_flags_must_be_bool(implementation, flag, value):
    dtype = jnp.bfloat16 if implementation == "cuda" else jnp.float32
    _expect_error(TypeError, flag, implementation, **_good(dtype), **{flag: NOT_BOOLS[value]})


@pytest.mark.parametrize("flag", ["is_causal", "return_lse"])
def test_reference_bool_flags_must_be_bool(flag):
    import jax_dmattn

    a = _good()
    for value in ("no", 1, None):
        with pytest.raises(TypeError, match=flag):
            jax_dmattn.attention_reference(a["query"], a["key"], a["value"], **{flag: value})


def test_numpy_bools_accepted(implementation):
    dtype = jnp.bfloat16 if implementation == "cuda" else jnp.float32
    a = _good(dtype)
    out, lse = get_attention()(a["query"], a["key"], a["value"], is_causal=np.bool_(True), return_lse=np.bool_(True),
                               deterministic=np.bool_(False), implementation=implementation)
    assert out.shape == a["query"].shape and lse.shape == (B, H, LQ)


# ------------------------------------------------------------------------------- implementation=None
@pytest.fixture
def on_platform(monkeypatch):
    """Pretend the default backend is ``platform`` and which kernels were built; only tracing runs (eval_shape),
    so nothing is lowered for the pretended platform."""
    import jax_dmattn
    from jax_dmattn import _ffi

    def pretend(platform, cuda_kernels=True, cpu_kernels=True):
        monkeypatch.setattr(jax, "default_backend", lambda: platform)
        monkeypatch.setattr(_ffi, "has_cuda_kernels", lambda: cuda_kernels)
        monkeypatch.setattr(_ffi, "has_cpu_kernels", lambda: cpu_kernels)
        return jax_dmattn

    return pretend


def _none_call(jax_dmattn, dtype, head_dim=D):
    a = _good(dtype, query=jnp.ones((B, LQ, H, head_dim), dtype), key=jnp.ones((B, LK, HKV, head_dim), dtype),
              value=jnp.ones((B, LK, HKV, head_dim), dtype))
    return jax.eval_shape(lambda a: jax_dmattn.attention(a["query"], a["key"], a["value"], a["bias"], a["mask"]), a)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_none_on_gpu_never_picks_the_reference(on_platform, dtype):
    """implementation=None on GPU: float32 or head_dim > 256 raise (naming what the CUDA kernels take and the
    cost of implementation="xla"), where they used to run the O(L^2) reference silently."""
    jax_dmattn = on_platform("gpu")
    assert jax_dmattn.default_implementation(jnp.bfloat16, 256) == "cuda"
    if dtype == jnp.float32:
        with pytest.raises(ValueError, match=r"(?s)bfloat16.*float32.*implementation='xla'.*memory") as info:
            _none_call(jax_dmattn, dtype)
        assert "implementation=None" in str(info.value)
    with pytest.raises(ValueError, match=r"(?s)256.*264.*implementation='xla'"):
        _none_call(jax_dmattn, jnp.bfloat16, head_dim=264)
    with pytest.raises(ValueError, match=r"(?s)256.*264.*implementation='xla'"):
        jax_dmattn.default_implementation(jnp.bfloat16, 264)
    # the same call by name runs the reference
    a = _good(dtype)
    out = jax_dmattn.attention(a["query"], a["key"], a["value"], implementation="xla")
    assert out.shape == a["query"].shape


def test_none_follows_the_default_device(on_platform):
    """On a GPU host, jax.default_device(a CPU device) makes implementation=None run the CPU kernels (float32
    included), as the arrays of such a call live on the CPU; without it the CUDA kernels are chosen."""
    jax_dmattn = on_platform("gpu")
    with jax.default_device(jax.devices("cpu")[0]):
        assert jax_dmattn.default_implementation(jnp.float32, 64) == "cpu"
        assert _none_call(jax_dmattn, jnp.float32).shape == (B, LQ, H, D)
    with jax.default_device("cpu"):
        assert jax_dmattn.default_implementation(jnp.float32, 64) == "cpu"
    assert jax_dmattn.default_implementation(jnp.bfloat16, 64) == "cuda"


def test_none_on_gpu_without_cuda_kernels(on_platform):
    jax_dmattn = on_platform("gpu", cuda_kernels=False)
    with pytest.raises(ValueError, match=r"(?s)CUDA kernels.*implementation='xla'"):
        _none_call(jax_dmattn, jnp.bfloat16)


def test_none_on_cpu_uses_the_cpu_kernels(on_platform):
    """The CPU kernels take float32 / bfloat16 / float16 and any head dim: implementation=None runs them."""
    jax_dmattn = on_platform("cpu")
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        for d in (8, 256, 264, 512):
            assert jax_dmattn.default_implementation(dtype, d) == "cpu"
    with jax.enable_x64(True):
        with pytest.raises(ValueError, match=r"(?s)float32.*float64.*implementation='xla'"):
            _none_call(jax_dmattn, jnp.float64)
    jax_dmattn = on_platform("cpu", cpu_kernels=False)
    with pytest.raises(ValueError, match=r"(?s)extension.*implementation='xla'"):
        _none_call(jax_dmattn, jnp.float32)


def test_none_on_a_platform_without_kernels(on_platform):
    jax_dmattn = on_platform("tpu")
    with pytest.raises(ValueError, match=r"(?s)tpu.*implementation='xla'"):
        _none_call(jax_dmattn, jnp.bfloat16)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), -float("inf"), 0])
@pytest.mark.parametrize("arg", ["scale", "softcap"])
def test_scale_softcap_not_positive_finite(implementation, arg, value):
    dtype = jnp.bfloat16 if implementation == "cuda" else jnp.float32
    _expect_error(ValueError, arg, implementation, **_good(dtype), **{arg: value})


@pytest.mark.parametrize("arg", ["scale", "softcap"])
def test_scale_softcap_wrong_type(implementation, arg):
    dtype = jnp.bfloat16 if implementation == "cuda" else jnp.float32
    _expect_error((TypeError, ValueError), arg, implementation, **_good(dtype), **{arg: "0.5"})


@pytest.mark.parametrize("impl", ["tpu", "CUDA", "", "triton", "pallas"])
def test_unknown_implementation(impl):
    _expect_error(ValueError, r"implementation", impl, got=repr(impl), **_good())


def test_errors_raise_before_running(implementation, monkeypatch):
    """Validation happens in Python: the error surfaces while tracing, before lowering/compiling (the
    kernels' FFI call is never reached)."""
    attention = get_attention()
    a = _good(jnp.bfloat16 if implementation == "cuda" else jnp.float32)
    f = jax.jit(lambda q, k, v, b: attention(q, k, v, b, None, implementation=implementation))
    with pytest.raises(ValueError, match="bias"):
        f.trace(a["query"], a["key"], a["value"], jnp.zeros((3, LQ, LK)))
