"""Lecture 10's widget and helpers: the soft span mask and ACT's halting weights.

:func:`span_act_explorer` has two panels driven by four controls:

* the **span mask** chi_zeta(i - j) = clamp((nu + zeta - (i - j)) / nu, 0, 1) of one head
  (:func:`transformer_lab.adaptive.span_mask`) for a span ``zeta`` and a ramp ``nu``, drawn as
  a curve over the distance and as the (L, L) causal mask it makes;
* **ACT's halting weights** (:func:`transformer_lab.adaptive.act_weights`) of one position
  whose halting probability is the same ``psi`` at every step, for a threshold 1 - iota and a
  maximum of N steps: the weights p^(t), the halting step N_i, the remainder and the ponder cost.
"""

from __future__ import annotations

import ipywidgets as widgets
import torch

from .. import adaptive as AD
from ..device import grading_mode
from .core import Explorer, WidgetsOff

__all__ = ["span_act_state", "span_act_figure", "span_act_explorer"]


def span_act_state(span: float = 4.0, ramp: float = 3.0, L: int = 16, psi: float = 0.3,
                   threshold: float = 0.99, max_steps: int = 8) -> dict:
    """Everything the two panels show, as tensors and numbers (tests check it)."""
    mask = AD.span_mask(torch.tensor([float(span)], dtype=torch.float64), ramp, int(L))[0]  # (L, L)
    dist = torch.arange(int(L), dtype=torch.float64)
    curve = ((ramp + span - dist) / ramp).clamp(0, 1)  # chi(i - j) for distances i - j = 0..L-1
    probs = torch.full((int(max_steps),), float(psi), dtype=torch.float64)
    weights, n, r, p = AD.act_weights(probs, threshold)
    return {"span": float(span), "ramp": float(ramp), "L": int(L), "mask": mask, "curve": curve,
            "reach": int((curve > 0).sum()), "psi": float(psi), "threshold": float(threshold),
            "halt_probs": probs, "weights": weights, "n_steps": int(n), "remainder": float(r),
            "ponder": float(p)}


def span_act_figure(state: dict):
    """Draw :func:`span_act_state`: mask curve, mask matrix, halting weights."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    L = state["L"]
    ax = axes[0]
    ax.plot(range(L), state["curve"].numpy(), marker="o")
    ax.axvline(state["span"], color="grey", linestyle=":", label=f"span zeta = {state['span']:g}")
    ax.axvline(state["span"] + state["ramp"], color="red", linestyle=":", label=f"zeta + nu = {state['span'] + state['ramp']:g}")
    ax.set_xlabel("distance i - j")
    ax.set_ylabel("chi(i - j)")
    ax.set_title(f"soft span mask: {state['reach']} keys (itself included) have weight > 0")
    ax.legend(fontsize=8)
    axes[1].imshow(state["mask"].numpy(), cmap="Blues", vmin=0, vmax=1)
    axes[1].set_xlabel("key j")
    axes[1].set_ylabel("query i")
    axes[1].set_title("the (L, L) mask")
    ax = axes[2]
    steps = range(1, len(state["weights"]) + 1)
    ax.bar(steps, state["weights"].numpy(), color="tab:green", label="weight p^(t)")
    ax.plot(steps, state["halt_probs"].cumsum(0).numpy(), color="black", marker=".", label="cumulative psi")
    ax.axhline(state["threshold"], color="red", linestyle=":", label=f"threshold 1 - iota = {state['threshold']:g}")
    ax.set_xlabel("step t")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"ACT: halts at N_i = {state['n_steps']}, R_i = {state['remainder']:.2f}, "
                 f"ponder {state['ponder']:.2f}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def span_act_explorer(span: float = 4.0, ramp: float = 3.0, psi: float = 0.3, threshold: float = 0.99,
                      L: int = 16, max_steps: int = 8):
    """Sliders for zeta, nu, psi and 1 - iota over :func:`span_act_figure` (a label in grading mode)."""
    if grading_mode():
        return WidgetsOff()
    controls = {
        "span": widgets.FloatSlider(value=span, min=0.0, max=L, step=0.5, description="span zeta"),
        "ramp": widgets.FloatSlider(value=ramp, min=0.5, max=8.0, step=0.5, description="ramp nu"),
        "psi": widgets.FloatSlider(value=psi, min=0.0, max=1.0, step=0.05, description="psi"),
        "threshold": widgets.FloatSlider(value=threshold, min=0.05, max=1.0, step=0.01, description="1 - iota"),
    }

    def compute(values):
        return span_act_state(values["span"], values["ramp"], L, values["psi"], values["threshold"], max_steps)

    return Explorer(controls, compute, span_act_figure, title="Adaptive span and ACT")
