"""Tests of transformer_lab.memory: Transformer-XL, Compressive Transformer, Memorizing attention."""

import math

import pytest
import torch
import torch.nn as nn

from transformer_lab import attention as A
from transformer_lab import memory as MEM
from transformer_lab import models
from transformer_lab import retrieval as RT
from transformer_lab.positions import XLRelative


def _config(**kw):
    base = dict(vocab_size=11, d_model=16, n_heads=2, n_layers=2, positions="xl")
    base.update(kw)
    return models.ModelConfig(**base)


def _xl(mem_len=6, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return MEM.XLLM(_config(**kw), mem_len).to(dtype).eval()


# ---------------------------------------------------------------- the FIFO and the masks

def test_update_memory_fifo_and_stop_gradient():
    h1 = torch.arange(6.0).view(1, 3, 2).requires_grad_(True)
    m = MEM.update_memory(None, h1, 4)
    assert torch.equal(m, h1.detach()) and not m.requires_grad
    h2 = torch.arange(6.0, 12.0).view(1, 3, 2).requires_grad_(True)
    m = MEM.update_memory(m, h2, 4)  # the newest 4 of 6 states, oldest first
    assert torch.equal(m[0, :, 0], torch.tensor([4.0, 6.0, 8.0, 10.0]))
    assert not m.requires_grad


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_memory_length(bad):
    with pytest.raises(ValueError, match=f"mem_len.*>= 1; got {bad}"):
        MEM.update_memory(None, torch.zeros(1, 2, 3), bad)
    with pytest.raises(ValueError, match="mem_len"):
        MEM.XLLM(_config(), bad)


def test_xl_mask_and_segment_mask():
    m = MEM.xl_mask(2, 3)
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    s = MEM.segment_mask(6, 3, 2)  # token 4 (segment 1) sees keys 1..4
    assert s[4].tolist() == [False, True, True, True, True, False]
    assert s[2].tolist() == [True, True, True, False, False, False]


# ---------------------------------------------------------------- relative positions with a memory

def test_xl_relative_distances_with_memory():
    # XLRelative's score_bias with Lk > Lq must use distance (n_mem + i) - j; so must the readable path
    torch.manual_seed(1)
    H, D, Lq, n_mem = 2, 4, 3, 5
    pos = XLRelative(H, D).double()
    with torch.no_grad():
        pos.u.normal_()
        pos.v.normal_()
    q, k, v = (torch.randn(2, H, L, D, dtype=torch.float64) for L in (Lq, n_mem + Lq, n_mem + Lq))
    rel = MEM.xl_rel_table(pos, n_mem + Lq)
    got = MEM.xl_relative_attention(q, k, v, pos.u, pos.v, rel)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D) + pos.score_bias(q, k)
    want = A.masked_softmax(scores, MEM.xl_mask(Lq, n_mem)) @ v
    torch.testing.assert_close(got, want)
    # and by hand for one entry: query 0 (absolute n_mem) and key 1 are n_mem - 1 apart
    s01 = ((q[0, 0, 0] + pos.u[0]) @ k[0, 0, 1] + (q[0, 0, 0] + pos.v[0]) @ rel[0, n_mem - 1]) / math.sqrt(D)
    torch.testing.assert_close(scores[0, 0, 0, 1], s01)


# ---------------------------------------------------------------- the XL model

def test_empty_memory_equals_plain_model():
    torch.manual_seed(0)
    plain = models.TransformerLM(_config()).double().eval()
    xl = MEM.XLLM(_config(), mem_len=4).double().eval()
    xl.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 11, (3, 7))
    logits, mems = xl(idx)
    torch.testing.assert_close(logits, plain(idx))
    assert len(mems) == 2 and mems[0].shape == (3, 4, 16)


@pytest.mark.parametrize("mem_len", [5, 8])
def test_cache_reproduces_full_recomputation(mem_len):
    xl = _xl(mem_len)
    idx = torch.randint(0, 11, (2, 15))
    seg, mems, parts = 5, None, []
    for s in range(0, 15, seg):
        logits, mems = xl(idx[:, s:s + seg], mems)
        parts.append(logits)
    full = MEM.full_pass(xl, idx, MEM.segment_mask(15, seg, mem_len))
    torch.testing.assert_close(torch.cat(parts, 1), full)
    # a mask without the memory would differ from the second segment on
    assert not torch.allclose(full, MEM.full_pass(xl, idx, MEM.segment_mask(15, seg, 0)))


def test_memory_is_stop_gradient():
    xl = _xl(4, dtype=torch.float32).train()
    idx = torch.randint(0, 11, (2, 8))
    _, mems = xl(idx[:, :4])
    assert all(not m.requires_grad and m.grad_fn is None for m in mems)
    mems = [m.clone().requires_grad_(True) for m in mems]
    logits, _ = xl(idx[:, 4:], mems)
    logits.sum().backward()
    assert all(m.grad is not None for m in mems)  # the next segment reads the memory...
    xl.zero_grad()
    _, m1 = xl(idx[:, :4])
    logits, _ = xl(idx[:, 4:], m1)
    logits.sum().backward()  # ...but the first segment gets no gradient through it
    assert xl.tok.weight.grad is not None
    # the embedding's gradient equals what the second segment alone gives
    g_both = xl.tok.weight.grad.clone()
    xl.zero_grad()
    logits2, _ = xl(idx[:, 4:], [m.detach().clone() for m in m1])
    logits2.sum().backward()
    torch.testing.assert_close(g_both, xl.tok.weight.grad)


def test_eval_with_cache_and_sliding_window():
    xl = _xl(6, dtype=torch.float32)
    ids = torch.randint(0, 11, (20,))
    a = MEM.eval_with_cache(xl, ids, seg_len=6)
    b = MEM.eval_sliding_window(xl, ids, context=6)
    assert a.shape == b.shape == (19,)
    # the first segment sees the same tokens either way
    torch.testing.assert_close(a[:6], b[:6], atol=1e-5, rtol=1e-4)
    # the sliding window recomputes from scratch: token t from ids[t-5..t]
    logits, _ = xl(ids[None, 9:15])
    want = nn.functional.cross_entropy(logits[0, -1:], ids[15:16])
    torch.testing.assert_close(b[14], want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="seg_len"):
        MEM.eval_with_cache(xl, ids, 0)


def test_absolute_positions_repeat_in_memory():
    xl = _xl(4, positions="sinusoidal")
    x = torch.zeros(1, 4, 16, dtype=torch.float64)
    e = xl.positions.embed(x)
    assert torch.equal(e, xl.positions.embed(x))  # every segment gets positions 0..L-1 again


def test_bad_mems():
    xl = _xl(4)
    with pytest.raises(ValueError, match="one per layer"):
        xl(torch.zeros(1, 3, dtype=torch.long), [torch.zeros(1, 2, 16)])


# ---------------------------------------------------------------- Compressive Transformer

def test_compress_shapes_and_values():
    old = torch.arange(12.0).view(1, 6, 2)
    torch.testing.assert_close(MEM.compress(old, 3, "mean"), torch.tensor([[[2.0, 3.0], [8.0, 9.0]]]))
    torch.testing.assert_close(MEM.compress(old, 3, "max"), torch.tensor([[[4.0, 5.0], [10.0, 11.0]]]))
    comp = MEM.Compressor(2, 3, "conv")
    torch.testing.assert_close(comp(old), MEM.compress(old, 3, "mean"))  # conv starts as mean pooling
    assert MEM.compress(old, 1, "max").shape == (1, 6, 2)


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_rate(bad):
    with pytest.raises(ValueError, match=f"compression rate c\\) must be >= 1; got {bad}"):
        MEM.compress(torch.zeros(1, 4, 2), bad)
    with pytest.raises(ValueError, match="multiple of the rate"):
        MEM.compress(torch.zeros(1, 5, 2), 2)


def test_compressive_fifo_order():
    seg = [torch.full((1, 2, 1), float(s)) for s in range(5)]  # segment s holds the value s
    mem = cmem = None
    for s in seg:
        mem, cmem, _ = MEM.compressive_update(mem, cmem, s, mem_len=4, cmem_len=2,
                                              compress_fn=lambda t: MEM.compress(t, 2, "mean"))
    assert mem[0, :, 0].tolist() == [3.0, 3.0, 4.0, 4.0]
    assert cmem[0, :, 0].tolist() == [1.0, 2.0]  # segments 0, 1, 2 were compressed; 0 fell out


def test_attention_reconstruction_loss_trains_only_the_compressor():
    torch.manual_seed(0)
    attn = A.MultiHeadAttention(8, 2)
    comp = MEM.Compressor(8, 2, "conv")
    h, old = torch.randn(2, 3, 8), torch.randn(2, 6, 8)
    loss = MEM.attention_reconstruction_loss(attn, h, old, comp(old))
    loss.backward()
    assert comp.conv.weight.grad is not None and comp.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in attn.parameters())
    assert float(MEM.attention_reconstruction_loss(attn, h, old, old)) == 0.0


def test_compressive_lm_runs_and_remembers():
    torch.manual_seed(0)
    lm = MEM.CompressiveLM(_config(), mem_len=4, cmem_len=4, rate=2).eval()
    idx = torch.randint(0, 11, (2, 12))
    state = None
    for s in range(0, 12, 4):
        logits, state, recon = lm(idx[:, s:s + 4], state)
    mem, cmem = state[0]
    assert mem.shape == (2, 4, 16) and cmem.shape == (2, 4, 16) and recon.item() > 0


def test_compression_gradcheck():
    comp = MEM.Compressor(3, 2, "conv").double()
    old = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(comp, (old,))
    assert torch.autograd.gradcheck(lambda t: MEM.compress(t, 2, "max"), (old,))


# ---------------------------------------------------------------- Memorizing Transformer

def test_knn_memory_fifo_and_search():
    mem = MEM.KNNMemory(max_size=3)
    k = torch.eye(4).view(1, 1, 4, 4)
    mem.add(k[:, :, :2], k[:, :, :2] * 10)
    mem.add(k[:, :, 2:], k[:, :, 2:] * 10)
    assert len(mem) == 3 and torch.equal(mem.keys[0, 0], torch.eye(4)[1:])  # key 0 fell out
    kr, vr, valid = mem.search(torch.tensor([[[[0.0, 0.0, 5.0, 1.0]]]]), 2)
    assert torch.equal(kr[0, 0, 0], torch.eye(4)[[2, 3]]) and valid.all()
    kr, vr, valid = mem.search(torch.zeros(1, 1, 1, 4), 5)  # more than stored: padded, invalid
    assert valid.sum() == 3 and kr.shape == (1, 1, 1, 5, 4)
    with pytest.raises(ValueError, match="top_k.*>= 1; got 0"):
        mem.search(torch.zeros(1, 1, 1, 4), 0)


def test_gate_zero_and_one():
    torch.manual_seed(0)
    layer = MEM.MemorizingAttention(8, 2, top_k=3, mem_size=16).double()
    x1, x2 = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    layer(x1)
    saved = (layer.memory.keys.clone(), layer.memory.values.clone())
    out0 = layer(x2, gate=torch.zeros(2, dtype=torch.float64))
    q, k, v = (A.split_heads(t, 2) for t in layer.qkv(x2).chunk(3, dim=-1))
    local = layer.out(A.merge_heads(A.scaled_dot_product_attention(q, k, v, mask=A.causal_mask(5))))
    torch.testing.assert_close(out0, local)  # g = 0: local attention only
    layer.memory.keys, layer.memory.values = saved
    out1 = layer(x2, gate=torch.ones(2, dtype=torch.float64))
    # g = 1: memory attention only, over each query's 3 best keys of x1's 5
    mk, mv = saved
    top = (q @ mk.transpose(-2, -1)).topk(3, -1).indices
    scores = (q @ mk.transpose(-2, -1)) / math.sqrt(4)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top, True)
    mem_only = A.masked_softmax(scores, keep) @ mv
    torch.testing.assert_close(out1, layer.out(A.merge_heads(mem_only)))


def test_knn_memory_attention_matches_layer_parts():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 4, 3, dtype=torch.float64) for _ in range(3))
    mk, mv = torch.randn(1, 2, 6, 3, dtype=torch.float64), torch.randn(1, 2, 6, 3, dtype=torch.float64)
    b = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    mem = MEM.KNNMemory(6)
    mem.add(mk, mv)
    kr, vr, valid = mem.search(q, 2)
    local = A.scaled_dot_product_attention(q, k, v, mask=A.causal_mask(4))
    want = MEM.gated_combine(local, MEM.knn_attention(q, kr, vr, valid), b)
    torch.testing.assert_close(MEM.knn_memory_attention(q, k, v, mk, mv, 2, b), want)
    with pytest.raises(ValueError, match="top_k"):
        MEM.knn_memory_attention(q, k, v, mk, mv, 0, b)


def test_knn_attention_gradcheck_and_no_grad_into_memory():
    q = torch.randn(1, 1, 2, 3, dtype=torch.float64, requires_grad=True)
    kr = torch.randn(1, 1, 2, 4, 3, dtype=torch.float64)
    vr = torch.randn(1, 1, 2, 4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: MEM.knn_attention(t, kr, vr), (q,))
    mem = MEM.KNNMemory(8)
    k = torch.randn(1, 1, 4, 3, requires_grad=True)
    mem.add(k, k * 2)
    assert not mem.keys.requires_grad and not mem.values.requires_grad


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_xl_and_memorizing():
    xl = _xl(4, dtype=torch.float32).cuda()
    idx = torch.randint(0, 11, (2, 8), device="cuda")
    l1, m = xl(idx[:, :4])
    l2, m = xl(idx[:, 4:], m)
    full = MEM.full_pass(xl, idx, MEM.segment_mask(8, 4, 4, device="cuda"))
    torch.testing.assert_close(torch.cat([l1, l2], 1), full, atol=1e-4, rtol=1e-4)
    layer = MEM.MemorizingAttention(16, 2, 2, 8).cuda()
    x = torch.randn(1, 4, 16, device="cuda")
    layer(x)
    assert layer(x).device.type == "cuda"


def test_knn_memory_with_the_retrieval_index_finds_the_same_neighbours():
    pytest.importorskip("faiss")
    torch.manual_seed(3)
    k, v = torch.randn(2, 2, 20, 4), torch.randn(2, 2, 20, 4)
    q = torch.randn(2, 2, 5, 4)
    exact, flat = MEM.KNNMemory(32), MEM.KNNMemory(32, index="faiss-flat")
    for m in (exact, flat):
        m.add(k, v)
    a, b = exact.search(q, 3), flat.search(q, 3)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    index = RT.make_index("torch", 4, metric="ip")
    index.add(k[0, 0])
    s, i = index.search(q[0, 0], 3)
    assert i.tolist() == (q[0, 0] @ k[0, 0].T).topk(3).indices.tolist()
