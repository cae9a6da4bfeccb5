"""decoding.py: temperature, top-k and nucleus filters (against loop references and
``transformers``' warpers), sampling (top-p = 1 is plain sampling, top-p -> 0 is greedy),
greedy = beam search of width 1, beam search = exhaustive search when wide enough (eos and
length normalisation), distinct-n and repeated n-grams, the KV cache (cached forward equal to
``model(idx)`` to 1e-5 for every position scheme, bytes counted), speculative sampling (a draft
equal to the target accepts everything; the exact output distribution equals the target's;
sampled outputs pass a chi-square test where the draft alone fails; calls per token against
(1 - a^(n+1)) / (1 - a)), the chi-square p-value, and bad input.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from transformer_lab import decoding as Dc
from transformer_lab.models import ModelConfig, TransformerLM
from transformer_lab.positions import POSITION_SCHEMES


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _lm(positions="sinusoidal", vocab=13, d_model=32, n_layers=2, norm_first=True, seed=0, **kw):
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig(vocab_size=vocab, d_model=d_model, n_heads=4, n_layers=n_layers,
                                     positions=positions, norm_first=norm_first, max_len=64, **kw)).eval()


# ---------------------------------------------------------------------------------------
# Temperature, top-k, nucleus
# ---------------------------------------------------------------------------------------

def _nucleus_loop(logits_row, p_top):
    """Reference: add tokens in decreasing probability until their mass reaches p_top."""
    probs = torch.softmax(logits_row.double(), -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= p_top:
            break
    return kept


@pytest.mark.parametrize("p_top", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_reaching_p(p_top):
    logits = torch.randn(6, 20, generator=_gen(1)) * 2
    out = Dc.top_p_filter(logits, p_top)
    for row in range(6):
        kept = {i for i in range(20) if math.isfinite(out[row, i].item())}
        assert kept == _nucleus_loop(logits[row], p_top)
        assert torch.equal(out[row][list(kept)], logits[row][list(kept)])  # kept logits untouched


def test_top_p_boundary_mass_exactly_p():
    # four tokens of 0.25: the first two reach 0.5 exactly, so p_top = 0.5 keeps two, not three
    assert int(torch.isfinite(Dc.top_p_filter(torch.zeros(1, 4), 0.5)).sum()) == 2
    assert int(torch.isfinite(Dc.top_p_filter(torch.zeros(1, 4), 0.25)).sum()) == 1
    assert int(torch.isfinite(Dc.top_p_filter(torch.zeros(1, 4), 0.51)).sum()) == 3


def test_top_p_one_is_unchanged_and_tiny_p_is_the_argmax():
    logits = torch.randn(4, 50, generator=_gen(2))
    logits[0, 3] = -1e4  # a token of (nearly) zero probability stays in at p = 1
    assert torch.equal(Dc.top_p_filter(logits, 1.0), logits)
    probs = Dc.sampling_probs(logits, top_p=1e-9)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 50).float())


def test_top_k_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 5.0, -2.0, 3.0]])
    assert torch.isfinite(Dc.top_k_filter(logits, 1)).tolist() == [[False, True, False, True, False, False]]
    assert torch.isfinite(Dc.top_k_filter(logits, 3)).tolist() == [[False, True, True, True, False, True]]
    assert torch.equal(Dc.top_k_filter(logits, 6), logits) and torch.equal(Dc.top_k_filter(logits, 99), logits)
    z = torch.randn(5, 30, generator=_gen(3))
    out = Dc.top_k_filter(z, 7)
    assert (torch.isfinite(out).sum(-1) == 7).all()
    ref = torch.full_like(z, float("-inf")).scatter(-1, z.topk(7, -1).indices, z.topk(7, -1).values)
    assert torch.equal(out, ref)


def test_filters_match_transformers_warpers():
    warpers = pytest.importorskip("transformers.generation.logits_process")
    z = torch.randn(8, 40, generator=_gen(4)) * 3
    for p_top in (0.1, 0.5, 0.92):
        ours = torch.isfinite(Dc.top_p_filter(z, p_top))
        theirs = torch.isfinite(warpers.TopPLogitsWarper(p_top)(None, z.clone()))
        assert torch.equal(ours, theirs), p_top
    for k in (1, 5, 39):
        ours = torch.isfinite(Dc.top_k_filter(z, k))
        theirs = torch.isfinite(warpers.TopKLogitsWarper(k)(None, z.clone()))
        assert torch.equal(ours, theirs), k
    torch.testing.assert_close(Dc.apply_temperature(z, 0.7), warpers.TemperatureLogitsWarper(0.7)(None, z.clone()))


def test_sampling_probs_order_and_temperature():
    z = torch.randn(3, 10, generator=_gen(5))
    torch.testing.assert_close(Dc.sampling_probs(z, 0.5), torch.softmax(z / 0.5, -1))
    # temperature first, then top-k, then top-p (renormalised over what is kept)
    probs = Dc.sampling_probs(z, 2.0, top_k=6, top_p=0.5)
    zt = z / 2.0
    for row in range(3):
        kept6 = set(zt[row].topk(6).indices.tolist())
        masked = torch.where(torch.tensor([i in kept6 for i in range(10)]), zt[row], torch.tensor(float("-inf")))
        kept = _nucleus_loop(masked, 0.5)
        expect = torch.zeros(10)
        idx = sorted(kept)
        expect[idx] = torch.softmax(zt[row][idx], -1)
        torch.testing.assert_close(probs[row], expect)
    assert torch.equal(Dc.sampling_probs(z, 0.0), torch.nn.functional.one_hot(z.argmax(-1), 10).float())
    # a lower temperature sharpens: the argmax's probability grows
    assert (Dc.sampling_probs(z, 0.3).max(-1).values > Dc.sampling_probs(z, 3.0).max(-1).values).all()


def test_top_p_one_equals_plain_sampling_and_tiny_p_equals_greedy():
    model = _lm()
    prefix = torch.randint(0, 13, (3, 4), generator=_gen(6))
    plain = Dc.sample_decode(model, prefix, 20, generator=_gen(7))
    nucleus_all = Dc.sample_decode(model, prefix, 20, top_p=1.0, generator=_gen(7))
    assert torch.equal(plain, nucleus_all)
    assert not torch.equal(plain, Dc.sample_decode(model, prefix, 20, generator=_gen(8)))  # seeds matter
    greedy = Dc.greedy_decode(model, prefix, 20)
    assert torch.equal(Dc.sample_decode(model, prefix, 20, top_p=1e-6, generator=_gen(9)), greedy)
    assert torch.equal(Dc.sample_decode(model, prefix, 20, top_k=1, generator=_gen(9)), greedy)
    assert not torch.equal(plain, greedy)


def test_sampling_frequencies_follow_the_filtered_distribution():
    z = torch.randn(1, 6, generator=_gen(10))
    probs = Dc.sampling_probs(z, 0.8, top_p=0.8)[0]
    draws = Dc.sample_next(z.expand(20000, 6), 0.8, top_p=0.8, generator=_gen(11))
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[probs == 0].sum() == 0  # never outside the nucleus
    assert Dc.chi_square_test(counts, probs)["p_value"] > 1e-3


# ---------------------------------------------------------------------------------------
# Greedy and beam search
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_equals_beam_search_of_width_one(use_cache):
    model = _lm("rope")
    prefixes = torch.randint(0, 13, (4, 3), generator=_gen(12))
    greedy = Dc.greedy_decode(model, prefixes, 15, use_cache=use_cache)
    for row in range(4):
        tokens, score = Dc.beam_search(model, prefixes[row], 15, beam_width=1, length_penalty=0.0,
                                       use_cache=use_cache)
        assert torch.equal(tokens, greedy[row])
        with torch.no_grad():
            logp = torch.log_softmax(model(greedy[row:row + 1, :-1]).double(), -1)[0, 2:]
        assert score == pytest.approx(float(logp.gather(-1, greedy[row, 3:, None]).sum()), abs=1e-6)


def _exhaustive(model, prefix, n_new, eos_id, lp):
    """Best s(y) / |y|^lp over every output: non-eos tokens then eos, or n_new non-eos tokens."""
    V = model.vocab_size
    best, best_seq = -math.inf, None
    plain = [t for t in range(V) if t != eos_id]
    candidates = [seq + (eos_id,) for m in range(n_new) for seq in itertools.product(plain, repeat=m)]
    candidates += list(itertools.product(plain, repeat=n_new))
    for seq in candidates:
        full = torch.tensor([list(prefix) + list(seq)])
        logp = torch.log_softmax(model(full[:, :-1]), -1)[0, len(prefix) - 1:]
        s = float(logp.detach().gather(-1, torch.tensor(seq)[:, None]).sum()) / len(seq) ** lp
        if s > best:
            best, best_seq = s, seq
    return best, best_seq


@pytest.mark.parametrize("lp", [0.0, 0.5, 1.0])
def test_wide_beam_search_is_exhaustive_search(lp):
    model = Dc.NGramLM(4, order=2, seed=3, scale=1.5)
    best, seq = _exhaustive(model, (1,), 4, eos_id=0, lp=lp)
    tokens, score = Dc.beam_search(model, torch.tensor([1]), 4, beam_width=4 ** 3, length_penalty=lp, eos_id=0)
    assert tuple(tokens[1:].tolist()) == seq and score == pytest.approx(best)


def _beam_reference(model, prefix, n_new, width, lp, eos_id):
    """A plain loop: expand every alive beam by every token, rank, move eos candidates among the
    best `width` to the finished list, keep the best `width` others."""
    alive, finished = [((), 0.0)], []
    for _ in range(n_new):
        cands = []
        for seq, s in alive:
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([list(prefix) + list(seq)])).double(), -1)[0, -1]
            cands += [(seq + (x,), s + float(logp[x])) for x in range(logp.shape[0])]
        cands.sort(key=lambda c: -c[1])
        alive = []
        for rank, (seq, s) in enumerate(cands):
            if seq[-1] == eos_id:
                if rank < width:
                    finished.append((seq, s / len(seq) ** lp))
                continue
            alive.append((seq, s))
            if len(alive) == width:
                break
    pool = finished + [(seq, s / len(seq) ** lp) for seq, s in alive]
    return max(pool, key=lambda c: c[1])


@pytest.mark.parametrize("width", [2, 3])
@pytest.mark.parametrize("lp", [0.0, 1.0])
def test_beam_search_matches_a_loop_reference(width, lp):
    model = Dc.NGramLM(5, order=2, seed=7, scale=1.0)
    for start in range(1, 5):
        seq, score = _beam_reference(model, (start,), 5, width, lp, eos_id=0)
        tokens, ours = Dc.beam_search(model, torch.tensor([start]), 5, beam_width=width, length_penalty=lp,
                                      eos_id=0)
        assert tuple(tokens[1:].tolist()) == seq and ours == pytest.approx(score)


def test_beam_width_one_with_eos_is_still_greedy():
    model = Dc.NGramLM(3, order=2, seed=3)
    probs = torch.tensor([[0.2, 0.4, 0.4],  # after eos (unused)
                          [0.4, 0.0, 0.6],  # after 1: eos 0.4 (second best), 2 with 0.6
                          [0.1, 0.6, 0.3]], dtype=torch.float64)
    with torch.no_grad():
        model.table.copy_(probs.clamp_min(1e-9).log())
    tokens, score = Dc.beam_search(model, torch.tensor([1]), 5, beam_width=1, length_penalty=0.0, eos_id=0)
    # eos was second at the first step, outside a beam of one: never a finished hypothesis, even
    # though its log-probability (-0.92) beats the greedy path's (5 log 0.6 = -2.55)
    assert tokens.tolist() == [1, 2, 1, 2, 1, 2] and score == pytest.approx(5 * math.log(0.6))
    assert torch.equal(tokens, Dc.greedy_decode(model, torch.tensor([1]), 5)[0])


def test_length_penalty_trades_short_for_long():
    model = Dc.NGramLM(4, order=2, seed=3)
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25],  # after eos (unused)
                          [0.40, 0.10, 0.40, 0.10],  # after 1: stop now (eos = 0) or go on to 2
                          [0.05, 0.05, 0.10, 0.80],  # 2 -> 3 with 0.8
                          [0.05, 0.05, 0.80, 0.10]], dtype=torch.float64)  # 3 -> 2 with 0.8
    with torch.no_grad():
        model.table.copy_(probs.log())
    lengths = {}
    for lp in (0.0, 1.0):
        tokens, _ = Dc.beam_search(model, torch.tensor([1]), 6, beam_width=16, length_penalty=lp, eos_id=0)
        lengths[lp] = len(tokens) - 1
    assert lengths[0.0] < lengths[1.0]  # raw log-probability prefers stopping early


def test_beam_search_finds_a_better_sequence_than_greedy_here():
    model = _lm("alibi", seed=1)
    prefix = torch.tensor([2, 5])
    greedy = Dc.greedy_decode(model, prefix, 8)[0]
    _, greedy_score = Dc.beam_search(model, prefix, 8, beam_width=1, length_penalty=0.0)
    tokens, score = Dc.beam_search(model, prefix, 8, beam_width=8, length_penalty=0.0)
    assert score >= greedy_score - 1e-9
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens[None, :-1]).double(), -1)[0, 1:]
    assert score == pytest.approx(float(logp.gather(-1, tokens[2:, None]).sum()), abs=1e-6)
    assert greedy.shape == tokens.shape


# ---------------------------------------------------------------------------------------
# Repetition and diversity
# ---------------------------------------------------------------------------------------

def test_distinct_n_and_repeated_ngram_rate_by_hand():
    loop = torch.tensor([1, 2, 3, 1, 2, 3, 1, 2, 3])
    assert Dc.ngrams(loop, 3)[:2] == [(1, 2, 3), (2, 3, 1)]
    assert Dc.distinct_n(loop, 3) == pytest.approx(3 / 7)
    assert Dc.repeated_ngram_rate(loop, 3) == pytest.approx(4 / 7)  # n-grams 4..7 seen before
    fresh = torch.arange(9)
    assert Dc.distinct_n(fresh, 2) == 1.0 and Dc.repeated_ngram_rate(fresh, 2) == 0.0
    both = torch.stack([loop, fresh])
    assert Dc.repeated_ngram_rate(both, 3) == pytest.approx((4 / 7 + 0) / 2)
    assert Dc.distinct_n([5, 5, 5, 5], 1) == pytest.approx(1 / 4)
    assert Dc.repeated_ngram_rate([1, 2], 3) == 0.0 and Dc.distinct_n([1, 2], 3) == 1.0


# ---------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("positions", POSITION_SCHEMES)
@pytest.mark.parametrize("norm_first", [True, False])
def test_cached_forward_equals_recomputation(positions, norm_first):
    model = _lm(positions, norm_first=norm_first, residual="layerscale" if norm_first else "none")
    idx = torch.randint(0, 13, (2, 21), generator=_gen(13))
    with torch.no_grad():
        full = model(idx)  # (B, L, V)
        cache = Dc.KVCache(2)
        chunks = [Dc.cached_forward(model, idx[:, :6], cache)]  # a prompt, then one token at a time
        chunks += [Dc.cached_forward(model, idx[:, t:t + 1], cache) for t in range(6, 18)]
        chunks += [Dc.cached_forward(model, idx[:, 18:], cache)]  # and a block of three
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 21


def test_cached_forward_past_max_len_and_float64():
    model = _lm("learned").double()
    idx = torch.randint(0, 13, (1, 70), generator=_gen(14))  # max_len 64: learned rows clamp
    with torch.no_grad():
        cache = Dc.KVCache(2)
        steps = [Dc.cached_forward(model, idx[:, :1], cache)]
        steps += [Dc.cached_forward(model, idx[:, t:t + 1], cache) for t in range(1, 70)]
        torch.testing.assert_close(torch.cat(steps, 1), model(idx), atol=1e-10, rtol=1e-10)
    assert cache.keys[0].dtype == torch.float64


def test_kv_cache_memory_is_counted():
    model = _lm("rope", d_model=32, n_layers=2)
    cache = Dc.KVCache(2)
    with torch.no_grad():
        Dc.cached_forward(model, torch.randint(0, 13, (3, 10), generator=_gen(15)), cache)
    assert cache.keys[1].shape == (3, 4, 10, 8)  # (B, H, L, D)
    per_token_layer = 2 * 32 * 4  # a key and a value of d_model fp32 numbers
    assert cache.nbytes() == 3 * 10 * 2 * per_token_layer == Dc.kv_cache_bytes(2, 32, 10, batch=3)
    assert Dc.kv_cache_bytes(32, 4096, 1, dtype=torch.float16) == 2 * 32 * 4096 * 2  # 0.5 MiB per token
    cache.crop(4)
    assert cache.length == 4 and cache.nbytes() == Dc.kv_cache_bytes(2, 32, 4, batch=3)
    cache.reorder(torch.tensor([2, 2]))
    assert cache.keys[0].shape[0] == 2 and torch.equal(cache.keys[0][0], cache.keys[0][1])


def test_crop_rolls_back_the_cache():
    model = _lm("t5")
    idx = torch.randint(0, 13, (2, 12), generator=_gen(16))
    other = torch.randint(0, 13, (2, 3), generator=_gen(17))
    with torch.no_grad():
        cache = Dc.KVCache(2)
        Dc.cached_forward(model, idx[:, :9], cache)
        Dc.cached_forward(model, other, cache)  # rejected tokens
        cache.crop(9)
        torch.testing.assert_close(Dc.cached_forward(model, idx[:, 9:], cache), model(idx)[:, 9:],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["rope", "learned", "shaw"])
def test_cached_and_recomputed_decoding_agree(positions):
    model = _lm(positions)
    prefix = torch.randint(0, 13, (3, 5), generator=_gen(18))
    assert torch.equal(Dc.greedy_decode(model, prefix, 25), Dc.greedy_decode(model, prefix, 25, use_cache=False))
    a = Dc.sample_decode(model, prefix, 25, top_k=5, generator=_gen(19))
    b = Dc.sample_decode(model, prefix, 25, top_k=5, generator=_gen(19), use_cache=False)
    assert torch.equal(a, b)


def test_decoding_restores_training_mode_and_leaves_no_grad():
    model = _lm(dropout=0.1).train()
    out = Dc.greedy_decode(model, torch.tensor([[1, 2]]), 5)
    assert model.training and not out.requires_grad
    assert torch.equal(out, Dc.greedy_decode(model, torch.tensor([[1, 2]]), 5))  # no dropout inside


# ---------------------------------------------------------------------------------------
# Speculative sampling
# ---------------------------------------------------------------------------------------

def test_expected_tokens_per_call():
    assert Dc.expected_tokens_per_call(0.0, 4) == 1.0
    assert Dc.expected_tokens_per_call(1.0, 4) == 5.0
    for a, n in ((0.5, 2), (0.8, 5), (0.3, 1)):
        assert Dc.expected_tokens_per_call(a, n) == pytest.approx(sum(a ** i for i in range(n + 1)))
    assert Dc.expected_tokens_per_call(1 - 1e-12, 3) == pytest.approx(4.0)


def test_acceptance_rate_and_residual():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.1, 0.4], dtype=torch.float64)
    assert float(Dc.acceptance_rate(p, q)) == pytest.approx(0.2 + 0.3 + 0.1)
    torch.testing.assert_close(Dc.residual_distribution(p, q), torch.tensor([0.75, 0.0, 0.25, 0.0],
                                                                            dtype=torch.float64))
    torch.testing.assert_close(Dc.residual_distribution(p, p), p)


def test_draft_equal_to_target_accepts_everything():
    model = _lm("rope")
    prefix = torch.randint(0, 13, (4, 3), generator=_gen(20))
    for n_draft in (1, 3, 6):
        out, st = Dc.speculative_generate(model, model, prefix, 14, n_draft, generator=_gen(21))
        assert st["acceptance_rate"] == 1.0 and int(st["rejected"].sum()) == 0
        rounds = math.ceil(14 / (n_draft + 1))  # n_draft accepted plus the bonus token per call
        assert (st["target_calls"] == rounds).all()
        assert st["target_calls_per_token"] == pytest.approx(rounds / 14)
    # greedy (temperature 0) speculative decoding with any draft is the target's greedy output
    draft = _lm("rope", seed=5)
    out, st = Dc.speculative_generate(model, draft, prefix, 14, 3, temperature=0.0, generator=_gen(22))
    assert torch.equal(out, Dc.greedy_decode(model, prefix, 14))
    assert st["acceptance_rate"] < 1.0


def _table_fn(V, seed):
    """context -> probabilities, depending on the last two tokens and the length (float64)."""
    g = _gen(seed)
    table = torch.softmax(1.5 * torch.randn(V, V, 5, V, generator=g, dtype=torch.float64), -1)

    def fn(ctx):
        a, b = (ctx[-2] if len(ctx) > 1 else 0), ctx[-1]
        return table[a, b, len(ctx) % 5]
    return fn


@pytest.mark.parametrize("V, n_new, n_draft", [(3, 3, 1), (3, 3, 2), (2, 4, 3)])
def test_speculative_output_distribution_is_exactly_the_target(V, n_new, n_draft):
    target, draft = _table_fn(V, 30), _table_fn(V, 31)
    exact = Dc.sequence_distribution(target, (1,), n_new)
    spec = Dc.speculative_distribution(target, draft, (1,), n_new, n_draft)
    assert set(spec) == set(exact) and sum(spec.values()) == pytest.approx(1.0, abs=1e-12)
    for seq, prob in exact.items():
        assert spec[seq] == pytest.approx(prob, abs=1e-12)
    # the draft's own distribution differs: the check can fail
    drafted = Dc.sequence_distribution(draft, (1,), n_new)
    assert max(abs(drafted[s] - exact[s]) for s in exact) > 0.05


def test_speculative_step_first_token_has_the_target_distribution():
    V, n = 5, 3
    g = _gen(23)
    p = torch.softmax(torch.randn(1, n + 1, V, generator=g, dtype=torch.float64) * 2, -1).expand(30000, -1, -1)
    q = torch.softmax(torch.randn(1, n, V, generator=g, dtype=torch.float64) * 2, -1).expand(30000, -1, -1)
    x = torch.multinomial(q[0, 0], 30000, replacement=True, generator=g)[:, None]  # x_1 ~ q
    x = torch.cat([x, torch.multinomial(q[0, 1:], 30000, replacement=True, generator=g).T], 1)
    n_acc, nxt = Dc.speculative_step(p, q, x, generator=g)
    first = torch.where(n_acc > 0, x[:, 0], nxt)
    counts = torch.bincount(first, minlength=V)
    assert Dc.chi_square_test(counts, p[0, 0])["p_value"] > 1e-3
    # the acceptance of x_1 happens at rate a = sum min(p, q)
    a = float(Dc.acceptance_rate(p[0, 0], q[0, 0]))
    assert float((n_acc > 0).double().mean()) == pytest.approx(a, abs=0.015)
    assert Dc.chi_square_test(torch.bincount(x[:, 0], minlength=V), p[0, 0])["p_value"] < 1e-6


def test_speculative_samples_pass_a_chi_square_test_where_the_draft_fails():
    V, N = 4, 6000
    target = Dc.NGramLM(V, order=2, seed=40, scale=1.5)
    draft = target.perturbed(1.0, seed=41)
    prefix = torch.tensor([[2]]).expand(N, 1)
    out, st = Dc.speculative_generate(target, draft, prefix, 3, 2, generator=_gen(24))
    exact = Dc.exact_sequence_probs(target, torch.tensor([2]), 3)  # V^3 cells
    direct = Dc.sequence_distribution(target.probs_fn(), (2,), 3)
    torch.testing.assert_close(exact, torch.tensor([direct[s] for s in itertools.product(range(V), repeat=3)],
                                                   dtype=torch.float64))
    chi = Dc.chi_square_test(Dc.sequence_counts(out[:, 1:], V), exact)
    assert chi["p_value"] > 1e-3 and chi["dof"] >= 30
    drafted = Dc.sample_decode(draft, prefix, 3, generator=_gen(25))
    assert Dc.chi_square_test(Dc.sequence_counts(drafted[:, 1:], V), exact)["p_value"] < 1e-6
    assert 0.0 < st["acceptance_rate"] < 1.0 and st["target_calls_per_token"] < 1.0


def test_speculative_with_top_k_keeps_the_filtered_target_distribution_and_is_seeded():
    V, N = 5, 5000
    target = Dc.NGramLM(V, order=2, seed=42, scale=1.0)
    draft = target.perturbed(1.0, seed=43)
    prefix = torch.tensor([[3]]).expand(N, 1)
    out, _ = Dc.speculative_generate(target, draft, prefix, 2, 2, temperature=0.8, top_k=3, generator=_gen(27))
    exact = Dc.exact_sequence_probs(target, torch.tensor([3]), 2, temperature=0.8, top_k=3)
    assert int((exact > 0).sum()) == 9  # 3 x 3 continuations survive top-3
    assert Dc.chi_square_test(Dc.sequence_counts(out[:, 1:], V), exact)["p_value"] > 1e-3
    again, _ = Dc.speculative_generate(target, draft, prefix, 2, 2, temperature=0.8, top_k=3, generator=_gen(27))
    assert torch.equal(out, again)


def test_calls_per_token_follow_the_expected_tokens_per_call():
    target = Dc.NGramLM(6, order=1, seed=50, scale=1.0)  # a fixed distribution: i.i.d. acceptances
    draft = target.perturbed(0.8, seed=51)
    a = float(Dc.acceptance_rate(Dc.sampling_probs(target.table[0].detach()), Dc.sampling_probs(draft.table[0].detach())))
    prefix = torch.zeros(400, 1, dtype=torch.long)
    for n_draft in (1, 3):
        _, st = Dc.speculative_generate(target, draft, prefix, 60, n_draft, generator=_gen(26))
        assert st["acceptance_rate"] == pytest.approx(a, abs=0.02)
        # per round: (1 - a^(n+1)) / (1 - a) tokens; the last round of a row is cut at n_new
        per_round = 60 / float(st["target_calls"].double().mean())
        assert per_round == pytest.approx(Dc.expected_tokens_per_call(a, n_draft), rel=0.05)
        assert st["draft_calls"] == n_draft * st["target_forwards"]


# ---------------------------------------------------------------------------------------
# Tandem in miniature
# ---------------------------------------------------------------------------------------

def test_tandem_mask_by_hand():
    m = Dc.tandem_mask(5, 2)
    large, own = m[:, :5].int().tolist(), m[:, 5:].int().tolist()
    # query t predicts x_{t+1}; blocks {0, 1}, {2, 3}, {4}
    assert large == [[0, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert own == [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]
    assert (m.sum(-1) > 0).all()  # every query sees something


def test_tandem_sees_only_what_generation_would_see():
    large = _lm("rope")
    tandem = Dc.TandemLM(large, d_model=16, n_layers=2, n_heads=2, block=3).eval()
    with torch.no_grad():
        idx = torch.randint(0, 13, (2, 10), generator=_gen(60))
        torch.testing.assert_close(large.head(tandem.large_states(idx)), large(idx))  # the large reps
        out = tandem(idx)
        # changing token 7 changes nothing before it, and everything from 7 on (its own state at
        # 7; the large model's states at 8 and 9, which predict tokens of the next block)
        other = idx.clone()
        other[:, 7] = (idx[:, 7] + 1) % 13
        moved = (tandem(other) - out).abs().amax(-1).amax(0)  # (L,)
        assert (moved[:7] == 0).all() and (moved[7:] > 0).all()
        # the large model's state at 7 is visible only to queries whose predicted token lies in a
        # later block than 7's: t = 8, 9 (tokens 9, 10 of block {9, 10, 11})
        large_states = tandem.positions.embed(tandem.proj(tandem.large_states(idx)))
        bumped = large_states.clone()
        bumped[:, 7] += 1.0
        mask = Dc.tandem_mask(10, 3)
        x = tandem.positions.embed(tandem.tok(idx))
        a, b = x, x
        for blk in tandem.blocks:
            a, b = blk(a, large_states, mask), blk(b, bumped, mask)
        diff = (a - b).abs().amax(-1).amax(0)
        assert (diff[:8] == 0).all() and (diff[8:] > 0).all()
    assert all(not p.requires_grad for p in large.parameters())
    assert any(p.requires_grad for p in tandem.proj.parameters())


def test_teacher_forced_acceptance_is_one_for_the_same_model():
    model = _lm()
    idx = torch.randint(0, 13, (2, 8), generator=_gen(61))
    torch.testing.assert_close(Dc.teacher_forced_acceptance(model, model, idx), torch.ones(8, dtype=torch.float64))
    other = _lm(seed=3)
    acc = Dc.teacher_forced_acceptance(model, other, idx)
    assert ((acc > 0) & (acc < 1)).all()


# ---------------------------------------------------------------------------------------
# The claim helpers, on small text (the calibrated runs are in the docstrings)
# ---------------------------------------------------------------------------------------

def test_claim_helpers_run_and_agree_with_the_primitives():
    from transformer_lab.data import CharTokenizer

    text = "abcabcabd" * 40
    tok = CharTokenizer.from_text(text)
    target, draft = _lm(vocab=tok.vocab_size), _lm(vocab=tok.vocab_size, seed=4, n_layers=1)
    rep = Dc.repetition_comparison(target, tok, text, n_prompts=3, prompt_len=5, n_new=20, seed=1)
    assert torch.equal(rep["greedy"], Dc.greedy_decode(target, rep["prompts"], 20)[:, 5:])
    assert rep["rate"]["greedy"] == Dc.repeated_ngram_rate(rep["greedy"], 4)
    assert rep["corpus"].shape == (3, 20) and rep["rate"]["corpus"] > 0.5  # the text is a loop itself
    chk = Dc.speculative_check(target, draft, tok, text, n_samples=300, prompt_len=4, m=2, seed=2)
    assert chk["chi"]["p_value"] > 1e-3 and chk["stats"]["target_calls"].shape == (300,)
    rows = Dc.calls_per_token_sweep(target, target, rep["prompts"], n_new=12, n_drafts=(1, 3))
    assert [r["calls_per_token"] for r in rows] == [pytest.approx(6 / 12), pytest.approx(3 / 12)]
    assert all(r["alpha"] == 1.0 for r in rows)


# ---------------------------------------------------------------------------------------
# Chi-square test
# ---------------------------------------------------------------------------------------

def test_chi_square_p_values():
    r = Dc.chi_square_test([10, 20, 30], [1 / 3, 1 / 3, 1 / 3])
    assert r["statistic"] == pytest.approx(10.0) and r["dof"] == 2
    assert r["p_value"] == pytest.approx(math.exp(-5.0))  # chi2 with 2 dof: exp(-x / 2)
    r = Dc.chi_square_test([60, 40], [0.5, 0.5])
    assert r["statistic"] == pytest.approx(4.0) and r["p_value"] == pytest.approx(math.erfc(math.sqrt(2.0)))
    r = Dc.chi_square_test([50, 50, 3, 1], [0.49, 0.49, 0.01, 0.01], min_expected=5)
    assert r["n_cells"] == 3  # the two small cells pooled: expected 2
    assert Dc.chi_square_test([5, 5, 1], [0.5, 0.5, 0.0])["p_value"] == 0.0


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

def test_bad_input_is_named():
    z = torch.randn(2, 5)
    model = _lm()
    prefix = torch.tensor([[1, 2]])
    for bad in (0.0, -0.1, 1.5, float("nan"), "0.9"):
        with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\]"):
            Dc.top_p_filter(z, bad)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="top_k must be an int >= 1"):
            Dc.sampling_probs(z, top_k=bad)
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        Dc.sample_next(z, temperature=-1.0)
    with pytest.raises(ValueError, match="temperature 0 means greedy"):
        Dc.apply_temperature(z, 0)
    with pytest.raises(ValueError, match="beam_width must be an int >= 1; got 0"):
        Dc.beam_search(model, prefix, 3, beam_width=0)
    with pytest.raises(ValueError, match="one prefix"):
        Dc.beam_search(model, torch.tensor([[1], [2]]), 3, beam_width=2)
    with pytest.raises(ValueError, match="n_draft must be an int >= 1; got 0"):
        Dc.speculative_generate(model, model, prefix, 5, 0)
    with pytest.raises(ValueError, match="n_draft must be an int >= 1"):
        Dc.expected_tokens_per_call(0.5, 0)
    with pytest.raises(ValueError, match=r"alpha .* must be in \[0, 1\]"):
        Dc.expected_tokens_per_call(1.5, 2)
    with pytest.raises(TypeError, match="integer"):
        Dc.greedy_decode(model, torch.tensor([[0.5, 1.0]]), 3)
    with pytest.raises(ValueError, match="seq >= 1"):
        Dc.greedy_decode(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="floating-point"):
        Dc.top_k_filter(torch.tensor([1, 2, 3]), 1)
    with pytest.raises(TypeError, match="TransformerLM"):
        Dc.cached_forward(Dc.NGramLM(4), prefix, Dc.KVCache(1))
    with pytest.raises(TypeError, match="n_layers=2"):
        Dc.cached_forward(model, prefix, Dc.KVCache(3))
    with pytest.raises(ValueError, match="sum to 1"):
        Dc.chi_square_test([1, 2], [0.5, 0.6])
    with pytest.raises(ValueError, match="eos_id must be < vocab_size"):
        Dc.beam_search(model, prefix, 3, beam_width=2, eos_id=99)


@pytest.mark.cuda
def test_kv_cache_and_speculative_on_cuda():
    model = _lm("rope").cuda()
    idx = torch.randint(0, 13, (2, 12), device="cuda")
    with torch.no_grad():
        cache = Dc.KVCache(2)
        inc = torch.cat([Dc.cached_forward(model, idx[:, :4], cache)]
                        + [Dc.cached_forward(model, idx[:, t:t + 1], cache) for t in range(4, 12)], 1)
        torch.testing.assert_close(inc, model(idx), atol=1e-5, rtol=1e-5)
    out, st = Dc.speculative_generate(model, model, idx[:, :3], 8, 3, generator=_gen(1))
    assert out.device.type == "cuda" and st["acceptance_rate"] == 1.0


def test_train_tiny_lm_with_zero_steps_builds_no_optimiser(monkeypatch):
    from transformer_lab import train as train_module

    def no_training(*args, **kwargs):
        raise AssertionError("steps=0 must not call train.train (its AdamW imports torch._dynamo)")

    monkeypatch.setattr(train_module, "train", no_training)
    out = Dc.train_tiny_lm(seed=3, steps=0, d_model=16, n_layers=1, n_heads=2, max_chars=2000)
    assert math.isnan(out["final_loss"]) and out["history"]["loss"] == [] and not out["model"].training
    again = Dc.train_tiny_lm(seed=3, steps=0, d_model=16, n_layers=1, n_heads=2, max_chars=2000)
    for a, b in zip(out["model"].parameters(), again["model"].parameters(), strict=True):
        assert torch.equal(a, b)  # seeded: the same untrained model
    with pytest.raises(ValueError, match="steps"):
        Dc.train_tiny_lm(steps=-1, max_chars=2000)
