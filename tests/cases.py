"""The sweep of attention cases shared by the value and gradient tests.

One axis is swept at a time around a base case (rather than a full cross product), so the suite stays fast
on a 2-core CPU while every axis of the contract is covered: bias/mask broadcast shapes, GQA ratios,
lengths (odd, Lq=1, Lq > Lk), head dims, causal, softcap, empty rows, mask structures, dtypes and mixed bias
dtypes.
"""

from __future__ import annotations

import pytest

from helpers import Case

B, LQ, LK, H, HKV, D = 2, 65, 100, 4, 2, 64
BASE = Case(B=B, Lq=LQ, Lk=LK, H=H, Hkv=HKV, D=D, dtype="f32")


def masked_bias_case(dtype, Lq, Lk, mask_kind):
    """BASE with an f32 bias and a mask of one full shape [2, 2, Lq, Lk]: the cases of the tests that the bias under
    the mask's False entries never matters (skipped tiles, poisoned values), forward and backward alike."""
    return BASE.replace(dtype=dtype, Lq=Lq, Lk=Lk, bias=(2, 2, Lq, Lk), bias_dtype="f32", mask=(2, 2, Lq, Lk),
                        mask_kind=mask_kind)


def _shape_id(shape):
    return "none" if shape is None else "x".join(str(s) for s in shape) or "scalar"


def _cases():
    out = []

    def add(name, case, marks=()):
        out.append(pytest.param(case, id=name, marks=list(marks)))

    # --- base
    add("base", BASE)
    add("base-bias-mask", BASE.replace(bias=(B, HKV, LQ, LK), mask=(B, 1, LQ, LK)))

    # --- bias broadcast shapes (mask absent), then with a mask
    bias_shapes = [
        (B, H, LQ, LK),
        (B, HKV, LQ, LK),
        (B, 1, LQ, LK),
        (1, H, LQ, LK),
        (1, 1, LQ, LK),
        (B, HKV, 1, LK),
        (1, 1, 1, LK),
        (B, H, LQ, 1),  # per-row bias: gradient exactly 0
        (1, HKV, LQ, 1),
        (1, 1, 1, 1),
        (LK,),
        (LQ, LK),
        (H, LQ, LK),
        (HKV, 1, LK),
    ]
    for s in bias_shapes:
        add(f"bias-{_shape_id(s)}", BASE.replace(bias=s))
    for s in [(B, HKV, 1, LK), (1, H, LQ, LK)]:
        add(f"bias-{_shape_id(s)}-mask", BASE.replace(bias=s, mask=(B, H, LQ, LK)))

    # --- mask broadcast shapes (bias full)
    mask_shapes = [
        (B, H, LQ, LK),
        (B, HKV, LQ, LK),
        (1, 1, LQ, LK),
        (B, 1, 1, LK),
        (1, HKV, 1, LK),
        (B, 1, LQ, 1),
        (LK,),
        (LQ, LK),
        (H, LQ, LK),
    ]
    for s in mask_shapes:
        add(f"mask-{_shape_id(s)}", BASE.replace(bias=(B, HKV, LQ, LK), mask=s))

    # --- GQA ratios (bias and mask with Hkv heads)
    for h, hkv in [(4, 4), (4, 2), (4, 1), (8, 1), (8, 2)]:
        add(
            f"gqa-{h}-{hkv}",
            BASE.replace(H=h, Hkv=hkv, bias=(B, hkv, LQ, LK), mask=(1, hkv, LQ, LK)),
        )

    # --- lengths: odd, Lq = 1, Lq > Lk, tile boundaries
    for lq, lk in [(1, 1), (1, 100), (1, 129), (17, 17), (63, 65), (64, 64), (65, 63),
                   (100, 17), (129, 129), (128, 200), (130, 64)]:
        add(f"len-{lq}-{lk}", BASE.replace(Lq=lq, Lk=lk, bias=(B, HKV, lq, lk), mask=(B, 1, lq, lk)))

    # --- head dims (kernel sizes and padded odd ones)
    for d in [32, 64, 96, 128, 192, 256, 40, 72, 100]:
        add(f"d{d}", BASE.replace(D=d, Lq=33, Lk=70, bias=(B, HKV, 33, 70), mask=(1, 1, 33, 70)))

    # --- causal (bottom-right), including Lq > Lk (leading rows see no key)
    for lq, lk in [(65, 100), (100, 100), (100, 65), (1, 64), (129, 17)]:
        add(f"causal-{lq}-{lk}", BASE.replace(Lq=lq, Lk=lk, is_causal=True, bias=(B, HKV, lq, lk)))
    add("causal-mask", BASE.replace(is_causal=True, bias=(1, H, 1, LK), mask=(B, 1, LQ, LK)))

    # --- softcap
    add("softcap", BASE.replace(softcap=5.0))
    add("softcap-bias-mask", BASE.replace(softcap=2.0, bias=(B, H, LQ, LK), mask=(B, HKV, LQ, LK)))
    add("softcap-causal", BASE.replace(softcap=10.0, is_causal=True, bias=(1, 1, 1, LK)))
    add("scale", BASE.replace(scale=0.3, bias=(B, HKV, LQ, LK)))
    add("scale-softcap", BASE.replace(scale=1.0, softcap=3.0, bias=(B, HKV, LQ, LK)))

    # --- mask structures
    add("mask-rows-empty", BASE.replace(bias=(B, HKV, LQ, LK), mask=(B, H, LQ, LK), mask_kind="rows"))
    add("mask-rows-empty-bcast", BASE.replace(bias=(1, 1, 1, LK), mask=(B, 1, LQ, LK), mask_kind="rows"))
    add("mask-sparse", BASE.replace(bias=(B, HKV, LQ, LK), mask=(B, H, LQ, LK), mask_density=0.05))
    add("mask-all-true", BASE.replace(bias=(B, HKV, LQ, LK), mask=(B, H, LQ, LK), mask_kind="all"))
    add("mask-block", BASE.replace(Lq=200, Lk=260, bias=(B, HKV, 200, 260), mask=(B, HKV, 200, 260),
                                   mask_kind="block"))
    add("mask-block-bcast", BASE.replace(Lq=200, Lk=260, bias=(1, 1, 1, 260), mask=(1, 1, 200, 260),
                                         mask_kind="block"))
    add("mask-block-random", BASE.replace(Lq=192, Lk=256, bias=(B, 1, 192, 256), mask=(B, H, 192, 256),
                                          mask_kind="block_random"))
    add("mask-block-causal", BASE.replace(Lq=200, Lk=200, is_causal=True, bias=(B, HKV, 200, 200),
                                          mask=(1, HKV, 200, 200), mask_kind="block"))

    # --- dtypes (and mixed bias dtypes)
    for dt in ["f16", "bf16"]:
        add(f"{dt}", BASE.replace(dtype=dt))
        add(f"{dt}-bias-mask", BASE.replace(dtype=dt, bias=(B, HKV, LQ, LK), mask=(B, 1, LQ, LK)))
        add(f"{dt}-bias-key", BASE.replace(dtype=dt, bias=(B, HKV, 1, LK), mask=(B, 1, LQ, LK)))
        add(f"{dt}-causal-softcap", BASE.replace(dtype=dt, is_causal=True, softcap=5.0, bias=(1, H, LQ, LK)))
        add(f"{dt}-d128-gqa8", BASE.replace(dtype=dt, D=128, H=8, Hkv=1, bias=(B, 1, LQ, LK), mask=(1, 1, LQ, LK)))
        add(f"{dt}-d40", BASE.replace(dtype=dt, D=40, bias=(B, H, LQ, LK)))
        add(f"{dt}-len-1-129", BASE.replace(dtype=dt, Lq=1, Lk=129, bias=(B, HKV, 1, 129), mask=(B, 1, 1, 129)))
        add(f"{dt}-rows-empty", BASE.replace(dtype=dt, bias=(B, HKV, LQ, LK), mask=(B, H, LQ, LK), mask_kind="rows"))
        add(f"{dt}-block", BASE.replace(dtype=dt, Lq=192, Lk=256, bias=(B, HKV, 192, 256), mask=(B, 1, 192, 256),
                                        mask_kind="block_random"))
    add("bf16-q-f32-bias", BASE.replace(dtype="bf16", bias=(B, HKV, LQ, LK), bias_dtype="f32", mask=(B, 1, LQ, LK)))
    add("bf16-q-f32-bias-key", BASE.replace(dtype="bf16", bias=(1, HKV, 1, LK), bias_dtype="f32"))
    add("f16-q-bf16-bias", BASE.replace(dtype="f16", bias=(B, 1, LQ, LK), bias_dtype="bf16"))
    add("f16-q-f32-bias", BASE.replace(dtype="f16", bias=(LQ, LK), bias_dtype="f32"))
    add("f32-q-bf16-bias", BASE.replace(dtype="f32", bias=(B, HKV, LQ, LK), bias_dtype="bf16"))
    add("f32-q-f16-bias", BASE.replace(dtype="f32", bias=(1, H, 1, LK), bias_dtype="f16"))

    # --- numerics and odd corners
    add("large-logits", BASE.replace(scale=2.0, bias=(B, HKV, LQ, LK), mask=(B, 1, LQ, LK)))
    add("large-logits-bf16", BASE.replace(dtype="bf16", scale=2.0, bias=(B, HKV, LQ, LK), mask=(B, 1, LQ, LK)))
    add("large-bias-f16", BASE.replace(dtype="f16", bias=(B, HKV, LQ, LK), bias_std=30.0, bias_dtype="f32"))
    add("decode-1-700", BASE.replace(Lq=1, Lk=700, bias=(B, HKV, 1, 700), mask=(B, 1, 1, 700)))
    add("decode-causal-3-700", BASE.replace(Lq=3, Lk=700, is_causal=True, bias=(1, 1, 1, 700)))
    add("tiny", BASE.replace(B=1, H=1, Hkv=1, D=32, Lq=3, Lk=5, bias=(1, 1, 3, 5), mask=(1, 1, 3, 5)))
    add("d8", BASE.replace(D=8, bias=(B, HKV, LQ, LK)))
    add("causal-150-70-key-bias", BASE.replace(Lq=150, Lk=70, is_causal=True, bias=(B, HKV, 1, 70), mask=(B, 1, 1, 70)))
    add("b5-h16", BASE.replace(B=5, H=16, Hkv=16, Lq=20, Lk=30, bias=(5, 1, 20, 30), mask=(5, 16, 1, 30)))

    # --- a few long-ish cases
    add("long-512-block", BASE.replace(B=1, H=2, Hkv=1, Lq=512, Lk=512, bias=(1, 1, 1, 512), mask=(1, 1, 512, 512),
                                       mask_kind="block_random", is_causal=True))
    add("long-bf16-384", BASE.replace(B=1, H=2, Hkv=1, D=128, dtype="bf16", Lq=384, Lk=384,
                                      bias=(1, 1, 384, 384), mask=(1, 1, 384, 384), mask_kind="block"))
    return out


# Cases run for every implementation (the "xla" reference runs only these; see helpers.sweep_params).
CORE_IDS = {
    "base-bias-mask", "bias-2x2x1x100", "bias-2x4x65x1", "bias-65x100", "mask-1x2x1x100", "gqa-8-1",
    "len-1-129", "len-100-17", "d40", "causal-100-65", "softcap-bias-mask", "mask-rows-empty",
    "mask-block-causal", "f16-bias-mask", "bf16-causal-softcap", "bf16-q-f32-bias",
}


def _mark_core(params):
    ids = {p.id for p in params}
    missing = CORE_IDS - ids
    assert not missing, f"unknown core case ids {sorted(missing)}"
    return [pytest.param(p.values[0].replace(core=p.id in CORE_IDS), id=p.id, marks=p.marks) for p in params]


CASES = _mark_core(_cases())
