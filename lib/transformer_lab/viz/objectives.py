"""Lecture 14's widget: distillation's soft targets at a temperature, and why the loss has T^2.

:func:`distill_explorer` has two panels driven by two controls:

* the **temperature** ``T``: a teacher's softmax at 1 and at ``T`` over ten classes (the "dark
  knowledge": at T = 1 nearly all the mass is on one class, at a larger T the ranking of the
  wrong classes shows), and the student's softmax at ``T``;
* the **student** ``mix``: the student's logits are ``mix * teacher + (1 - mix) * other`` (a
  fixed random logit vector), so at ``mix = 1`` the student equals the teacher and the soft loss
  :math:`T^2\\,\\mathrm{KL}(p^{(T)}_\\text{t}\\,\\|\\,p^{(T)}_\\text{s})` is 0
  (:func:`transformer_lab.objectives.distillation_loss`).

The right panel is the size of the soft loss's gradient with respect to the student's logits as a
function of ``T``, with and without the factor :math:`T^2`: without it the gradient shrinks like
:math:`1/T^2`; with it the size stays comparable across temperatures (Hinton et al. 2015, sec. 2).
"""

from __future__ import annotations

import ipywidgets as widgets
import torch

from .. import objectives as O
from ..device import grading_mode
from .core import Explorer, WidgetsOff

__all__ = ["distill_state", "distill_figure", "distill_explorer", "TEMPERATURES"]

#: The temperatures of the gradient curve (the right panel), log-spaced from 0.5 to 20.
TEMPERATURES = torch.logspace(torch.log10(torch.tensor(0.5)), torch.log10(torch.tensor(20.0)), 40,
                              dtype=torch.float64)


def _logits(seed: int, n_classes: int):
    g = torch.Generator().manual_seed(int(seed))
    teacher = torch.randn(n_classes, generator=g, dtype=torch.float64) * 2.0
    teacher[0] += 6.0  # a confident teacher: class 0 is right, the others carry its "dark knowledge"
    other = torch.randn(n_classes, generator=g, dtype=torch.float64) * 2.0
    return teacher, other


def _soft_grad(student: torch.Tensor, teacher: torch.Tensor, T: float, squared: bool) -> float:
    s = student.clone().requires_grad_(True)
    loss = O.distillation_loss(s[None], teacher[None], temperature=T)["soft"]
    if not squared:
        loss = loss / T ** 2
    loss.backward()
    return float(s.grad.norm())


def distill_state(temperature: float = 2.0, mix: float = 0.5, n_classes: int = 10, seed: int = 0) -> dict:
    """Everything the two panels show (tests check it).

    ``teacher``, ``student`` (n_classes,) float64 logits; ``p_teacher_1`` the teacher's softmax at
    T = 1, ``p_teacher``, ``p_student`` at ``temperature``; ``soft`` = T^2 KL(p_t^(T) || p_s^(T));
    ``grad_t2`` and ``grad_plain``: the norm of d soft / d student logits over
    :data:`TEMPERATURES` with and without the T^2 factor, and ``grad_now`` at ``temperature``.
    """
    T = float(temperature)
    if not T > 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    teacher, other = _logits(seed, n_classes)
    student = float(mix) * teacher + (1.0 - float(mix)) * other
    soft = O.distillation_loss(student[None], teacher[None], temperature=T)["soft"]
    return {"temperature": T, "mix": float(mix), "teacher": teacher, "student": student,
            "p_teacher_1": torch.softmax(teacher, -1), "p_teacher": torch.softmax(teacher / T, -1),
            "p_student": torch.softmax(student / T, -1), "soft": float(soft),
            "temperatures": TEMPERATURES,
            "grad_t2": torch.tensor([_soft_grad(student, teacher, float(t), True) for t in TEMPERATURES], dtype=torch.float64),
            "grad_plain": torch.tensor([_soft_grad(student, teacher, float(t), False) for t in TEMPERATURES], dtype=torch.float64),
            "grad_now": (_soft_grad(student, teacher, T, True), _soft_grad(student, teacher, T, False))}


def distill_figure(state: dict):
    """Draw :func:`distill_state`: the three distributions as bars, the gradient sizes against T."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    ax = axes[0]
    k = torch.arange(len(state["teacher"])).numpy()
    ax.bar(k - 0.27, state["p_teacher_1"].numpy(), 0.27, color="lightgray", label="teacher, T = 1")
    ax.bar(k, state["p_teacher"].numpy(), 0.27, color="tab:blue", label=f"teacher, T = {state['temperature']:g}")
    ax.bar(k + 0.27, state["p_student"].numpy(), 0.27, color="tab:orange",
           label=f"student (mix {state['mix']:g}), T = {state['temperature']:g}")
    ax.set_yscale("log")
    ax.set_ylim(1e-6, 1.5)
    ax.set_xticks(k)
    ax.set_xlabel("class (0 is the right one)")
    ax.set_ylabel("probability (log scale)")
    ax.set_title(f"soft loss T^2 KL(p_t || p_s) = {state['soft']:.4f}", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    ax = axes[1]
    ts = state["temperatures"].numpy()
    ax.loglog(ts, state["grad_t2"].numpy(), color="tab:green", label="with T^2 (Hinton et al., DistilBERT)")
    ax.loglog(ts, state["grad_plain"].numpy(), color="tab:red", linestyle="--", label="without T^2")
    ax.axvline(state["temperature"], color="black", linestyle=":")
    ax.set_xlabel("temperature T")
    ax.set_ylabel("|d soft loss / d student logits|")
    g2, g1 = state["grad_now"]
    ax.set_title(f"at T = {state['temperature']:g}: {g2:.3g} with T^2, {g1:.3g} without", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def distill_explorer(temperature: float = 1.0, mix: float = 0.5, n_classes: int = 10):
    """Sliders for the temperature and how close the student is to the teacher, over
    :func:`distill_figure` (a label in grading mode)."""
    if grading_mode():
        return WidgetsOff()
    controls = {
        "temperature": widgets.FloatSlider(value=temperature, min=0.5, max=10.0, step=0.5, description="T"),
        "mix": widgets.FloatSlider(value=mix, min=0.0, max=1.0, step=0.1, description="student mix"),
    }

    def compute(values):
        return distill_state(values["temperature"], values["mix"], n_classes)

    return Explorer(controls, compute, distill_figure, title="Distillation: soft targets at a temperature")
