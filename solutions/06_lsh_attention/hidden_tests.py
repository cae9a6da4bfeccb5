"""Hidden tests of lecture 06, decided by the grader outside the learner's kernel.

Each test draws fresh inputs from the course secret, computes the expected values with the
library's reference here, and runs the learner's function in a sandboxed process where that
reference (and the library's helpers for it, and PyTorch's attention shortcut) does not exist.
See ``autograder/hidden.py``.

Exercise 2 (``lsh_round``) goes through a driver: on one case (``watch=True``, L = 512) it runs
the learner's function under ``lsh.largest_intermediate`` (a ``TorchDispatchMode`` that sees
every tensor PyTorch makes) and returns a flag, 1 when some tensor had at least B H L L bytes:
a dense (L, L) score matrix or mask. A chunked round needs about B H L 2 L_c numbers, far below.
Its mistakes are one implementation of a round with a switch per mistake (``_round``), run on
the trusted side.
"""

import math

import torch
import torch.nn.functional as F
from autograder.hidden import Case, HiddenTest

from transformer_lab import attention as A
from transformer_lab import lsh as S

# --------------------------------------------------------------------------- ex1: angular_hash


def hash_reference(x, R):
    return S.lsh_hash(x, 2 * R.shape[-1], R.shape[-3], rotations=R)


def hash_cases(rng):
    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=rng, dtype=dtype)

    yield Case("x (2, 3, 9, 6) float32, 2 rounds, n_b = 6", randn(2, 3, 9, 6), randn(2, 6, 3))
    yield Case("x (11, 5) float64, one round, n_b = 10", randn(11, 5, dtype=torch.float64),
               randn(1, 5, 5, dtype=torch.float64))
    yield Case("x (3, 7, 4), 4 rounds, n_b = 2 (one hyperplane)", randn(3, 7, 4), randn(4, 4, 1))
    angles = torch.rand(12, generator=rng) * 2 * math.pi
    pts = torch.stack([angles.cos(), angles.sin()], dim=-1) * (torch.rand(12, 1, generator=rng) * 5 + 0.1)
    yield Case("12 points in 2-D, R = identity (n_b = 4: +x, +y, -x, -y)", pts, torch.eye(2)[None],
               show={"x": pts, "R": "identity (1, 2, 2)"})


def _rotated(x, R):
    return x.unsqueeze(-3) @ R.to(x.dtype)


HASH_MISTAKES = {
    "argmax over xR alone gives only n_b/2 buckets: concatenate [xR, -xR] along the last dimension":
        lambda x, R: _rotated(x, R).argmax(dim=-1),
    "the halves are swapped: [xR, -xR], so that bucket c < n_b/2 is the positive side of column c":
        lambda x, R: torch.cat([-_rotated(x, R), _rotated(x, R)], dim=-1).argmax(dim=-1),
    "argmax of |xR| forgets the sign: x and -x must land in opposite buckets":
        lambda x, R: _rotated(x, R).abs().argmax(dim=-1),
    "rounds go before positions: the result is (..., n_r, L), not (..., L, n_r)":
        lambda x, R: hash_reference(x, R).transpose(-2, -1),
    "xR and -xR were concatenated along the positions (dim -2): concatenate along the last dimension":
        lambda x, R: torch.cat([_rotated(x, R), -_rotated(x, R)], dim=-2).argmax(dim=-1),
    "torch.cat joins along dim 0 unless told otherwise: torch.cat([xR, -xR], dim=-1)":
        lambda x, R: torch.cat([_rotated(x, R), -_rotated(x, R)]).argmax(dim=-1),
    "the argmax ran over the positions (dim -2): take it over the n_b buckets, the last dimension":
        lambda x, R: torch.cat([_rotated(x, R), -_rotated(x, R)], dim=-1).argmax(dim=-2),
}


# --------------------------------------------------------------------------- ex2: lsh_round


def drive_lsh_round(fn, qk, v, buckets, chunk_len, causal=False, watch=False):
    """Runs in the learner's process: (out, lse, flag); flag 1 if a tensor of B H L L bytes was made."""
    if not watch:
        out, lse = fn(qk, v, buckets, chunk_len, causal)
        return out, lse, 0
    from transformer_lab import lsh

    result = {}

    def run():
        result["out"], result["lse"] = fn(qk, v, buckets, chunk_len, causal)

    largest = lsh.largest_intermediate(run)
    B, H, L, _ = qk.shape
    return result["out"], result["lse"], int(largest >= B * H * L * L)


def lsh_round_reference(qk, v, buckets, chunk_len, causal=False, watch=False):
    if qk.shape[-2] % chunk_len:
        raise ValueError("chunk_len must divide L")
    n_b = 2 * (int(buckets.max()) // 2 + 1)
    out, d = S.lsh_attention(qk, v, n_b, 1, chunk_len, causal, buckets=buckets[:, :, None],
                             return_details=True)
    return out, d.round_lse[:, :, 0], 0


def _round(qk, v, buckets, m, causal=False, watch=False, *, self_mask=True, wrap=True, same_bucket=True,
           unsort=True, once=True, alone_v=True, dense=False, shift=1, norm=True, scale=True,
           causal_slots=False, unsort_lse=True, gather_unsort=False, norm_dim=-1):
    """One LSH round written plainly, with a switch for each mistake (trusted side only)."""
    B, H, L, D = qk.shape
    Dv, n = v.shape[-1], L // m
    pos = torch.arange(L)
    order = torch.argsort(buckets * L + pos, dim=-1)

    def sort_chunk(t):
        return t.gather(2, order[..., None].expand(-1, -1, -1, t.shape[-1])).reshape(B, H, n, m, -1)

    def prev(t):
        if n == 1:
            return torch.cat([t, t], dim=3) if not once else t
        before = t.roll(shift, dims=2)
        if not wrap:  # chunk 0 has nothing before it: pad with copies that the mask removes
            before = before.clone()
            before[:, :, 0] = -1 if not t.is_floating_point() else 0.0
        return torch.cat([t, before], dim=3)

    k = qk / qk.norm(dim=norm_dim, keepdim=True) if norm else qk
    q_c, k_w, v_w = sort_chunk(qk), prev(sort_chunk(k)), prev(sort_chunk(v))
    pos_q, bkt_q = sort_chunk(pos.expand(B, H, L)[..., None]), sort_chunk(buckets[..., None])
    pos_k, bkt_k = prev(pos_q), prev(bkt_q)
    allowed = pos_k.transpose(-2, -1) >= 0
    if same_bucket:
        allowed = allowed & (bkt_q == bkt_k.transpose(-2, -1))
    if self_mask:
        allowed = allowed & (pos_q != pos_k.transpose(-2, -1))
    if causal and causal_slots:  # compared by index in the window (own chunk first), not by position
        allowed = allowed & (torch.arange(allowed.shape[-1]) <= torch.arange(m)[:, None])
    elif causal:
        allowed = allowed & (pos_k.transpose(-2, -1) <= pos_q)
    scores = q_c @ k_w.transpose(-2, -1) / (math.sqrt(D) if scale else 1.0)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    has = allowed.any(-1)
    probs = torch.exp(scores - lse.masked_fill(~has, 0.0)[..., None])
    out_s = probs @ v_w
    out_s = torch.where(has[..., None], out_s, sort_chunk(v) if alone_v else torch.zeros_like(out_s))
    out_s, lse = out_s.reshape(B, H, L, Dv), lse.reshape(B, H, L)
    if not unsort:
        return out_s, lse, int(dense)
    if gather_unsort:  # the sort applied a second time instead of undone (to out, and to lse unless "out")
        lse_back = torch.empty_like(lse).scatter_(-1, order, lse) if gather_unsort == "out" else lse.gather(-1, order)
        return out_s.gather(2, order[..., None].expand(-1, -1, -1, Dv)), lse_back, int(dense)
    out = torch.empty_like(out_s).scatter_(2, order[..., None].expand(-1, -1, -1, Dv), out_s)
    if not unsort_lse:
        return out, lse, int(dense)
    return out, torch.empty_like(lse).scatter_(-1, order, lse), int(dense)


def _mistake(**switch):
    def wrong(qk, v, buckets, chunk_len, causal=False, watch=False):
        return _round(qk, v, buckets, chunk_len, causal, **switch)
    return wrong


ROUND_MISTAKES = {
    "your function made a tensor of L x L entries (a dense score matrix or mask): compute scores per chunk, "
    "(B, H, n_c, L_c, 2 L_c), never for all pairs": _mistake(dense=True),
    "a query attended to itself: exclude j == i unless the query has no other key "
    "(q_i . k_i = |q_i| is the largest score of its row)": _mistake(self_mask=False),
    "keys of other buckets were attended: keep only keys with the query's bucket": _mistake(same_bucket=False),
    "the outputs came back in sorted order: scatter them back so that row i belongs to position i":
        _mistake(unsort=False),
    "chunk 0 must look back at the last chunk (torch.roll by one along the chunk dimension), "
    "as every other chunk looks at the one before": _mistake(wrap=False),
    "with a single chunk, use it once: the previous chunk is the chunk itself, so every key came twice "
    "(lse log 2 too large)": _mistake(once=False),
    "a query with no allowed key must attend to itself: its output is v_i, not zeros": _mistake(alone_v=False),
    "the keys are not normalised: in shared-QK attention k_j = q_j / |q_j| (per position, dim=-1)": _mistake(norm=False),
    "the scores are missing the 1 / sqrt(D) scale": _mistake(scale=False),
    "the keys were normalised over the positions (dim=-2): normalise each vector, dim=-1": _mistake(norm_dim=-2),
    "causal was decided by the index in the window: the previous chunk's keys come after the own chunk's there "
    "but are earlier positions; compare the positions carried along": _mistake(causal_slots=True),
    # after causal_slots: under a causal mask both read the own chunk only
    "each chunk read the chunk after it: the previous chunk is torch.roll(t, 1) along the chunk dimension, not -1":
        _mistake(shift=-1),
    "the outputs were unsorted but lse came back in sorted order: unsort lse the same way": _mistake(unsort_lse=False),
    "the sort was applied a second time (gather with order) instead of undone: scatter slot s back to position "
    "order[s], or gather with the inverse permutation": _mistake(gather_unsort=True),
    "the outputs got the sort a second time (gather with order) instead of having it undone: scatter slot s "
    "back to position order[s] (as you did for lse), or gather with the inverse permutation":
        _mistake(gather_unsort="out"),
}


def lsh_round_cases(rng):
    def randn(*shape, dtype=torch.float64):
        return torch.randn(*shape, generator=rng, dtype=dtype)

    def buckets(n_b, *shape):
        return torch.randint(0, n_b, shape, generator=rng)

    yield Case("random buckets (4), B = 2, H = 2, L = 24, D = 5, Dv = 3, chunk_len 4", randn(2, 2, 24, 5),
               randn(2, 2, 24, 3), buckets(4, 2, 2, 24), 4)
    yield Case("the same kind, causal", randn(2, 2, 24, 5), randn(2, 2, 24, 3), buckets(4, 2, 2, 24), 4,
               causal=True)
    yield Case("one bucket, L = 8, chunk_len 4 (two chunks: full attention)", randn(1, 2, 8, 3), randn(1, 2, 8, 4),
               torch.zeros(1, 2, 8, dtype=torch.long), 4)
    yield Case("one chunk: L = 6, chunk_len 6, 2 buckets", randn(2, 1, 6, 4), randn(2, 1, 6, 2), buckets(2, 2, 1, 6), 6)
    yield Case("float32, L = 30, chunk_len 5 (6 chunks), 8 buckets, causal", randn(1, 3, 30, 6, dtype=torch.float32),
               randn(1, 3, 30, 6, dtype=torch.float32), buckets(8, 1, 3, 30), 5, causal=True)
    yield Case("chunk_len 4 does not divide L = 10", randn(1, 1, 10, 4), randn(1, 1, 10, 4),
               buckets(2, 1, 1, 10), 4, raises=ValueError)
    yield Case("chunk_len 8 longer than L = 6", randn(1, 1, 6, 4), randn(1, 1, 6, 4), buckets(2, 1, 1, 6), 8,
               raises=ValueError)
    yield Case("L = 512, chunk_len 4, 16 buckets, float32, watched for any L x L tensor",
               randn(1, 1, 512, 4, dtype=torch.float32), randn(1, 1, 512, 4, dtype=torch.float32),
               buckets(16, 1, 1, 512), 4, watch=True,
               show={"qk": "(1, 1, 512, 4) float32", "v": "(1, 1, 512, 4)", "buckets": "16 buckets", "chunk_len": 4})


# --------------------------------------------------------------------------- ex3: combine_rounds


def _naive(outs, lses):
    w = lses.exp()
    return ((w / w.sum(dim=2, keepdim=True))[..., None] * outs).sum(dim=2)


COMBINE_MISTAKES = {
    "that is the plain average of the rounds: weight round u by exp(lse^(u) - lse), lse = logsumexp over the rounds":
        lambda outs, lses: outs.mean(dim=2),
    "a query whose every round is -inf must keep outs[:, :, 0], not NaN (softmax of all -inf is NaN)":
        lambda outs, lses: (torch.softmax(lses, dim=2)[..., None] * outs).sum(dim=2),
    "exp(lse) overflows for large lse (and gives NaN): subtract the largest lse first, or use torch.softmax over dim 2":
        _naive,
    "the weights exp(lse^(u)) must be normalised: divide by their sum over the rounds":
        lambda outs, lses: (lses.exp().nan_to_num(posinf=0.0)[..., None] * outs).sum(dim=2),
    "the weights are exp(lse^(u) - lse), not lse^(u) / sum_u lse^(u)":
        lambda outs, lses: ((lses / lses.sum(dim=2, keepdim=True))[..., None] * outs).sum(dim=2),
    "the softmax ran over the positions (dim -1): the rounds are dim 2 of lses (B, H, n_r, L)":
        lambda outs, lses: (torch.softmax(lses, dim=-1)[..., None] * outs).sum(dim=2),
    "only the round with the largest lse was kept: every round weighs exp(lse^(u) - lse)":
        lambda outs, lses: outs.gather(2, lses.argmax(dim=2)[:, :, None, :, None].expand(
            -1, -1, 1, -1, outs.shape[-1]))[:, :, 0],
    "a query with no key in any round keeps round 0's row (outs[:, :, 0]), not zeros":
        lambda outs, lses: (torch.softmax(lses, dim=2).nan_to_num(0.0)[..., None] * outs).sum(dim=2),
    "a query with no key in any round keeps round 0's row (outs[:, :, 0]), not the last round's":
        lambda outs, lses: torch.where(torch.isfinite(lses).any(dim=2)[..., None],
                                       S.combine_rounds(outs, lses), outs[:, :, -1]),
}


def combine_cases(rng):
    def randn(*shape, dtype=torch.float64):
        return torch.randn(*shape, generator=rng, dtype=dtype)

    lses = randn(2, 2, 3, 7) * 2
    yield Case("3 rounds, B = 2, H = 2, L = 7, Dv = 4, lse in about [-4, 4]", randn(2, 2, 3, 7, 4), lses)
    lses = randn(1, 2, 4, 6) + 1000.0
    lses[0, 0, 1, 2] = -math.inf
    yield Case("4 rounds, lse near 1000 (exp overflows), one round with no key", randn(1, 2, 4, 6, 3), lses)
    lses = randn(1, 1, 3, 5)
    lses[0, 0, :, 4] = -math.inf
    lses[0, 0, 0, 1] = -math.inf
    yield Case("3 rounds, query 4 has no key in any round, query 1 none in round 0", randn(1, 1, 3, 5, 2), lses)
    lses = randn(1, 1, 2, 5, dtype=torch.float32)
    lses[0, 0, 0, :2] = -math.inf
    yield Case("float32, 2 rounds, round 0 empty for queries 0 and 1", randn(1, 1, 2, 5, 2, dtype=torch.float32), lses)
    yield Case("one round", randn(2, 1, 1, 4, 3), randn(2, 1, 1, 4))


TESTS = [
    HiddenTest(
        cell="ex1_angular_hash_test",
        function="angular_hash",
        cases=hash_cases,
        reference=hash_reference,
        blocked=[S.lsh_hash, S.lsh_attention, S.LSHSelfAttention, S.collision_probability_mc],
        mistakes=HASH_MISTAKES,
        unchanged=True,
        hint="bucket = argmax over the last dimension of [xR, -xR], with xR = x.unsqueeze(-3) @ R: (..., n_r, L) int64",
    ),
    HiddenTest(
        cell="ex2_lsh_round_test",
        function="lsh_round",
        cases=lsh_round_cases,
        reference=lsh_round_reference,
        driver=drive_lsh_round,
        outputs=("out", "lse", "made an L x L tensor"),
        blocked=[S.lsh_attention, S.lsh_mask, S.sort_by_bucket, S.look_one_back, S.shared_qk_attention,
                 S.LSHSelfAttention, S.routing_attention, S.combine_rounds, A.scaled_dot_product_attention,
                 A.fast_attention, F.scaled_dot_product_attention],
        mistakes=ROUND_MISTAKES,
        hint="sort each (b, h) by (bucket, position), chunks of chunk_len reading their own and the previous chunk "
             "(chunk 0: the last), mask other buckets, j == i and (causal) j > i, softmax, lse = logsumexp of the "
             "allowed scores, v_i and -inf for a query with no key, then unsort",
    ),
    HiddenTest(
        cell="ex3_combine_rounds_test",
        function="combine_rounds",
        cases=combine_cases,
        reference=S.combine_rounds,
        blocked=[S.combine_rounds, S.lsh_attention],
        mistakes=COMBINE_MISTAKES,
        unchanged=True,
        hint="weights exp(lse^(u) - logsumexp_u lse^(u)) over dim 2 (weights[..., None] to scale the rows of outs), "
             "a round at -inf weighing 0; a query with every round at -inf keeps outs[:, :, 0]",
    ),
]
