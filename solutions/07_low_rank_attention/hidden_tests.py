"""Hidden tests of lecture 07, decided by the grader outside the learner's kernel.

Each test draws fresh inputs from the course secret, computes the expected values with the
library's reference here, and runs the learner's function in a sandboxed process where that
reference (and the library's helpers for it, and PyTorch's shortcut) does not exist. See
``autograder/hidden.py``.

Exercise 2 also promises never to form the (Lq, Lk) matrix: ``drive_kernel_attention`` (a
top-level ``def`` that runs in the learner's process) calls the learner's function under
``lowrank.largest_tensor`` (a ``TorchDispatchMode`` that sees every tensor PyTorch makes) and
returns the output with a flag, 1 when some tensor had B H Lq Lk numbers or more. Every case
has Lq Lk well above Lq n_f, Lq Dv and n_f Dv, so only the (Lq, Lk) matrix can raise the flag.
Each mistake is written as the wrong answer a learner types.
"""

import math

import torch
import torch.nn.functional as F
from autograder.hidden import Case, HiddenTest

from transformer_lab import lowrank as LR


def _identity(x):
    return x


# --------------------------------------------------------------------------- ex1: softmax_features


def softmax_features_reference(x, W):
    return LR.positive_features(x * x.shape[-1] ** -0.25, W)  # exp(x' W^T - |x'|^2/2) / sqrt(n_f)


def _features(x, W, scale, half=2.0, norm=None):
    xs = x * scale
    n_f = W.shape[0]
    norm = math.sqrt(n_f) if norm is None else norm
    return torch.exp(xs @ W.to(x.dtype).T - (xs * xs).sum(-1, keepdim=True) / half) / norm


def features_cases(rng):
    def draw(*shape, dtype=torch.float64, s=1.0):
        return torch.randn(*shape, generator=rng, dtype=dtype) * s

    yield Case("x (5, 8), W (6, 8), float64", draw(5, 8), draw(6, 8))
    yield Case("x (2, 3, 7, 4), W (10, 4), float32", draw(2, 3, 7, 4, dtype=torch.float32),
               draw(10, 4, dtype=torch.float32))
    W = LR.gaussian_features(16, 16, rng, orthogonal=True, dtype=torch.float64)
    yield Case("x (1, 2, 9, 16) of norm about 2, orthogonal W (16, 16), float64", draw(1, 2, 9, 16, s=0.5), W)
    yield Case("D = 1: x (4, 1), W (3, 1), float64", draw(4, 1), draw(3, 1))


# --------------------------------------------------------------------------- ex2: kernel_attention


def drive_kernel_attention(fn, fq, fk, v, eps):
    """Runs in the learner's process: the output, and 1 if a tensor of B H Lq Lk numbers was made."""
    from transformer_lab import lowrank

    result = {}

    def run():
        result["out"] = fn(fq, fk, v, eps)

    numel, _ = lowrank.largest_tensor(run)
    B, H, Lq, _ = fq.shape
    formed = int(numel >= B * H * Lq * fk.shape[2])
    return result["out"], formed


def kernel_attention_reference(fq, fk, v, eps):
    return LR.linear_attention(fq, fk, v, feature_map=_identity, eps=eps), 0


def _weights(fq, fk):
    return fq @ fk.transpose(-2, -1)  # (B, H, Lq, Lk)


def kernel_cases(rng):
    def feats(*shape, dtype=torch.float64):
        return torch.rand(*shape, generator=rng, dtype=dtype)

    def vals(*shape, dtype=torch.float64):
        return torch.randn(*shape, generator=rng, dtype=dtype)

    yield Case("B = 2, H = 3, Lq = Lk = 40, n_f = 6, Dv = 5, float64",
               feats(2, 3, 40, 6), feats(2, 3, 40, 6), vals(2, 3, 40, 5), 1e-6)
    yield Case("Lq = 36 queries, Lk = 48 keys, n_f = 4, Dv = 7, float32",
               feats(1, 2, 36, 4, dtype=torch.float32), feats(1, 2, 48, 4, dtype=torch.float32),
               vals(1, 2, 48, 7, dtype=torch.float32), 1e-6)
    fq = feats(1, 1, 32, 3)
    fq[0, 0, 5] = 0.0  # a query whose features are all zero: output 0, not NaN
    yield Case("query 5 has all-zero features (0 / (0 + eps) = 0), Lq = Lk = 32, float64",
               fq, feats(1, 1, 32, 3), vals(1, 1, 32, 4), 1e-6)
    yield Case("eps = 0.5, Lq = Lk = 30, n_f = 2, Dv = 3, float64",
               feats(2, 1, 30, 2), feats(2, 1, 30, 2), vals(2, 1, 30, 3), 0.5)


# --------------------------------------------------------------------------- ex3: rnn_step


def rnn_step_reference(fq_t, fk_t, v_t, S, z, eps=1e-6):
    out, state = LR.linear_attention_step(fq_t, fk_t, v_t, LR.LinearAttentionState(S, z),
                                          feature_map=_identity, eps=eps)
    return out, state.S, state.z


def _outer(a, b):
    return a[..., :, None] * b[..., None, :]


def rnn_cases(rng):
    def feats(*shape, dtype=torch.float64):
        return torch.rand(*shape, generator=rng, dtype=dtype)

    def state(B, H, n_f, Dv, dtype=torch.float64):  # a state built from a few earlier tokens
        fk = feats(B, H, 3, n_f, dtype=dtype)
        v = torch.randn(B, H, 3, Dv, generator=rng, dtype=dtype)
        return fk.transpose(-2, -1) @ v, fk.sum(-2)

    # First a case that tells every mistake apart: a square state (a transposed outer product only
    # shows, and only runs, when n_f = Dv) and a large eps (so that leaving it out shows).
    S, z = state(2, 2, 6, 6, torch.float32)
    yield Case("n_f = Dv = 6 (a square state), eps = 0.25, float32", feats(2, 2, 6, dtype=torch.float32),
               feats(2, 2, 6, dtype=torch.float32), torch.randn(2, 2, 6, generator=rng), S, z, eps=0.25)
    S, z = state(2, 3, 4, 5)
    yield Case("B = 2, H = 3, n_f = 4, Dv = 5, float64", feats(2, 3, 4), feats(2, 3, 4),
               torch.randn(2, 3, 5, generator=rng, dtype=torch.float64), S, z)
    yield Case("the first token: S and z all zeros, n_f = 3, Dv = 2, float64", feats(1, 1, 3), feats(1, 1, 3),
               torch.randn(1, 1, 2, generator=rng, dtype=torch.float64),
               torch.zeros(1, 1, 3, 2, dtype=torch.float64), torch.zeros(1, 1, 3, dtype=torch.float64))
    S, z = state(1, 1, 3, 4)
    yield Case("a query with all-zero features (0 / (0 + eps) = 0), float64", torch.zeros(1, 1, 3, dtype=torch.float64),
               feats(1, 1, 3), torch.randn(1, 1, 4, generator=rng, dtype=torch.float64), S, z)
    S, z = state(2, 1, 2, 3)
    yield Case("eps = 0.25, n_f = 2, Dv = 3, float64", feats(2, 1, 2), feats(2, 1, 2),
               torch.randn(2, 1, 3, generator=rng, dtype=torch.float64), S, z, eps=0.25)


def _read(fq_t, S, z, eps):
    return (fq_t[..., None, :] @ S).squeeze(-2) / ((fq_t * z).sum(-1, keepdim=True) + eps)


TESTS = [
    HiddenTest(
        cell="ex1_softmax_features_test",
        function="softmax_features",
        cases=features_cases,
        reference=softmax_features_reference,
        blocked=[LR.positive_features, LR.softmax_kernel_estimate, LR.performer_attention,
                 LR.PerformerSelfAttention],
        mistakes={
            "no D^(-1/4) scaling: use x' = x * D**-0.25, D = x.shape[-1]":
                lambda x, W: _features(x, W, 1.0),
            "scaled x by D^(-1/2): each of q and k gets D^(-1/4), half of the 1/sqrt(D)":
                lambda x, W: _features(x, W, x.shape[-1] ** -0.5),
            "forgot the - |x'|^2 / 2 in the exponent (the h(x) = exp(-|x|^2/2) factor)":
                lambda x, W: torch.exp((x * x.shape[-1] ** -0.25) @ W.to(x.dtype).T) / math.sqrt(W.shape[0]),
            "used - |x'|^2 instead of - |x'|^2 / 2": lambda x, W: _features(x, W, x.shape[-1] ** -0.25, half=1.0),
            "subtracted |x|^2 / 2, the squared norm of x before the scaling: both terms use x' = x * D**-0.25":
                lambda x, W: torch.exp((x * x.shape[-1] ** -0.25) @ W.to(x.dtype).T - (x * x).sum(-1, keepdim=True) / 2)
                / math.sqrt(W.shape[0]),
            "divided by n_f instead of sqrt(n_f)":
                lambda x, W: _features(x, W, x.shape[-1] ** -0.25, norm=W.shape[0]),
            "forgot the 1 / sqrt(n_f)": lambda x, W: _features(x, W, x.shape[-1] ** -0.25, norm=1.0),
        },
        hint="phi(x) = exp(x' W^T - |x'|^2 / 2) / sqrt(n_f) with x' = x * D**-0.25, the squared norm per row "
             "(keepdim=True); keep the input's dtype",
        unchanged=True,
    ),
    HiddenTest(
        cell="ex2_kernel_attention_test",
        function="kernel_attention",
        cases=kernel_cases,
        reference=kernel_attention_reference,
        driver=drive_kernel_attention,
        outputs=("out", "formed the (Lq, Lk) matrix (1 = yes)"),
        blocked=[LR.linear_attention, LR.performer_attention, LR.LinearSelfAttention,
                 LR.PerformerSelfAttention, LR.linear_attention_recurrent, LR.linear_attention_step,
                 LR._kernel_attention, LR._chunked_causal_plain, F.scaled_dot_product_attention],
        mistakes={
            "you formed the (Lq, Lk) matrix fq @ fk^T: compute fk^T v (n_f, Dv) and the sum of fk over the "
            "keys first, then multiply by fq":
                lambda fq, fk, v, eps: ((_weights(fq, fk) @ v) / (_weights(fq, fk).sum(-1, keepdim=True) + eps), 1),
            "forgot to divide by fq_i . sum_j fk_j + eps: the weights of a row must sum to 1":
                lambda fq, fk, v, eps: (fq @ (fk.transpose(-2, -1) @ v), 0),
            "no eps in the denominator: a query with all-zero features gives 0 / 0 = NaN":
                lambda fq, fk, v, eps: ((fq @ (fk.transpose(-2, -1) @ v))
                                        / (fq * fk.sum(-2)[..., None, :]).sum(-1, keepdim=True), 0),
            "added eps to the quotient, not to the denominator: num / (den + eps)":
                lambda fq, fk, v, eps: ((fq @ (fk.transpose(-2, -1) @ v))
                                        / (fq * fk.sum(-2)[..., None, :]).sum(-1, keepdim=True) + eps, 0),
            "divided by the number of keys (a plain mean), not by fq_i . sum_j fk_j":
                lambda fq, fk, v, eps: (fq @ (fk.transpose(-2, -1) @ v) / fk.shape[-2], 0),
            "divided by the sum of fq_i's features: the normaliser is fq_i . (sum_j fk_j)":
                lambda fq, fk, v, eps: ((fq @ (fk.transpose(-2, -1) @ v)) / (fq.sum(-1, keepdim=True) + eps), 0),
        },
        hint="out_i = fq_i (fk^T v) / (fq_i . sum_j fk_j + eps), with fk^T v = fk.transpose(-2, -1) @ v and the "
             "sum over the keys fk.sum(dim=-2); the denominator keeps its last dim (keepdim=True: (B, H, Lq, 1)); "
             "keep the dtype",
    ),
    HiddenTest(
        cell="ex3_rnn_step_test",
        function="rnn_step",
        cases=rnn_cases,
        reference=rnn_step_reference,
        outputs=("out_t", "S_new", "z_new"),
        unchanged=True,
        blocked=[LR.linear_attention_step, LR.linear_attention_recurrent, LR.linear_attention,
                 LR.LinearSelfAttention, LR.performer_attention, LR._kernel_attention,
                 LR._chunked_causal_plain, LR._chunked_causal, F.scaled_dot_product_attention],
        mistakes={
            "read the state before adding token t: out_t must use S_new and z_new (token t attends to itself)":
                lambda fq_t, fk_t, v_t, S, z, eps=1e-6: (_read(fq_t, S, z, eps), S + _outer(fk_t, v_t), z + fk_t),
            "the outer product is transposed: S_new[r, c] = S[r, c] + fk_t[r] * v_t[c], rows for features":
                lambda fq_t, fk_t, v_t, S, z, eps=1e-6: (
                    _read(fq_t, S + _outer(v_t, fk_t), z + fk_t, eps), S + _outer(v_t, fk_t), z + fk_t),
            "normalised with the old z: the denominator is fq_t . z_new, with z_new = z + fk_t":
                lambda fq_t, fk_t, v_t, S, z, eps=1e-6: (
                    (fq_t[..., None, :] @ (S + _outer(fk_t, v_t))).squeeze(-2)
                    / ((fq_t * z).sum(-1, keepdim=True) + eps), S + _outer(fk_t, v_t), z + fk_t),
            "multiplied the state from the wrong side: the numerator is fq_t S_new, a (1, n_f) row times the "
            "(n_f, Dv) state, (fq_t[..., None, :] @ S_new).squeeze(-2), not S_new @ fq_t":
                lambda fq_t, fk_t, v_t, S, z, eps=1e-6: (
                    ((S + _outer(fk_t, v_t)) @ fq_t[..., :, None]).squeeze(-1)
                    / ((fq_t * (z + fk_t)).sum(-1, keepdim=True) + eps), S + _outer(fk_t, v_t), z + fk_t),
            "forgot the normalisation by fq_t . z_new + eps":
                lambda fq_t, fk_t, v_t, S, z, eps=1e-6: (
                    (fq_t[..., None, :] @ (S + _outer(fk_t, v_t))).squeeze(-2), S + _outer(fk_t, v_t), z + fk_t),
            "no eps in the denominator: a query with all-zero features gives 0 / 0 = NaN":
                lambda fq_t, fk_t, v_t, S, z, eps=1e-6: (
                    _read(fq_t, S + _outer(fk_t, v_t), z + fk_t, 0.0), S + _outer(fk_t, v_t), z + fk_t),
        },
        hint="S_new = S + outer(fk_t, v_t) (fk_t[..., :, None] * v_t[..., None, :]), z_new = z + fk_t, then "
             "out_t = fq_t S_new / (fq_t . z_new + eps), the denominator (B, H, 1) (keepdim=True); return new "
             "tensors and keep the dtype",
    ),
]
