"""benchmarks/plots.py renders the README's plots from the committed results files, so the plots cannot rot between
GPU runs: every PNG is written, non-empty and a PNG, and the row selection keeps the latest plain row per key."""

import os

import pytest

pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def plots(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    import plots

    return plots


def test_plots_from_committed_results(plots, tmp_path):
    written = plots.main(["--results", os.path.join(BENCHMARKS, "results"), "--out", str(tmp_path)])
    names = {os.path.basename(p) for p in written}
    assert names == {"time_vs_length.png", "cases_16k.png", "memory_vs_length.png", "cpu.png", "decoding.png"}
    for path in written:
        with open(path, "rb") as f:
            data = f.read()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, path
    # The README shows the committed copies of the same plots.
    for name in names:
        assert os.path.getsize(os.path.join(ROOT, "docs", "images", name)) > 10_000, name


def test_latest_plain_row_per_key(plots):
    row = dict(gpu="g", case="standard", impl="jax_dmattn", L=1024, jax=None, commit=None, date=None)
    rows = [dict(row, **{"pass": "fwd", "ms": 2.0}), dict(row, **{"pass": "fwd", "ms": 1.0}),
            dict(row, **{"pass": "fwd", "ms": 0.5, "command_buffers": "off"}),  # a side experiment
            dict(row, **{"pass": "fwd+bwd", "ms": None})]                        # no time
    table = plots.latest(rows)
    assert list(table) == [("g", "standard", "jax_dmattn", "fwd", 1024)]
    assert table[("g", "standard", "jax_dmattn", "fwd", 1024)]["ms"] == 1.0
