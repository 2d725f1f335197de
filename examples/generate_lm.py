"""Greedy generation with cached decoding from the small LM of ``train_lm.py``.

Trains the dynamic-mask model of ``train_lm.py`` briefly on its recall task, then, for a batch of fresh sequences
(key/value pairs, filler, query keys), generates the value after each query key greedily, feeding the sequence one
token per call through the layers' KV caches (``DynamicMaskAttention(decode=True)``: cached keys, values and per-key bias,
the top-k recomputed over the filled slots at every step). It checks that cached decoding reproduces full
recomputation: the logits of every cached step against those of the whole sequence in one causal call, and the
greedy tokens against greedy decoding by full recomputation; then reports how many query values it recalled.

    python examples/generate_lm.py                 # CPU: about a minute
    python examples/generate_lm.py --steps 600     # a better-trained model recalls more
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_lm import (  # noqa: E402
    DecoderLM, add_task_and_model_args, loss_and_metrics, make_batch, model_config, task_config,
)


def parse_args(argv=None):
    p = add_task_and_model_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    # A shorter task than train_lm.py's, so that a brief training already recalls something.
    p.set_defaults(steps=200, seq_len=64, window_size=16, pairs=3, queries=3, num_keys=8, num_values=8,
                   num_filler=16)
    return p.parse_args(argv)


def train(model, task, args):
    params = model.init(jax.random.key(args.seed), jnp.zeros((1, task.seq_len), jnp.int32))["params"]
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(args.lr, weight_decay=0.01))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, inputs, targets, weights):
        (loss, _), grads = jax.value_and_grad(loss_and_metrics, has_aux=True)(params, model, inputs, targets,
                                                                              weights)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    loss = float("nan")
    for _ in range(args.steps):
        params, opt_state, loss = step(params, opt_state, *make_batch(rng, task, args.batch_size))
    return params, float(loss)


def main(argv=None) -> dict:
    args = parse_args(argv)
    task = task_config(args)
    cfg = model_config(args, task, dynamic=True)
    model = DecoderLM(cfg)
    decoder = DecoderLM(dataclasses.replace(cfg, decode=True))

    t0 = time.perf_counter()
    params, loss = train(model, task, args)
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.1f} s, last loss {loss:.3f}")

    # Fresh sequences; the model generates the value after each query key (the rest is given, as a prompt would be).
    inputs, targets, weights = make_batch(np.random.default_rng(10_000 + args.seed), task, args.batch_size)
    seq = np.concatenate([inputs, targets[:, -1:]], axis=1)  # all seq_len + 1 tokens
    n = seq.shape[1]
    values = np.flatnonzero(weights[0] > 0) + 1  # positions of the answers (the same in every row)
    tokens = seq.copy()
    tokens[:, values] = 0

    # Cached decoding: the cache is sized by an init call on a full-length input, then one token per call.
    cache = decoder.init(jax.random.key(0), jnp.zeros((args.batch_size, n), jnp.int32))["cache"]
    step = jax.jit(lambda cache, tok: decoder.apply({"params": params, "cache": cache}, tok, mutable=["cache"]))
    step_logits = []
    t0 = time.perf_counter()
    for t in range(n - 1):
        logits, upd = step(cache, jnp.asarray(tokens[:, t:t + 1]))
        cache = upd["cache"]
        step_logits.append(np.asarray(logits[:, 0], np.float32))
        if t + 1 in values:  # greedy
            tokens[:, t + 1] = np.argmax(step_logits[-1], axis=-1)
    decode_s = time.perf_counter() - t0
    step_logits = np.stack(step_logits, axis=1)  # [B, n - 1, vocab]: the predictions of positions 1 .. n - 1

    # Full recomputation: the whole sequence in one causal call, and greedy decoding by recomputing every answer.
    full = jax.jit(lambda toks: model.apply({"params": params}, toks))
    full_logits = np.asarray(full(jnp.asarray(tokens[:, :-1])), np.float32)
    max_diff = float(np.abs(step_logits - full_logits).max())
    scale = float(np.abs(full_logits).max())
    recomputed = seq.copy()
    recomputed[:, values] = 0
    for p in values:
        recomputed[:, p] = np.argmax(np.asarray(full(jnp.asarray(recomputed[:, :-1])), np.float32)[:, p - 1], axis=-1)
    same_tokens = bool((recomputed == tokens).all())
    recall = float((tokens[:, values] == seq[:, values]).mean())
    tol = 1e-2 if args.bf16 else 1e-4
    print(f"cached decoding: {n - 1} steps in {decode_s:.2f} s; largest logit difference to full recomputation "
          f"{max_diff:.2e} (logits up to {scale:.1f}); greedy tokens equal to recomputation's: {same_tokens}")
    print(f"recalled {100 * recall:.1f}% of the query values (chance {100 / task.num_values:.1f}%)")
    ok = max_diff <= tol * max(1.0, scale) and same_tokens
    if not ok:
        raise SystemExit("cached decoding does not match full recomputation")
    return {"max_logit_diff": max_diff, "same_tokens": same_tokens, "recall": recall, "loss": loss}


if __name__ == "__main__":
    main()
