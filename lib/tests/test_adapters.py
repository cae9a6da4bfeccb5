"""adapters.py: identity at initialisation, LoRA merge and parity with peft, prefixes in every
layer, soft prompts, parameter counts by formula, PET scoring, and clear errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer_lab import adapters as AD
from transformer_lab import attention as A
from transformer_lab.models import ModelConfig, TransformerClassifier, TransformerLM

V, D_MODEL, H, N_LAYERS = 13, 16, 4, 3


def lm(positions="sinusoidal", seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, d_model=D_MODEL, n_heads=H, n_layers=N_LAYERS, d_ff=32,
                      max_len=64, positions=positions, **kw)
    return TransformerLM(cfg).to(dtype).eval()


def classifier(pooling="cls", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, d_model=D_MODEL, n_heads=H, n_layers=2, d_ff=32, max_len=32,
                      n_classes=3, pooling=pooling)
    return TransformerClassifier(cfg).eval()


def ids(gen, B=2, L=7):
    return torch.randint(0, V, (B, L), generator=gen)


def randomise(module, gen, std=0.3):
    """Give every trainable (new) parameter a non-zero value, as training would."""
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def trainable(module):
    return {n for n, p in module.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- bottleneck adapters
def test_adapter_at_init_is_the_identity(gen):
    ad = AD.BottleneckAdapter(D_MODEL, 4)
    h = torch.randn(3, 5, D_MODEL, generator=gen) * 10
    assert torch.equal(ad(h), h)
    assert torch.equal(ad.delta(h), torch.zeros_like(h))


def test_adapter_formula(gen):
    ad = AD.BottleneckAdapter(D_MODEL, 4, activation="gelu")
    randomise(ad, gen)
    h = torch.randn(2, 3, D_MODEL, generator=gen)
    by_hand = h + F.gelu(h @ ad.down.weight.T + ad.down.bias) @ ad.up.weight.T + ad.up.bias
    torch.testing.assert_close(ad(h), by_hand)
    assert AD.count_parameters(ad) == AD.adapter_parameters(D_MODEL, 4) == 2 * 16 * 4 + 4 + 16


@pytest.mark.parametrize("placement", AD.PLACEMENTS)
def test_adapted_model_starts_equal_to_the_pretrained_one(placement, gen):
    base = lm()
    x = ids(gen)
    with torch.no_grad():
        before = base(x)
    adapted = AD.add_adapters(copy.deepcopy(base), 4, placement)
    with torch.no_grad():
        after = adapted(x)
    assert (after - before).abs().max() < 1e-6
    randomise(adapted, gen)  # trained adapters do change the output
    with torch.no_grad():
        assert (adapted(x) - before).abs().max() > 1e-3


@pytest.mark.parametrize("placement, per_block", [("houlsby", 2), ("pfeiffer", 1), ("parallel", 1)])
def test_adapter_counts_and_only_adapters_train(placement, per_block, gen):
    model = AD.add_adapters(lm(), 5, placement)
    assert AD.count_parameters(model, trainable_only=True) == \
        N_LAYERS * per_block * AD.adapter_parameters(D_MODEL, 5)
    assert all(".adapter." in n for n in trainable(model))
    loss = model(ids(gen)).square().mean()
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    ups = [p.grad for n, p in model.named_parameters() if n.endswith("adapter.up.weight")]
    assert len(ups) == N_LAYERS * per_block and all(g.abs().sum() > 0 for g in ups)


def test_placements_put_the_adapter_where_the_papers_do(gen):
    h = lm()
    AD.add_adapters(h, 4, "houlsby")
    assert all(isinstance(b.attn, AD.SerialAdapter) and isinstance(b.ffn, AD.SerialAdapter) for b in h.blocks)
    p = lm()
    AD.add_adapters(p, 4, "pfeiffer")
    assert all(isinstance(b.attn, A.MultiHeadAttention) and isinstance(b.ffn, AD.SerialAdapter) for b in p.blocks)
    q = lm()
    AD.add_adapters(q, 4, "parallel", scale=2.0)
    blk = q.blocks[0]
    assert isinstance(blk.ffn, AD.ParallelAdapter)
    randomise(q, gen)
    t = torch.randn(2, 3, D_MODEL, generator=gen)  # the FFN's input, LN(x) in a pre-norm block
    expected = blk.ffn.sublayer(t) + 2.0 * blk.ffn.adapter.delta(t)  # no adapter residual
    torch.testing.assert_close(blk.ffn(t), expected)


def test_serial_adapter_keeps_attention_weights(gen):
    mha = A.MultiHeadAttention(D_MODEL, H)
    wrapped = AD.SerialAdapter(mha, AD.BottleneckAdapter(D_MODEL, 2))
    randomise(wrapped.adapter, gen)
    x = torch.randn(2, 5, D_MODEL, generator=gen)
    out, w = wrapped(x, need_weights=True)
    ref_out, ref_w = mha(x, need_weights=True)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(out, wrapped.adapter(ref_out))


def test_adapters_on_an_encoder_decoder_model(gen):
    from transformer_lab.models import EncoderDecoder
    torch.manual_seed(0)
    model = EncoderDecoder(ModelConfig(vocab_size=V, d_model=D_MODEL, n_heads=H, n_layers=2)).eval()
    src, tgt = ids(gen), ids(gen, L=4)
    with torch.no_grad():
        before = model(src, tgt)
        after = AD.add_adapters(model, 3, "houlsby")(src, tgt)
    assert (after - before).abs().max() < 1e-6
    assert AD.count_parameters(model, True) == 2 * 2 * 2 * AD.adapter_parameters(D_MODEL, 3)


# ---------------------------------------------------------------- LoRA
def test_lora_starts_as_the_base_layer_and_only_A_B_train(gen):
    base = nn.Linear(6, 5)
    lora = AD.LoRALinear(base, r=2, alpha=4)
    x = torch.randn(3, 6, generator=gen)
    torch.testing.assert_close(lora(x), base(x), rtol=0, atol=0)
    assert torch.equal(lora.B, torch.zeros(5, 2)) and lora.A.abs().sum() > 0
    assert trainable(lora) == {"A", "B"} and lora.scaling == 2.0
    assert AD.count_parameters(lora, True) == AD.lora_parameters(6, 5, 2) == 2 * (6 + 5)


def test_lora_forward_formula_and_merge(gen):
    base = nn.Linear(8, 6)
    lora = AD.LoRALinear(base, r=3, alpha=6)
    randomise(lora, gen)
    W = base.weight.detach().clone()
    x = torch.randn(4, 2, 8, generator=gen)
    by_hand = x @ (W + 2.0 * lora.B @ lora.A).T + base.bias  # x (W + (alpha/r) B A)^T + b
    unmerged = lora(x)
    torch.testing.assert_close(unmerged, by_hand)
    assert torch.linalg.matrix_rank(lora.delta_weight()) <= 3
    lora.merge()
    assert lora.merged
    torch.testing.assert_close(lora(x), unmerged, atol=1e-6, rtol=1e-5)  # merged == unmerged
    torch.testing.assert_close(base.weight, W + lora.delta_weight())
    with pytest.raises(RuntimeError, match="already merged"):
        lora.merge()
    lora.unmerge()
    torch.testing.assert_close(base.weight, W, atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="not merged"):
        lora.unmerge()


def test_lora_matches_peft_linear(gen):
    """Parity with an independent implementation: peft's LoRA Linear with the same A, B, alpha/r."""
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import Linear as PeftLoraLinear

    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    ref = PeftLoraLinear(copy.deepcopy(base), "default",
                         config=peft.LoraConfig(r=4, lora_alpha=6, lora_dropout=0.0), r=4, lora_alpha=6)
    ours = AD.LoRALinear(copy.deepcopy(base), r=4, alpha=6)
    with torch.no_grad():
        ours.A.copy_(torch.randn(4, 12, generator=gen))
        ours.B.copy_(torch.randn(10, 4, generator=gen))
        ref.lora_A["default"].weight.copy_(ours.A)  # peft: lora_A (r, d_in), lora_B (d_out, r)
        ref.lora_B["default"].weight.copy_(ours.B)
    assert ref.scaling["default"] == ours.scaling == 1.5
    x = torch.randn(3, 5, 12, generator=gen)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.delta_weight(), ref.get_delta_weight("default"))
    ref.merge()
    ours.merge()
    torch.testing.assert_close(ours.base.weight, ref.base_layer.weight)
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("targets", [("qkv",), ("qkv", "out"), ("w1", "w2"), ("head",)])
def test_add_lora_counts_and_merged_model_equals_unmerged(targets, gen):
    model = AD.add_lora(lm(), r=2, alpha=4, targets=targets)
    sizes = {"qkv": (D_MODEL, 3 * D_MODEL), "out": (D_MODEL, D_MODEL), "w1": (D_MODEL, 32),
             "w2": (32, D_MODEL), "head": (D_MODEL, V)}
    per_layer = sum(AD.lora_parameters(*sizes[t], 2) for t in targets if t != "head")
    expected = N_LAYERS * per_layer + (AD.lora_parameters(D_MODEL, V, 2) if "head" in targets else 0)
    assert AD.count_parameters(model, trainable_only=True) == expected
    assert {n.rsplit(".", 1)[-1] for n in trainable(model)} == {"A", "B"}
    randomise(model, gen)
    x = ids(gen)
    with torch.no_grad():
        unmerged = model(x)
        assert AD.merge_lora(model) == len(AD.lora_layers(model)) > 0
        merged = model(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)


def test_lora_gradients_reach_only_A_and_B(gen):
    model = AD.add_lora(lm(), r=2, targets=("qkv", "out"))
    model(ids(gen)).square().mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == n.endswith((".A", ".B")), n
    # B = 0 at init: A's gradient is zero at first, B's is not (Hu et al.: B A = 0 at the start)
    assert all(l.A.grad.abs().max() == 0 and l.B.grad.abs().max() > 0 for l in AD.lora_layers(model))


# ---------------------------------------------------------------- prefix tuning
def test_prefix_attention_equals_concatenation_by_hand(gen):
    q = torch.randn(2, H, 5, 4, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, H, 6, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    pk, pv = (torch.randn(H, 3, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = A.causal_mask(5, 6)
    out = AD.prefix_attention(q, k, v, pk, pv, mask)
    K = torch.cat([pk.expand(2, -1, -1, -1), k], dim=2)
    Vv = torch.cat([pv.expand(2, -1, -1, -1), v], dim=2)
    scores = q @ K.transpose(-1, -2) / 2.0
    keep = torch.cat([torch.ones(5, 3, dtype=torch.bool), mask], dim=1)
    w = torch.softmax(scores.masked_fill(~keep, -math.inf), dim=-1)
    torch.testing.assert_close(out, w @ Vv)
    assert out.dtype == torch.float64
    # a query whose real keys are all hidden still reads the prefix (no zeros, no NaN)
    none = torch.zeros(1, 1, 1, 6, dtype=torch.bool)
    only = AD.prefix_attention(q, k, v, pk, pv, none)
    wp = torch.softmax(q @ pk.transpose(-1, -2) / 2.0, dim=-1)
    torch.testing.assert_close(only, wp @ pv)


@pytest.mark.parametrize("make", [lambda: lm(), lambda: lm("rope"), lambda: classifier("cls"),
                                  lambda: classifier("mean")])
def test_prefix_reaches_every_layers_keys_and_values(make, gen):
    model = make()
    tuned = AD.PrefixTuning(model, n_prefix=3, generator=gen)
    assert trainable(tuned) == {"prefix_k", "prefix_v"}
    n_layers = len(model.blocks)
    assert AD.count_parameters(tuned, True) == AD.prefix_parameters(3, D_MODEL, n_layers)
    seen = []

    def spy(module, args, kwargs, output):
        seen.append((kwargs["kv_prefix"][0], kwargs["kv_prefix"][1]))

    hooks = [b.attn.register_forward_hook(spy, with_kwargs=True) for b in model.blocks]
    x = ids(gen)
    out = tuned(x)
    for h in hooks:
        h.remove()
    assert len(seen) == n_layers  # every layer's attention got a prefix ...
    for l, (pk, pv) in enumerate(seen):  # ... and it is that layer's own parameters
        assert torch.equal(pk, tuned.prefix_k[l]) and torch.equal(pv, tuned.prefix_v[l])
    out.square().mean().backward()
    for l in range(n_layers):  # and each layer's keys and values get a gradient
        assert tuned.prefix_k.grad[l].abs().sum() > 0 and tuned.prefix_v.grad[l].abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        for l in range(n_layers):  # changing one layer's prefix changes the output
            before = tuned(x)
            tuned.prefix_v[l] += 1.0
            assert not torch.allclose(tuned(x), before)


def test_prefix_classifier_ignores_padding(gen):
    tuned = AD.PrefixTuning(classifier("mean"), 2, generator=gen)
    x = ids(gen, B=2, L=6)
    keep = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    with torch.no_grad():
        out = tuned(x, keep)
        x2 = x.clone()
        x2[1, 3:] = (x2[1, 3:] + 1) % V  # change only the padding
        torch.testing.assert_close(tuned(x2, keep), out)
        torch.testing.assert_close(tuned(x[1:, :3])[0], out[1], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- prompt tuning
def test_prompt_tuning_lm_shapes_gradients_and_effect(gen):
    model = lm()
    tuned = AD.PromptTuning(model, n_prompt=4, generator=gen)
    assert trainable(tuned) == {"prompt"}
    assert AD.count_parameters(tuned, True) == AD.prompt_parameters(4, D_MODEL)
    vocab_rows = model.tok.weight.detach()
    assert all(any(torch.equal(p, r) for r in vocab_rows) for p in tuned.prompt.detach())  # "vocab" init
    x = ids(gen)
    out = tuned(x)
    assert out.shape == (2, 7, V)
    out.square().mean().backward()
    assert tuned.prompt.grad.abs().sum() > 0 and all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert not torch.allclose(tuned(x), model(x))
        # a causal model: the prompt is in every token's past, and the future still is not
        x2 = x.clone()
        x2[:, -1] = (x2[:, -1] + 1) % V
        torch.testing.assert_close(tuned(x2)[:, :-1], tuned(x)[:, :-1])


def test_prompt_tuning_runs_the_frozen_model_on_prompt_then_input(gen):
    """With a score-level scheme the soft prompt is exactly a prefix of embedded tokens."""
    model = lm("rope")
    tuned = AD.PromptTuning(model, n_prompt=3, generator=gen)
    x = ids(gen)
    tokens = torch.randint(0, V, (3,), generator=gen)
    with torch.no_grad():
        tuned.prompt.copy_(model.tok.weight[tokens])  # a prompt equal to three real tokens
        expected = model(torch.cat([tokens.expand(2, -1), x], dim=1))[:, 3:]
        torch.testing.assert_close(tuned(x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_prompt_tuning_classifier(pooling, gen):
    tuned = AD.PromptTuning(classifier(pooling), n_prompt=2, init="random", generator=gen)
    x = ids(gen, B=2, L=6)
    keep = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    with torch.no_grad():
        out = tuned(x, keep)
        assert out.shape == (2, 3)
        x2 = x.clone()
        x2[1, 4:] = (x2[1, 4:] + 3) % V  # padding changes nothing
        torch.testing.assert_close(tuned(x2, keep), out)


# ---------------------------------------------------------------- PET
def test_sequence_log_prob_by_hand(gen):
    logits = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    seq = torch.tensor([[1, 2, 3, 4], [0, 4, 4, 0]])
    keep = torch.tensor([[True] * 4, [True, True, True, False]])
    lp = torch.log_softmax(logits, -1)
    row0 = lp[0, 0, 2] + lp[0, 1, 3] + lp[0, 2, 4]  # token t scored by the logits at t - 1
    row1 = lp[1, 0, 4] + lp[1, 1, 4]  # the padded last token is not scored
    got = AD.sequence_log_prob(logits, seq, keep)
    torch.testing.assert_close(got, torch.stack([row0, row1]))
    assert got.dtype == torch.float64
    torch.testing.assert_close(AD.sequence_log_prob(logits, seq)[0], row0)


def test_pet_scores_match_a_manual_loop():
    from transformer_lab.data import CharTokenizer

    tok = CharTokenizer.from_text("abcdef (\n")
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_heads=2, n_layers=1,
                                      max_len=32)).eval()
    inputs, verbalizer = ["abc", "fe"], ["dd", "e"]
    scores = AD.pet_scores(model, tok, inputs, "\n{mask} {x}(", verbalizer, batch_size=1)
    assert scores.shape == (2, 2)
    for i, x in enumerate(inputs):
        for j, word in enumerate(verbalizer):
            s = tok.encode(f"\n{word} {x}(")
            with torch.no_grad():
                lp = torch.log_softmax(model(s[None])[0], -1)
            expected = sum(lp[t - 1, s[t]] for t in range(1, len(s)))
            assert scores[i, j].item() == pytest.approx(expected.item(), abs=1e-4)
    assert AD.fill_pattern("<{mask}|{x}>", "in", "w") == "<w|in>"


# ---------------------------------------------------------------- dtype and device
def test_float64_models_get_float64_parameters(gen):
    model = lm(dtype=torch.float64)
    AD.add_adapters(model, 2, "houlsby")
    AD.add_lora(model, 2, targets=("out",))
    assert all(p.dtype == torch.float64 for p in model.parameters())
    out = model(ids(gen))
    assert out.dtype == torch.float64
    tuned = AD.PrefixTuning(lm(dtype=torch.float64), 2)
    assert tuned.prefix_k.dtype == torch.float64 and tuned(ids(gen)).dtype == torch.float64


@pytest.mark.cuda
def test_everything_runs_on_cuda(gen):
    x = ids(gen).cuda()
    for make in (lambda m: AD.add_adapters(m, 4, "houlsby"), lambda m: AD.add_lora(m, 2, targets=("qkv",)),
                 lambda m: AD.PromptTuning(m, 3), lambda m: AD.PrefixTuning(m, 3)):
        model = make(lm().cuda())
        out = model(x)
        out.square().mean().backward()
        assert out.device.type == "cuda"
        assert all(p.device.type == "cuda" for p in model.parameters())


# ---------------------------------------------------------------- bad input
def test_bad_input_is_named():
    base = nn.Linear(8, 4)
    with pytest.raises(ValueError, match=r"r must be between 1 and min\(d_in, d_out\) = 4 .*got r=0"):
        AD.LoRALinear(base, 0)
    with pytest.raises(ValueError, match=r"= 4 for a Linear\(8 -> 4\); got r=5"):
        AD.LoRALinear(base, 5)
    with pytest.raises(TypeError, match="LoRA wraps an nn.Linear; got Conv1d"):
        AD.LoRALinear(nn.Conv1d(2, 2, 1), 1)
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        AD.LoRALinear(base, 2, alpha=0)
    with pytest.raises(ValueError, match="bottleneck must be >= 1 .*hidden width m.*got bottleneck=0"):
        AD.BottleneckAdapter(8, 0)
    with pytest.raises(ValueError, match="bottleneck must be >= 1"):
        AD.add_adapters(lm(), 0)
    with pytest.raises(ValueError, match=r"placement must be one of \('houlsby', 'pfeiffer', 'parallel'\); got 'serial'"):
        AD.add_adapters(lm(), 4, "serial")
    with pytest.raises(ValueError, match=r"unknown target module name\(s\) \['query'\]: TransformerLM has "
                                         r"nn.Linear modules named \['head', 'out', 'qkv', 'w1', 'w2'\]"):
        AD.add_lora(lm(), 2, targets=("qkv", "query"))
    with pytest.raises(ValueError, match="n_prompt must be >= 1 .*got n_prompt=0"):
        AD.PromptTuning(lm(), 0)
    with pytest.raises(ValueError, match="n_prefix must be >= 1 .*got n_prefix=0"):
        AD.PrefixTuning(lm(), 0)
    with pytest.raises(TypeError, match="wraps the library's TransformerLM or TransformerClassifier; got Linear"):
        AD.PromptTuning(nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="h must have last dim d_model=8"):
        AD.BottleneckAdapter(8, 2)(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="activation must be one of"):
        AD.BottleneckAdapter(8, 2, activation="swish")


def test_bad_patterns_and_sequences_are_named():
    with pytest.raises(ValueError, match="pattern must contain"):
        AD.fill_pattern("no blank {x}", "a", "b")
    with pytest.raises(ValueError, match=r"ids must be an integer tensor of shape \(2, 3\)"):
        AD.sequence_log_prob(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
