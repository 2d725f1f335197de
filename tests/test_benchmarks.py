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
