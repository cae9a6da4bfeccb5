"""Hidden tests of lecture 01, decided by the grader outside the learner's kernel.

Each test draws fresh inputs from the course secret, computes the expected values with
the library's reference here, and runs the learner's function in a sandboxed process
where that reference (and PyTorch's shortcut for it) does not exist. See
``autograder/hidden.py`` and CONTRIBUTING.md ("Hidden tests").
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from autograder.hidden import Case, HiddenTest

from transformer_lab import attention as A

# --------------------------------------------------------------------------- ex1: attention_scores


def scores_cases(rng):
    for shape_q, shape_k, dtype in [((3, 5, 7, 6), (3, 5, 2, 6), torch.float64),
                                    ((1, 1, 9, 1), (1, 1, 9, 1), torch.float32),
                                    ((2, 4, 1, 16), (2, 4, 11, 16), torch.float32)]:
        q = torch.randn(*shape_q, generator=rng, dtype=dtype)
        k = torch.randn(*shape_k, generator=rng, dtype=dtype)
        yield Case(f"q {shape_q}, k {shape_k}, {dtype}", q, k)


# --------------------------------------------------------------------------- ex2: masked_softmax


def softmax_cases(rng):
    s = torch.randn(3, 2, 4, 6, generator=rng, dtype=torch.float64)
    yield Case("padding mask (3, 1, 1, 6), one empty sequence, float64", s,
               A.padding_mask(torch.tensor([6, 2, 0]), max_len=6))
    s = torch.randn(2, 3, 4, 7, generator=rng)
    yield Case("causal mask (4, 7) broadcast over (2, 3)", s, A.causal_mask(4, 7))
    s = 1e4 * torch.randn(2, 5, 5, generator=rng)
    yield Case("scores of size 1e4, a random mask", s, torch.rand(2, 5, 5, generator=rng) > 0.4)
    yield Case("no mask, float64", torch.randn(4, 9, generator=rng, dtype=torch.float64), None)


def _softmax_large_negative(scores, mask=None):
    if mask is None:
        return torch.softmax(scores, dim=-1)
    return torch.softmax(scores.masked_fill(~mask, -1e9), dim=-1)


def _softmax_inverted(scores, mask=None):
    if mask is None:
        return torch.softmax(scores, dim=-1)
    return A.masked_softmax(scores, ~mask)


def _softmax_wrong_axis(scores, mask=None):
    return A.masked_softmax(scores.transpose(-2, -1), None if mask is None else mask.transpose(-2, -1)).transpose(-2, -1)


# --------------------------------------------------------------------------- ex3: attention


def attention_reference(q, k, v, mask=None):
    return A.scaled_dot_product_attention(q, k, v, mask=mask, need_weights=True)


def attention_cases(rng):
    B, H, Lq, Lk, D, Dv = 3, 2, 4, 6, 5, 3
    q = torch.randn(B, H, Lq, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, H, Lk, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, H, Lk, Dv, generator=rng, dtype=torch.float64)
    pad = A.padding_mask(torch.tensor([6, 3, 0]), max_len=Lk)
    yield Case("cross-attention shapes, Dv != D, float64, no mask", q, k, v)
    yield Case("Dv != D, padding lengths [6, 3, 0]", q, k, v, mask=pad)
    yield Case("Dv != D, causal (4, 6) & padding", q, k, v, mask=A.causal_mask(Lq, Lk) & pad)


def _attention_scaled_by_dv(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(v.shape[-1])
    w = A.masked_softmax(scores, mask)
    return w @ v, w


def _attention_unscaled(q, k, v, mask=None):
    w = A.masked_softmax(q @ k.transpose(-2, -1), mask)
    return w @ v, w


# --------------------------------------------------------------------------- ex4: multi_head_attention


def mha_reference(x, w_qkv, b_qkv, w_out, b_out, n_heads, mask=None):
    """The library's MultiHeadAttention (readable path) with the given weights."""
    lib = A.MultiHeadAttention(x.shape[-1], n_heads, bias=b_qkv is not None, fast=False).to(x.dtype)
    with torch.no_grad():
        lib.qkv.weight.copy_(w_qkv)
        lib.out.weight.copy_(w_out)
        if b_qkv is not None:
            lib.qkv.bias.copy_(b_qkv)
            lib.out.bias.copy_(b_out)
        return lib(x, mask=mask)


def mha_cases(rng):
    for d_model, H, L, lengths, bias, dtype in [(20, 5, 7, [7, 4, 0], True, torch.float64),
                                                (8, 1, 3, [3, 2], False, torch.float32),
                                                (6, 6, 4, None, True, torch.float64)]:
        scale = 1 / math.sqrt(d_model)

        def w(*shape, dtype=dtype, scale=scale):
            return torch.randn(*shape, generator=rng, dtype=dtype) * scale

        B = len(lengths) if lengths else 2
        x = torch.randn(B, L, d_model, generator=rng, dtype=dtype)
        mask = (A.padding_mask(torch.tensor(lengths), max_len=L) & A.causal_mask(L)) if lengths else None
        weights = (w(3 * d_model, d_model), w(3 * d_model) if bias else None,
                   w(d_model, d_model), w(d_model) if bias else None)
        label = f"d_model={d_model}, H={H}, L={L}, lengths={lengths}, bias={bias}, {dtype}"
        yield Case(label, x, *weights, n_heads=H, mask=mask)
    yield Case("d_model=10, n_heads=4 (not divisible)", torch.randn(1, 3, 10, generator=rng),
               torch.randn(30, 10, generator=rng), None, torch.randn(10, 10, generator=rng), None,
               n_heads=4, raises=ValueError)


def _mha_with(scale_dim: str):
    def wrong(x, w_qkv, b_qkv, w_out, b_out, n_heads, mask=None):
        B, L, d = x.shape
        dk = d // n_heads
        q, k, v = F.linear(x, w_qkv, b_qkv).split(d, dim=-1)
        if scale_dim == "heads_first":  # reshape straight to (B, H, L, dk): mixes positions and heads
            q, k, v = (t.reshape(B, n_heads, L, dk) for t in (q, k, v))
            scale = math.sqrt(dk)
        else:
            q, k, v = (t.reshape(B, L, n_heads, dk).transpose(1, 2) for t in (q, k, v))
            scale = math.sqrt(d)
        w = A.masked_softmax(q @ k.transpose(-2, -1) / scale, mask)
        return F.linear((w @ v).transpose(1, 2).reshape(B, L, d), w_out, b_out)
    return wrong


TESTS = [
    HiddenTest(
        cell="ex1_attention_scores_test",
        function="attention_scores",
        cases=scores_cases,
        reference=A.attention_scores,
        blocked=[A.attention_scores, A.scaled_dot_product_attention, A.fast_attention,
                 F.scaled_dot_product_attention],
        mistakes={
            "forgot the scale: divide q k^T by sqrt(D), D = q.shape[-1]":
                lambda q, k: q @ k.transpose(-2, -1),
            "divided by D; the scale is 1/sqrt(D)":
                lambda q, k: q @ k.transpose(-2, -1) / q.shape[-1],
        },
        hint="scale by 1/sqrt(D) with D = q.shape[-1] (the head dim), and keep the input's dtype",
    ),
    HiddenTest(
        cell="ex2_masked_softmax_test",
        function="masked_softmax",
        cases=softmax_cases,
        reference=A.masked_softmax,
        blocked=[A.masked_softmax, A.scaled_dot_product_attention, A.fast_attention,
                 F.scaled_dot_product_attention],
        mistakes={
            "a large negative number instead of -inf leaves a fully masked row uniform (1/Lk each), "
            "not zero: set the rows where no key is visible (mask.any(-1) is False) to 0":
                _softmax_large_negative,
            "the mask is inverted: True means 'may attend', so hide the scores where mask is False (~mask)":
                _softmax_inverted,
            "softmax over the wrong axis: it runs over the keys, dim=-1":
                _softmax_wrong_axis,
        },
        hint="bool mask True = may attend; -inf before the softmax; rows with no visible key -> zeros",
    ),
    HiddenTest(
        cell="ex3_attention_test",
        function="attention",
        cases=attention_cases,
        reference=attention_reference,
        outputs=("out", "weights"),
        blocked=[A.scaled_dot_product_attention, A.fast_attention, A.attention_scores,
                 A.masked_softmax, F.scaled_dot_product_attention],
        mistakes={
            "scaled by sqrt of v's last dim (Dv); the scale uses q's, sqrt(D)": _attention_scaled_by_dv,
            "forgot the 1/sqrt(D) scale": _attention_unscaled,
        },
        hint="weights = softmax(q k^T / sqrt(D)) with the mask, rows with no visible key -> zeros; "
             "out = weights @ v",
    ),
    HiddenTest(
        cell="ex4_multi_head_attention_test",
        function="multi_head_attention",
        cases=mha_cases,
        reference=mha_reference,
        blocked=[A.MultiHeadAttention, A.scaled_dot_product_attention, A.fast_attention,
                 A.attention_scores, A.masked_softmax, A.split_heads, A.merge_heads,
                 F.scaled_dot_product_attention, F.multi_head_attention_forward,
                 nn.MultiheadAttention],
        mistakes={
            "scaled by sqrt(d_model); each head scales by sqrt(d_k), d_k = d_model / n_heads":
                _mha_with("d_model"),
            "split into heads with reshape(B, H, L, d_k): that mixes positions and heads; "
            "reshape(B, L, H, d_k) then transpose(1, 2)":
                _mha_with("heads_first"),
        },
        hint="check d_model % n_heads first (ValueError); fully masked rows (an empty sequence) "
             "give zero attention output",
    ),
]
