"""viz/retrieval.py: the kNN-LM explorer's state against direct computations; the figure draws."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from transformer_lab import retrieval as RT  # noqa: E402
from transformer_lab.viz import WidgetsOff  # noqa: E402
from transformer_lab.viz import retrieval as vz  # noqa: E402


def _inputs(n=30, V=7, K=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_p = torch.log_softmax(torch.randn(n, V, generator=g), -1)
    d = torch.rand(n, K, generator=g).sort(-1).values * 3                 # nearest first
    tok = torch.randint(0, V, (n, K), generator=g)
    targets = torch.randint(0, V, (n,), generator=g)
    return log_p, d, tok, targets


def test_state_matches_the_library_and_the_formula():
    log_p, d, tok, y = _inputs()
    s = vz.knn_lm_state(log_p, d, tok, y, lam=0.3, temperature=2.0, n_k=5, position=4,
                        labels=list("abcdefg"))
    p_knn = RT.knn_distribution(d[:, :5].double(), tok[:, :5], 7, 2.0)
    mix_y = 0.3 * p_knn.gather(1, y[:, None])[:, 0] + 0.7 * log_p.double().exp().gather(1, y[:, None])[:, 0]
    assert s["ppl_at"] == pytest.approx(math.exp(float(-mix_y.log().mean())))
    assert s["ppl_lm"] == pytest.approx(math.exp(float(torch.nn.functional.cross_entropy(log_p, y))), rel=1e-5)
    assert s["ppl"][0] == pytest.approx(s["ppl_lm"]) and s["best_ppl"] == min(s["ppl"])
    torch.testing.assert_close(s["p_knn"], p_knn[4])
    torch.testing.assert_close(s["p_mix"], 0.3 * p_knn[4] + 0.7 * log_p[4].double().exp())
    assert s["target"] == int(y[4]) and s["target"] in s["shown"]
    assert s["labels"] == ["abcdefg"[i] for i in s["shown"]]


def test_more_neighbours_and_temperature_change_the_state():
    log_p, d, tok, y = _inputs(seed=1)
    one = vz.knn_lm_state(log_p, d, tok, y, n_k=1, position=0)
    assert float(one["p_knn"].max()) == pytest.approx(1.0)                # one neighbour: all on its token
    hot = vz.knn_lm_state(log_p, d, tok, y, n_k=8, temperature=1000.0, position=0)
    counts = torch.bincount(tok[0], minlength=7).double() / 8
    torch.testing.assert_close(hot["p_knn"], counts, atol=1e-3, rtol=0)  # T large: a plain vote count
    with pytest.raises(ValueError, match=r"n_k must lie in \[1, K = 8\] \(the neighbours stored\); got 9"):
        vz.knn_lm_state(log_p, d, tok, y, n_k=9)
    with pytest.raises(ValueError, match="position must lie"):
        vz.knn_lm_state(log_p, d, tok, y, n_k=4, position=30)


def test_explorer_recomputes_and_draws(monkeypatch):
    monkeypatch.delenv("TRANSFORMER_LAB_GRADING", raising=False)
    log_p, d, tok, y = _inputs()
    ex = vz.knn_lm_explorer(log_p, d, tok, y, labels=list("abcdefg"), n_k=4)
    assert ex.state["n_k"] == 4 and ex.figure is not None
    ex.controls["lam"].value = 0.0
    assert ex.state["ppl_at"] == pytest.approx(ex.state["ppl_lm"])
    ex.controls["position"].value = 7
    assert ex.state["target"] == int(y[7])
    monkeypatch.setenv("TRANSFORMER_LAB_GRADING", "1")
    assert isinstance(vz.knn_lm_explorer(log_p, d, tok, y), WidgetsOff)


def test_lambda_one_with_a_target_no_neighbour_holds_draws(monkeypatch):
    """At lambda = 1 the neighbours alone give a target they do not hold probability 0: perplexity
    infinite. The figure must still draw (the website draws every slider value in advance; the
    live slider reaches 1 too), and it says "infinite"."""
    monkeypatch.delenv("TRANSFORMER_LAB_GRADING", raising=False)
    log_p, d, tok, y = _inputs()
    tok = torch.zeros_like(tok)  # every neighbour holds token 0
    y = torch.ones_like(y)  # every target is token 1
    s = vz.knn_lm_state(log_p, d, tok, y, lam=1.0, n_k=4)
    assert math.isinf(s["ppl_at"])
    fig = vz.knn_lm_figure(s)
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("infinite" in t for t in texts), texts
    assert math.isfinite(fig.axes[0].get_ylim()[1])
