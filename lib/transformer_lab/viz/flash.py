"""Lecture 08's widget and helpers: FlashAttention's tiles, step by step.

The forward of :func:`transformer_lab.flash.flash_attention_forward` visits tiles in
FlashAttention-2's order: for each query block (a band of rows), every key block from left to
right, skipping with a causal mask the tiles that lie wholly in the future. The explorer
replays that loop on one small head and shows, at a chosen step:

* the **tile plan** (:func:`transformer_lab.flash.tile_plan`): skipped, full and diagonal
  (masked) tiles, the tiles already visited and the one being loaded;
* one **query row** i: its scores s_ij, and the running max m and running sum l of the
  online softmax after each key block folded in so far;
* the **partial output** o / l of that row (what the output would be if the loop stopped here)
  against the exact output: its error falls to rounding at the row's last key block.

Everything is computed with :func:`transformer_lab.flash.online_softmax_update` on a
``(L, D)`` head drawn from a fixed seed.
"""

from __future__ import annotations

import math

import ipywidgets as widgets
import numpy as np
import torch

from .. import flash as FL
from ..device import grading_mode
from .core import Explorer, WidgetsOff
from .core import check_int as _check_int

__all__ = ["flash_trace", "plot_tile_plan", "flash_tile_figure", "flash_tile_explorer"]

#: Colours of the tile kinds (SKIPPED, MASKED, FULL) in the pictures.
TILE_COLORS = {FL.SKIPPED: "#f2f2f2", FL.MASKED: "#f4a582", FL.FULL: "#92c5de"}
TILE_NAMES = {FL.SKIPPED: "skipped", FL.MASKED: "diagonal (masked)", FL.FULL: "full"}


def flash_trace(L: int = 48, block_q: int = 8, block_k: int = 8, causal: bool = True,
                step: int | None = None, row: int = 0, D: int = 8, seed: int = 0) -> dict:
    """Replay the tiled forward on one random head (L, D) up to ``step``; follow query ``row``.

    Returns a dict: ``plan`` (T_r, T_c) tile kinds; ``order`` the visited tiles ``(i, j, kind)``
    in FlashAttention-2's order; ``n_steps``; ``step`` (clipped to the last one);
    ``current`` the tile loaded at that step; ``visited`` the set of tiles done by then;
    ``row``, ``row_block``; ``scores`` (L,) the row's scaled scores (-inf in its future when
    causal); ``blocks`` the key blocks folded into the row so far and ``m``, ``l`` the running
    max and sum after each; ``partial`` (D,) the row's o / l at this step (zeros before its
    first tile) and ``exact`` (D,) the true output; ``errors`` max |o / l - exact| after each
    folded block; ``counts`` tiles per kind.
    """
    L = _check_int("L", L, 1)
    block_q, block_k = _check_int("block_q", block_q, 1), _check_int("block_k", block_k, 1)
    row = _check_int("row", row, 0, L - 1)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(L, D, generator=g, dtype=torch.float64) for _ in range(3))
    scale = 1.0 / math.sqrt(D)
    scores = (q @ k.T) * scale  # (L, L): tiny, for the pictures only
    if causal:
        scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    exact = torch.softmax(scores, -1) @ v  # (L, D)
    plan = FL.tile_plan(L, L, block_q, block_k, causal=causal)
    order = [(i, j, int(plan[i, j])) for i in range(plan.shape[0]) for j in range(plan.shape[1])
             if plan[i, j] != FL.SKIPPED]  # FA-2: query blocks outside, key blocks inside
    n_steps = len(order)
    step = n_steps - 1 if step is None else min(_check_int("step", step, 0), n_steps - 1)
    row_block = row // block_q
    r0 = row_block * block_q
    state = FL.online_softmax_init((1,), D, dtype=torch.float64)  # the row's m, l, acc
    blocks, ms, ls, errors = [], [], [], []
    for i, j, _ in order[: step + 1]:
        if i != row_block:
            continue
        j0, j1 = j * block_k, min((j + 1) * block_k, L)
        state = FL.online_softmax_update(state, scores[row, j0:j1][None], v[j0:j1])
        blocks.append(j)
        ms.append(float(state.m))
        ls.append(float(state.l))
        partial = (state.acc / state.l.clamp_min(1e-300))[0]
        errors.append(float((partial - exact[row]).abs().max()))
    partial = (state.acc / state.l)[0] if blocks else torch.zeros(D, dtype=torch.float64)
    visited = {(i, j) for i, j, _ in order[: step + 1]}
    counts = {TILE_NAMES[kind]: int((plan == kind).sum()) for kind in (FL.FULL, FL.MASKED, FL.SKIPPED)}
    return {"L": L, "block_q": block_q, "block_k": block_k, "causal": causal, "plan": plan,
            "order": order, "n_steps": n_steps, "step": step, "current": order[step][:2],
            "visited": visited, "row": row, "row_block": row_block, "row_start": r0,
            "scores": scores[row], "blocks": blocks, "m": ms, "l": ls, "partial": partial,
            "exact": exact[row], "errors": errors, "counts": counts}


def plot_tile_plan(plan, ax=None, block_q: int | None = None, block_k: int | None = None,
                   current=None, visited=(), row_block: int | None = None, title: str | None = None):
    """Draw a (T_r, T_c) tile plan: skipped grey, full blue, diagonal orange; visited tiles
    hatched, the current one outlined in black, the followed query block marked on the left."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch, Rectangle

    plan = torch.as_tensor(plan)
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    cmap = ListedColormap([TILE_COLORS[FL.SKIPPED], TILE_COLORS[FL.MASKED], TILE_COLORS[FL.FULL]])
    ax.imshow(plan.numpy(), cmap=cmap, vmin=0, vmax=2)
    for i, j in visited:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#555555",
                               linewidth=0))
    if current is not None:
        i, j = current
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.5))
    if row_block is not None:
        ax.annotate("row i", xy=(-0.5, row_block), xytext=(-1.6, row_block), va="center", ha="right",
                    arrowprops={"arrowstyle": "->"}, annotation_clip=False, fontsize=8)
    tr, tc = plan.shape
    ax.set_xticks(range(tc))
    ax.set_yticks(range(tr))
    ax.set_xlabel("key block j" + (f" ({block_k} keys each)" if block_k else ""))
    ax.set_ylabel("query block i" + (f" ({block_q} queries each)" if block_q else ""))
    ax.set_xticks(np.arange(-0.5, tc, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, tr, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    handles = [Patch(facecolor=TILE_COLORS[kind], edgecolor="#999999", label=TILE_NAMES[kind])
               for kind in (FL.FULL, FL.MASKED, FL.SKIPPED) if (plan == kind).any()]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8,
              frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def flash_tile_figure(s: dict):
    """The explorer's figure for a :func:`flash_trace` state: tile plan, the row's running
    max and sum, the partial output's error."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4), gridspec_kw={"width_ratios": [1, 1.3, 1]})
    i, j = s["current"]
    plot_tile_plan(s["plan"], axes[0], s["block_q"], s["block_k"], current=s["current"],
                   visited=s["visited"], row_block=s["row_block"],
                   title=f"step {s['step']} (of 0-{s['n_steps'] - 1}): loading tile (i={i}, j={j})")  # as the slider counts
    ax = axes[1]
    L, bk = s["L"], s["block_k"]
    x = np.arange(L)
    sc = s["scores"].numpy()
    finite = np.isfinite(sc)
    done = np.zeros(L, dtype=bool)
    for j in s["blocks"]:
        done[j * bk:(j + 1) * bk] = True
    ax.scatter(x[finite & ~done], sc[finite & ~done], s=12, color="#bbbbbb", label="not read yet")
    ax.scatter(x[finite & done], sc[finite & done], s=12, color="#2166ac", label="folded in")
    for n, (j, m) in enumerate(zip(s["blocks"], s["m"], strict=True)):
        ax.hlines(m, 0, min((j + 1) * bk, L) - 0.5, color="#b2182b", linewidth=1.5,
                  label="running max m" if n == 0 else None, alpha=0.35 + 0.65 * (n + 1) / len(s["blocks"]))
    for b in range(bk, L, bk):
        ax.axvline(b - 0.5, color="#dddddd", linewidth=0.8, zorder=0)
    if s["causal"]:
        ax.axvspan(s["row"] + 0.5, L - 0.5, color="#f2f2f2", zorder=0, label="future (-inf)")
    ls = ", ".join(f"{v:.2f}" for v in s["l"][-4:])
    ax.set_title(f"query row i = {s['row']}: scores s_ij; running sum l after each block\n"
                 f"l = [{'..., ' if len(s['l']) > 4 else ''}{ls}]" if s["l"] else
                 f"query row i = {s['row']}: its query block has not been loaded yet", fontsize=10)
    ax.set_xlabel("key j")
    ax.set_ylabel("scaled score")
    ax.legend(fontsize=7, loc="lower left")
    ax = axes[2]
    if s["errors"]:
        errs = np.maximum(np.array(s["errors"]), 1e-17)
        ax.semilogy(range(1, len(errs) + 1), errs, marker="o")
        ax.set_xticks(range(1, len(errs) + 1))
        ax.set_xticklabels([str(j) for j in s["blocks"]])
    ax.set_ylim(1e-17, 10)
    ax.set_xlabel("key blocks folded into row i (block index)")
    ax.set_ylabel("max |o / l - exact output|")
    ax.set_title("the row's partial output converges to the exact one\n"
                 "(rounding level after its last key block)", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def flash_tile_explorer(L: int = 48, block_q: int = 8, block_k: int = 8, causal: bool = True,
                        step: int = 0, row: int = 20, max_length: int = 96):
    """Lecture 08: step through FlashAttention-2's tiles.

    Controls: ``L``, ``block_q``, ``block_k``, ``causal``, ``step`` (which visited tile),
    ``row`` (the query row followed). State: :func:`flash_trace` at those values.
    """
    if grading_mode():
        return WidgetsOff()
    slider = {"style": {"description_width": "initial"}, "continuous_update": False}
    controls = {
        "L": widgets.IntSlider(value=L, min=8, max=max_length, step=8, description="length L", **slider),
        "block_q": widgets.IntSlider(value=block_q, min=2, max=32, description="block_q (B_r)", **slider),
        "block_k": widgets.IntSlider(value=block_k, min=2, max=32, description="block_k (B_c)", **slider),
        "causal": widgets.Checkbox(value=causal, description="causal", indent=False),
        "step": widgets.IntSlider(value=step, min=0, max=200, description="step", **slider),
        "row": widgets.IntSlider(value=min(row, L - 1), min=0, max=max_length - 1, description="row i",
                                 **slider),
    }

    def on_change(ex):
        c = ex.controls
        c["row"].max = c["L"].value - 1  # keep the row inside the sequence

    def compute(values):
        return flash_trace(values["L"], values["block_q"], values["block_k"], values["causal"],
                           step=values["step"], row=min(values["row"], values["L"] - 1))

    return Explorer(controls, compute, flash_tile_figure, on_change=on_change,
                    title="FlashAttention-2, tile by tile: the plan, one row's running max and sum, "
                          "its partial output")
