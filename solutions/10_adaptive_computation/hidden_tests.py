"""Hidden tests of lecture 10, decided by the grader outside the learner's kernel.

Each test draws fresh inputs from the course secret, computes the expected values with the
library's reference here, and runs the learner's function in a sandboxed process where that
reference (and the library's functions and classes that contain it) does not exist. See
``autograder/hidden.py``. The cases vary what the exercises state and the visible tests check:
shapes, dtypes, spans and ramps off the integers, halting probabilities that reach the threshold
exactly, never, or at the first step, thresholds at 1, calibration sets where a later threshold
passes again after a failure.
"""

import math

import torch
from autograder.hidden import Case, HiddenTest

from transformer_lab import adaptive as AD
from transformer_lab.viz import adaptive as VZ

# --------------------------------------------------------------------------- ex1: span_mask


def span_reference(spans, ramp, L):
    return AD.span_mask(spans, ramp, L)


def span_cases(rng):
    yield Case("spans [0.0, 1.5, 6.0], ramp 2, L = 9, float32 (every head's query 8 crosses its ramp)",
               torch.tensor([0.0, 1.5, 6.0]), 2.0, 9)
    spans = torch.rand(4, generator=rng, dtype=torch.float64) * 10
    yield Case("4 random spans in [0, 10), ramp 3.5, L = 13, float64", spans, 3.5, 13)
    spans = torch.rand(2, generator=rng) * 3
    yield Case("2 random spans in [0, 3), ramp 0.5 (a steep ramp), L = 7", spans, 0.5, 7)
    yield Case("one head, span 20 longer than the sequence, ramp 4, L = 5 (all ones on the causal triangle)",
               torch.tensor([20.0]), 4.0, 5)
    yield Case("L = 1", torch.tensor([1.0, 0.0], dtype=torch.float64), 1.0, 1)
    yield Case("ramp 0 must raise ValueError", torch.tensor([1.0]), 0.0, 4, raises=ValueError)
    yield Case("a negative ramp must raise ValueError", torch.tensor([1.0, 2.0]), -1.5, 4, raises=ValueError)


def _dist(spans, L):
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    return (i - j).to(spans.dtype)


def _span_no_clamp(spans, ramp, L):
    d = _dist(spans, L)
    return (ramp + spans[:, None, None] - d) / ramp * (d >= 0)


def _span_no_ramp_offset(spans, ramp, L):
    d = _dist(spans, L)
    return ((spans[:, None, None] - d) / ramp).clamp(0, 1) * (d >= 0)


def _span_no_causal(spans, ramp, L):
    d = _dist(spans, L)
    return ((ramp + spans[:, None, None] - d) / ramp).clamp(0, 1)


def _span_flipped(spans, ramp, L):
    d = _dist(spans, L)
    return ((ramp + spans[:, None, None] + d) / ramp).clamp(0, 1) * (d >= 0)


def _span_j_minus_i(spans, ramp, L):
    d = -_dist(spans, L)  # j - i, used for the clamp and for the causal cut alike
    return ((ramp + spans[:, None, None] - d) / ramp).clamp(0, 1) * (d >= 0)


def _span_divide_by_span(spans, ramp, L):
    d = _dist(spans, L)
    return ((ramp + spans[:, None, None] - d) / spans.clamp(min=1e-9)[:, None, None]).clamp(0, 1) * (d >= 0)


# --------------------------------------------------------------------------- ex2: act_weights


def act_reference(halt_probs, threshold):
    return AD.act_weights(halt_probs, threshold)


def act_cases(rng):
    psi = torch.tensor([[0.5, 0.25, 0.25, 0.7, 0.1],    # reaches 0.75 exactly at step 2 (>=), 1.0 at step 3
                        [0.0, 0.0, 0.1, 0.1, 0.1],      # never: forced halt at N = 5
                        [0.9, 0.0, 0.0, 0.0, 0.0],      # halts at step 1
                        [0.2, 0.2, 0.2, 0.2, 0.3]])     # reaches 0.8 at step 4
    yield Case("four positions, N = 5, threshold 0.75: exactly at step 2, never, at step 1, at step 4", psi, 0.75)
    psi = torch.rand(2, 7, 6, generator=rng, dtype=torch.float64) ** 3
    yield Case("(B, L, N) = (2, 7, 6) random, float64, threshold 0.99", psi, 0.99)
    psi = torch.rand(3, 4, 3, generator=rng)
    yield Case("(3, 4, 3) random, float32, threshold 1.0 (halts only at a cumulative sum of 1 or at N)", psi, 1.0)
    psi = torch.rand(5, 8, generator=rng, dtype=torch.float64) * 0.5
    yield Case("(5, 8) random in [0, 0.5), float64, threshold 0.6", psi, 0.6)
    yield Case("N = 1: every position halts at step 1 with remainder 1", torch.rand(2, 3, 1, generator=rng), 0.99)
    yield Case("threshold 0 must raise ValueError", torch.rand(2, 3, generator=rng), 0.0, raises=ValueError)
    yield Case("threshold 1.2 must raise ValueError", torch.rand(2, 3, generator=rng), 1.2, raises=ValueError)


def _act_from_n(halt_probs, n_steps, remainder_fn=None):
    N = halt_probs.shape[-1]
    t = torch.arange(1, N + 1)
    before = t < n_steps[..., None]
    remainder = 1 - (halt_probs * before).sum(-1) if remainder_fn is None else remainder_fn(halt_probs, n_steps)
    weights = halt_probs * before + remainder[..., None] * (t == n_steps[..., None])
    return weights, n_steps, remainder, n_steps.to(halt_probs.dtype) + remainder


def _act_zero_based(halt_probs, threshold):
    w, n, r, p = AD.act_weights(halt_probs, threshold)
    return w, n - 1, r, p


def _act_zero_based_throughout(halt_probs, threshold):  # the 0-based index used for the remainder and weights too
    return _act_from_n(halt_probs, AD.act_weights(halt_probs, threshold)[1] - 1)


def _act_no_forced_halt(halt_probs, threshold):
    reached = halt_probs.cumsum(-1) >= threshold
    return _act_from_n(halt_probs, reached.to(torch.int64).argmax(-1) + 1)


def _act_strict(halt_probs, threshold):
    reached = halt_probs.cumsum(-1) > threshold
    reached[..., -1] = True
    return _act_from_n(halt_probs, reached.to(torch.int64).argmax(-1) + 1)


def _act_remainder_includes_halt(halt_probs, threshold):
    n = AD.act_weights(halt_probs, threshold)[1]
    t = torch.arange(1, halt_probs.shape[-1] + 1)
    return _act_from_n(halt_probs, n, lambda h, n: 1 - (h * (t <= n[..., None])).sum(-1))


def _act_includes_halt_throughout(halt_probs, threshold):  # before = t <= N_i, for the remainder and the weights
    n = AD.act_weights(halt_probs, threshold)[1]
    t = torch.arange(1, halt_probs.shape[-1] + 1)
    upto = t <= n[..., None]
    remainder = 1 - (halt_probs * upto).sum(-1)
    weights = halt_probs * upto + remainder[..., None] * (t == n[..., None])
    return weights, n, remainder, n.to(halt_probs.dtype) + remainder


def _act_weight_is_psi(halt_probs, threshold):
    w, n, r, p = AD.act_weights(halt_probs, threshold)
    t = torch.arange(1, halt_probs.shape[-1] + 1)
    return halt_probs * (t <= n[..., None]), n, r, p


def _act_remainder_is_psi(halt_probs, threshold):
    n = AD.act_weights(halt_probs, threshold)[1]
    return _act_from_n(halt_probs, n, lambda h, n: h.gather(-1, (n - 1)[..., None]).squeeze(-1))


def _act_ponder_is_n(halt_probs, threshold):
    w, n, r, p = AD.act_weights(halt_probs, threshold)
    return w, n, r, n.to(halt_probs.dtype)


# --------------------------------------------------------------------------- ex3: learn_then_test


def ltt_reference(losses, thresholds, tolerance, failure_prob):
    return AD.learn_then_test(losses, thresholds, tolerance, failure_prob)


def _losses(counts, n):
    rows = torch.zeros(len(counts), n)
    for m, k in enumerate(counts):
        rows[m, :k] = 1
    return rows


def ltt_cases(rng):
    ths = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    # n = 400, tolerance 0.1: each known mistake returns a different threshold on this case
    counts = [0, 10, 25, 40, 5, 60, 38]
    yield Case("n = 400, tolerance 0.1, failure_prob 0.1: disagreements 0, 10, 25, 40, 5, 60, 38 (the walk stops at 0.7)",
               _losses(counts, 400), ths, 0.1, 0.1, show={"disagreements": counts, "n": 400, "thresholds": ths})
    yield Case("n = 60, tolerance 0.05, failure_prob 0.05: the first threshold already fails (3 disagreements)",
               _losses([3, 0, 0], 60), [0.95, 0.5, 0.1], 0.05, 0.05,
               show={"disagreements": [3, 0, 0], "n": 60, "thresholds": [0.95, 0.5, 0.1]})
    # n = 60, tolerance 0.2: 6 of 60 passes (p = 0.031), 7 of 60 does not (p = 0.067); a tail that stops at k - 1
    # passes the two 7s and returns 0.4
    counts = [1, 6, 7, 7, 12, 2]
    ths = [1.0, 0.8, 0.6, 0.4, 0.2, 0.1]
    yield Case("n = 60, tolerance 0.2, failure_prob 0.05: disagreements 1, 6, 7, 7, 12, 2 (the walk stops at 0.6)",
               _losses(counts, 60), ths, 0.2, 0.05, show={"disagreements": counts, "n": 60, "thresholds": ths})
    grid = [1 - 0.05 * i for i in range(21)]
    for n, slope, tol, fp in ((250, 0.4, 0.1, 0.1), (80, 0.6, 0.2, 0.05), (600, 0.2, 0.05, 0.2)):
        u = torch.rand(1, n, generator=rng)
        losses = (u < torch.tensor([slope * (1 - t) for t in grid])[:, None]).float()
        yield Case(f"{n} random calibration examples, risk {slope} (1 - threshold), tolerance {tol}, failure_prob {fp}",
                   losses, grid, tol, fp, show={"n": n, "thresholds": "1.0, 0.95, ..., 0.0",
                                                "disagreements": [int(v) for v in losses.sum(-1)]})
    yield Case("every threshold passes: returns the last one", _losses([0, 0, 1, 0], 200), [1.0, 0.7, 0.4, 0.1], 0.1, 0.1,
               show={"disagreements": [0, 0, 1, 0], "n": 200})
    yield Case("tolerance 0 must raise ValueError", _losses([0], 10), [1.0], 0.0, 0.1, raises=ValueError)
    yield Case("failure_prob 1 must raise ValueError", _losses([0], 10), [1.0], 0.1, 1.0, raises=ValueError)


def _ltt_pvalues(losses, tolerance):
    n = losses.shape[-1]
    return [sum(math.comb(n, j) * tolerance ** j * (1 - tolerance) ** (n - j) for j in range(int(row.sum()) + 1))
            for row in losses]


def _ltt_smallest_passing(losses, thresholds, tolerance, failure_prob):
    passing = [float(t) for t, p in zip(thresholds, _ltt_pvalues(losses, tolerance), strict=True) if p <= failure_prob]
    return min(passing) if passing else 1.0


def _ltt_empirical(losses, thresholds, tolerance, failure_prob):
    valid = [float(t) for t, row in zip(thresholds, losses, strict=True) if float(row.mean()) <= tolerance]
    return min(valid) if valid else 1.0


def _ltt_first_failure(losses, thresholds, tolerance, failure_prob):
    for t, p in zip(thresholds, _ltt_pvalues(losses, tolerance), strict=True):
        if p > failure_prob:
            return float(t)
    return float(thresholds[-1])


def _ltt_upper_tail(losses, thresholds, tolerance, failure_prob):
    n = losses.shape[-1]
    chosen = 1.0
    for t, row in zip(thresholds, losses, strict=True):
        k = int(row.sum())
        p = sum(math.comb(n, j) * tolerance ** j * (1 - tolerance) ** (n - j) for j in range(k, n + 1))
        if p > failure_prob:
            break
        chosen = float(t)
    return chosen


def _ltt_strict_tail(losses, thresholds, tolerance, failure_prob):
    n = losses.shape[-1]
    chosen = 1.0
    for t, row in zip(thresholds, losses, strict=True):
        k = int(row.sum())
        p = sum(math.comb(n, j) * tolerance ** j * (1 - tolerance) ** (n - j) for j in range(k))
        if p > failure_prob:
            break
        chosen = float(t)
    return chosen


def _ltt_hoeffding(losses, thresholds, tolerance, failure_prob):
    return AD.learn_then_test(losses, thresholds, tolerance, failure_prob, method="hoeffding")


TESTS = [
    HiddenTest(
        cell="ex1_span_mask_test",
        function="span_mask",
        cases=span_cases,
        reference=span_reference,
        blocked=[AD.span_mask, AD.AdaptiveSpanAttention, AD.SpanModel, VZ.span_act_state],
        mistakes={
            "clamp the ramp to [0, 1]: (nu + zeta - (i - j)) / nu is above 1 near the query and negative far away":
                _span_no_clamp,
            "the mask is 1 up to distance zeta and reaches 0 at zeta + nu: (nu + zeta - (i - j)) / nu, not (zeta - (i - j)) / nu":
                _span_no_ramp_offset,
            "keys j > i are the future: their mask must be 0 (the clamp alone gives them 1)": _span_no_causal,
            "the distance is i - j (query minus key), and the mask falls as it grows": _span_flipped,
            "the distance is i - j (query minus key), not j - i: with j - i every earlier key counts as the future":
                _span_j_minus_i,
            "divide by the ramp nu, not by the span": _span_divide_by_span,
        },
        hint="chi[a, i, j] = clamp((nu + zeta_a - (i - j)) / nu, 0, 1) for j <= i, 0 for j > i, in the spans' dtype; "
             "ValueError when nu <= 0",
        unchanged=True,
    ),
    HiddenTest(
        cell="ex2_act_weights_test",
        function="act_weights",
        cases=act_cases,
        reference=act_reference,
        blocked=[AD.act_weights, AD.ACTUniversalTransformer, VZ.span_act_state],
        outputs=("weights", "n_steps", "remainder", "ponder"),
        mistakes={
            "n_steps counts from 0: N_i is the step number, 1..N (add 1 to the index of the first True)": _act_zero_based,
            "n_steps counts from 0 (and the remainder and weights follow it one step early): N_i is the step number, "
            "1..N: add 1 to the index of the first True": _act_zero_based_throughout,
            "a position that never reaches the threshold halts at the last step N: force the last step to True":
                _act_no_forced_halt,
            "halt when the cumulative sum is >= the threshold, not >": _act_strict,
            "the remainder sums the steps BEFORE the halting step: R = 1 - sum_{t < N_i} psi (you included step N_i)":
                _act_remainder_includes_halt,
            "the steps BEFORE the halting step are t < N_i: with t <= N_i the remainder subtracts psi of step N_i and "
            "the halting step's weight becomes psi + R_i": _act_includes_halt_throughout,
            "the weight of the halting step is the remainder R_i, not psi: that is what makes the weights sum to 1":
                _act_weight_is_psi,
            "the remainder is 1 - sum_{t < N_i} psi, not the halting probability of step N_i": _act_remainder_is_psi,
            "the ponder cost is N_i + R_i, not N_i alone": _act_ponder_is_n,
        },
        hint="N_i: the first step (from 1) whose cumulative sum is >= the threshold, else N; R_i = 1 - sum_{t < N_i} psi; "
             "weights psi before N_i, R_i at it, 0 after; ponder N_i + R_i; n_steps int64, the rest in the input's dtype",
        unchanged=True,
    ),
    HiddenTest(
        cell="ex3_learn_then_test_test",
        function="learn_then_test",
        cases=ltt_cases,
        reference=ltt_reference,
        blocked=[AD.learn_then_test, AD.binomial_pvalue, AD.hoeffding_pvalue, AD.calibrate_threshold],
        mistakes={
            "you kept going after the first failure and took the smallest threshold whose p-value passes: "
            "fixed-sequence testing STOPS at the first threshold whose p-value exceeds failure_prob": _ltt_smallest_passing,
            "an empirical disagreement rate at most the tolerance is no certificate: use the binomial p-value "
            "P(Bin(n, tolerance) <= k) and stop at the first failure": _ltt_empirical,
            "you returned the first threshold that FAILED; return the last one that passed": _ltt_first_failure,
            "the p-value is the lower tail P(Bin(n, tolerance) <= k) (k or fewer disagreements), not the upper tail":
                _ltt_upper_tail,
            "the p-value P(Bin(n, tolerance) <= k) includes k itself: sum the binomial probabilities for 0..k "
            "(range(k + 1)); stopping at k - 1 makes every p-value too small": _ltt_strict_tail,
            "the exercise asks for the binomial p-value P(Bin(n, tolerance) <= k), not Hoeffding's bound": _ltt_hoeffding,
        },
        hint="walk the thresholds in the given order, p-value P(Bin(n, tolerance) <= k); stop at the first p-value "
             "> failure_prob; return the last threshold before it as a float (1.0 if the first fails)",
        check_dtype=False,
        unchanged=True,
    ),
]
