"""Context parallelism: attention over a sequence split across the devices of one mesh axis, inside shard_map.

Device ``i`` of axis ``axis_name`` (n devices) holds query chunk ``i`` and key/value chunk ``i`` of the
sequence (``[B, L / n, ...]`` each). Two strategies compute its rows' attention over every key:

- ``"ring"``: the key/value chunks (and the operands that travel with keys: a per-key bias or mask) pass around
  the ring with ``jax.lax.ppermute``, one chunk per step; no device ever holds more than two chunks of K/V.
- ``"all_gather"``: every device gathers all of K/V once (``jax.lax.all_gather``) and walks the chunks locally;
  one collective instead of n - 1, at the memory of the whole K/V (fine with few kv heads).

Each step is one call of the kernels on a (query chunk, key chunk) pair, combined exactly through the log-sum-exp.
With ``is_causal`` (self-attention: equal global query and key lengths, equal chunks) a pair above the diagonal
is skipped, the diagonal pair is causal and a pair below it has no mask. KeyIndices (global key positions) stay
with their query rows; each pair keeps the indices inside its key part, renumbered from the part's start. Row
bounds (segment ids, a window, sequence lengths) likewise: each row's key range, built over the whole sequence,
stays with it, the key segment ids travel with their chunk, and each pair clips the ranges to its keys; a
compact mask with bounds becomes KeyIndices that hold them (compact_operands). The
backward walks the ring again: dq stays, dk / dv (and the gradient of a travelling bias) travel with their chunk
and end on the device that owns it; each step calls the backward kernel with the rows' global output and
log-sum-exp, which makes its partial gradients exact (docs/distributed.md, "Context parallelism").
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

from jax_dmattn import _bounds, _compact, _partials, _primitives, _validation, masks
from jax_dmattn.attention import default_implementation, kernel_operands

__all__ = ["attention", "from_zigzag", "to_zigzag"]

STRATEGIES = ("ring", "all_gather")
CHUNK_ORDERS = ("contiguous", "zigzag")


def _zigzag_halves(n: int):
    """The sequence halves (of 2n) in zigzag order: device d's chunk is halves d and 2n - 1 - d."""
    return [h for d in range(n) for h in (d, 2 * n - 1 - d)]


def _reorder_halves(caller: str, x, n: int, axis: int, order):
    """x's sequence axis cut into 2n halves and put back in ``order`` (a permutation of the halves)."""
    length = x.shape[axis]
    if length % (2 * n):
        raise ValueError(f"{caller}: the sequence length {length} is not a multiple of 2 * {n}")
    halves = jnp.split(x, 2 * n, axis=axis)
    return jnp.concatenate([halves[h] for h in order], axis=axis)


def to_zigzag(x, n: int, axis: int = 1):
    """x with its sequence axis reordered so that splitting it into n contiguous chunks gives device d the
    sequence halves d and 2n - 1 - d (``chunk_order="zigzag"``): under a causal mask every device then has the
    same work. The length must be a multiple of 2n. Apply to q, k, v and to the sequence dims of bias / mask."""
    return _reorder_halves("to_zigzag", x, n, axis, _zigzag_halves(n))


def from_zigzag(x, n: int, axis: int = 1):
    """The inverse of :func:`to_zigzag` (e.g. for the output)."""
    zigzag = _zigzag_halves(n)
    return _reorder_halves("from_zigzag", x, n, axis, [zigzag.index(h) for h in range(2 * n)])


class _Layout(NamedTuple):
    """Static facts of one call, decided while tracing."""
    n: int                   # devices on the axis
    axis_name: object
    strategy: str
    config: _primitives.KernelConfig  # is_causal: the diagonal pair's; other pairs have no causal mask
    bias_keys: str | None    # how the bias's key dim is laid out: "one", "chunk" (travels), "full" (sliced)
    mask_keys: str | None    # the same, or "indices": KeyIndices of global key positions, localised per pair
    chunk: int               # keys per chunk
    zigzag: bool             # each chunk is two half-chunks of the sequence: i and 2n - 1 - i


def _key_layout(name: str, x, chunk: int, n: int) -> str | None:
    if x is None:
        return None
    nk = x.shape[3]
    if nk == 1 and chunk != 1:
        return "one"
    if nk == chunk:
        return "chunk"
    if nk == n * chunk:
        return "full"
    raise ValueError(f"{name}'s key dim must be 1, the local key chunk ({chunk}) or the whole key length "
                     f"({n * chunk}), got {nk}")


def _rank4(name: str, x, dims):
    """A bias / mask as the kernels take it, rank 4 with broadcast dims of size 1, checked against the local
    query chunk; its key dim (the local chunk or all keys) is checked by _key_layout."""
    if x is None:
        return None
    x = jnp.asarray(x)
    return _validation._normalize_broadcast(name, x, tuple(dims) + (x.shape[-1] if x.ndim else 1,))


def _slice_keys(x, layout: str | None, j, chunk: int):
    """The part of x for key chunk j: a "full" operand is sliced, the others are already that chunk."""
    if layout != "full":
        return x
    return lax.dynamic_slice_in_dim(x, j * chunk, chunk, axis=3)


def _pair_kind(i, j, causal: bool, pair_rows=None, pair_indices=None):
    """0: no mask from causality, 1: the diagonal (causal), 2: nothing visible (skipped). With row bounds (the
    pair's clipped ``pair_rows``, _pair_bounds) the bounds decide alone: they hold causality relative to each batch
    element's own lengths, which may reach above the global diagonal, and a pair that none of its rows' ranges
    reaches (another document, outside every window) is skipped. A pair whose localised KeyIndices
    (``pair_indices``) hold no key is skipped too."""
    if pair_rows is not None:
        kind = jnp.where(jnp.any(pair_rows[..., 1] > pair_rows[..., 0]), 0, 2)
    elif causal:
        kind = jnp.where(i == j, 1, jnp.where(j > i, 2, 0))
    else:
        kind = jnp.zeros((), jnp.int32)
    if pair_indices is not None:
        kind = jnp.where(jnp.any(pair_indices != _compact.INDEX_PAD), kind, 2)
    return kind.astype(jnp.int32)


def _parts(layout: _Layout, device, length: int):
    """The parts of a device's chunk of ``length`` rows or keys as (slice along the chunk, index of the part in
    the sequence, in parts): the whole chunk (contiguous), or its two halves, sequence halves d and 2n - 1 - d
    (zigzag)."""
    if not layout.zigzag:
        return ((slice(0, length), device),)
    h = length // 2
    return ((slice(0, h), device), (slice(h, length), 2 * layout.n - 1 - device))


def _sub(x, dim: int, part: slice):
    """x's part along dim, unless x is absent or broadcast there."""
    if x is None or x.shape[dim] == 1:
        return x
    return x[(slice(None),) * dim + (part,)]


def _pair_part(x, qpart: slice, kpart: slice):
    """A bias / mask of a chunk pair cut to one (query part, key part)."""
    return _sub(_sub(x, 2, qpart), 3, kpart)


def _local_indices(idx, start, length: int):
    """Normal-form key indices (_compact: rows sorted, unique, INDEX_PAD last) of global key positions, as the
    normal form of the same keys within the key part [start, start + length): each row's keys in the part are
    one contiguous run of its sorted row, shifted to the front (a gather, no sort) and renumbered from 0. A part
    holds at most ``length`` distinct keys, so rows longer than that are cut to it."""
    kk = idx.shape[3]
    width = min(kk, length)
    first = jnp.sum(idx < start, axis=3, keepdims=True, dtype=jnp.int32)  # the row's keys before the part
    pos = first + lax.broadcasted_iota(jnp.int32, idx.shape[:3] + (width,), 3)
    taken = jnp.take_along_axis(idx, jnp.minimum(pos, kk - 1), axis=3)
    inside = (pos < kk) & (taken >= start) & (taken < start + length)  # INDEX_PAD is never inside
    return jnp.where(inside, taken - start, _compact.INDEX_PAD).astype(jnp.int32)


def _pair_mask(layout: _Layout, x, qpart: slice, kpart: slice, k_index):
    """The mask of one (query part, key part): a bool mask's block, or KeyIndices localised to the key part
    (k_index: the part's index in the sequence, in parts, so that it starts at global key k_index * length)."""
    if layout.mask_keys != "indices":
        return _pair_part(x, qpart, kpart)
    length = kpart.stop - kpart.start
    return _local_indices(_sub(x, 2, qpart), k_index * length, length)


def _indices(layout: _Layout, pair_mask):
    """A pair's mask when it is localised KeyIndices, else None."""
    return pair_mask if layout.mask_keys == "indices" else None


def _pair_bounds(rows, sj, qpart: slice, kpart: slice, k_index):
    """Row bounds of one (query part, key part): each row's key range (global positions) clipped to the key part
    [start, start + length) and renumbered from its start, so lo and hi stay non-decreasing; the part's key
    segment ids. (None, None) without bounds."""
    if rows is None:
        return None, None
    length = kpart.stop - kpart.start
    start = k_index * length
    r = _sub(rows, 1, qpart)
    lo = jnp.clip(r[..., 0] - start, 0, length)
    hi = jnp.clip(r[..., 1] - start, 0, length)
    pair_rows = jnp.concatenate([lo[..., None], hi[..., None], r[..., 2:]], axis=-1).astype(jnp.int32)
    return pair_rows, (None if sj is None else sj[:, kpart])


def _step_fwd(q, kj, vj, bj, mj, sj, rows, i, j, layout: _Layout):
    """(out, lse) of this device's rows against key chunk j, over the pairs of parts."""
    outs, lses = [], []
    for qpart, qi in _parts(layout, i, q.shape[1]):
        out, lse = None, None
        for kpart, kj_i in _parts(layout, j, kj.shape[1]):
            mask, bounds = _pair_mask(layout, mj, qpart, kpart, kj_i), _pair_bounds(rows, sj, qpart, kpart, kj_i)
            o, l_ = _fwd_pair(q[:, qpart], kj[:, kpart], vj[:, kpart], _pair_part(bj, qpart, kpart), mask, bounds,
                              _pair_kind(qi, kj_i, layout.config.is_causal, bounds[0], _indices(layout, mask)),
                              layout)
            if out is None:
                out, lse = o.astype(jnp.float32), l_
            else:
                out, lse = _partials.combine(out, lse, o, l_)
        outs.append(out)
        lses.append(lse)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)


def _step_bwd(q, kj, vj, bj, mj, sj, rows, out, lse, dout, dlse, i, j, layout: _Layout):
    """(dq, dk, dv, dbias) of this device's rows against key chunk j, over the pairs of parts; dbias in bj's shape."""
    dq = []
    dk = [jnp.zeros(kj[:, p].shape, jnp.float32) for p, _ in _parts(layout, j, kj.shape[1])]
    dv = [jnp.zeros(vj[:, p].shape, jnp.float32) for p, _ in _parts(layout, j, kj.shape[1])]
    db = None if bj is None else jnp.zeros(bj.shape, jnp.float32)
    for qpart, qi in _parts(layout, i, q.shape[1]):
        gq = jnp.zeros(q[:, qpart].shape, jnp.float32)
        for n_k, (kpart, kj_i) in enumerate(_parts(layout, j, kj.shape[1])):
            mask, bounds = _pair_mask(layout, mj, qpart, kpart, kj_i), _pair_bounds(rows, sj, qpart, kpart, kj_i)
            g = _bwd_pair(q[:, qpart], kj[:, kpart], vj[:, kpart], _pair_part(bj, qpart, kpart), mask, bounds,
                          out[:, qpart], lse[:, :, qpart], dout[:, qpart], dlse[:, :, qpart],
                          _pair_kind(qi, kj_i, layout.config.is_causal, bounds[0], _indices(layout, mask)), layout)
            gq = gq + g[0].astype(jnp.float32)
            dk[n_k] = dk[n_k] + g[1].astype(jnp.float32)
            dv[n_k] = dv[n_k] + g[2].astype(jnp.float32)
            if db is not None:
                brows = qpart if bj.shape[2] != 1 else slice(None)
                bcols = kpart if bj.shape[3] != 1 else slice(None)
                db = db.at[:, :, brows, bcols].add(g[3].astype(jnp.float32))
        dq.append(gq)
    return jnp.concatenate(dq, axis=1), jnp.concatenate(dk, axis=1), jnp.concatenate(dv, axis=1), db


def _bounds_operands(bounds):
    """The primitives' (rows, key_segments) operands of a pair's bounds (absent: the placeholders)."""
    rows, segments = bounds
    return _primitives._operand(rows, jnp.int32), _primitives._operand(segments, jnp.int32)


def _fwd_pair(q, k, v, bias, mask, bounds, kind, layout: _Layout):
    """(out [B, Lq, H, D], lse [B, H, Lq] f32) of one (query chunk, key chunk) pair. With row bounds the kernels
    take causality from them (their pair kind is never the causal one, _pair_kind)."""
    b, lq, h, _ = q.shape
    bias_op, mask_op = _primitives._operand(bias, jnp.float32), _primitives._operand(mask, jnp.bool_)

    def run(causal):
        config = dataclasses.replace(layout.config, is_causal=causal)
        return tuple(_primitives.dmattn_fwd_p.bind(q, k, v, bias_op, mask_op, *_bounds_operands(bounds),
                                                   config=config))

    def nothing():  # varying like the kernel's results, so that the branches agree under shard_map
        _, out, lse = _primitives._match_vma(q, jnp.zeros(q.shape, q.dtype), jnp.full((b, h, lq), -jnp.inf))
        return out, lse

    return lax.switch(kind, (lambda: run(False), lambda: run(True), nothing))


def _bwd_pair(q, k, v, bias, mask, bounds, out, lse, dout, dlse, kind, layout: _Layout):
    """(dq, dk, dv, dbias) of one pair, given the rows' global out and lse (exact partial gradients)."""
    bias_op, mask_op = _primitives._operand(bias, jnp.float32), _primitives._operand(mask, jnp.bool_)

    def run(causal):
        config = dataclasses.replace(layout.config, is_causal=causal)
        return tuple(_primitives.dmattn_bwd_p.bind(q, k, v, bias_op, mask_op, *_bounds_operands(bounds), out, lse,
                                                   dout, dlse, config=config))

    def nothing():  # each zero varies like the operand it is the gradient of, as the kernel's results do
        return tuple(_primitives._match_vma(x, jnp.zeros(x.shape, x.dtype))[1] for x in (q, k, v, bias_op))

    return lax.switch(kind, (lambda: run(False), lambda: run(True), nothing))


def _axis_size(axis_name) -> int:
    size = getattr(lax, "axis_size", None)
    return int(size(axis_name)) if size is not None else int(lax.psum(1, axis_name))


def _ring_perm(n: int):
    return [(d, (d + 1) % n) for d in range(n)]


def _kv_source(layout: _Layout, k, v, bias, mask, key_segments):
    """For strategy "all_gather": the gathered K/V and travelling operands (key segment ids among them), and a
    fetch(j) of chunk j. For "ring": None (the chunks arrive by ppermute)."""
    if layout.strategy != "all_gather":
        return None
    gather = functools.partial(lax.all_gather, axis_name=layout.axis_name, axis=1, tiled=True)
    full_k, full_v = gather(k), gather(v)
    gather_keys = functools.partial(lax.all_gather, axis_name=layout.axis_name, axis=3, tiled=True)
    full_bias = gather_keys(bias) if layout.bias_keys == "chunk" else None
    full_mask = gather_keys(mask) if layout.mask_keys == "chunk" else None
    full_segments = gather(key_segments) if key_segments is not None else None
    c = layout.chunk

    def fetch(j):
        kj = lax.dynamic_slice_in_dim(full_k, j * c, c, axis=1)
        vj = lax.dynamic_slice_in_dim(full_v, j * c, c, axis=1)
        bj = lax.dynamic_slice_in_dim(full_bias, j * c, c, axis=3) if full_bias is not None else None
        mj = lax.dynamic_slice_in_dim(full_mask, j * c, c, axis=3) if full_mask is not None else None
        sj = lax.dynamic_slice_in_dim(full_segments, j * c, c, axis=1) if full_segments is not None else None
        return kj, vj, bj, mj, sj

    return fetch


def _chunk_operands(layout: _Layout, fetch, j, kj, vj, tb, tm, ts, bias, mask):
    """Key chunk j's k, v and travelling bias / mask (as they arrived by ppermute, or fetched from the gathered
    arrays), and the bias / mask parts the pair uses: the travelling ones, or the chunk's columns of a bias / mask
    laid out over all keys."""
    if fetch is not None:
        kj, vj, fb, fm, fs = fetch(j)
        tb = fb if fb is not None else tb
        tm = fm if fm is not None else tm
        ts = fs if fs is not None else ts
    bj = tb if layout.bias_keys == "chunk" else _slice_keys(bias, layout.bias_keys, j, layout.chunk)
    mj = tm if layout.mask_keys == "chunk" else _slice_keys(mask, layout.mask_keys, j, layout.chunk)
    return kj, vj, tb, tm, ts, bj, mj


def _forward(q, k, v, bias, mask, rows, key_segments, layout: _Layout):
    n = layout.n
    i = lax.axis_index(layout.axis_name)
    b, lq, h, d = q.shape
    fetch = _kv_source(layout, k, v, bias, mask, key_segments)
    trav_bias = bias if layout.bias_keys == "chunk" else None
    trav_mask = mask if layout.mask_keys == "chunk" else None

    def compute(s, out, lse, kj, vj, tb, tm, ts):
        j = (i - s) % n
        kj, vj, tb, tm, ts, bj, mj = _chunk_operands(layout, fetch, j, kj, vj, tb, tm, ts, bias, mask)
        out_s, lse_s = _step_fwd(q, kj, vj, bj, mj, ts, rows, i, j, layout)
        return _partials.combine(out, lse, out_s, lse_s)

    def step(s, carry):
        out, lse, kj, vj, tb, tm, ts = carry
        if fetch is None:  # the next chunk is in flight while this one is computed
            nxt = lax.ppermute((kj, vj, tb, tm, ts), layout.axis_name, _ring_perm(n))
        out, lse = compute(s, out, lse, kj, vj, tb, tm, ts)
        if fetch is None:
            kj, vj, tb, tm, ts = nxt
        return out, lse, kj, vj, tb, tm, ts

    init = (jnp.zeros((b, lq, h, d), jnp.float32), jnp.full((b, h, lq), -jnp.inf, jnp.float32), k, v,
            trav_bias, trav_mask, key_segments)
    init = _primitives._match_vma(*init)
    carry = lax.fori_loop(0, n - 1, step, init)  # n - 1 hops: the last chunk is computed where it lands
    out, lse = compute(n - 1, *carry)
    return out.astype(q.dtype), lse


def layout_for(config: _primitives.KernelConfig, axis_name, n: int, q_chunk: int, chunk: int, bias, mask, *,
               strategy: str = "ring", zigzag: bool = False) -> _Layout:
    """The static layout of a call on local chunks of q_chunk query rows and chunk keys (bias / mask rank 4 or
    None; with config.mask_kind "indices" the mask is normal-form KeyIndices of global key positions). The causal
    pair rule (diagonal, below, above) needs the chunks equal."""
    if config.is_causal and q_chunk != chunk:
        raise ValueError(f"is_causal under context parallelism needs equal query and key chunks (self-attention "
                         f"over one sequence), got {q_chunk} query rows and {chunk} keys per device")
    if config.mask_kind not in ("bool", "indices"):
        raise ValueError(f"context parallelism takes a bool mask or KeyIndices, not a {config.mask_kind!r} compact "
                         f"mask: its selection ranks the keys of every chunk together")
    mask_keys = "indices" if config.mask_kind == "indices" else _key_layout("mask", mask, chunk, n)
    return _Layout(n=n, axis_name=axis_name, strategy=strategy, config=config,
                   bias_keys=_key_layout("bias", bias, chunk, n), mask_keys=mask_keys, chunk=chunk, zigzag=zigzag)


def forward(q, k, v, bias, mask, layout: _Layout, rows=None, key_segments=None):
    """(out, lse) of this device's query rows over every key chunk (the primal of :func:`attention`). ``rows``
    [1|B, Lq / n, 4]: the row bounds (jax_dmattn/_bounds.py: global key positions) of this device's rows;
    ``key_segments`` [1|B, Lk / n]: its key chunk's segment ids (they travel with the chunk)."""
    return _forward(q, k, v, bias, mask, rows, key_segments, layout)


def backward(q, k, v, bias, mask, out, lse, dout, dlse, layout: _Layout, rows=None, key_segments=None, *,
             lse_term: bool = True):
    """(dq, dk, dv, dbias) on the devices that own them. ``lse_term=False`` leaves out the lse cotangent's part of
    a key-broadcast bias's gradient, for callers that add it themselves (jax_dmattn's custom_vjp)."""
    return _backward(q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse, layout, lse_term=lse_term)


def _backward(q, k, v, bias, mask, rows, key_segments, out, lse, dout, dlse, layout: _Layout,
              lse_term: bool = True):
    n, c = layout.n, layout.chunk
    i = lax.axis_index(layout.axis_name)
    fetch = _kv_source(layout, k, v, bias, mask, key_segments)
    has_bias = bias is not None
    dbias_full = jnp.zeros(bias.shape, jnp.float32) if layout.bias_keys in ("one", "full") else None
    trav_bias = bias if layout.bias_keys == "chunk" else None
    trav_mask = mask if layout.mask_keys == "chunk" else None
    dtb0 = jnp.zeros(bias.shape, jnp.float32) if layout.bias_keys == "chunk" else None
    gathered = fetch is not None
    if gathered:  # all_gather: gradients of every chunk accumulate here, then go to their owners at once
        dk_all = jnp.zeros((k.shape[0], n * c) + k.shape[2:], jnp.float32)
        dv_all = jnp.zeros_like(dk_all)
        db_all = (jnp.zeros(bias.shape[:3] + (n * c,), jnp.float32) if layout.bias_keys == "chunk" else None)

    def step(s, carry):
        dq, kj, vj, tb, tm, ts, dkj, dvj, dtb, dbf, acc = carry
        j = (i - s) % n
        kj, vj, tb, tm, ts, bj, mj = _chunk_operands(layout, fetch, j, kj, vj, tb, tm, ts, bias, mask)
        gq, gk, gv, gb = _step_bwd(q, kj, vj, bj, mj, ts, rows, out, lse, dout, dlse, i, j, layout)
        dq = dq + gq
        if has_bias:
            gb = gb.astype(jnp.float32)
            if layout.bias_keys == "chunk":
                dtb = dtb + gb
            elif layout.bias_keys == "full":
                cur = lax.dynamic_slice_in_dim(dbf, j * c, c, axis=3)
                dbf = lax.dynamic_update_slice_in_dim(dbf, cur + gb, j * c, axis=3)
            else:
                dbf = dbf + gb
        if gathered:
            ak, av, ab = acc
            ak = lax.dynamic_update_slice_in_dim(ak, lax.dynamic_slice_in_dim(ak, j * c, c, 1) + gk, j * c, 1)
            av = lax.dynamic_update_slice_in_dim(av, lax.dynamic_slice_in_dim(av, j * c, c, 1) + gv, j * c, 1)
            if ab is not None:
                ab = lax.dynamic_update_slice_in_dim(ab, lax.dynamic_slice_in_dim(ab, j * c, c, 3) + dtb, j * c, 3)
                dtb = jnp.zeros_like(dtb)
            acc = (ak, av, ab)
        else:
            dkj, dvj = dkj + gk.astype(jnp.float32), dvj + gv.astype(jnp.float32)
            kj, vj, tb, tm, ts, dkj, dvj, dtb = lax.ppermute((kj, vj, tb, tm, ts, dkj, dvj, dtb),
                                                              layout.axis_name, _ring_perm(n))
        return dq, kj, vj, tb, tm, ts, dkj, dvj, dtb, dbf, acc

    zeros_kv = jnp.zeros(k.shape, jnp.float32)
    acc0 = (dk_all, dv_all, db_all) if gathered else (None, None, None)
    # the loop's carry varies over the same mesh axes throughout (shard_map's check_vma)
    *flat, a0, a1, a2 = _primitives._match_vma(jnp.zeros(q.shape, jnp.float32), k, v, trav_bias, trav_mask,
                                               key_segments, zeros_kv, zeros_kv, dtb0, dbias_full, *acc0)
    init = (*flat, (a0, a1, a2))
    dq, _, _, _, _, _, dk, dv, dtb, dbf, acc = lax.fori_loop(0, n, step, init)
    if gathered:
        scatter = functools.partial(lax.psum_scatter, axis_name=layout.axis_name, tiled=True)
        dk, dv = scatter(acc[0], scatter_dimension=1), scatter(acc[1], scatter_dimension=1)
        if acc[2] is not None:
            dtb = scatter(acc[2], scatter_dimension=3)
    # ring: every chunk (and its gradients) moved one device per step, n steps: back on the device that owns it
    dbias = None
    if has_bias:
        if layout.bias_keys == "one" and lse_term:  # constant along keys: only lse moves with it (kernels: 0)
            dbf = dbf + _primitives.key_broadcast_dbias(bias.shape, lse, dlse)
        dbias = (dtb if layout.bias_keys == "chunk" else dbf).astype(bias.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias


_cp_attention = _primitives.attention_vjp(_forward, _backward)


def _whole_sequence(x, axis_name, n: int, zigzag: bool, axis: int):
    """A chunk operand (the device's query rows or keys along ``axis``) gathered over the whole sequence, in the
    sequence's own order."""
    whole = lax.all_gather(lax.stop_gradient(x), axis_name, axis=axis, tiled=True)
    return from_zigzag(whole, n, axis=axis) if zigzag else whole


def _topk_key_indices(mask: masks.TopKMask, axis_name, n: int, dims, *, is_causal: bool, zigzag: bool,
                      rows=None, key_segments=None):
    """A TopKMask whose scores are this device's key chunk's, as the normal-form KeyIndices of the GLOBAL keys each
    local query row keeps ([Bs, Hs, 1, k] shared by the rows without causality or bounds, [B', Hs, Lq / n, k]
    with them), or None where k keeps every key. The scores of all chunks are gathered (O(Lk) numbers per score
    head, no K / V); each row then ranks the keys it sees (causal: the global prefix up to its own position; with
    row bounds ``rows`` and the whole sequence's ``key_segments``: the keys they leave it) as one device would."""
    b, h, hkv, lq, chunk = dims
    scores = mask.scores
    if not hasattr(scores, "shape") or getattr(scores, "ndim", 0) != 3 or scores.shape[2] != chunk:
        raise ValueError(f"context_parallel.attention: TopKMask.scores must be this device's key chunk's scores "
                         f"[B|1, 1|Hkv|H, Lk / n] with Lk / n = {chunk}, got shape "
                         f"{getattr(scores, 'shape', type(scores).__name__)}")
    gathered = _whole_sequence(scores, axis_name, n, zigzag, axis=2)
    norm, kind, k = _compact.normalize(masks.TopKMask(gathered, mask.k), (b, h, hkv, lq, n * chunk))
    if kind != "topk":
        return None
    if rows is not None:
        return _compact.bounded_topk_indices(norm, k, rows, key_segments)
    if not is_causal:
        s = _compact.canonical_scores(norm[:, :, 0, :])
        return _compact.keep_best(s, k, *_compact.kth_best(s, k))[:, :, None, :]
    # causal (equal global lengths): local row r is at global position `start + r` of each contiguous part
    device = lax.axis_index(axis_name)
    parts = ([(device * (lq // 2), lq // 2), ((2 * n - 1 - device) * (lq // 2), lq // 2)] if zigzag
             else [(device * lq, lq)])

    def part_indices(start, length):
        pos = start + jnp.arange(length, dtype=jnp.int32)
        zero = jnp.zeros_like(pos)
        rows = jnp.stack([zero, pos + 1, zero, zero], axis=-1)[None]  # keys [0, pos] (jax_dmattn/_bounds.py)
        return _compact.bounded_topk_indices(norm, k, rows, None)

    return jnp.concatenate([part_indices(*part) for part in parts], axis=2)


def compact_operands(mask, config: _primitives.KernelConfig, rows, key_segments, axis_name, n: int, dims, *,
                     zigzag: bool = False):
    """What the ring runs for a call's mask: (mask, config, rows, key_segments). ``mask`` is a bool mask (or
    None), a TopKMask of this device's key chunk's scores, or normal-form KeyIndices (config.mask_kind "indices")
    of global keys; ``rows`` / ``key_segments`` the row bounds of this device's rows and key chunk, or None.

    A TopKMask becomes the KeyIndices of the keys each local row keeps (a bool call where k keeps every key).
    With row bounds, KeyIndices hold the bounds themselves (the keys outside them dropped, causality included;
    a TopKMask ranks only the keys inside them), and the call runs without bounds and without a causal rule of
    its own: what the CUDA key-list kernels take. The whole sequence's key segment ids are gathered for this
    (O(Lk) ints)."""
    compact = isinstance(mask, masks.TopKMask) or config.mask_kind == "indices"
    if not compact:
        return mask, config, rows, key_segments
    whole_segments = None
    if rows is not None and key_segments is not None:
        whole_segments = _whole_sequence(key_segments, axis_name, n, zigzag, axis=1)
    if isinstance(mask, masks.TopKMask):
        mask = _topk_key_indices(mask, axis_name, n, dims, is_causal=config.is_causal, zigzag=zigzag, rows=rows,
                                 key_segments=whole_segments)
        if mask is None:  # k keeps every key: the bounds alone (or causality) select
            return None, dataclasses.replace(config, mask_kind="bool", mask_k=0), rows, key_segments
    elif rows is not None:
        mask = _bounds.filter_key_indices(mask, _bounds.RowBounds(rows, whole_segments), _compact.INDEX_PAD)
    config = dataclasses.replace(config, mask_kind="indices", mask_k=0)
    if rows is not None:
        config = dataclasses.replace(config, is_causal=False)
        rows = key_segments = None
    return mask, config, rows, key_segments


def attention(query, key, value, bias=None, mask=None, *, axis_name, strategy: str = "ring",
              chunk_order: str = "contiguous", scale=None, is_causal=False, softcap=None, q_segment_ids=None,
              kv_segment_ids=None, local_window_size=None, query_seq_lengths=None, key_value_seq_lengths=None,
              return_lse=False, deterministic=False, implementation=None):
    """:func:`jax_dmattn.attention` over a sequence sharded along mesh axis ``axis_name``, called inside
    ``shard_map``: ``query`` [B, Lq / n, H, D] and ``key`` / ``value`` [B, Lk / n, Hkv, D] are this device's
    chunks (chunk i on the axis's device i); the result is this device's query rows of the whole attention.

    ``bias`` / ``mask`` (bool) broadcast as in :func:`jax_dmattn.attention` over the local rows, and their key
    dim is 1, the local key chunk (a per-key bias or padding mask: it travels with its keys) or the whole key
    length (an operand sharded along queries only, e.g. a [B, H, Lq / n, Lk] bias).

    ``mask`` may also be a :class:`jax_dmattn.KeyIndices`: int [B|1, 1|Hkv|H, Lq / n|1, K] or [B|1, 1|Hkv|H, K]
    holding, for this device's query rows (a query dim of 1: shared by all rows, replicated), the GLOBAL positions
    of the keys they keep, in [-1, Lk) with Lk = n * (local key length); -1 pads, duplicates count once,
    causality applies on top, no gradient. The indices stay on their device; each (query chunk, key chunk) pair
    keeps the ones that fall in its key chunk. Under ``chunk_order="zigzag"`` the rows are the zigzag-ordered
    local rows (like a bias's rows) while the indices still name positions of the original, un-reordered
    sequence. Concrete indices outside [-1, Lk) raise a ValueError.

    ``mask`` may also be a :class:`jax_dmattn.TopKMask` whose scores [B|1, 1|Hkv|H, Lk / n] are this device's key
    chunk's (sharded like the keys, in the same chunk order): each query row keeps the k keys of largest score among
    all the keys it sees, exactly as on one device. The scores of every chunk are gathered (O(Lk) numbers per score
    head; K / V are not), each device selects its rows' keys and runs them as KeyIndices (O(Lq / n * k) numbers per
    score head with causality, k without).

    ``is_causal`` needs equal global query and key lengths (and so equal chunks): bottom-right and top-left
    alignment coincide then. ``strategy``: "ring" (K/V chunks passed around with ppermute; no device holds more
    than two) or "all_gather" (one gather of K/V, a reduce-scatter of their gradients). ``chunk_order``:
    "contiguous" (device i holds the i-th n-th of the sequence) or "zigzag" (device i holds the sequence halves
    i and 2n - 1 - i, as :func:`to_zigzag` lays them out: balanced work under ``is_causal``). ``deterministic`` keeps
    each kernel call bitwise reproducible; the order of the cross-device sums is fixed by the ring.

    ``q_segment_ids`` / ``kv_segment_ids`` (int [B, Lq / n] / [B, Lk / n]: this device's chunks, in the chunk
    order), ``local_window_size`` and ``query_seq_lengths`` / ``key_value_seq_lengths`` (int [B], replicated) mean
    what they mean in :func:`jax_dmattn.attention` over the whole sequence: the segment ids of every chunk are
    gathered (O(B * L) ints per device), each query row's key range is built over the whole sequence and each
    device keeps its own rows'; a KeyIndices or TopKMask then selects within those ranges.
    """
    rows, key_segments = _chunk_row_bounds(
        axis_name, (query.shape[0], query.shape[1], key.shape[1]), is_causal=is_causal,
        zigzag=chunk_order == "zigzag", q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        local_window_size=local_window_size, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths)
    return _attention(query, key, value, bias, mask, rows, key_segments, axis_name=axis_name, strategy=strategy,
                      chunk_order=chunk_order, scale=scale, is_causal=is_causal, softcap=softcap,
                      return_lse=return_lse, deterministic=deterministic, implementation=implementation)


def _chunk_row_bounds(axis_name, dims, *, is_causal, zigzag: bool, q_segment_ids, kv_segment_ids,
                      local_window_size, query_seq_lengths, key_value_seq_lengths):
    """(rows [1|B, Lq / n, 4], key_segments [1|B, Lk / n] or None) of this device's query rows and key chunk, for
    :func:`attention`'s bounds arguments: the row bounds (jax_dmattn/_bounds.py) built over the whole sequence from
    the gathered segment ids, then cut to the device's own rows and keys; (None, None) without bounds."""
    if not _bounds.any_given(q_segment_ids, kv_segment_ids, local_window_size, query_seq_lengths,
                             key_value_seq_lengths):
        return None, None
    b, lq, chunk = dims
    n = _axis_size(axis_name)
    whole = {}  # one id array without the other: make_row_bounds says they go together
    for name, ids, length, desc in (("q_segment_ids", q_segment_ids, lq, "[batch, q_len / n]"),
                                    ("kv_segment_ids", kv_segment_ids, chunk, "[batch, kv_len / n]")):
        if ids is not None:
            ids = _bounds.check_int_array(name, ids, desc, (b, length))
            whole[name] = _whole_sequence(ids, axis_name, n, zigzag, axis=1)
    bounds = _bounds.make_row_bounds(batch=b, q_len=n * lq, kv_len=n * chunk, is_causal=is_causal,
                                     local_window_size=local_window_size, query_seq_lengths=query_seq_lengths,
                                     key_value_seq_lengths=key_value_seq_lengths, **whole)
    device = lax.axis_index(axis_name)

    def mine(x, length):  # [Bb, n * length, ...] in sequence order -> this device's chunk, in the chunk order
        x = to_zigzag(x, n, axis=1) if zigzag else x
        return lax.dynamic_slice_in_dim(x, device * length, length, axis=1)

    return mine(bounds.rows, lq), None if bounds.key_segments is None else mine(bounds.key_segments, chunk)


def _attention(query, key, value, bias, mask, rows, key_segments, *, axis_name, strategy, chunk_order, scale,
               is_causal, softcap, return_lse, deterministic, implementation):
    """:func:`attention` with row bounds: ``rows`` [1|B, Lq / n, 4] of this device's rows (global key positions,
    jax_dmattn/_bounds.py, causality included) and ``key_segments`` [1|B, Lk / n] of its key chunk, or None."""
    is_causal = _validation.check_flag("is_causal", is_causal)
    return_lse = _validation.check_flag("return_lse", return_lse)
    deterministic = _validation.check_flag("deterministic", deterministic)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if chunk_order not in CHUNK_ORDERS:
        raise ValueError(f"chunk_order must be one of {CHUNK_ORDERS}, got {chunk_order!r}")
    if mask is not None and not isinstance(mask, masks.COMPACT_MASKS) and not (
            hasattr(mask, "dtype") and mask.dtype == jnp.bool_):
        raise TypeError(f"context_parallel.attention takes a bool mask (True = attend), a KeyIndices or a TopKMask, "
                        f"got {getattr(mask, 'dtype', type(mask).__name__)}")
    n = _axis_size(axis_name)
    call = _validation.normalize_call(query, key, value, None, None, scale=scale, softcap=softcap,
                                      implementation=implementation)
    b, lq, h, d = query.shape
    chunk, hkv = key.shape[1], key.shape[2]
    if chunk_order == "zigzag" and (lq % 2 or chunk % 2):
        raise ValueError(f"chunk_order='zigzag' splits each device's chunk in two halves: the local query and key "
                         f"lengths must be even, got {lq} and {chunk}")
    bias = _rank4("bias", bias, (b, h, hkv, lq))
    mask_kind = "bool"
    if isinstance(mask, masks.KeyIndices):
        # checked and normalised once against the local rows and the global key length; each pair localises it
        mask, mask_kind, _ = _compact.normalize(mask, (b, h, hkv, lq, int(n) * chunk))
    elif not isinstance(mask, masks.TopKMask):
        mask = _rank4("mask", mask, (b, h, hkv, lq))
    if bias is not None and not jnp.issubdtype(bias.dtype, jnp.floating):
        raise TypeError(f"bias must have a floating dtype, got {bias.dtype}")
    if implementation is None:
        implementation = default_implementation(query.dtype, d)
    if implementation == "xla":
        raise ValueError("context_parallel.attention runs the kernels (implementation None, 'cpu' or 'cuda'); "
                         "the pure-jnp reference has no per-chunk form")
    q, k, v, bias = kernel_operands(query, key, value, bias, implementation)
    config = _primitives.KernelConfig(scale=call.scale, softcap=call.softcap, is_causal=is_causal,
                                      deterministic=deterministic, implementation=implementation,
                                      mask_kind=mask_kind)
    mask, config, rows, key_segments = compact_operands(mask, config, rows, key_segments, axis_name, int(n),
                                                        (b, h, hkv, lq, chunk), zigzag=chunk_order == "zigzag")
    layout = layout_for(config, axis_name, int(n), lq, chunk, bias, mask, strategy=strategy,
                        zigzag=chunk_order == "zigzag")
    q, k, v, bias, mask, rows, key_segments = _primitives._match_vma(q, k, v, bias, mask, rows, key_segments)
    out, lse = _cp_attention(q, k, v, bias, mask, rows, key_segments, layout)
    out = out[..., :d]
    return (out, lse) if return_lse else out
