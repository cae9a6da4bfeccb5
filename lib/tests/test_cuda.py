"""Device- and dtype-agnostic: everything runs where its input lives, in its input's dtype.

Tests parametrised with ``"cuda"`` carry the ``cuda`` marker and are skipped when
``torch.cuda.is_available()`` is False (see conftest.py); the CPU cases always run.
"""

from __future__ import annotations

import pytest
import torch

from transformer_lab import attention as A
from transformer_lab import blocks as Bk
from transformer_lab import models as M

CUDA = pytest.param("cuda", marks=pytest.mark.cuda)
DEVICES = ["cpu", CUDA]
V = 11
TINY = dict(vocab_size=V, d_model=16, n_heads=2, n_layers=2, max_len=16)


def _forward_backward(module, *inputs, **kwargs):
    out = module(*inputs, **kwargs)
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fast", [True, False])
def test_attention_on_device_matches_cpu(device, fast):
    torch.manual_seed(0)
    mha = A.MultiHeadAttention(16, 4, fast=fast)
    x = torch.randn(2, 6, 16)
    mask = A.padding_mask([6, 4], 6) & A.causal_mask(6)  # (2, 1, 6, 6)
    expected = mha(x, mask=mask)
    mha_d = A.MultiHeadAttention(16, 4, fast=fast).to(device)
    mha_d.load_state_dict(mha.state_dict())
    x_d = x.to(device).requires_grad_(True)
    out = _forward_backward(mha_d, x_d, mask=mask.to(device))
    assert out.device.type == device and x_d.grad is not None
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)
    # the mask helpers build on the device they are asked for
    assert A.causal_mask(3, device=device).device.type == device
    q = torch.randn(1, 2, 4, 8, device=device)
    empty = torch.zeros(4, 4, dtype=torch.bool, device=device)
    assert (A.scaled_dot_product_attention(q, q, q, mask=empty) == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("residual", ["none", "layerscale", "rezero", "deepnorm"])
def test_blocks_on_device(device, residual):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, device=device)
    memory = torch.randn(2, 7, 16, device=device)
    enc = Bk.EncoderBlock(16, 4, residual=residual, n_layers=2, activation="swiglu").to(device)
    dec = Bk.DecoderBlock(16, 4, residual=residual, n_layers=2).to(device)
    assert _forward_backward(enc, x).device.type == device
    out = _forward_backward(dec, x, memory, mask=A.causal_mask(5, device=device))
    assert out.shape == (2, 5, 16) and out.device.type == device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "shaw", "rope", "alibi"])
def test_models_on_device(device, positions):
    torch.manual_seed(0)
    idx = torch.randint(0, V, (2, 9), device=device)
    lm = M.build_model("lm", **TINY, positions=positions).to(device)
    assert _forward_backward(lm, idx).shape == (2, 9, V)
    out = lm.generate(idx[:, :3], 4, generator=torch.Generator().manual_seed(0))  # CPU generator
    assert out.shape == (2, 7) and out.device.type == device
    keep = torch.ones(2, 9, dtype=torch.bool, device=device)
    keep[1, 6:] = False
    clf = M.build_model("classifier", **TINY, n_classes=3, pooling="mean",
                        positions=positions).to(device)
    assert _forward_backward(clf, idx, padding_mask=keep).shape == (2, 3)
    s2s = M.build_model("seq2seq", **TINY, positions=positions).to(device)
    assert _forward_backward(s2s, idx, idx[:, :5]).shape == (2, 5, V)


DTYPES = [
    ("cpu", torch.float64),
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=pytest.mark.cuda),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda),
]


@pytest.mark.parametrize("device, dtype", DTYPES)
def test_dtype_is_preserved(device, dtype):
    torch.manual_seed(0)
    q = torch.randn(2, 2, 5, 8, device=device, dtype=dtype)
    additive = torch.zeros(5, 5, device=device).masked_fill(~A.causal_mask(5, device=device), float("-inf"))
    for fn in (A.scaled_dot_product_attention, A.fast_attention):
        assert fn(q, q, q, mask=additive).dtype == dtype  # a float32 mask does not upcast
        assert fn(q, q, q, mask=A.causal_mask(5, device=device), bias=additive).dtype == dtype
    _, w = A.scaled_dot_product_attention(q, q, q, need_weights=True)
    assert w.dtype == dtype
    x = torch.randn(2, 5, 16, device=device, dtype=dtype)
    for module in (A.MultiHeadAttention(16, 4, fast=False), Bk.EncoderBlock(16, 4, activation="swiglu"),
                   Bk.DecoderBlock(16, 4, cross_attention=False)):
        y = module.to(device=device, dtype=dtype)(x)
        assert y.dtype == dtype and torch.isfinite(y.float()).all()
    lm = M.build_model("lm", **TINY, positions="rope").to(device=device, dtype=dtype)
    logits = lm(torch.randint(0, V, (2, 6), device=device))
    assert logits.dtype == dtype and torch.isfinite(logits.float()).all()
    if dtype == torch.float64:  # full precision: fast and readable agree tightly
        torch.testing.assert_close(A.fast_attention(q, q, q, is_causal=True),
                                   A.scaled_dot_product_attention(q, q, q, mask=A.causal_mask(5)),
                                   atol=1e-12, rtol=1e-12)
