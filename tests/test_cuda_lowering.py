"""The CUDA path's Python plumbing, checked without a GPU: forward + backward through ``jax_dmattn.attention``
lowered for the "cuda" platform on any machine, then the custom calls read from the StableHLO text.

This catches, in CI, what the GPU tests would only see on the device: which FFI target each call reaches, which
mask pre-pass / backward path it picks (live-key lists or tile classes), the workspace / key-list shapes the
handlers check (csrc/ffi/cuda_fwd_handler.cc, csrc/ffi/cuda_bwd_handler.cc, csrc/ffi/cuda_key_lists_handler.cc),
and that the forward's and the backward's key-list pre-pass calls are identical (so that XLA's CSE merges them).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import jax_dmattn
from jax_dmattn import _cuda_fwd, _ffi

B, L, H, HKV, D = 1, 300, 4, 2, 64


@pytest.fixture(autouse=True)
def _pretend_cuda_kernels(monkeypatch):
    # Lowering emits custom calls by name; it needs no compiled kernel, so a CPU-only build can be checked too.
    monkeypatch.setattr(_ffi, "has_cuda_kernels", lambda: True)


def lowered_calls(bias_shape, mask_shape, *, deterministic=False, grad=True, mask=None, **extra):
    """{target: [the custom call's full StableHLO line, ...]} for fwd (+ bwd) of one attention call; ``extra``:
    attention()'s segment-id / window / length keywords."""
    q = jnp.zeros((B, L, H, D), jnp.bfloat16)
    k = jnp.zeros((B, L, HKV, D), jnp.bfloat16)
    bias = None if bias_shape is None else jnp.zeros(bias_shape, jnp.bfloat16)
    if mask_shape is not None:
        mask = jnp.ones(mask_shape, jnp.bool_)

    def out(q, k, v, b):
        return jax_dmattn.attention(q, k, v, bias=b, mask=mask, is_causal=True, deterministic=deterministic,
                                    implementation="cuda", **extra)

    if grad:
        fn = jax.grad(lambda *a: out(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2) + ((3,) if bias_shape else ()))
    else:
        fn = out
    text = jax.jit(fn).trace(q, k, k, bias).lower(lowering_platforms=("cuda",)).as_text()
    calls = {}
    for line in text.splitlines():
        m = re.search(r'custom_call @(\w+)|call_target_name = "(\w+)"', line)
        if m and "dmattn" in line:
            calls.setdefault(m.group(1) or m.group(2), []).append(line)
    return calls


def result_types(line):
    """The result tensor types of a custom-call line, in order."""
    return re.findall(r"tensor<[^>]*>", line.split("->")[-1])


def operand_types(line):
    """The operand tensor types of a custom-call line, in order."""
    return re.findall(r"tensor<[^>]*>", line.split("->")[0].rsplit(":", 1)[-1])


def operands(line):
    """The SSA operand names of a custom-call line."""
    return re.search(r"custom_call @\w+\(([^)]*)\)", line).group(1).split(", ")


def key_list_call_signature(line):
    """What makes two key-list calls identical for CSE: the whole op but the name of its results (operands,
    attributes, layouts, types), and, to report, its operands and attributes."""
    attrs = re.search(r"mhlo\.backend_config = \{([^}]*)\}", line).group(1)
    return operands(line), attrs, re.sub(r"^\s*%[\w#:]+ = ", "", line)


# Capacity of the lists at L = 300: the key dim rounded up to 64 (below KEY_LIST_MAX_KEYS).
CAP = 320


def test_forward_takes_key_lists_for_a_full_key_mask():
    calls = lowered_calls((B, HKV, 1, L), (B, HKV, L, L), grad=False)
    (line,) = calls["dmattn_fwd_cuda"]
    assert "key_lists = true" in line
    assert _cuda_fwd.key_list_capacity(L) == CAP
    n_keys, n_words = _cuda_fwd.key_list_sizes((B, HKV, L, L), CAP)
    assert (n_keys, n_words) == _cuda_fwd.key_list_sizes((B, HKV, L, L))  # default capacity
    assert n_keys == 2 * 3 * (1 + CAP) and n_words == 2 * 3 * 5 * 128
    # Args: q, k, v, bias, mask, key lists, bit words, row bounds, key segment ids; results: out, lse, tile classes.
    ops = operand_types(line)
    assert len(ops) == 9
    assert ops[5] == f"tensor<{n_keys}xi32>" and ops[6] == f"tensor<{2 * n_words}xui32>"
    assert ops[7:] == ["tensor<0xi32>", "tensor<0xi32>"]  # no row bounds
    types = result_types(line)
    assert len(types) == 3 and types[2] == "tensor<0xui8>"  # no tile map
    # The lists come from their own pre-pass call, on the mask, with the attention call's query length.
    (kl,) = calls["dmattn_key_lists_cuda"]
    assert result_types(kl) == [f"tensor<{n_keys}xi32>", f"tensor<{2 * n_words}xui32>"]
    assert operand_types(kl) == [f"tensor<{B}x{HKV}x{L}x{L}xi1>"]
    assert f"capacity = {CAP} : i64" in kl and "is_causal = true" in kl and f"q_len = {L} : i64" in kl
    kl_results = re.match(r"\s*(%\w+)", kl).group(1)
    assert operands(line)[5:7] == [f"{kl_results}#0", f"{kl_results}#1"]


@pytest.mark.parametrize("mask_heads", [1, HKV, H])
def test_decoding_step_lists_the_parts_of_the_whole_mask(monkeypatch, mask_heads):
    """A packed decoding step (one query row, GQA) with a bool mask, split into 4 key parts: one key-list pre-pass
    over the whole mask with parts = 4 (a per-query-head mask moved to the packed rows), the forward on K, V, the
    bias and q, the parts being query heads h * 4 + p that read q's head h, with the lists as its only mask: nothing
    cut into parts or repeated."""
    from jax_dmattn import _decode

    monkeypatch.setattr(_decode, "split_count", lambda **kw: 4)
    b, lk, g = 2, 4096, H // HKV
    sds = jax.ShapeDtypeStruct
    args = (sds((b, 1, H, D), jnp.bfloat16), sds((b, lk, HKV, D), jnp.bfloat16), sds((b, lk, HKV, D), jnp.bfloat16),
            sds((b, HKV, 1, lk), jnp.bfloat16), sds((b, mask_heads, 1, lk), jnp.bool_))
    fn = lambda q, k, v, bias, mask: jax_dmattn.attention(q, k, v, bias=bias, mask=mask,  # noqa: E731
                                                          implementation="cuda")
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    lines = [ln for ln in text.splitlines() if "dmattn" in ln and "custom_call" in ln]
    (kl,) = [ln for ln in lines if "dmattn_key_lists_cuda" in ln]
    (fwd,) = [ln for ln in lines if "dmattn_fwd_cuda" in ln]
    hm, mm = (HKV, g) if mask_heads == H else (mask_heads, 1)
    assert operand_types(kl) == [f"tensor<{b}x{hm}x{mm}x{lk}xi1>"] and "parts = 4 : i64" in kl
    cap = lk // 4
    assert result_types(kl)[0] == f"tensor<{b * hm * 4 * (1 + cap)}xi32>"
    ops = operand_types(fwd)
    # q as the reshape of its heads, [B, Hkv, G, D], serving each part's query head
    assert ops[0] == f"tensor<{b}x{HKV}x{g}x{D}xbf16>" and "q_head_repeat = 4 : i64" in fwd
    assert "q_heads_first = true" in fwd
    assert ops[1] == ops[2] == f"tensor<{b}x{lk}x{HKV}x{D}xbf16>" and ops[3] == f"tensor<{b}x{HKV}x1x{lk}xbf16>"
    assert ops[4] == "tensor<0xi1>"  # no mask operand: the lists stand for it
    assert ops[5] == f"tensor<{b * HKV * 4 * (1 + cap)}xi32>"  # a mask head shared by the kv heads: its lists each
    assert f"list_heads = {HKV * 4} : i64" in fwd


def test_q_head_repeat_needs_compact_lists():
    q = jnp.zeros((B, 1, HKV, D), jnp.bfloat16)
    k = jnp.zeros((B, L, HKV, D), jnp.bfloat16)
    with pytest.raises(ValueError, match="q_head_repeat and q_heads_first are taken with compact_lists only"):
        _cuda_fwd.flash_fwd(q, k, k, None, jnp.ones((B, HKV, 1, L), bool), scale=1.0, softcap=0.0, is_causal=False,
                            q_head_repeat=2)


def test_forward_takes_tile_classes_for_a_key_broadcast_mask():
    calls = lowered_calls(None, (B, HKV, L, 1), grad=False)
    (line,) = calls["dmattn_fwd_cuda"]
    assert "key_lists = false" in line
    assert "dmattn_key_lists_cuda" not in calls
    types = result_types(line)
    assert types[2] == f"tensor<{B}x{HKV}x3x1xui8>"  # [Bm, Hm, ceil(L / 128), ceil(1 / 64)]
    assert operand_types(line)[5:7] == ["tensor<0xi32>", "tensor<0xui32>"]


def test_forward_without_mask_has_no_pre_pass_outputs():
    calls = lowered_calls(None, None, grad=False)
    (line,) = calls["dmattn_fwd_cuda"]
    assert result_types(line)[2:] == ["tensor<0xui8>"]
    assert operand_types(line)[5:7] == ["tensor<0xi32>", "tensor<0xui32>"]
    assert "dmattn_key_lists_cuda" not in calls


def test_row_bounds_take_the_tile_path():
    """Segment ids with a full-key bool mask: no key lists; the row bounds and key segment ids reach the forward
    and the key-tile backward as int32 [B, L, 4] / [B, L], with the bounds holding causality."""
    seg = jnp.zeros((B, L), jnp.int32)
    calls = lowered_calls((B, HKV, 1, L), (B, HKV, L, L), q_segment_ids=seg, kv_segment_ids=seg)
    assert "dmattn_key_lists_cuda" not in calls
    (fwd,) = calls["dmattn_fwd_cuda"]
    (bwd,) = calls["dmattn_bwd_cuda"]
    for line, first in ((fwd, 5), (bwd, 9)):
        assert "is_causal = false" in line
        ops = operand_types(line)
        assert ops[first:first + 2] == ["tensor<0xi32>", "tensor<0xui32>"]  # no key lists
        assert ops[first + 2:] == [f"tensor<{B}x{L}x4xi32>", f"tensor<{B}x{L}xi32>"]
    assert "key_lists = false" in fwd and result_types(fwd)[2] == f"tensor<{B}x{HKV}x3x5xui8>"
    assert "key_list_rows = 0" in bwd


def test_key_indices_with_lengths_take_filtered_key_lists():
    """KeyIndices with sequence lengths: the indices outside the bounds are dropped before the lists are built, so
    the key-list kernels run without row bounds."""
    lens = jnp.full((B,), L - 7, jnp.int32)
    idx = jnp.zeros((B, HKV, 1, 16), jnp.int32)
    calls = lowered_calls((B, HKV, 1, L), None, mask=jax_dmattn.KeyIndices(idx), key_value_seq_lengths=lens)
    (fwd,) = calls["dmattn_fwd_cuda"]
    assert "key_lists = true" in fwd and operand_types(fwd)[7:] == ["tensor<0xi32>", "tensor<0xi32>"]
    (bwd,) = calls["dmattn_bwd_cuda"]
    assert operand_types(bwd)[11:] == ["tensor<0xi32>", "tensor<0xi32>"]


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_path_choice(deterministic):
    calls = lowered_calls((B, HKV, 1, L), (B, HKV, L, L), deterministic=deterministic)
    (line,) = calls["dmattn_bwd_cuda"]
    assert f"deterministic = {str(deterministic).lower()}" in line
    types = result_types(line)
    n_keys, n_words = _cuda_fwd.key_list_sizes((B, HKV, L, L), CAP)
    # Args: q, k, v, bias, mask, out, lse, dout, dlse, key lists, bit words, row bounds, key segment ids.
    # Results: dq, dk, dv, dbias, dq_accum, delta, tile classes, dbias_accum, dkv_accum, nonfinite. Both modes take
    # the key-list path here; deterministic mode accumulates int64 fixed-point counts (as uint32 pairs) with the
    # stats words after them, the atomic mode fp32.
    ops = operand_types(line)
    assert len(ops) == 13
    assert ops[9] == f"tensor<{n_keys}xi32>" and ops[10] == f"tensor<{2 * n_words}xui32>"
    assert ops[11:] == ["tensor<0xi32>", "tensor<0xi32>"]
    assert len(types) == 10
    assert types[4] == "tensor<0xf32>" and types[6] == "tensor<0xui8>"
    if deterministic:
        assert types[8] == f"tensor<{4 * B * L * HKV * D + 8}xui32>"
        assert types[7] == f"tensor<{2 * B * HKV * L}xui32>"  # dbias counts
    else:
        assert types[8] == f"tensor<2x{B}x{L}x{HKV}x{D}xf32>"


def test_backward_full_bias_takes_the_key_tile_path():
    """A bias that varies over query rows needs per-element dbias: the key-list path does not take it."""
    calls = lowered_calls((B, HKV, L, L), (B, HKV, L, L))
    (line,) = calls["dmattn_bwd_cuda"]
    assert operand_types(line)[9:11] == ["tensor<0xi32>", "tensor<0xui32>"]
    assert result_types(line)[6] == f"tensor<{B}x{HKV}x5x5xui8>"
    # Only the forward builds lists then.
    assert len(calls["dmattn_key_lists_cuda"]) == 1


def grad_text(mask_shape, *, deterministic=False, layers=1):
    """StableHLO of jit(value_and_grad) over `layers` chained attention calls sharing one mask (an argument)."""
    q = jnp.zeros((B, L, H, D), jnp.bfloat16)
    k = jnp.zeros((B, L, HKV, D), jnp.bfloat16)
    bias = jnp.zeros((B, HKV, 1, L), jnp.bfloat16)
    mask = jnp.ones(mask_shape, jnp.bool_)

    def loss(q, k, v, b, m):
        x = q
        for _ in range(layers):
            x = jax_dmattn.attention(x, k, v, bias=b, mask=m, is_causal=True, deterministic=deterministic,
                                     implementation="cuda")
        return x.astype(jnp.float32).sum()

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    return fn.trace(q, k, k, bias, mask).lower(lowering_platforms=("cuda",)).as_text()


def key_list_lines(text):
    return [ln for ln in text.splitlines() if re.search(r'custom_call @dmattn_key_lists_cuda\b', ln)]


@pytest.mark.parametrize("deterministic", [False, True])
def test_forward_and_backward_key_list_calls_are_identical(deterministic):
    """The backward rebuilds the lists with exactly the forward's call: same operand (the mask value), same
    attributes, same types. XLA's CSE then merges the two (the optimized HLO has one; checked on the GPU in
    tests/test_cuda_key_list_reuse.py), so the mask is read once per step."""
    lines = key_list_lines(grad_text((B, HKV, L, L), deterministic=deterministic))
    assert len(lines) == 2
    fwd, bwd = (key_list_call_signature(ln) for ln in lines)
    assert fwd == bwd
    assert fwd[0] == ["%arg4"]  # the mask argument itself, not a copy
    assert f"capacity = {CAP} : i64" in fwd[1] and f"q_len = {L} : i64" in fwd[1] and "is_causal = true" in fwd[1]


def test_layers_sharing_a_mask_emit_identical_key_list_calls():
    lines = key_list_lines(grad_text((B, HKV, L, L), layers=2))
    assert len(lines) == 4
    assert len({repr(key_list_call_signature(ln)) for ln in lines}) == 1


def test_key_broadcast_mask_emits_no_key_list_call():
    text = grad_text((B, HKV, L, 1))
    assert not key_list_lines(text)
    assert "dmattn_fwd_cuda" in text and "dmattn_bwd_cuda" in text


def test_key_list_capacity_rounds_and_caps():
    cap = _cuda_fwd.key_list_capacity
    assert _cuda_fwd.KEY_LIST_MAX_KEYS == 4096
    assert cap(1) == 64 and cap(64) == 64 and cap(65) == 128 and cap(300) == 320
    assert cap(4096) == 4096 and cap(4097) == 4096 and cap(100_000) == 4096
    assert cap(100_000, max_keys=1000) == 960  # rounded down to a multiple of 64
    assert cap(100_000, max_keys=10) == 64     # at least one chunk
    assert cap(300, max_keys=8192) == 320      # never above the key dim rounded up to 64
    n_keys, n_words = _cuda_fwd.key_list_sizes((2, 3, 200, 10_000))
    units = 2 * 3 * 2
    assert (n_keys, n_words) == (units * (1 + 4096), units * 64 * 128)


@pytest.mark.parametrize("bad", [0, -64, 100, 64.0, True])
def test_bad_key_list_capacity_raises(bad):
    from jax_dmattn import _cuda_bwd

    q = jnp.zeros((B, L, H, D), jnp.bfloat16)
    k = jnp.zeros((B, L, HKV, D), jnp.bfloat16)
    mask = jnp.ones((B, HKV, L, L), jnp.bool_)
    kw = dict(scale=0.125, softcap=0.0, is_causal=True)
    with pytest.raises(ValueError, match="key_list_capacity"):
        jax.jit(lambda q, k, m: _cuda_fwd.flash_fwd(q, k, k, None, m, key_list_capacity=bad, **kw)).trace(q, k, mask)
    lse = jnp.zeros((B, H, L), jnp.float32)
    with pytest.raises(ValueError, match="key_list_capacity"):
        jax.jit(lambda q, k, m, lse: _cuda_bwd.flash_bwd(q, k, k, None, m, q, lse, q, lse, deterministic=False,
                                                          key_list_capacity=bad, **kw)).trace(q, k, mask, lse)


def test_explicit_key_list_capacity_sizes_the_lists():
    q = jnp.zeros((B, L, H, D), jnp.bfloat16)
    k = jnp.zeros((B, L, HKV, D), jnp.bfloat16)
    mask = jnp.ones((B, HKV, L, L), jnp.bool_)
    fn = jax.jit(lambda q, k, m: _cuda_fwd.flash_fwd(q, k, k, None, m, scale=0.125, softcap=0.0, is_causal=False,
                                                 key_list_capacity=128))
    text = fn.trace(q, k, mask).lower(lowering_platforms=("cuda",)).as_text()
    (kl,) = key_list_lines(text)
    n_keys, n_words = _cuda_fwd.key_list_sizes(mask.shape, 128)
    assert "capacity = 128 : i64" in kl and "is_causal = false" in kl
    assert result_types(kl) == [f"tensor<{n_keys}xi32>", f"tensor<{2 * n_words}xui32>"]


# ------------------------------------------------------------------ backward builds vs the device's shared memory
H100_SMEM, A100_SMEM = 232448, 166912


@pytest.mark.parametrize("limit,expected", [
    (H100_SMEM, {32: 128, 64: 128, 96: 128, 128: 128, 192: 64, 256: 64}),
    (A100_SMEM, {32: 128, 64: 128, 96: 128, 128: 64, 192: 0, 256: 0}),
])
def test_key_list_rows_per_cta_fit_the_device(limit, expected):
    from jax_dmattn import _cuda_bwd

    got = {d: _cuda_bwd.key_list_rows_per_cta(d, limit) for d in expected}
    assert got == expected
    for d, rows in got.items():
        if rows:
            assert _cuda_bwd.key_list_smem_bytes(d, rows) <= limit


def test_smem_limit_env_override(monkeypatch):
    from jax_dmattn import _cuda_bwd

    monkeypatch.setenv(_cuda_bwd.SMEM_ENV, str(A100_SMEM))
    assert _cuda_bwd.device_smem_limit() == A100_SMEM
    monkeypatch.delenv(_cuda_bwd.SMEM_ENV)
    assert _cuda_bwd.device_smem_limit() > 0


def backward_line(d):
    """The dmattn_bwd_cuda line of grad(attention) with a per-key bias and a full mask at head dim d."""
    q = jnp.zeros((B, L, H, d), jnp.bfloat16)
    k = jnp.zeros((B, L, HKV, d), jnp.bfloat16)
    bias = jnp.zeros((B, HKV, 1, L), jnp.bfloat16)
    mask = jnp.ones((B, HKV, L, L), jnp.bool_)

    def loss(q, k, v, b):
        out = jax_dmattn.attention(q, k, v, bias=b, mask=mask, is_causal=True, implementation="cuda")
        return out.astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(q, k, k, bias).lower(
        lowering_platforms=("cuda",)).as_text()
    lines = [ln for ln in text.splitlines() if "dmattn_bwd_cuda" in ln and "custom_call" in ln]
    assert len(lines) == 1
    return lines[0]


@pytest.mark.parametrize("limit,d,rows", [
    (H100_SMEM, 128, 128), (H100_SMEM, 256, 64), (A100_SMEM, 96, 128), (A100_SMEM, 128, 64),
    (A100_SMEM, 192, 0), (A100_SMEM, 256, 0),
])
def test_backward_build_follows_the_device_smem(monkeypatch, limit, d, rows):
    """The backward's key_list_rows attribute is the build that fits the device; none fits (0): the key-tile path,
    with its dq accumulator and no key lists."""
    from jax_dmattn import _cuda_bwd

    monkeypatch.setenv(_cuda_bwd.SMEM_ENV, str(limit))
    line = backward_line(d)
    assert int(re.search(r"key_list_rows = (\d+)", line).group(1)) == rows
    ops = operand_types(line)
    res = result_types(line)
    if rows:
        assert ops[9] != "tensor<0xi32>" and res[4] == "tensor<0xf32>"  # key lists in, no dq accumulator
    else:
        assert ops[9] == "tensor<0xi32>" and ops[10] == "tensor<0xui32>"
        assert res[4] == f"tensor<{B}x{L}x{H}x{d}xf32>"  # the key-tile path's fp32 dq accumulator


@pytest.mark.parametrize("lq, lk", [(7, 0), (0, 7)])
def test_nothing_to_compute_reaches_no_cuda_call(lq, lk):
    """Lk = 0 (rows with no key) or an empty output lowers to no CUDA call: implementation="cuda" gives the
    closed form every implementation gives (out 0, lse -inf, zero gradients), not launches over empty grids."""
    q = jnp.ones((B, lq, H, D), jnp.bfloat16)
    k = jnp.ones((B, lk, HKV, D), jnp.bfloat16)
    bias = jnp.ones((B, HKV, 1, lk), jnp.float32)

    def f(q, k, v, b):
        out, lse = jax_dmattn.attention(q, k, v, b, is_causal=True, return_lse=True, implementation="cuda")
        return out.astype(jnp.float32).sum(), (out, lse)

    fn = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True))
    assert "dmattn" not in fn.trace(q, k, k, bias).lower(lowering_platforms=("cuda",)).as_text()
    # nothing platform-specific is left, so the same call runs here
    grads, (out, lse) = fn(q, k, k, bias)
    assert out.shape == q.shape and lse.shape == (B, H, lq)
    assert not jnp.any(out) and bool(jnp.all(jnp.isneginf(lse)))
    assert all(g.shape == x.shape and not jnp.any(g) for g, x in zip(grads, (q, k, k, bias)))
    # the same lowering with keys does reach the kernels
    k = jnp.ones((B, 7, HKV, D), jnp.bfloat16)
    if lq:
        assert "dmattn_fwd_cuda" in fn.trace(q, k, k, jnp.ones((B, HKV, 1, 7))).lower(
            lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("bias_shape, mask_shape", [((B, HKV, 1, L), (B, HKV, L, L)),  # key-list path
                                                     ((B, HKV, L, L), (B, HKV, L, L)),  # key-tile path
                                                     (None, None)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_aliases_dq_to_dout(bias_shape, mask_shape, deterministic):
    """On every path dq is result 0 aliased to dout (operand DOUT_OPERAND): XLA writes dq into dout's buffer when
    dout dies at the call, so the backward holds one [B, Lq, H, D] buffer less."""
    from jax_dmattn import _cuda_bwd

    (line,) = lowered_calls(bias_shape, mask_shape, deterministic=deterministic)["dmattn_bwd_cuda"]
    alias = re.search(r"output_operand_aliases = \[(.*?)\]\s*\}", line).group(1)
    assert (f"output_tuple_indices = [0], operand_index = {_cuda_bwd.DOUT_OPERAND}, operand_tuple_indices = []"
            in alias), alias
    assert alias.count("operand_index") == 1
    assert operand_types(line)[_cuda_bwd.DOUT_OPERAND] == result_types(line)[0]


def _rule(b, lq, h, lk, hkv, d, deterministic=False):
    from jax_dmattn import _cuda_bwd

    return _cuda_bwd.key_list_accum_kv_heads(b, lq, h, lk, hkv, d, deterministic)


def test_key_list_accum_kv_heads_rule():
    """One pass while dK + dV accumulators of every kv head fit 128 MiB; else the fewest passes that fit, as long as a
    pass keeps 1024 CTAs (128-row query tiles x its query heads x batch); else the smallest such slice."""
    assert _rule(1, 16384, 16, 16384, 4, 128) == 4                       # 64 MiB: one pass (the standard case)
    assert _rule(1, 16384, 16, 16384, 4, 128, deterministic=True) == 4   # int64 counts: 128 MiB, one pass
    assert _rule(1, 131072, 16, 131072, 4, 128) == 1                     # 512 MiB: 4 passes of 128 MiB
    assert _rule(8, 4096, 32, 4096, 8, 128) == 4                         # 256 MiB: 2 passes of 128 MiB
    assert _rule(8, 4096, 32, 4096, 8, 128, deterministic=True) == 2     # twice the bytes: 4 passes
    assert _rule(8, 32768, 32, 32768, 8, 128) == 1                       # training size: 8 passes of 256 MiB
    assert _rule(1, 1024, 8, 524288, 8, 128) == 8                        # 8 query tiles: too few CTAs to split
    assert _rule(1, 16384, 16, 131072, 4, 128) == 2                      # 512 CTAs a kv head: passes of 2 heads
    assert _rule(1, 4096, 12, 4096, 6, 64) == 6                          # small: one pass
    assert _rule(2, 16384, 12, 16384, 6, 128) == 3                       # divisors of 6: 2 passes of 3 heads
    assert _rule(1, 0, 4, 0, 2, 64) == 2


def test_key_list_backward_workspace_holds_one_pass_of_kv_heads():
    """The lowered call's dK / dV accumulators have the rule's kv heads (traced from shapes: nothing allocated)."""
    b, l, h, hkv, d = 1, 65536, 16, 4, 128
    args = (jax.ShapeDtypeStruct((b, l, h, d), jnp.bfloat16), jax.ShapeDtypeStruct((b, l, hkv, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, l, hkv, d), jnp.bfloat16), jax.ShapeDtypeStruct((b, hkv, 1, l), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, hkv, l), jnp.float32))

    for deterministic in (False, True):
        def loss(q, k, v, bias, scores):
            return jax_dmattn.attention(q, k, v, bias=bias, mask=jax_dmattn.TopKMask(scores, 1024), is_causal=True,
                                        deterministic=deterministic, implementation="cuda").astype(jnp.float32).sum()

        fn = jax.grad(loss, argnums=(0, 1, 2, 3))
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        (line,) = [ln for ln in text.splitlines() if re.search(r"custom_call @dmattn_bwd_cuda\b", ln)]
        heads = _rule(b, l, h, l, hkv, d, deterministic)
        assert heads == (1 if deterministic else 2)  # 128 MiB of fp32 a pass, or 128 MiB of int64 counts
        if deterministic:
            assert result_types(line)[8] == f"tensor<{4 * b * l * heads * d + 8}xui32>"
        else:
            assert result_types(line)[8] == f"tensor<2x{b}x{l}x{heads}x{d}xf32>"
