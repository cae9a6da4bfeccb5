"""blocks.py: LayerNorm, FFN, residual scaling, encoder/decoder parity with PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer_lab import attention as A
from transformer_lab import blocks as Bk

D_MODEL, N_HEADS, D_FF = 16, 4, 24


def rand(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=dtype)


# ---------------------------------------------------------------------------------------
# LayerNorm, FFN
# ---------------------------------------------------------------------------------------

def test_layer_norm_matches_torch(gen):
    x = rand(2, 3, 8, gen=gen) * 3 + 1
    w, b = rand(8, gen=gen), rand(8, gen=gen)
    torch.testing.assert_close(Bk.layer_norm(x, w, b), F.layer_norm(x, (8,), w, b))
    y = Bk.layer_norm(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(2, 3), atol=1e-3, rtol=0)
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        Bk.layer_norm(torch.ones(2, 3, dtype=torch.long))


@pytest.mark.parametrize("activation, d_ff, n_params", [
    ("relu", 4 * 12, 12 * 48 + 48 + 48 * 12 + 12),
    ("gelu", 4 * 12, 12 * 48 + 48 + 48 * 12 + 12),
    ("swiglu", 32, 3 * 12 * 32 + 2 * 32 + 12),  # int(8 * 12 / 3) = 32
])
def test_ffn_default_width_and_parameter_count(gen, activation, d_ff, n_params):
    ffn = Bk.FeedForward(12, activation=activation)
    assert ffn.d_ff == d_ff
    assert sum(p.numel() for p in ffn.parameters()) == n_params
    assert ffn(rand(2, 5, 12, gen=gen)).shape == (2, 5, 12)


def test_swiglu_matches_hand_computation(gen):
    ffn = Bk.FeedForward(6, d_ff=10, activation="swiglu", bias=False)
    assert sum(p.numel() for p in ffn.parameters()) == 3 * 6 * 10
    x = rand(3, 6, gen=gen)
    W, V, W2 = ffn.w1.weight.T, ffn.w3.weight.T, ffn.w2.weight.T  # (6,10), (6,10), (10,6)
    a = x @ W
    expected = ((a * torch.sigmoid(a)) * (x @ V)) @ W2  # (Swish_1(xW) * xV) W_2
    torch.testing.assert_close(ffn(x), expected)


def test_relu_and_gelu_ffn_match_hand_computation(gen):
    x = rand(3, 6, gen=gen)
    for act, fn in (("relu", torch.relu), ("gelu", lambda t: 0.5 * t * (1 + torch.erf(t / 2 ** 0.5)))):
        ffn = Bk.FeedForward(6, d_ff=10, activation=act)
        expected = fn(x @ ffn.w1.weight.T + ffn.w1.bias) @ ffn.w2.weight.T + ffn.w2.bias
        torch.testing.assert_close(ffn(x), expected)


def test_bad_choices_are_named():
    with pytest.raises(ValueError, match=r"activation must be one of .*got 'tanh'"):
        Bk.FeedForward(8, activation="tanh")
    with pytest.raises(ValueError, match=r"residual must be one of .*got 'skip'"):
        Bk.EncoderBlock(8, 2, residual="skip")
    with pytest.raises(ValueError, match="d_model=10 must be divisible by n_heads=4"):
        Bk.EncoderBlock(10, 4)
    block = Bk.EncoderBlock(8, 2)
    with pytest.raises(ValueError, match=r"d_model=8\); got shape \(2, 3, 6\)"):
        block(torch.zeros(2, 3, 6))


# ---------------------------------------------------------------------------------------
# Parity with nn.TransformerEncoderLayer / nn.TransformerDecoderLayer
# ---------------------------------------------------------------------------------------

def _randomise(module: nn.Module, gen):
    """Random LayerNorm gains and biases, so that a swapped or skipped norm shows."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, nn.MultiheadAttention):
                m.in_proj_bias.copy_(0.3 * torch.randn(m.in_proj_bias.shape, generator=gen))


def _copy_linear(src: nn.Linear, dst: nn.Linear):
    dst.weight.copy_(src.weight)
    dst.bias.copy_(src.bias)


def _copy_self_attn(src: nn.MultiheadAttention, dst: A.MultiHeadAttention):
    dst.qkv.weight.copy_(src.in_proj_weight)
    dst.qkv.bias.copy_(src.in_proj_bias)
    _copy_linear(src.out_proj, dst.out)


def _copy_norm(src: nn.LayerNorm, dst: nn.LayerNorm):
    dst.weight.copy_(src.weight)
    dst.bias.copy_(src.bias)


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("fast", [True, False])
def test_encoder_block_matches_torch(gen, norm_first, activation, fast):
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(D_MODEL, N_HEADS, D_FF, dropout=0.0, activation=activation,
                                     batch_first=True, norm_first=norm_first)
    _randomise(ref, gen)
    ours = Bk.EncoderBlock(D_MODEL, N_HEADS, D_FF, activation=activation, norm_first=norm_first,
                           fast=fast)
    with torch.no_grad():
        _copy_self_attn(ref.self_attn, ours.attn)
        _copy_linear(ref.linear1, ours.ffn.w1)
        _copy_linear(ref.linear2, ours.ffn.w2)
        _copy_norm(ref.norm1, ours.res_attn.norm)
        _copy_norm(ref.norm2, ours.res_ffn.norm)
    x = rand(2, 6, D_MODEL, gen=gen)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, 4:] = False
    ref.train()  # dropout is 0; training mode keeps PyTorch off its nested-tensor fast path
    expected = ref(x, src_key_padding_mask=~keep)  # PyTorch: True = padding
    got = ours(x, mask=keep[:, None, None, :])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    causal = A.causal_mask(6)
    torch.testing.assert_close(ours(x, mask=causal), ref(x, src_mask=~causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [True, False])
def test_decoder_block_matches_torch(gen, norm_first):
    torch.manual_seed(0)
    d = D_MODEL
    ref = nn.TransformerDecoderLayer(d, N_HEADS, D_FF, dropout=0.0, activation="gelu",
                                     batch_first=True, norm_first=norm_first)
    _randomise(ref, gen)
    ours = Bk.DecoderBlock(d, N_HEADS, D_FF, activation="gelu", norm_first=norm_first)
    with torch.no_grad():
        _copy_self_attn(ref.self_attn, ours.attn)
        ours.cross.q.weight.copy_(ref.multihead_attn.in_proj_weight[:d])
        ours.cross.q.bias.copy_(ref.multihead_attn.in_proj_bias[:d])
        ours.cross.kv.weight.copy_(ref.multihead_attn.in_proj_weight[d:])
        ours.cross.kv.bias.copy_(ref.multihead_attn.in_proj_bias[d:])
        _copy_linear(ref.multihead_attn.out_proj, ours.cross.out)
        _copy_linear(ref.linear1, ours.ffn.w1)
        _copy_linear(ref.linear2, ours.ffn.w2)
        _copy_norm(ref.norm1, ours.res_attn.norm)
        _copy_norm(ref.norm2, ours.res_cross.norm)
        _copy_norm(ref.norm3, ours.res_ffn.norm)
    x, memory = rand(2, 5, d, gen=gen), rand(2, 7, d, gen=gen)
    src_keep = torch.ones(2, 7, dtype=torch.bool)
    src_keep[1, 5:] = False
    causal = A.causal_mask(5)
    expected = ref(x, memory, tgt_mask=~causal, memory_key_padding_mask=~src_keep)
    got = ours(x, memory, mask=causal, memory_mask=src_keep[:, None, None, :])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_decoder_block_without_cross_attention_is_a_gpt_block(gen):
    block = Bk.DecoderBlock(D_MODEL, N_HEADS, cross_attention=False)
    assert not hasattr(block, "cross")
    x = rand(1, 6, D_MODEL, gen=gen)
    causal = A.causal_mask(6)
    y = block(x, mask=causal)
    x2 = x.clone()
    x2[:, 4:] = rand(1, 2, D_MODEL, gen=gen)
    torch.testing.assert_close(block(x2, mask=causal)[:, :4], y[:, :4])
    assert not torch.allclose(block(x2, mask=causal)[:, 4:], y[:, 4:])
    with pytest.raises(ValueError, match="no cross-attention"):
        block(x, rand(1, 3, D_MODEL, gen=gen))
    with pytest.raises(ValueError, match="pass memory"):
        Bk.DecoderBlock(D_MODEL, N_HEADS)(x)


def test_block_returns_attention_weights(gen):
    block = Bk.EncoderBlock(D_MODEL, N_HEADS)
    x = rand(2, 5, D_MODEL, gen=gen)
    y, w = block(x, need_weights=True)
    assert w.shape == (2, N_HEADS, 5, 5)
    torch.testing.assert_close(y, block(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, N_HEADS, 5))


def test_decoder_block_returns_cross_attention_weights(gen):
    torch.manual_seed(0)
    block = Bk.DecoderBlock(D_MODEL, N_HEADS, norm_first=False).eval()
    x, memory = rand(2, 4, D_MODEL, gen=gen), rand(2, 6, D_MODEL, gen=gen)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 4:] = False  # the second source has two padded positions
    causal = A.causal_mask(4)
    y, w_self, w_cross = block(x, memory, mask=causal, memory_mask=keep[:, None, None, :],
                               need_cross_weights=True)
    torch.testing.assert_close(y, block(x, memory, mask=causal, memory_mask=keep[:, None, None, :]),
                               atol=1e-5, rtol=1e-5)
    assert w_self.shape == (2, N_HEADS, 4, 4) and w_cross.shape == (2, N_HEADS, 4, 6)
    torch.testing.assert_close(w_cross.sum(-1), torch.ones(2, N_HEADS, 4))
    assert torch.equal(w_cross[1, ..., 4:], torch.zeros(N_HEADS, 4, 2))  # padded keys get no weight
    assert torch.equal(w_self.triu(1), torch.zeros_like(w_self))  # causal
    # the cross weights are those of the cross-attention on its input (post-norm: LN_1(x + SA(x)))
    h = block.res_attn(x, lambda t: block.attn(t, mask=causal))
    _, expected = block.cross(h, context=memory, mask=keep[:, None, None, :], need_weights=True)
    torch.testing.assert_close(w_cross, expected)
    with pytest.raises(ValueError, match="no cross-attention"):
        Bk.DecoderBlock(D_MODEL, N_HEADS, cross_attention=False)(x, need_cross_weights=True)


# ---------------------------------------------------------------------------------------
# Residual scaling: ReZero, LayerScale, DeepNorm
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [Bk.EncoderBlock, Bk.DecoderBlock])
def test_rezero_block_is_identity_at_init(gen, cls):
    block = cls(D_MODEL, N_HEADS, residual="rezero")
    assert not any(isinstance(m, nn.LayerNorm) for m in block.modules())  # ReZero drops LN
    gains = [p for n, p in block.named_parameters() if n.endswith("gain")]
    assert gains and all(g.shape == (1,) and g.item() == 0.0 for g in gains)
    x = rand(2, 5, D_MODEL, gen=gen)
    args = (x, rand(2, 3, D_MODEL, gen=gen)) if cls is Bk.DecoderBlock else (x,)
    assert torch.equal(block(*args), x)
    with torch.no_grad():
        for g in gains:
            g.fill_(0.5)
    assert not torch.allclose(block(*args), x)
    # the gains still receive gradient at 0, so training can move them
    with torch.no_grad():
        for g in gains:
            g.zero_()
    block(*args).pow(2).sum().backward()
    assert all(g.grad is not None and g.grad.abs().item() > 0 for g in gains)


def test_layerscale_init_and_effect(gen):
    block = Bk.EncoderBlock(D_MODEL, N_HEADS, residual="layerscale")
    for res in (block.res_attn, block.res_ffn):
        assert res.gain.shape == (D_MODEL,)
        assert torch.equal(res.gain.detach(), torch.full((D_MODEL,), 1e-4))
    plain = Bk.EncoderBlock(D_MODEL, N_HEADS)
    plain.load_state_dict(block.state_dict(), strict=False)
    x = rand(2, 5, D_MODEL, gen=gen)
    change_scaled = (block(x) - x).abs().max()
    change_plain = (plain(x) - x).abs().max()
    assert change_scaled < 1e-3 < change_plain
    # per-channel: x + diag(lambda) f(LN(x)) with lambda = 1e-4 (one sub-layer at a time)
    res = block.res_attn
    f = block.attn
    torch.testing.assert_close(res(x, f), x + 1e-4 * f(res.norm(x)))


def test_deepnorm_constants_follow_wang_et_al():
    alpha, beta = Bk.deepnorm_constants(6)
    assert alpha == pytest.approx(12 ** 0.25)  # (2N)^(1/4)
    assert beta == pytest.approx(48 ** -0.25)  # (8N)^(-1/4)
    assert Bk.deepnorm_constants(1) == pytest.approx((2 ** 0.25, 8 ** -0.25))
    with pytest.raises(ValueError, match="n_layers"):
        Bk.deepnorm_constants(0)


def test_deepnorm_block_forward_and_init(gen):
    torch.manual_seed(0)
    N, d = 6, 64
    block = Bk.EncoderBlock(d, 4, d_ff=256, residual="deepnorm", n_layers=N)
    alpha, beta = Bk.deepnorm_constants(N)
    assert block.res_attn.alpha == pytest.approx(alpha) and not block.norm_first
    # forward: LN(alpha x + f(x)), post-norm
    x = rand(2, 5, d, gen=gen)
    h = block.res_attn.norm(alpha * x + block.attn(x))
    expected = block.res_ffn.norm(alpha * h + block.ffn(h))
    torch.testing.assert_close(block(x), expected)
    # init: Xavier normal, gain beta for W^V, W^O and the FFN; gain 1 for W^Q, W^K
    w = block.attn.qkv.weight.detach()
    xavier = (2 / (d + d)) ** 0.5
    assert w[:d].std().item() == pytest.approx(xavier, rel=0.1)  # W^Q
    assert w[d:2 * d].std().item() == pytest.approx(xavier, rel=0.1)  # W^K
    assert w[2 * d:].std().item() == pytest.approx(beta * xavier, rel=0.1)  # W^V
    assert block.attn.out.weight.std().item() == pytest.approx(beta * xavier, rel=0.1)
    ffn_xavier = (2 / (d + 256)) ** 0.5
    assert block.ffn.w1.weight.std().item() == pytest.approx(beta * ffn_xavier, rel=0.1)
    assert block.ffn.w2.weight.std().item() == pytest.approx(beta * ffn_xavier, rel=0.1)
