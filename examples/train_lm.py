"""Train a small decoder LM with dynamic-mask attention on a long-range recall task.

The task (multi-query associative recall over a long gap): each sequence starts
with ``--pairs`` key/value token pairs ``k1 v1 k2 v2 ...``, then a long stretch of
random filler tokens, then ``--queries`` of the keys again, each followed by its
value.  The model is scored on predicting the value after each query key, which
needs content lookup ``~seq_len`` tokens back.

The model: token embedding, ``--layers`` pre-norm blocks of
``jax_dmattn.flax.DynamicMaskAttention`` (RoPE on q/k, GQA) + GELU MLP with
RMSNorm, a final RMSNorm and tied output embedding.  ``--attention dense`` is
plain causal attention (no learned bias, no mask); ``--attention dynamic`` adds
the learned per-key bias ``A * softplus(dt_proj(v))`` and keeps only the
``--window-size`` highest-bias keys per query (the dynamic mask); ``both`` (the
default) trains one after the other and prints them side by side.

Outputs in ``--out-dir``: ``loss_curve.png`` (needs matplotlib), ``metrics.json``,
and an orbax checkpoint per mode (``ckpt_<mode>/``) that is restored and
re-evaluated at the end (``--resume`` continues training from it).

    python examples/train_lm.py                       # CPU: a few minutes
    python examples/train_lm.py --steps 2000 --seq-len 1024 --window-size 128   # GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn

import jax_dmattn
from jax_dmattn.flax import DynamicMaskAttention


# --------------------------------------------------------------------------
# data: multi-query associative recall with a long gap
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    seq_len: int = 256
    pairs: int = 4
    queries: int = 4
    num_keys: int = 16
    num_values: int = 16
    num_filler: int = 32

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values + self.num_filler

    def check(self):
        if self.queries > self.pairs:
            raise ValueError(f"--queries ({self.queries}) must be <= --pairs ({self.pairs})")
        if self.pairs > self.num_keys:
            raise ValueError(f"--pairs ({self.pairs}) must be <= --num-keys ({self.num_keys})")
        if 2 * (self.pairs + self.queries) + 1 > self.seq_len:
            raise ValueError(
                f"--seq-len ({self.seq_len}) is too short for {self.pairs} pairs and {self.queries} queries"
            )


def make_batch(rng: np.random.Generator, task: TaskConfig, batch: int):
    """inputs [B, L] int32, targets [B, L] int32, weights [B, L] float32 (1 on scored positions)."""
    n = task.seq_len + 1  # one extra token so inputs/targets are shifted views
    key_tok = np.argsort(rng.random((batch, task.num_keys)), axis=1)[:, : task.pairs]  # distinct keys
    val_tok = task.num_keys + rng.integers(0, task.num_values, (batch, task.pairs))
    filler0 = task.num_keys + task.num_values
    tokens = filler0 + rng.integers(0, task.num_filler, (batch, n))
    tokens[:, 0 : 2 * task.pairs : 2] = key_tok
    tokens[:, 1 : 2 * task.pairs : 2] = val_tok
    which = np.argsort(rng.random((batch, task.pairs)), axis=1)[:, : task.queries]
    q0 = n - 2 * task.queries
    rows = np.arange(batch)[:, None]
    tokens[:, q0::2] = key_tok[rows, which]
    tokens[:, q0 + 1 :: 2] = val_tok[rows, which]
    weights = np.zeros((batch, n - 1), np.float32)
    weights[:, q0::2] = 1.0  # input is a query key -> target is its value
    return (
        tokens[:, :-1].astype(np.int32),
        tokens[:, 1:].astype(np.int32),
        weights,
    )


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    mlp_ratio: int = 4
    window_size: int | None = 64
    dynamic: bool = True
    block_topk: bool = False
    block_size: int = 128
    implementation: str | None = None
    dtype: Any = jnp.float32
    decode: bool = False  # cached decoding, one token per call (examples/generate_lm.py)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        h = nn.RMSNorm(dtype=cfg.dtype, name="attn_norm")(x)
        h = DynamicMaskAttention(
            num_heads=cfg.heads,
            num_kv_heads=cfg.kv_heads,
            head_dim=cfg.d_model // cfg.heads,
            window_size=cfg.window_size if cfg.dynamic else None,
            is_causal=True,
            use_dynamic_bias=cfg.dynamic,
            use_block_topk=cfg.block_topk,
            block_q=cfg.block_size,
            block_k=cfg.block_size,
            rope_theta=10000.0,
            implementation=cfg.implementation,
            dtype=cfg.dtype,
            decode=cfg.decode,
            name="attn",
        )(h)
        x = x + h
        h = nn.RMSNorm(dtype=cfg.dtype, name="mlp_norm")(x)
        h = nn.Dense(cfg.mlp_ratio * cfg.d_model, dtype=cfg.dtype, name="mlp_in")(h)
        h = nn.Dense(cfg.d_model, dtype=cfg.dtype, name="mlp_out")(nn.gelu(h))
        return x + h


class DecoderLM(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens):
        cfg = self.cfg
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, name="embed")
        x = embed(tokens).astype(cfg.dtype)
        for i in range(cfg.layers):
            x = Block(cfg, name=f"block_{i}")(x)
        x = nn.RMSNorm(dtype=cfg.dtype, name="final_norm")(x)
        return embed.attend(x.astype(jnp.float32))


# --------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------


def _progress(total, desc, enabled=True):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # a minimal stand-in
        tqdm = None
    if tqdm is not None:
        return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)

    class _Bar:
        def __init__(self):
            self.n, self.post = 0, ""

        def update(self, k=1):
            self.n += k
            if enabled and (self.n % max(1, total // 20) == 0 or self.n == total):
                print(f"{desc}: {self.n}/{total} {self.post}", flush=True)

        def set_postfix_str(self, s):
            self.post = s

        def close(self):
            pass

    return _Bar()


def _log(bar, msg):
    write = getattr(bar, "write", None)
    (write or print)(msg)


def loss_and_metrics(params, model, inputs, targets, weights):
    logits = model.apply({"params": params}, inputs)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    denom = jnp.maximum(weights.sum(), 1.0)
    loss = (ce * weights).sum() / denom
    acc = ((jnp.argmax(logits, -1) == targets) * weights).sum() / denom
    return loss, acc


def state_initializer(model, tx, task):
    """key -> {"params", "opt_state", "step"}; jit it for a real state, eval_shape it for a restore target."""

    def init(key):
        params = model.init(key, jnp.zeros((1, task.seq_len), jnp.int32))["params"]
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    return init


def train_one(mode: str, args, task: TaskConfig) -> dict:
    cfg = model_config(args, task, dynamic=(mode == "dynamic"))
    model = DecoderLM(cfg)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup_steps=max(1, args.steps // 10), decay_steps=max(2, args.steps),
        end_value=args.lr * 0.1,
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    init = state_initializer(model, tx, task)
    state = jax.jit(init)(jax.random.key(args.seed))
    # The restore target: shapes, dtypes and the live state's shardings, so a checkpoint comes back onto the devices
    # the state lives on (orbax would otherwise pick the default backend's: the GPU even under jax.default_device).
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))

    ckpt_dir = os.path.abspath(os.path.join(args.out_dir, f"ckpt_{mode}"))
    ckptr = _checkpointer()
    if args.resume and ckptr is not None and os.path.isdir(ckpt_dir):
        state = ckptr.restore(ckpt_dir, abstract_state)
        print(f"[{mode}] resumed from {ckpt_dir} at step {int(state['step'])}")

    @jax.jit
    def train_step(state, inputs, targets, weights):
        (loss, acc), grads = jax.value_and_grad(loss_and_metrics, has_aux=True)(
            state["params"], model, inputs, targets, weights
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss, acc

    eval_fn = jax.jit(lambda p, i, t, w: loss_and_metrics(p, model, i, t, w))
    eval_rng = np.random.default_rng(10_000 + args.seed)
    eval_batches = [make_batch(eval_rng, task, args.batch_size) for _ in range(args.eval_batches)]

    def evaluate(params):
        res = [eval_fn(params, *b) for b in eval_batches]
        return float(np.mean([r[0] for r in res])), float(np.mean([r[1] for r in res]))

    rng = np.random.default_rng(args.seed + int(state["step"]))
    start = int(state["step"])
    history = {"step": [], "loss": [], "acc": [], "eval_step": [], "eval_loss": [], "eval_acc": []}
    step_times = []
    bar = _progress(args.steps - start, f"{mode:>7}", enabled=not args.quiet)
    for step in range(start, args.steps):
        batch = make_batch(rng, task, args.batch_size)
        t0 = time.perf_counter()
        state, loss, acc = train_step(state, *batch)
        loss = float(loss)  # blocks
        step_times.append(time.perf_counter() - t0)
        acc = float(acc)
        history["step"].append(step + 1)
        history["loss"].append(loss)
        history["acc"].append(acc)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            el, ea = evaluate(state["params"])
            history["eval_step"].append(step + 1)
            history["eval_loss"].append(el)
            history["eval_acc"].append(ea)
            _log(bar, f"[{mode}] step {step + 1}: eval loss {el:.4f}, recall accuracy {100 * ea:.1f}%")
        bar.set_postfix_str(f"loss {loss:.3f} acc {acc:.2f}")
        bar.update(1)
    bar.close()

    eval_loss, eval_acc = evaluate(state["params"])
    restored_ok = None
    if ckptr is not None:
        ckptr.save(ckpt_dir, state, force=True)
        ckptr.wait_until_finished()
        restored = ckptr.restore(ckpt_dir, abstract_state)  # a fresh read, then re-evaluated
        r_loss, r_acc = evaluate(restored["params"])
        restored_ok = bool(np.isclose(r_loss, eval_loss, rtol=1e-6, atol=1e-6) and r_acc == eval_acc)

    timed = step_times[min(len(step_times) - 1, 2):] if step_times else [float("nan")]
    kept = _kept_fraction(model, state["params"], eval_batches[0][0], cfg) if mode == "dynamic" else 1.0
    return {
        "mode": mode,
        "params": int(n_params),
        "window_size": cfg.window_size if cfg.dynamic else None,
        "final_train_loss": float(np.mean(history["loss"][-10:])) if history["loss"] else float("nan"),
        "eval_loss": eval_loss,
        "eval_recall_acc": eval_acc,
        "step_ms_median": 1e3 * float(np.median(timed)),
        "compile_and_first_step_s": float(step_times[0]) if step_times else float("nan"),
        "kept_key_fraction": kept,
        "checkpoint": ckpt_dir if ckptr is not None else None,
        "checkpoint_restore_matches": restored_ok,
        "history": history,
    }


def _checkpointer():
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        print("orbax-checkpoint is not installed: skipping checkpoints", file=sys.stderr)
        return None
    return ocp.StandardCheckpointer()


def _kept_fraction(model, params, inputs, cfg) -> float:
    """Fraction of the causally visible (query, key) pairs that block 0's dynamic mask keeps."""
    from jax_dmattn.flax import dynamic_mask

    l = inputs.shape[1]
    if not cfg.block_topk:
        # The element top-k keeps min(window, i + 1) keys in causal row i whatever the bias: counting them
        # avoids building the [B, Hkv, L, L] mask that the model itself never builds.
        rows = np.arange(1, l + 1)
        return float(np.minimum(rows, cfg.window_size).sum() / rows.sum())
    _, state = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))(params, inputs)
    (bias,) = state["intermediates"]["block_0"]["attn"]["dynamic_bias"]
    mask = dynamic_mask(bias, cfg.window_size, mask=None, is_causal=True, query_len=l,
                        use_block_topk=cfg.block_topk, block_q=cfg.block_size, block_k=cfg.block_size)
    if mask is None:
        return 1.0
    visible = mask.shape[0] * mask.shape[1] * l * (l + 1) / 2
    return float(jnp.sum(mask) / visible)


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the loss-curve PNG", file=sys.stderr)
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for n, r in enumerate(results):
        h, color = r["history"], f"C{n}"
        if h["loss"]:
            k = max(1, len(h["loss"]) // 50)
            smooth = np.convolve(h["loss"], np.ones(k) / k, mode="valid")
            ax1.plot(h["step"][k - 1 :], smooth, color=color, alpha=0.6, label=f"{r['mode']} (train)")
        if h["eval_loss"]:
            ax1.plot(h["eval_step"], h["eval_loss"], "o--", color=color, ms=3, label=f"{r['mode']} (eval)")
            ax2.plot(h["eval_step"], h["eval_acc"], "o-", color=color, ms=3, label=r["mode"])
    ax1.set_xlabel("step")
    ax1.set_ylabel("recall loss")
    ax1.set_yscale("log")
    ax1.legend()
    ax2.set_xlabel("step")
    ax2.set_ylabel("recall accuracy (eval)")
    ax2.set_ylim(0, 1.02)
    ax2.legend()
    fig.suptitle("decoder LM, long-gap associative recall: dense causal vs dynamic mask")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_task_and_model_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The task, model and optimiser options this script shares with generate_lm.py (which sets its own defaults)."""
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--window-size", type=int, default=64, help="keys kept per query (dynamic)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--num-keys", type=int, default=16)
    p.add_argument("--num-values", type=int, default=16)
    p.add_argument("--num-filler", type=int, default=32)
    p.add_argument("--implementation", choices=["cuda", "cpu", "xla"], default=None)
    p.add_argument("--bf16", action="store_true", help="bfloat16 activations (needed for the CUDA kernels)")
    p.add_argument("--seed", type=int, default=0)
    return p


def task_config(args) -> TaskConfig:
    task = TaskConfig(args.seq_len, args.pairs, args.queries, args.num_keys, args.num_values, args.num_filler)
    task.check()
    return task


def model_config(args, task: TaskConfig, dynamic: bool) -> ModelConfig:
    return ModelConfig(
        vocab_size=task.vocab_size,
        d_model=args.d_model,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        window_size=args.window_size,
        dynamic=dynamic,
        block_topk=getattr(args, "block_topk", False),
        block_size=getattr(args, "block_size", 128),
        implementation=args.implementation,
        dtype=jnp.bfloat16 if args.bf16 else jnp.float32,
    )


def parse_args(argv=None):
    p = add_task_and_model_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--attention", choices=["dense", "dynamic", "both"], default="both")
    p.add_argument("--out-dir", default="runs/train_lm")
    p.add_argument("--block-topk", action="store_true", help="select whole tiles (block_topk_mask)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out-dir")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    task = task_config(args)
    if args.d_model % args.heads or args.heads % args.kv_heads:
        raise SystemExit("--d-model must be divisible by --heads, and --heads by --kv-heads")
    if not args.bf16 and args.implementation is None:
        # jax_dmattn.attention would raise the same thing at the first step: say it before building anything.
        try:
            jax_dmattn.default_implementation(jnp.float32, args.d_model // args.heads)
        except ValueError:
            raise SystemExit("float32 on GPU: the CUDA kernels take bf16/f16; pass --bf16, or --implementation xla "
                             "for the pure-jnp reference (O(L^2) memory)") from None
    os.makedirs(args.out_dir, exist_ok=True)
    modes = ["dense", "dynamic"] if args.attention == "both" else [args.attention]
    print(
        f"task: {task.pairs} key/value pairs at the start, {task.queries} queries at the end of "
        f"{task.seq_len} tokens (gap >= {task.seq_len - 2 * (task.pairs + task.queries)}), "
        f"vocab {task.vocab_size}; device: {jax.devices()[0].device_kind}"
    )
    results = [train_one(mode, args, task) for mode in modes]

    # side-by-side report
    header = f"{'':24}" + "".join(f"{r['mode']:>14}" for r in results)
    rows = [
        ("parameters", lambda r: f"{r['params']:,}"),
        ("window (keys/query)", lambda r: "all" if r["window_size"] is None else str(r["window_size"])),
        ("train loss (last 10)", lambda r: f"{r['final_train_loss']:.4f}"),
        ("eval loss", lambda r: f"{r['eval_loss']:.4f}"),
        ("eval recall accuracy", lambda r: f"{100 * r['eval_recall_acc']:.1f}%"),
        ("kept (q, k) pairs", lambda r: f"{100 * r['kept_key_fraction']:.1f}%"),
        ("step time (median ms)", lambda r: f"{r['step_ms_median']:.1f}"),
        ("compile+1st step (s)", lambda r: f"{r['compile_and_first_step_s']:.1f}"),
        ("checkpoint restored", lambda r: {None: "skipped", True: "ok", False: "MISMATCH"}[r["checkpoint_restore_matches"]]),
    ]
    print()
    print(header)
    for name, fmt in rows:
        print(f"{name:24}" + "".join(f"{fmt(r):>14}" for r in results))
    chance = 1.0 / task.num_values
    print(f"(chance recall accuracy: {100 * chance:.1f}%)")
    by_mode = {r["mode"]: r for r in results}
    summary = {}
    if "dense" in by_mode and "dynamic" in by_mode:
        dyn, dense = by_mode["dynamic"]["step_ms_median"], by_mode["dense"]["step_ms_median"]
        summary = {"dynamic_step_ms": dyn, "dense_step_ms": dense, "dynamic_over_dense": dyn / dense}
        print(f"training step (median, first 2 steps excluded): dynamic {dyn:.1f} ms, dense {dense:.1f} ms, "
              f"dynamic / dense = {dyn / dense:.2f}x")

    with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
        json.dump({"args": vars(args), "summary": summary, "results": results}, f, indent=1)
    if not args.no_plot:
        path = plot(results, os.path.join(args.out_dir, "loss_curve.png"))
        if path:
            print(f"loss curve: {path}")
    print(f"metrics: {os.path.join(args.out_dir, 'metrics.json')}")
    return results


if __name__ == "__main__":
    main()
