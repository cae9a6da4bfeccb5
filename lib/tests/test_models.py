"""models.py: causality, pooling, seq2seq, generation, configuration errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transformer_lab import models as M
from transformer_lab import positions as P

V = 13
TINY = dict(vocab_size=V, d_model=16, n_heads=2, n_layers=2, max_len=16)


def ids(gen, B=2, L=8):
    return torch.randint(0, V, (B, L), generator=gen)


# ---------------------------------------------------------------------------------------
# The causal LM
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("positions", P.POSITION_SCHEMES)
def test_lm_logits_at_t_ignore_tokens_after_t(gen, positions):
    torch.manual_seed(0)
    model = M.build_model("lm", **TINY, positions=positions).eval()
    x = ids(gen, L=10)
    t = 5
    x2 = x.clone()
    x2[:, t + 1:] = (x2[:, t + 1:] + 1 + torch.randint(0, V - 1, x2[:, t + 1:].shape, generator=gen)) % V
    assert (x2[:, t + 1:] != x[:, t + 1:]).all()
    y, y2 = model(x), model(x2)
    assert y.shape == (2, 10, V)
    torch.testing.assert_close(y[:, : t + 1], y2[:, : t + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y[:, t + 1:], y2[:, t + 1:])  # later positions do see them


@pytest.mark.parametrize("config", [
    dict(fast=False), dict(norm_first=False), dict(residual="layerscale"),
    dict(residual="deepnorm"), dict(activation="swiglu"), dict(dropout=0.1),
])
def test_lm_variants_stay_causal(gen, config):
    torch.manual_seed(0)
    model = M.build_model("lm", **TINY, **config).eval()
    x = ids(gen, L=7)
    x2 = x.clone()
    x2[:, 4:] = (x2[:, 4:] + 3) % V
    torch.testing.assert_close(model(x)[:, :4], model(x2)[:, :4], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", P.POSITION_SCHEMES)
def test_lm_runs_past_max_len(gen, positions):
    model = M.build_model("lm", **{**TINY, "max_len": 8}, positions=positions).eval()
    y = model(ids(gen, B=1, L=20))
    assert y.shape == (1, 20, V) and torch.isfinite(y).all()


def test_lm_final_norm_only_for_pre_norm():
    assert isinstance(M.build_model("lm", **TINY).norm, nn.LayerNorm)
    assert isinstance(M.build_model("lm", **TINY, norm_first=False).norm, nn.Identity)
    assert isinstance(M.build_model("lm", **TINY, residual="deepnorm").norm, nn.Identity)


def test_lm_trains_a_little(gen):
    torch.manual_seed(0)
    model = M.build_model("lm", **TINY)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = ids(gen, B=2, L=9)
    losses = []
    for _ in range(8):
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_generate(gen):
    torch.manual_seed(0)
    model = M.build_model("lm", **TINY, dropout=0.3).train()
    prompt = ids(gen, B=2, L=3)
    out = model.generate(prompt, 5, generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 8) and torch.equal(out[:, :3], prompt)
    assert out.min() >= 0 and out.max() < V
    again = model.generate(prompt, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)  # seeded sampling, and dropout off while generating
    assert model.training  # mode restored
    greedy = model.generate(prompt, 1, temperature=0)
    model.eval()
    assert torch.equal(greedy[:, -1], model(prompt)[:, -1].argmax(-1))
    long = model.generate(ids(gen, B=1, L=15), 4, temperature=0.5)  # crops to max_len
    assert long.shape == (1, 19)


# ---------------------------------------------------------------------------------------
# The classifier: [CLS] and mean pooling
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("positions", ["sinusoidal", "alibi"])
def test_classifier_ignores_padded_tokens(gen, pooling, positions):
    torch.manual_seed(0)
    model = M.build_model("classifier", **TINY, n_classes=3, pooling=pooling,
                          positions=positions).eval()
    x = ids(gen, B=2, L=8)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, 5:] = False
    keep[1, 2:] = False
    x2 = x.clone()
    x2[~keep] = (x2[~keep] + 1) % V  # change only the padding
    y = model(x, padding_mask=keep)
    assert y.shape == (2, 3)
    torch.testing.assert_close(model(x2, padding_mask=keep), y, atol=1e-5, rtol=1e-5)
    # without the mask the same change does matter: the test can tell
    assert not torch.allclose(model(x2), model(x))


def test_cls_and_mean_pooling_differ(gen):
    torch.manual_seed(0)
    cls = M.build_model("classifier", **TINY, n_classes=2, pooling="cls")
    mean = M.build_model("classifier", **TINY, n_classes=2, pooling="mean")
    assert isinstance(cls.cls, nn.Parameter) and cls.cls.shape == (1, 1, 16)
    assert not hasattr(mean, "cls")
    x = ids(gen, B=2, L=5)
    h, _ = cls.encode(x)
    assert h.shape == (2, 6, 16)  # [CLS] + 5 tokens
    torch.testing.assert_close(cls.pool(h, None), h[:, 0])
    h, _ = mean.encode(x)
    keep = torch.tensor([[True] * 5, [True, True, False, False, False]])
    torch.testing.assert_close(mean.pool(h, keep)[1], h[1, :2].mean(0))


def test_classifier_needs_n_classes():
    with pytest.raises(ValueError, match="n_classes"):
        M.build_model("classifier", **TINY)


# ---------------------------------------------------------------------------------------
# The encoder-decoder
# ---------------------------------------------------------------------------------------

def test_encoder_decoder(gen):
    torch.manual_seed(0)
    model = M.build_model("seq2seq", **TINY, positions="rope").eval()
    src, tgt = ids(gen, B=2, L=7), ids(gen, B=2, L=5)
    y = model(src, tgt)
    assert y.shape == (2, 5, V)
    # the decoder is causal
    tgt2 = tgt.clone()
    tgt2[:, 3:] = (tgt2[:, 3:] + 1) % V
    torch.testing.assert_close(model(src, tgt2)[:, :3], y[:, :3], atol=1e-5, rtol=1e-5)
    # every target position sees the whole source
    src2 = src.clone()
    src2[:, -1] = (src2[:, -1] + 1) % V
    assert not torch.allclose(model(src2, tgt)[:, 0], y[:, 0])
    # padded source tokens are invisible
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[:, 5:] = False
    src3 = src.clone()
    src3[:, 5:] = (src3[:, 5:] + 1) % V
    torch.testing.assert_close(model(src3, tgt, src_padding_mask=keep),
                               model(src, tgt, src_padding_mask=keep), atol=1e-5, rtol=1e-5)


def test_encoder_decoder_shares_and_scales_embeddings(gen):
    torch.manual_seed(0)
    model = M.build_model("seq2seq", **TINY).eval()
    assert model.head.weight is model.tok.weight  # logits = h E^T (Vaswani et al. 3.4)
    src = ids(gen, B=2, L=5)
    torch.testing.assert_close(model.embed(src), model.tok(src) * 16 ** 0.5)
    assert 0.5 < model.embed(src).std().item() < 2.0  # E ~ N(0, 1/d_model): unit scale after sqrt(d)
    n_shared = sum(p.numel() for p in model.parameters())
    untied = M.EncoderDecoder(M.ModelConfig(**TINY), tie_embeddings=False, scale_embeddings=False)
    assert sum(p.numel() for p in untied.parameters()) == n_shared + V * 16
    torch.testing.assert_close(untied.embed(src), untied.tok(src))
    # a tied model learns one matrix: its gradient gathers the embedding and the output uses
    model.train()
    model(src, ids(gen, B=2, L=3)).sum().backward()
    assert model.tok.weight.grad is not None and model.head.weight.grad is model.tok.weight.grad


def test_greedy_decode_matches_step_by_step_argmax(gen):
    torch.manual_seed(0)
    model = M.build_model("seq2seq", **TINY, dropout=0.1).train()
    src = ids(gen, B=3, L=6)
    out = model.greedy_decode(src, 4, bos=0)
    assert out.shape == (3, 4) and out.dtype == torch.long and model.training  # mode restored
    model.eval()
    tgt = torch.zeros(3, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(4):  # the slow way: the whole model on the prefix, argmax of the last step
            tgt = torch.cat([tgt, model(src, tgt)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, tgt[:, 1:])
    with pytest.raises(ValueError, match="n_steps must be a positive int"):
        model.greedy_decode(src, 0, bos=0)
    with pytest.raises(ValueError, match="bos must be a token id"):
        model.greedy_decode(src, 2, bos=V)


def test_encoder_decoder_attention_maps(gen):
    torch.manual_seed(0)
    model = M.build_model("seq2seq", **TINY).train()
    src, tgt = ids(gen, B=2, L=7), ids(gen, B=2, L=5)
    maps = model.attention_maps(src, tgt)
    assert model.training  # mode restored
    assert [w.shape for w in maps["encoder"]] == [(2, 2, 7, 7)] * 2
    assert [w.shape for w in maps["decoder"]] == [(2, 2, 5, 5)] * 2
    assert [w.shape for w in maps["cross"]] == [(2, 2, 5, 7)] * 2
    for w in maps["decoder"]:
        assert torch.equal(w.triu(1), torch.zeros_like(w))  # the decoder's self-attention is causal
    for ws in maps.values():
        for w in ws:
            torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    model.eval()
    with torch.no_grad():  # the maps come from the same pass that gives the logits
        memory, enc_w = model.encode(src, need_weights=True)
        logits, _, cross = model.decode(tgt, memory, need_weights=True)
    torch.testing.assert_close(logits, model(src, tgt))
    torch.testing.assert_close(cross[1], maps["cross"][1])


def test_encoder_decoder_has_cross_attention():
    model = M.build_model("seq2seq", **TINY)
    assert all(block.cross_attention for block in model.decoder)
    assert len(model.encoder) == len(model.decoder) == 2


# ---------------------------------------------------------------------------------------
# Bad input and configuration
# ---------------------------------------------------------------------------------------

def test_token_ids_out_of_range(gen):
    model = M.build_model("lm", **TINY)
    with pytest.raises(ValueError, match=r"\[0, vocab_size=13\); got min 0, max 13"):
        model(torch.tensor([[0, 13]]))
    with pytest.raises(ValueError, match=r"vocab_size=13\); got min -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer.*got torch.float32"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"2-D tensor \(batch, seq\); got shape \(3,\)"):
        model(torch.tensor([1, 2, 3]))
    clf = M.build_model("classifier", **TINY, n_classes=2)
    with pytest.raises(ValueError, match="vocab_size=13"):
        clf(torch.tensor([[99]]))
    with pytest.raises(ValueError, match=r"padding_mask must have the shape .*\(1, 3\); got \(1, 2\)"):
        clf(torch.tensor([[1, 2, 3]]), padding_mask=torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding_mask must be a boolean"):
        clf(torch.tensor([[1, 2, 3]]), padding_mask=torch.ones(1, 3))
    s2s = M.build_model("seq2seq", **TINY)
    with pytest.raises(ValueError, match="tgt token ids"):
        s2s(torch.tensor([[1, 2]]), torch.tensor([[1, 20]]))


def test_config_errors():
    with pytest.raises(ValueError, match="d_model=10 must be divisible by n_heads=4"):
        M.ModelConfig(vocab_size=5, d_model=10, n_heads=4)
    with pytest.raises(ValueError, match=r"positions must be one of .*got 'absolute'"):
        M.ModelConfig(vocab_size=5, positions="absolute")
    with pytest.raises(ValueError, match=r"pooling must be one of .*got 'max'"):
        M.ModelConfig(vocab_size=5, pooling="max")
    with pytest.raises(ValueError, match=r"kind must be one of .*got 'gpt'"):
        M.build_model("gpt", vocab_size=5)
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        M.ModelConfig(vocab_size=0)


def test_config_chooses_parts_by_name():
    model = M.build_model("lm", **TINY, positions="alibi", norm_first=False, activation="swiglu",
                          residual="layerscale")
    assert isinstance(model.positions, P.ALiBi)
    block = model.blocks[0]
    assert not block.norm_first and block.ffn.activation == "swiglu"
    assert block.res_attn.gain.shape == (16,)
    assert M.config_dict(model)["positions"] == "alibi"


def test_t5_buckets_are_one_directional_in_causal_stacks():
    assert not M.build_model("lm", **TINY, positions="t5").positions.bidirectional
    s2s = M.build_model("seq2seq", **TINY, positions="t5")
    assert s2s.enc_positions.bidirectional and not s2s.dec_positions.bidirectional
    clf = M.build_model("classifier", **TINY, positions="t5", n_classes=2)
    assert clf.positions.bidirectional
