"""The benchmark toolkit (benchmarks/common.py, jax_dmattn._timing) runs end to end on CPU: bench_attention's CLI
on a tiny length appends rows that carry their provenance to the results file."""

import json
import os

import jax
import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def bench_attention(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)  # the scripts import common.py as a sibling
    import bench_attention

    return bench_attention


def test_bench_attention_cpu_rows(bench_attention, tmp_path, monkeypatch):
    monkeypatch.setenv("DMATTN_BENCH_COMMIT", "abc1234")
    out = tmp_path / "results.json"
    earlier = {"gpu": "cpu", "case": "paper", "impl": "jax_dmattn", "pass": "fwd", "L": 64, "ms": 1.0}
    out.write_text(json.dumps([earlier]))
    # implementation="cpu" needs its operands on the CPU device, also on a GPU host.
    with jax.default_device(jax.devices("cpu")[0]):
        bench_attention.main(["--cases", "paper", "--lengths", "128", "--impls", "jax_dmattn,reference",
                              "--passes", "fwd,fwd+bwd,bwd", "--implementation", "cpu", "--out", str(out)])
    earlier_row, *rows = json.loads(out.read_text())
    assert earlier_row == earlier  # a run appends to the device's file
    assert {(r["impl"], r["pass"]) for r in rows} == {
        ("jax_dmattn", "fwd"), ("jax_dmattn", "fwd+bwd"), ("jax_dmattn", "bwd"),
        ("reference", "fwd"), ("reference", "fwd+bwd")}  # no backward alone for the reference
    for r in rows:
        assert "error" not in r, r
        assert r["case"] == "paper" and r["L"] == 128
        assert isinstance(r["gpu"], str) and r["gpu"]
        assert r["jax"] == jax.__version__ and r["commit"] == "abc1234" and len(r["date"]) == len("2026-01-01")
        assert r["ms"] > 0 and r["peak_bytes"] > 0 and r["io_bytes"] > 0


def test_decode_cases_time_one_query_row(bench_attention, tmp_path, monkeypatch):
    """The decode cases: one query row against L keys, forward rows only, with the bytes-read rate; the bool and the
    compact top-k masks keep the same keys."""
    import common

    monkeypatch.setenv("DMATTN_BENCH_COMMIT", "abc1234")
    q, k, _, bias, mask = common.input_shapes("decode_topk", 4096)
    assert q.shape == (8, 1, 32, 128) and k.shape == (8, 4096, 8, 128)
    assert bias.shape == (8, 8, 1, 4096) and mask.shape == (8, 8, 1, 4096)
    inputs = common.make_inputs("decode_topk", 4096)
    compact = common.make_inputs("decode_topk_compact", 4096)[4]
    assert (inputs[4].sum(axis=-1) == 2048).all()
    assert (common.bool_mask(compact, "decode_topk_compact", 4096) == inputs[4]).all()
    assert common.read_bytes("decode", 4096) == 8 * 8 * 4096 * 2 * 128 * 2
    assert common.read_bytes("decode_topk", 4096) == 8 * 8 * 2048 * (2 * 128 + 1) * 2
    assert common.read_bytes("decode_topk_compact_1m", 1 << 20) == 8 * 2048 * (2 * 128 + 1) * 2
    assert common.input_shapes("decode_topk_compact_1m", 1 << 20)[1].shape == (1, 1 << 20, 8, 128)
    assert common.read_bytes("standard", 4096) is None

    out = tmp_path / "results.json"
    with jax.default_device(jax.devices("cpu")[0]):
        bench_attention.main(["--cases", "decode,decode_topk_compact", "--lengths", "512", "--impls",
                              "jax_dmattn,reference", "--passes", "fwd,fwd+bwd", "--implementation", "cpu",
                              "--out", str(out)])
    rows = json.loads(out.read_text())
    assert {(r["case"], r["impl"], r["pass"]) for r in rows} == {
        (c, i, "fwd") for c in ("decode", "decode_topk_compact") for i in ("jax_dmattn", "reference")}
    for r in rows:
        assert "error" not in r, r
        rate = common.read_bytes(r["case"], 512) / (r["ms"] * 1e-3) / 1e9
        assert abs(r["read_gbps"] - rate) <= 0.05 + 1e-3 * rate, (r["read_gbps"], rate)


def test_sequence_cases(bench_attention, tmp_path, monkeypatch):
    """packed_docs, sliding_window and decode_ragged pass their segment ids, window and key lengths to attention()
    (the flop and byte counts follow what they keep) and time on the CPU kernels."""
    import common

    monkeypatch.setenv("DMATTN_BENCH_COMMIT", "abc1234")
    kw = common.sequence_kwargs("packed_docs", 1024)
    assert kw["q_segment_ids"].shape == (1, 1024) and int(kw["q_segment_ids"].max()) == 7
    assert common.sequence_kwargs("sliding_window", 1024) == {"local_window_size": (4096, 0)}
    assert common.ragged_lengths("decode_ragged", 800).tolist() == [100, 200, 300, 400, 500, 600, 700, 800]
    assert common.read_bytes("decode_ragged", 800) == 8 * 8 * 450 * 2 * 128 * 2
    # the ragged top-2048 step reads min(2048, its length) keys of each element, and their bias entries
    kept = sum(min(2048, x) for x in common.ragged_lengths("decode_topk_compact_ragged", 8000).tolist()) / 8
    assert common.read_bytes("decode_topk_compact_ragged", 8000) == 8 * 8 * kept * (2 * 128 * 2 + 2)
    assert common.flops("packed_docs", "fwd", 1024) == 4.0 * 16 * 1024 * 64 * 128
    out = tmp_path / "results.json"
    with jax.default_device(jax.devices("cpu")[0]):
        bench_attention.main(["--cases", "packed_docs,decode_ragged,decode_topk_compact_ragged", "--lengths", "512",
                              "--impls", "jax_dmattn", "--passes", "fwd", "--implementation", "cpu", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert {r["case"] for r in rows} == {"packed_docs", "decode_ragged", "decode_topk_compact_ragged"}
    assert all("error" not in r and r["ms"] > 0 for r in rows), rows


def test_rowwise_topk_rows_keep_different_keys(bench_attention):
    """rowwise_topk's mask is the top-k of each row of a full bias: every row with k visible keys keeps exactly k,
    the rows of one head keep different keys (what a per-key bias's mask never does off its causal ramp), and the
    kept keys are the row's largest bias entries."""
    import common
    import jax.numpy as jnp

    l, k = 2048, common.window("rowwise_topk")
    with jax.default_device(jax.devices("cpu")[0]):
        q, key, v, bias, mask = common.make_inputs("rowwise_topk", l)
    assert bias.shape == (1, 4, l, l) and mask.shape == (1, 4, l, l) and mask.dtype == jnp.bool_
    counts = mask.sum(-1)
    rows = jnp.arange(l)
    assert bool(jnp.all(counts == jnp.minimum(rows + 1, k)))  # causal: row i sees i + 1 keys
    assert bool(jnp.any(mask[0, 0, l - 1] != mask[0, 0, l - 2]))
    b = bias[0, 0, l - 1].astype(jnp.float32)
    assert float(b[mask[0, 0, l - 1]].min()) >= float(b[~mask[0, 0, l - 1]].max())
    assert common.CASES["plain_d256"]["d"] == 256 and common.input_shapes("plain_d256", 64)[0].shape[-1] == 256
