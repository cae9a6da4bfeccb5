"""Hidden tests of lecture 13, decided by the grader outside the learner's kernel.

Each test draws fresh inputs from the course secret, computes the expected values here (the
library's reference, or a float64 restatement of it), and runs the learner's function in a
sandboxed process where that reference (and the library's functions that contain it) does not
exist. See ``autograder/hidden.py``. The cases vary what the exercises state and the visible tests
check: batches of rows and leading axes, dtypes, a nucleus of one token and of every token, a
peaked and a flat row, an empty cache, one new token and several, the draft equal to the target,
a target that gives a drafted token probability 0, all tokens accepted and the first rejected.
"""

import importlib.util
import math

import torch
import torch.nn.functional as F
from autograder.hidden import Case, HiddenTest

from transformer_lab import attention as A
from transformer_lab import decoding as Dc

# --------------------------------------------------------------------------- ex1: top_p_filter

# Hugging Face's nucleus filter does the exercise in one call: blocked where transformers is
# installed (it is not a course dependency; find_spec does not import it)
HF_TOP_P = (["transformers.generation.logits_process:TopPLogitsWarper.__call__"]
            if importlib.util.find_spec("transformers") is not None else [])



def top_p_reference(logits, top_p):
    """The nucleus in float64 (the library's rule: keep a token while the mass above it < top_p)."""
    if top_p >= 1:
        return logits.clone()
    sorted_z, order = logits.double().sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_z, dim=-1)
    drop_sorted = (probs.cumsum(-1) - probs) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def top_p_cases(rng):
    z = torch.randn(17, generator=rng) * 2
    yield Case("one row of 17 logits, N(0, 4), top_p = 0.7", z, 0.7)
    z = torch.randn(3, 4, 11, generator=rng, dtype=torch.float64) * 3
    yield Case("a (3, 4, 11) float64 batch: each of the 12 rows has its own nucleus, top_p = 0.9", z, 0.9)
    z = torch.randn(5, 20, generator=rng)
    z[0] = 0.0 + torch.arange(20.0) * 1e-3  # nearly flat row: the nucleus holds most tokens
    z[1, 7] = 25.0  # one dominant token: the nucleus is that token alone
    yield Case("(5, 20): row 0 nearly flat, row 1 with one dominant token (at index 7), top_p = 0.5", z, 0.5)
    z = torch.randn(2, 9, generator=rng)
    yield Case("top_p = 1.0: every token kept, logits unchanged", z, 1.0)
    z = torch.randn(2, 9, generator=rng) * 4
    z[:, 0] = -60.0  # a token of probability ~1e-27: still kept at top_p = 1
    yield Case("top_p = 1 with a token of negligible probability: still kept (unchanged logits)", z, 1)
    yield Case("top_p = 1e-4: only the most likely token of each row (greedy)", torch.randn(4, 12, generator=rng), 1e-4)
    z = torch.randn(30, generator=rng) * 0.5 - 3.0  # shifted logits: the softmax, not the raw logits, matters
    yield Case("30 logits all around -3 (the probabilities come from softmax(z), not z), top_p = 0.6", z, 0.6)
    yield Case("top_p = 0 must raise ValueError", torch.randn(5, generator=rng), 0.0, raises=ValueError)
    yield Case("top_p = 1.2 must raise ValueError", torch.randn(5, generator=rng), 1.2, raises=ValueError)
    yield Case("top_p = -0.5 must raise ValueError", torch.randn(5, generator=rng), -0.5, raises=ValueError)


def _tp_with(logits, top_p, drop_rule, fill=float("-inf"), descending=True, sort=True, probs_out=False):
    if top_p >= 1:
        return logits.clone()
    if sort:
        sorted_z, order = logits.double().sort(dim=-1, descending=descending)
    else:
        sorted_z, order = logits.double(), torch.arange(logits.shape[-1]).expand(logits.shape)
    probs = torch.softmax(sorted_z, dim=-1)
    drop_sorted = drop_rule(probs, top_p)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    if probs_out:
        kept = torch.softmax(logits.double().masked_fill(drop, float("-inf")), -1).to(logits.dtype)
        return kept
    return logits.masked_fill(drop, fill)


def _tp_crossing_dropped(logits, top_p):
    return _tp_with(logits, top_p, lambda p, t: p.cumsum(-1) > t)


def _tp_unsorted(logits, top_p):
    return _tp_with(logits, top_p, lambda p, t: (p.cumsum(-1) - p) >= t, sort=False)


def _tp_ascending(logits, top_p):
    return _tp_with(logits, top_p, lambda p, t: (p.cumsum(-1) - p) >= t, descending=False)


def _tp_zero_fill(logits, top_p):
    return _tp_with(logits, top_p, lambda p, t: (p.cumsum(-1) - p) >= t, fill=0.0)


def _tp_probabilities(logits, top_p):
    return _tp_with(logits, top_p, lambda p, t: (p.cumsum(-1) - p) >= t, probs_out=True)


def _tp_unscattered(logits, top_p):  # the mask of the sorted row applied to the row in vocabulary order
    if top_p >= 1:
        return logits.clone()
    probs = torch.softmax(logits.double().sort(dim=-1, descending=True).values, dim=-1)
    return logits.masked_fill((probs.cumsum(-1) - probs) >= top_p, float("-inf"))


def _tp_sorted_logits(logits, top_p):  # returned the sorted logits themselves
    if top_p >= 1:
        return logits.clone()
    sorted_z = logits.sort(dim=-1, descending=True).values
    probs = torch.softmax(sorted_z.double(), dim=-1)
    return sorted_z.masked_fill((probs.cumsum(-1) - probs) >= top_p, float("-inf"))


def _tp_large_negative(logits, top_p):
    return _tp_with(logits, top_p, lambda p, t: (p.cumsum(-1) - p) >= t, fill=-1e9)


def _tp_softmax_first_axis(logits, top_p):  # softmax(dim=0): the rows mixed (a batch of rows)
    if top_p >= 1:
        return logits.clone()
    sorted_z, order = logits.double().sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_z, dim=0)  # one row: the same as dim=-1
    drop_sorted = (probs.cumsum(-1) - probs) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))



# --------------------------------------------------------------------------- ex2: cached_attention


def cached_reference(q, k_new, v_new, k_cache, v_cache):
    k_all = torch.cat([k_cache, k_new], dim=2)
    v_all = torch.cat([v_cache, v_new], dim=2)
    mask = A.causal_mask(q.shape[2], k_all.shape[2])  # j <= i + L_past
    s = (q.double() @ k_all.double().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    out = (torch.softmax(s, -1) @ v_all.double()).to(q.dtype)
    return out, k_all, v_all


def cached_cases(rng):
    def qkv(B, H, L_past, L_new, D, dtype=torch.float32, scale=1.0):
        t = [torch.randn(B, H, L_new, D, generator=rng, dtype=dtype) * scale for _ in range(3)]
        c = [torch.randn(B, H, L_past, D, generator=rng, dtype=dtype) * scale for _ in range(2)]
        return (*t, *c)

    yield Case("(B, H, D) = (2, 3, 8), 6 cached tokens, 1 new (a decoding step), float32", *qkv(2, 3, 6, 1, 8))
    yield Case("(1, 2, D = 5), 4 cached, 3 new (a speculative round's tokens), float64",
               *qkv(1, 2, 4, 3, 5, torch.float64))
    yield Case("an empty cache (L_past = 0) and 4 new tokens: plain causal attention, float64",
               *qkv(3, 1, 0, 4, 6, torch.float64))
    yield Case("(2, 4, D = 16), 9 cached, 5 new, float32, larger scores (x3)", *qkv(2, 4, 9, 5, 16, scale=3.0))
    yield Case("1 cached token, 6 new (more new than cached), float64", *qkv(1, 1, 1, 6, 3, torch.float64))


def _ca_from(q, k_new, v_new, k_cache, v_cache, mask_fn, scale=None, order="old_first", use_cache=True):
    if not use_cache:
        k_cache, v_cache = k_cache[:, :, :0], v_cache[:, :, :0]
    if order == "old_first":
        k_all, v_all = torch.cat([k_cache, k_new], 2), torch.cat([v_cache, v_new], 2)
    else:
        k_all, v_all = torch.cat([k_new, k_cache], 2), torch.cat([v_new, v_cache], 2)
    L_new, L_all = q.shape[2], k_all.shape[2]
    sc = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.double() @ k_all.double().transpose(-2, -1)) * sc
    m = mask_fn(L_new, L_all)
    if m is not None:
        s = s.masked_fill(~m, float("-inf"))
    out = (torch.softmax(s, -1) @ v_all.double()).to(q.dtype)
    return out, k_all, v_all


def _ca_no_mask(q, k_new, v_new, k_cache, v_cache):
    return _ca_from(q, k_new, v_new, k_cache, v_cache, lambda a, b: None)


def _ca_top_left(q, k_new, v_new, k_cache, v_cache):
    return _ca_from(q, k_new, v_new, k_cache, v_cache, lambda a, b: torch.ones(a, b, dtype=torch.bool).tril())


def _ca_no_scale(q, k_new, v_new, k_cache, v_cache):
    return _ca_from(q, k_new, v_new, k_cache, v_cache, A.causal_mask, scale=1.0)


def _ca_scale_d(q, k_new, v_new, k_cache, v_cache):
    return _ca_from(q, k_new, v_new, k_cache, v_cache, A.causal_mask, scale=1 / q.shape[-1])


def _ca_new_first(q, k_new, v_new, k_cache, v_cache):
    return _ca_from(q, k_new, v_new, k_cache, v_cache, A.causal_mask, order="new_first")


def _ca_strict(q, k_new, v_new, k_cache, v_cache):  # a query cannot see its own key
    def m(a, b):
        return torch.arange(b)[None, :] < torch.arange(a)[:, None] + (b - a)

    out, k_all, v_all = _ca_from(q, k_new, v_new, k_cache, v_cache, m)
    return out.nan_to_num(0.0), k_all, v_all


def _ca_softmax_keys_axis(q, k_new, v_new, k_cache, v_cache):  # softmax over the queries (dim=-2)
    k_all, v_all = torch.cat([k_cache, k_new], 2), torch.cat([v_cache, v_new], 2)
    s = (q.double() @ k_all.double().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~A.causal_mask(q.shape[2], k_all.shape[2]), float("-inf"))
    return (torch.softmax(s, -2).nan_to_num(0.0) @ v_all.double()).to(q.dtype), k_all, v_all


def _ca_ignores_cache(q, k_new, v_new, k_cache, v_cache):
    out, _, _ = _ca_from(q, k_new, v_new, k_cache, v_cache, A.causal_mask, use_cache=False)
    return out, torch.cat([k_cache, k_new], 2), torch.cat([v_cache, v_new], 2)


# --------------------------------------------------------------------------- ex3: speculative_accept


def drive_accept(fn, p, q, draft_tokens, u):
    n_accepted, next_probs = fn(p, q, draft_tokens, u)
    return torch.tensor(int(n_accepted)), next_probs


def accept_reference(p, q, draft_tokens, u):
    n = q.shape[0]
    for i in range(n):
        x = int(draft_tokens[i])
        if float(u[i]) * float(q[i, x]) < float(p[i, x]):
            continue
        r = (p[i] - q[i]).clamp(min=0)
        return torch.tensor(i), r / r.sum()
    return torch.tensor(n), p[n].clone()


def accept_cases(rng):
    def dists(rows, V, dtype=torch.float64, scale=2.0):
        return torch.softmax(torch.randn(rows, V, generator=rng, dtype=dtype) * scale, -1)

    def tokens_from(q):
        return torch.stack([torch.multinomial(row, 1, generator=rng)[0] for row in q])

    p, q = dists(4, 7), dists(3, 7)
    x = tokens_from(q)
    u = torch.full((3,), 0.999, dtype=torch.float64)
    yield Case("V = 7, n = 3, u = 0.999 everywhere: accepted only where p(x) >= p~(x) (ratio >= 1)", p, q, x, u)
    p, q = dists(6, 10), dists(5, 10)
    x = tokens_from(q)
    u = torch.rand(5, generator=rng, dtype=torch.float64) * 0.5
    yield Case("V = 10, n = 5, u uniform in [0, 0.5)", p, q, x, u)
    p, q = dists(4, 5), dists(3, 5)
    x = tokens_from(q)
    yield Case("u = 0 everywhere: every token with p(x) > 0 is accepted, the bonus comes from p[3]",
               p, q, x, torch.zeros(3, dtype=torch.float64))
    p = dists(5, 6)
    x = tokens_from(p[:4])
    yield Case("the draft equals the target (q = p[:4]) and u = 0.99: all 4 accepted, next from p[4]",
               p, p[:4].clone(), x, torch.full((4,), 0.99, dtype=torch.float64))
    p, q = dists(3, 6), dists(2, 6)
    x = tokens_from(q)
    p[0, x[0]] = 0.0  # the target rules out the first drafted token
    p[0] = p[0] / p[0].sum()
    yield Case("p gives the first drafted token probability 0: rejected whatever u (here u = 0); "
               "the residual has 0 there too", p, q, x, torch.zeros(2, dtype=torch.float64))
    p, q = dists(2, 8, torch.float32), dists(1, 8, torch.float32)
    x = tokens_from(q.double())
    r = float(p[0, x[0]] / q[0, x[0]])
    u = torch.tensor([min(0.999, r + 0.05) if r < 0.95 else 0.999], dtype=torch.float32)
    yield Case("n = 1, float32: next_probs in float32", p, q, x, u)
    p, q = dists(7, 12, scale=1.0), dists(6, 12, scale=1.0)
    x = tokens_from(q)
    u = torch.rand(6, generator=rng, dtype=torch.float64)
    yield Case("V = 12, n = 6, closer distributions (a better draft), u uniform", p, q, x, u)


def _acc_from(p, q, draft_tokens, u, accept, resid, count_all=False, bonus_row=None, plus_one=False,
              resid_row=0):
    n = q.shape[0]
    n_acc = 0
    first = None
    for i in range(n):
        x = int(draft_tokens[i])
        if accept(float(p[i, x]), float(q[i, x]), float(u[i])):
            n_acc += 1
            continue
        if first is None:
            first = i
        if not count_all:
            break
    if first is None:
        row = n if bonus_row is None else bonus_row(n)
        return torch.tensor(n), p[row].clone()
    n_out = n_acc if count_all else first + int(plus_one)
    return torch.tensor(n_out), resid(p[min(first + resid_row, n)], q[first])


def _ok(pp, qq, uu):
    return uu * qq < pp


def _normres(pr, qr):
    r = (pr - qr).clamp(min=0)
    return r / r.sum()


def _acc_inverted(p, q, x, u):
    return _acc_from(p, q, x, u, lambda pp, qq, uu: uu * pp < qq, _normres)


def _acc_deterministic(p, q, x, u):
    return _acc_from(p, q, x, u, lambda pp, qq, uu: pp >= qq, _normres)


def _acc_from_p(p, q, x, u):
    return _acc_from(p, q, x, u, _ok, lambda pr, qr: pr.clone())


def _acc_from_q(p, q, x, u):
    return _acc_from(p, q, x, u, _ok, lambda pr, qr: qr.clone())


def _acc_unnormalised(p, q, x, u):
    return _acc_from(p, q, x, u, _ok, lambda pr, qr: (pr - qr).clamp(min=0))


def _acc_q_minus_p(p, q, x, u):
    def r(pr, qr):
        d = (qr - pr).clamp(min=0)
        return d / d.sum()

    return _acc_from(p, q, x, u, _ok, r)


def _acc_abs_diff(p, q, x, u):
    return _acc_from(p, q, x, u, _ok, lambda pr, qr: (pr - qr).abs() / (pr - qr).abs().sum())


def _acc_count_all(p, q, x, u):
    return _acc_from(p, q, x, u, _ok, _normres, count_all=True)


def _acc_counts_rejected(p, q, x, u):  # n_accepted = i + 1 at a rejection at i
    return _acc_from(p, q, x, u, _ok, _normres, plus_one=True)


def _acc_next_row_residual(p, q, x, u):  # the residual of row i + 1 of p
    return _acc_from(p, q, x, u, _ok, _normres, resid_row=1)


def _acc_softmax_residual(p, q, x, u):
    return _acc_from(p, q, x, u, _ok, lambda pr, qr: torch.softmax((pr - qr).clamp(min=0), -1))


def _acc_bonus_last_draft_row(p, q, x, u):
    return _acc_from(p, q, x, u, _ok, _normres, bonus_row=lambda n: n - 1)



TESTS = [
    HiddenTest(
        cell="ex1_top_p_filter_test",
        function="top_p_filter",
        cases=top_p_cases,
        reference=top_p_reference,
        blocked=[Dc.top_p_filter, Dc.sampling_probs, Dc.sample_next, Dc.top_k_filter, *HF_TOP_P],
        unchanged=True,
        mistakes={
            "the token that crosses top_p was dropped (cumsum > top_p counts the token itself): keep a token while "
            "the mass of the tokens ranked ABOVE it, cumsum - probs, is below top_p":
                _tp_crossing_dropped,
            "the cumulative sum ran in vocabulary order: sort the probabilities (descending) first":
                _tp_unsorted,
            "the softmax ran over the first axis (the rows of the batch mixed): softmax(sorted, dim=-1), "
            "each row on its own":
                _tp_softmax_first_axis,
            "sorted in ascending order: the nucleus is made of the MOST likely tokens (descending=True)":
                _tp_ascending,
            "the dropped tokens got 0, a perfectly likely logit: set them to float('-inf')":
                _tp_zero_fill,
            "returned probabilities: return the logits with -inf outside the nucleus":
                _tp_probabilities,
            "the mask was made in sorted order and applied to the logits in vocabulary order: scatter it back "
            "(torch.zeros_like(drop).scatter(-1, order, drop))":
                _tp_unscattered,
            "returned the logits in sorted order: the output keeps the vocabulary order (scatter the mask back "
            "and fill the input logits)":
                _tp_sorted_logits,
            "the dropped tokens got a large negative number (-1e9), not -inf: masked_fill(drop, float('-inf'))":
                _tp_large_negative,
        },
        hint="sort softmax(z) descending, drop a token when (cumsum - probs) >= top_p, scatter the mask back to "
             "the vocabulary order, masked_fill with -inf; top_p = 1 returns the logits; ValueError outside (0, 1]",
    ),
    HiddenTest(
        cell="ex2_cached_attention_test",
        function="cached_attention",
        cases=cached_cases,
        reference=cached_reference,
        outputs=("out", "k_all", "v_all"),
        blocked=[F.scaled_dot_product_attention, A.scaled_dot_product_attention, A.fast_attention,
                 A.attention_scores, A.masked_softmax, A.causal_mask, A.MultiHeadAttention, F.multi_head_attention_forward,
                 Dc.cached_forward, Dc._cached_attention, Dc.KVCache],
        unchanged=True,
        mistakes={
            "no causal mask: a new token saw the new tokens after it; new token i sits at position L_past + i "
            "and sees keys j <= L_past + i":
                _ca_no_mask,
            "the mask is anchored at the top left (tril of (L_new, L_all)): new token i saw only keys 0..i; "
            "shift it by L_past (key j visible when j <= L_past + i)":
                _ca_top_left,
            "forgot the 1/sqrt(D) scale":
                _ca_no_scale,
            "scaled by 1/D: the scale is 1/sqrt(D), D = q.shape[-1]":
                _ca_scale_d,
            "the new keys were put before the cached ones: torch.cat([k_cache, k_new], dim=2), old first":
                _ca_new_first,
            "a token must see its own key too (j <= L_past + i, not <)":
                _ca_strict,
            "the new queries attended to the new keys only: attend over the cache and the new keys":
                _ca_ignores_cache,
            "the softmax ran over the queries (dim=-2): each query's weights over the keys sum to 1, softmax(dim=-1)":
                _ca_softmax_keys_axis,
        },
        hint="k_all = cat([k_cache, k_new], 2) (same for v); scores q k_all^T / sqrt(D) masked where "
             "j > L_past + i; softmax; @ v_all",
    ),
    HiddenTest(
        cell="ex3_speculative_accept_test",
        function="speculative_accept",
        cases=accept_cases,
        reference=accept_reference,
        driver=drive_accept,
        outputs=("n_accepted", "next_probs"),
        blocked=[Dc.speculative_step, Dc.residual_distribution, Dc.speculative_generate,
                 Dc.speculative_distribution, Dc.acceptance_rate],
        unchanged=True,
        mistakes={
            "resampled from the target p after a rejection: use the residual max(0, p - p~), normalised "
            "(resampling from p is biased: section 9)":
                _acc_from_p,
            "resampled from the draft after a rejection: use the residual max(0, p - p~), normalised":
                _acc_from_q,
            "the residual was not normalised: divide max(0, p - p~) by its sum":
                _acc_unnormalised,
            "the residual is max(0, p - p~), not max(0, p~ - p)":
                _acc_q_minus_p,
            "the residual is max(0, p - p~), not |p - p~|":
                _acc_abs_diff,
            "the residual was normalised with a softmax (which exponentiates): divide max(0, p - p~) by its sum":
                _acc_softmax_residual,
            "the residual came from row i + 1 of p: use the rejected row i, max(0, p[i] - p~[i])":
                _acc_next_row_residual,
            "the acceptance test is the wrong way round (the ratio upside down, p~(x)/p(x), or the comparison "
            "reversed, u > p/p~): accept when u < p(x) / p~(x)":
                _acc_inverted,
            "accepted when p(x) >= p~(x), ignoring u: accept with probability p/p~, i.e. when u < p(x) / p~(x)":
                _acc_deterministic,
            "counted tokens after the first rejection, or the rejected token itself: n_accepted is the number "
            "of tokens accepted BEFORE the first rejection (a rejection at draft token i gives n_accepted = i)":
                _acc_count_all,
            "n_accepted is the number of tokens accepted BEFORE the first rejection: a rejection at draft token i "
            "gives n_accepted = i (not i + 1; and nothing after it counts)":
                _acc_counts_rejected,
            "the bonus token comes from p[n], the row after ALL n draft tokens, not p[n - 1]":
                _acc_bonus_last_draft_row,
        },
        hint="for i in range(n): accept if u[i] * q[i, x] < p[i, x]; at the first rejection return (i, "
             "max(0, p[i] - q[i]) / its sum); if none, return (n, p[n])",
    ),
]
