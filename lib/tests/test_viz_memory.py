"""viz/memory.py: the receptive-field explorer's state against direct computations."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from transformer_lab import memory as MEM  # noqa: E402
from transformer_lab.viz import memory as vz  # noqa: E402


def test_field_grows_by_the_memory_per_layer():
    s = vz.receptive_field(T=64, seg_len=16, mem_len=16, n_layers=3, token=63)
    assert torch.equal(s["mask"], MEM.segment_mask(64, 16, 16))
    assert s["span_window"] == [15, 15, 15]  # a fixed window never sees past its segment
    assert s["span"] == [31, 47, 63]  # one more segment per layer: N x L_mem
    assert s["field"][0].nonzero().flatten().tolist() == list(range(32, 64))


def test_field_matches_boolean_matrix_powers():
    s = vz.receptive_field(T=40, seg_len=8, mem_len=5, n_layers=4, token=37)
    M = s["mask"].long()
    e = torch.zeros(40, dtype=torch.long)
    e[37] = 1
    for n in range(4):
        e = ((e @ M) > 0).long()
        assert torch.equal(e.bool(), s["field"][n])


def test_explorer_state_and_bad_input(monkeypatch):
    monkeypatch.delenv("TRANSFORMER_LAB_GRADING", raising=False)
    ex = vz.memory_explorer(T=48, seg_len=8, mem_len=8, n_layers=2, token=40)
    assert ex.state["span"] == [8, 16]  # token 40 opens its segment: L_mem back per layer and ex.figure is not None
    ex.controls["mem_len"].value = 0
    assert ex.state["span"] == ex.state["span_window"]
    with pytest.raises(ValueError, match="seg_len must be between 1 and 10; got 20"):
        vz.receptive_field(T=10, seg_len=20)
