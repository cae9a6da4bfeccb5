"""Hidden tests of lecture 14, decided by the grader outside the learner's kernel.

Each test draws fresh inputs from the course secret, computes the expected values here, and runs
the learner's function in a sandboxed process where the library's version (and the library
functions that contain it) does not exist. See ``autograder/hidden.py``. The cases vary what the
exercises state and the visible tests check: shapes (1-D to 3-D), masking rates, random numbers on
the rule's boundaries, spans at both ends, no noise, a single span covering everything, float32
and float64, temperatures from 0.5 to 10, zero weights, and the gradients of the distillation
loss (the student's, and none for the teacher).
"""

import torch
import torch.nn.functional as F
from autograder.hidden import Case, HiddenTest

from transformer_lab import objectives as O

# --------------------------------------------------------------------------- ex1: bert_mask


def _mask(ids, u_select, u_action, random_ids, mask_id, special_ids, p_mask=0.15, *, select_le=False,
          specials=True, order="mask-random-keep", label="original", fixed_p=None):
    special = torch.tensor(list(special_ids), dtype=ids.dtype)
    p_mask = p_mask if fixed_p is None else fixed_p
    sel = (u_select <= p_mask) if select_le else (u_select < p_mask)
    if specials == "above-max":
        sel = sel & (ids > max(special_ids))
    elif specials:
        sel = sel & ~torch.isin(ids, special)
    if order == "mask-random-keep":
        masked, randomised = sel & (u_action < 0.8), sel & (u_action >= 0.8) & (u_action < 0.9)
    elif order == "random-mask-keep":
        randomised, masked = sel & (u_action < 0.1), sel & (u_action >= 0.1) & (u_action < 0.9)
    elif order == "all-mask":
        masked, randomised = sel, sel & False
    elif order == "no-keep":
        masked, randomised = sel & (u_action < 0.8), sel & (u_action >= 0.8)
    inputs = torch.where(masked, torch.full_like(ids, mask_id), ids)
    inputs = torch.where(randomised, random_ids, inputs)
    if label == "original":
        labels = torch.where(sel, ids, torch.full_like(ids, -100))
    elif label == "corrupted":
        labels = torch.where(sel, inputs, torch.full_like(ids, -100))
    elif label == "everywhere":
        labels = ids.clone()
    elif label == "changed-only":
        labels = torch.where(masked | randomised, ids, torch.full_like(ids, -100))
    elif label == "in-place":  # ids[masked] = mask_id wrote into ids, then the labels read the changed ids
        labels = torch.where(sel, torch.where(masked, torch.full_like(ids, mask_id), ids), torch.full_like(ids, -100))
    return inputs, labels


def mask_reference(ids, u_select, u_action, random_ids, mask_id, special_ids, p_mask=0.15):
    return _mask(ids, u_select, u_action, random_ids, mask_id, special_ids, p_mask)


def mask_cases(rng):
    def draw(shape, lo, hi):
        ids = torch.randint(lo, hi, shape, generator=rng)
        return ids, torch.rand(shape, generator=rng), torch.rand(shape, generator=rng), \
            torch.randint(lo, hi, shape, generator=rng)

    ids, us, ua, rnd = draw((4, 30), 0, 40)
    yield Case("(4, 30), specials [0, 1, 2], [MASK] = 3, p_mask = 0.15", ids, us, ua, rnd, 3, [0, 1, 2])
    ids, us, ua, rnd = draw((2, 3, 9), 0, 25)
    yield Case("a 3-D batch (2, 3, 9), specials [0, 7], [MASK] = 24, p_mask = 0.5", ids, us, ua, rnd, 24, [0, 7],
               p_mask=0.5)
    ids, us, ua, rnd = draw((50,), 0, 12)
    yield Case("1-D (50,), specials [0, 1, 2, 3, 4], [MASK] = 5, p_mask = 0.9", ids, us, ua, rnd, 5,
               [0, 1, 2, 3, 4], p_mask=0.9)
    ids = torch.tensor([[1, 8, 9, 10, 11, 12, 13, 14, 2]])
    us = torch.tensor([[0.1, 0.15, 0.1, 0.1, 0.1, 0.1, 0.1, 0.3, 0.0]])
    ua = torch.tensor([[0.0, 0.0, 0.8, 0.9, 0.7999, 0.8999, 0.95, 0.0, 0.5]])
    rnd = torch.tensor([[30, 31, 32, 33, 11, 35, 36, 37, 38]])
    yield Case("boundaries: u_select = p_mask (not selected), u_action = 0.8 (random), 0.9 (kept), "
               "a random token equal to the original", ids, us, ua, rnd, 3, [0, 1, 2],
               show={"ids": ids, "u_select": us, "u_action": ua, "random_ids": rnd, "mask_id": 3,
                     "special_ids": [0, 1, 2], "p_mask": 0.15})
    ids, us, ua, rnd = draw((3, 6), 0, 20)
    for bad in (0.0, 1.0, 1.5, -0.2):
        yield Case(f"p_mask = {bad} must raise ValueError", ids, us, ua, rnd, 3, [0], p_mask=bad, raises=ValueError)


# --------------------------------------------------------------------------- ex2: corrupt_spans


def spans_reference(ids, noise_mask, sentinel_ids):
    return O.span_corrupt(ids, sentinel_ids, noise_mask=noise_mask)


def _runs(noise_mask):
    m = noise_mask.tolist()
    return [i for i in range(len(m)) if m[i] and (i == 0 or not m[i - 1])]


def _spans_generic(ids, noise_mask, sentinel_ids, per_token=False, closing=True, same=False, drop=False,
                   prefix=True, last=False):
    inputs, targets, k = [], [], 0
    m = noise_mask.tolist()
    for i, t in enumerate(ids.tolist()):
        if m[i]:
            start = i == 0 or not m[i - 1]
            if start or per_token:
                s = sentinel_ids[0] if same else sentinel_ids[k]
                if not drop:
                    inputs.append(s)
                if prefix:
                    targets.append(s)
                k += 1
            targets.append(t)
        else:
            inputs.append(t)
    if closing and prefix:
        targets.append(sentinel_ids[0] if same else (sentinel_ids[-1] if last else sentinel_ids[k]))
    return torch.tensor(inputs, dtype=ids.dtype), torch.tensor(targets, dtype=ids.dtype)


def _spans_after(ids, noise_mask, sentinel_ids):
    """A mistake: each span's sentinel written AFTER its tokens in the target (and no extra closing one)."""
    inputs, targets, k = [], [], 0
    m, t = noise_mask.tolist(), ids.tolist()
    for i in range(len(t)):
        if m[i]:
            if i == 0 or not m[i - 1]:
                inputs.append(sentinel_ids[k])
            targets.append(t[i])
            if i == len(t) - 1 or not m[i + 1]:
                targets.append(sentinel_ids[k])
                k += 1
        else:
            inputs.append(t[i])
    return torch.tensor(inputs, dtype=ids.dtype), torch.tensor(targets, dtype=ids.dtype)


def spans_cases(rng):
    for L, density, span in ((30, 0.15, 3.0), (64, 0.5, 2.0), (17, 0.3, 1.0)):
        ids = torch.randint(0, 200, (L,), generator=rng)
        mask = O.random_spans_noise_mask(L, density, span, generator=int(torch.randint(10**6, (1,), generator=rng)))
        n = len(_runs(mask))
        sents = (torch.randperm(40, generator=rng)[: n + 1 + int(torch.randint(3, (1,), generator=rng))] + 500).tolist()
        yield Case(f"length {L}, T5 mask with density {density}, mean span {span}, {n} spans, "
                   f"{len(sents)} sentinel ids in a shuffled order", ids, mask, sents)
    ids = torch.randint(0, 50, (12,), generator=rng)
    mask = torch.tensor([False, True, True, True, False, False, False, True, True, True, False, False])
    yield Case("two spans of three tokens, 12 sentinel ids (more than needed)", ids, mask, list(range(300, 312)))
    ids = torch.randint(0, 50, (9,), generator=rng)
    mask = torch.tensor([True, False, True, False, True, False, True, False, True])
    yield Case("alternating T F T ..., spans at both ends (5 spans of one token)", ids, mask, [99, 98, 97, 96, 95, 94])
    ids = torch.randint(0, 50, (6,), generator=rng)
    yield Case("everything is noise: one span", ids, torch.ones(6, dtype=torch.bool), [70, 71])
    ids = torch.randint(0, 50, (10,), generator=rng).to(torch.int32)
    mask = torch.tensor([False, False, True, True, False, False, False, True, False, False])
    yield Case("int32 ids (the outputs keep the dtype of ids), two spans", ids, mask, [60, 61, 62])
    ids = torch.randint(0, 50, (5,), generator=rng)
    yield Case("no noise at all", ids, torch.zeros(5, dtype=torch.bool), [70])
    yield Case("a single token, noise", torch.tensor([7]), torch.tensor([True]), [70, 71])
    ids = torch.randint(0, 50, (8,), generator=rng)
    mask = torch.tensor([False, True, True, False, False, True, False, False])
    yield Case("2 spans and only 2 sentinel ids must raise ValueError", ids, mask, [90, 91], raises=ValueError)


# --------------------------------------------------------------------------- ex3: distill_loss


def drive_distill(fn, s, t, y, hs, ht, T, w):
    with torch.enable_grad():  # the grader may call this under no_grad
        s, t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
        hs, ht = hs.clone().requires_grad_(True), ht.clone().requires_grad_(True)
        out = fn(s, t, y, hs, ht, temperature=T, w_soft=w[0], w_hard=w[1], w_cos=w[2])
        total = out["total"]
        if total.requires_grad:
            total.backward()
    zero = torch.zeros((), dtype=torch.float64)

    def gmax(x):
        return zero if x.grad is None else x.grad.detach().abs().max().to(torch.float64)

    grad_s = s.grad.detach() if s.grad is not None else torch.zeros_like(s.detach())
    grad_hs = hs.grad.detach() if hs.grad is not None else torch.zeros_like(hs.detach())
    return (out["soft"].detach(), out["hard"].detach(), out["cos"].detach(), total.detach(), grad_s, grad_hs,
            torch.maximum(gmax(t), gmax(ht)))


def _distill(s, t, y, hs, ht, temperature=2.0, w_soft=5.0, w_hard=2.0, w_cos=1.0, *, t2=True, kl="kl",
             student_T=True, rows="mean", hard_T=False, cos="one-minus", detach=True, teacher_T=True, power=2,
             default_w=False, hard_sum=False, cos_dim=-1, cut=False):
    T = temperature
    tt, htt = (t.detach(), ht.detach()) if detach else (t, ht)
    ss = s.detach() if cut else s
    log_ps = F.log_softmax(ss / T if student_T else ss, -1)
    log_pt = F.log_softmax(tt / T if teacher_T else tt, -1)
    pt = log_pt.exp()
    if kl == "kl":
        per_row = (pt * (log_pt - log_ps)).sum(-1)
    elif kl == "probs-into-kl_div":  # F.kl_div(p_s, p_t): its input must be log-probabilities
        per_row = (pt * (log_pt - log_ps.exp())).sum(-1)
    elif kl == "ce":
        per_row = -(pt * log_ps).sum(-1)
    else:  # reversed
        per_row = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    soft = per_row.sum() if rows == "sum" else (per_row.mean() / s.shape[-1] if rows == "elements" else per_row.mean())
    if t2:
        soft = soft * T ** power
    hard = F.cross_entropy(s / T if hard_T else s, y, reduction="sum" if hard_sum else "mean")
    c = F.cosine_similarity(hs, htt, dim=cos_dim)
    cosl = (1 - c).mean() if cos == "one-minus" else c.mean()
    if default_w:
        w_soft, w_hard, w_cos = 5.0, 2.0, 1.0
    return {"soft": soft, "hard": hard, "cos": cosl, "total": w_soft * soft + w_hard * hard + w_cos * cosl}


def _distill_mistake(**kw):
    def fn(s, t, y, hs, ht, temperature=2.0, w_soft=5.0, w_hard=2.0, w_cos=1.0):
        return _distill(s, t, y, hs, ht, temperature, w_soft, w_hard, w_cos, **kw)

    return lambda *args: drive_distill(fn, *args)


def distill_reference(s, t, y, hs, ht, T, w):
    return drive_distill(_distill, s, t, y, hs, ht, T, w)


def distill_cases(rng):
    for n, V, d, dtype, T, w in ((5, 7, 4, torch.float64, 2.0, (5.0, 2.0, 1.0)),
                                 (12, 30, 16, torch.float32, 4.0, (1.0, 0.5, 2.0)),
                                 (3, 4, 3, torch.float64, 0.5, (1.0, 1.0, 1.0)),
                                 (8, 10, 6, torch.float64, 10.0, (2.0, 0.0, 0.0)),
                                 (1, 5, 2, torch.float32, 1.0, (0.0, 1.0, 3.0))):
        s = torch.randn(n, V, generator=rng, dtype=dtype) * 3
        t = torch.randn(n, V, generator=rng, dtype=dtype) * 3
        y = torch.randint(V, (n,), generator=rng)
        hs, ht = torch.randn(n, d, generator=rng, dtype=dtype), torch.randn(n, d, generator=rng, dtype=dtype)
        yield Case(f"{n} rows, V = {V}, d = {d}, {dtype}, T = {T}, (w_soft, w_hard, w_cos) = {w}", s, t, y, hs, ht,
                   T, w)
    t = torch.randn(4, 6, generator=rng, dtype=torch.float64)
    ht = torch.randn(4, 5, generator=rng, dtype=torch.float64)
    yield Case("the student equals the teacher: soft = cos = 0, T = 3", t.clone(), t, torch.randint(6, (4,), generator=rng),
               ht.clone(), ht, 3.0, (5.0, 2.0, 1.0))
    s = torch.randn(3, 4, generator=rng, dtype=torch.float64)
    for bad in (0.0, -2.0):
        yield Case(f"temperature = {bad} must raise ValueError", s, s, torch.zeros(3, dtype=torch.long),
                   s, s, bad, (1.0, 1.0, 1.0), raises=ValueError)


# --------------------------------------------------------------------------- ex4: backpack_output


def backpack_reference(senses, weights):
    return torch.einsum("baij,bjad->bid", weights, senses)


def backpack_cases(rng):
    for B, L, n_s, d, dtype in ((2, 6, 4, 5, torch.float32), (1, 1, 1, 3, torch.float64), (3, 9, 2, 8, torch.float64),
                                (1, 4, 5, 1, torch.float32)):
        c = torch.randn(B, L, n_s, d, generator=rng, dtype=dtype)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        w = torch.softmax(torch.randn(B, n_s, L, L, generator=rng, dtype=dtype).masked_fill(~causal, float("-inf")), -1)
        yield Case(f"B = {B}, L = {L}, n_s = {n_s}, d = {d}, {dtype}", c, w)


# --------------------------------------------------------------------------- the spec

TESTS = [
    HiddenTest(
        cell="ex1_bert_mask_test",
        function="bert_mask",
        cases=mask_cases,
        reference=mask_reference,
        outputs=("inputs", "labels"),
        blocked=[O.mask_tokens, O.pretrain_encoder],
        unchanged=True,
        mistakes={
            "the labels are the ORIGINAL tokens at the selected positions, not what the input became":
                lambda *a, **k: _mask(*a, **k, label="corrupted"),
            "labels must be -100 at the positions that were not selected":
                lambda *a, **k: _mask(*a, **k, label="everywhere"),
            "the 10% left unchanged are selected too: their label is the original token, not -100":
                lambda *a, **k: _mask(*a, **k, label="changed-only"),
            "special tokens were selected: positions holding one of special_ids are never selected":
                lambda *a, **k: _mask(*a, **k, specials=False),
            "the order of the actions: [MASK] when u_action < 0.8, random_ids when 0.8 <= u_action < 0.9, "
            "unchanged otherwise":
                lambda *a, **k: _mask(*a, **k, order="random-mask-keep"),
            "every selected position became [MASK]: only 80% do":
                lambda *a, **k: _mask(*a, **k, order="all-mask"),
            "u_action >= 0.9 keeps the token: only 0.8 <= u_action < 0.9 takes random_ids":
                lambda *a, **k: _mask(*a, **k, order="no-keep"),
            "selected iff u_select < p_mask, strictly (u_select == p_mask is not selected)":
                lambda *a, **k: _mask(*a, **k, select_le=True),
            "ids were changed in place (ids[...] = mask_id), so the labels read [MASK] instead of the original token: "
            "build new tensors with torch.where or work on ids.clone()":
                lambda *a, **k: _mask(*a, **k, label="in-place"),
            "p_mask is an argument: select where u_select < p_mask (0.15 is only its default)":
                lambda *a, **k: _mask(*a, **k, fixed_p=0.15),
            "special_ids need not be the smallest ids: test membership (torch.isin), not ids > max(special_ids)":
                lambda *a, **k: _mask(*a, **k, specials="above-max"),
        },
        hint="selected = (u_select < p_mask) & ~isin(ids, special_ids); [MASK] if u_action < 0.8, random_ids if "
             "0.8 <= u_action < 0.9, else unchanged; labels = original ids where selected, -100 elsewhere",
    ),
    HiddenTest(
        cell="ex2_corrupt_spans_test",
        function="corrupt_spans",
        cases=spans_cases,
        reference=spans_reference,
        outputs=("inputs", "targets"),
        blocked=[O.span_corrupt, O.span_uncorrupt],
        unchanged=True,
        mistakes={
            "one sentinel per corrupted TOKEN: a whole span (a run of True) becomes ONE sentinel":
                lambda ids, m, s: _spans_generic(ids, m, s, per_token=True),
            "the target ends with one more sentinel, sentinel_ids[n_spans]":
                lambda ids, m, s: _spans_generic(ids, m, s, closing=False),
            "span k takes sentinel_ids[k], not always sentinel_ids[0]":
                lambda ids, m, s: _spans_generic(ids, m, s, same=True),
            "the spans were dropped from the input without a sentinel":
                lambda ids, m, s: _spans_generic(ids, m, s, drop=True),
            "each span in the target is preceded by its sentinel, and a closing sentinel ends it":
                lambda ids, m, s: _spans_generic(ids, m, s, prefix=False),
            "each span's sentinel comes BEFORE its tokens in the target (<X0> span0 <X1> span1 ... closing sentinel)":
                _spans_after,
            "the closing sentinel is sentinel_ids[n_spans], not the last id of the list":
                lambda ids, m, s: _spans_generic(ids, m, s, last=True),
        },
        hint="inputs: each run of True becomes sentinel_ids[k] (k counts the runs); targets: sentinel_ids[k] then "
             "the run's tokens, for every run, then sentinel_ids[n_spans]; the dtype of ids",
    ),
    HiddenTest(
        cell="ex3_distill_loss_test",
        function="distill_loss",
        cases=distill_cases,
        reference=distill_reference,
        driver=drive_distill,
        outputs=("soft", "hard", "cos", "total", "d total / d student_logits", "d total / d student_hidden",
                 "largest gradient the teacher received"),
        blocked=[O.distillation_loss],
        unchanged=True,
        atol=1e-5, rtol=1e-4,
        mistakes={
            "no T^2 factor: the soft loss is T^2 KL(p_t || p_s)": _distill_mistake(t2=False),
            "the cross-entropy with soft targets is not 0 when the student equals the teacher: use the KL "
            "(sum p_t (log p_t - log p_s))": _distill_mistake(kl="ce"),
            "the KL's direction: KL(p_t || p_s) = sum p_t (log p_t - log p_s), weighted by the teacher":
                _distill_mistake(kl="reversed"),
            "the temperature divides the student's logits too: softmax(student_logits / T)":
                _distill_mistake(student_T=False),
            "the soft loss is averaged over the ROWS (a sum over the vocabulary, a mean over rows); you summed the rows":
                _distill_mistake(rows="sum"),
            "the soft loss is averaged over the rows only, not over rows x vocabulary (F.kl_div's reduction='mean'); "
            "use reduction='batchmean' or sum(-1).mean()": _distill_mistake(rows="elements"),
            "the hard loss is at temperature 1: F.cross_entropy(student_logits, labels)": _distill_mistake(hard_T=True),
            "cos is 1 - cosine similarity, not the cosine itself": _distill_mistake(cos="cosine"),
            "the teacher received a gradient: detach its logits and hidden states": _distill_mistake(detach=False),
            "the temperature divides the teacher's logits too: p_t = softmax(teacher_logits / T)":
                _distill_mistake(teacher_T=False),
            "the factor is T^2, not T": _distill_mistake(power=1),
            "F.kl_div(input, target) takes log-probabilities as its input (the student's log_softmax)":
                _distill_mistake(kl="probs-into-kl_div"),
            "total uses the weights passed in (w_soft, w_hard, w_cos), not the defaults 5, 2, 1":
                _distill_mistake(default_w=True),
            "the hard loss is averaged over the rows (F.cross_entropy's default reduction), not summed":
                _distill_mistake(hard_sum=True),
            "one cosine per row: F.cosine_similarity(student_hidden, teacher_hidden, dim=-1)": _distill_mistake(cos_dim=0),
            "the soft loss's gradient did not reach the student: keep it a tensor computed from student_logits "
            "(no float(), .item(), .detach() or torch.tensor() on it)": _distill_mistake(cut=True),
        },
        hint="soft = T^2 * mean over rows of sum_v p_t (log p_t - log p_s) at temperature T; hard = CE at T = 1; "
             "cos = mean(1 - cosine); total = w_soft soft + w_hard hard + w_cos cos; detach the teacher",
    ),
    HiddenTest(
        cell="ex4_backpack_output_test",
        function="backpack_output",
        cases=backpack_cases,
        reference=backpack_reference,
        blocked=[O.BackpackLM, O.predicted_logit_change, O.backpack_topic_edit, O.train_backpack],
        unchanged=True,
        mistakes={
            "a mean over the senses: o_i is a SUM over the senses a": lambda c, w: backpack_reference(c, w) / c.shape[2],
            "the weights are indexed [b, a, i, j]: row i weights the senses of the tokens j; you used W[a, j, i]":
                lambda c, w: backpack_reference(c, w.transpose(-1, -2)),
            "the weights were left out: o_i = sum_j sum_a W[a, i, j] C(y_j)_a":
                lambda c, w: c.sum(dim=(1, 2))[:, None, :].expand(-1, c.shape[1], -1),
            "the senses are those of the attended tokens j (senses[b, j]), not of the query token i":
                lambda c, w: torch.einsum("baij,biad->bid", w, c),
        },
        hint="o[b, i] = sum over j and a of weights[b, a, i, j] * senses[b, j, a], with the dtype of senses",
    ),
]
