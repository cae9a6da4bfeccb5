"""flash.py: the online softmax against torch.softmax, the tiled forward and the recomputing
backward against F.scaled_dot_product_attention (values and gradients, causal and not, lengths
that are not multiples of the block, Lq != Lk, masks, float64 gradcheck), causal tile skipping
counted on the matrix products actually run, the block-diagonal mistake's error, FLOP and
memory-traffic counts, peak memory as counted tensor bytes, and the errors for bad input.

No test times anything: speed is measured by benchmarks/attention.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from transformer_lab import attention as A
from transformer_lab import flash as FL


def _qkv(B, H, Lq, Lk, D, Dv=None, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, Lq, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, Lk, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, Lk, Dv, generator=g, dtype=dtype)
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def _dense(q, k, v, causal=False, mask=None, scale=None):
    """SDPA with the library's causal convention (queries are the last Lq positions); a row
    with no visible key gets a zero output, as in the library, instead of SDPA's NaN."""
    Lq, Lk = q.shape[2], k.shape[2]
    if causal:
        cm = A.causal_mask(Lq, Lk)
        mask = cm if mask is None else (mask & cm if mask.dtype == torch.bool
                                        else mask.masked_fill(~cm, float("-inf")))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if mask is not None:
        m = mask if mask.dtype == torch.bool else mask > float("-inf")
        visible = torch.broadcast_to(m, (*q.shape[:3], Lk)).any(-1, keepdim=True)
        out = torch.where(visible, out, torch.zeros((), dtype=out.dtype))
    return out


# ---------------------------------------------------------------------------------------
# The online softmax
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [1, 3, 4, 13, 100])
def test_online_softmax_1d_equals_softmax(block_size):
    g = torch.Generator().manual_seed(block_size)
    x = torch.randn(13, generator=g, dtype=torch.float64) * 5
    x[2] = 40.0  # a large value late enough to force a rescaling
    got, trace = FL.online_softmax_1d(x, block_size, trace=True)
    torch.testing.assert_close(got, torch.softmax(x, 0), rtol=1e-12, atol=1e-15)
    assert len(trace) == math.ceil(13 / block_size)
    maxima = [m for m, _ in trace]
    assert maxima == sorted(maxima)  # the running max never decreases
    assert trace[-1][0] == 40.0
    # the final running sum is sum exp(x - max), exactly as in the two-pass softmax
    assert math.isclose(trace[-1][1], float(torch.exp(x - x.max()).sum()), rel_tol=1e-12)


def test_online_softmax_1d_edge_rows():
    x = torch.tensor([float("-inf"), 1.0, float("-inf"), 2.0], dtype=torch.float64)
    torch.testing.assert_close(FL.online_softmax_1d(x, 1), torch.softmax(x, 0))  # -inf first
    empty = torch.full((5,), float("-inf"))
    assert torch.equal(FL.online_softmax_1d(empty, 2), torch.zeros(5))  # no NaN
    big = torch.tensor([1000.0, 1001.0, 999.0])  # exp(1000) overflows without the shift
    torch.testing.assert_close(FL.online_softmax_1d(big, 1), torch.softmax(big, 0))


def test_online_softmax_update_blocks_give_softmax_times_v():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 5, 11, generator=g, dtype=torch.float64) * 3  # (B, H, n, Lk)
    v = torch.randn(2, 3, 11, 4, generator=g, dtype=torch.float64)
    state = FL.online_softmax_init((2, 3, 5), 4, dtype=torch.float64)
    for j0 in range(0, 11, 4):
        before = [t.clone() for t in state]
        new = FL.online_softmax_update(state, s[..., j0:j0 + 4], v[..., j0:j0 + 4, :])
        assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))  # arguments left alone
        state = new
    out, lse = FL.online_softmax_finalize(state)
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    # after the last block: m is the row max, l = sum exp(s - m)
    torch.testing.assert_close(state.m.squeeze(-1), s.amax(-1))
    torch.testing.assert_close(state.l.squeeze(-1), torch.exp(s - s.amax(-1, keepdim=True)).sum(-1))


def test_online_softmax_rows_without_keys():
    s = torch.full((1, 2, 3), float("-inf"), dtype=torch.float64)
    s[0, 0, 1] = 0.5
    v = torch.ones(1, 3, 2, dtype=torch.float64)
    state = FL.online_softmax_update(FL.online_softmax_init((1, 2), 2, dtype=torch.float64), s, v)
    out, lse = FL.online_softmax_finalize(state)
    assert torch.equal(out[0, 1], torch.zeros(2)) and lse[0, 1] == float("-inf")
    torch.testing.assert_close(out[0, 0], torch.ones(2, dtype=torch.float64))
    assert not torch.isnan(out).any()


# ---------------------------------------------------------------------------------------
# Forward: equal to SDPA
# ---------------------------------------------------------------------------------------

CASES = [  # (Lq, Lk, D, Dv, block_q, block_k)
    (32, 32, 8, 8, 8, 8),  # lengths multiples of the blocks
    (37, 37, 8, 8, 8, 16),  # not multiples: the last tiles are smaller
    (37, 37, 8, 5, 5, 7),  # Dv != D
    (20, 45, 8, 8, 6, 9),  # Lq < Lk (queries are the last 20 positions when causal)
    (45, 20, 4, 6, 16, 3),  # Lq > Lk: causal leaves the first 25 queries without keys
    (9, 9, 8, 8, 64, 64),  # blocks longer than the sequence
    (1, 13, 8, 8, 1, 1),  # one query, tiles of one
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Lq,Lk,D,Dv,bq,bk", CASES)
def test_forward_equals_sdpa(Lq, Lk, D, Dv, bq, bk, causal):
    q, k, v = _qkv(2, 3, Lq, Lk, D, Dv, seed=Lq + Lk)
    out, lse = FL.flash_attention_forward(q, k, v, bq, bk, causal=causal)
    torch.testing.assert_close(out, _dense(q, k, v, causal), rtol=1e-12, atol=1e-12)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    if causal:
        scores = scores.masked_fill(~A.causal_mask(Lq, Lk), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-12, atol=1e-12)
    out1, lse1 = FL.flash_attention_forward_fa1(q, k, v, bq, bk, causal=causal)  # FA-1 order
    torch.testing.assert_close(out1, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse1, lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_float32_exact_to_1e5_default_blocks(causal):
    q, k, v = _qkv(1, 4, 700, 700, 64, dtype=torch.float32, seed=3)
    out = FL.flash_attention(q, k, v, causal=causal)  # default (automatic) tiles
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert (out - ref).abs().max() < 1e-5
    assert out.dtype == torch.float32


def test_auto_block_q():
    assert FL.auto_block_q(8192, 64) == FL.DEFAULT_BLOCK_Q == 256
    assert FL.auto_block_q(1024, 64) == 128  # a (128, 512) tile holds as many numbers as the output
    assert FL.auto_block_q(64, 64) == 64  # bk = 64: 64 x 64 = the output
    assert FL.auto_block_q(10, 2) == 16  # never below 16
    for L in (100, 1000, 5000):
        bq = FL.auto_block_q(L, 64)
        assert bq * min(FL.DEFAULT_BLOCK_K, L) <= max(L * 64, 16 * min(512, L))


def test_masks_boolean_and_additive():
    q, k, v = _qkv(2, 3, 19, 23, 8, seed=5)
    g = torch.Generator().manual_seed(6)
    keep = torch.rand(2, 1, 19, 23, generator=g) > 0.5  # broadcast over heads
    keep[0, 0, 3] = False  # a row with no visible key
    out = FL.flash_attention(q, k, v, mask=keep, block_q=4, block_k=5)
    torch.testing.assert_close(out, _dense(q, k, v, mask=keep))
    assert torch.equal(out[0, :, 3], torch.zeros(3, 8, dtype=torch.float64))
    bias = torch.randn(19, 23, generator=g, dtype=torch.float64)  # (Lq, Lk) additive
    out = FL.flash_attention(q, k, v, mask=bias, causal=True, block_q=4, block_k=5)
    torch.testing.assert_close(out, _dense(q, k, v, causal=True, mask=bias))
    pad = A.padding_mask([23, 7])  # (B, 1, 1, Lk)
    torch.testing.assert_close(FL.flash_attention(q, k, v, mask=pad, block_k=4), _dense(q, k, v, mask=pad))


def test_scale_and_large_scores():
    q, k, v = _qkv(1, 2, 17, 17, 8, seed=7)
    torch.testing.assert_close(FL.flash_attention(q, k, v, scale=0.3, block_q=4, block_k=4),
                               F.scaled_dot_product_attention(q, k, v, scale=0.3))
    q32, k32, v32 = (t.float() * 30 for t in (q, k, v))  # scores in the thousands: exp overflows
    out = FL.flash_attention(q32, k32, v32, block_q=4, block_k=4)
    ref = F.scaled_dot_product_attention(q32.double(), k32.double(), v32.double())
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() < 1e-3 * v32.abs().max()


def test_half_precision_computed_in_float32():
    q, k, v = _qkv(1, 2, 40, 40, 16, dtype=torch.bfloat16, seed=8)
    out = FL.flash_attention(q, k, v, causal=True, block_q=16, block_k=16)
    assert out.dtype == torch.bfloat16
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert (out.float() - ref).abs().max() < 2e-2


def test_empty_lengths():
    q, k, v = _qkv(1, 2, 0, 5, 4)
    assert FL.flash_attention(q, k, v).shape == (1, 2, 0, 4)
    q, k, v = _qkv(1, 2, 3, 0, 4)
    out, lse = FL.flash_attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros(1, 2, 3, 4, dtype=torch.float64))
    assert (lse == float("-inf")).all()


def test_forward_functions_carry_no_autograd_history():
    q, k, v = _qkv(1, 1, 6, 6, 4, grad=True)
    out, lse = FL.flash_attention_forward(q, k, v, 2, 2)
    assert not out.requires_grad and not lse.requires_grad
    with torch.inference_mode():  # as the benchmark calls it
        out = FL.flash_attention(q.detach(), k.detach(), v.detach(), causal=True)
    torch.testing.assert_close(out, _dense(q.detach(), k.detach(), v.detach(), causal=True))


# ---------------------------------------------------------------------------------------
# Backward: gradients equal SDPA's; gradcheck
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Lq,Lk,D,Dv,bq,bk", CASES[1:5])
def test_gradients_equal_sdpa(Lq, Lk, D, Dv, bq, bk, causal):
    q, k, v = _qkv(2, 2, Lq, Lk, D, Dv, seed=11 + Lq, grad=True)
    dout = torch.randn(2, 2, Lq, Dv, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    got = torch.autograd.grad(FL.flash_attention(q, k, v, causal=causal, block_q=bq, block_k=bk),
                              (q, k, v), dout)
    want = torch.autograd.grad(_dense(q, k, v, causal), (q, k, v), dout)
    for name, a, b in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"d{name}")


def test_backward_function_and_delta_identity():
    """flash_attention_backward from (out, lse) alone; D_i = rowsum(dO * O) = rowsum(P * dP)."""
    q, k, v = _qkv(1, 2, 13, 11, 4, 3, seed=13, grad=True)
    dout = torch.randn(1, 2, 13, 3, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    out, lse = FL.flash_attention_forward(q, k, v, 4, 3, causal=True)
    dq, dk, dv = FL.flash_attention_backward(q, k, v, out, lse, dout, 4, 3, causal=True)
    want = torch.autograd.grad(_dense(q, k, v, causal=True), (q, k, v), dout)
    for a, b in zip((dq, dk, dv), want, strict=True):
        torch.testing.assert_close(a, b)
    scores = (q @ k.transpose(-2, -1) / 2).masked_fill(~A.causal_mask(13, 11), float("-inf"))
    P = torch.softmax(scores, -1).detach().nan_to_num(0.0)  # rows 0, 1 see no key
    dP = dout @ v.detach().transpose(-2, -1)
    torch.testing.assert_close((dout * out).sum(-1), (P * dP).sum(-1))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(causal):
    q, k, v = _qkv(1, 2, 7, 9, 4, 3, seed=15, grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: FL.flash_attention(q, k, v, causal=causal, block_q=3, block_k=4), (q, k, v))


def test_gradients_with_mask_and_empty_rows():
    q, k, v = _qkv(1, 2, 10, 6, 4, seed=16, grad=True)  # causal, Lq > Lk: 4 rows see nothing
    out = FL.flash_attention(q, k, v, causal=True, block_q=3, block_k=2)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert torch.equal(q.grad[:, :, :4], torch.zeros(1, 2, 4, 4, dtype=torch.float64))
    keep = torch.rand(10, 6, generator=torch.Generator().manual_seed(17)) > 0.4
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    got = torch.autograd.grad(FL.flash_attention(q, k, v, mask=keep, block_q=4, block_k=4).sum(), (q, k, v))
    want = torch.autograd.grad(_dense(q, k, v, mask=keep).sum(), (q, k, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------
# Tiles, causal skipping and counting
# ---------------------------------------------------------------------------------------

def test_tile_plan_causal_counts():
    plan = FL.tile_plan(1024, block_q=128, block_k=128, causal=True)  # T = 8 blocks each way
    T = 8
    assert plan.shape == (T, T)
    assert int((plan == FL.SKIPPED).sum()) == T * (T - 1) // 2  # above the diagonal
    assert int((plan == FL.MASKED).sum()) == T  # on it
    assert int((plan == FL.FULL).sum()) == T * (T - 1) // 2  # below it
    assert bool((FL.tile_plan(1024, block_q=128, block_k=128) == FL.FULL).all())
    # Lq < Lk: queries are the last positions, so fewer tiles are skipped
    plan = FL.tile_plan(4, 8, block_q=2, block_k=2, causal=True)
    assert plan.tolist() == [[2, 2, 1, 0], [2, 2, 2, 1]]
    # rectangular tiles, a length not divisible by the block
    plan = FL.tile_plan(10, block_q=4, block_k=3, causal=True)
    assert plan.tolist() == [[1, 1, 0, 0], [2, 1, 1, 0], [2, 2, 2, 1]]


@pytest.mark.parametrize("causal", [False, True])
def test_flash_flops_count_the_matmuls_actually_run(causal):
    """FlopCounterMode counts the baddbmm calls the forward makes: skipped tiles cost nothing."""
    L, D, bq, bk = 96, 8, 16, 32
    q, k, v = _qkv(1, 2, L, L, D, dtype=torch.float32, seed=18)
    with FlopCounterMode(display=False) as counter:
        FL.flash_attention_forward(q, k, v, bq, bk, causal=causal)
    counted = counter.get_total_flops()
    assert counted == FL.flash_flops(L, D, causal=causal, block_q=bq, block_k=bk, H=2)
    dense = FL.attention_flops(L, D, H=2)
    if causal:
        visible = FL.attention_flops(L, D, causal=True, H=2)
        assert visible < counted < 0.75 * dense  # about half the tiles are skipped
    else:
        assert counted == dense  # every score is still computed


def test_attention_flops_are_quadratic_memory_linear():
    for L in (512, 1024, 4096):
        assert FL.attention_flops(2 * L, 64) == 4 * FL.attention_flops(L, 64)
        assert FL.flash_flops(2 * L, 64) == 4 * FL.flash_flops(L, 64)
    assert FL.attention_flops(10, 4, Lk=6, Dv=3, B=2, H=5) == 2 * 2 * 5 * 10 * 6 * (4 + 3)
    # causal: query i sees i + 1 keys (sum = L (L + 1) / 2); Lq > Lk leaves empty rows
    assert FL.attention_flops(8, 1, causal=True) == 2 * 2 * (8 * 9 // 2)
    assert FL.attention_flops(3, 1, Lk=5, causal=True) == 2 * 2 * (3 + 4 + 5)
    assert FL.attention_flops(5, 1, Lk=3, causal=True) == 2 * 2 * (1 + 2 + 3)


def test_memory_traffic_formulas():
    Lq = Lk = 1024
    D = 64
    std = FL.memory_traffic(Lq, D, algorithm="standard")
    assert std == 4 * Lq * D + 4 * Lq * Lk
    fa2 = FL.memory_traffic(Lq, D, block_q=128, block_k=128, algorithm="fa2")
    assert fa2 == Lq * (2 * D + 1) + 8 * Lk * 2 * D  # T_r = 8 passes over K and V
    fa1 = FL.memory_traffic(Lq, D, block_q=128, block_k=128, algorithm="fa1")
    assert fa1 == Lk * 2 * D + 8 * Lq * (3 * D + 4)  # T_c = 8 round trips of O, l, m
    assert fa2 < fa1 < std
    # standard attention's traffic grows 4x per doubling at long L; flash's with L^2 D / block
    assert FL.memory_traffic(8192, D, algorithm="standard") / FL.memory_traffic(4096, D, algorithm="standard") > 3.9


def test_peak_memory_counted_bytes_linear_for_flash_quadratic_for_dense():
    peaks = {}
    for L in (256, 512, 1024):
        q, k, v = _qkv(1, 2, L, L, 16, dtype=torch.float32, seed=L)
        peaks[L] = (FL.peak_memory(lambda q=q, k=k, v=v: FL.flash_attention(q, k, v, block_q=64, block_k=64)),
                    FL.peak_memory(lambda q=q, k=k, v=v: A.scaled_dot_product_attention(q, k, v)))
    for L in (256, 512):
        flash_growth = peaks[2 * L][0] - peaks[L][0]
        out_growth = 2 * L * 16 * 4 + 2 * L * 4  # the output (B H L Dv) and lse (B H L) only
        assert flash_growth == out_growth
        assert peaks[2 * L][1] / peaks[L][1] > 3.5  # the (L, L) scores and weights
    scores = 2 * 1024 * 1024 * 4
    assert peaks[1024][1] >= scores and peaks[1024][0] < scores / 10
    assert FL.peak_memory(lambda: torch.zeros(1000)) == 4000  # counts what the call makes
    x = torch.zeros(1000)
    assert FL.peak_memory(lambda: x.add_(1)) == 0  # an in-place op allocates nothing


# ---------------------------------------------------------------------------------------
# The common mistake: block-diagonal "flash" attention
# ---------------------------------------------------------------------------------------

def test_block_diagonal_attention_is_local_attention_not_exact():
    q, k, v = _qkv(1, 4, 64, 64, 16, seed=19)
    wrong = FL.block_diagonal_attention(q, k, v, 16)
    local = F.scaled_dot_product_attention(q, k, v, attn_mask=FL.block_diagonal_mask(64, 16))
    torch.testing.assert_close(wrong, local)  # it is exactly block-diagonal attention ...
    exact = F.scaled_dot_product_attention(q, k, v)
    error = (wrong - exact).abs().max()
    assert error > 0.3  # ... and far from exact attention
    assert (FL.flash_attention(q, k, v, block_q=16, block_k=16) - exact).abs().max() < 1e-12
    torch.testing.assert_close(FL.block_diagonal_attention(q, k, v, 64), exact)  # one block: exact
    m = FL.block_diagonal_mask(5, 2)
    assert m.tolist() == [[True, True, False, False, False], [True, True, False, False, False],
                          [False, False, True, True, False], [False, False, True, True, False],
                          [False, False, False, False, True]]


# ---------------------------------------------------------------------------------------
# Bad input: each error says what was expected and what came
# ---------------------------------------------------------------------------------------

def test_bad_block_sizes():
    q, k, v = _qkv(1, 1, 4, 4, 2)
    with pytest.raises(ValueError, match=r"block_q must be a positive int.*got 0"):
        FL.flash_attention(q, k, v, block_q=0)
    with pytest.raises(ValueError, match=r"block_k must be a positive int.*got -3"):
        FL.flash_attention_forward(q, k, v, 4, -3)
    with pytest.raises(TypeError, match=r"block_q must be a positive int.*float 2.5"):
        FL.flash_attention(q, k, v, block_q=2.5)
    with pytest.raises(TypeError, match=r"block_k must be a positive int.*bool True"):
        FL.flash_attention(q, k, v, block_k=True)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        FL.online_softmax_1d(torch.randn(4), 0)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        FL.block_diagonal_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="block_q must be a positive int"):
        FL.tile_plan(8, block_q=0)


def test_bad_inputs_named():
    q, k, v = _qkv(1, 2, 4, 6, 3)
    with pytest.raises(ValueError, match=r"q and k must have the same head_dim"):
        FL.flash_attention(q, k[..., :2], v)
    with pytest.raises(ValueError, match=r"k and v must agree"):
        FL.flash_attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match=r"4-D tensor"):
        FL.flash_attention(q[0], k[0], v[0])
    with pytest.raises(TypeError, match=r"one dtype"):
        FL.flash_attention(q, k.float(), v)
    with pytest.raises(TypeError, match=r"causal must be True or False; got str"):
        FL.flash_attention(q, k, v, causal="yes")
    with pytest.raises(ValueError, match=r"mask must broadcast to \(1, 2, 4, 6\); got \(4, 5\)"):
        FL.flash_attention(q, k, v, mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask that requires grad"):
        FL.flash_attention(q, k, v, mask=torch.zeros(4, 6, dtype=torch.float64, requires_grad=True))
    with pytest.raises(ValueError, match=r"needs Lq == Lk"):
        FL.block_diagonal_attention(q, k, v, 2)
    with pytest.raises(ValueError, match=r"1-D floating-point tensor"):
        FL.online_softmax_1d(torch.randn(2, 3), 2)
    with pytest.raises(ValueError, match=r"algorithm must be 'standard', 'fa1' or 'fa2'; got 'fa3'"):
        FL.memory_traffic(8, 4, algorithm="fa3")
    with pytest.raises(ValueError, match=r"method must be 'tensors', 'rss' or 'cuda'"):
        FL.peak_memory(lambda: None, method="gpu")
    with pytest.raises(TypeError, match=r"fn must be a callable"):
        FL.peak_memory(3)
    with pytest.raises(ValueError, match=r"Lq must be >= 0; got -1"):
        FL.attention_flops(-1, 4)
    out, lse = FL.flash_attention_forward(q, k, v)
    with pytest.raises(ValueError, match=r"dout must have shape \(1, 2, 4, 3\)"):
        FL.flash_attention_backward(q, k, v, out, lse, out[..., :2])


def test_backward_tile_terms_sum_to_the_gradients():
    q, k, v = _qkv(2, 1, 9, 10, 4, 3, seed=20, grad=True)
    dout = torch.randn(2, 1, 9, 3, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    out, lse = FL.flash_attention_forward(q, k, v, 4, 5)
    delta = (dout * out).sum(-1)  # D_i = rowsum(dO * O)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i0 in range(0, 9, 4):
        for j0 in range(0, 10, 5):
            i, j = slice(i0, i0 + 4), slice(j0, j0 + 5)
            a, b, c = FL.backward_tile(q[:, :, i].detach(), k[:, :, j].detach(), v[:, :, j].detach(),
                                       dout[:, :, i], lse[:, :, i], delta[:, :, i])
            dq[:, :, i] += a
            dk[:, :, j] += b
            dv[:, :, j] += c
    want = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), dout)
    for a, b in zip((dq, dk, dv), want, strict=True):
        torch.testing.assert_close(a, b)


def test_largest_allocation_sees_the_score_matrix():
    q, k, v = _qkv(1, 2, 40, 48, 4, dtype=torch.float32)
    _, dense, shape = FL.largest_allocation(lambda: A.scaled_dot_product_attention(q, k, v))
    assert dense == 2 * 40 * 48 and math.prod(shape) == dense  # the (Lq, Lk) scores of 2 heads
    out, tiled, _ = FL.largest_allocation(lambda: FL.flash_attention_forward(q, k, v, 8, 8))
    assert tiled <= 2 * 48 * 4  # the inputs' size: one tile is 2 x 8 x 8
    assert FL.largest_allocation(lambda: q.expand(3, 2, 40, 4))[1] == 0  # a view makes nothing


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("causal", [False, True])
def test_query_blocks_in_parallel_threads(two_threads, causal, monkeypatch):
    """With 2 threads the query blocks are dealt to 2 Python threads (FA-2's parallelism over
    the sequence): the same numbers, under inference_mode too, and the setting restored."""
    q, k, v = _qkv(2, 2, 77, 77, 8, dtype=torch.float32, seed=30)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert FL._workers(10) == 2
    monkeypatch.setattr(FL, "_PARALLEL_SCORES", 0)  # parallel even for this small case
    calls = []
    parallel = FL._forward_fa2_parallel
    monkeypatch.setattr(FL, "_forward_fa2_parallel", lambda *a: calls.append(a[-1]) or parallel(*a))
    with torch.inference_mode():
        out, lse = FL.flash_attention_forward(q, k, v, 16, 8, causal=causal)
    assert calls == [2]  # two threads shared the 5 query blocks
    assert (out - ref).abs().max() < 1e-5
    serial = FL._forward_fa2(q, k, v, 16, 8, causal, 1 / math.sqrt(8), None, torch.float32)
    torch.testing.assert_close(out.reshape(4, 77, 8), serial[0])
    torch.testing.assert_close(lse.reshape(4, 77, 1), serial[1])
    assert torch.get_num_threads() == 2
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    FL.flash_attention(qg, kg, vg, causal=causal, block_q=16, block_k=8).sum().backward()
    assert torch.isfinite(qg.grad).all()


def test_counting_modes_run_in_one_thread(two_threads):
    """Modes are per thread: under FlopCounterMode (or peak_memory) the forward stays in the
    calling thread, so every matrix product is counted."""
    q, k, v = _qkv(1, 2, 96, 96, 8, dtype=torch.float32, seed=31)
    with FlopCounterMode(display=False) as counter:
        assert FL._workers(10) == 1
        FL.flash_attention_forward(q, k, v, 16, 32, causal=True)
    assert counter.get_total_flops() == FL.flash_flops(96, 8, causal=True, block_q=16, block_k=32, H=2)
    assert FL._workers(1) == 1  # one query block: nothing to share


def test_memory_counters_do_not_import_dynamo():
    """The course's TorchDispatchMode counters (flash, lsh, lowrank, ternary) run unwrapped: by
    default PyTorch wraps a mode in torch._disable_dynamo, whose first call imports torch._dynamo
    (about 800 modules, 1.7-3.5 s), paid by every graded notebook that counts memory once."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from transformer_lab import flash, lowrank, lsh, ternary\n"
        "q = torch.randn(1, 1, 16, 8)\n"
        "flash.peak_memory(lambda: flash.flash_attention(q, q, q))\n"
        "flash.largest_allocation(lambda: flash.flash_attention(q, q, q))\n"
        "lsh.largest_intermediate(lambda: q @ q.transpose(-1, -2))\n"
        "lowrank.largest_tensor(lambda: q @ q.transpose(-1, -2))\n"
        "ternary.count_multiplications(lambda: q @ q.transpose(-1, -2))\n"
        "assert 'torch._dynamo' not in sys.modules, 'a counter imported torch._dynamo'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
