"""viz/blocks.py's encoder-decoder attention explorer (the gradient explorer is tested in test_viz.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from transformer_lab import models as M
from transformer_lab.viz import blocks as VB
from transformer_lab.viz.core import WidgetsOff

V = 9


def _maps():
    torch.manual_seed(0)
    model = M.build_model("seq2seq", vocab_size=V, d_model=16, n_heads=2, n_layers=2, max_len=8)
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(1, V, (3, 5), generator=g), torch.randint(0, V, (3, 4), generator=g)
    untrained = model.attention_maps(src, tgt)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))  # "trained": different weights
    trained = model.attention_maps(src, tgt)
    labels = ([[str(int(t)) for t in row] for row in src], [[str(int(t)) for t in row] for row in tgt])
    return {"untrained": untrained, "trained": trained}, labels


def test_explorer_state_is_the_chosen_map(monkeypatch):
    monkeypatch.delenv("TRANSFORMER_LAB_GRADING", raising=False)
    maps, (src_l, tgt_l) = _maps()
    ex = VB.seq2seq_attention_explorer(maps, src_l, tgt_l)
    s = ex.state
    assert s["kind"] == "cross" and s["layer"] == 2 and s["example"] == 0
    torch.testing.assert_close(s["trained"], maps["trained"]["cross"][1][0])
    torch.testing.assert_close(s["untrained"], maps["untrained"]["cross"][1][0])
    assert s["x_labels"] == src_l[0] and s["y_labels"] == tgt_l[0]
    ex.controls["attention"].value = "decoder self (causal)"
    ex.controls["layer"].value = 1
    ex.controls["example"].value = 2
    s = ex.state
    torch.testing.assert_close(s["trained"], maps["trained"]["decoder"][0][2])
    assert s["x_labels"] == s["y_labels"] == tgt_l[2]
    ex.controls["attention"].value = "encoder self"
    assert ex.state["trained"].shape == (2, 5, 5) and ex.state["y_labels"] == src_l[2]
    assert not torch.equal(ex.state["trained"], ex.state["untrained"])
    assert len(ex.figure.axes) == 2 * 2 + 1  # two rows of heads and a colour bar


def test_explorer_draws_statically_and_checks_its_input(monkeypatch):
    monkeypatch.delenv("TRANSFORMER_LAB_GRADING", raising=False)
    maps, (src_l, tgt_l) = _maps()
    html = VB.seq2seq_attention_explorer(maps, src_l, tgt_l).static_html(dpi=30)
    data = json.loads(re.search(r'<script type="application/json" class="tlx-data">(.*?)</script>',
                                html).group(1))
    # every control draws something different: 3 kinds, 2 layers, 3 examples -> 1 + 2 + 1 + 2 figures
    assert len(data["images"]) == 6
    assert all(len(set(c["figures"])) == len(c["figures"]) for c in data["controls"])
    with pytest.raises(ValueError, match="must have the keys"):
        VB.seq2seq_attention_explorer({"trained": maps["trained"]}, src_l, tgt_l)
    with pytest.raises(ValueError, match="one list of tokens per example"):
        VB.seq2seq_attention_explorer(maps, src_l[:2], tgt_l)
    monkeypatch.setenv("TRANSFORMER_LAB_GRADING", "1")
    assert isinstance(VB.seq2seq_attention_explorer(maps, src_l, tgt_l), WidgetsOff)
