"""Hidden tests of lecture 08, decided by the grader outside the learner's kernel.

Each test draws fresh inputs from the course secret, computes the expected values with the
library's reference here, and runs the learner's function in a sandboxed process where that
reference (and the library's attention functions, and PyTorch's SDPA) does not exist. See
``autograder/hidden.py``.

Exercise 2 (the tiled forward) goes through a driver, ``drive_flash_forward``, which runs in the
learner's process: it watches every tensor the learner's function creates (a
``TorchDispatchMode``) and counts its matrix-product FLOPs (``FlopCounterMode``), and sends back,
with the output and the log-sum-exp, whether no tensor reached the size of the (Lq, Lk) scores
(nor of a whole row block of them) and whether the tiles in the causal future were skipped. A
dense computation (SDPA, a softmax over whole rows, ``q @ k.T``) therefore fails even when its
numbers are right.
"""

import math

import torch
import torch.nn.functional as F
from autograder.hidden import Case, HiddenTest

from transformer_lab import attention as A
from transformer_lab import flash as FL

_NEG_INF = float("-inf")

# PyTorch's shortcuts and the library's functions that compute attention (or a piece of it)
_ATTENTION = [F.scaled_dot_product_attention, A.scaled_dot_product_attention, A.fast_attention,
              FL.flash_attention, FL.flash_attention_forward, FL.flash_attention_forward_fa1,
              FL.FlashAttention, FL.block_diagonal_attention]

# --------------------------------------------------------------------------- ex1: online_softmax_step


def step_reference(m, l, acc, scores, v):
    state = FL.online_softmax_update(FL.SoftmaxState(m, l, acc), scores, v)
    return state.m, state.l, state.acc


def step_cases(rng):
    def state(shape_rows, Dv, dtype, seen=True):
        if not seen:
            return (torch.full((*shape_rows, 1), _NEG_INF, dtype=dtype), torch.zeros(*shape_rows, 1, dtype=dtype),
                    torch.zeros(*shape_rows, Dv, dtype=dtype))
        m = torch.randn(*shape_rows, 1, generator=rng, dtype=dtype)
        l = torch.rand(*shape_rows, 1, generator=rng, dtype=dtype) * 3 + 1   # at least e^0 = 1
        acc = torch.randn(*shape_rows, Dv, generator=rng, dtype=dtype)
        return m, l, acc

    # the edge cases first: every known mistake shows on this case (the grader stops at the first failure)
    m, l, acc = state((4,), 2, torch.float32, seen=False)
    m[1:], l[1:] = torch.tensor([[0.5], [2.0], [-1.0]]), torch.tensor([[1.5], [2.5], [1.0]])
    acc[1:] = torch.randn(3, 2, generator=rng)                             # rows 1-3 have seen keys
    s = torch.tensor([[_NEG_INF, _NEG_INF, _NEG_INF], [_NEG_INF, _NEG_INF, _NEG_INF],
                      [1000.0, 999.0, 998.0], [_NEG_INF, 0.0, -2.0]])
    v = torch.randn(3, 2, generator=rng)
    yield Case("row 0 has seen nothing and gets only -inf; row 1 a hidden block; row 2 scores near 1000",
               m, l, acc, s, v)
    m, l, acc = state((2, 3, 4), 5, torch.float64)
    s = torch.randn(2, 3, 4, 6, generator=rng, dtype=torch.float64) * 2
    v = torch.randn(2, 3, 6, 5, generator=rng, dtype=torch.float64)
    yield Case("a running state (B, H, n) = (2, 3, 4), a block of 6 keys, Dv = 5, float64", m, l, acc, s, v)
    m, l, acc = state((1, 2, 3), 4, torch.float32, seen=False)
    s = torch.randn(1, 2, 3, 7, generator=rng)
    v = torch.randn(1, 2, 7, 4, generator=rng)
    yield Case("the first block: m = -inf, l = 0, acc = 0; float32", m, l, acc, s, v)
    m, l, acc = state((5,), 3, torch.float64)
    s = torch.randn(5, 4, generator=rng, dtype=torch.float64) + 4.0          # the max grows in every row
    v = torch.randn(4, 3, generator=rng, dtype=torch.float64)
    yield Case("5 rows whose max grows (scores about 4 above the old max)", m, l, acc, s, v)


def _step_no_rescale_acc(m, l, acc, scores, v):
    m2, l2, acc2 = step_reference(m, l, acc, scores, v)
    shift = m2.masked_fill(m2 == _NEG_INF, 0.0)
    return m2, l2, acc + torch.exp(scores - shift) @ v


def _step_no_rescale_l(m, l, acc, scores, v):
    m2, l2, acc2 = step_reference(m, l, acc, scores, v)
    shift = m2.masked_fill(m2 == _NEG_INF, 0.0)
    return m2, l + torch.exp(scores - shift).sum(-1, keepdim=True), acc2


def _step_normalised(m, l, acc, scores, v):
    m2, l2, acc2 = step_reference(m, l, acc, scores, v)
    return m2, l2, acc2 / l2.masked_fill(l2 == 0, 1.0)


def _step_shift_old_max(m, l, acc, scores, v):
    m2, l2, acc2 = step_reference(m, l, acc, scores, v)
    alpha = torch.exp(m - m2.masked_fill(m2 == _NEG_INF, 0.0))
    p = torch.exp(scores - m.masked_fill(m == _NEG_INF, 0.0))          # shifted by the OLD max
    return m2, alpha * l + p.sum(-1, keepdim=True), alpha * acc + p @ v


def _step_no_empty_row(m, l, acc, scores, v):
    m2 = torch.maximum(m, scores.amax(-1, keepdim=True))
    alpha, p = torch.exp(m - m2), torch.exp(scores - m2)               # NaN where m' = -inf
    return m2, alpha * l + p.sum(-1, keepdim=True), alpha * acc + p @ v


def _step_overflow(m, l, acc, scores, v):
    m2, l2, acc2 = step_reference(m, l, acc, scores, v)
    shift = m2.masked_fill(m2 == _NEG_INF, 0.0)
    alpha, p = torch.exp(m - shift), torch.exp(scores) * torch.exp(-shift)   # e^S first: inf at 1000
    return m2, alpha * l + p.sum(-1, keepdim=True), alpha * acc + p @ v


def _step_zero_max(m, l, acc, scores, v):
    m2, l2, acc2 = step_reference(m, l, acc, scores, v)
    return m2.masked_fill(m2 == _NEG_INF, 0.0), l2, acc2


def _step_inverted(m, l, acc, scores, v):
    m2 = torch.maximum(m, scores.amax(-1, keepdim=True))
    shift = m2.masked_fill(m2 == _NEG_INF, 0.0)
    alpha = torch.exp(shift - m.masked_fill(m == _NEG_INF, 0.0))
    p = torch.exp(scores - shift)
    return m2, alpha * l + p.sum(-1, keepdim=True), alpha * acc + p @ v


# --------------------------------------------------------------------------- ex2: flash_forward


def drive_flash_forward(fn, q, k, v, block_q, block_k, causal):
    """Runs in the learner's process: the output, lse, and whether the call stayed tiled."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            seen = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(result):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    self.elements = max(self.elements, t.untyped_storage().nbytes() // max(t.element_size(), 1))
            return result

    B, H, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    with FlopCounterMode(display=False) as counter, Largest() as watch:
        result = fn(q, k, v, block_q, block_k, causal)
    out, lse = result if isinstance(result, (tuple, list)) and len(result) == 2 else (result, None)
    limit = B * H * max(block_q * block_k, Lq * max(D, Dv), Lk * max(D, Dv))
    pairs = 0                                              # pairs in the tiles not wholly in the future
    for i0 in range(0, Lq, block_q):
        i1 = min(i0 + block_q, Lq)
        for j0 in range(0, Lk, block_k):
            if not (causal and j0 > i1 - 1):
                pairs += (i1 - i0) * (min(j0 + block_k, Lk) - j0)
    budget = 2 * B * H * pairs * (D + Dv)
    return out, lse, bool(watch.elements <= limit), bool(counter.get_total_flops() <= 1.01 * budget)


def flash_forward_reference(q, k, v, block_q, block_k, causal):
    out, lse = FL.flash_attention_forward(q, k, v, block_q, block_k, causal=causal)
    return out, lse, True, True


def flash_cases(rng):
    def qkv(B, H, Lq, Lk, D, Dv, dtype=torch.float64):
        return (torch.randn(B, H, Lq, D, generator=rng, dtype=dtype), torch.randn(B, H, Lk, D, generator=rng, dtype=dtype),
                torch.randn(B, H, Lk, Dv, generator=rng, dtype=dtype))

    L = int(torch.randint(33, 41, (1,), generator=rng))
    yield Case(f"L = {L}, blocks 6 x 6, D = Dv = 4", *qkv(1, 2, L, L, 4, 4), 6, 6, False,
               show={"shapes": f"q, k, v (1, 2, {L}, 4)", "block_q": 6, "block_k": 6, "causal": False})
    Lq, Lk = int(torch.randint(21, 29, (1,), generator=rng)), int(torch.randint(40, 48, (1,), generator=rng))
    yield Case(f"Lq = {Lq}, Lk = {Lk}, D = 3, Dv = 2, blocks 5 x 7", *qkv(2, 1, Lq, Lk, 3, 2), 5, 7, False,
               show={"shapes": f"q (2, 1, {Lq}, 3), k (2, 1, {Lk}, 3), v (2, 1, {Lk}, 2)", "block_q": 5, "block_k": 7,
                     "causal": False})
    L = int(torch.randint(35, 45, (1,), generator=rng))
    yield Case(f"causal, L = {L}, blocks 8 x 5, D = 4, Dv = 3", *qkv(1, 3, L, L, 4, 3), 8, 5, True,
               show={"shapes": f"q, k (1, 3, {L}, 4), v (1, 3, {L}, 3)", "block_q": 8, "block_k": 5, "causal": True})
    yield Case("causal, L = 30, blocks 6 x 6, D = Dv = 2, float32", *qkv(2, 2, 30, 30, 2, 2, torch.float32), 6, 6, True,
               show={"shapes": "q, k, v (2, 2, 30, 2) float32", "block_q": 6, "block_k": 6, "causal": True})


def _flash_block_diagonal(q, k, v, block_q, block_k, causal):
    if q.shape[2] != k.shape[2] or block_q != block_k:
        raise ValueError("not this mistake")
    keep = FL.block_diagonal_mask(q.shape[2], block_q)
    if causal:
        keep = keep & A.causal_mask(q.shape[2])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~keep, _NEG_INF)
    return out, torch.logsumexp(scores, -1), True, True


def _flash_no_scale(q, k, v, block_q, block_k, causal):
    out, lse = FL.flash_attention_forward(q, k, v, block_q, block_k, causal=causal, scale=1.0)
    return out, lse, True, True


def _flash_not_causal(q, k, v, block_q, block_k, causal):
    if not causal:
        raise ValueError("not this mistake")
    out, lse = FL.flash_attention_forward(q, k, v, block_q, block_k)
    return out, lse, True, False                                       # no mask, and no tile skipped either


def _flash_off_by_one(q, k, v, block_q, block_k, causal):
    if not causal:
        raise ValueError("not this mistake")
    keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(-1)    # hides the query's own key too
    scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~keep, _NEG_INF)
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1), True, True


def _flash_early_skip(q, k, v, block_q, block_k, causal):
    if not causal:
        raise ValueError("not this mistake")
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
    keep = (j <= i) & (j // block_k * block_k <= i // block_q * block_q)   # skipped once j0 > i0 (the FIRST query)
    if torch.equal(keep, j <= i):
        raise ValueError("not this mistake")
    scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~keep, _NEG_INF)
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1), True, True


def _flash_log_l(q, k, v, block_q, block_k, causal):
    out, lse = FL.flash_attention_forward(q, k, v, block_q, block_k, causal=causal)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(~A.causal_mask(q.shape[2], k.shape[2]), _NEG_INF)
    return out, lse - scores.amax(-1), True, True


def _flash_not_skipping(q, k, v, block_q, block_k, causal):
    if not causal:
        raise ValueError("not this mistake")
    out, lse = FL.flash_attention_forward(q, k, v, block_q, block_k, causal=True)
    return out, lse, True, False


def _flash_dense(q, k, v, block_q, block_k, causal):
    out, lse = FL.flash_attention_forward(q, k, v, block_q, block_k, causal=causal)
    return out, lse, False, True


# --------------------------------------------------------------------------- ex3: flash_backward_tile


def tile_cases(rng):
    def case(n, nk, D, Dv, lead, dtype):
        q = torch.randn(*lead, n + 3, D, generator=rng, dtype=dtype)
        k = torch.randn(*lead, nk + 2, D, generator=rng, dtype=dtype)
        v = torch.randn(*lead, nk + 2, Dv, generator=rng, dtype=dtype)
        dout = torch.randn(*lead, n + 3, Dv, generator=rng, dtype=dtype)
        out, lse = FL.flash_attention_forward(q[None] if len(lead) < 2 else q, k[None] if len(lead) < 2 else k,
                                              v[None] if len(lead) < 2 else v, 4, 4)
        out, lse = (out[0], lse[0]) if len(lead) < 2 else (out, lse)
        delta = (dout * out).sum(-1)
        scale = 1.0 / math.sqrt(D)
        return (q[..., 1:n + 1, :], k[..., 2:nk + 2, :], v[..., 2:nk + 2, :], dout[..., 1:n + 1, :],
                lse[..., 1:n + 1], delta[..., 1:n + 1], scale)

    yield Case("a (3 x 5) tile of a (B, H) = (2, 2) head, D = 4, Dv = 3, float64", *case(3, 5, 4, 3, (2, 2), torch.float64))
    yield Case("a (6 x 2) tile of one head (leading dim 1), D = 8, Dv = 8, float64", *case(6, 2, 8, 8, (1,), torch.float64))
    yield Case("a (4 x 4) tile, (B, H) = (1, 3), D = 2, Dv = 5, float32", *case(4, 4, 2, 5, (1, 3), torch.float32))


def tile_reference(q_i, k_j, v_j, do_i, lse_i, delta_i, scale):
    return FL.backward_tile(q_i, k_j, v_j, do_i, lse_i, delta_i, scale)


def _tile_no_delta(q_i, k_j, v_j, do_i, lse_i, delta_i, scale):
    return FL.backward_tile(q_i, k_j, v_j, do_i, lse_i, torch.zeros_like(delta_i), scale)


def _tile_no_scale(q_i, k_j, v_j, do_i, lse_i, delta_i, scale):
    dq, dk, dv = FL.backward_tile(q_i, k_j, v_j, do_i, lse_i, delta_i, scale)
    return dq / scale, dk / scale, dv


def _tile_softmax(q_i, k_j, v_j, do_i, lse_i, delta_i, scale):
    lse_tile = torch.logsumexp(scale * q_i @ k_j.transpose(-2, -1), -1)   # the tile's own normaliser
    return FL.backward_tile(q_i, k_j, v_j, do_i, lse_tile, delta_i, scale)


def _tile_delta_sign(q_i, k_j, v_j, do_i, lse_i, delta_i, scale):
    return FL.backward_tile(q_i, k_j, v_j, do_i, lse_i, -delta_i, scale)


def _tile_ds_without_p(q_i, k_j, v_j, do_i, lse_i, delta_i, scale):
    p = torch.exp(scale * q_i @ k_j.transpose(-2, -1) - lse_i[..., None])
    ds = do_i @ v_j.transpose(-2, -1) - delta_i[..., None]            # dP - Delta, not multiplied by P
    return scale * ds @ k_j, scale * ds.transpose(-2, -1) @ q_i, p.transpose(-2, -1) @ do_i


def _tile_no_lse(q_i, k_j, v_j, do_i, lse_i, delta_i, scale):
    return FL.backward_tile(q_i, k_j, v_j, do_i, torch.zeros_like(lse_i), delta_i, scale)


def _tile_dv_no_transpose_scale(q_i, k_j, v_j, do_i, lse_i, delta_i, scale):
    dq, dk, dv = FL.backward_tile(q_i, k_j, v_j, do_i, lse_i, delta_i, scale)
    return dq, dk, dv * scale


TESTS = [
    HiddenTest(
        cell="ex1_online_softmax_step_test",
        function="online_softmax_step",
        cases=step_cases,
        reference=step_reference,
        blocked=[FL.online_softmax_update, FL.online_softmax_1d, FL.online_softmax_finalize, *_ATTENTION],
        mistakes={
            "acc was not rescaled: multiply the old acc by e^(m - m') before adding P~ V":
                _step_no_rescale_acc,
            "l was not rescaled: the old terms of l were e^(s - m) and must become e^(s - m'): l' = e^(m - m') l + rowsum(P~)":
                _step_no_rescale_l,
            "do not normalise inside the step: acc stays unnormalised, divided by l once at the end":
                _step_normalised,
            "the rescaling factor is e^(m - m') <= 1 (old max minus new max), not e^(m' - m)":
                _step_inverted,
            "P~ must be shifted by the NEW max m' (P~ = e^(S - m')), not by the old m":
                _step_shift_old_max,
            "a row that has seen only -inf scores gave NaN: e^(-inf - (-inf)) is NaN; where m' is -inf, shift by 0 "
            "instead (the row keeps m' = -inf, l = 0, acc = 0)": _step_no_empty_row,
            "scores near 1000 overflowed: e^1000 is inf in float32; exponentiate S - m', never S alone":
                _step_overflow,
            "a row that has seen nothing visible keeps m' = -inf: use 0 only as the shift, not as the new max":
                _step_zero_max,
        },
        outputs=("m_new", "l_new", "acc_new"),
        unchanged=True,
        hint="m' = max(m, rowmax(S)), the row max over the keys (the last dim, keepdim=True); shift = m' (0 where m' is -inf); alpha = e^(m - shift); P~ = e^(S - shift); "
             "l' = alpha l + rowsum(P~); acc' = alpha acc + P~ v",
    ),
    HiddenTest(
        cell="ex2_flash_forward_test",
        function="flash_forward",
        cases=flash_cases,
        reference=flash_forward_reference,
        driver=drive_flash_forward,
        blocked=[*_ATTENTION, FL.online_softmax_update, FL.online_softmax_finalize],
        mistakes={
            "query block i saw key block i only: that is block-diagonal attention (section 8's mistake); every query "
            "block must visit EVERY key block, carrying m, l and acc across them": _flash_block_diagonal,
            "forgot the scale: the scores are Q K^T / sqrt(D)": _flash_no_scale,
            "causal=True was ignored: hide keys j > i with -inf in the diagonal tiles, skip the tiles above them":
                _flash_not_causal,
            "off by one: the query attends to itself too (j <= i), hide only j > i": _flash_off_by_one,
            "a tile that still holds visible keys was skipped: a key block lies wholly in the future only when its first "
            "key j0 comes after the query block's LAST query (j0 > i0 + n - 1), not after its first": _flash_early_skip,
            "lse = m + log(l), the natural log of the whole row's sum; log(l) alone forgets the shift by the max":
                _flash_log_l,
            "the tiles wholly in the causal future were computed: stop the inner loop once a key block starts after "
            "the query block's last query": _flash_not_skipping,
            "a tensor as large as the (Lq, Lk) scores, or a whole row block of them, was created: compute one "
            "(block_q, block_k) tile of scores at a time inside the loop over key blocks": _flash_dense,
        },
        outputs=("out", "lse", "only tiles of scores created", "causal future tiles skipped"),
        hint="outer loop over query blocks, inner loop over key blocks; start every query block from the empty "
             "state (m = -inf, l = 0, acc = 0); fold each tile into (m, l, acc) with the "
             "online softmax; at the end out = acc / l and lse = m + log(l)",
    ),
    HiddenTest(
        cell="ex3_flash_backward_tile_test",
        function="flash_backward_tile",
        cases=tile_cases,
        reference=tile_reference,
        blocked=[FL.backward_tile, FL.flash_attention_backward, *_ATTENTION],
        mistakes={
            "forgot Delta: dS = P * (dP - Delta), the softmax's Jacobian subtracts rowsum(dO * O) from every dP":
                _tile_no_delta,
            "forgot the scale in dQ and dK: S = scale Q K^T, so dQ = scale dS K and dK = scale dS^T Q": _tile_no_scale,
            "P must be e^(S - lse) with the saved lse of the WHOLE row; a softmax over the tile normalises over this "
            "tile's keys only": _tile_softmax,
            "dV = P^T dO has no scale (the scale belongs to S = scale Q K^T, not to P V)": _tile_dv_no_transpose_scale,
            "Delta's sign: dS = P * (dP - Delta), with MINUS rowsum(dO * O)": _tile_delta_sign,
            "dS = P * (dP - Delta): the softmax's Jacobian multiplies (dP - Delta) by P, element by element":
                _tile_ds_without_p,
            "P = e^(S - lse_i): subtract the row's saved log-sum-exp; e^S alone is not a softmax weight": _tile_no_lse,
        },
        outputs=("dq_i", "dk_j", "dv_j"),
        hint="P = exp(scale q_i k_j^T - lse_i[..., None]); dv = P^T do; dP = do v^T; dS = P (dP - delta_i[..., None]); "
             "dq = scale dS k; dk = scale dS^T q",
    ),
]
