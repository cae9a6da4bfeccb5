"""Lecture 09's widget: how far back Transformer-XL's cache lets a token see, layer by layer.

Segment recurrence with segments of length L and a cache of L_mem states per layer is the same
computation as one pass over the whole text with :func:`transformer_lab.memory.segment_mask`
(token i of segment s sees keys ``s L - L_mem <= j <= i``). Stacking N such layers, information
travels up to L_mem further back per layer: the token's **receptive field** after n layers is the
set of positions connected to it by a path of n allowed (query, key) steps. The explorer draws
the mask and that field for each layer, with and without the memory.
"""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import torch

from .. import memory as MEM
from ..device import grading_mode
from .core import Explorer, WidgetsOff
from .core import check_int as _check_int

__all__ = ["receptive_field", "receptive_field_figure", "memory_explorer"]


def receptive_field(T: int = 64, seg_len: int = 16, mem_len: int = 16, n_layers: int = 3,
                    token: int | None = None) -> dict:
    """The positions that can influence ``token``'s output after each of ``n_layers`` layers.

    Returns a dict: ``mask`` (T, T) bool, :func:`~transformer_lab.memory.segment_mask`;
    ``field`` (n_layers, T) bool, row n = positions reaching the token through n + 1 layers;
    ``span`` list, the distance to the farthest such position per layer; the same for
    ``mem_len = 0`` (a fixed window) as ``field_window`` and ``span_window``; and the inputs.
    """
    T = _check_int("T", T, 2)
    seg_len = _check_int("seg_len", seg_len, 1, T)
    mem_len = _check_int("mem_len", mem_len, 0)
    n_layers = _check_int("n_layers", n_layers, 1)
    token = T - 1 if token is None else _check_int("token", token, 0, T - 1)
    out = {"T": T, "seg_len": seg_len, "mem_len": mem_len, "n_layers": n_layers, "token": token}
    for key, m in (("", mem_len), ("_window", 0)):
        mask = MEM.segment_mask(T, seg_len, m)
        reach = torch.zeros(T, dtype=torch.bool)
        reach[token] = True
        rows = []
        for _ in range(n_layers):
            reach = (mask[reach].any(0))  # every key some reached position attends to
            rows.append(reach.clone())
        field = torch.stack(rows)
        out["mask" + key] = mask
        out["field" + key] = field
        out["span" + key] = [int(token - torch.nonzero(r)[0, 0]) for r in field]
    return out


def receptive_field_figure(state: dict):
    """Left: the one-pass mask equal to segment recurrence; right: the token's field per layer."""
    import matplotlib.pyplot as plt

    T, S, token = state["T"], state["seg_len"], state["token"]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10.5, 3.8), gridspec_kw={"width_ratios": [1, 1.5]})
    ax0.imshow(state["mask"].numpy(), cmap="Blues", vmin=0, vmax=1.3, interpolation="nearest")
    for b in range(S, T, S):
        ax0.axhline(b - 0.5, color="k", lw=0.6)
        ax0.axvline(b - 0.5, color="k", lw=0.6)
    ax0.set(title=f"who sees whom: L={S}, L_mem={state['mem_len']}", xlabel="key j", ylabel="query i")
    N = state["n_layers"]
    img = np.zeros((2 * N, T))
    for n in range(N):
        img[2 * n] = state["field_window"][n].numpy() * 0.5
        img[2 * n + 1] = state["field"][n].numpy()
    ax1.imshow(img, aspect="auto", cmap="Oranges", vmin=0, vmax=1, interpolation="nearest")
    ax1.set_yticks(range(2 * N))
    ax1.set_yticklabels([f"layer {n // 2 + 1}: " + ("no memory" if n % 2 == 0 else "with memory")
                         for n in range(2 * N)], fontsize=8)
    ax1.axvline(token, color="k", ls=":", lw=1)
    for b in range(S, T, S):
        ax1.axvline(b - 0.5, color="grey", lw=0.5)
    ax1.set(xlabel="position", title=f"what reaches token {token}: span {state['span'][-1]} with memory, "
                                     f"{state['span_window'][-1]} without")
    fig.tight_layout()
    return fig


def memory_explorer(T: int = 64, seg_len: int = 16, mem_len: int = 16, n_layers: int = 3,
                    token: int | None = None):
    """Lecture 09: segment length, memory length, layers and a token; draws the mask and the field."""
    if grading_mode():
        return WidgetsOff()
    slider = {"style": {"description_width": "initial"}, "continuous_update": False}
    token = T - 1 if token is None else token
    controls = {
        "seg_len": widgets.IntSlider(value=seg_len, min=2, max=32, description="segment L", **slider),
        "mem_len": widgets.IntSlider(value=mem_len, min=0, max=48, description="memory L_mem", **slider),
        "n_layers": widgets.IntSlider(value=n_layers, min=1, max=6, description="layers N", **slider),
        "token": widgets.IntSlider(value=token, min=0, max=T - 1, description="token", **slider),
    }

    def compute(values):
        return receptive_field(T, values["seg_len"], values["mem_len"], values["n_layers"], values["token"])

    return Explorer(controls, compute, receptive_field_figure,
                    title="Transformer-XL: how far back the cache lets a token see, layer by layer")
