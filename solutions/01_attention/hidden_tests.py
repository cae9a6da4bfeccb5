"""Hidden tests of lecture 01, decided by the grader outside the learner's kernel.

Each test draws fresh inputs from the course secret, computes the expected values with
the library's reference here, and runs the learner's function in a sandboxed process
where that reference (and PyTorch's shortcut for it) does not exist. See
``autograder/hidden.py`` and CONTRIBUTING.md ("Hidden tests").
"""

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from autograder.hidden import Case, HiddenTest

from transformer_lab import attention as A

# --------------------------------------------------------------------------- ex1: attention_scores


def scores_cases(rng):
    for shape_q, shape_k, dtype in [((3, 5, 7, 6), (3, 5, 2, 6), torch.float64),
                                    ((2, 1, 9, 1), (2, 1, 9, 1), torch.float32),
                                    ((2, 4, 1, 16), (2, 4, 11, 16), torch.float32)]:
        q = torch.randn(*shape_q, generator=rng, dtype=dtype)
        k = torch.randn(*shape_k, generator=rng, dtype=dtype)
        yield Case(f"q {shape_q}, k {shape_k}, {dtype}", q, k)


def _scores_k_T(q, k):  # k.T on a 4-D tensor reverses all four axes (PyTorch warns that it is deprecated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return q @ k.T / math.sqrt(q.shape[-1])


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


def _softmax_nan_rows(scores, mask=None):  # -inf fill, but nothing done about rows with no visible key
    if mask is None:
        return torch.softmax(scores, dim=-1)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def _softmax_inverted(scores, mask=None):
    if mask is None:
        return torch.softmax(scores, dim=-1)
    return A.masked_softmax(scores, ~mask)


def _softmax_inverted_fill(scores, mask=None):  # only the fill flipped: rows the mask fully allows become NaN
    if mask is None:
        return torch.softmax(scores, dim=-1)
    w = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    return w.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)


def _softmax_wrong_axis(scores, mask=None):
    return A.masked_softmax(scores.transpose(-2, -1), None if mask is None else mask.transpose(-2, -1)).transpose(-2, -1)


def _softmax_naive_exp(scores, mask=None):  # exp(s) / sum exp(s), without subtracting the row maximum
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    e = torch.exp(scores)
    w = e / e.sum(dim=-1, keepdim=True)
    return w if mask is None else w.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)


def _softmax_float32(scores, mask=None):
    return A.masked_softmax(scores.float(), mask)


def _softmax_after(scores, mask=None):  # the mask multiplied into the weights after the softmax
    w = torch.softmax(scores, dim=-1)
    return w if mask is None else w * mask


def _softmax_added_mask(scores, mask=None):  # the boolean mask added to the scores as 0/1
    return torch.softmax(scores if mask is None else scores + mask, dim=-1)


def _softmax_ignored_mask(scores, mask=None):
    return torch.softmax(scores, dim=-1)


def _softmax_multiplied_mask(scores, mask=None):  # a hidden key's score becomes 0, an ordinary score
    return torch.softmax(scores if mask is None else scores * mask, dim=-1)


def _softmax_log(scores, mask=None):  # log_softmax: log-probabilities, hidden keys (and empty rows) 0
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.log_softmax(scores, dim=-1).nan_to_num(0.0, neginf=0.0)


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


def _attention_with(q, k, v, mask=None, scale=None, dim=-1, fill=float("-inf"), invert=False, empty=True):
    """Attention as a known mistake computes it (the right one with the defaults)."""
    scores = q @ k.transpose(-2, -1) / (math.sqrt(q.shape[-1]) if scale is None else scale(q, v))
    if mask is not None:
        scores = scores.masked_fill(mask if invert else ~mask, fill)
    w = torch.softmax(scores, dim=dim)
    if mask is not None and empty:  # invert="fill": the empty rows of the original mask zeroed, not the inverted's
        w = w.masked_fill(~(~mask if invert is True else mask).any(dim=-1, keepdim=True), 0.0)
    if dim != -1:
        w = w.nan_to_num(0.0)
    return w @ v, w


def _attention_scaled_by_dv(q, k, v, mask=None):
    return _attention_with(q, k, v, mask, scale=lambda q, v: math.sqrt(v.shape[-1]))


def _attention_unscaled(q, k, v, mask=None):
    return _attention_with(q, k, v, mask, scale=lambda q, v: 1.0)


def _attention_by_d(q, k, v, mask=None):
    return _attention_with(q, k, v, mask, scale=lambda q, v: q.shape[-1])


def _attention_nan_rows(q, k, v, mask=None):
    return _attention_with(q, k, v, mask, empty=False)


def _attention_large_negative(q, k, v, mask=None):
    return _attention_with(q, k, v, mask, fill=-1e9, empty=False)


def _attention_weights_scaled(q, k, v, mask=None):  # 1/sqrt(D) applied to the weights after the softmax
    _, w = _attention_with(q, k, v, mask, scale=lambda q, v: 1.0)
    w = w / math.sqrt(q.shape[-1])
    return w @ v, w


def _attention_over_queries(q, k, v, mask=None):
    return _attention_with(q, k, v, mask, dim=-2)


def _attention_inverted(q, k, v, mask=None):
    return _attention_with(q, k, v, mask, invert=True)


def _attention_inverted_fill(q, k, v, mask=None):
    return _attention_with(q, k, v, mask, invert="fill")


def _attention_swapped(q, k, v, mask=None):
    out, w = _attention_with(q, k, v, mask)
    return w, out


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


def _mha_with(scale="D", split="right", merge="right", in_bias=True, out="right", invert=False, empty=True,
              softmax_dim=-1):
    """Multi-head attention as a known mistake computes it (the right one with the defaults)."""
    def wrong(x, w_qkv, b_qkv, w_out, b_out, n_heads, mask=None):
        B, L, d = x.shape
        D = d // n_heads
        qkv = F.linear(x, w_qkv, b_qkv if in_bias else None)
        if split == "interleaved":  # [q_h | k_h | v_h] per head instead of [q | k | v]
            q, k, v = qkv.reshape(B, L, n_heads, 3 * D).transpose(1, 2).split(D, dim=-1)
        elif split == "heads_first":  # reshape straight to (B, H, L, D): mixes positions and heads
            q, k, v = (t.reshape(B, n_heads, L, D) for t in qkv.split(d, dim=-1))
        else:
            q, k, v = (t.reshape(B, L, n_heads, D).transpose(1, 2) for t in qkv.split(d, dim=-1))
        s = q @ k.transpose(-2, -1) / math.sqrt({"d_model": d, "n_heads": n_heads}.get(scale, D))
        if mask is not None:
            s = s.masked_fill(mask if invert else ~mask, float("-inf"))
        w = torch.softmax(s, dim=softmax_dim)
        if softmax_dim != -1:
            w = w.nan_to_num(0.0)
        if mask is not None and empty:  # invert="fill": the original mask's empty rows zeroed, not the inverted's
            w = w.masked_fill(~(~mask if invert is True else mask).any(dim=-1, keepdim=True), 0.0)
        heads = w @ v  # (B, H, L, D)
        concat = heads.reshape(B, L, d) if merge == "no_transpose" else heads.transpose(1, 2).reshape(B, L, d)
        if out == "none":
            return concat
        if out == "no_bias":
            return F.linear(concat, w_out)
        if out == "not_transposed":
            return concat @ w_out + (0 if b_out is None else b_out)
        return F.linear(concat, w_out, b_out)
    return wrong


def _mha_float32(x, w_qkv, b_qkv, w_out, b_out, n_heads, mask=None):  # every input cast with .float()
    return _mha_with()(*(None if t is None else t.float() for t in (x, w_qkv, b_qkv, w_out, b_out)), n_heads, mask)


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
            "multiplied by sqrt(D); divide by it instead":
                lambda q, k: q @ k.transpose(-2, -1) * math.sqrt(q.shape[-1]),
            "divided by the square root of the number of keys (Lk); D is the LAST axis of q, the head dimension":
                lambda q, k: q @ k.transpose(-2, -1) / math.sqrt(k.shape[-2]),
            "rows are queries, columns are keys: q @ k^T is (B, H, Lq, Lk); k @ q^T gives (B, H, Lk, Lq)":
                lambda q, k: k @ q.transpose(-2, -1) / math.sqrt(q.shape[-1]),
            "k.T reverses all four axes of a 4-D tensor: transpose only the last two axes, k.transpose(-2, -1)":
                _scores_k_T,
            "k.transpose(1, 2) swaps the heads and the keys: transpose only the last two axes, k.transpose(-2, -1)":
                lambda q, k: q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]),
            "float64 came back as float32: keep the input's dtype (no .float(), no new float32 tensors)":
                lambda q, k: (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1]),
            "divided by the square root of the number of queries (Lq); D is the LAST axis of q, the head dimension":
                lambda q, k: q @ k.transpose(-2, -1) / math.sqrt(q.shape[-2]),
        },
        unchanged=True,
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
            "NaN in a row whose keys are all masked (softmax of all -inf is 0/0): set the rows where no key "
            "is visible (mask.any(-1) is False) to 0 after the softmax":
                _softmax_nan_rows,
            "the mask is inverted: True means 'may attend', so hide the scores where mask is False (~mask)":
                _softmax_inverted,
            "the mask is inverted (masked_fill(mask, ...) hides the keys that may be attended): hide ~mask":
                _softmax_inverted_fill,
            "softmax over the wrong axis: it runs over the keys, dim=-1":
                _softmax_wrong_axis,
            "exp overflowed on large scores: subtract each row's maximum before exp (torch.softmax does)":
                _softmax_naive_exp,
            "float64 came back as float32: keep the dtype of scores (no .float())":
                _softmax_float32,
            "the mask was applied after the softmax: set hidden scores to -inf BEFORE the softmax":
                _softmax_after,
            "added the boolean mask to the scores as numbers (True = 1): fill the hidden scores with -inf":
                _softmax_added_mask,
            "the mask was ignored: every key kept its weight; fill the scores where mask is False with -inf":
                _softmax_ignored_mask,
            "multiplied the scores by the mask: a hidden key gets score 0, an ordinary score; fill them with -inf":
                _softmax_multiplied_mask,
            "returned log-probabilities (log_softmax); the weights are the probabilities: torch.softmax":
                _softmax_log,
        },
        unchanged=True,
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
            "divided by D; the scale is 1/sqrt(D)": _attention_by_d,
            "NaN for a query that sees no key (softmax of all -inf): set its weights to 0 after the softmax":
                _attention_nan_rows,
            "a large negative fill makes a query that sees no key average all the values: fill with -inf "
            "and set the weights of rows with no visible key to 0": _attention_large_negative,
            "the softmax ran over the queries (dim=-2); it runs over the keys (dim=-1)": _attention_over_queries,
            "the mask is inverted: True means 'may attend', so hide the scores where mask is False (~mask)":
                _attention_inverted,
            "the mask is inverted (masked_fill(mask, ...) hides the keys that may be attended): hide ~mask":
                _attention_inverted_fill,
            "returned (weights, out); the order is (out, weights)": _attention_swapped,
            "divided the weights by sqrt(D) after the softmax: the scale goes on the scores, before the softmax":
                _attention_weights_scaled,
        },
        unchanged=True,
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
            "scaled by sqrt(d_model); each head scales by sqrt(D), D = d_model / n_heads":
                _mha_with(scale="d_model"),
            "split into heads with reshape(B, H, L, D): that mixes positions and heads; "
            "reshape(B, L, H, D) then transpose(1, 2)":
                _mha_with(split="heads_first"),
            "the heads were concatenated without transpose(1, 2) before the reshape: (B, H, L, D) must become "
            "(B, L, H, D) first": _mha_with(merge="no_transpose"),
            "forgot the output projection: the concatenated heads go through F.linear(concat, w_out, b_out)":
                _mha_with(out="none"),
            "forgot the biases b_qkv and b_out: F.linear(x, w_qkv, b_qkv) and F.linear(concat, w_out, b_out)":
                _mha_with(in_bias=False, out="no_bias"),
            "forgot the output bias b_out: F.linear(concat, w_out, b_out)": _mha_with(out="no_bias"),
            "w_out is stored (out, in), like nn.Linear's weight: concat @ w_out.T + b_out":
                _mha_with(out="not_transposed"),
            "the fused projection is [q | k | v] along the last axis (each d_model wide), not [q_h | k_h | v_h] "
            "per head": _mha_with(split="interleaved"),
            "the mask is inverted: ours says True = may attend (nn.MultiheadAttention's True = hide)":
                _mha_with(invert=True),
            "the mask is inverted (masked_fill(mask, ...) hides the keys that may be attended): hide ~mask":
                _mha_with(invert="fill"),
            "NaN for the empty sequence: fully masked rows give zero attention output (weights set to 0)":
                _mha_with(empty=False),
            "scaled by sqrt(n_heads); each head scales by sqrt(D), D = d_model / n_heads": _mha_with(scale="n_heads"),
            "the softmax ran over the queries (dim=-2); it runs over the keys (dim=-1)": _mha_with(softmax_dim=-2),
            "float64 came back as float32: keep the dtype of x, no .float()":
                _mha_float32,
        },
        hint="F.linear(x, w_qkv, b_qkv) = [q | k | v]; heads (B, L, H, D) -> (B, H, L, D); softmax(q k^T / sqrt(D)) "
             "with the mask (True = may attend), zero weights for rows with no visible key; concatenate; "
             "F.linear(concat, w_out, b_out); a ValueError when n_heads does not divide d_model",
    ),
]
