"""objectives.py: BERT's masking frequencies (80/10/10 of 15%, binomial tolerance), causal targets,
T5's noise mask (counts, spans, first token kept) and span corruption's inverse, ELECTRA's labels
and loss, NSP pairs, distillation (zero when student equals teacher, parity with nn.KLDivLoss and
nn.CosineEmbeddingLoss, the T^2 gradient), pooling with padding, cosine retrieval against brute
force, the Backpack's non-negative weights and its exact intervention, the power-law fit, the
corpus and the encoder, and bad input.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from transformer_lab import objectives as O


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _within_binomial(count, n, p, z=5.0):
    """|count - n p| <= z sigma: a 5-sigma band fails by chance about once in 3.5 million runs."""
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p))


# ---------------------------------------------------------------------------------------
# Masked LM
# ---------------------------------------------------------------------------------------

def test_mlm_frequencies_80_10_10_of_15_percent():
    vocab, mask_id, specials = 50, 3, (0, 1, 2)
    ids = torch.randint(4, vocab, (400, 100), generator=_gen(1))
    ids[:, 0] = 1  # [CLS]
    ids[:, -10:] = 0  # padding
    m = O.mask_tokens(ids, mask_id, vocab, 0.15, special_ids=specials, generator=_gen(2))
    real = ~torch.isin(ids, torch.tensor(specials))
    n_real, n_sel = int(real.sum()), int(m.selected.sum())
    assert not (m.selected & ~real).any()  # specials and padding are never selected
    assert _within_binomial(n_sel, n_real, 0.15)
    n_mask, n_rand = int(m.masked.sum()), int(m.randomised.sum())
    n_keep = n_sel - n_mask - n_rand
    assert _within_binomial(n_mask, n_sel, 0.8)
    assert _within_binomial(n_rand, n_sel, 0.1)
    assert _within_binomial(n_keep, n_sel, 0.1)
    # read off the inputs themselves, not the flags: [MASK] exactly where masked,
    # unchanged where kept, a random non-special token (1/46 of them equal to the original)
    assert torch.equal(m.inputs == mask_id, m.masked)
    assert torch.equal(m.inputs[~m.selected], ids[~m.selected])
    keep = m.selected & ~m.masked & ~m.randomised
    assert torch.equal(m.inputs[keep], ids[keep])
    changed = int((m.inputs[m.randomised] != ids[m.randomised]).sum())
    assert _within_binomial(changed, n_rand, 1 - 1 / 46)
    drawn = m.inputs[m.randomised]
    assert int(drawn.min()) >= 4 and int(drawn.max()) < vocab  # never a special or [MASK]
    assert torch.equal(m.labels[m.selected], ids[m.selected]) and (m.labels[~m.selected] == O.IGNORE).all()


def test_mlm_rate_changes_and_seed_determinism():
    ids = torch.randint(4, 30, (200, 50), generator=_gen(0))
    a = O.mask_tokens(ids, 3, 30, 0.4, special_ids=(0, 1, 2), generator=5)
    b = O.mask_tokens(ids, 3, 30, 0.4, special_ids=(0, 1, 2), generator=5)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert _within_binomial(int(a.selected.sum()), ids.numel(), 0.4)
    one = O.mask_tokens(ids[0], 3, 30, 0.4, generator=5)  # 1-D input
    assert one.inputs.shape == ids[0].shape


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 1.5])
def test_mlm_rate_outside_open_interval_is_an_error(rate):
    with pytest.raises(ValueError, match=r"p_mask must lie in \(0, 1\).*got p_mask="):
        O.mask_tokens(torch.zeros(2, 3, dtype=torch.long) + 5, 3, 10, rate)


def test_mlm_bad_input():
    with pytest.raises(TypeError, match="integer"):
        O.mask_tokens(torch.zeros(2, 3), 3, 10)
    with pytest.raises(TypeError, match="float in"):
        O.mask_tokens(torch.zeros(2, 3, dtype=torch.long), 3, 10, "0.15")
    with pytest.raises(ValueError, match="mask_id"):
        O.mask_tokens(torch.zeros(2, 3, dtype=torch.long), 10, 10)
    with pytest.raises(ValueError, match="vocab_size=10"):
        O.mask_tokens(torch.full((2, 3), 12), 3, 10)


def test_causal_lm_targets():
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    x, y = O.causal_lm_targets(ids, pad_id=0)
    assert x.tolist() == [[5, 6, 7, 0]] and y.tolist() == [[6, 7, O.IGNORE, O.IGNORE]]
    with pytest.raises(ValueError, match="at least 2"):
        O.causal_lm_targets(torch.tensor([[4]]))


# ---------------------------------------------------------------------------------------
# Span corruption
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("length,density,mean", [(100, 0.15, 3.0), (37, 0.15, 3.0), (20, 0.5, 2.0), (5, 0.15, 3.0)])
def test_noise_mask_counts_and_spans(length, density, mean):
    for seed in range(20):
        noise = O.random_spans_noise_mask(length, density, mean, generator=seed)
        n_noise = min(max(round(length * density), 1), length - 1)
        assert noise.dtype == torch.bool and noise.shape == (length,)
        assert int(noise.sum()) == n_noise and not noise[0]  # starts with a kept span
        starts = noise & ~torch.cat([torch.zeros(1, dtype=torch.bool), noise[:-1]])
        expected = min(max(1, round(n_noise / mean)), n_noise, length - n_noise)
        assert int(starts.sum()) == expected


def test_span_corruption_is_invertible_and_shaped_like_t5():
    vocab = 100
    sentinels = O.t5_sentinels(vocab, 20)
    assert sentinels[:2] == [99, 98]
    for seed in range(30):
        L = 10 + seed * 3
        ids = torch.randint(0, 80, (L,), generator=_gen(seed))
        inputs, targets = O.span_corrupt(ids, sentinels, generator=seed)
        noise = O.random_spans_noise_mask(L, generator=seed)
        n_noise = int(noise.sum())
        n_spans = int((noise & ~torch.cat([torch.zeros(1, dtype=torch.bool), noise[:-1]])).sum())
        assert inputs.numel() == L - n_noise + n_spans
        assert targets.numel() == n_noise + n_spans + 1
        assert targets[0] == sentinels[0] and targets[-1] == sentinels[n_spans]
        assert torch.equal(O.span_uncorrupt(inputs, targets, sentinels), ids)


def test_span_corruption_hand_case():
    ids = torch.tensor([10, 11, 12, 13, 14, 15, 16])
    noise = torch.tensor([False, True, True, False, False, True, False])
    inputs, targets = O.span_corrupt(ids, [99, 98, 97], noise_mask=noise)
    assert inputs.tolist() == [10, 99, 13, 14, 98, 16]
    assert targets.tolist() == [99, 11, 12, 98, 15, 97]


def test_span_corruption_bad_input():
    with pytest.raises(ValueError, match="sentinel"):
        O.span_corrupt(torch.tensor([1, 2, 99, 4]), [99, 98, 97], noise_mask=torch.tensor([0, 1, 0, 0]).bool())
    with pytest.raises(ValueError, match="need 3 sentinel"):
        O.span_corrupt(torch.arange(10), [99, 98], noise_mask=torch.tensor([0, 1, 0, 1, 0, 0, 0, 0, 0, 0]).bool())
    with pytest.raises(ValueError, match=r"noise_density must lie in \(0, 1\)"):
        O.random_spans_noise_mask(10, 1.0)


# ---------------------------------------------------------------------------------------
# ELECTRA and NSP
# ---------------------------------------------------------------------------------------

def test_electra_labels_are_where_the_token_changed():
    ids = torch.randint(0, 12, (4, 9), generator=_gen(0))
    selected = torch.rand(4, 9, generator=_gen(1)) < 0.5
    perfect = F.one_hot(ids, 12).float() * 100  # a generator that always samples the original
    corrupted, replaced = O.electra_corrupt(ids, selected, perfect, generator=0)
    assert torch.equal(corrupted, ids) and not replaced.any()  # sampled original = "original"
    wrong = F.one_hot((ids + 1) % 12, 12).float() * 100  # always a different token
    corrupted, replaced = O.electra_corrupt(ids, selected, wrong, generator=0)
    assert torch.equal(replaced, selected) and torch.equal(corrupted[~selected], ids[~selected])
    gen_logits = torch.randn(4, 9, 12, generator=_gen(2))
    disc = torch.randn(4, 9, generator=_gen(3))
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    out = O.electra_loss(gen_logits, labels, disc, replaced, disc_weight=50.0)
    mlm = F.cross_entropy(gen_logits[selected], ids[selected])
    bce = nn.BCEWithLogitsLoss()(disc, replaced.float())
    torch.testing.assert_close(out["mlm"], mlm)
    torch.testing.assert_close(out["disc"], bce)
    torch.testing.assert_close(out["total"], mlm + 50.0 * bce)


def test_nsp_pairs():
    docs = [[[10 + d * 10 + s] * (s + 1) for s in range(4)] for d in range(5)]
    out = O.nsp_pairs(docs, 2000, cls_id=1, sep_id=2, generator=0)
    labels = out["labels"]
    assert _within_binomial(int(labels.sum()), 2000, 0.5)
    for ids, seg, label, ((da, sa), (db, sb)) in zip(out["ids"], out["segments"], labels.tolist(), out["source"], strict=True):
        a, b = docs[da][sa], docs[db][sb]
        assert ids.tolist() == [1] + a + [2] + b + [2]
        assert seg.tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1)
        if label == 1:
            assert db == da and sb == sa + 1  # IsNext: the successor in the same document
        else:
            assert db != da  # NotNext: from another document
    with pytest.raises(ValueError, match="at least 2 documents"):
        O.nsp_pairs([docs[0]], 3, 1, 2)


# ---------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------

def test_distillation_is_zero_when_student_equals_teacher():
    z = torch.randn(6, 5, 11, generator=_gen(0))
    h = torch.randn(6, 5, 8, generator=_gen(1))
    for T in (1.0, 2.0, 8.0):
        out = O.distillation_loss(z, z.clone(), temperature=T, student_hidden=h, teacher_hidden=h.clone())
        assert abs(float(out["soft"])) < 1e-6 and abs(float(out["cos"])) < 1e-6 and float(out["total"]) < 1e-6
    other = O.distillation_loss(z + torch.randn(z.shape, generator=_gen(2)), z, student_hidden=h + 1,
                                teacher_hidden=h)
    assert float(other["soft"]) > 1e-2 and float(other["cos"]) > 1e-3


def test_distillation_parity_with_pytorch_losses():
    s = torch.randn(12, 7, generator=_gen(3))
    t = torch.randn(12, 7, generator=_gen(4))
    y = torch.randint(7, (12,), generator=_gen(5))
    hs, ht = torch.randn(12, 16, generator=_gen(6)), torch.randn(12, 16, generator=_gen(7))
    T = 3.0
    out = O.distillation_loss(s, t, labels=y, temperature=T, student_hidden=hs, teacher_hidden=ht,
                              w_soft=5.0, w_hard=2.0, w_cos=1.0)
    kl = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / T, -1), F.softmax(t / T, -1)) * T ** 2
    cos = nn.CosineEmbeddingLoss()(hs, ht, torch.ones(12))
    torch.testing.assert_close(out["soft"], kl)
    torch.testing.assert_close(out["hard"], F.cross_entropy(s, y))
    torch.testing.assert_close(out["cos"], cos)
    torch.testing.assert_close(out["total"], 5 * kl + 2 * F.cross_entropy(s, y) + cos)
    # rows labelled -100 leave all three terms
    y2 = y.clone()
    y2[:4] = -100
    part = O.distillation_loss(s, t, labels=y2, temperature=T, student_hidden=hs, teacher_hidden=ht)
    ref = O.distillation_loss(s[4:], t[4:], labels=y[4:], temperature=T, student_hidden=hs[4:],
                              teacher_hidden=ht[4:])
    for key in ("soft", "hard", "cos"):
        torch.testing.assert_close(part[key], ref[key])


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_distillation_gradient_is_T_times_probability_gap(T):
    s = torch.randn(5, 9, generator=_gen(8), dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 9, generator=_gen(9), dtype=torch.float64, requires_grad=True)
    O.distillation_loss(s, t, temperature=T)["soft"].backward()
    expected = T * (F.softmax(s.detach() / T, -1) - F.softmax(t.detach() / T, -1)) / 5
    torch.testing.assert_close(s.grad.double(), expected, atol=1e-6, rtol=1e-5)
    assert t.grad is None  # the teacher gets no gradient


def test_distillation_bad_input():
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        O.distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0)
    with pytest.raises(ValueError, match="same shape"):
        O.distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------
# Embeddings and retrieval
# ---------------------------------------------------------------------------------------

def test_mean_pooling_ignores_padding_and_cls_reads_position_0():
    h = torch.randn(3, 6, 4, generator=_gen(0))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]]).bool()
    s = O.pool(h, mask, "mean")
    h2 = h.clone()
    h2[~mask] = 1e3  # whatever sits under the padding
    torch.testing.assert_close(O.pool(h2, mask, "mean"), s)
    for b in range(3):
        torch.testing.assert_close(s[b], h[b, mask[b]].mean(0))
    assert torch.equal(O.pool(h, mask, "cls"), h[:, 0])


def test_encoder_embeddings_do_not_depend_on_padding():
    torch.manual_seed(0)
    data = O.topic_corpus(4, generator=1, min_len=5, max_len=12)
    enc = O.TinyEncoder(data["vocab"].size, max_len=data["ids"].shape[1])
    ids2 = data["ids"].clone()
    ids2[~data["padding_mask"]] = 7  # other tokens under the padding
    for how in ("mean", "cls"):
        a = O.embed(enc, data["ids"], data["padding_mask"], how)
        b = O.embed(enc, ids2, data["padding_mask"], how)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_retrieval_matches_brute_force_cosine():
    keys = torch.randn(50, 8, generator=_gen(1)) * torch.rand(50, 1, generator=_gen(2)) * 10
    queries = torch.randn(7, 8, generator=_gen(3))
    sims, idx = O.retrieve(queries, keys, k=5)
    full = O.cosine_similarity_matrix(queries, keys)
    ref = full.topk(5, -1)
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(sims, ref.values)
    torch.testing.assert_close(full, F.cosine_similarity(queries[:, None], keys[None], dim=-1))


def test_topic_corpus_layout():
    d = O.topic_corpus(64, n_classes=3, n_topic=5, n_common=6, min_len=4, max_len=9, generator=0)
    v = d["vocab"]
    assert d["ids"].shape == (64, 10) and (d["ids"][:, 0] == v.CLS).all()
    assert torch.equal(d["ids"] == v.PAD, ~d["padding_mask"])
    lengths = d["padding_mask"].sum(1) - 1
    assert int(lengths.min()) >= 4 and int(lengths.max()) <= 9
    for row, c in zip(d["ids"], d["labels"].tolist(), strict=True):
        words = row[row >= v.n_special + v.n_common]
        assert all(int(w) in v.topic_words(c) for w in words)  # topic words of its own class only
    assert torch.equal(O.topic_corpus(5, generator=3)["ids"], O.topic_corpus(5, generator=3)["ids"])


def test_linear_probe_separates_separable_features():
    g = _gen(0)
    y = torch.randint(3, (300,), generator=g)
    x = torch.randn(300, 6, generator=g) + F.one_hot(y, 6).float() * 4
    out = O.linear_probe(x[:200], y[:200], x[200:], y[200:], 3)
    assert out["accuracy"] > 0.95 and out["n_trainable"] == 6 * 3 + 3
    noise = O.linear_probe(torch.randn(200, 6, generator=g), y[:200], torch.randn(100, 6, generator=g), y[200:], 3)
    assert noise["accuracy"] < 0.6  # no signal, no separation


# ---------------------------------------------------------------------------------------
# Backpack
# ---------------------------------------------------------------------------------------

def _backpack():
    torch.manual_seed(0)
    return O.BackpackLM(30, d_model=16, n_senses=3, max_len=12)


def test_backpack_weights_nonnegative_causal_and_output_is_weighted_sum_of_senses():
    model = _backpack()
    ids = torch.randint(0, 30, (2, 10), generator=_gen(1))
    A = model.weights(ids)
    assert A.shape == (2, 3, 10, 10) and (A >= 0).all()
    torch.testing.assert_close(A.sum(-1), torch.ones(2, 3, 10))
    assert (A.triu(1) == 0).all()  # position i never weighs a later word
    c = model.senses(ids)
    logits = model(ids)
    ref = torch.zeros(2, 10, 30)
    for b in range(2):
        for i in range(10):
            o = sum(A[b, a, i, j] * c[b, j, a] for j in range(i + 1) for a in range(3))
            ref[b, i] = o @ model.tok.weight.T
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    # the future does not move the past
    ids2 = ids.clone()
    ids2[:, 6:] = (ids2[:, 6:] + 1) % 30
    torch.testing.assert_close(model(ids2)[:, :6], logits[:, :6])


def test_backpack_intervention_changes_logits_exactly_as_predicted():
    model = _backpack()
    ids = torch.tensor([[3, 5, 7, 5, 9, 2, 5, 1]])
    word, sense = 5, 1
    target = 11
    delta = model.tok.weight[target].detach() * 2.0  # push sense 1 of word 5 towards word 11
    before = model(ids).detach()
    predicted = O.predicted_logit_change(model, ids, word, sense, delta)
    model.intervene(word, sense, delta)
    after = model(ids).detach()
    torch.testing.assert_close(after - before, predicted, atol=1e-5, rtol=1e-4)
    assert (predicted[0, 0].abs() < 1e-7).all()  # before the first 5, nothing moves
    moved = (after - before)[0, 1:, target]  # from the first 5 on, word 11's logit rises
    assert (moved > 0).all()
    model.clear_interventions()
    torch.testing.assert_close(model(ids), before)
    with pytest.raises(ValueError, match="sense must be an int in"):
        model.intervene(5, 3, delta)
    with pytest.raises(ValueError, match="d_model=16"):
        model.intervene(5, 0, torch.zeros(4))


# ---------------------------------------------------------------------------------------
# Scaling laws
# ---------------------------------------------------------------------------------------

def test_power_law_fit_recovers_exponent_and_floor():
    n = torch.tensor([1e3, 3e3, 1e4, 3e4, 1e5, 3e5])
    loss = (8.8e13 / n) ** 0.076
    fit = O.fit_power_law(n, loss)
    assert fit["exponent"] == pytest.approx(0.076, rel=1e-6) and fit["n_star"] == pytest.approx(8.8e13, rel=1e-4)
    assert fit["r2"] == pytest.approx(1.0)
    with_floor = (2e3 / n) ** 0.5 + 1.2
    plain = O.fit_power_law(n, with_floor)
    fitted = O.fit_power_law(n, with_floor, floor=True, n_grid=2000)
    assert fitted["floor"] == pytest.approx(1.2, abs=0.01) and fitted["exponent"] == pytest.approx(0.5, abs=0.02)
    assert plain["exponent"] < 0.3 and plain["r2"] < fitted["r2"]  # the floor flattens a plain fit
    with pytest.raises(ValueError, match="positive"):
        O.fit_power_law([1, 2, 3], [1.0, -1.0, 0.5])


def test_non_embedding_parameters_counts_by_formula():
    from transformer_lab.models import ModelConfig, TransformerLM

    d, n_layers, vocab = 16, 2, 40
    model = TransformerLM(ModelConfig(vocab_size=vocab, d_model=d, n_heads=2, n_layers=n_layers,
                                      positions="learned", max_len=32))
    # per block: qkv (3 d^2 + 3 d) + out (d^2 + d) + FFN (d->4d->d: 8 d^2 + 5 d) + two LayerNorms (4 d);
    # plus the final LayerNorm (2 d); embeddings and head left out
    per_block = 12 * d * d + 13 * d
    assert O.non_embedding_parameters(model) == n_layers * per_block + 2 * d


def test_embed_mean_leaves_cls_and_padding_out():
    torch.manual_seed(1)
    data = O.topic_corpus(5, generator=2, min_len=4, max_len=10)
    enc = O.TinyEncoder(data["vocab"].size, max_len=data["ids"].shape[1])
    with torch.no_grad():
        h = enc.eval().encode(data["ids"], data["padding_mask"])
    s = O.embed(enc, data["ids"], data["padding_mask"], "mean")
    for b in range(5):
        words = data["padding_mask"][b].clone()
        words[0] = False  # not [CLS]
        torch.testing.assert_close(s[b], h[b, words].mean(0))
    torch.testing.assert_close(O.embed(enc, data["ids"], data["padding_mask"], "cls"), h[:, 0])


def test_backpack_topic_edit_runs_and_matches_prediction_untrained():
    torch.manual_seed(0)
    vocab = O.topic_corpus(1)["vocab"]
    model = O.BackpackLM(vocab.size, d_model=16, n_senses=2, max_len=17)
    out = O.backpack_topic_edit(model, n=64)
    assert out["max_error"] < 1e-4 and out["top_words"].shape == (2, 5)
    assert model.edits == {}  # edits cleared
    with pytest.raises(ValueError, match="two different classes"):
        O.backpack_topic_edit(model, source=1, target=1)


# ---------------------------------------------------------------------------------------
# The lecture's claims at one seed (the calibrated settings; the docstring has the margins)
# ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_claim_pretrained_embeddings_separate_classes_and_probe_is_cheap():
    out = O.probe_vs_finetune(seed=0)
    probe, ft = out["probe"], out["finetune"]
    assert probe["accuracy"] > 0.85 > 3 * out["chance"]  # well above chance (0.25) before fine-tuning
    assert probe["accuracy"] > out["probe_random"]["accuracy"] + 0.1  # pre-training made the difference
    assert probe["accuracy"] >= 0.9 * ft["accuracy"]
    assert probe["n_trainable"] < 0.01 * ft["n_trainable"]


@pytest.mark.slow
def test_claim_backpack_edit_moves_predictions_to_the_target_class():
    model, _ = O.train_backpack(seed=0)
    r = O.backpack_topic_edit(model, seed=0)
    assert r["after"][1] > 10 * r["before"][1] and r["after"][0] < 0.5 * r["before"][0]
    assert r["max_error"] < 1e-4


@pytest.mark.slow
def test_claim_scaling_loss_falls_with_size_and_fits_a_power_law():
    out = O.scaling_sweep(seed=0)
    losses = out["losses"]
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False))
    assert 0.03 < out["fit"]["exponent"] < 0.3 and out["fit"]["r2"] > 0.85


def test_pca_2d_matches_the_top_singular_directions():
    g = _gen(4)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    y = O.pca_2d(x)
    assert y.shape == (200, 2)
    torch.testing.assert_close(y.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-10, rtol=0)
    ref = (x - x.mean(0))[:, :2]  # axis-aligned variances: components are the first two axes, up to sign
    torch.testing.assert_close(y.abs(), ref.abs(), atol=0.1 * float(ref.abs().max()), rtol=0)
    var = y.var(0)
    assert var[0] > var[1] > 0.5 * (x[:, 2].var())
    for seed in range(6):  # the sign convention (plots do not flip between runs), on several inputs
        z = O.pca_2d(torch.randn(30, 4, generator=_gen(seed)) @ torch.randn(4, 4, generator=_gen(seed + 50)))
        assert (z.gather(0, z.abs().argmax(0, keepdim=True)) > 0).all()
    torch.testing.assert_close(O.pca_2d(-x), y)  # same picture for a flipped input


def test_model_table_is_complete_and_honest():
    keys = {"model", "paper", "arxiv", "architecture", "objective", "good_for", "published", "not_published"}
    names = [row["model"].split(" (")[0] for row in O.MODEL_TABLE]
    for must in ("BERT", "RoBERTa", "DistilBERT", "Transformer-XL", "T5", "GPT-1", "GPT-2", "GPT-3", "GPT-4",
                 "LLaMA", "PaLM", "Bard"):
        assert must in names
    for row in O.MODEL_TABLE:
        assert set(row) == keys
        assert row["arxiv"] is None or (len(row["arxiv"]) == 10 and row["arxiv"][4] == ".")
    gpt4 = O.MODEL_TABLE[names.index("GPT-4")]
    assert gpt4["arxiv"] == "2303.08774" and "architecture" in gpt4["not_published"]
    assert O.MODEL_TABLE[names.index("Backpack")]["arxiv"] == "2305.16765"


def test_nsp_topic_shortcut_answers_most_pairs_without_coherence():
    out = O.nsp_topic_shortcut(n_pairs=1000, seed=0)
    assert out["expected"] == 0.875
    assert _within_binomial(round(out["accuracy"] * 1000), 1000, out["expected"])
    assert out["accuracy"] > 0.8


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_everything_runs_where_its_input_lives(device):
    ids = torch.randint(4, 30, (3, 12), generator=_gen(0)).to(device)
    m = O.mask_tokens(ids, 3, 30, 0.3, special_ids=(0, 1, 2), generator=0)
    assert m.inputs.device.type == device and m.labels.device.type == device
    inputs, targets = O.span_corrupt(ids[0], O.t5_sentinels(40, 10), generator=1)
    assert inputs.device.type == device and torch.equal(O.span_uncorrupt(inputs, targets, O.t5_sentinels(40, 10)), ids[0])
    logits = torch.randn(3, 12, 30, device=device)
    corrupted, replaced = O.electra_corrupt(ids, m.selected, logits, generator=2)
    assert corrupted.device.type == device and replaced.device.type == device
    out = O.distillation_loss(logits, logits.flip(0), labels=m.labels)
    assert out["total"].device.type == device
    torch.manual_seed(0)
    bp = O.BackpackLM(30, d_model=8, n_senses=2, max_len=12).to(device)
    before = bp(ids)
    delta = torch.ones(8, device=device)
    predicted = O.predicted_logit_change(bp, ids, 5, 1, delta)
    bp.intervene(5, 1, delta)
    torch.testing.assert_close(bp(ids) - before, predicted, atol=1e-4, rtol=1e-4)
    enc = O.TinyEncoder(30, d_model=8, n_heads=2, n_layers=1, max_len=12).to(device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    assert O.embed(enc, ids, mask).device.type == device


def test_retrieval_precision_against_a_loop():
    g = _gen(7)
    y = torch.randint(3, (40,), generator=g)
    x = torch.randn(40, 6, generator=g) + F.one_hot(y, 6).float() * 1.5
    sims = O.cosine_similarity_matrix(x)
    sims.fill_diagonal_(-2.0)  # never itself
    ref = sum(float((y[sims[q].topk(4).indices] == y[q]).float().mean()) for q in range(40)) / 40
    assert O.retrieval_precision(x, y, k=4) == pytest.approx(ref)
    with pytest.raises(ValueError, match="at most n - 1"):
        O.retrieval_precision(x, y, k=40)
