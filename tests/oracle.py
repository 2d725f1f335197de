"""Float64 numpy oracle for ``jax_dmattn.attention``: forward values and analytic gradients.

Written from the contract (docs/design.md, "Semantics fixed here"), independently of the package:

* ``s = cap(scale * <q_i, k_j>) + bias``, ``cap(x) = softcap * tanh(x / softcap)`` when softcap is set;
* GQA: query head ``h`` reads kv head ``h // (H // Hkv)``;
* bias/mask broadcast: lower rank is left-padded with 1s, each dim is 1 or full, the head dim may be
  1, Hkv (query head ``h`` -> ``h // g``) or H;
* bottom-right causal: key ``j`` is visible from query ``i`` iff ``j <= i + Lk - Lq``;
* a row with no kept key has out 0, lse -inf, and contributes nothing to any gradient;
* non-finite values: row ``i`` drops key ``j`` when the mask or causality does, when ``bias_ij`` is -inf (whatever
  ``q_i . k_j`` is) or when its logit is -inf. A dropped key contributes nothing to the row, forward or backward,
  even where its k / v (or the row's q) is NaN or inf: the products are restricted to kept pairs, never a dense
  ``0 * NaN``. A NaN or +inf logit of a kept key makes the row's out and lse NaN, and NaN spreads from there
  through the gradients like any other value.

Every input is cast to float64 first, so callers pass the exact (rounded) values they gave the
implementation under test.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "normalize_broadcast_shape",
    "expand_to_heads",
    "keep_matrix",
    "oracle_attention",
    "oracle_grads",
    "reduce_to_shape",
]


def _f64(x):
    return None if x is None else np.asarray(x).astype(np.float64)


def normalize_broadcast_shape(shape, B, H, Hkv, Lq, Lk, name="bias"):
    """Left-pad ``shape`` to rank 4 and check it against the broadcast rule. Returns the rank-4 shape."""
    shape = tuple(int(s) for s in shape)
    if len(shape) > 4:
        raise ValueError(f"{name} rank {len(shape)} > 4")
    shape4 = (1,) * (4 - len(shape)) + shape
    Bb, Hb, Mb, Nb = shape4
    ok = Bb in (1, B) and Hb in (1, Hkv, H) and Mb in (1, Lq) and Nb in (1, Lk)
    if not ok:
        raise ValueError(f"{name} shape {shape} not broadcastable to [{B}, {H}|{Hkv}, {Lq}, {Lk}]")
    return shape4


def expand_to_heads(x4, H, Hkv):
    """Expand the head dim (axis 1) of a rank-4 [Bb, Hb, Mb, Nb] array to H query heads.

    Hb == H: unchanged; Hb == Hkv: each kv head repeated g = H // Hkv times (head h -> h // g);
    Hb == 1: broadcast. Returns an array whose axis 1 has size H (a broadcast view where possible).
    """
    Hb = x4.shape[1]
    if Hb == H:
        return x4
    if Hb == 1:
        return np.broadcast_to(x4, (x4.shape[0], H) + x4.shape[2:])
    if Hb == Hkv:
        return np.repeat(x4, H // Hkv, axis=1)
    raise ValueError(f"head dim {Hb} is none of 1, Hkv={Hkv}, H={H}")


def keep_matrix(mask, B, H, Hkv, Lq, Lk, is_causal):
    """Boolean [B, H, Lq, Lk] of kept (b, h, i, j): mask (broadcast) and causality."""
    keep = np.ones((B, H, Lq, Lk), dtype=bool)
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        m4 = m.reshape(normalize_broadcast_shape(m.shape, B, H, Hkv, Lq, Lk, "mask"))
        keep = keep & np.broadcast_to(expand_to_heads(m4, H, Hkv), (B, H, Lq, Lk))
    if is_causal:
        i = np.arange(Lq)[:, None]
        j = np.arange(Lk)[None, :]
        keep = keep & (j <= i + (Lk - Lq))[None, None]
    return keep


def _bias_full(bias, B, H, Hkv, Lq, Lk):
    if bias is None:
        return None
    b = _f64(bias)
    b4 = b.reshape(normalize_broadcast_shape(b.shape, B, H, Hkv, Lq, Lk, "bias"))
    return np.broadcast_to(expand_to_heads(b4, H, Hkv), (B, H, Lq, Lk))


def _kept_product(w, x, keep, over):
    """``sum_j w[b,h,i,j] x[b,h,j,d]`` (over="keys", -> [B, H, Lq, D]) or ``sum_i w[b,h,i,j] x[b,h,i,d]``
    (over="rows", -> [B, H, Lk, D]), where a pair (i, j) that ``keep`` [B, H, Lq, Lk] drops contributes nothing
    even when its x is NaN or inf (a dense product would give 0 * NaN = NaN)."""
    finite = np.isfinite(x)
    spec = "bhij,bhjd->bhid" if over == "keys" else "bhij,bhid->bhjd"
    r = np.einsum(spec, w, np.where(finite, x, 0.0))
    with np.errstate(invalid="ignore"):  # 0 * inf of a kept pair is NaN, as in any product
        for b, h, n, d in np.argwhere(~finite):
            if over == "keys":
                r[b, h, :, d] += np.where(keep[b, h, :, n], w[b, h, :, n] * x[b, h, n, d], 0.0)
            else:
                r[b, h, :, d] += np.where(keep[b, h, n, :], w[b, h, n, :] * x[b, h, n, d], 0.0)
    return r


def _forward(q, k, v, bias, mask, scale, is_causal, softcap):
    q, k, v = _f64(q), _f64(k), _f64(v)
    B, Lq, H, D = q.shape
    _, Lk, Hkv, _ = k.shape
    assert k.shape == (B, Lk, Hkv, D) and v.shape == (B, Lk, Hkv, D)
    assert H % Hkv == 0
    g = H // Hkv
    if scale is None:
        scale = D ** -0.5
    qh = q.transpose(0, 2, 1, 3)  # [B, H, Lq, D]
    kh = np.repeat(k.transpose(0, 2, 1, 3), g, axis=1)  # [B, H, Lk, D]
    vh = np.repeat(v.transpose(0, 2, 1, 3), g, axis=1)
    raw = scale * np.einsum("bhid,bhjd->bhij", qh, kh)
    if softcap is not None:
        t = np.tanh(raw / softcap)
        s = softcap * t
    else:
        t = None
        s = raw
    bf = _bias_full(bias, B, H, Hkv, Lq, Lk)
    if bf is not None:
        with np.errstate(invalid="ignore"):  # NaN or inf q.k + -inf
            s = np.where(bf == -np.inf, -np.inf, s + bf)
    keep = keep_matrix(mask, B, H, Hkv, Lq, Lk, is_causal)
    # A -inf score drops its key like the mask does; a NaN score is kept, so it reaches its row.
    keep = keep & (s != -np.inf)
    s_kept = np.where(keep, s, -np.inf)
    m = s_kept.max(axis=-1, keepdims=True)  # NaN if a kept score is NaN
    row_empty = ~keep.any(axis=-1, keepdims=True)
    m_safe = np.where(row_empty, 0.0, m)
    with np.errstate(invalid="ignore"):  # inf - inf where the max is +inf
        e = np.where(keep, np.exp(s_kept - m_safe), 0.0)
    denom = e.sum(axis=-1, keepdims=True)
    p = np.where(keep, e / np.where(row_empty, 1.0, denom), 0.0)  # empty rows: all zeros
    out_h = _kept_product(p, vh, keep, "keys")  # [B, H, Lq, D]
    with np.errstate(divide="ignore"):
        lse = np.where(row_empty[..., 0], -np.inf, m_safe[..., 0] + np.log(np.where(row_empty, 1.0, denom)[..., 0]))
    ctx = dict(qh=qh, kh=kh, vh=vh, p=p, keep=keep, t=t, out_h=out_h, scale=scale, g=g, B=B, H=H, Hkv=Hkv, Lq=Lq,
               Lk=Lk, D=D)
    return out_h.transpose(0, 2, 1, 3), lse, ctx


def oracle_attention(q, k, v, bias=None, mask=None, *, scale=None, is_causal=False, softcap=None):
    """Float64 attention. Returns ``(out [B, Lq, H, D], lse [B, H, Lq])``, both float64."""
    out, lse, _ = _forward(q, k, v, bias, mask, scale, is_causal, softcap)
    return out, lse


def reduce_to_shape(full, shape, H, Hkv):
    """Sum a [B, H, Lq, Lk] array down to a broadcastable bias ``shape`` (any rank <= 4)."""
    B, _, Lq, Lk = full.shape
    shape4 = normalize_broadcast_shape(shape, B, H, Hkv, Lq, Lk)
    Bb, Hb, Mb, Nb = shape4
    r = full
    if Bb == 1:
        r = r.sum(axis=0, keepdims=True)
    if Mb == 1:
        r = r.sum(axis=2, keepdims=True)
    if Nb == 1:
        r = r.sum(axis=3, keepdims=True)
    if Hb == 1:
        r = r.sum(axis=1, keepdims=True)
    elif Hb != H:  # Hb == Hkv < H: query heads h*g .. h*g+g-1 share kv head h
        r = r.reshape(r.shape[0], Hkv, H // Hkv, r.shape[2], r.shape[3]).sum(axis=2)
    return r.reshape(tuple(shape))


def oracle_grads(q, k, v, bias=None, mask=None, dout=None, *, scale=None, is_causal=False, softcap=None,
                 dlse=None, magnitude=False):
    """Analytic float64 gradients of ``sum(out * dout)`` (plus ``sum(lse * dlse)`` when dlse [B, H, Lq] is given).

    Returns ``(dq, dk, dv, dbias)`` in float64; ``dbias`` has bias's shape (None when bias is None).
    dS = P * (dP - rowsum(dO * O)); with softcap, dRaw = dS * (1 - tanh^2); dq/dk carry ``scale``.
    A bias broadcast along keys (last dim 1) shifts a row's logits by a constant: softmax cancels it in out, so
    its gradient is exactly the lse cotangent of the rows with a kept key (0 without dlse).

    With ``magnitude=True``, returns instead the same gradients computed from absolute values of the
    terms that cancel (dS -> P * (|dP| + |delta|), then |k|, |q|, |dO|): the scale of the rounding error
    of any implementation, used as an absolute floor where the true gradient is ~0 by cancellation.
    """
    out, lse, c = _forward(q, k, v, bias, mask, scale, is_causal, softcap)
    B, H, Hkv, Lk, D, g = c["B"], c["H"], c["Hkv"], c["Lk"], c["D"], c["g"]
    do_h = _f64(dout).transpose(0, 2, 1, 3)  # [B, H, Lq, D]
    p, keep = c["p"], c["keep"]
    dv_h = _kept_product(p, do_h, keep, "rows")
    dp = np.einsum("bhid,bhjd->bhij", do_h, c["vh"])
    delta = (do_h * c["out_h"]).sum(axis=-1, keepdims=True)
    if dlse is not None:  # d lse_i / d s_ij = p_ij
        delta = delta - _f64(dlse)[..., None]
    kh, qh = c["kh"], c["qh"]
    with np.errstate(invalid="ignore"):
        ds = np.where(keep, p * (dp - delta), 0.0)  # zero wherever a key is dropped (and in empty rows)
        if magnitude:
            ds = np.where(keep, p * (np.abs(dp) + np.abs(delta)), 0.0)
            kh, qh, do_h = np.abs(kh), np.abs(qh), np.abs(do_h)
            dv_h = _kept_product(p, do_h, keep, "rows")
        draw = ds if c["t"] is None else np.where(keep, ds * (1.0 - c["t"] ** 2), 0.0)
    dq_h = c["scale"] * _kept_product(draw, kh, keep, "keys")
    dk_h = c["scale"] * _kept_product(draw, qh, keep, "rows")
    dq = dq_h.transpose(0, 2, 1, 3)
    dk = dk_h.reshape(B, Hkv, g, Lk, D).sum(axis=2).transpose(0, 2, 1, 3)
    dv = dv_h.reshape(B, Hkv, g, Lk, D).sum(axis=2).transpose(0, 2, 1, 3)
    dbias = None
    if bias is not None:
        bshape = np.shape(bias)
        if magnitude:
            dbias = reduce_to_shape(ds, bshape, H, Hkv)
        elif (len(bshape) == 0 or bshape[-1] == 1) and Lk != 1:
            # d out / d b_i = 0 (softmax cancels a per-row constant); d lse_i / d b_i = 1 where row i keeps a key
            rows = np.zeros(ds.shape[:3] + (Lk,), dtype=np.float64)
            if dlse is not None:
                rows[..., 0] = np.where(keep.any(axis=-1), _f64(dlse), 0.0)
            dbias = reduce_to_shape(rows, bshape, H, Hkv)
        else:
            dbias = reduce_to_shape(ds, bshape, H, Hkv)
    return dq, dk, dv, dbias
