"""viz/objectives.py: the distillation explorer's state against direct computations; controls drive it."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from transformer_lab.viz import objectives as vz  # noqa: E402


def test_state_matches_direct_computation():
    s = vz.distill_state(temperature=3.0, mix=0.3)
    T = 3.0
    pt, ps = torch.softmax(s["teacher"] / T, -1), torch.softmax(s["student"] / T, -1)
    assert torch.allclose(s["p_teacher"], pt) and torch.allclose(s["p_student"], ps)
    kl = float((pt * (pt.log() - ps.log())).sum())
    assert abs(s["soft"] - T ** 2 * kl) < 1e-5
    # the gradient of T^2 KL with respect to the student's logits is T (p_s - p_t)
    assert abs(s["grad_now"][0] - float((T * (ps - pt)).norm())) < 1e-5
    assert abs(s["grad_now"][1] - float(((ps - pt) / T).norm())) < 1e-6
    assert s["p_teacher_1"].argmax() == 0 and s["p_teacher_1"][0] > 0.9  # a confident teacher


def test_student_equal_to_teacher_has_zero_soft_loss():
    s = vz.distill_state(temperature=4.0, mix=1.0)
    assert s["soft"] < 1e-9 and s["grad_now"][0] < 1e-6


def test_without_t2_the_gradient_vanishes_at_high_temperature():
    s = vz.distill_state(mix=0.0)
    plain, t2 = s["grad_plain"], s["grad_t2"]
    assert plain[-1] < plain[0] / 100  # 1/T^2 shrinkage over 0.5 -> 20
    assert t2[-1] / plain[-1] > 300  # T^2 = 400 at T = 20
    assert torch.allclose(t2, plain * vz.TEMPERATURES ** 2, rtol=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        vz.distill_state(temperature=0.0)


def test_explorer_controls_drive_state(monkeypatch):
    monkeypatch.delenv("TRANSFORMER_LAB_GRADING", raising=False)
    ex = vz.distill_explorer()
    ex.controls["temperature"].value = 5.0
    assert ex.state["temperature"] == 5.0 and ex.figure is not None and ex.renders == 2
    ex.controls["mix"].value = 1.0
    assert ex.state["soft"] < 1e-9


def test_every_slider_end_draws(monkeypatch):
    monkeypatch.delenv("TRANSFORMER_LAB_GRADING", raising=False)
    import matplotlib.pyplot as plt

    for T, mix in ((0.5, 0.0), (10.0, 1.0), (0.5, 1.0), (10.0, 0.0)):
        plt.close(vz.distill_figure(vz.distill_state(T, mix)))


def test_grading_mode_turns_it_off(monkeypatch):
    monkeypatch.setenv("TRANSFORMER_LAB_GRADING", "1")
    w = vz.distill_explorer()
    assert w.controls == {} and w.figure is None
