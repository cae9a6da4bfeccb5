"""lsh.py: the angular hash and its collision probability, shared-QK attention, LSH attention
against the paper's equations written with Python loops (sort, chunks, one chunk back, rounds
combined by their log-sum-exp, duplicates counted once), the two claims (more rounds approach
full attention; a reversible stack's activation memory is flat in depth), reversible blocks
(inverse to 1e-5, gradients equal to an ordinary block's), chunked feed-forward, routing
attention and online k-means, and the errors for bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer_lab import attention as A
from transformer_lab import lsh as S


def qkv(B=2, H=2, L=16, D=8, Dv=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(B, H, L, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, L, Dv, generator=g, dtype=dtype)
    return qk, v


def random_buckets(B, H, R, L, n_buckets, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_buckets, (B, H, R, L), generator=g)


# ---------------------------------------------------------------------------------------
# The paper's equations, one query and one round at a time (independent of the library)
# ---------------------------------------------------------------------------------------

def paper_attended_sets(buckets, chunk_len, causal):
    """A[r][i] = { j != i : same bucket in round r, j's chunk is i's or the one before, j <= i }."""
    R, L = buckets.shape
    n_chunks = -(-L // chunk_len)
    sets = []
    for r in range(R):
        order = sorted(range(L), key=lambda p: (int(buckets[r, p]), p))  # sort by (bucket, position)
        slot = {p: s for s, p in enumerate(order)}
        rows = []
        for i in range(L):
            chunk = slot[i] // chunk_len
            window = {chunk, (chunk - 1) % n_chunks}  # own chunk and the one before (wrapping)
            rows.append({j for j in range(L) if j != i and int(buckets[r, j]) == int(buckets[r, i])
                         and slot[j] // chunk_len in window and (j <= i or not causal)})
        sets.append(rows)
    return sets


def paper_lsh_attention(qk, v, buckets, chunk_len, causal):
    """Reformer's multi-round formula for one (batch, head): qk (L, D), v (L, Dv), buckets (R, L).

    Returns out (L, Dv), z (R, L) and o (R, L, Dv): z_i^(r), o_i^(r) of the docstring.
    """
    R, L = buckets.shape
    D = qk.shape[-1]
    k = qk / qk.norm(dim=-1, keepdim=True)
    s = qk @ k.T / math.sqrt(D)
    sets = paper_attended_sets(buckets, chunk_len, causal)
    N = [[sum(j in sets[r][i] for r in range(R)) for j in range(L)] for i in range(L)]
    out = torch.zeros(L, v.shape[-1], dtype=qk.dtype)
    z = torch.full((R, L), float("-inf"), dtype=qk.dtype)
    o = torch.zeros(R, L, v.shape[-1], dtype=qk.dtype)
    for i in range(L):
        for r in range(R):
            js = sorted(sets[r][i])
            if js:
                logits = torch.stack([s[i, j] - math.log(N[i][j]) for j in js])
                z[r, i] = torch.logsumexp(logits, 0)
                o[r, i] = sum(torch.exp(logits[n] - z[r, i]) * v[j] for n, j in enumerate(js))
        if torch.isinf(z[:, i]).all():
            out[i] = v[i]  # alone: attends to itself
            continue
        total = torch.logsumexp(z[:, i], 0)
        out[i] = sum(torch.exp(z[r, i] - total) * o[r, i] for r in range(R) if not torch.isinf(z[r, i]))
    return out, z, o


# ---------------------------------------------------------------------------------------
# 1. The angular hash
# ---------------------------------------------------------------------------------------

def test_hash_is_the_argmax_over_signed_rotated_axes(gen):
    x = torch.randn(2, 3, 7, 6, generator=gen)  # (B, H, L, D)
    R = S.lsh_rotations(6, 8, n_rounds=2, n_heads=3, generator=gen)  # (H, R, D, b/2)
    assert R.shape == (3, 2, 6, 4)
    got = S.lsh_hash(x, 8, 2, rotations=R)
    assert got.shape == (2, 3, 2, 7) and got.dtype == torch.int64
    for b in range(2):
        for h in range(3):
            for r in range(2):
                for i in range(7):
                    proj = x[b, h, i] @ R[h, r]  # x R: (b/2,)
                    expected = int(torch.cat([proj, -proj]).argmax())
                    assert int(got[b, h, r, i]) == expected


def test_bucket_is_invariant_to_scaling_a_vector(gen):
    x = torch.randn(2, 2, 32, 8, generator=gen)
    c = torch.rand(2, 2, 32, 1, generator=gen) * 100 + 1e-3  # positive factors, 1e-3 .. 100
    b = S.lsh_hash(x, 8, 3, generator=5)
    assert torch.equal(S.lsh_hash(x * c, 8, 3, generator=5), b)
    # the negative of a vector lands in the opposite bucket: argmax [-xR; xR] = h(x) +- b/2
    assert torch.equal(S.lsh_hash(-x, 8, 3, generator=5), (b + 4) % 8)


def test_hash_is_seeded_and_dtype_agnostic(gen):
    x = torch.randn(1, 2, 20, 8, generator=gen)
    a = S.lsh_hash(x, 4, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, S.lsh_hash(x, 4, 2, generator=3))  # an int seed = a fresh generator
    assert torch.equal(a, S.lsh_hash(x.double(), 4, 2, generator=3))  # same rotations in float64
    assert not torch.equal(a, S.lsh_hash(x, 4, 2, generator=4))
    torch.manual_seed(11)
    g1 = S.lsh_hash(x, 4, 2)
    torch.manual_seed(11)
    assert torch.equal(g1, S.lsh_hash(x, 4, 2))  # None: the global RNG
    # one rotation per head: the same vectors in two heads hash differently
    same = torch.cat([x[:, :1], x[:, :1]], dim=1)
    hashed = S.lsh_hash(same, 8, 1, generator=0)
    assert not torch.equal(hashed[:, 0], hashed[:, 1])
    # any (..., L, D): one rotation per round shared by everything
    assert S.lsh_hash(x[0, 0], 4, 3, generator=0).shape == (3, 20)


def test_collision_probability_theory():
    t = torch.linspace(0, math.pi, 9, dtype=torch.float64)
    torch.testing.assert_close(S.collision_probability(t, 2), 1 - t / math.pi)  # one hyperplane
    for b in (4, 8, 32):
        p = S.collision_probability(t, b)
        assert p[0] == 1 and p[-1] == 0  # same direction / opposite direction
        assert (p[1:] < p[:-1]).all(), "falls as the angle grows"
        assert (p[1:-1] < S.collision_probability(t, b // 2)[1:-1]).all(), "more buckets, fewer collisions"
    p = S.collision_probability(t, 8)
    torch.testing.assert_close(S.collision_probability(t, 8, n_rounds=3), 1 - (1 - p) ** 3)
    assert S.collision_probability(1.0, 4).shape == ()


@pytest.mark.parametrize("n_buckets", [2, 4, 16])
def test_collision_probability_matches_monte_carlo(n_buckets):
    angles = torch.tensor([0.1, 0.5, 1.0, 1.6, 2.4])
    T = 6000
    mc = S.collision_probability_mc(angles, n_buckets, n_trials=T, generator=0)
    theory = S.collision_probability(angles, n_buckets)
    se = (theory * (1 - theory) / T).sqrt()
    assert ((mc - theory).abs() <= 4.5 * se + 2e-3).all(), (mc, theory)
    # at least one of two rounds
    mc2 = S.collision_probability_mc(angles, n_buckets, n_rounds=2, n_trials=T, generator=1)
    theory2 = S.collision_probability(angles, n_buckets, n_rounds=2)
    se2 = (theory2 * (1 - theory2) / T).sqrt()
    assert ((mc2 - theory2).abs() <= 4.5 * se2 + 2e-3).all(), (mc2, theory2)
    assert torch.equal(mc, S.collision_probability_mc(angles, n_buckets, n_trials=T, generator=0))


# ---------------------------------------------------------------------------------------
# 2. Shared-QK attention
# ---------------------------------------------------------------------------------------

def test_shared_qk_attention_is_the_definition():
    qk, v = qkv(L=9)
    k = qk / qk.norm(dim=-1, keepdim=True)  # k_j = q_j / |q_j|
    torch.testing.assert_close(S.shared_qk_keys(qk), k)
    scores = qk @ k.transpose(-2, -1) / math.sqrt(qk.shape[-1])
    eye = torch.eye(9, dtype=torch.bool)
    expected = torch.softmax(scores.masked_fill(eye, float("-inf")), -1) @ v  # never itself
    out, w = S.shared_qk_attention(qk, v, need_weights=True)
    torch.testing.assert_close(out, expected)
    assert (w.diagonal(dim1=-2, dim2=-1) == 0).all()
    # causal: the first position has no other key and attends to itself
    out_c, w_c = S.shared_qk_attention(qk, v, causal=True, need_weights=True)
    torch.testing.assert_close(out_c[..., 0, :], v[..., 0, :])
    assert torch.equal(w_c[..., 0, 0], torch.ones_like(w_c[..., 0, 0]))
    assert (w_c.triu(1) == 0).all() and (w_c[..., 1:, :].diagonal(offset=1, dim1=-2, dim2=-1) == 0).all()
    causal = torch.tril(torch.ones(9, 9, dtype=torch.bool), -1)
    causal[0, 0] = True
    torch.testing.assert_close(out_c, torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v)
    # a mask that leaves a row with only itself (or nothing): that row attends to itself
    mask = torch.ones(9, 9, dtype=torch.bool)
    mask[4] = False
    torch.testing.assert_close(S.shared_qk_attention(qk, v, mask=mask)[..., 4, :], v[..., 4, :])


# ---------------------------------------------------------------------------------------
# 3-4. LSH attention
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk_len", [16, 8, 5])
@pytest.mark.parametrize("n_rounds", [1, 3])
def test_one_bucket_equals_full_shared_qk_attention(causal, chunk_len, n_rounds):
    qk, v = qkv(L=16)
    one = torch.zeros(2, 2, n_rounds, 16, dtype=torch.long)  # every position in bucket 0
    out, d = S.lsh_attention(qk, v, 4, n_rounds, chunk_len, causal, buckets=one, return_details=True)
    if chunk_len >= 8:  # one or two chunks: every key is in the window (two chunks wrap around)
        torch.testing.assert_close(out, S.shared_qk_attention(qk, v, causal), rtol=1e-12, atol=1e-12)
    else:  # more chunks: the window is the own chunk and the one before, still exact over it
        torch.testing.assert_close(out, S.shared_qk_attention(qk, v, causal, mask=d.visited),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L, chunk_len, n_rounds, n_buckets", [(10, 3, 3, 4), (12, 4, 2, 2), (9, 9, 2, 4),
                                                               (11, 2, 4, 6)])
def test_lsh_attention_is_the_papers_multi_round_formula(causal, L, chunk_len, n_rounds, n_buckets):
    qk, v = qkv(B=2, H=2, L=L, D=4, Dv=3, seed=L)
    buckets = random_buckets(2, 2, n_rounds, L, n_buckets, seed=L + n_rounds)
    out, d = S.lsh_attention(qk, v, n_buckets, n_rounds, chunk_len, causal, buckets=buckets,
                             return_details=True)
    union = S.lsh_mask(buckets, chunk_len, causal)
    for b in range(2):
        for h in range(2):
            ref, z, o = paper_lsh_attention(qk[b, h], v[b, h], buckets[b, h], chunk_len, causal)
            torch.testing.assert_close(out[b, h], ref, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(d.round_lse[b, h], z, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(d.round_outputs[b, h], o, rtol=1e-10, atol=1e-12)
            sets = paper_attended_sets(buckets[b, h], chunk_len, causal)
            expected = torch.tensor([[any(j in sets[r][i] for r in range(n_rounds)) for j in range(L)]
                                     for i in range(L)])
            assert torch.equal(union[b, h], expected)


def test_lsh_attention_is_exact_attention_over_the_pairs_it_visits(gen):
    qk, v = qkv(L=24, D=8)
    for causal in (False, True):
        out, d = S.lsh_attention(qk, v, 4, n_rounds=3, chunk_len=4, causal=causal, generator=gen,
                                 return_details=True)
        union = S.lsh_mask(d.buckets, 4, causal)
        torch.testing.assert_close(out, S.shared_qk_attention(qk, v, causal, mask=union))
        torch.testing.assert_close(out, d.weights @ v)  # the effective attention matrix
        torch.testing.assert_close(d.weights.sum(-1), torch.ones(2, 2, 24, dtype=qk.dtype))
        assert torch.equal(d.visited, union | (torch.eye(24, dtype=torch.bool) & d.alone[..., None]))
        found = ~d.alone
        torch.testing.assert_close(d.round_weights.sum(2)[found], torch.ones(int(found.sum()), dtype=qk.dtype))
        assert 1 <= d.counts_max <= 3
        # no query attends to itself unless it is alone
        diag = d.weights.diagonal(dim1=-2, dim2=-1)
        assert (diag[found] == 0).all() and (diag[d.alone] == 1).all()
        # the sort: order lists positions by (bucket, position); rank is its inverse
        order, rank = S.sort_by_bucket(d.buckets)
        assert torch.equal(order, d.order) and torch.equal(rank, d.rank)
        sorted_buckets = d.buckets.gather(-1, order)
        assert (sorted_buckets[..., 1:] >= sorted_buckets[..., :-1]).all()
        assert torch.equal(order.gather(-1, rank), torch.arange(24).expand_as(order))


def test_combine_rounds_is_the_log_sum_exp_weighting():
    qk, v = qkv(L=20)
    out, d = S.lsh_attention(qk, v, 4, 3, 5, generator=1, return_details=True)
    found = ~d.alone
    torch.testing.assert_close(S.combine_rounds(d.round_outputs, d.round_lse)[found], out[found])
    # stable for large log normalisers, and a query with no key in any round keeps round 0's output
    outs = torch.randn(1, 1, 2, 3, 4, dtype=torch.float64)
    lses = torch.tensor([[[[1000.0, -math.inf, 5.0], [1000.0 + math.log(3), -math.inf, -math.inf]]]],
                        dtype=torch.float64)
    got = S.combine_rounds(outs, lses)
    torch.testing.assert_close(got[0, 0, 0], 0.25 * outs[0, 0, 0, 0] + 0.75 * outs[0, 0, 1, 0])
    torch.testing.assert_close(got[0, 0, 1], outs[0, 0, 0, 1])
    torch.testing.assert_close(got[0, 0, 2], outs[0, 0, 0, 2])
    with pytest.raises(ValueError, match=r"lses must be \(B, H, R, L\) = \(1, 1, 2, 3\).*got \(1, 1, 3, 3\)"):
        S.combine_rounds(outs, torch.zeros(1, 1, 3, 3))


def test_duplicates_count_once_only_with_dedupe():
    qk, v = qkv(L=12)
    g = torch.Generator().manual_seed(4)
    base = torch.randint(0, 2, (2, 2, 1, 12), generator=g)
    buckets = torch.cat([base, base, (base + torch.arange(12) // 6) % 2], dim=2)  # rounds overlap
    union = S.lsh_mask(buckets, 6)
    exact = S.shared_qk_attention(qk, v, mask=union)
    torch.testing.assert_close(S.lsh_attention(qk, v, 2, 3, 6, buckets=buckets), exact)
    twice = S.lsh_attention(qk, v, 2, 3, 6, buckets=buckets, dedupe=False)
    assert (twice - exact).abs().max() > 1e-3  # keys found in two rounds weigh double
    # identical rounds change nothing, with or without the correction
    same = torch.cat([base] * 3, dim=2)
    one = S.lsh_attention(qk, v, 2, 1, 6, buckets=base)
    torch.testing.assert_close(S.lsh_attention(qk, v, 2, 3, 6, buckets=same), one)
    torch.testing.assert_close(S.lsh_attention(qk, v, 2, 3, 6, buckets=same, dedupe=False), one)


def test_attend_across_buckets_sees_the_whole_window():
    qk, v = qkv(L=12)
    buckets = random_buckets(2, 2, 2, 12, 4)
    out = S.lsh_attention(qk, v, 4, 2, 6, buckets=buckets, attend_across_buckets=True)
    torch.testing.assert_close(out, S.shared_qk_attention(qk, v))  # two chunks: every key
    out_c = S.lsh_attention(qk, v, 4, 2, 6, causal=True, buckets=buckets, attend_across_buckets=True)
    torch.testing.assert_close(out_c, S.shared_qk_attention(qk, v, causal=True))


def test_more_rounds_approach_full_attention():
    """The claim: the error against full attention falls as rounds are added (mean of 6 draws)."""
    rounds = [1, 2, 4, 8]
    errors = torch.zeros(len(rounds))
    for draw in range(6):
        qk, v = qkv(B=1, H=4, L=64, D=16, Dv=16, dtype=torch.float32, seed=100 + draw)
        qk = qk * 2.0  # sharper attention, as in a trained model
        full = S.shared_qk_attention(qk, v)
        for n, R in enumerate(rounds):
            out = S.lsh_attention(qk, v, 8, R, chunk_len=16, generator=draw)
            errors[n] += ((out - full).norm() / full.norm()) / 6
    assert (errors[1:] < 0.85 * errors[:-1]).all(), errors.tolist()
    assert errors[-1] < 0.5 * errors[0], errors.tolist()


def test_causal_lsh_never_attends_to_the_future():
    qk, v = qkv(L=20, dtype=torch.float64)
    v = v.clone().requires_grad_(True)
    out, d = S.lsh_attention(qk, v, 4, 3, 4, causal=True, generator=2, return_details=True)
    assert (d.weights.triu(1) == 0).all() and (d.visited.triu(1) == 0).all()
    for i in (0, 7, 19):  # out_i depends on v_j for j <= i only
        (grad,) = torch.autograd.grad(out[:, :, i].sum(), v, retain_graph=True)
        assert (grad[:, :, i + 1:] == 0).all()
        assert grad[:, :, : i + 1].abs().sum() > 0
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])  # the first position is alone


def test_a_query_alone_in_its_bucket_attends_to_itself_without_nan():
    qk, v = qkv(L=10)
    qk, v = qk.clone().requires_grad_(True), v.clone().requires_grad_(True)
    buckets = torch.zeros(2, 2, 2, 10, dtype=torch.long)
    buckets[:, :, :, 3] = 2  # position 3 alone in bucket 2, in both rounds
    buckets[:, :, 1, 6] = 1  # position 6 alone in round 1 only: round 0 must carry it
    out, d = S.lsh_attention(qk, v, 4, 2, 4, buckets=buckets, return_details=True)  # 10 = 4 + 4 + 2
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, 3], v[:, :, 3])
    assert d.alone[:, :, 3].all() and not d.alone[:, :, 6].any()
    assert torch.isinf(d.round_lse[:, :, 1, 6]).all() and (d.round_weights[:, :, 1, 6] == 0).all()
    torch.testing.assert_close(d.round_weights[:, :, 0, 6], torch.ones(2, 2, dtype=qk.dtype))
    assert (d.weights[:, :, 3, 3] == 1).all() and (d.weights[:, :, 6, 6] == 0).all()
    (out * torch.randn_like(out)).sum().backward()  # through padding, empty rounds, alone rows
    assert torch.isfinite(qk.grad).all() and torch.isfinite(v.grad).all()
    assert (qk.grad[:, :, 3] == 0).all()  # alone: its output is v_3, whatever q_3 is


def test_lsh_gradients_by_finite_differences():
    """gradcheck with fixed buckets: causal, padding (7 = 3 + 3 + 1), alone rows, three rounds."""
    qk, v = qkv(B=1, H=2, L=7, D=3, Dv=2)
    qk, v = qk.requires_grad_(True), v.requires_grad_(True)
    buckets = random_buckets(1, 2, 3, 7, 4, seed=9)
    assert torch.autograd.gradcheck(
        lambda a, b: S.lsh_attention(a, b, 4, 3, 3, causal=True, buckets=buckets), (qk, v))


def test_lsh_defaults_and_dtypes():
    qk, v = qkv(L=20, dtype=torch.float32)
    out, d = S.lsh_attention(qk, v, 4, generator=0, return_details=True)
    assert d.chunk_len == 10 and d.n_chunks == 2  # ceil(2 L / n_buckets)
    assert out.dtype == torch.float32 and out.shape == (2, 2, 20, 5)
    out64 = S.lsh_attention(qk.double(), v.double(), 4, generator=0)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out, rtol=1e-5, atol=1e-5)  # same rotations
    out16 = S.lsh_attention(qk.bfloat16(), v.bfloat16(), 4, generator=0)
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()
    # the same generator seed, the same answer
    torch.testing.assert_close(S.lsh_attention(qk, v, 4, 2, 5, generator=3),
                               S.lsh_attention(qk, v, 4, 2, 5, generator=3), rtol=0, atol=0)


def test_look_one_back_and_lsh_mask_picture():
    x = torch.arange(6).reshape(1, 1, 1, 3, 2)  # (B, H, R, n_chunks=3, m=2)
    assert S.look_one_back(x).tolist() == [[[[[0, 1, 4, 5], [2, 3, 0, 1], [4, 5, 2, 3]]]]]
    assert torch.equal(S.look_one_back(x[..., :1, :]), x[..., :1, :])  # one chunk: nothing before
    buckets = torch.tensor([0, 1, 0, 1, 0, 1]).reshape(1, 1, 1, 6)
    mask = S.lsh_mask(buckets, 6)[0, 0]  # one chunk: exactly "same bucket, not itself"
    same = buckets[0, 0, 0][:, None] == buckets[0, 0, 0][None, :]
    assert torch.equal(mask, same & ~torch.eye(6, dtype=torch.bool))


def test_lsh_self_attention_module(gen):
    torch.manual_seed(0)
    layer = S.LSHSelfAttention(16, 2, n_buckets=4, n_rounds=2, chunk_len=4, causal=True)
    x = torch.randn(2, 12, 16, generator=gen)
    qk = A.split_heads(x @ layer.qk.weight.T, 2)
    v = A.split_heads(x @ layer.v.weight.T, 2)
    o = S.lsh_attention(qk, v, 4, 2, 4, True, generator=7)
    expected = A.merge_heads(o) @ layer.out.weight.T
    torch.testing.assert_close(layer(x, generator=7), expected)
    layer.full = True
    full = A.merge_heads(S.shared_qk_attention(qk, v, causal=True)) @ layer.out.weight.T
    torch.testing.assert_close(layer(x), full)
    with pytest.raises(ValueError, match="d_model=10 must be divisible by n_heads=3"):
        S.LSHSelfAttention(10, 3, 4)


# ---------------------------------------------------------------------------------------
# 5-6. Reversible layers, chunked feed-forward, activation memory
# ---------------------------------------------------------------------------------------

D_HALF = 6


def block(seed=0, dropout=0.0, chunks=1, d=D_HALF, dtype=torch.float64):
    torch.manual_seed(seed)
    f = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.Tanh(), nn.Dropout(dropout))
    g = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(dropout),
                      nn.Linear(4 * d, d))
    return S.ReversibleBlock(f, g, chunks=chunks).to(dtype)


def halves(B=2, L=7, d=D_HALF, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, L, d, generator=g, dtype=dtype).requires_grad_(True),
            torch.randn(B, L, d, generator=g, dtype=dtype).requires_grad_(True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reversible_block_inputs_are_reconstructed(dtype):
    blocks = [block(seed=s, dtype=dtype) for s in range(4)]
    x1, x2 = halves(dtype=dtype)
    with torch.no_grad():
        z1, z2 = blocks[0](x1, x2)
        torch.testing.assert_close(z1, x1 + blocks[0].F(x2))  # y1 = x1 + F(x2)
        torch.testing.assert_close(z2, x2 + blocks[0].G(z1))  # y2 = x2 + G(y1)
        y1, y2 = x1, x2
        for b in blocks:
            y1, y2 = b(y1, y2)
        for b in reversed(blocks):  # walk the stack back down from its outputs
            y1, y2 = b.inverse(y1, y2)
    assert (y1 - x1).abs().max() < 1e-5 and (y2 - x2).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunks", [1, 3])
def test_reversible_gradients_equal_an_ordinary_blocks(dtype, chunks):
    blocks = [block(seed=s, chunks=chunks, dtype=dtype) for s in range(3)]
    blocks.append(blocks[0])  # a block used twice: its parameters collect both gradients
    params = [p for b in blocks[:3] for p in b.parameters()]
    x1, x2 = halves(dtype=dtype)
    w = torch.linspace(-1, 1, D_HALF, dtype=dtype)

    def loss(y1, y2):
        return (y1 ** 2).sum() + (y2 * w).sum()

    y1, y2 = S.reversible_sequence(blocks, x1, x2)
    g_rev = torch.autograd.grad(loss(y1, y2), [x1, x2, *params])  # autograd.grad works too
    a1, a2 = x1, x2
    for b in blocks:
        a1, a2 = b(a1, a2)
    torch.testing.assert_close((y1, y2), (a1, a2), rtol=0, atol=0)
    g_ord = torch.autograd.grad(loss(a1, a2), [x1, x2, *params])
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for got, expected in zip(g_rev, g_ord, strict=True):
        torch.testing.assert_close(got, expected, **tol)


def test_reversible_replays_dropout_and_lsh_rotations():
    def stack(preserve):
        blocks = [block(seed=s, dropout=0.3) for s in range(2)]
        torch.manual_seed(1)
        lsh = S.LSHSelfAttention(2 * D_HALF, 2, n_buckets=4, n_rounds=2, chunk_len=4).double()
        blocks.append(S.ReversibleBlock(nn.Sequential(nn.Linear(D_HALF, 2 * D_HALF).double(), lsh,
                                                      nn.Linear(2 * D_HALF, D_HALF).double()),
                                        blocks[0].G))
        return S.ReversibleSequence(blocks, preserve_rng_state=preserve).train()

    model = stack(True)
    params = list(model.parameters())
    x1, x2 = halves(L=8)
    torch.manual_seed(3)
    y1, y2 = model(x1, x2)  # dropout masks and rotations come from the global RNG
    g_rev = torch.autograd.grad((y1 * y2).sum(), [x1, x2, *params])
    model.reversible = False
    torch.manual_seed(3)
    a1, a2 = model(x1, x2)
    g_ord = torch.autograd.grad((a1 * a2).sum(), [x1, x2, *params])
    torch.testing.assert_close((y1, y2), (a1, a2))
    for got, expected in zip(g_rev, g_ord, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # without replaying the RNG, the recomputation draws other masks: wrong gradients
    model = stack(False)
    torch.manual_seed(3)
    y1, y2 = model(x1, x2)
    g_bad = torch.autograd.grad((y1 * y2).sum(), [x1, x2])
    assert not torch.allclose(g_bad[0], g_ord[0])


def test_reversible_sequence_without_grad_and_empty():
    blocks = [block(seed=s) for s in range(2)]
    x1, x2 = halves()
    with torch.no_grad():
        y = S.reversible_sequence(blocks, x1, x2)
        a = S.ReversibleSequence(blocks, reversible=False)(x1, x2)
    torch.testing.assert_close(y, a)
    assert not y[0].requires_grad
    out = S.reversible_sequence([], x1, x2)
    assert out[0] is x1 and out[1] is x2


def test_activation_memory_is_flat_in_depth_for_a_reversible_stack():
    """The claim: saved activations grow linearly with depth, except in a reversible stack."""
    depths = [1, 2, 4, 8]
    ordinary, reversible = [], []
    x = torch.randn(2, 16, D_HALF, requires_grad=True)
    for n in depths:
        blocks = [block(seed=s, dtype=torch.float32) for s in range(n)]
        ordinary.append(S.saved_activation_memory(S.ReversibleSequence(blocks, reversible=False), x, x))
        reversible.append(S.saved_activation_memory(S.ReversibleSequence(blocks), x, x))
    assert len({m.bytes for m in reversible}) == 1, reversible  # flat
    one = 2 * 16 * D_HALF * 4  # one (B, L, d/2) float32 tensor
    assert reversible[0].bytes == 2 * one and reversible[0].tensors == 2  # y1 and y2 only
    per_block = ordinary[1].bytes - ordinary[0].bytes
    assert per_block > 4 * one
    for n, m in zip(depths, ordinary, strict=True):  # linear: a + b * depth
        assert m.bytes == ordinary[0].bytes + (n - 1) * per_block
    # parameters are not activations; excluded ones are not counted either
    lin = nn.Linear(4, 4)
    z = torch.randn(3, 4, requires_grad=True)
    assert S.saved_activation_memory(lin, z).bytes == 3 * 4 * 4  # the input only
    assert S.saved_activation_memory(lambda t: lin(t), z).bytes > 3 * 4 * 4  # W counted
    assert S.saved_activation_memory(lambda t: lin(t), z, exclude=list(lin.parameters())).bytes == 48


def test_chunked_feed_forward_equals_the_plain_one(gen):
    ffn = nn.Sequential(nn.Linear(D_HALF, 64), nn.GELU(), nn.Linear(64, D_HALF))
    x = torch.randn(2, 32, D_HALF, generator=gen, requires_grad=True)
    plain = ffn(x)
    (g_plain,) = torch.autograd.grad(plain.sum(), x)
    for chunks in (1, 3, 8, 32, 50):
        out = S.chunked_feed_forward(ffn, x, chunks)
        torch.testing.assert_close(out, plain)
        torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], g_plain)
    hidden = 2 * 32 * 64 * 4  # the (B, L, d_ff) float32 hidden layer
    assert S.largest_intermediate(ffn, x.detach()) == hidden
    assert S.largest_intermediate(S.chunked_feed_forward, ffn, x.detach(), 8) == hidden // 8


# ---------------------------------------------------------------------------------------
# 7. Routing attention and online k-means
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_routing_attention_with_one_cluster_is_full_attention(causal):
    q, k = qkv(L=12, D=4, Dv=4)
    _, v = qkv(L=12, D=4, Dv=3, seed=1)
    mu = S.init_centroids(1, 4, n_heads=2, generator=0, dtype=torch.float64)
    full = A.scaled_dot_product_attention(q, k, v, mask=A.causal_mask(12) if causal else None)
    torch.testing.assert_close(S.routing_attention(q, k, v, mu, causal=causal), full)
    torch.testing.assert_close(S.routing_attention(q, k, v, mu, window=12, causal=causal), full)
    # several clusters whose windows take everyone: still every key once
    mu3 = S.init_centroids(3, 4, n_heads=2, generator=1, dtype=torch.float64)
    torch.testing.assert_close(S.routing_attention(q, k, v, mu3, window=12, causal=causal), full)


def test_routing_attention_attends_within_clusters():
    q, k = qkv(L=14, D=4, Dv=4)
    _, v = qkv(L=14, D=4, Dv=3, seed=1)
    mu = S.init_centroids(3, 4, n_heads=2, generator=2, dtype=torch.float64)
    cq, ck = S.cluster_assign(q, mu), S.cluster_assign(k, mu)
    for b in range(2):  # the nearest centroid, by cosine, per head
        for h in range(2):
            for i in range(14):
                cos = F.normalize(q[b, h, i], dim=-1) @ mu[h].T
                assert int(cq[b, h, i]) == int(cos.argmax())
    for causal in (False, True):
        same = cq[..., :, None] == ck[..., None, :]
        if causal:
            same = same & A.causal_mask(14)
        out, w = S.routing_attention(q, k, v, mu, causal=causal, need_weights=True)
        torch.testing.assert_close(out, A.scaled_dot_product_attention(q, k, v, mask=same))
        assert (w[~same.expand_as(w)] == 0).all()
        empty = ~same.any(-1)
        assert (out[empty] == 0).all() and torch.isfinite(out).all()  # no key: zeros, not NaN


def test_balanced_routing_groups_top_w_queries_and_keys():
    q, k = qkv(L=16, D=4, Dv=4, seed=3)
    _, v = qkv(L=16, D=4, Dv=3, seed=4)
    mu = S.init_centroids(4, 4, n_heads=2, generator=3, dtype=torch.float64)
    w = 4
    for causal in (False, True):
        out, weights = S.routing_attention(q, k, v, mu, window=w, causal=causal, need_weights=True)
        allowed = torch.zeros(2, 2, 16, 16, dtype=torch.bool)
        picked = torch.zeros(2, 2, 16, dtype=torch.bool)
        for b in range(2):
            for h in range(2):
                sim_q = F.normalize(q[b, h], dim=-1) @ mu[h].T  # (L, C)
                sim_k = F.normalize(k[b, h], dim=-1) @ mu[h].T
                for c in range(4):
                    qs = sim_q[:, c].topk(w).indices.tolist()  # the w nearest queries of centroid c
                    ks = sim_k[:, c].topk(w).indices.tolist()
                    for i in qs:
                        picked[b, h, i] = True
                        for j in ks:
                            allowed[b, h, i, j] |= (j <= i) or not causal
        torch.testing.assert_close(out, A.scaled_dot_product_attention(q, k, v, mask=allowed))
        torch.testing.assert_close(out, weights @ v)
        assert (out[~picked] == 0).all() and (weights[~allowed] == 0).all()
        assert torch.isfinite(out).all()


def test_routing_attention_gradients_are_finite():
    q, k = qkv(L=10, D=4, Dv=4)
    q, k = q.requires_grad_(True), k.requires_grad_(True)
    mu = S.init_centroids(3, 4, generator=0, dtype=torch.float64)  # one set for every head
    assert torch.autograd.gradcheck(lambda a, b: S.routing_attention(a, b, b, mu, window=3, causal=True),
                                    (q, k))


def test_kmeans_update_moves_centroids_towards_their_points(gen):
    mu = S.init_centroids(3, 5, generator=gen, dtype=torch.float64)
    x = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    assign = S.cluster_assign(x, mu)
    new = S.kmeans_update(mu, x, decay=0.9)
    assert torch.allclose(new.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    for c in range(3):
        pts = F.normalize(x[assign == c], dim=-1)
        if len(pts):
            mean = F.normalize(pts.mean(0), dim=0)
            assert new[c] @ mean > mu[c] @ mean  # closer in angle to its points
            torch.testing.assert_close(S.kmeans_update(mu, x, decay=0.0)[c], mean)  # a full step
    torch.testing.assert_close(S.kmeans_update(mu, x, decay=1.0), mu)  # no step
    # a centroid that gets no point stays put
    near = mu[:1] + 0.01 * torch.randn(6, 5, generator=gen, dtype=torch.float64)  # all go to mu_0
    assert (S.cluster_assign(near, mu) == 0).all()
    moved = S.kmeans_update(mu, near, decay=0.5)
    torch.testing.assert_close(moved[1:], mu[1:])
    assert not torch.allclose(moved[0], mu[0])


def test_kmeans_recovers_planted_clusters_per_head(gen):
    centres = F.normalize(torch.randn(2, 3, 8, generator=gen, dtype=torch.float64), dim=-1)  # (H, C, D)
    labels = torch.randint(0, 3, (4, 2, 30), generator=gen)
    x = centres[torch.arange(2)[None, :, None], labels] * 3  # (B, H, L, D), varied lengths
    x = x + 0.05 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    mu = centres + 0.4 * torch.randn(centres.shape, generator=gen, dtype=torch.float64)
    mu = F.normalize(mu, dim=-1)
    for _ in range(30):
        mu = S.kmeans_update(mu, x, k=x.flip(2), decay=0.5)  # queries and keys share centroids
    assert ((mu * centres).sum(-1) > 0.99).all()


# ---------------------------------------------------------------------------------------
# Bad input: each error says what was expected and what came
# ---------------------------------------------------------------------------------------

def test_bad_bucket_counts():
    qk, v = qkv(L=8)
    for bad in (3, 1, 0, -2):
        with pytest.raises(ValueError, match=rf"n_buckets must be an even number >= 2.*got n_buckets={bad}"):
            S.lsh_attention(qk, v, bad)
        with pytest.raises(ValueError, match=rf"even number >= 2.*got n_buckets={bad}"):
            S.lsh_hash(qk, bad)
        with pytest.raises(ValueError, match="even number >= 2"):
            S.collision_probability(0.5, bad)
    with pytest.raises(TypeError, match="n_buckets must be an int.*got float 4.0"):
        S.lsh_rotations(8, 4.0)


def test_bad_chunk_lengths():
    qk, v = qkv(L=16)
    with pytest.raises(ValueError, match=r"chunk_len must be between 1 and the sequence length L=16.*"
                                         r"got chunk_len=32"):
        S.lsh_attention(qk, v, 4, chunk_len=32)
    with pytest.raises(ValueError, match="got chunk_len=0"):
        S.lsh_attention(qk, v, 4, chunk_len=0)
    with pytest.raises(ValueError, match="L=16.*got chunk_len=17"):
        S.lsh_mask(torch.zeros(1, 1, 1, 16, dtype=torch.long), 17)


def test_reversible_halves_of_different_widths():
    b = block()
    x1 = torch.randn(2, 5, D_HALF)
    x2 = torch.randn(2, 5, D_HALF + 2)
    expected = (r"two halves must be equally wide.*got x1 \(2, 5, 6\) \(width 6\) and "
                r"x2 \(2, 5, 8\) \(width 8\)")
    with pytest.raises(ValueError, match=expected):
        b(x1, x2)
    with pytest.raises(ValueError, match=expected):
        b.inverse(x1, x2)
    with pytest.raises(ValueError, match=expected):
        S.reversible_sequence([b], x1, x2)
    with pytest.raises(ValueError, match=r"same shape.*got x1 \(2, 5, 6\) and x2 \(2, 4, 6\)"):
        b(x1, torch.randn(2, 4, D_HALF))
    wrong = S.ReversibleBlock(nn.Linear(D_HALF, 3), nn.Identity())
    with pytest.raises(ValueError, match=r"F\(x2\) must have the shape of x1 \(2, 5, 6\); got \(2, 5, 3\)"):
        wrong(x1, x1)


def test_other_bad_inputs():
    qk, v = qkv(L=8)
    with pytest.raises(ValueError, match="n_rounds must be >= 1; got n_rounds=0"):
        S.lsh_attention(qk, v, 4, n_rounds=0)
    with pytest.raises(ValueError, match=r"4-D tensor \(batch, heads, seq, head_dim\); got shape \(8, 8\)"):
        S.lsh_attention(qk[0, 0], v[0, 0], 4)
    with pytest.raises(ValueError, match=r"k and v must agree"):
        S.lsh_attention(qk, v[:, :, :5], 4)
    with pytest.raises(ValueError, match=r"buckets must have shape \(B, H, n_rounds, L\) = \(2, 2, 1, 8\); "
                                         r"got \(2, 2, 2, 8\)"):
        S.lsh_attention(qk, v, 4, buckets=torch.zeros(2, 2, 2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"buckets must lie in \[0, n_buckets=4\); got values in \[5, 5\]"):
        S.lsh_attention(qk, v, 4, buckets=torch.full((2, 2, 1, 8), 5))
    with pytest.raises(TypeError, match="buckets must be an integer tensor"):
        S.lsh_attention(qk, v, 4, buckets=torch.zeros(2, 2, 1, 8))
    with pytest.raises(ValueError, match=r"rotations must end in \(n_rounds=1, D=8, n_buckets/2=2\); "
                                         r"got shape \(1, 8, 3\)"):
        S.lsh_hash(qk, 4, rotations=torch.randn(1, 8, 3))
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator, an int seed or None \(the global RNG\); got str"):
        S.lsh_hash(qk, 4, generator="0")
    with pytest.raises(TypeError, match="mask must be a boolean tensor"):
        S.shared_qk_attention(qk, v, mask=torch.ones(8, 8))
    with pytest.raises(ValueError, match=r"angle must be in \[0, pi\]"):
        S.collision_probability(4.0, 4)
    with pytest.raises(ValueError, match="chunks must be >= 1; got chunks=0"):
        S.chunked_feed_forward(nn.Identity(), torch.randn(2, 3, 4), 0)
    with pytest.raises(ValueError, match="chunks must be >= 1"):
        S.ReversibleBlock(nn.Identity(), nn.Identity(), chunks=0)
    with pytest.raises(TypeError, match=r"blocks\[1\] must be a ReversibleBlock; got Linear"):
        S.reversible_sequence([block(), nn.Linear(2, 2)], *halves())
    mu = S.init_centroids(3, 8, n_heads=2)
    with pytest.raises(ValueError, match=r"centroids must be \(H=2, C, D=8\) or \(C, D=8\) to cluster "
                                         r"q \(2, 2, 8, 8\); got \(2, 3, 5\)"):
        S.routing_attention(qk, qk, v, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"window must be between 1 and min\(Lq, Lk\)=8.*got window=9"):
        S.routing_attention(qk, qk, v, mu, window=9)
    with pytest.raises(ValueError, match="decay must be a number in \\[0, 1\\]; got 1.5"):
        S.kmeans_update(mu, qk, decay=1.5)
    with pytest.raises(ValueError, match=r"centroids must be .*\(C, D=5\) to cluster x \(4, 5\); got \(2, 3, 8\)"):
        S.kmeans_update(mu, torch.randn(4, 5))


# ---------------------------------------------------------------------------------------
# On a GPU: the same answers as on the CPU
# ---------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_matches_cpu():
    qk, v = qkv(L=32, dtype=torch.float32)
    buckets = random_buckets(2, 2, 3, 32, 4)
    cpu = S.lsh_attention(qk, v, 4, 3, 8, causal=True, buckets=buckets)
    gpu = S.lsh_attention(qk.cuda(), v.cuda(), 4, 3, 8, causal=True, buckets=buckets.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
    g = torch.Generator(device="cuda").manual_seed(0)
    assert S.lsh_hash(qk.cuda(), 4, 2, generator=g).device.type == "cuda"
    assert torch.equal(S.lsh_hash(qk.cuda(), 4, 2, generator=0).cpu(), S.lsh_hash(qk, 4, 2, generator=0))
    blocks = [block(seed=s, dropout=0.2, dtype=torch.float32).cuda().train() for s in range(2)]
    x1, x2 = (t.detach().float().cuda().requires_grad_(True) for t in halves())
    torch.manual_seed(0)
    y = S.reversible_sequence(blocks, x1, x2)
    g_rev = torch.autograd.grad(sum(t.sum() for t in y), [x1, x2])
    torch.manual_seed(0)
    a1, a2 = x1, x2
    for b in blocks:
        a1, a2 = b(a1, a2)
    g_ord = torch.autograd.grad(a1.sum() + a2.sum(), [x1, x2])
    for got, expected in zip(g_rev, g_ord, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    mu = S.init_centroids(2, 8, n_heads=2, device="cuda")
    assert S.routing_attention(qk.cuda(), qk.cuda(), v.cuda(), mu, window=8).device.type == "cuda"
