"""Lecture 01's widget and helpers: attention maps and the 1/sqrt(d) scale (see :mod:`transformer_lab.viz`)."""

from __future__ import annotations

import math
from typing import Sequence

import ipywidgets as widgets
import numpy as np
import torch

from ..device import grading_mode
from .core import Explorer, WidgetsOff, plot_attention

__all__ = ["row_entropy", "attention_explorer", "SCALES", "MASKS"]


def row_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy of each attention row in nats: ``H_i = -sum_j w_ij log w_ij`` (0 log 0 = 0).

    ``weights`` ``(..., Lq, Lk)`` -> ``(..., Lq)``. Uniform over ``n`` keys gives ``log n``;
    a one-hot (saturated) row gives 0.
    """
    return -torch.special.xlogy(weights, weights).sum(-1)


SCALES = ("1/sqrt(d)", "1", "custom")
MASKS = ("none", "causal", "padding")


def _qk_2d(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor (L, D); got {type(t).__name__}")
    while t.dim() > 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (L, D) (or (1, 1, L, D)); got shape "
                         f"{tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {t.dtype}")
    return t.detach().float().cpu()


def attention_explorer(q: torch.Tensor | None = None, k: torch.Tensor | None = None,
                       tokens: Sequence[str] | None = None, length: int = 8,
                       max_head_dim: int = 256, seed: int = 0):
    """Lecture 01: how temperature, the 1/sqrt(d) scale, head_dim and masks shape attention.

    Scores are ``S = q k^T * scale / temperature`` over the first ``head_dim`` features,
    then a masked softmax (library :func:`~transformer_lab.attention.masked_softmax`);
    the figure shows the weights and each query row's entropy (against ``log n``, the
    entropy of uniform attention over the ``n`` visible keys).

    ``q``, ``k``: ``(L, D)`` tensors (``k`` defaults to ``q``); by default random
    ``N(0, 1)`` entries with ``length`` tokens and ``max_head_dim`` features, so that
    ``q . k`` has variance ``d``: with ``scale = 1`` the softmax saturates as ``d`` grows,
    with ``1/sqrt(d)`` it does not. ``tokens`` label the positions.

    Controls: ``temperature``, ``scale`` (``"1/sqrt(d)"``, ``"1"``, ``"custom"``),
    ``custom_scale``, ``head_dim``, ``mask`` (``"none"``, ``"causal"``, ``"padding"``),
    ``valid_len`` (real tokens, for the padding mask).
    State: ``weights`` ``(Lq, Lk)``, ``scores``, ``entropy`` ``(Lq,)``, ``mean_entropy``,
    ``max_entropy`` ``(Lq,)`` (log of visible keys), ``scale``, ``mask`` (bool keep mask).
    """
    if grading_mode():
        return WidgetsOff()
    from ..attention import attention_scores, causal_mask, masked_softmax, padding_mask

    if q is None:
        if k is not None:
            raise ValueError("give q together with k (or neither)")
        L = len(tokens) if tokens is not None else length
        if L < 1:
            raise ValueError(f"length must be >= 1; got {L}")
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(L, max_head_dim, generator=g)
        k = torch.randn(L, max_head_dim, generator=g)
    else:
        q = _qk_2d(q, "q")
        k = q if k is None else _qk_2d(k, "k")
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(f"q and k must have the same head_dim; got {q.shape[-1]} and {k.shape[-1]}")
    Lq, Lk, D = q.shape[0], k.shape[0], q.shape[1]
    if tokens is not None and len(tokens) not in (Lq, Lk):
        raise ValueError(f"tokens must have one label per position ({Lk}); got {len(tokens)}")
    key_labels = list(tokens) if tokens is not None and len(tokens) == Lk else None
    query_labels = list(tokens) if tokens is not None and len(tokens) == Lq else None

    style = {"description_width": "initial"}
    controls = {
        "temperature": widgets.FloatLogSlider(value=1.0, base=10, min=-1, max=1, step=0.05,
                                              description="temperature", style=style),
        "scale": widgets.Dropdown(options=SCALES, value="1/sqrt(d)", description="scale",
                                  style=style),
        "custom_scale": widgets.FloatLogSlider(value=0.1, base=10, min=-3, max=1, step=0.05,
                                               description="custom scale", style=style),
        "head_dim": widgets.IntSlider(value=min(64, D), min=1, max=D, description="head_dim",
                                      style=style),
        "mask": widgets.Dropdown(options=MASKS, value="none", description="mask", style=style),
        "valid_len": widgets.IntSlider(value=max(1, Lk - 2), min=1, max=Lk,
                                       description="real tokens (padding)", style=style),
    }

    def on_change(ex):
        ex.controls["custom_scale"].disabled = ex.controls["scale"].value != "custom"
        ex.controls["valid_len"].disabled = ex.controls["mask"].value != "padding"

    def compute(v):
        d = v["head_dim"]
        scale = {"1/sqrt(d)": 1.0 / math.sqrt(d), "1": 1.0, "custom": v["custom_scale"]}[v["scale"]]
        qd, kd = q[None, None, :, :d], k[None, None, :, :d]  # (1, 1, L, d)
        scores = attention_scores(qd, kd, scale=scale) / v["temperature"]  # q k^T * scale / T
        if v["mask"] == "causal":
            keep = causal_mask(Lq, Lk)  # (Lq, Lk)
        elif v["mask"] == "padding":
            keep = padding_mask([v["valid_len"]], Lk)[0, 0].expand(Lq, Lk)  # (Lq, Lk)
        else:
            keep = torch.ones(Lq, Lk, dtype=torch.bool)
        weights = masked_softmax(scores, keep)[0, 0]  # (Lq, Lk)
        entropy = row_entropy(weights)  # (Lq,)
        visible = keep.sum(-1).clamp(min=1).float()
        return {"weights": weights, "scores": scores[0, 0], "entropy": entropy,
                "mean_entropy": float(entropy.mean()), "max_entropy": visible.log(),
                "scale": scale, "temperature": v["temperature"], "head_dim": d,
                "mask": keep, "mask_name": v["mask"]}

    def draw(s):
        import matplotlib.pyplot as plt  # imported on first draw (see the module docstring)
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2),
                                      gridspec_kw={"width_ratios": [3, 2]})
        plot_attention(s["weights"], x_labels=key_labels, y_labels=query_labels, ax=ax,
                       vmin=0.0, vmax=1.0,
                       title=f"weights, d={s['head_dim']}, scale={s['scale']:.3g}, "
                             f"T={s['temperature']:.2g}")
        rows = np.arange(Lq)
        ax2.barh(rows, s["entropy"].numpy(), color="tab:blue", label="row entropy")
        ax2.plot(s["max_entropy"].numpy(), rows, "k|", markersize=12, label="log(#visible keys)")
        ax2.set_ylim(Lq - 0.5, -0.5)
        ax2.set_yticks(rows)
        if query_labels is not None:
            ax2.set_yticklabels(query_labels)
        ax2.set_xlabel("entropy (nats)")
        ax2.set_title(f"mean entropy {s['mean_entropy']:.2f}")
        ax2.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        return fig

    return Explorer(controls, compute, draw, on_change,
                    title="Attention explorer: temperature, scale, head_dim, mask")
