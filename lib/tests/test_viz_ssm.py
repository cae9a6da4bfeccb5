"""viz/ssm.py: the explorer's state against direct computations; the controls drive it."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

from transformer_lab.viz import ssm as vz  # noqa: E402


def test_state_matches_formulas():
    s = vz.kernel_state(log10_delta=-1.0, A=-2.0, L=8)
    d = 0.1
    assert abs(s["A_bar_zoh"] - math.exp(-0.2)) < 1e-12 and abs(s["A_bar_euler"] - 0.8) < 1e-12
    j = torch.arange(8, dtype=torch.float64)
    assert torch.allclose(s["K_zoh"], math.exp(-0.2) ** j * (math.exp(-0.2) - 1) / -2.0)
    assert torch.allclose(s["K_euler"], 0.8 ** j * d)
    assert s["euler_stable"] and abs(s["delta_limit"] - 1.0) < 1e-12


def test_euler_explodes_past_two_over_abs_a_zoh_never():
    s = vz.kernel_state(log10_delta=math.log10(1.5), A=-2.0, L=40)  # delta 1.5 > 2/|A| = 1
    assert not s["euler_stable"] and float(s["K_euler"].abs()[-1]) > 1e3
    assert float(s["K_zoh"].abs().max()) < 1 and bool((s["sweep_zoh"] < 1).all())
    assert bool((s["sweep_euler"][s["sweep"] > 1.0 + 1e-9] > 1).all())


def test_explorer_controls_drive_state(monkeypatch):
    monkeypatch.delenv("TRANSFORMER_LAB_GRADING", raising=False)
    ex = vz.kernel_explorer(L=16)
    ex.controls["log10_delta"].value = 0.5  # delta 3.16 > 2/|A| = 1
    assert not ex.state["euler_stable"] and abs(ex.state["delta"] - 10 ** 0.5) < 1e-12
    assert ex.figure is not None and ex.renders >= 2
    assert vz.kernel_state(0.5, -0.5, 16)["euler_stable"]  # 2/|A| = 4: stable again


def test_grading_mode_turns_it_off(monkeypatch):
    monkeypatch.setenv("TRANSFORMER_LAB_GRADING", "1")
    w = vz.kernel_explorer()
    assert w.controls == {} and w.figure is None
