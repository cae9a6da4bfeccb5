"""Hidden tests of lecture 09, decided by the grader outside the learner's kernel.

Each test draws fresh inputs from the course secret, computes the expected values with the
library's reference here, and runs the learner's function in a sandboxed process where that
reference (and the library functions that contain it, and PyTorch's SDPA) does not exist. See
``autograder/hidden.py``.

Exercise 1 (the memory update) goes through a driver that makes the new states require grad and
reports whether the returned memory still requires grad (the stop-gradient) and whether the
inputs were modified in place.
"""

import math

import torch
import torch.nn.functional as F
from autograder.hidden import Case, HiddenTest

from transformer_lab import attention as A
from transformer_lab import memory as MEM
from transformer_lab import positions as P
from transformer_lab import retrieval as RT

_NEG_INF = float("-inf")
_ATTENTION = [F.scaled_dot_product_attention, A.scaled_dot_product_attention, A.fast_attention,
              A.MultiHeadAttention]

# --------------------------------------------------------------------------- ex1: update_memory


def drive_update_memory(fn, mem, h, mem_len):
    """Runs in the learner's process: the memory, whether it requires grad, whether the inputs survived."""
    import torch

    h_in = h.clone().requires_grad_(True)
    mem_before = None if mem is None else mem.clone()
    out = fn(mem, h_in, mem_len)
    unchanged = torch.equal(h_in.detach(), h) and (mem is None or torch.equal(mem, mem_before))
    return out.detach(), bool(out.requires_grad), bool(unchanged)


def update_reference(mem, h, mem_len):
    return MEM.update_memory(mem, h, mem_len), False, True


def update_cases(rng):
    def states(B, L, d, dtype=torch.float64):
        return torch.randn(B, L, d, generator=rng, dtype=dtype)

    n_old, n_new = int(torch.randint(3, 7, (1,), generator=rng)), int(torch.randint(3, 6, (1,), generator=rng))
    keep = n_old + n_new - 2
    yield Case(f"memory of {n_old} states, {n_new} new ones, mem_len = {keep} (two fall out)",
               states(2, n_old, 3), states(2, n_new, 3), keep)
    yield Case("memory of 5, 4 new states, mem_len = 3 (only new states are kept), float32",
               states(1, 5, 4, torch.float32), states(1, 4, 4, torch.float32), 3)
    yield Case("an empty memory (None), 3 new states, mem_len = 8 (all kept)", None, states(3, 3, 2), 8)
    yield Case("an empty memory (None), 6 new states, mem_len = 2", None, states(1, 6, 5), 2)
    yield Case("memory of 4, 4 new states, mem_len = 8 (exactly all)", states(2, 4, 2), states(2, 4, 2), 8)
    yield Case("mem_len = 0", states(1, 2, 2), states(1, 2, 2), 0, raises=ValueError)
    yield Case("mem_len = -3", None, states(1, 2, 2), -3, raises=ValueError)


def _cat(mem, h):
    return h if mem is None else torch.cat([mem, h], 1)


# --------------------------------------------------------------------------- ex2: xl_attention


def xl_variant(q, k, v, u, v_pos, rel, mem_offset=True, mask=True, use_u=True, scale=True, rel_offset=True,
               pos_bias="v", swap_uv=False):
    Lq, Lk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    n_mem = Lk - Lq
    i = torch.arange(Lq)[:, None] + (n_mem if mem_offset else 0)
    j = torch.arange(Lk)[None, :]
    d_rel = torch.arange(Lq)[:, None] + (n_mem if rel_offset else 0) - j
    if swap_uv:
        u, v_pos = v_pos, u
    content = (q + (u if use_u else 0 * u)[None, :, None, :]) @ k.transpose(-2, -1)
    pb = {"v": v_pos, "u": u, "none": 0 * v_pos}[pos_bias]
    pos_all = (q + pb[None, :, None, :]) @ rel.transpose(-2, -1)
    position = pos_all.gather(-1, d_rel.clamp(min=0).expand(*q.shape[:3], Lk))
    s = (content + position) / (math.sqrt(D) if scale else 1.0)
    if mask:
        s = s.masked_fill(j > i, _NEG_INF)
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def xl_cases(rng):
    def t(*shape, dtype=torch.float64):
        return torch.randn(*shape, generator=rng, dtype=dtype)

    n_mem, Lq = int(torch.randint(4, 9, (1,), generator=rng)), int(torch.randint(3, 7, (1,), generator=rng))
    Lk = n_mem + Lq
    yield Case(f"n_mem = {n_mem}, Lq = {Lq}, H = 2, D = 4, Dv = 3",
               t(2, 2, Lq, 4), t(2, 2, Lk, 4), t(2, 2, Lk, 3), t(2, 4), t(2, 4), t(2, Lk, 4),
               show={"shapes": f"q (2, 2, {Lq}, 4), k (2, 2, {Lk}, 4), v (2, 2, {Lk}, 3), rel (2, {Lk}, 4)"})
    yield Case("no memory: n_mem = 0, Lq = Lk = 6, H = 3, D = 2",
               t(1, 3, 6, 2), t(1, 3, 6, 2), t(1, 3, 6, 2), t(3, 2), t(3, 2), t(3, 6, 2),
               show={"shapes": "q, k, v (1, 3, 6, 2), rel (3, 6, 2)"})
    yield Case("a long memory: n_mem = 10, Lq = 2, H = 1, D = 8, float32",
               t(1, 1, 2, 8, dtype=torch.float32), t(1, 1, 12, 8, dtype=torch.float32),
               t(1, 1, 12, 8, dtype=torch.float32), t(1, 8, dtype=torch.float32), t(1, 8, dtype=torch.float32),
               t(1, 12, 8, dtype=torch.float32),
               show={"shapes": "q (1, 1, 2, 8), k, v (1, 1, 12, 8), rel (1, 12, 8), float32"})
    yield Case("n_mem = 3, Lq = 5, batch 3, H = 2, D = 4",
               t(3, 2, 5, 4), t(3, 2, 8, 4), t(3, 2, 8, 4), t(2, 4) * 2, t(2, 4) * 2, t(2, 8, 4),
               show={"shapes": "q (3, 2, 5, 4), k, v (3, 2, 8, 4), rel (2, 8, 4)"})


# --------------------------------------------------------------------------- ex4: knn_memory_attention


def memo_variant(q, k, v, mem_k, mem_v, top_k, gate_bias, local_causal=True, sigmoid=True, swap=False,
                 all_memory=False, mem_scale=True, smallest=False):
    L, D = q.shape[-2], q.shape[-1]
    s = q @ k.transpose(-2, -1) / math.sqrt(D)
    if local_causal:
        s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), _NEG_INF)
    local = torch.softmax(s, -1) @ v
    ms = q @ mem_k.transpose(-2, -1) / (math.sqrt(D) if mem_scale else 1.0)
    if not all_memory:
        top = ms.topk(top_k, -1, largest=not smallest).indices
        keep = torch.zeros_like(ms, dtype=torch.bool).scatter(-1, top, True)
        ms = ms.masked_fill(~keep, _NEG_INF)
    mem = torch.softmax(ms, -1) @ mem_v
    gt = (torch.sigmoid(gate_bias) if sigmoid else gate_bias).to(q.dtype)[None, :, None, None]
    return gt * local + (1 - gt) * mem if swap else gt * mem + (1 - gt) * local


def memo_cases(rng):
    def t(*shape, dtype=torch.float64):
        return torch.randn(*shape, generator=rng, dtype=dtype)

    N = int(torch.randint(8, 14, (1,), generator=rng))
    yield Case(f"L = 6, N = {N}, top_k = 3, H = 2, D = 4", t(2, 2, 6, 4), t(2, 2, 6, 4), t(2, 2, 6, 4),
               t(2, 2, N, 4), t(2, 2, N, 4), 3, torch.rand(2, generator=rng, dtype=torch.float64) * 0.8 + 0.1,
               show={"shapes": f"q, k, v (2, 2, 6, 4), mem_k, mem_v (2, 2, {N}, 4)", "top_k": 3})
    yield Case("L = 4, N = 5, top_k = 2, H = 3, D = 2, gate biases -2, 0, 2", t(1, 3, 4, 2), t(1, 3, 4, 2),
               t(1, 3, 4, 2), t(1, 3, 5, 2), t(1, 3, 5, 2), 2, torch.tensor([-2.0, 0.0, 2.0], dtype=torch.float64),
               show={"shapes": "q, k, v (1, 3, 4, 2), mem_k, mem_v (1, 3, 5, 2)", "top_k": 2})
    yield Case("top_k = N = 7 (the whole memory), float32", t(2, 1, 5, 3, dtype=torch.float32),
               t(2, 1, 5, 3, dtype=torch.float32), t(2, 1, 5, 3, dtype=torch.float32), t(2, 1, 7, 3, dtype=torch.float32),
               t(2, 1, 7, 3, dtype=torch.float32), 7, torch.tensor([0.3]),
               show={"shapes": "q, k, v (2, 1, 5, 3), mem_k, mem_v (2, 1, 7, 3), float32", "top_k": 7})
    yield Case("top_k = 1, L = 3, N = 10, D = 8", t(1, 2, 3, 8), t(1, 2, 3, 8), t(1, 2, 3, 8), t(1, 2, 10, 8),
               t(1, 2, 10, 8), 1, torch.tensor([1.0, -1.0], dtype=torch.float64),
               show={"shapes": "q, k, v (1, 2, 3, 8), mem_k, mem_v (1, 2, 10, 8)", "top_k": 1})
    q, k, v, mk, mv = t(1, 1, 2, 2), t(1, 1, 2, 2), t(1, 1, 2, 2), t(1, 1, 4, 2), t(1, 1, 4, 2)
    yield Case("top_k = 0", q, k, v, mk, mv, 0, torch.zeros(1, dtype=torch.float64), raises=ValueError)
    yield Case("top_k = 5 > N = 4", q, k, v, mk, mv, 5, torch.zeros(1, dtype=torch.float64), raises=ValueError)


TESTS = [
    HiddenTest(
        cell="ex1_update_memory_test",
        function="update_memory",
        cases=update_cases,
        driver=drive_update_memory,
        reference=update_reference,
        outputs=("memory", "requires_grad", "inputs_unchanged"),
        blocked=[MEM.update_memory, MEM.compressive_update, MEM.XLLM, MEM.CompressiveLM],
        mistakes={
            "you kept the OLDEST rows: a FIFO keeps the newest, cat[:, -mem_len:]":
                lambda mem, h, n: (_cat(mem, h)[:, :n], False, True),
            "the order is [mem; h]: the old memory first, the new states after it":
                lambda mem, h, n: ((h if mem is None else torch.cat([h, mem], 1))[:, -n:], False, True),
            "the old memory must be kept too: concatenate [mem; h] before cutting":
                lambda mem, h, n: (h[:, -n:], False, True),
            "off by one: you kept mem_len - 1 rows; cat[:, -mem_len:] keeps the last mem_len":
                lambda mem, h, n: (_cat(mem, h)[:, -n + 1:] if n > 1 else _cat(mem, h)[:, :0], False, True),
            "off by one: you kept mem_len + 1 rows; cat[:, -mem_len:] keeps the last mem_len":
                lambda mem, h, n: (_cat(mem, h)[:, -(n + 1):], False, True),
            "no stop-gradient: the memory must be .detach()ed (requires_grad False)":
                lambda mem, h, n: (_cat(mem, h)[:, -n:], True, True),
        },
        hint="the last mem_len rows of torch.cat([mem, h], dim=1) (h alone when mem is None), .detach()ed; "
             "ValueError when mem_len < 1",
    ),
    HiddenTest(
        cell="ex2_xl_attention_test",
        function="xl_attention",
        cases=xl_cases,
        reference=MEM.xl_relative_attention,
        blocked=[MEM.xl_relative_attention, MEM.xl_self_attention, MEM.XLBlock, MEM.XLLM, MEM.full_pass,
                 MEM.CompressiveLM, P.XLRelative, *_ATTENTION],
        mistakes={
            "no causal mask: query i must not see keys after its own position n_mem + i":
                lambda *a: xl_variant(*a, mask=False),
            "the mask forgets the memory: query i sits at n_mem + i and sees keys j <= n_mem + i":
                lambda *a: xl_variant(*a, mem_offset=False),
            "the distance forgets the memory: it is i' - j with i' = n_mem + i, not i - j":
                lambda *a: xl_variant(*a, rel_offset=False),
            "the content bias u is missing: the content term is (q_i + u) . k_j":
                lambda *a: xl_variant(*a, use_u=False),
            "the scale is missing: divide the whole score by sqrt(D)":
                lambda *a: xl_variant(*a, scale=False),
            "the position term uses u: it is (q_i + v_pos) . rel[i' - j] (u goes with the content term)":
                lambda *a: xl_variant(*a, pos_bias="u"),
            "u and v_pos are swapped: content (q_i + u) . k_j, position (q_i + v_pos) . rel[i' - j]":
                lambda *a: xl_variant(*a, swap_uv=True),
            "the position bias v_pos is missing: the position term is (q_i + v_pos) . rel[i' - j]":
                lambda *a: xl_variant(*a, pos_bias="none"),
        },
        hint="score ((q_i + u).k_j + (q_i + v_pos).rel[n_mem + i - j]) / sqrt(D), keys j > n_mem + i masked, "
             "softmax over j, times v; keep the dtype",
    ),
    HiddenTest(
        cell="ex4_knn_memory_attention_test",
        function="knn_memory_attention",
        cases=memo_cases,
        reference=MEM.knn_memory_attention,
        blocked=[MEM.knn_memory_attention, MEM.knn_attention, MEM.gated_combine, MEM.MemorizingAttention,
                 MEM.KNNMemory, RT.make_index, RT.TorchIndex, RT.exact_topk, *_ATTENTION],
        mistakes={
            "the gate is swapped: g_h multiplies the MEMORY output, (1 - g_h) the local one":
                lambda *a: memo_variant(*a, swap=True),
            "the gate is the raw bias: g_h = sigmoid(gate_bias), not gate_bias itself":
                lambda *a: memo_variant(*a, sigmoid=False),
            "the local attention is not causal: query i sees keys j <= i only":
                lambda *a: memo_variant(*a, local_causal=False),
            "the memory softmax runs over ALL N memory keys: keep only each query's top_k":
                lambda *a: memo_variant(*a, all_memory=True),
            "the memory scores are not scaled: divide q . k by sqrt(D) there too":
                lambda *a: memo_variant(*a, mem_scale=False),
            "you retrieved the SMALLEST scores: top_k means the largest inner products":
                lambda *a: memo_variant(*a, smallest=True),
        },
        hint="local causal attention, attention over each query's top_k memory pairs (largest q . k, scaled "
             "by 1/sqrt(D)), mixed as sigmoid(gate_bias) * memory + (1 - sigmoid(gate_bias)) * local; "
             "ValueError unless 1 <= top_k <= N",
    ),
]


# ------------------------------------------------------------ the kNN-LM exercise (section 4)

# --------------------------------------------------------------------------- ex: knn_distribution


def knn_scatter(p_shape_like, vocab_size, tokens, weights, add=True):
    out = torch.zeros(*p_shape_like.shape[:-1], vocab_size, dtype=p_shape_like.dtype)
    return out.scatter_add_(-1, tokens, weights) if add else out.scatter_(-1, tokens, weights)


def knn_cases(rng):
    def draw(low, high):
        return int(torch.randint(low, high, (1,), generator=rng))

    # the edge case first: every known mistake gives its own numbers here (the grader stops at
    # the first failing case): 3 queries, duplicates in every row, T = 2, one row of distances
    # in the thousands (e^-2500 underflows), float64
    d = torch.rand(3, 5, generator=rng, dtype=torch.float64) * 4 + 0.5
    d[2] = d[2] + 5000.0                                                   # e^-2500 = 0 even in float64
    tok = torch.randint(0, 4, (3, 5), generator=rng)
    tok[:, 1] = tok[:, 0]                                                  # a duplicate in every row
    yield Case("3 queries x 5 neighbours, vocab 7, T = 2, duplicates in every row, row 2's distances "
               "near 5000, float64", d, tok, 7, temperature=2.0)
    M, k, V = draw(4, 8), draw(6, 12), draw(10, 30)
    d = torch.rand(M, k, generator=rng) * 6
    tok = torch.randint(0, V // 2, (M, k), generator=rng)                # half the vocabulary: duplicates
    yield Case(f"{M} queries x {k} neighbours, vocab {V}, T = 1 (default), float32", d, tok, V)
    M, k, V = draw(2, 5), draw(3, 8), draw(5, 12)
    d = torch.rand(M, k, generator=rng, dtype=torch.float64) * 3
    tok = torch.randint(0, V, (M, k), generator=rng)
    T = round(0.2 + 0.6 * float(torch.rand(1, generator=rng)), 3)
    yield Case(f"{M} queries x {k} neighbours, vocab {V}, T = {T} (sharper than 1), float64", d, tok, V,
               temperature=T)
    V = draw(5, 9)
    d = torch.rand(2, 1, generator=rng, dtype=torch.float64) * 5
    tok = torch.randint(0, V, (2, 1), generator=rng)
    yield Case(f"k = 1: one neighbour per query (all its weight on its token), vocab {V}, float64", d, tok, V)
    k = draw(3, 7)
    d = torch.rand(3, k, generator=rng, dtype=torch.float64) * 2
    tok = torch.full((3, k), draw(0, 6), dtype=torch.long)
    yield Case(f"3 queries whose {k} neighbours were all followed by the same token, vocab 6, T = 5, float64",
               d, tok, 6, temperature=5.0)


def knn_reference(distances, neighbour_tokens, vocab_size, temperature=1.0):
    return RT.knn_distribution(distances, neighbour_tokens, vocab_size, temperature)


def knn_mistake_plus_distance(distances, neighbour_tokens, vocab_size, temperature=1.0):
    return knn_scatter(distances, vocab_size, neighbour_tokens, torch.softmax(distances / temperature, -1))


def knn_mistake_overwrite(distances, neighbour_tokens, vocab_size, temperature=1.0):
    return knn_scatter(distances, vocab_size, neighbour_tokens, torch.softmax(-distances / temperature, -1), add=False)


def knn_mistake_no_temperature(distances, neighbour_tokens, vocab_size, temperature=1.0):
    return knn_scatter(distances, vocab_size, neighbour_tokens, torch.softmax(-distances, -1))


def knn_mistake_times_temperature(distances, neighbour_tokens, vocab_size, temperature=1.0):
    return knn_scatter(distances, vocab_size, neighbour_tokens, torch.softmax(-distances * temperature, -1))


def knn_mistake_unnormalised(distances, neighbour_tokens, vocab_size, temperature=1.0):
    return knn_scatter(distances, vocab_size, neighbour_tokens, torch.exp(-distances / temperature))


def knn_mistake_vocab_softmax(distances, neighbour_tokens, vocab_size, temperature=1.0):
    s = knn_scatter(distances, vocab_size, neighbour_tokens, -distances / temperature)
    return torch.softmax(s, -1)


def knn_mistake_query_softmax(distances, neighbour_tokens, vocab_size, temperature=1.0):
    return knn_scatter(distances, vocab_size, neighbour_tokens, torch.softmax(-distances / temperature, 0))


def knn_mistake_inverse_distance(distances, neighbour_tokens, vocab_size, temperature=1.0):
    w = 1.0 / distances
    return knn_scatter(distances, vocab_size, neighbour_tokens, w / w.sum(-1, keepdim=True))


def knn_mistake_unshifted_exp(distances, neighbour_tokens, vocab_size, temperature=1.0):
    e = torch.exp(-distances / temperature)
    return knn_scatter(distances, vocab_size, neighbour_tokens, e / e.sum(-1, keepdim=True))


KNN_TESTS = [
    HiddenTest(
        cell="ex3_knn_distribution_test",
        function="knn_distribution",
        cases=knn_cases,
        reference=knn_reference,
        blocked=[RT.knn_distribution, RT.knn_lm_perplexity],
        mistakes={
            "softmax over +d gives most weight to the FARTHEST neighbour: the weights are softmax(-d / T)":
                knn_mistake_plus_distance,
            "a token that several neighbours share got only one neighbour's weight: scatter_ overwrites, "
            "scatter_add_ adds the duplicates up": knn_mistake_overwrite,
            "the temperature was ignored: divide the distances by T before the softmax": knn_mistake_no_temperature,
            "the distances were multiplied by T; divide them: softmax(-d / T)": knn_mistake_times_temperature,
            "the weights exp(-d / T) were not normalised over the k neighbours (a softmax divides by their sum)":
                knn_mistake_unnormalised,
            "tokens no neighbour voted for got probability: take the softmax over the k neighbours, then add "
            "the weights onto a row of zeros (not a softmax over the whole vocabulary)": knn_mistake_vocab_softmax,
            "the softmax went over the queries (dim 0); it goes over each query's k neighbours, dim=-1":
                knn_mistake_query_softmax,
            "the weights are 1/d normalised; kNN-LM uses a softmax over -d / T": knn_mistake_inverse_distance,
            "exp(-d / T) / sum gives 0 / 0 = NaN when every distance is large (e^-2500 underflows to 0): "
            "torch.softmax subtracts the largest score first": knn_mistake_unshifted_exp,
        },
        hint="row m is softmax(-distances[m] / temperature) over the k neighbours, each weight added "
             "(scatter_add_) onto its token in a row of vocab_size zeros; keep the distances' dtype",
        unchanged=True,
    ),
]


TESTS[2:2] = KNN_TESTS   # in notebook order: ex1, ex2, ex3 (kNN-LM), ex4
