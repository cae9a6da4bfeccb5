"""viz/flash.py: the tile stepper's state against direct computations; the figure draws."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from transformer_lab import flash as FL  # noqa: E402
from transformer_lab.viz import flash as vz  # noqa: E402


def test_trace_order_is_fa2_and_skips_the_future():
    s = vz.flash_trace(L=24, block_q=8, block_k=4, causal=True, step=None, row=13)
    assert torch.equal(s["plan"], FL.tile_plan(24, 24, 8, 4, causal=True))
    assert [t[:2] for t in s["order"]][:3] == [(0, 0), (0, 1), (1, 0)]  # rows outside, keys inside
    assert s["n_steps"] == int((s["plan"] != FL.SKIPPED).sum())
    assert s["counts"] == {"full": 6, "diagonal (masked)": 6, "skipped": 6}


def test_trace_row_state_matches_softmax():
    s = vz.flash_trace(L=40, block_q=8, block_k=8, causal=False, step=None, row=21)
    scores = s["scores"]
    assert s["m"][-1] == pytest.approx(float(scores.max()))  # the running max ends at the row max
    assert s["l"][-1] == pytest.approx(float(torch.exp(scores - scores.max()).sum()))
    assert s["m"] == sorted(s["m"])  # never decreases
    assert s["errors"][-1] < 1e-12 and s["errors"][0] > 1e-6  # converges to the exact output
    torch.testing.assert_close(s["partial"], s["exact"])
    assert s["blocks"] == [0, 1, 2, 3, 4]


def test_trace_early_step_and_causal_row():
    s = vz.flash_trace(L=32, block_q=8, block_k=8, causal=True, step=0, row=20)
    assert s["current"] == (0, 0) and s["blocks"] == [] and s["errors"] == []
    assert torch.equal(s["partial"], torch.zeros(8, dtype=torch.float64))
    s = vz.flash_trace(L=32, block_q=8, block_k=8, causal=True, step=None, row=20)
    assert s["blocks"] == [0, 1, 2]  # row 20 sees key blocks 0-2; block 3 is its future
    assert torch.isinf(s["scores"][21:]).all()
    assert s["errors"][-1] < 1e-12
    s = vz.flash_trace(L=32, block_q=8, block_k=8, causal=True, step=1000)
    assert s["step"] == s["n_steps"] - 1  # clipped


def test_trace_bad_input():
    with pytest.raises(ValueError, match="row must be between 0 and 15; got 16"):
        vz.flash_trace(L=16, row=16)
    with pytest.raises(ValueError, match="block_q must be at least 1; got 0"):
        vz.flash_trace(block_q=0)


def test_explorer_state_and_figure(monkeypatch):
    monkeypatch.delenv("TRANSFORMER_LAB_GRADING", raising=False)
    ex = vz.flash_tile_explorer(L=32, block_q=8, block_k=8, causal=True, step=0, row=20)
    assert ex.state["current"] == (0, 0) and ex.figure is not None
    ex.controls["step"].value = 5
    assert ex.state["step"] == 5 and ex.state["current"] == ex.state["order"][5][:2]
    ex.controls["L"].value = 16
    assert ex.state["row"] == 15 and ex.controls["row"].max == 15
    ex.controls["causal"].value = False
    assert ex.state["counts"]["skipped"] == 0
    monkeypatch.setenv("TRANSFORMER_LAB_GRADING", "1")
    assert isinstance(vz.flash_tile_explorer(), vz.WidgetsOff)
