"""attention.py: parity with PyTorch, masks, gradients, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer_lab import attention as A
from transformer_lab import positions as P

B, H, LQ, LK, D = 2, 3, 5, 7, 8


def rand(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=dtype)


def qkv(gen, Lq=LQ, Lk=LK, dtype=torch.float32):
    return rand(B, H, Lq, D, gen=gen, dtype=dtype), rand(B, H, Lk, D, gen=gen, dtype=dtype), \
        rand(B, H, Lk, D, gen=gen, dtype=dtype)


def make_mask(kind, gen, Lq=LQ, Lk=LK):
    """Masks in our convention (bool True = attend, float additive)."""
    if kind is None:
        return None
    if kind == "padding":
        return A.padding_mask(torch.tensor([Lk, 3]), Lk)  # (B, 1, 1, Lk)
    if kind == "causal":
        return A.causal_mask(Lq, Lk)  # (Lq, Lk)
    if kind == "random_bool":
        m = torch.rand(B, H, Lq, Lk, generator=gen) > 0.4
        m[..., 0] = True  # keep every row non-empty (F.sdpa's fused paths differ on empty rows)
        return m
    if kind == "additive":
        return rand(B, 1, Lq, Lk, gen=gen)
    raise AssertionError(kind)


# ---------------------------------------------------------------------------------------
# Parity with F.scaled_dot_product_attention
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_kind", [None, "padding", "causal", "random_bool", "additive"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_readable_and_fast_match_torch_sdpa(gen, mask_kind, scale):
    q, k, v = qkv(gen)
    mask = make_mask(mask_kind, gen)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    readable = A.scaled_dot_product_attention(q, k, v, mask=mask, scale=scale)
    fast = A.fast_attention(q, k, v, mask=mask, scale=scale)
    torch.testing.assert_close(readable, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)


def test_is_causal_matches_torch(gen):
    q, k, v = qkv(gen, Lq=6, Lk=6)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(A.fast_attention(q, k, v, is_causal=True), expected, atol=1e-5, rtol=1e-5)
    readable = A.scaled_dot_product_attention(q, k, v, mask=A.causal_mask(6))
    torch.testing.assert_close(readable, expected, atol=1e-5, rtol=1e-5)


def test_is_causal_with_longer_keys_aligns_queries_to_the_end(gen):
    q, k, v = qkv(gen, Lq=3, Lk=7)
    fast = A.fast_attention(q, k, v, is_causal=True)
    readable = A.scaled_dot_product_attention(q, k, v, mask=A.causal_mask(3, 7))
    torch.testing.assert_close(fast, readable, atol=1e-5, rtol=1e-5)
    # the last query sees every key: same as unmasked attention for that row
    full = A.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(fast[:, :, -1], full[:, :, -1], atol=1e-5, rtol=1e-5)
    # is_causal together with an explicit mask: both apply
    pad = make_mask("padding", gen, 3, 7)
    both = A.fast_attention(q, k, v, mask=pad, is_causal=True)
    ref = A.scaled_dot_product_attention(q, k, v, mask=pad & A.causal_mask(3, 7))
    torch.testing.assert_close(both, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_kind", [None, "causal", "additive"])
def test_bias_is_added_to_scaled_scores(gen, mask_kind):
    q, k, v = qkv(gen)
    bias = rand(1, H, LQ, LK, gen=gen)
    mask = make_mask(mask_kind, gen)
    merged = bias if mask is None else (
        bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else bias + mask)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=merged)
    readable = A.scaled_dot_product_attention(q, k, v, mask=mask, bias=bias)
    fast = A.fast_attention(q, k, v, mask=mask, bias=bias)
    torch.testing.assert_close(readable, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)


def test_weights_rows_sum_to_one_and_respect_mask(gen):
    q, k, v = qkv(gen)
    mask = make_mask("random_bool", gen)
    out, w = A.scaled_dot_product_attention(q, k, v, mask=mask, need_weights=True)
    assert w.shape == (B, H, LQ, LK)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, H, LQ))
    assert (w[~mask] == 0).all()
    torch.testing.assert_close(out, w @ v)


def test_attention_scores_default_scale(gen):
    q, k, _ = qkv(gen)
    torch.testing.assert_close(A.attention_scores(q, k), q @ k.transpose(-2, -1) / D ** 0.5)
    torch.testing.assert_close(A.attention_scores(q, k, scale=1.0), q @ k.transpose(-2, -1))


# ---------------------------------------------------------------------------------------
# masked_softmax and fully masked rows
# ---------------------------------------------------------------------------------------

def test_masked_softmax_equals_softmax_with_minus_inf(gen):
    scores = rand(B, H, LQ, LK, gen=gen)
    mask = make_mask("random_bool", gen)
    expected = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    torch.testing.assert_close(A.masked_softmax(scores, mask), expected)
    additive = torch.zeros(B, H, LQ, LK).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(A.masked_softmax(scores, additive), expected)
    torch.testing.assert_close(A.masked_softmax(scores), torch.softmax(scores, -1))


def test_fully_masked_rows_give_zeros_not_nan(gen):
    q, k, v = qkv(gen)
    q.requires_grad_(True)
    mask = torch.ones(B, 1, LQ, LK, dtype=torch.bool)
    mask[0, 0, 2] = False  # query 2 of batch 0 may see nothing
    out, w = A.scaled_dot_product_attention(q, k, v, mask=mask, need_weights=True)
    assert not torch.isnan(out).any() and not torch.isnan(w).any()
    assert (w[0, :, 2] == 0).all() and (out[0, :, 2] == 0).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    assert (q.grad[0, :, 2] == 0).all()
    # additive -inf rows behave the same, forward and backward
    additive = torch.zeros(LQ, LK)
    additive[1] = float("-inf")
    scores = rand(B, H, LQ, LK, gen=gen).requires_grad_(True)
    w2 = A.masked_softmax(scores, additive)
    assert (w2[:, :, 1] == 0).all() and torch.isfinite(w2).all()
    (w2 * rand(B, H, LQ, LK, gen=gen)).sum().backward()
    assert torch.isfinite(scores.grad).all() and (scores.grad[:, :, 1] == 0).all()
    # the fast path gives zeros too (PyTorch's math kernel handles empty rows)
    fast = A.fast_attention(q.detach(), k, v, mask=mask)
    torch.testing.assert_close(fast, out.detach(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Mask helpers, heads
# ---------------------------------------------------------------------------------------

def test_causal_mask_values():
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(A.causal_mask(3), expected)
    # 2 queries at the end of 4 keys: query 0 sits at position 2
    expected = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(A.causal_mask(2, 4), expected)


def test_padding_mask_values():
    m = A.padding_mask(torch.tensor([2, 4]), max_len=5)
    assert m.shape == (2, 1, 1, 5) and m.dtype == torch.bool
    assert m[0, 0, 0].tolist() == [True, True, False, False, False]
    assert m[1, 0, 0].tolist() == [True, True, True, True, False]
    assert A.padding_mask([1, 3]).shape == (2, 1, 1, 3)
    with pytest.raises(ValueError, match="max_len=2"):
        A.padding_mask([3], max_len=2)


def test_split_and_merge_heads(gen):
    x = rand(2, 5, 12, gen=gen)
    h = A.split_heads(x, 3)
    assert h.shape == (2, 3, 5, 4)
    torch.testing.assert_close(h[:, 1], x[..., 4:8])  # head 1 = features 4..7
    assert torch.equal(A.merge_heads(h), x)


# ---------------------------------------------------------------------------------------
# MultiHeadAttention vs nn.MultiheadAttention
# ---------------------------------------------------------------------------------------

def copy_from_torch_mha(ref: nn.MultiheadAttention, ours: A.MultiHeadAttention):
    d = ref.embed_dim
    with torch.no_grad():
        if ours.cross:
            ours.q.weight.copy_(ref.in_proj_weight[:d])
            ours.q.bias.copy_(ref.in_proj_bias[:d])
            ours.kv.weight.copy_(ref.in_proj_weight[d:])
            ours.kv.bias.copy_(ref.in_proj_bias[d:])
        else:
            ours.qkv.weight.copy_(ref.in_proj_weight)
            ours.qkv.bias.copy_(ref.in_proj_bias)
        ours.out.weight.copy_(ref.out_proj.weight)
        ours.out.bias.copy_(ref.out_proj.bias)


def torch_mha(d_model, n_heads, gen):
    ref = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
    with torch.no_grad():  # non-zero biases, so a mix-up would show
        ref.in_proj_bias.copy_(torch.randn(3 * d_model, generator=gen))
        ref.out_proj.bias.copy_(torch.randn(d_model, generator=gen))
    return ref


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("masks", ["none", "padding", "causal", "both"])
def test_mha_matches_torch_multihead_attention(gen, fast, masks):
    d, h, L = 16, 4, 6
    torch.manual_seed(0)
    ref = torch_mha(d, h, gen)
    ours = A.MultiHeadAttention(d, h, fast=fast)
    copy_from_torch_mha(ref, ours)
    x = rand(2, L, d, gen=gen).requires_grad_(True)  # grad on: nn.MHA takes its plain path

    keep = torch.ones(2, L, dtype=torch.bool)
    keep[1, 4:] = False  # batch 1 has 4 real tokens
    causal = A.causal_mask(L)
    use_pad, use_causal = masks in ("padding", "both"), masks in ("causal", "both")
    # nn.MultiheadAttention: boolean True = HIDE; ours: True = KEEP
    ref_out, ref_w = ref(x, x, x, key_padding_mask=~keep if use_pad else None,
                         attn_mask=~causal if use_causal else None,
                         need_weights=True, average_attn_weights=False)
    mask = None
    if use_pad:
        mask = keep[:, None, None, :]
    if use_causal:
        mask = causal if mask is None else mask & causal
    out = ours(x, mask=mask)
    out_w, w = ours(x, mask=mask, need_weights=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_w, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-5)
    assert w.shape == (2, h, L, L)


def test_cross_attention_matches_torch(gen):
    d, h = 16, 2
    ref = torch_mha(d, h, gen)
    ours = A.MultiHeadAttention(d, h, cross=True)
    copy_from_torch_mha(ref, ours)
    x, ctx = rand(2, 3, d, gen=gen), rand(2, 5, d, gen=gen).requires_grad_(True)
    keep = torch.tensor([[True] * 5, [True, True, False, False, False]])
    ref_out, ref_w = ref(x, ctx, ctx, key_padding_mask=~keep, average_attn_weights=False)
    out, w = ours(x, context=ctx, mask=keep[:, None, None, :], need_weights=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-5)
    fast = ours(x, context=ctx, mask=keep[:, None, None, :])
    torch.testing.assert_close(fast, ref_out, atol=1e-5, rtol=1e-5)


def test_mha_dropout_only_in_training(gen):
    mha = A.MultiHeadAttention(8, 2, dropout=0.5)
    x = rand(2, 6, 8, gen=gen)
    mha.eval()
    torch.testing.assert_close(mha(x), mha(x))
    mha.train()
    torch.manual_seed(0)
    assert not torch.allclose(mha(x), mha.eval()(x))


# ---------------------------------------------------------------------------------------
# Position hooks
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["alibi", "t5", "xl", "rope"])
def test_fast_and_readable_agree_with_position_schemes(gen, name):
    torch.manual_seed(0)
    scheme = P.make_positions(name, 16, 4, max_len=32)
    fast, slow = A.MultiHeadAttention(16, 4, fast=True), A.MultiHeadAttention(16, 4, fast=False)
    slow.load_state_dict(fast.state_dict())
    x = rand(2, 6, 16, gen=gen)
    mask = A.causal_mask(6)
    a = fast(x, mask=mask, positions=scheme)
    b = slow(x, mask=mask, positions=scheme)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, fast(x, mask=mask), atol=1e-4)  # the scheme did something


def test_scheme_that_needs_weights_forces_readable_path(gen, monkeypatch):
    torch.manual_seed(0)
    scheme = P.make_positions("shaw", 16, 4, k=2)
    assert scheme.needs_weights
    mha = A.MultiHeadAttention(16, 4, fast=True)
    x = rand(2, 6, 16, gen=gen)
    expected = mha(x, positions=scheme)

    def fused_called(*args, **kwargs):
        raise AssertionError("the fused path cannot add Shaw's value term")

    monkeypatch.setattr(A, "fast_attention", fused_called)
    torch.testing.assert_close(mha(x, positions=scheme), expected)
    # a scheme that does not need the weights does take the fused path
    scheme.needs_weights = False
    with pytest.raises(AssertionError, match="fused path"):
        mha(x, positions=scheme)


def test_shaw_value_term_is_added_before_the_output_projection(gen):
    torch.manual_seed(0)
    with_values = P.make_positions("shaw", 16, 4, k=2)
    with torch.no_grad():
        with_values.a_V.normal_()
    keys_only = P.make_positions("shaw", 16, 4, k=2, values=False)
    keys_only.load_state_dict(with_values.state_dict(), strict=False)  # same a_K
    mha = A.MultiHeadAttention(16, 4, fast=False)
    x = rand(2, 6, 16, gen=gen)
    mask = A.causal_mask(6)
    _, w = mha(x, mask=mask, positions=keys_only, need_weights=True)  # (B, H, L, L)
    extra = with_values.value_term(w)  # (B, H, L, D): sum_j w_ij a^V_ij
    # out = (merge(w v + extra)) W_O^T + b  =>  the difference is merge(extra) W_O^T
    diff = mha(x, mask=mask, positions=with_values) - mha(x, mask=mask, positions=keys_only)
    torch.testing.assert_close(diff, A.merge_heads(extra) @ mha.out.weight.T, atol=1e-5, rtol=1e-4)
    assert diff.abs().max() > 1e-2


# ---------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------

def test_gradcheck_readable_attention(gen):
    q, k, v = (rand(1, 2, L, 4, gen=gen, dtype=torch.float64).requires_grad_(True) for L in (3, 4, 4))
    mask = torch.tensor([[True, True, False, True]] * 3)
    bias = rand(1, 2, 3, 4, gen=gen, dtype=torch.float64).requires_grad_(True)

    def f(q, k, v, bias):
        return A.scaled_dot_product_attention(q, k, v, mask=mask, bias=bias)

    assert torch.autograd.gradcheck(f, (q, k, v, bias))


@pytest.mark.parametrize("fast", [False, True])
def test_gradcheck_multi_head_attention(gen, fast):
    torch.manual_seed(0)
    mha = A.MultiHeadAttention(4, 2, fast=fast).double()
    x = rand(1, 3, 4, gen=gen, dtype=torch.float64).requires_grad_(True)
    mask = A.causal_mask(3)

    def f(x, w_qkv, w_out):  # the weights as explicit inputs, so their gradients are checked
        params = {"qkv.weight": w_qkv, "out.weight": w_out}
        return torch.func.functional_call(mha, params, (x,), {"mask": mask})

    inputs = (x, mha.qkv.weight.detach().clone().requires_grad_(True),
              mha.out.weight.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


# ---------------------------------------------------------------------------------------
# Bad input: errors that say what was expected and what came
# ---------------------------------------------------------------------------------------

def test_wrong_rank_is_named(gen):
    q = rand(2, 5, 8, gen=gen)
    with pytest.raises(ValueError, match=r"q must be a 4-D tensor .*got shape \(2, 5, 8\)"):
        A.scaled_dot_product_attention(q, q, q)
    with pytest.raises(ValueError, match=r"4-D.*\(2, 5, 8\)"):
        A.fast_attention(q, q, q)
    with pytest.raises(ValueError, match=r"x must be a 3-D tensor.*got shape \(5, 8\)"):
        A.MultiHeadAttention(8, 2)(rand(5, 8, gen=gen))


def test_integer_tensors_are_refused(gen):
    q = torch.randint(0, 5, (2, 2, 3, 4))
    with pytest.raises(TypeError, match="q must be a floating-point tensor; got torch.int64"):
        A.scaled_dot_product_attention(q, q, q)
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        A.MultiHeadAttention(4, 2)(torch.randint(0, 5, (2, 3, 4)))
    qf = rand(2, 2, 3, 4, gen=gen)
    with pytest.raises(TypeError, match="mask must be boolean.*got torch.int64"):
        A.scaled_dot_product_attention(qf, qf, qf, mask=torch.ones(3, 3, dtype=torch.long))


def test_heads_must_divide_d_model():
    with pytest.raises(ValueError, match="d_model=10 must be divisible by n_heads=4"):
        A.MultiHeadAttention(10, 4)
    with pytest.raises(ValueError, match="d_model=10 must be divisible by n_heads=4"):
        A.split_heads(torch.zeros(1, 2, 10), 4)


def test_mask_of_wrong_shape_is_named(gen):
    q, k, v = qkv(gen)
    bad = torch.ones(3, LK, dtype=torch.bool)
    msg = rf"mask must broadcast to \({B}, {H}, {LQ}, {LK}\); got \(3, {LK}\)"
    with pytest.raises(ValueError, match=msg):
        A.scaled_dot_product_attention(q, k, v, mask=bad)
    with pytest.raises(ValueError, match=msg):
        A.fast_attention(q, k, v, mask=bad)
    mha = A.MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"mask must broadcast to \(2, 2, 4, 4\); got \(2, 3\)"):
        mha(rand(2, 4, 8, gen=gen), mask=torch.ones(2, 3, dtype=torch.bool))


def test_q_k_head_dim_mismatch(gen):
    q = rand(2, 2, 3, 8, gen=gen)
    k = rand(2, 2, 4, 6, gen=gen)
    with pytest.raises(ValueError, match=r"same head_dim.*q \(2, 2, 3, 8\) and k \(2, 2, 4, 6\)"):
        A.scaled_dot_product_attention(q, k, k)
    with pytest.raises(ValueError, match="k and v must agree"):
        A.scaled_dot_product_attention(q, rand(2, 2, 4, 8, gen=gen), rand(2, 2, 5, 8, gen=gen))


def test_mha_wrong_width_and_context(gen):
    mha = A.MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"d_model=8; got shape \(2, 3, 6\)"):
        mha(rand(2, 3, 6, gen=gen))
    with pytest.raises(ValueError, match="cross=True"):
        mha(rand(2, 3, 8, gen=gen), context=rand(2, 3, 8, gen=gen))
    with pytest.raises(ValueError, match="needs a context"):
        A.MultiHeadAttention(8, 2, cross=True)(rand(2, 3, 8, gen=gen))


# ---------------------------------------------------------------- key/value prefixes (prefix tuning)
DP = 12  # d_model for these tests: H = 3 heads of width 4


def test_prepend_kv_prefix_shapes_mask_and_bias(gen):
    k = torch.randn(2, H, 5, 4, generator=gen)
    v = torch.randn(2, H, 5, 3, generator=gen)
    pk, pv = torch.randn(H, 2, 4, generator=gen), torch.randn(H, 2, 3, generator=gen)
    causal = A.causal_mask(5)
    bias = torch.randn(1, H, 5, 5, generator=gen)
    k2, v2, m2, b2 = A.prepend_kv_prefix(k, v, pk, pv, causal, bias)
    assert k2.shape == (2, H, 7, 4) and v2.shape == (2, H, 7, 3)
    assert torch.equal(k2[:, :, :2], pk.expand(2, -1, -1, -1)) and torch.equal(k2[:, :, 2:], k)
    assert m2.shape == (5, 7) and m2[:, :2].all() and torch.equal(m2[:, 2:], causal)
    assert torch.equal(b2[..., :2], torch.zeros(1, H, 5, 2)) and torch.equal(b2[..., 2:], bias)
    padding = A.padding_mask(torch.tensor([5, 0]), 5)  # (B, 1, 1, 5): the second row has no real key
    _, _, mp, _ = A.prepend_kv_prefix(k, v, pk, pv, padding)
    assert mp.shape == (2, 1, 1, 7) and mp[1, 0, 0].tolist() == [True, True] + [False] * 5
    additive = torch.zeros(1, 1, 1, 1)  # a float mask whose last dim broadcasts
    _, _, ma, _ = A.prepend_kv_prefix(k, v, pk, pv, additive)
    assert ma.shape == (1, 1, 1, 7)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("positions", ["sinusoidal", "rope", "alibi", "t5", "shaw"])
def test_mha_with_prefix_fast_equals_readable_and_by_hand(fast, positions, gen):
    from transformer_lab.positions import make_positions

    torch.manual_seed(0)
    mha = A.MultiHeadAttention(DP, H, fast=fast).eval()
    scheme = make_positions(positions, DP, H, 32)
    x = torch.randn(2, 6, DP, generator=gen)
    pk, pv = torch.randn(3, DP, generator=gen), torch.randn(3, DP, generator=gen)
    causal = A.causal_mask(6)
    with torch.no_grad():
        out, w = mha(x, mask=causal, positions=scheme, need_weights=True, kv_prefix=(pk, pv))
        out_fast = mha(x, mask=causal, positions=scheme, kv_prefix=(pk, pv))
        # by hand: rotate/bias the real keys, put the prefix in front, prefix always visible
        q, k, v = mha.project(x)
        q, k = scheme.rotate(q, k)
        bias = scheme.score_bias(q, k)
        K = torch.cat([A.split_heads(pk[None].expand(2, -1, -1), H), k], dim=2)
        Vv = torch.cat([A.split_heads(pv[None].expand(2, -1, -1), H), v], dim=2)
        s = q @ K.transpose(-1, -2) / math.sqrt(DP // H)
        if bias is not None:
            s = s + F.pad(bias.expand(2, H, 6, 6), (3, 0))
        keep = torch.cat([torch.ones(6, 3, dtype=torch.bool), causal], dim=1)
        weights = torch.softmax(s.masked_fill(~keep, -math.inf), dim=-1)
        heads = weights @ Vv
        extra = scheme.value_term(weights[..., 3:])
        if extra is not None:
            heads = heads + extra
        expected = mha.out(A.merge_heads(heads))
    assert w.shape == (2, H, 6, 9) and (w[..., :3] > 0).all()
    torch.testing.assert_close(w, weights)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_fast, expected, atol=1e-5, rtol=1e-4)


def test_block_passes_the_prefix_to_its_self_attention(gen):
    from transformer_lab.blocks import DecoderBlock, EncoderBlock

    x = torch.randn(2, 4, DP, generator=gen)
    pk, pv = torch.randn(2, DP, generator=gen), torch.randn(2, DP, generator=gen)
    for block in (EncoderBlock(DP, H).eval(), DecoderBlock(DP, H, cross_attention=False).eval()):
        with torch.no_grad():
            _, w = block(x, need_weights=True, kv_prefix=(pk, pv))
            assert w.shape == (2, H, 4, 6)
            assert not torch.allclose(block(x, kv_prefix=(pk, pv)), block(x))
    dec = DecoderBlock(DP, H).eval()
    mem = torch.randn(2, 5, DP, generator=gen)
    with torch.no_grad():
        _, w = dec(x, mem, need_weights=True, kv_prefix=(pk, pv))
    assert w.shape == (2, H, 4, 6)  # the prefix is in the self-attention, not the cross-attention


def test_bad_prefixes_are_named(gen):
    mha = A.MultiHeadAttention(DP, H)
    x = torch.randn(2, 3, DP, generator=gen)
    empty = torch.zeros(0, DP)
    with pytest.raises(ValueError, match="prefix_k has length P = 0"):
        mha(x, kv_prefix=(empty, empty))
    with pytest.raises(ValueError, match=r"prefix_v must be \(P, d_model=12\) or \(batch=2, P, d_model=12\); got \(2, 8\)"):
        mha(x, kv_prefix=(torch.zeros(2, DP), torch.zeros(2, 8)))
    with pytest.raises(TypeError, match="kv_prefix must be a pair"):
        mha(x, kv_prefix=torch.zeros(2, DP))
    k = torch.randn(2, H, 3, 4, generator=gen)
    with pytest.raises(ValueError, match="a prefix needs at least one position"):
        A.prepend_kv_prefix(k, k, torch.zeros(H, 0, 4), torch.zeros(H, 0, 4))
    with pytest.raises(ValueError, match=r"prefix_k must be \(heads=3, P, 4\)"):
        A.prepend_kv_prefix(k, k, torch.zeros(2, 2, 4), torch.zeros(H, 2, 4))
    with pytest.raises(ValueError, match="the same length P"):
        A.prepend_kv_prefix(k, k, torch.zeros(H, 2, 4), torch.zeros(H, 3, 4))


# ---------------------------------------------------------------- additive (Bahdanau) attention

def additive_weights(gen, Dq, Dk, d_a, dtype=torch.float32):
    return rand(Dq, d_a, gen=gen, dtype=dtype), rand(Dk, d_a, gen=gen, dtype=dtype), rand(d_a, gen=gen, dtype=dtype)


def additive_loop(q, k, v, w_q, w_k, w_a, mask=None):
    """score_ij = w_a . tanh(q_i W_a^q + k_j W_a^k), one (b, h, i, j) at a time; mask True = attend."""
    Bq, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    scores = torch.empty(Bq, Hq, Lq, Lk, dtype=q.dtype)
    for b in range(Bq):
        for h in range(Hq):
            for i in range(Lq):
                for j in range(Lk):
                    scores[b, h, i, j] = torch.dot(w_a, torch.tanh(q[b, h, i] @ w_q + k[b, h, j] @ w_k))
    out = torch.zeros(Bq, Hq, Lq, v.shape[-1], dtype=q.dtype)
    weights = torch.zeros_like(scores)
    m = torch.ones(Lq, Lk, dtype=torch.bool) if mask is None else mask.expand(Bq, Hq, Lq, Lk)
    for b in range(Bq):
        for h in range(Hq):
            for i in range(Lq):
                row = m[b, h, i] if m.dim() == 4 else m[i]
                if row.any():
                    e = torch.exp(scores[b, h, i][row] - scores[b, h, i][row].max())
                    weights[b, h, i, row] = e / e.sum()
                out[b, h, i] = weights[b, h, i] @ v[b, h]
    return out, weights


@pytest.mark.parametrize("mask_kind", [None, "padding", "causal", "empty_row"])
def test_additive_attention_matches_a_loop(gen, mask_kind):
    Dq, Dk, Dv, d_a = 6, 4, 5, 7  # D_q != D_k: additive attention does not need them equal
    q = rand(2, 2, 3, Dq, gen=gen, dtype=torch.float64)
    k = rand(2, 2, 4, Dk, gen=gen, dtype=torch.float64)
    v = rand(2, 2, 4, Dv, gen=gen, dtype=torch.float64)
    w = additive_weights(gen, Dq, Dk, d_a, torch.float64)
    mask = {None: None, "padding": A.padding_mask(torch.tensor([4, 2]), 4), "causal": A.causal_mask(3, 4),
            "empty_row": torch.tensor([[True, False, True, True], [False] * 4, [True] * 4])}[mask_kind]
    out, weights = A.additive_attention(q, k, v, *w, mask=mask, need_weights=True)
    out_loop, weights_loop = additive_loop(q, k, v, *w, mask=mask)
    assert out.shape == (2, 2, 3, Dv) and weights.shape == (2, 2, 3, 4) and out.dtype == torch.float64
    torch.testing.assert_close(weights, weights_loop)
    torch.testing.assert_close(out, out_loop)
    if mask_kind == "empty_row":  # a query that sees no key: zeros, no NaN
        assert (weights[..., 1, :] == 0).all() and (out[..., 1, :] == 0).all()
    torch.testing.assert_close(A.additive_attention(q, k, v, *w, mask=mask), out)


def test_additive_scores_are_bounded_and_mask_is_additive_too(gen):
    q, k = rand(1, 1, 3, 64, gen=gen) * 100, rand(1, 1, 5, 64, gen=gen) * 100
    w = additive_weights(gen, 64, 64, 8)
    s = A.additive_scores(q, k, *w)
    assert s.shape == (1, 1, 3, 5) and bool((s.abs() <= w[2].abs().sum() + 1e-5).all())  # |tanh| <= 1
    v = rand(1, 1, 5, 2, gen=gen)
    keep = torch.tensor([True, True, False, True, False])
    additive = torch.zeros(5).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(A.additive_attention(q, k, v, *w, mask=keep),
                               A.additive_attention(q, k, v, *w, mask=additive))


def test_gradcheck_additive_attention(gen):
    q = rand(1, 2, 3, 4, gen=gen, dtype=torch.float64).requires_grad_(True)
    k = rand(1, 2, 5, 3, gen=gen, dtype=torch.float64).requires_grad_(True)
    v = rand(1, 2, 5, 2, gen=gen, dtype=torch.float64).requires_grad_(True)
    w = [t.requires_grad_(True) for t in additive_weights(gen, 4, 3, 6, torch.float64)]
    mask = A.causal_mask(3, 5)

    def f(q, k, v, w_q, w_k, w_a):
        return A.additive_attention(q, k, v, w_q, w_k, w_a, mask=mask)

    assert torch.autograd.gradcheck(f, (q, k, v, *w))


def test_additive_attention_bad_input_is_named(gen):
    q, k, v = rand(1, 1, 2, 4, gen=gen), rand(1, 1, 3, 6, gen=gen), rand(1, 1, 3, 2, gen=gen)
    w_q, w_k, w_a = additive_weights(gen, 4, 6, 5)
    with pytest.raises(ValueError, match=r"w_k must be \(k.shape\[-1\]=6, d_a=5\).*got \(4, 5\)"):
        A.additive_attention(q, k, v, w_q, w_q, w_a)
    with pytest.raises(ValueError, match=r"w_a must be a 1-D tensor"):
        A.additive_scores(q, k, w_q, w_k, w_a[:, None])
    with pytest.raises(ValueError, match="k and v must agree"):
        A.additive_attention(q, k, rand(1, 1, 4, 2, gen=gen), w_q, w_k, w_a)
    with pytest.raises(ValueError, match=r"mask must broadcast to \(1, 1, 2, 3\)"):
        A.additive_attention(q, k, v, w_q, w_k, w_a, mask=torch.ones(2, 4, dtype=torch.bool))
