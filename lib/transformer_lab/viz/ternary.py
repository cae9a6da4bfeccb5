"""Lecture 12's widget: absmean ternary weights and absmax activations, side by side.

:func:`quant_explorer` has two panels driven by three controls:

* the **latent weights** ``W`` of a layer (a Gaussian matrix, a fraction of whose entries is
  multiplied by ``outlier``) as a histogram, with the ternary thresholds
  :math:`\\pm\\Gamma_W/2` (:func:`transformer_lab.ternary.weight_quant`, :math:`\\Gamma_W` = mean |W|):
  entries between them become 0, the others -1 or +1; the fractions are in the title;
* one **activation row** ``x`` (with one large entry ``act_outlier``) and its absmax
  quantisation at ``n_bits`` bits (:func:`transformer_lab.ternary.activation_quant`), dequantised
  to :math:`\\hat x\\,\\Gamma_x/\\mathcal Q`: with a large outlier, the small entries round to 0.
"""

from __future__ import annotations

import ipywidgets as widgets
import torch

from .. import ternary as T
from ..device import grading_mode
from .core import Explorer, WidgetsOff

__all__ = ["quant_state", "quant_figure", "quant_explorer"]


def quant_state(outlier: float = 1.0, n_bits: int = 8, act_outlier: float = 1.0, d: int = 64,
                frac_outliers: float = 0.05, seed: int = 0) -> dict:
    """Everything the two panels show, as tensors and numbers (tests check it).

    ``w``: (d, d) latent weights, N(0, 1) with the first ``frac_outliers`` of its entries (in a
    fixed random order) times ``outlier``; ``x``: a row of d numbers N(0, 1) with entry 0 set to
    ``act_outlier`` times the row's largest magnitude.
    """
    g = torch.Generator().manual_seed(int(seed))
    w = torch.randn(d, d, generator=g, dtype=torch.float64)
    order = torch.randperm(d * d, generator=g)[: int(round(frac_outliers * d * d))]
    w.view(-1)[order] *= float(outlier)
    w_t, w_scale = T.weight_quant(w)
    x = torch.randn(d, generator=g, dtype=torch.float64)
    x[0] = float(act_outlier) * x.abs().max()
    x_q, x_scale = T.activation_quant(x, int(n_bits))
    q_max = 2 ** (int(n_bits) - 1) - 1
    x_deq = x_q * x_scale / q_max
    err = (x_deq - x)[1:].abs()  # the error on the entries other than the outlier
    return {"outlier": float(outlier), "n_bits": int(n_bits), "act_outlier": float(act_outlier),
            "w": w, "w_ternary": w_t, "w_scale": float(w_scale), "threshold": float(w_scale) / 2,
            "frac_zero": float((w_t == 0).double().mean()), "frac_pos": float((w_t == 1).double().mean()),
            "frac_neg": float((w_t == -1).double().mean()),
            "x": x, "x_q": x_q, "x_scale": float(x_scale), "q_max": q_max, "x_deq": x_deq,
            "rel_err": float(err.mean() / x[1:].abs().mean()),
            "rounded_to_zero": int(((x_q == 0) & (x != 0)).sum())}


def quant_figure(state: dict):
    """Draw :func:`quant_state`: the weight histogram with the thresholds, the activation row."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    ax = axes[0]
    w = state["w"].flatten().numpy()
    lim = max(4.0, float(abs(w).max()))
    ax.hist(w, bins=80, range=(-lim, lim), color="tab:blue", alpha=0.8)
    for s in (-1, 1):
        ax.axvline(s * state["threshold"], color="red", linestyle=":")
    ax.axvline(state["w_scale"], color="black", linestyle="--", label=f"Gamma_W = mean|W| = {state['w_scale']:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("latent weight W_ij (red: +-Gamma_W / 2)")
    ax.set_title(f"-1: {state['frac_neg']:.0%}   0: {state['frac_zero']:.0%}   +1: {state['frac_pos']:.0%}",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    i = range(len(state["x"]))
    ax.plot(i, state["x"].numpy(), "o", color="black", markersize=4, label="x")
    ax.plot(i, state["x_deq"].numpy(), "x", color="tab:red", markersize=6,
            label=f"x^ Gamma_x / Q ({state['n_bits']} bits)")
    ax.set_xlabel("entry i of one activation row")
    ax.set_title(f"{state['n_bits']} bits: mean error {state['rel_err']:.1%} of |x| (outlier left out), "
                 f"{state['rounded_to_zero']} entries rounded to 0", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def quant_explorer(outlier: float = 1.0, n_bits: int = 8, act_outlier: float = 1.0, d: int = 64):
    """Sliders for the weight outliers, the activation bits and the activation outlier over
    :func:`quant_figure` (a label in grading mode)."""
    if grading_mode():
        return WidgetsOff()
    controls = {
        "outlier": widgets.FloatSlider(value=outlier, min=0.0, max=20.0, step=0.5, description="W outliers x"),
        "n_bits": widgets.IntSlider(value=n_bits, min=T.SUPPORTED_BITS[0], max=T.SUPPORTED_BITS[-1],
                                    description="act bits"),
        "act_outlier": widgets.FloatSlider(value=act_outlier, min=1.0, max=50.0, step=1.0, description="x outlier x"),
    }

    def compute(values):
        return quant_state(values["outlier"], values["n_bits"], values["act_outlier"], d)

    return Explorer(controls, compute, quant_figure, title="Ternary weights and n-bit activations")
