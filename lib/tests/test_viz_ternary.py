"""viz/ternary.py: the explorer's state against direct computations; the controls drive it."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

from transformer_lab import ternary as T  # noqa: E402
from transformer_lab.viz import ternary as vz  # noqa: E402


def test_state_matches_library():
    s = vz.quant_state(outlier=1.0, n_bits=8, act_outlier=1.0, d=32)
    w_t, w_scale = T.weight_quant(s["w"])
    assert torch.equal(s["w_ternary"], w_t) and abs(s["w_scale"] - float(s["w"].abs().mean())) < 1e-12
    assert abs(s["threshold"] - s["w_scale"] / 2) < 1e-12
    # the thresholds are where the rounding flips: |W| < Gamma_W / 2 -> 0
    small = s["w"].abs() < s["threshold"]
    assert torch.equal(s["w_ternary"] == 0, small)
    assert abs(s["frac_zero"] + s["frac_pos"] + s["frac_neg"] - 1) < 1e-12
    assert 0.2 < s["frac_zero"] < 0.5  # about a third for a Gaussian
    assert s["q_max"] == 127 and torch.allclose(s["x_deq"], s["x"], atol=s["x_scale"] / 127)


def test_outliers_shift_thresholds_and_crush_small_activations():
    base = vz.quant_state(outlier=1.0, n_bits=4, act_outlier=1.0, d=32)
    big = vz.quant_state(outlier=20.0, n_bits=4, act_outlier=30.0, d=32)
    assert big["w_scale"] > base["w_scale"] and big["frac_zero"] > base["frac_zero"]
    assert big["rounded_to_zero"] > base["rounded_to_zero"] and big["rel_err"] > base["rel_err"]
    assert vz.quant_state(n_bits=8)["rel_err"] < vz.quant_state(n_bits=2)["rel_err"]


def test_explorer_controls_drive_state(monkeypatch):
    monkeypatch.delenv("TRANSFORMER_LAB_GRADING", raising=False)
    ex = vz.quant_explorer(d=16)
    ex.controls["n_bits"].value = 3
    assert ex.state["n_bits"] == 3 and ex.state["q_max"] == 3
    assert int(ex.state["x_q"].abs().max()) <= 4
    assert ex.figure is not None and ex.renders == 2  # built once, redrawn once per change


def test_grading_mode_turns_it_off(monkeypatch):
    monkeypatch.setenv("TRANSFORMER_LAB_GRADING", "1")
    w = vz.quant_explorer()
    assert w.controls == {} and w.figure is None
