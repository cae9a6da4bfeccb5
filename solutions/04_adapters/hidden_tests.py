"""Hidden tests of lecture 04, decided by the grader outside the learner's kernel.

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

from transformer_lab import adapters as AD
from transformer_lab import attention as A

# --------------------------------------------------------------------------- ex1: bottleneck_adapter


def adapter_reference(h, w_down, b_down, w_up, b_up):
    """The library's BottleneckAdapter (ReLU) with the given weights."""
    m, d = w_down.shape
    ref = AD.BottleneckAdapter(d, m, activation="relu").to(h.dtype)
    with torch.no_grad():
        ref.down.weight.copy_(w_down)
        ref.down.bias.copy_(b_down)
        ref.up.weight.copy_(w_up)
        ref.up.bias.copy_(b_up)
        return ref(h)


def adapter_cases(rng):
    # the square case first: a forgotten .T gives wrong numbers there, not a shape error, so its hint shows
    for lead, d, m, dtype in [((2, 2, 3), 6, 6, torch.float64), ((3, 5), 8, 4, torch.float64),
                              ((7,), 16, 2, torch.float32), ((4, 9), 5, 1, torch.float32)]:
        h = torch.randn(*lead, d, generator=rng, dtype=dtype) * 2
        w_down = torch.randn(m, d, generator=rng, dtype=dtype)
        b_down = torch.randn(m, generator=rng, dtype=dtype)
        w_up = torch.randn(d, m, generator=rng, dtype=dtype)
        b_up = torch.randn(d, generator=rng, dtype=dtype)
        square = " (square: m = d)" if m == d else ""
        yield Case(f"h {(*lead, d)}, bottleneck m={m}{square}, {dtype}", h, w_down, b_down, w_up, b_up)
    h = torch.randn(2, 3, 4, generator=rng, dtype=torch.float64)
    yield Case("h (2, 3, 4), w_up = 0 and b_up = 0 (the identity at initialisation), float64", h,
               torch.randn(3, 4, generator=rng, dtype=torch.float64), torch.randn(3, generator=rng, dtype=torch.float64),
               torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))


def _ad_no_residual(h, w_down, b_down, w_up, b_up):
    return F.relu(h @ w_down.T + b_down) @ w_up.T + b_up


def _ad_no_relu(h, w_down, b_down, w_up, b_up):
    return h + (h @ w_down.T + b_down) @ w_up.T + b_up


def _ad_relu_after_up(h, w_down, b_down, w_up, b_up):
    return h + F.relu((h @ w_down.T + b_down) @ w_up.T + b_up)


def _ad_gelu(h, w_down, b_down, w_up, b_up):
    return h + F.gelu(h @ w_down.T + b_down) @ w_up.T + b_up


def _ad_no_transpose(h, w_down, b_down, w_up, b_up):
    return h + F.relu(h @ w_down + b_down) @ w_up + b_up


def _ad_no_b_up(h, w_down, b_down, w_up, b_up):
    return h + F.relu(h @ w_down.T + b_down) @ w_up.T


def _ad_relu_on_sum(h, w_down, b_down, w_up, b_up):
    return F.relu(h + F.relu(h @ w_down.T + b_down) @ w_up.T + b_up)


def _ad_relu_moved_to_sum(h, w_down, b_down, w_up, b_up):
    return F.relu(h + (h @ w_down.T + b_down) @ w_up.T + b_up)


# --------------------------------------------------------------------------- ex2: lora_linear


def lora_reference(x, weight, bias, A, B, alpha):
    """The library's LoRALinear on an nn.Linear holding weight and bias, with the given A and B."""
    d_out, d_in = weight.shape
    base = nn.Linear(d_in, d_out, bias=bias is not None).to(x.dtype)
    with torch.no_grad():
        base.weight.copy_(weight)
        if bias is not None:
            base.bias.copy_(bias)
        lora = AD.LoRALinear(base, r=A.shape[0], alpha=alpha)
        lora.A.copy_(A)
        lora.B.copy_(B)
        return lora(x)


def lora_cases(rng):
    for lead, d_in, d_out, r, alpha, dtype, has_bias in [
            ((3, 4), 6, 5, 2, 4.0, torch.float64, True),
            ((2,), 8, 8, 8, 16.0, torch.float32, True),
            ((2, 3, 2), 7, 4, 3, 1.0, torch.float64, False),
            ((5,), 12, 20, 1, 3.0, torch.float32, True)]:
        x = torch.randn(*lead, d_in, generator=rng, dtype=dtype)
        weight = torch.randn(d_out, d_in, generator=rng, dtype=dtype)
        bias = torch.randn(d_out, generator=rng, dtype=dtype) if has_bias else None
        A_ = torch.randn(r, d_in, generator=rng, dtype=dtype)
        B_ = torch.randn(d_out, r, generator=rng, dtype=dtype)
        yield Case(f"x {(*lead, d_in)}, Linear({d_in} -> {d_out}), r={r}, alpha={alpha}, "
                   f"{'bias' if has_bias else 'bias None'}, {dtype}", x, weight, bias, A_, B_, alpha)
    x = torch.randn(3, 6, generator=rng, dtype=torch.float64)
    yield Case("B = 0 (the start of training), r=2, alpha=4.0, float64", x,
               torch.randn(5, 6, generator=rng, dtype=torch.float64), torch.randn(5, generator=rng, dtype=torch.float64),
               torch.randn(2, 6, generator=rng, dtype=torch.float64), torch.zeros(5, 2, dtype=torch.float64), 4.0)


def _lora_alpha_not_divided(x, weight, bias, A, B, alpha):
    return F.linear(x, weight, bias) + alpha * (x @ A.T) @ B.T


def _lora_no_scale(x, weight, bias, A, B, alpha):
    return F.linear(x, weight, bias) + (x @ A.T) @ B.T


def _lora_r_from_B(x, weight, bias, A, B, alpha):
    return F.linear(x, weight, bias) + (alpha / B.shape[0]) * (x @ A.T) @ B.T


def _lora_r_from_d_in(x, weight, bias, A, B, alpha):
    return F.linear(x, weight, bias) + (alpha / A.shape[1]) * (x @ A.T) @ B.T


def _lora_r_over_alpha(x, weight, bias, A, B, alpha):
    return F.linear(x, weight, bias) + (A.shape[0] / alpha) * (x @ A.T) @ B.T


def _lora_no_bias(x, weight, bias, A, B, alpha):
    return x @ weight.T + (alpha / A.shape[0]) * (x @ A.T) @ B.T


def _lora_floor_division(x, weight, bias, A, B, alpha):
    return F.linear(x, weight, bias) + (alpha // A.shape[0]) * (x @ A.T) @ B.T


# --------------------------------------------------------------------------- ex3: sequence_log_prob


def sequence_cases(rng):
    logits = torch.randn(4, 7, 9, generator=rng, dtype=torch.float64) * 2
    ids = torch.randint(0, 9, (4, 7), generator=rng)
    lengths = torch.tensor([7, 5, 2, 1])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    yield Case("logits (4, 7, 9), right padding to lengths [7, 5, 2, 1] (the last row has one real token), float64",
               logits, ids, mask)
    logits = torch.randn(3, 6, 11, generator=rng)
    ids = torch.randint(0, 11, (3, 6), generator=rng)
    yield Case("logits (3, 6, 11), mask=None, float32", logits, ids)
    logits = torch.randn(2, 1, 5, generator=rng, dtype=torch.float64)
    ids = torch.randint(0, 5, (2, 1), generator=rng)
    yield Case("logits (2, 1, 5): sequences of one token, nothing to score, float64", logits, ids,
               torch.ones(2, 1, dtype=torch.bool))
    logits = torch.randn(2, 5, 6, generator=rng) * 60
    ids = torch.randint(0, 6, (2, 5), generator=rng)
    ids[0, 1:] = logits[0, :-1].argmin(-1)                 # row 0: the least likely tokens, p about e^-200
    yield Case("logits of size about 60 (a confident model: the softmax underflows), mask all True, float32",
               logits, ids, torch.ones(2, 5, dtype=torch.bool))


def _picked(logits, ids, shift=True):
    if shift:
        return torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[..., None]).squeeze(-1)


def _seq_no_shift(logits, ids, mask=None):
    picked = _picked(logits, ids, shift=False)
    return (picked if mask is None else picked * mask).sum(-1)


def _seq_no_shift_from_one(logits, ids, mask=None):
    picked = _picked(logits, ids, shift=False)[:, 1:]
    return (picked if mask is None else picked * mask[:, 1:]).sum(-1)


def _seq_mean(logits, ids, mask=None):
    picked = _picked(logits, ids)
    keep = torch.ones_like(picked) if mask is None else mask[:, 1:].to(picked.dtype)
    return (picked * keep).sum(-1) / keep.sum(-1).clamp_min(1.0)


def _seq_probabilities(logits, ids, mask=None):
    picked = _picked(logits, ids).exp()
    return (picked if mask is None else picked * mask[:, 1:]).sum(-1)


def _seq_mask_ignored(logits, ids, mask=None):
    return _picked(logits, ids).sum(-1)


def _seq_mask_off_by_one(logits, ids, mask=None):
    picked = _picked(logits, ids)
    return (picked if mask is None else picked * mask[:, :-1]).sum(-1)


def _seq_log_of_softmax(logits, ids, mask=None):
    p = torch.softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    picked = torch.log(p)                                  # -inf where the softmax underflows to 0
    return (picked if mask is None else picked.masked_fill(~mask[:, 1:], 0.0)).sum(-1)


# --------------------------------------------------------------------------- ex4: prefix_attention


def prefix_cases(rng):
    q = torch.randn(2, 3, 5, 4, generator=rng, dtype=torch.float64)
    k, v = (torch.randn(2, 3, 7, 4, generator=rng, dtype=torch.float64) for _ in range(2))
    pk, pv = (torch.randn(3, 2, 4, generator=rng, dtype=torch.float64) for _ in range(2))
    yield Case("q (2, 3, 5, 4), k, v (2, 3, 7, 4), prefix (3, 2, 4), causal mask (5, 7), float64",
               q, k, v, pk, pv, A.causal_mask(5, 7))
    q = torch.randn(1, 2, 4, 8, generator=rng)
    k, v = (torch.randn(1, 2, 4, 8, generator=rng) for _ in range(2))
    pk, pv = (torch.randn(2, 1, 8, generator=rng) for _ in range(2))
    yield Case("q, k, v (1, 2, 4, 8), prefix of P = 1, mask None, float32", q, k, v, pk, pv)
    q = torch.randn(3, 2, 6, 4, generator=rng, dtype=torch.float64)
    k, v = (torch.randn(3, 2, 6, 4, generator=rng, dtype=torch.float64) for _ in range(2))
    pk, pv = (torch.randn(2, 3, 4, generator=rng, dtype=torch.float64) for _ in range(2))
    yield Case("padding mask (3, 1, 1, 6) for lengths [6, 2, 0] (sequence 2 has no real key), P = 3, float64",
               q, k, v, pk, pv, A.padding_mask(torch.tensor([6, 2, 0]), 6))
    q = torch.randn(2, 2, 3, 6, generator=rng, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 5, 6, generator=rng, dtype=torch.float64) for _ in range(2))
    pk, pv = (torch.randn(2, 4, 6, generator=rng, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(2, 2, 3, 5, generator=rng) > 0.5
    mask[0, 1, 2] = False                                   # one query with every real key hidden
    yield Case("a random boolean mask (2, 2, 3, 5) with a fully masked row, P = 4, float64",
               q, k, v, pk, pv, mask)


def _prefix_ignored(q, k, v, prefix_k, prefix_v, mask=None):
    return A.scaled_dot_product_attention(q, k, v, mask=mask)


def _prefix_no_scale(q, k, v, prefix_k, prefix_v, mask=None):
    k2, v2, m2, _ = A.prepend_kv_prefix(k, v, prefix_k, prefix_v, mask)
    return A.scaled_dot_product_attention(q, k2, v2, mask=m2, scale=1.0)


def _prefix_swapped(q, k, v, prefix_k, prefix_v, mask=None):
    return AD.prefix_attention(q, k, v, prefix_v, prefix_k, mask)


def _prefix_scale_by_keys(q, k, v, prefix_k, prefix_v, mask=None):
    k2, v2, m2, _ = A.prepend_kv_prefix(k, v, prefix_k, prefix_v, mask)
    return A.scaled_dot_product_attention(q, k2, v2, mask=m2, scale=1.0 / math.sqrt(k2.shape[2]))


def _prefix_scale_by_width(q, k, v, prefix_k, prefix_v, mask=None):
    k2, v2, m2, _ = A.prepend_kv_prefix(k, v, prefix_k, prefix_v, mask)
    width = q.shape[1] * q.shape[-1]                        # H * D = d_model
    return A.scaled_dot_product_attention(q, k2, v2, mask=m2, scale=1.0 / math.sqrt(width))


def _prefix_mask_inverted(q, k, v, prefix_k, prefix_v, mask=None):
    return AD.prefix_attention(q, k, v, prefix_k, prefix_v, None if mask is None else ~mask)


TESTS = [
    HiddenTest(
        cell="ex1_bottleneck_adapter_test",
        function="bottleneck_adapter",
        cases=adapter_cases,
        reference=adapter_reference,
        blocked=[AD.BottleneckAdapter, AD.SerialAdapter, AD.ParallelAdapter],
        unchanged=True,
        mistakes={
            "the residual is missing: the adapter returns h + its branch, not the branch alone (the popular "
            "demo's adapter)":
                _ad_no_residual,
            "the ReLU is missing: relu(h W_down^T + b_down) comes between the two projections":
                _ad_no_relu,
            "the ReLU goes between the projections, on the bottleneck, not after W_up":
                _ad_relu_after_up,
            "that is GELU: the exercise asks for ReLU between the projections":
                _ad_gelu,
            "forgot the .T: the weights are in nn.Linear's (out, in) layout, so h W_down^T is h @ w_down.T":
                _ad_no_transpose,
            "b_up is missing: the up-projection has a bias too, ... @ w_up.T + b_up":
                _ad_no_b_up,
            "an extra ReLU on the whole sum: the only nonlinearity is between the projections; the residual h is "
            "added as it is":
                _ad_relu_on_sum,
            "the ReLU is on the whole sum instead of between the projections: relu(h W_down^T + b_down), then "
            "W_up; the residual h is added as it is":
                _ad_relu_moved_to_sum,
        },
        hint="h + relu(h @ w_down.T + b_down) @ w_up.T + b_up over the last axis, in the dtype of h",
    ),
    HiddenTest(
        cell="ex2_lora_linear_test",
        function="lora_linear",
        cases=lora_cases,
        reference=lora_reference,
        blocked=[AD.LoRALinear, AD.add_lora, AD.merge_lora],
        mistakes={
            "the update is scaled by alpha / r, not by alpha":
                _lora_alpha_not_divided,
            "the update is scaled by alpha / r: the scale is missing":
                _lora_no_scale,
            "r is the rank, A.shape[0]; B.shape[0] is d_out":
                _lora_r_from_B,
            "r is the rank, A.shape[0]; A.shape[1] is d_in":
                _lora_r_from_d_in,
            "the scale is alpha / r, not r / alpha":
                _lora_r_over_alpha,
            "the bias of the frozen layer is missing: x W^T + b + ... (and no b when bias is None)":
                _lora_no_bias,
            "alpha // r rounds the scale down: alpha / r is a true division":
                _lora_floor_division,
        },
        hint="x @ weight.T + bias + (alpha / r) * (x @ A.T) @ B.T with r = A.shape[0]; bias may be None; "
             "keep the dtype of x",
    ),
    HiddenTest(
        cell="ex3_sequence_log_prob_test",
        function="sequence_log_prob",
        cases=sequence_cases,
        reference=AD.sequence_log_prob,
        blocked=[AD.sequence_log_prob, AD.pet_scores],
        mistakes={
            "no shift: the logits at position t predict token t + 1, so token t is scored by logits[:, t - 1]":
                _seq_no_shift,
            "off by one: token t is scored by logits[:, t - 1] (logits[:, :-1] against ids[:, 1:])":
                _seq_no_shift_from_one,
            "that is the mean: the log-probability of a text is the sum over its tokens":
                _seq_mean,
            "that adds probabilities: sum the log-probabilities (log_softmax)":
                _seq_probabilities,
            "the mask is ignored: padded tokens (mask False) must contribute nothing":
                _seq_mask_ignored,
            "the mask is off by one: token t counts where mask[:, t] is True, so the scored tokens 1..L-1 "
            "take mask[:, 1:], not mask[:, :-1]":
                _seq_mask_off_by_one,
            "log(softmax(...)) underflows to -inf for large logits: use torch.log_softmax":
                _seq_log_of_softmax,
        },
        hint="sum over t >= 1 of log_softmax(logits[:, t - 1])[ids[:, t]] (log_softmax over the last axis), "
             "skipping padded tokens; a row with one real token scores 0; keep the dtype of logits",
    ),
    HiddenTest(
        cell="ex4_prefix_attention_test",
        function="prefix_attention",
        cases=prefix_cases,
        reference=AD.prefix_attention,
        blocked=[AD.prefix_attention, AD.PrefixTuning, A.prepend_kv_prefix, A.scaled_dot_product_attention,
                 A.fast_attention, A.masked_softmax, A.attention_scores, A.MultiHeadAttention,
                 F.scaled_dot_product_attention, F.multi_head_attention_forward, nn.MultiheadAttention],
        mistakes={
            "the prefix is missing: put prefix_k and prefix_v in front of k and v (torch.cat along dim=2), "
            "and let every query see them":
                _prefix_ignored,
            "the 1/sqrt(D) scale is missing (D = q.shape[-1])":
                _prefix_no_scale,
            "prefix_k and prefix_v are swapped: the prefix's keys go with k, its values with v":
                _prefix_swapped,
            "the scale is 1/sqrt(D) with D the head dimension, not the number of keys":
                _prefix_scale_by_keys,
            "the scale is 1/sqrt(D) with D = q.shape[-1], the head dimension, not the model width H * D":
                _prefix_scale_by_width,
            "the mask is inverted: True means may attend, so hide the real keys where mask is False":
                _prefix_mask_inverted,
        },
        hint="softmax(q [K_p; K]^T / sqrt(D) with masked real keys at -inf) [V_p; V]; the prefix's columns "
             "are never masked, so a query with no visible real key reads the prefix alone; keep the dtype of q",
    ),
]
