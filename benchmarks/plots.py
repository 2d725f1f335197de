"""The README's performance plots, rendered from the results files (benchmarks/results/*.json).

    python benchmarks/plots.py [--results benchmarks/results] [--out docs/images]

Writes five PNGs into --out:
  time_vs_length.png    median time against L (log-log) for the cases standard (bool top-k mask) and topk_compact
                        (the same mask as a TopKMask): jax_dmattn, cudnn_bias, cudnn_nobias; fwd and fwd+bwd panels
  cases_16k.png         every GPU case of BAR_CASES at L = 16K: jax_dmattn (and its deterministic backward) against
                        cuDNN with the bias and mask folded into one bias, and cuDNN without bias or mask
  memory_vs_length.png  XLA's compiled peak memory (peak_bytes) against L, same series as the time plot, with the
                        inputs + outputs every implementation holds (io_bytes) where the rows record it
  cpu.png               the CPU kernels against the pure-jnp reference (cpu.json): time and peak memory against L
  decoding.png          the decoding steps (DECODE_BARS: one query row, forward): jax_dmattn against cuDNN without
                        bias or mask, each bar labelled with the bytes the step must read over its time (read_gbps)

Rows: a row is plotted when it has a time (ms) and no field beyond the results writer's own (a row with e.g.
command_buffers or peak_ratio belongs to a side experiment). Where a results file holds several rows of one
(gpu, case, impl, pass, L), the last one counts: files are in run order, so that is the latest run.

GPUs: each series is drawn from the first GPU of PREFERRED_GPUS that has it (then any other GPU, by name); where
another GPU has lengths the first one lacks, that GPU's series is drawn too. Line style and marker say the GPU
(H200 solid with circles, H100 dashed with squares), and every series is labelled with it; and every title names the GPUs, jax versions and commits of the rows it plots ("not recorded" where
the rows have none).
"""
from __future__ import annotations

import argparse
import glob
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
OUT_DIR = os.path.join(os.path.dirname(HERE), "docs", "images")

PREFERRED_GPUS = ("NVIDIA H200", "NVIDIA H100 80GB HBM3")
SHORT_GPU = {"NVIDIA H200": "H200", "NVIDIA H100 80GB HBM3": "H100"}
# (line style, marker) per GPU, the same in every plot; other GPUs get the last one.
GPU_STYLES = {"NVIDIA H200": ("-", "o"), "NVIDIA H100 80GB HBM3": ("--", "s")}
OTHER_GPU_STYLE = (":", "^")
# The fields the results writer (benchmarks/common.py, bench_cpu.py) puts in a row; anything else marks a variant.
ROW_FIELDS = {"gpu", "case", "impl", "pass", "L", "ms", "tflops", "gflops", "peak_bytes", "io_bytes",
              "device_peak_bytes", "device_peak_increase", "jax", "commit", "date", "device", "cores", "read_gbps"}
LENGTH_CASES = ("standard", "topk_compact")
PASSES = ("fwd", "fwd+bwd")
SERIES_IMPLS = ("jax_dmattn", "cudnn_bias", "cudnn_nobias")
# block_sparse_1/4 is not among them: its only 16K rows are from kernels this package no longer has.
BAR_CASES = ("standard", "paper", "block_sparse_1/16", "dense_mask", "topk_compact", "plain", "bias_only")
BAR_IMPLS = ("jax_dmattn", "jax_dmattn_det", "cudnn_bias", "cudnn_nobias")
BAR_L = 16384
# (case, L) of the decoding plot, in its order.
DECODE_BARS = (("decode", 65536), ("decode", 524288), ("decode_ragged", 65536), ("decode_ragged", 524288),
               ("decode_topk", 65536), ("decode_topk_compact", 65536), ("decode_topk_compact_1m", 1048576))
DECODE_IMPLS = ("jax_dmattn", "cudnn_nobias")
LABELS = {
    "jax_dmattn": "jax_dmattn",
    "jax_dmattn_det": "jax_dmattn, deterministic=True",
    "cudnn_bias": "cuDNN, bias + mask folded into one bias",
    "cudnn_nobias": "cuDNN, no bias, no mask",
    "cpu": "jax_dmattn CPU kernels",
    "xla": "reference (implementation='xla')",
}
COLORS = {"jax_dmattn": "tab:blue", "jax_dmattn_det": "tab:cyan", "cudnn_bias": "tab:red", "cudnn_nobias": "tab:gray",
          "cpu": "tab:blue", "xla": "tab:red"}
CASE_TITLES = {
    "standard": "standard: bool top-k mask [1, 4, L, L]",
    "topk_compact": "topk_compact: the same mask as TopKMask",
}
GIB = 2.0 ** 30


def load_rows(results_dir: str) -> list[dict]:
    """Every row of every results file, in file order."""
    rows = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            rows.extend(json.load(f))
    return rows


def latest(rows: list[dict]) -> dict[tuple, dict]:
    """(gpu, case, impl, pass, L) -> the last timed, plain row of that key."""
    out = {}
    for r in rows:
        if r.get("ms") is None or set(r) - ROW_FIELDS:
            continue
        out[(r["gpu"], r["case"], r["impl"], r["pass"], r["L"])] = r
    return out


def gpu_order(gpus) -> list[str]:
    gpus = set(gpus)
    return [g for g in PREFERRED_GPUS if g in gpus] + sorted(gpus - set(PREFERRED_GPUS))


def short(gpu: str) -> str:
    return SHORT_GPU.get(gpu, gpu)


def series(table, case, impl, pas, value="ms"):
    """[(gpu, [(L, row)...])]: the preferred GPU's series, then other GPUs' where they add lengths."""
    by_gpu = {}
    for (gpu, c, i, p, length), r in table.items():
        if (c, i, p) == (case, impl, pas) and r.get(value) is not None:
            by_gpu.setdefault(gpu, []).append((length, r))
    out, seen = [], set()
    for n, gpu in enumerate(gpu_order(by_gpu)):
        points = sorted(by_gpu[gpu], key=lambda x: x[0])
        lengths = {length for length, _ in points}
        if n == 0 or lengths - seen:
            out.append((gpu, points))
            seen |= lengths
    return out


def provenance(rows) -> str:
    """'H200: jax 0.11.2, commits 3bf9880, ab3ce31; H100: jax / commit not recorded' for the rows plotted."""
    by_gpu = {}
    for r in rows:
        jaxes, commits = by_gpu.setdefault(r["gpu"], (set(), set()))
        jaxes.add(r.get("jax"))
        commits.add(r.get("commit"))
    parts = []
    for gpu in gpu_order(by_gpu):
        jaxes, commits = by_gpu[gpu]
        jax_s = ", ".join(sorted(j for j in jaxes if j)) or "not recorded"
        commit_s = ", ".join(sorted(c for c in commits if c)) or "not recorded"
        if None in jaxes and jaxes != {None}:
            jax_s += " (some rows: not recorded)"
        if None in commits and commits != {None}:
            commit_s += " (some rows: not recorded)"
        label = "commit" if len(commits - {None}) <= 1 else "commits"
        parts.append(f"{gpu}: jax {jax_s}; {label} {commit_s}")
    return "\n".join(parts)


def _length_label(length: int) -> str:
    if length >= 1 << 20 and length % (1 << 20) == 0:
        return f"{length >> 20}M"
    return f"{length // 1024}K" if length >= 1024 and length % 1024 == 0 else str(length)


def _log_length_axis(ax, lengths):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted(set(lengths))
    ax.set_xticks(ticks)
    ax.set_xticklabels([_length_label(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("sequence length L (Lq = Lk)")
    ax.grid(True, which="major", alpha=0.3)


def _length_figure(table, value, ylabel, title, path, io_line=False):
    fig, axes = plt.subplots(len(LENGTH_CASES), len(PASSES), figsize=(12, 9), squeeze=False)
    plotted = []
    for row_i, case in enumerate(LENGTH_CASES):
        for col_i, pas in enumerate(PASSES):
            ax = axes[row_i][col_i]
            lengths = []
            for impl in SERIES_IMPLS:
                for gpu, points in series(table, case, impl, pas, value):
                    xs = [length for length, _ in points]
                    ys = [r[value] / (GIB if value != "ms" else 1.0) for _, r in points]
                    style, marker = GPU_STYLES.get(gpu, OTHER_GPU_STYLE)
                    ax.plot(xs, ys, marker=marker, linestyle=style, color=COLORS[impl],
                            label=f"{LABELS[impl]} ({short(gpu)})")
                    lengths += xs
                    plotted += [r for _, r in points]
                    if io_line and impl == "jax_dmattn":
                        io = [(length, r["io_bytes"] / GIB) for length, r in points if r.get("io_bytes")]
                        if io:
                            ax.plot([x for x, _ in io], [y for _, y in io], linestyle=":", marker=marker,
                                    color="black", label=f"inputs + outputs ({short(gpu)})")
            ax.set_title(f"{CASE_TITLES.get(case, case)}, {pas}", fontsize=10)
            ax.set_ylabel(ylabel)
            if lengths:
                _log_length_axis(ax, lengths)
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{title}\n{provenance(plotted)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_time_vs_length(table, path):
    _length_figure(table, "ms", "median time (ms)",
                   "jax_dmattn against cuDNN: bf16, causal, B=1, H=16, Hkv=4, D=128, per-key bias, top-1024 mask",
                   path)


def plot_memory_vs_length(table, path):
    _length_figure(table, "peak_bytes", "compiled peak memory (GiB)",
                   "XLA compiled peak memory: bf16, causal, B=1, H=16, Hkv=4, D=128, per-key bias, top-1024 mask",
                   path, io_line=True)


def _bar_gpu(table, case) -> str | None:
    """The GPU with the most rows of the case at BAR_L (ties: PREFERRED_GPUS order)."""
    counts = {}
    for (gpu, c, impl, _, length) in table:
        if c == case and length == BAR_L and impl in BAR_IMPLS:
            counts[gpu] = counts.get(gpu, 0) + 1
    if not counts:
        return None
    order = gpu_order(counts)
    return max(order, key=lambda g: (counts[g], -order.index(g)))


def plot_cases_16k(table, path):
    fig, axes = plt.subplots(1, len(PASSES), figsize=(13, 5.5), squeeze=False)
    plotted = []
    cases = [(case, _bar_gpu(table, case)) for case in BAR_CASES]
    cases = [(c, g) for c, g in cases if g is not None]
    for ax, pas in zip(axes[0], PASSES):
        impls = [impl for impl in BAR_IMPLS if any((gpu, case, impl, pas, BAR_L) in table for case, gpu in cases)]
        width = 0.8 / max(len(impls), 1)
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, (case, gpu) in enumerate(cases):
                r = table.get((gpu, case, impl, pas, BAR_L))
                if r is not None:
                    xs.append(i + (j - (len(impls) - 1) / 2) * width)
                    ys.append(r["ms"])
                    plotted.append(r)
            bars = ax.bar(xs, ys, width=width, color=COLORS[impl], label=LABELS[impl])
            ax.bar_label(bars, labels=[f"{y:#.3g}".rstrip(".") for y in ys], fontsize=6, rotation=90, padding=2)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{case}\n({short(gpu)})" for case, gpu in cases], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{pas}, L = {_length_label(BAR_L)}", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi * 4)  # room for the value labels
    fig.suptitle("Every case at L = 16K (bf16, causal, B=1; shapes and masks: benchmarks/common.py)\n"
                 + provenance(plotted), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cpu(table, path):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), squeeze=False)
    plotted = []
    for ax, value, ylabel in ((axes[0][0], "ms", "median time (ms)"),
                              (axes[0][1], "peak_bytes", "peak resident memory above the inputs (MiB)")):
        lengths = []
        for impl in ("cpu", "xla"):
            for pas, style, marker in (("fwd", "--", "^"), ("fwd+bwd", "-", "o")):
                for _, points in series(table, "cpu_standard", impl, pas, value):
                    xs = [length for length, _ in points]
                    ys = [r[value] / (2.0 ** 20 if value != "ms" else 1.0) for _, r in points]
                    ax.plot(xs, ys, marker=marker, linestyle=style, color=COLORS[impl], label=f"{LABELS[impl]}, {pas}")
                    lengths += xs
                    plotted += [r for _, r in points]
        ax.set_ylabel(ylabel)
        if lengths:
            _log_length_axis(ax, lengths)
            ax.legend(fontsize=7)
    devices = sorted({f"{r.get('device') or r['gpu']}, {r['cores']} cores" if r.get("cores") else
                      str(r.get("device") or r["gpu"]) for r in plotted})
    fig.suptitle("CPU kernels against the reference: float32, causal, B=1, H=8, Hkv=2, D=64, per-key bias ("
                 + "; ".join(devices) + ")\n" + provenance(plotted).replace("cpu: ", ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_decoding(table, path):
    gpus = gpu_order({gpu for (gpu, case, impl, pas, length) in table
                      if (case, length) in DECODE_BARS and impl in DECODE_IMPLS and pas == "fwd"})
    fig, ax = plt.subplots(figsize=(12, 5))
    plotted = []
    bars = [(case, length) for case, length in DECODE_BARS
            if gpus and (gpus[0], case, "jax_dmattn", "fwd", length) in table]
    width = 0.8 / len(DECODE_IMPLS)
    for j, impl in enumerate(DECODE_IMPLS):
        xs, ys, labels = [], [], []
        for i, (case, length) in enumerate(bars):
            r = table.get((gpus[0], case, impl, "fwd", length))
            if r is not None:
                xs.append(i + (j - (len(DECODE_IMPLS) - 1) / 2) * width)
                ys.append(r["ms"])
                rate = f"\n{r['read_gbps'] / 1000:.2f} TB/s" if r.get("read_gbps") else ""
                labels.append(f"{r['ms']:#.3g}".rstrip(".") + rate)
                plotted.append(r)
        drawn = ax.bar(xs, ys, width=width, color=COLORS[impl], label=LABELS[impl])
        ax.bar_label(drawn, labels=labels, fontsize=7, padding=2)
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([f"{case}\nL = {_length_label(length)}" for case, length in bars], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median time (ms)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 3)  # room for the value labels
    fig.suptitle("Decoding steps, forward (bf16, one query row, B=8, H=32, Hkv=8, D=128; _1m: B=1; shapes and "
                 "masks: benchmarks/common.py)\nlabels: ms, and the bytes the step must read (kept K / V rows, bias "
                 "entries) over that time\n" + provenance(plotted), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=RESULTS_DIR, help="folder of results JSON files")
    parser.add_argument("--out", default=OUT_DIR, help="folder the PNGs are written to")
    args = parser.parse_args(argv)
    table = latest(load_rows(args.results))
    os.makedirs(args.out, exist_ok=True)
    written = []
    for name, plot in (("time_vs_length.png", plot_time_vs_length), ("cases_16k.png", plot_cases_16k),
                       ("memory_vs_length.png", plot_memory_vs_length), ("cpu.png", plot_cpu),
                       ("decoding.png", plot_decoding)):
        path = os.path.join(args.out, name)
        plot(table, path)
        written.append(path)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
