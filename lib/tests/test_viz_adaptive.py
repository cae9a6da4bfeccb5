"""viz/adaptive.py: the explorer's state against direct computations; the controls drive it."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

from transformer_lab import adaptive as AD  # noqa: E402
from transformer_lab.viz import adaptive as vz  # noqa: E402


def test_state_matches_library():
    s = vz.span_act_state(span=3.0, ramp=2.0, L=10, psi=0.3, threshold=0.99, max_steps=6)
    assert torch.equal(s["mask"], AD.span_mask(torch.tensor([3.0], dtype=torch.float64), 2.0, 10)[0])
    assert s["reach"] == 5  # distances 0..4 have weight > 0: (2 + 3 - d) / 2 > 0
    assert torch.allclose(s["curve"][:6], torch.tensor([1, 1, 1, 1, 0.5, 0], dtype=torch.float64))
    assert s["n_steps"] == 4 and abs(s["remainder"] - 0.1) < 1e-9 and abs(s["ponder"] - 4.1) < 1e-9
    assert abs(float(s["weights"].sum()) - 1) < 1e-12


def test_explorer_controls_drive_state(monkeypatch):
    monkeypatch.delenv("TRANSFORMER_LAB_GRADING", raising=False)
    ex = vz.span_act_explorer(L=12, max_steps=5)
    ex.controls["psi"].value = 0.5
    assert ex.state["n_steps"] == 2 and abs(ex.state["remainder"] - 0.5) < 1e-12
    ex.controls["span"].value = 0.0
    assert ex.state["reach"] == 3  # ramp 3: distances 0, 1, 2
    assert ex.figure is not None and ex.renders >= 3


def test_grading_mode_turns_it_off(monkeypatch):
    monkeypatch.setenv("TRANSFORMER_LAB_GRADING", "1")
    w = vz.span_act_explorer()
    assert w.controls == {} and w.figure is None
