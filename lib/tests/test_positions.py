"""Tests for transformer_lab.positions: each checks a property from the papers.

Expected values are written out by hand (formulas, the ALiBi recipe, T5 buckets),
never produced by calling the function under test.
"""

import math

import pytest
import torch

from transformer_lab import positions as P
from transformer_lab.positions import (
    POSITION_SCHEMES,
    ALiBi,
    RoPE,
    ShawRelative,
    T5Bias,
    XLRelative,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    make_positions,
    relative_positions,
    rope_angles,
    shaw_clip,
    sinusoidal_encoding,
    t5_bucket,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


# ------------------------------------------------------------------ sinusoidal

def test_sinusoidal_hand_computed_points():
    pe = sinusoidal_encoding(5, 4, dtype=torch.float64)
    assert pe.shape == (5, 4)
    # d_model=4: frequencies 1 and 1/10000^(2/4) = 1/100; columns sin, cos, sin, cos
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64))
    expected_p1 = [math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)]
    torch.testing.assert_close(pe[1], torch.tensor(expected_p1, dtype=torch.float64))
    assert pe[3, 2].item() == pytest.approx(math.sin(3 / 100), abs=1e-12)
    pe6 = sinusoidal_encoding(8, 6, base=10000.0, dtype=torch.float64)
    assert pe6[7, 5].item() == pytest.approx(math.cos(7 / 10000 ** (4 / 6)), abs=1e-12)
    assert pe6[7, 4].item() == pytest.approx(math.sin(7 / 10000 ** (4 / 6)), abs=1e-12)
    # a different base changes the frequencies: PE[1, 2] = sin(1 / base^(2/4))
    pe_b = sinusoidal_encoding(2, 4, base=16.0, dtype=torch.float64)
    assert pe_b[1, 2].item() == pytest.approx(math.sin(1 / 4.0), abs=1e-12)


def test_sinusoidal_shift_is_a_fixed_rotation_per_pair():
    d, k = 8, 5
    pe = sinusoidal_encoding(64, d, dtype=torch.float64)
    for i in range(d // 2):
        w = 1.0 / 10000 ** (2 * i / d)
        c, s = math.cos(k * w), math.sin(k * w)
        M = torch.tensor([[c, s], [-s, c]], dtype=torch.float64)  # independent of p
        pair = pe[:, 2 * i:2 * i + 2]  # (64, 2): (sin, cos)
        torch.testing.assert_close(pair[k:], pair[:-k] @ M.T, atol=1e-12, rtol=0)


def test_sinusoidal_module_adds_table_any_length():
    s = make_positions("sinusoidal", d_model=6, n_heads=2, max_len=4)
    x = randn(2, 20, 6)
    torch.testing.assert_close(s.embed(x) - x, sinusoidal_encoding(20, 6, dtype=torch.float64).expand(2, 20, 6))


# ------------------------------------------------------------------ RoPE

def _rope_score(q, k, m, n, D, base=10000.0):
    """Put q at position m and k at position n, rotate, return <q', k'>."""
    L = max(m, n) + 1
    Q = torch.zeros(L, D, dtype=torch.float64)
    K = torch.zeros(L, D, dtype=torch.float64)
    Q[m], K[n] = q, k
    return (apply_rope(Q, base=base)[m] @ apply_rope(K, base=base)[n]).item()


def test_rope_score_depends_only_on_offset():
    D = 8
    q, k = randn(D, seed=1), randn(D, seed=2)
    for offset in (2, -3, 0):
        pairs = [(m, m - offset) for m in (3, 7, 12, 40, 300) if m - offset >= 0]
        scores = [_rope_score(q, k, m, n, D) for m, n in pairs]
        for s in scores[1:]:
            assert s == pytest.approx(scores[0], abs=1e-10)
    # and it really does depend on the offset (not a constant)
    assert abs(_rope_score(q, k, 5, 3, D) - _rope_score(q, k, 5, 1, D)) > 1e-3


def test_rope_interleaved_pairs_convention():
    # RoFormer eq. (34): the pair (x0, x1) turns by p * theta_0 = p; (x2, x3) by p * base^(-2/D)
    D, p = 4, 3
    x = torch.zeros(p + 1, D, dtype=torch.float64)
    x[p, 0] = 1.0
    x[p, 2] = 1.0
    out = apply_rope(x)[p]
    t1 = p * 10000 ** (-2 / D)
    expected = torch.tensor([math.cos(p), math.sin(p), math.cos(t1), math.sin(t1)], dtype=torch.float64)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    cos, sin = rope_angles(p + 1, D, dtype=torch.float64)
    assert cos.shape == sin.shape == (p + 1, D // 2)
    assert sin[p, 1].item() == pytest.approx(math.sin(t1), abs=1e-12)


def test_rope_norm_preserving_offset_and_position_zero():
    x = randn(2, 3, 10, 8)
    y = apply_rope(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=0)
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :], atol=0, rtol=0)  # rotation by 0
    assert not torch.allclose(y[..., 1:, :], x[..., 1:, :])
    # offset = slicing a longer sequence
    torch.testing.assert_close(apply_rope(x[..., 4:, :], offset=4), y[..., 4:, :], atol=1e-12, rtol=0)


def test_rope_module_aligns_query_block_with_last_keys():
    rope = RoPE(8)
    q, k = randn(1, 2, 10, 8, seed=3), randn(1, 2, 10, 8, seed=4)
    q_full, k_full = rope.rotate(q, k)
    q_tail, k2 = rope.rotate(q[..., -3:, :], k)
    torch.testing.assert_close(q_tail, q_full[..., -3:, :])
    torch.testing.assert_close(k2, k_full)
    assert rope.score_bias(q, k) is None and rope.value_term(q) is None


def test_rope_odd_head_dim_errors():
    with pytest.raises(ValueError, match=r"even.*got 7"):
        RoPE(7)
    with pytest.raises(ValueError, match=r"even.*\(2, 5, 7\)"):
        apply_rope(torch.zeros(2, 5, 7))
    with pytest.raises(ValueError, match="even"):
        rope_angles(4, 5)
    with pytest.raises(ValueError, match="divisible"):
        make_positions("rope", d_model=10, n_heads=4)


# ------------------------------------------------------------------ ALiBi

def test_alibi_slopes_powers_of_two():
    torch.testing.assert_close(alibi_slopes(8, dtype=torch.float64),
                               torch.tensor([1 / 2 ** h for h in range(1, 9)], dtype=torch.float64))
    torch.testing.assert_close(alibi_slopes(16, dtype=torch.float64),
                               torch.tensor([2 ** (-0.5 * h) for h in range(1, 17)], dtype=torch.float64))
    assert alibi_slopes(1).tolist() == [2.0 ** -8]


def test_alibi_slopes_not_power_of_two_follow_papers_recipe():
    # n=12: the 8 slopes for n0=8 (2^-1..2^-8), then the 1st, 3rd, 5th, 7th slopes of
    # the n=16 sequence 2^(-0.5 h): h = 1, 3, 5, 7
    expected_12 = [2.0 ** -h for h in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]
    torch.testing.assert_close(alibi_slopes(12, dtype=torch.float64), torch.tensor(expected_12, dtype=torch.float64))
    # n=6: n0=4 gives (2^-2)^h = 2^-2, 2^-4, 2^-6, 2^-8; the n=8 sequence 2^-h at h = 1, 3
    expected_6 = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    torch.testing.assert_close(alibi_slopes(6, dtype=torch.float64), torch.tensor(expected_6, dtype=torch.float64))
    # n=3: n0=2 gives 2^-4, 2^-8; then the n=4 sequence's first slope 2^-2
    assert alibi_slopes(3, dtype=torch.float64).tolist() == [2.0 ** -4, 2.0 ** -8, 2.0 ** -2]


def test_alibi_bias_is_minus_slope_times_distance():
    H, L = 4, 6
    b = alibi_bias(H, L, dtype=torch.float64)
    assert b.shape == (H, L, L)
    m = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]
    for h in range(H):
        for i in range(L):
            for j in range(L):
                assert b[h, i, j].item() == -m[h] * abs(i - j)
    assert torch.all(torch.diagonal(b, dim1=-2, dim2=-1) == 0)
    # query block at the end: the last query sits at the last key
    bq = alibi_bias(H, 2, 5, dtype=torch.float64)
    assert bq.shape == (H, 2, 5)
    for h in range(H):
        for i in range(2):
            for j in range(5):
                assert bq[h, i, j].item() == -m[h] * abs(i + 3 - j)  # query i is at position i + 3
    assert bq[0, 1, 4].item() == 0.0 and bq[0, 0, 0].item() == -m[0] * 3
    module = ALiBi(H).double()
    q = randn(2, H, L, 8)
    torch.testing.assert_close(module.score_bias(q, q), b[None])


def test_n_heads_below_one_errors():
    with pytest.raises(ValueError, match=r"n_heads must be >= 1; got 0"):
        alibi_slopes(0)
    with pytest.raises(ValueError, match="n_heads"):
        ALiBi(-2)
    with pytest.raises(ValueError, match="n_heads"):
        T5Bias(0)
    with pytest.raises(TypeError, match="n_heads must be an int"):
        alibi_slopes(2.5)


# ------------------------------------------------------------------ relative positions and Shaw

def test_relative_positions_and_shaw_clip():
    rel = relative_positions(3, 5)
    assert rel.dtype == torch.long
    assert rel.tolist() == [[-2, -1, 0, 1, 2], [-3, -2, -1, 0, 1], [-4, -3, -2, -1, 0]]
    r = torch.arange(-5, 6)
    assert shaw_clip(r, 2).tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 4, 4, 4]
    assert shaw_clip(r, 0).tolist() == [0] * 11
    with pytest.raises(ValueError, match=r"k must be >= 0; got -1"):
        shaw_clip(r, -1)
    with pytest.raises(ValueError, match="k must be >= 0"):
        make_positions("shaw", 16, 2, k=-3)
    with pytest.raises(TypeError, match="integer"):
        shaw_clip(r.double(), 2)


def test_shaw_table_rows_and_explicit_formula():
    torch.manual_seed(0)
    kk, D, H = 2, 4, 2
    s = make_positions("shaw", d_model=D * H, n_heads=H, k=kk).double()
    assert isinstance(s, ShawRelative)
    assert s.a_K.shape == (2 * kk + 1, D) and s.a_V.shape == (2 * kk + 1, D)
    q, k = randn(1, H, 7, D, seed=5), randn(1, H, 7, D, seed=6)
    bias = s.score_bias(q, k)
    w = torch.softmax(randn(1, H, 7, 7, seed=7), -1)
    vt = s.value_term(w)
    for h in range(H):
        for i in range(7):
            acc = torch.zeros(D, dtype=torch.float64)
            for j in range(7):
                r = max(-kk, min(kk, j - i)) + kk
                expected = (q[0, h, i] @ s.a_K[r]).item() / math.sqrt(D)
                assert bias[0, h, i, j].item() == pytest.approx(expected, abs=1e-12)
                acc = acc + w[0, h, i, j] * s.a_V[r]
            torch.testing.assert_close(vt[0, h, i], acc.detach(), atol=1e-12, rtol=0)


def test_shaw_offsets_beyond_k_share_one_embedding():
    kk, D = 3, 4
    s = ShawRelative(1, D, k=kk).double()
    q = randn(D, seed=8).expand(1, 1, 12, D).contiguous()  # the same query content everywhere
    bias = s.score_bias(q, randn(1, 1, 12, D, seed=9))[0, 0]
    off = relative_positions(12)
    far_past, far_future = bias[off <= -kk], bias[off >= kk]
    assert torch.allclose(far_past, far_past[0].expand_as(far_past))
    assert torch.allclose(far_future, far_future[0].expand_as(far_future))
    inside = torch.stack([bias[off == o][0] for o in range(-kk, kk + 1)])  # 2k+1 distinct values
    assert torch.unique(inside).numel() == 2 * kk + 1


def test_shaw_value_term_present_or_absent():
    with_v = make_positions("shaw", 8, 2, k=2)
    without = make_positions("shaw", 8, 2, k=2, values=False)
    assert with_v.needs_weights is True and without.needs_weights is False
    assert without.a_V is None
    w = torch.softmax(torch.randn(1, 2, 5, 5), -1)
    assert without.value_term(w) is None
    assert with_v.value_term(w).shape == (1, 2, 5, 4)


# ------------------------------------------------------------------ T5 buckets

def test_t5_bucket_hand_computed_bidirectional():
    # 32 buckets, two halves of 16; exact for |rel| < 8; 8 + floor(log(n/8)/log(16) * 8) beyond
    rel = torch.tensor([0, -1, -7, -8, -16, -32, -64, -127, -128, -1000, 1, 7, 8, 16, 1000])
    expected = [0, 1, 7, 8, 10, 12, 14, 15, 15, 15, 17, 23, 24, 26, 31]
    assert t5_bucket(rel).tolist() == expected


def test_t5_bucket_hand_computed_causal():
    # one range of 32 buckets for the past; exact for n < 16; 16 + floor(log(n/16)/log(8) * 16)
    rel = torch.tensor([0, 5, 1000, -1, -15, -16, -32, -64, -128, -1000])
    expected = [0, 0, 0, 1, 15, 16, 21, 26, 31, 31]
    assert t5_bucket(rel, bidirectional=False).tolist() == expected


def test_t5_bucket_exact_monotone_saturating_and_ranges():
    dist = torch.arange(0, 400)
    for bidir, nb in ((True, 32), (False, 32), (True, 8)):
        past = t5_bucket(-dist, bidirectional=bidir, num_buckets=nb, max_distance=128)
        exact = nb // 4 if bidir else nb // 2
        assert past[:exact].tolist() == list(range(exact))  # exact for small offsets
        assert torch.all(past[1:] >= past[:-1])  # monotone in |offset|
        assert torch.all(past[128:] == past[128])  # saturates at max_distance
        assert past.unique().numel() == (nb // 2 if bidir else nb)  # every bucket of the half is used
        top = nb // 2 - 1 if bidir else nb - 1
        assert past.max().item() == top and past.min().item() == 0
        future = t5_bucket(dist[1:], bidirectional=bidir, num_buckets=nb, max_distance=128)
        if bidir:  # future keys get their own half: [nb/2, nb); offset 0 is in the past half,
            # so bucket nb/2 itself is never used and offset +1 lands in nb/2 + 1
            assert future.min().item() == nb // 2 + 1 and future.max().item() == nb - 1
        else:  # causal: the future is masked anyway, all in bucket 0
            assert torch.all(future == 0)


def test_t5_module_looks_up_table():
    t5 = T5Bias(3, num_buckets=8, max_distance=16, bidirectional=True)
    q = torch.randn(1, 3, 6, 4)
    b = t5.score_bias(q, q)
    assert b.shape == (1, 3, 6, 6)
    bucket = t5_bucket(relative_positions(6), True, 8, 16)
    for h in range(3):
        torch.testing.assert_close(b[0, h], t5.table.weight[bucket, h])


# ------------------------------------------------------------------ Transformer-XL

def _xl_R(d, dim, base=10000.0):
    """R_d written out: interleaved sin/cos of d / base^(2i/dim), for any signed d."""
    out = []
    for c in range(dim):
        w = 1.0 / base ** (2 * (c // 2) / dim)
        out.append(math.sin(d * w) if c % 2 == 0 else math.cos(d * w))
    return torch.tensor(out, dtype=torch.float64)


def test_xl_score_bias_matches_equation_terms_b_c_d():
    torch.manual_seed(1)
    H, D, L = 2, 4, 5
    xl = XLRelative(H, D).double()
    q, k = randn(1, H, L, D, seed=10), randn(1, H, L, D, seed=11)
    bias = xl.score_bias(q, k)
    W = xl.W_R.weight.detach()
    for h in range(H):
        for i in range(L):
            for j in range(L):
                WR = (W @ _xl_R(i - j, H * D)).view(H, D)[h]  # head h's slice of W_R R_{i-j}
                expected = (xl.u[h] @ k[0, h, j] + (q[0, h, i] + xl.v[h]) @ WR).item() / math.sqrt(D)
                assert bias[0, h, i, j].item() == pytest.approx(expected, abs=1e-12)


def test_xl_position_part_depends_only_on_offset():
    """With the content fixed (one query vector at every position, one key vector at
    every position), score_bias[i, j] is a function of i - j alone: constant along
    each diagonal (Toeplitz), and different for different offsets."""
    torch.manual_seed(2)
    H, D, L = 2, 8, 9
    xl = XLRelative(H, D).double()
    q = randn(1, H, 1, D, seed=12).expand(1, H, L, D)
    k = randn(1, H, 1, D, seed=13).expand(1, H, L, D)
    b = xl.score_bias(q, k)[0]  # (H, L, L)
    torch.testing.assert_close(b[:, 1:, 1:], b[:, :-1, :-1], atol=1e-12, rtol=0)
    diag_values = torch.stack([b[:, L - 1, j] for j in range(L)], -1)  # offsets 8..0
    assert (diag_values[:, 1:] - diag_values[:, :-1]).abs().min() > 1e-6


# ------------------------------------------------------------------ every scheme

@pytest.mark.parametrize("name", POSITION_SCHEMES)
@pytest.mark.parametrize("factor", [2, 4])
def test_every_scheme_runs_past_trained_length(name, factor):
    max_len, d_model, H = 16, 32, 4
    D = d_model // H
    scheme = make_positions(name, d_model, H, max_len=max_len)
    assert scheme.name == name
    L = factor * max_len
    x = torch.randn(2, L, d_model)
    y = scheme.embed(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    for Lq in (L, 3):  # full self-attention, and a query block at the end
        q, k = torch.randn(2, H, Lq, D), torch.randn(2, H, L, D)
        q2, k2 = scheme.rotate(q, k)
        assert q2.shape == q.shape and k2.shape == k.shape
        assert torch.isfinite(q2).all() and torch.isfinite(k2).all()
        bias = scheme.score_bias(q2, k2)
        if bias is not None:
            assert torch.broadcast_shapes(bias.shape, (2, H, Lq, L)) == (2, H, Lq, L)
            assert torch.isfinite(bias).all()
        w = torch.softmax(torch.randn(2, H, Lq, L), -1)
        extra = scheme.value_term(w)
        assert (extra is not None) == scheme.needs_weights
        if extra is not None:
            assert extra.shape == (2, H, Lq, D) and torch.isfinite(extra).all()


def test_learned_positions_reuse_last_row_past_max_len():
    s = make_positions("learned", d_model=4, n_heads=1, max_len=5)
    x = torch.zeros(1, 9, 4)
    y = s.embed(x)[0].detach()
    torch.testing.assert_close(y[:5], s.table.detach())
    torch.testing.assert_close(y[5:], s.table.detach()[-1].expand(4, 4))


@pytest.mark.parametrize("name", ["shaw", "xl", "t5", "alibi"])
def test_bias_for_query_block_equals_last_rows(name):
    torch.manual_seed(3)
    s = make_positions(name, 16, 2, k=3) if name == "shaw" else make_positions(name, 16, 2)
    q, k = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    full = s.score_bias(q, k).expand(1, 2, 10, 10)
    tail = s.score_bias(q[..., -4:, :], k).expand(1, 2, 4, 10)
    torch.testing.assert_close(tail, full[..., -4:, :])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", POSITION_SCHEMES)
def test_dtype_and_device_preserved(name, device):
    scheme = make_positions(name, 16, 2, max_len=8).to(device)  # parameters stay float32
    x = torch.randn(2, 12, 16, dtype=torch.float64, device=device)
    assert scheme.embed(x).dtype == torch.float64 and scheme.embed(x).device == x.device
    assert scheme.embed(x.to(torch.bfloat16)).dtype == torch.bfloat16  # float32 tables cast down too
    q = torch.randn(2, 2, 12, 8, dtype=torch.float64, device=device)
    q2, k2 = scheme.rotate(q, q.clone())
    assert q2.dtype == k2.dtype == torch.float64 and q2.device == x.device
    bias = scheme.score_bias(q2, k2)
    if bias is not None:
        assert bias.dtype == torch.float64 and bias.device == x.device
    extra = scheme.value_term(torch.softmax(q2 @ k2.transpose(-1, -2), -1))
    if extra is not None:
        assert extra.dtype == torch.float64 and extra.device == x.device


@pytest.mark.parametrize("device", DEVICES)
def test_functions_create_on_requested_device_and_dtype(device):
    for t in (sinusoidal_encoding(4, 6, device=device, dtype=torch.float64),
              alibi_bias(3, 4, device=device, dtype=torch.float64),
              alibi_slopes(3, device=device, dtype=torch.float64),
              *rope_angles(4, 6, device=device, dtype=torch.float64)):
        assert t.dtype == torch.float64 and t.device.type == device
    assert relative_positions(3, device=device).device.type == device
    assert sinusoidal_encoding(4, 6).dtype == torch.get_default_dtype()
    h = apply_rope(torch.randn(2, 4, 8, device=device).half())
    assert h.dtype == torch.float16


def test_gradients_float64():
    torch.manual_seed(4)
    shaw, xl = ShawRelative(2, 4, k=2).double(), XLRelative(2, 4).double()
    q, k = randn(1, 2, 4, 4, seed=14).requires_grad_(), randn(1, 2, 5, 4, seed=15).requires_grad_()
    w = torch.softmax(randn(1, 2, 4, 5, seed=16), -1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: apply_rope(a, offset=3), (q,))
    assert torch.autograd.gradcheck(shaw.score_bias, (q, k))
    assert torch.autograd.gradcheck(shaw.value_term, (w,))
    assert torch.autograd.gradcheck(xl.score_bias, (q, k))


# ------------------------------------------------------------------ factory and errors

def test_make_positions_names_and_unknown_name():
    assert POSITION_SCHEMES == ("none", "sinusoidal", "learned", "shaw", "xl", "t5", "rope", "alibi")
    for name in POSITION_SCHEMES:
        assert isinstance(make_positions(name, 8, 2), P.PositionScheme)
    with pytest.raises(ValueError) as err:
        make_positions("relative", 8, 2)
    assert "relative" in str(err.value)
    for name in POSITION_SCHEMES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match=r"d_model=10 must be divisible by n_heads=4"):
        make_positions("alibi", 10, 4)


def test_bad_inputs_name_expected_and_got():
    rope, alibi = RoPE(8), ALiBi(2)
    with pytest.raises(ValueError, match=r"4-D tensor \(batch, heads, seq, head_dim\); got shape \(2, 5, 8\)"):
        rope.rotate(torch.zeros(2, 5, 8), torch.zeros(2, 5, 8))
    with pytest.raises(TypeError, match=r"floating-point tensor; got torch.int64"):
        alibi.score_bias(torch.zeros(1, 2, 3, 4, dtype=torch.long), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"n_heads=2 .* got shape \(1, 3, 4, 8\)"):
        alibi.score_bias(torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 4, 8))
    with pytest.raises(ValueError, match=r"head_dim=8 .* got shape \(1, 2, 4, 6\)"):
        rope.rotate(torch.zeros(1, 2, 4, 6), torch.zeros(1, 2, 4, 6))
    with pytest.raises(ValueError, match=r"x must be a 3-D tensor \(batch, seq, d_model\); got shape \(5, 16\)"):
        make_positions("sinusoidal", 16, 2).embed(torch.zeros(5, 16))
    with pytest.raises(ValueError, match=r"d_model=16 .* got shape \(1, 5, 12\)"):
        make_positions("learned", 16, 2).embed(torch.zeros(1, 5, 12))
    with pytest.raises(ValueError, match="max_distance"):
        t5_bucket(torch.tensor([1]), num_buckets=32, max_distance=4)


# ------------------------------------------------------------------ T5: the hook and an independent implementation

def test_t5_bucket_fn_hook_is_used_and_checked():
    t5 = T5Bias(2, num_buckets=8, max_distance=16, bidirectional=False)
    with torch.no_grad():
        t5.table.weight.copy_(torch.arange(16.0).view(8, 2))  # bucket b, head h -> 2b + h
    q = torch.zeros(1, 2, 5, 4)
    seen = []

    def every_offset_in_bucket_3(rel, bidirectional, num_buckets, max_distance):
        seen.append((bidirectional, num_buckets, max_distance))
        return torch.full_like(rel, 3)

    t5.bucket_fn = every_offset_in_bucket_3
    b = t5.score_bias(q, q)
    assert seen == [(False, 8, 16)]
    assert torch.equal(b[0, 0], torch.full((5, 5), 6.0)) and torch.equal(b[0, 1], torch.full((5, 5), 7.0))
    t5.bucket_fn = lambda rel, *a: rel.float()  # a float result is refused, not silently cast
    with pytest.raises(TypeError, match="long tensor"):
        t5.score_bias(q, q)
    t5.bucket_fn = None
    torch.testing.assert_close(t5.score_bias(q, q)[0, 1], 2 * t5_bucket(relative_positions(5), False, 8, 16) + 1.0)


@pytest.mark.slow  # importing transformers takes about 5 s
def test_t5_bucket_equals_hugging_face_t5():
    T5Attention = pytest.importorskip("transformers.models.t5.modeling_t5").T5Attention
    rel = torch.arange(-3000, 3001)  # relative_position = memory_position - query_position = j - i
    for bidir in (True, False):
        for nb, md in ((32, 128), (8, 16), (64, 256), (6, 20), (32, 32), (10, 7)):
            if md <= (nb // 4 if bidir else nb // 2):
                continue  # the library refuses a max_distance inside the exact range
            hf = T5Attention._relative_position_bucket(rel, bidirectional=bidir, num_buckets=nb, max_distance=md)
            assert torch.equal(t5_bucket(rel, bidir, nb, md), hf), (bidir, nb, md)


# ------------------------------------------------------------------ DA-Transformer

def test_da_scale_is_the_learnable_sigmoid_of_the_paper():
    w = torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64)
    f = P.da_scale(w, 4, v=1.0)  # (3, 4, 4)
    assert f.shape == (3, 4, 4)
    for h in range(3):
        for i in range(4):
            for j in range(4):
                x = w[h].item() * abs(i - j)
                assert math.isclose(f[h, i, j].item(), (1 + math.e) / (1 + math.exp(1.0 - x)), rel_tol=1e-12)
    assert torch.all(f[:, range(4), range(4)] == 1)  # distance 0: factor 1 whatever w, v
    assert torch.all(f[0, 0, 1:] > 1) and torch.all(f[0, 0, 1:].diff() > 0)   # w > 0: far keys weigh more
    assert torch.all(f[1, 0, 1:] < 1) and torch.all(f[1, 0, 1:].diff() < 0)   # w < 0: far keys weigh less
    assert torch.all(f[2] == 1)                                              # w = 0: no distance effect
    assert P.da_scale(w, 2, 5).shape == (3, 2, 5)   # a query block at the end of 5 keys
    assert torch.equal(P.da_scale(w, 2, 5), P.da_scale(w, 5)[:, 3:])


def test_da_scores_multiply_rectified_scores():
    s = randn(2, 3, 4, 4)
    w = torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64)
    out = P.da_scores(s, w, v=torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    f = P.da_scale(w, 4, v=torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(out, s.clamp(min=0) * f[None])
    assert torch.all(out[s <= 0] == 0)  # a rectified score of 0 stays 0 at every distance
    with pytest.raises(ValueError, match="one scale per head"):
        P.da_scores(s, w[:2])
