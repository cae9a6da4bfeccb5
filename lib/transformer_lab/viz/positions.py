"""Lecture 03's widget and helpers: position biases and tables (see :mod:`transformer_lab.viz`)."""

from __future__ import annotations

import math

import ipywidgets as widgets
import torch
import torch.nn.functional as F

from ..device import grading_mode
from .core import Explorer, WidgetsOff, plot_attention

__all__ = ["position_pattern", "position_explorer", "BIAS_SCHEMES", "TABLE_SCHEMES"]

BIAS_SCHEMES = ("shaw", "xl", "t5", "alibi")
TABLE_SCHEMES = ("sinusoidal", "learned")


def position_pattern(scheme, length: int, head: int = 0, n_heads: int | None = None,
                     head_dim: int | None = None, seed: int = 0) -> dict:
    """What a position scheme contributes, as a matrix to draw.

    * bias schemes (Shaw, XL, T5, ALiBi): ``matrix`` = ``score_bias(q, k)[0, head]``
      ``(L, L)``, with the *same content vector at every position* (``q_i = k_j = c_h``)
      so that the picture shows what position alone adds to the scores;
      ``kind = "bias"``.
    * RoPE: ``matrix[i, j] = rope(c_h, i) . rope(c_h, j) / sqrt(D)``, the score of one
      content vector placed at positions i and j: it depends only on ``j - i``;
      ``kind = "rope"``.
    * sinusoidal / learned: ``matrix`` = the ``(L, d_model)`` table added to the
      embeddings (``embed(0)``), ``kind = "table"``; ``similarity`` = the cosine
      similarity of positions ``(L, L)``.

    Every kind also gives ``offsets`` and ``profile``: the middle query's row against
    the offset ``j - i`` (for tables: the similarity to the middle position).
    """
    name = getattr(scheme, "name", type(scheme).__name__)
    L = length
    mid = L // 2
    offsets = torch.arange(L) - mid  # j - i for the middle query
    if name in TABLE_SCHEMES:
        d_model = scheme.d_model
        table = scheme.embed(torch.zeros(1, L, d_model))[0].detach()  # (L, d_model)
        unit = F.normalize(table, dim=-1)
        similarity = unit @ unit.T  # (L, L) cosine similarity of positions
        return {"kind": "table", "matrix": table, "similarity": similarity,
                "offsets": offsets, "profile": similarity[mid]}
    if n_heads is None or head_dim is None:
        raise ValueError("n_heads and head_dim are needed for score-level schemes")
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n_heads, head_dim, generator=g)  # one content vector per head
    qk = c[None, :, None, :].expand(1, n_heads, L, head_dim).contiguous()  # (1, H, L, D)
    with torch.no_grad():
        if name == "rope":
            rq, rk = scheme.rotate(qk, qk)  # R_i c, R_j c
            matrix = (rq @ rk.transpose(-1, -2))[0, head] / math.sqrt(head_dim)  # (L, L)
            kind = "rope"
        else:
            bias = scheme.score_bias(qk, qk)  # broadcastable to (1, H, L, L)
            if bias is None:
                matrix, kind = torch.zeros(L, L), "none"
            else:
                matrix, kind = bias.expand(1, n_heads, L, L)[0, head].detach(), "bias"
    return {"kind": kind, "matrix": matrix.float(), "offsets": offsets,
            "profile": matrix[mid].float()}


def position_explorer(d_model: int = 64, n_heads: int = 8, max_len: int = 64, length: int = 24,
                      scheme: str = "alibi", seed: int = 0, schemes: dict | None = None,
                      shaw_k: int = 4):
    """Lecture 03: what each position scheme adds, head by head.

    A dropdown over every scheme (``sinusoidal``, ``learned``, ``shaw``, ``xl``, ``t5``,
    ``rope``, ``alibi``), a ``head`` slider and a ``length`` slider. Bias schemes show
    their per-head bias matrix ``(L, L)``; RoPE the score of one content vector placed
    at positions i and j (a function of ``j - i`` only); sinusoidal and learned their
    table ``(L, d_model)`` and the cosine similarity between positions (see
    :func:`position_pattern`). The right panel plots the middle query's row against the
    offset ``j - i``. Schemes are built at initialisation by
    :func:`~transformer_lab.positions.make_positions` (after ``torch.manual_seed(seed)``;
    Shaw clipped at ``shaw_k``); pass ``schemes={"t5": trained_scheme, ...}`` to look at
    trained ones instead. The head slider is disabled for the table schemes.

    State: ``matrix`` (what the left panel shows), ``kind`` (``"bias"``, ``"rope"``,
    ``"table"``), ``offsets``, ``profile``, ``scheme``, ``head``, ``length``.
    """
    if grading_mode():
        return WidgetsOff()
    from ..positions import POSITION_SCHEMES, make_positions

    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
    head_dim = d_model // n_heads
    names = tuple(n for n in POSITION_SCHEMES if n != "none")
    if scheme not in names:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {', '.join(names)}")
    built: dict = dict(schemes or {})

    def get(name):
        if name not in built:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                kw = {"k": shaw_k} if name == "shaw" else {}
                built[name] = make_positions(name, d_model, n_heads, max_len=max_len, **kw)
            built[name].eval()
        return built[name]

    style = {"description_width": "initial"}
    controls = {
        "scheme": widgets.Dropdown(options=names, value=scheme, description="scheme", style=style),
        "head": widgets.IntSlider(value=0, min=0, max=n_heads - 1, description="head", style=style),
        "length": widgets.IntSlider(value=min(length, max_len), min=2, max=max_len,
                                    description="length", style=style),
    }

    def on_change(ex):
        ex.controls["head"].disabled = ex.controls["scheme"].value in TABLE_SCHEMES

    def compute(v):
        out = position_pattern(get(v["scheme"]), v["length"], head=v["head"], n_heads=n_heads,
                               head_dim=head_dim, seed=seed)
        out.update(scheme=v["scheme"], head=v["head"], length=v["length"])
        return out

    def draw(s):
        import matplotlib.pyplot as plt  # imported on first draw (see the module docstring)
        import seaborn as sns
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.4),
                                      gridspec_kw={"width_ratios": [3, 2]})
        name, head, L = s["scheme"], s["head"], s["length"]
        if s["kind"] == "table":
            sns.heatmap(s["matrix"].numpy(), ax=ax, cmap="RdBu_r", center=0.0,
                        xticklabels=False, yticklabels=max(1, L // 8))
            ax.set_xlabel("feature")
            ax.set_ylabel("position")
            ax.set_title(f"{name}: table added to the embeddings ({L} x {s['matrix'].shape[1]})")
            ax2.plot(s["offsets"].numpy(), s["profile"].numpy(), marker=".")
            ax2.set_ylabel("cosine similarity")
            ax2.set_title(f"similarity to position {L // 2}")
        else:
            what = ("score of one vector at i and j" if s["kind"] == "rope"
                    else "bias added to the scores")
            plot_attention(s["matrix"], ax=ax, center=0.0,
                           title=f"{name}, head {head}: {what}")
            ax.set_xticks([])
            ax.set_yticks([])
            ax2.plot(s["offsets"].numpy(), s["profile"].numpy(), marker=".")
            ax2.set_ylabel("score" if s["kind"] == "rope" else "bias")
            ax2.set_title(f"query {L // 2}'s row")
        ax2.set_xlabel("offset j - i")
        ax2.axvline(0, color="k", lw=0.5)
        ax2.grid(True, alpha=0.3)
        fig.tight_layout()
        return fig

    return Explorer(controls, compute, draw, on_change,
                    title="Position schemes: what each adds, head by head")
