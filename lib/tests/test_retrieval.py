"""Tests of retrieval.py: exact and approximate nearest neighbours, the kNN-LM pieces.

faiss is an independent implementation: its flat indexes must return the same neighbours as
the PyTorch top-k on tie-free data, for L2 and inner product. IVF recall is measured against
exact search on clustered data. The kNN distribution is checked against a loop written
here. Everything runs in well under a second per test.
"""

from __future__ import annotations

import math

import pytest
import torch

from transformer_lab import models as M
from transformer_lab import retrieval as RT

CUDA = pytest.param("cuda", marks=pytest.mark.cuda)


def _points(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _clustered(n, d, n_clusters, seed, spread=0.05):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, d, generator=g) * 3
    which = torch.randint(0, n_clusters, (n,), generator=g)
    return centres[which] + spread * torch.randn(n, d, generator=g)


# --------------------------------------------------------------------------- exact search
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_torch_and_faiss_flat_return_the_same_neighbours(metric):
    keys, queries = _points(3000, 24, 0), _points(200, 24, 1)
    ti = RT.make_index("torch", 24, metric, chunk_size=700)          # several chunks, uneven last one
    fi = RT.make_index("faiss-flat", 24, metric)
    for part in keys.split(1000):                                     # added in pieces
        ti.add(part)
        fi.add(part)
    assert len(ti) == len(fi) == 3000
    dt, it = ti.search(queries, 10)
    df, i_f = fi.search(queries, 10)
    assert it.dtype == i_f.dtype == torch.int64 and dt.shape == df.shape == (200, 10)
    assert torch.equal(it, i_f)                                       # same neighbours, same order
    assert torch.allclose(dt, df, rtol=1e-4, atol=1e-3)
    # against a brute-force computation written here
    if metric == "l2":
        full = torch.cdist(queries.double(), keys.double()) ** 2
        expect = full.topk(10, largest=False).indices
        assert torch.allclose(dt.double(), full.gather(1, it), rtol=1e-4, atol=1e-3)
    else:
        full = queries.double() @ keys.double().T
        expect = full.topk(10).indices
        assert (dt[:, :-1] >= dt[:, 1:]).all()                        # largest first
    assert torch.equal(it, expect)
    if metric == "l2":
        assert (dt[:, :-1] <= dt[:, 1:]).all()                        # nearest first


def test_exact_topk_chunking_does_not_change_the_answer():
    keys, queries = _points(1001, 8, 2), _points(33, 8, 3).double()
    keys = keys.double()
    ref = RT.exact_topk(queries, keys, 7, chunk_size=5000, query_chunk=5000)
    for chunk, qchunk in [(13, 1), (7, 8), (100, 33), (1000, 10)]:
        d, i = RT.exact_topk(queries, keys, 7, chunk_size=chunk, query_chunk=qchunk)
        assert torch.equal(i, ref[1]) and torch.allclose(d, ref[0])
    assert ref[0].dtype == torch.float64
    d, i = RT.exact_topk(queries, keys, 1001)                          # k = N: every key, sorted
    assert torch.equal(i.sort(-1).values, torch.arange(1001).expand(33, -1))


def test_torch_index_search_of_the_keys_themselves_finds_them():
    keys = _points(500, 16, 4)
    index = RT.make_index("torch", 16)
    index.add(keys)
    d, i = index.search(keys, 1)
    assert torch.equal(i[:, 0], torch.arange(500))
    assert d.abs().max() < 1e-4


# --------------------------------------------------------------------------- IVF
def test_ivf_recall_is_one_when_every_list_is_probed_and_high_but_below_one_with_few():
    keys = _clustered(4000, 16, 40, seed=5, spread=1.0)
    queries = _clustered(300, 16, 40, seed=5, spread=1.0)[:300] + 0.3 * _points(300, 16, 6)
    exact = RT.make_index("faiss-flat", 16)
    exact.add(keys)
    _, ie = exact.search(queries, 10)
    ivf = RT.make_index("faiss-ivf", 16, n_lists=32, n_probe=32, seed=0)
    ivf.add(keys)                                                      # trained on the keys added
    assert ivf.is_trained and len(ivf) == 4000
    _, i_all = ivf.search(queries, 10)
    assert RT.recall_at_k(i_all, ie) == 1.0                            # n_probe = n_lists: exact
    ivf.n_probe = 1                                                    # one cell of 32 per query
    _, i_few = ivf.search(queries, 10)
    recall = RT.recall_at_k(i_few, ie)
    assert 0.9 < recall < 1.0                                          # approximate, but mostly right (0.982)
    # deterministic: the same seed clusters the same way
    ivf2 = RT.make_index("faiss-ivf", 16, n_lists=32, n_probe=1, seed=0)
    ivf2.train(keys)                                                   # explicit train step
    ivf2.add(keys)
    assert torch.equal(ivf2.search(queries, 10)[1], i_few)


def test_recall_at_k():
    exact = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    found = torch.tensor([[3, 2, 9, -1], [4, 5, 6, 7]])
    assert RT.recall_at_k(found, exact) == pytest.approx((2 / 4 + 1) / 2)
    assert RT.recall_at_k(exact, exact) == 1.0
    with pytest.raises(ValueError, match="same M"):
        RT.recall_at_k(found[:1], exact)


# --------------------------------------------------------------------------- kNN-LM
def test_knn_distribution_sums_to_one_mass_only_on_neighbour_tokens_duplicates_summed():
    g = torch.Generator().manual_seed(7)
    d = torch.rand(5, 8, generator=g, dtype=torch.float64) * 4
    tok = torch.randint(0, 6, (5, 8), generator=g)                     # duplicates are certain
    T = 2.5
    p = RT.knn_distribution(d, tok, vocab_size=11, temperature=T)
    assert p.shape == (5, 11) and p.dtype == torch.float64
    assert torch.allclose(p.sum(-1), torch.ones(5, dtype=torch.float64))
    expect = torch.zeros(5, 11, dtype=torch.float64)
    for m in range(5):                                                 # the formula, by hand
        w = [math.exp(-float(x) / T) for x in d[m]]
        for i in range(8):
            expect[m, int(tok[m, i])] += w[i] / sum(w)
    assert torch.allclose(p, expect)
    assert (p[:, 6:] == 0).all()                                       # tokens never among the neighbours
    # a hand case: tokens [2, 2, 0] at distances [1, 2, 3]
    p = RT.knn_distribution(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2, 2, 0]]), 4)
    w = torch.softmax(torch.tensor([-1.0, -2.0, -3.0]), 0)
    assert torch.allclose(p, torch.tensor([[w[2], 0.0, w[0] + w[1], 0.0]]))
    # a missing neighbour (inf distance) gets weight 0
    p = RT.knn_distribution(torch.tensor([[0.5, math.inf]]), torch.tensor([[1, 0]]), 3)
    assert torch.equal(p, torch.tensor([[0.0, 1.0, 0.0]]))


def test_knn_distribution_temperature():
    d, tok = torch.tensor([[0.0, 1.0]]), torch.tensor([[0, 1]])
    cold = RT.knn_distribution(d, tok, 2, temperature=0.1)
    hot = RT.knn_distribution(d, tok, 2, temperature=100.0)
    assert cold[0, 0] > 0.99 and abs(float(hot[0, 0]) - 0.5) < 0.01


def test_interpolate_endpoints_and_middle():
    g = torch.Generator().manual_seed(8)
    p_lm = torch.softmax(torch.randn(4, 9, generator=g), -1)
    p_knn = torch.softmax(torch.randn(4, 9, generator=g), -1)
    assert torch.equal(RT.interpolate(p_lm, p_knn, 0.0), p_lm)
    assert torch.equal(RT.interpolate(p_lm, p_knn, 1), p_knn)
    mid = RT.interpolate(p_lm, p_knn, 0.25)
    assert torch.allclose(mid, 0.25 * p_knn + 0.75 * p_lm)
    assert torch.allclose(mid.sum(-1), torch.ones(4))


def _tiny_lm(seed=0, positions="rope"):
    torch.manual_seed(seed)
    return M.TransformerLM(M.ModelConfig(vocab_size=7, d_model=16, n_heads=2, n_layers=1, max_len=16,
                                         positions=positions)).eval()


def test_lm_outputs_match_a_direct_forward_and_score_every_position_once():
    model = _tiny_lm()
    ids = torch.randint(0, 7, (45,), generator=torch.Generator().manual_seed(9))
    vec, logp = RT.lm_outputs(model, ids, context=16, stride=5)
    assert vec.shape == (44, 16) and logp.shape == (44, 7)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(44))
    with torch.no_grad():                                            # the first window is one forward
        direct = torch.log_softmax(model(ids[None, :16]), -1)[0]
    assert torch.allclose(logp[:16], direct, atol=1e-5)
    # a later position: the window of 16 tokens that ends at it
    with torch.no_grad():
        t = 30                                                       # predicted in the window [15, 31) (end 31)
        window = ids[None, 15:31]
        direct = torch.log_softmax(model(window), -1)[0, -1]
    assert torch.allclose(logp[t], direct, atol=1e-5)
    class Pair(torch.nn.Module):                                     # a model returning (logits, state)
        def __init__(self, lm):
            super().__init__()
            self.lm, self.head = lm, lm.head

        def forward(self, idx):
            return self.lm(idx), None

    vec2, logp2 = RT.lm_outputs(Pair(model), ids, context=16, stride=5)
    assert torch.equal(vec2, vec) and torch.equal(logp2, logp)
    # short text: fewer tokens than the context
    vec, logp = RT.lm_outputs(model, ids[:5], context=16)
    assert vec.shape == (4, 16)


def test_datastore_keys_values_and_perplexity_helper():
    model = _tiny_lm(1)
    ids = torch.randint(0, 7, (200,), generator=torch.Generator().manual_seed(10))
    ds = RT.build_datastore(model, ids, context=16)
    assert len(ds) == 199 and torch.equal(ds.values, ids[1:])
    keys, _ = RT.lm_outputs(model, ids, context=16)
    d, tok = ds.search(keys[:10], 1)                                  # each key finds itself
    assert torch.equal(tok[:, 0], ids[1:11]) and d.abs().max() < 1e-4
    for kind in ("faiss-flat", "faiss-ivf"):
        opts = {"n_lists": 4, "n_probe": 4} if kind == "faiss-ivf" else {}
        other = RT.build_datastore(model, ids, context=16, kind=kind, **opts)
        assert torch.equal(other.search(keys[:10], 1)[1], tok)
    held = torch.randint(0, 7, (17,), generator=torch.Generator().manual_seed(11))   # one window of 16
    r = RT.knn_lm_perplexity(model, ds, held, context=16, k=4, lams=[0.0, 0.5, 1.0])
    assert r["ppl"][0] == pytest.approx(r["ppl_lm"])                  # lambda 0 is the LM
    assert r["nll"].shape == (3, 16) and r["best_ppl"] == min(r["ppl"])
    with torch.no_grad():                                            # the LM's perplexity, computed directly
        logits = model(held[None, :-1])[0]
    direct = math.exp(float(torch.nn.functional.cross_entropy(logits, held[1:])))
    assert r["ppl_lm"] == pytest.approx(direct, rel=1e-5)


def test_knn_lm_lowers_perplexity_on_text_the_datastore_holds():
    model = _tiny_lm(2)                                               # untrained: the LM knows nothing
    g = torch.Generator().manual_seed(12)
    text = torch.randint(0, 7, (200,), generator=g)
    ds = RT.build_datastore(model, text, context=16)
    repeat = text[100:160]                                            # a passage the datastore holds
    r = RT.knn_lm_perplexity(model, ds, repeat, context=16, k=8, lams=[0.0, 0.5, 0.9], temperature=0.1)
    assert r["ppl"][2] < 0.5 * r["ppl_lm"] and r["best_lam"] > 0


# --------------------------------------------------------------------------- bad input
def test_errors_name_what_was_expected_and_what_came():
    index = RT.make_index("torch", 4)
    with pytest.raises(ValueError, match="empty"):
        index.search(torch.randn(2, 4), 1)
    index.add(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"k must lie in \[1, number of keys = 5\]; got k=0"):
        index.search(torch.randn(2, 4), 0)
    with pytest.raises(ValueError, match=r"got k=6"):
        index.search(torch.randn(2, 4), 6)
    with pytest.raises(ValueError, match=r"shape \(n, dim=4\); got \(2, 3\)"):
        index.search(torch.randn(2, 3), 1)
    with pytest.raises(ValueError, match=r"shape \(n, dim=4\); got \(3, 5\)"):
        index.add(torch.randn(3, 5))
    flat = RT.make_index("faiss-flat", 4)
    flat.add(torch.randn(5, 4))
    with pytest.raises(ValueError, match="got k=0"):
        flat.search(torch.randn(1, 4), 0)
    with pytest.raises(ValueError, match="kind must be one of"):
        RT.make_index("annoy", 4)
    with pytest.raises(ValueError, match="metric must be one of"):
        RT.make_index("torch", 4, "cosine")
    with pytest.raises(TypeError, match="unknown"):
        RT.make_index("faiss-flat", 4, n_probe=3)
    with pytest.raises(ValueError, match=r"n_probe must lie in \[1, n_lists = 8\]; got n_probe=9"):
        RT.make_index("faiss-ivf", 4, n_lists=8, n_probe=9)
    ivf = RT.make_index("faiss-ivf", 4, n_lists=8, n_probe=2)
    with pytest.raises(ValueError, match="at least 8 keys; got 5"):
        ivf.add(torch.randn(5, 4))
    p = torch.full((2, 3), 1 / 3)
    for lam in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"must lie in \[0, 1\]; got {lam}"):
            RT.interpolate(p, p, lam)
    with pytest.raises(ValueError, match="same shape"):
        RT.interpolate(p, p[:1], 0.5)
    d, tok = torch.rand(2, 3), torch.tensor([[0, 1, 2], [2, 1, 0]])
    with pytest.raises(ValueError, match="temperature must be a number > 0; got 0"):
        RT.knn_distribution(d, tok, 3, temperature=0)
    with pytest.raises(ValueError, match=r"same shape .*got \(2, 3\) and \(2, 2\)"):
        RT.knn_distribution(d, tok[:, :2], 3)
    with pytest.raises(ValueError, match=r"\[0, vocab_size=2\); got min 0, max 2"):
        RT.knn_distribution(d, tok, 2)
    with pytest.raises(ValueError, match="k >= 1"):
        RT.knn_distribution(torch.rand(2, 0), torch.zeros(2, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="every lambda"):
        RT.knn_lm_perplexity(_tiny_lm(), None, torch.arange(5), 4, lams=[0.5, 2.0])


# --------------------------------------------------------------------------- devices
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_torch_index_runs_where_its_keys_live(device):
    keys, queries = _points(300, 8, 13), _points(20, 8, 14)
    ref_d, ref_i = RT.exact_topk(queries, keys, 5)
    index = RT.make_index("torch", 8)
    index.add(keys.to(device))
    d, i = index.search(queries.to(device), 5)
    assert d.device.type == i.device.type == device
    assert torch.equal(i.cpu(), ref_i) and torch.allclose(d.cpu(), ref_d, atol=1e-4)
    p = RT.knn_distribution(d, i % 3, 3)
    assert p.device.type == device and torch.allclose(p.sum(-1).cpu(), torch.ones(20))
