"""Lecture 07's widget and helpers: a kernel approximation of attention beside the exact matrix.

Performer (Choromanski et al. 2021, arXiv:2009.14794) replaces ``exp(q . k / sqrt(D))`` by a
dot product of m random features, ``phi(q) . phi(k)``; the attention matrix it implies is
``A_hat = D_hat^-1 phi(Q') phi(K')^T`` (row-normalised, q' = q D^(-1/4), k' = k D^(-1/4)).
The explorer draws the exact softmax matrix, the implied one, and the relative error of the
output against exact attention as m grows, for positive or trigonometric features, i.i.d. or
orthogonal. Everything is computed by :mod:`transformer_lab.lowrank`; only pictures live here.

Import in a notebook as ``from transformer_lab.viz import lowrank as vz``.
"""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import torch

from .. import lowrank as LR
from ..device import grading_mode
from .core import Explorer, WidgetsOff

__all__ = ["example_qkv", "kernel_attention_state", "plot_kernel_attention", "kernel_attention_explorer",
           "FEATURE_COUNTS"]

#: The feature counts of the explorer's slider and of its error curve.
FEATURE_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def example_qkv(length: int = 32, head_dim: int = 16, sharpness: float = 1.5, seed: int = 0):
    """Random queries, keys and values (1, 1, L, D), float64, for the explorer.

    q and k have i.i.d. N(0, (sharpness / 2)^2) entries, v standard normal. ``sharpness``
    sets both the spread of the scores (q . k / sqrt(D) has standard deviation
    (sharpness / 2)^2) and the norms that the random features' variances grow with
    (|q'|^2 = |q|^2 / sqrt(D) is about (sharpness / 2)^2 sqrt(D)): at 1 positive and
    trigonometric features are both tame, at 1.5-2 trigonometric ones blow up at few features.
    """
    for name, value in (("length", length), ("head_dim", head_dim), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if not isinstance(sharpness, (int, float)) or sharpness <= 0:
        raise ValueError(f"sharpness must be a positive number; got {sharpness!r}")
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, 1, 1, length, head_dim, generator=g, dtype=torch.float64).unbind(0)
    return q * sharpness / 2, k * sharpness / 2, v


def kernel_attention_state(q, k, v, n_features: int, kind: str = "positive", orthogonal: bool = True,
                           seed: int = 0, causal: bool = False, curve: bool = True) -> dict:
    """What the explorer shows, computed by the library.

    q, k, v (1, 1, L, D). Returns ``exact`` (L, L) softmax weights, ``approx`` (L, L) the
    weights the random features imply (:func:`lowrank.performer_attention` with
    ``need_weights``; rows of trig weights can be negative), ``error`` the relative error of
    the output against exact attention (:func:`lowrank.attention_error`), ``negative`` the
    share of negative entries of ``approx``, ``min_row_sum`` the smallest unnormalised row
    sum of the estimated kernel (trig's can reach 0 or below), and with ``curve`` the error
    for every count in :data:`FEATURE_COUNTS` (same seed) as ``counts``, ``errors``.
    """
    LR._check_choice("kind", kind, LR.FEATURE_KINDS)

    def run(m):
        g = torch.Generator().manual_seed(seed)
        out, w = LR.performer_attention(q, k, v, m, causal, generator=g, orthogonal=orthogonal,
                                        kind=kind, need_weights=True)
        return out, w

    out, approx = run(n_features)
    exact = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
                          + (0 if not causal else torch.full((q.shape[2],) * 2, float("-inf"),
                                                             dtype=q.dtype).triu(1)), dim=-1)
    g = torch.Generator().manual_seed(seed)
    W = LR.gaussian_features(n_features, q.shape[-1], g, orthogonal, dtype=q.dtype)
    root = q.shape[-1] ** -0.25
    est = LR.softmax_kernel_estimate(q * root, k * root, W, kind)  # (1, 1, L, L) unnormalised
    state = {"exact": exact[0, 0], "approx": approx[0, 0], "error": float(LR.attention_error(out, q, k, v, causal)),
             "negative": float((approx < 0).double().mean()), "min_row_sum": float(est.sum(-1).min()),
             "n_features": n_features, "kind": kind, "orthogonal": orthogonal, "seed": seed}
    if curve:
        state["counts"] = list(FEATURE_COUNTS)
        state["errors"] = [float(LR.attention_error(run(m)[0], q, k, v, causal)) for m in FEATURE_COUNTS]
    return state


def plot_kernel_attention(states, titles=None):
    """Exact and approximated attention side by side, one row per state; returns the Figure.

    ``states``: a list of :func:`kernel_attention_state` results (``curve`` not needed).
    Column 1 the exact softmax matrix (the same for every row), then one column per state; the
    colour scale is the exact matrix's, so larger weights saturate, and negative weights are red.
    """
    import matplotlib.pyplot as plt  # imported on first draw (see viz/__init__.py)

    if not states:
        raise ValueError("states must hold at least one kernel_attention_state")
    n = len(states)
    fig, axes = plt.subplots(1, n + 1, figsize=(2.6 * (n + 1), 2.9))
    vmax = float(states[0]["exact"].max())
    axes[0].imshow(states[0]["exact"].numpy(), cmap="viridis", vmin=0, vmax=vmax)
    axes[0].set_title("exact softmax", fontsize=9)
    for i, s in enumerate(states):
        ax = axes[i + 1]
        approx = s["approx"].numpy()
        ax.imshow(np.ma.masked_less(approx, 0), cmap="viridis", vmin=0, vmax=vmax)
        negative = np.ma.masked_greater_equal(approx, 0)
        if negative.count():  # negative weights (only trig features make them) in red, as in the explorer
            ax.imshow(-negative, cmap="Reds", vmin=0, vmax=vmax)
        title = titles[i] if titles else f"{s['kind']}, n_f = {s['n_features']}"
        ax.set_title(f"{title}\nerror {s['error']:.2f}", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_ylabel("query i")
    fig.tight_layout()
    return fig


def kernel_attention_explorer(n_features: int = 16, kind: str = "positive", orthogonal: bool = True,
                              seed: int = 0, length: int = 32, head_dim: int = 16, sharpness: float = 1.5):
    """Lecture 07: random-feature attention beside exact attention.

    Controls: ``n_features`` m (a slider over :data:`FEATURE_COUNTS`), ``kind`` (positive or
    trig features), ``orthogonal`` (FAVOR+'s blocks of orthogonal directions, or i.i.d.),
    ``seed`` (a new draw of the features), ``sharpness`` (scales q and k, see
    :func:`example_qkv`: sharper attention, larger norms, noisier estimates). The figure: the exact softmax matrix, the matrix the
    features imply (negative entries, which only trig features make, in red), and the error
    of the output against exact attention as m grows, the current m marked.

    State: :func:`kernel_attention_state` of :func:`example_qkv` ``(length, head_dim,
    sharpness)``.
    """
    if grading_mode():
        return WidgetsOff()
    if n_features not in FEATURE_COUNTS:
        raise ValueError(f"n_features must be one of {FEATURE_COUNTS}; got {n_features!r}")
    LR._check_choice("kind", kind, LR.FEATURE_KINDS)
    style = {"description_width": "initial"}
    controls = {
        "n_features": widgets.SelectionSlider(options=list(FEATURE_COUNTS), value=n_features,
                                              description="features n_f", style=style),
        "kind": widgets.Dropdown(options=list(LR.FEATURE_KINDS), value=kind, description="kind", style=style),
        "orthogonal": widgets.Checkbox(value=orthogonal, description="orthogonal (FAVOR+)"),
        "seed": widgets.IntSlider(value=seed, min=0, max=9, description="seed", style=style),
        "sharpness": widgets.FloatSlider(value=sharpness, min=0.5, max=2.5, step=0.25,
                                         description="sharpness", style=style),
    }

    def compute(val):
        q, k, v = example_qkv(length, head_dim, val["sharpness"], seed=0)
        state = kernel_attention_state(q, k, v, val["n_features"], val["kind"], val["orthogonal"], val["seed"])
        state["sharpness"] = val["sharpness"]
        return state

    def draw(s):
        import matplotlib.pyplot as plt  # imported on first draw

        fig, axes = plt.subplots(1, 3, figsize=(12.5, 3.6), gridspec_kw={"width_ratios": [1, 1, 1.25]})
        vmax = float(s["exact"].max())
        axes[0].imshow(s["exact"].numpy(), cmap="viridis", vmin=0, vmax=vmax)
        axes[0].set_title(f"exact softmax (sharpness {s['sharpness']:.2f})", fontsize=9)
        approx = s["approx"].numpy()
        shown = np.ma.masked_less(approx, 0)
        axes[1].imshow(shown, cmap="viridis", vmin=0, vmax=vmax)
        neg = np.ma.masked_greater_equal(approx, 0)
        if neg.count():
            axes[1].imshow(-neg, cmap="Reds", vmin=0, vmax=vmax)
        axes[1].set_title(f"{s['kind']} features, n_f = {s['n_features']}"
                          f"{', orthogonal' if s['orthogonal'] else ', i.i.d.'}\n"
                          f"error {s['error']:.3f}, negative entries {100 * s['negative']:.0f}%", fontsize=9)
        for ax in axes[:2]:
            ax.set_xlabel("key j")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0].set_ylabel("query i")
        axes[2].plot(s["counts"], s["errors"], marker="o", label="this draw")
        axes[2].plot(s["counts"], [s["errors"][0] * (s["counts"][0] / m) ** 0.5 for m in s["counts"]],
                     ls=":", color="gray", label="slope -1/2")
        axes[2].scatter([s["n_features"]], [s["error"]], color="red", zorder=3, s=50, label="current n_f")
        axes[2].set(xscale="log", yscale="log", xlabel="random features n_f", ylabel="relative error of the output")
        axes[2].grid(True, which="both", alpha=0.3)
        axes[2].legend(fontsize=8)
        fig.tight_layout()
        return fig

    return Explorer(controls, compute, draw, title="Random-feature attention against exact attention")
