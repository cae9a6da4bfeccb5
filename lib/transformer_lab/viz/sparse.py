"""Lecture 05's widget and helpers: sparse attention patterns (see :mod:`transformer_lab.viz`).

A pattern is a boolean (L, L) mask (rows = queries i, columns = keys j, True = i may attend
to j), built from a FlexAttention ``mask_mod`` of :mod:`transformer_lab.sparse`. What the
pictures show, and how each number is computed:

* the mask itself, with its **density** (allowed pairs / L^2);
* the **hop distances** of its graph: ``dist[i, j]`` = how many attention layers before
  token i has seen token j (breadth-first search, :func:`transformer_lab.sparse.hop_distances`),
  and the **diameter**, the largest of them over the pairs the pattern can ever connect;
* the **attended pairs against L** (:func:`transformer_lab.sparse.count_pairs`), next to
  dense attention's L^2: a sparse pattern's line has slope 1 on log-log axes, dense's slope 2.
"""

from __future__ import annotations

import math
import textwrap

import ipywidgets as widgets
import numpy as np
import torch

from ..device import grading_mode
from .core import Explorer, WidgetsOff

__all__ = ["SPARSE_PATTERNS", "sparse_pattern", "plot_pattern", "plot_patterns", "plot_pair_counts",
           "pattern_summary", "sparse_pattern_explorer"]

#: The patterns the explorer offers (the names :func:`sparse_pattern` takes).
SPARSE_PATTERNS = ("sliding window", "local blocks", "strided", "fixed", "longformer", "etc",
                   "bigbird", "dense")

#: Which explorer controls each pattern reads (the others are greyed out).
USES = {
    "sliding window": {"window", "causal"},
    "local blocks": {"block", "window", "causal"},
    "strided": {"stride", "causal"},
    "fixed": {"stride", "causal"},
    "longformer": {"window", "dilation", "n_global", "causal"},
    "etc": {"window", "n_global"},
    "bigbird": {"block", "n_global", "random_blocks", "causal", "seed"},
    "dense": {"causal"},
}


def sparse_pattern(name: str, L: int, window: int = 8, stride: int = 8, dilation: int = 1,
                   n_global: int = 1, random_blocks: int = 1, block: int = 8, causal: bool = False,
                   seed: int = 0):
    """The mask_mod of pattern ``name`` for a sequence of length ``L``, with the explorer's knobs.

    ``window``: w of the sliding window (keys back if causal, w/2 on each side otherwise;
    rounded up to an even number when bidirectional), Longformer's window, ETC's local
    window, the Image Transformer's memory l_m; ``stride``: the Sparse Transformer's l;
    ``dilation``: Longformer's dilation (the lecture's δ, the paper's d); ``n_global``: global
    tokens (Longformer, ETC) or global blocks (BigBird); ``random_blocks``: BigBird's random
    blocks per query block; ``block``: BigBird's block size and
    the Image Transformer's query block l_q; ``seed``: BigBird's random draw. Knobs that
    would not fit L are clipped so every setting draws something.
    """
    from .. import sparse as S

    if name not in SPARSE_PATTERNS:
        raise ValueError(f"unknown pattern {name!r}; expected one of {', '.join(SPARSE_PATTERNS)}")
    if not isinstance(L, int) or L < 2:
        raise ValueError(f"L must be an int >= 2; got {L!r}")
    even = min(max(2, window + window % 2), L - L % 2)  # bidirectional: even (w/2 on each side), <= L
    back = max(1, min(window, L - 1))  # causal: w keys back, fewer than L
    if name == "sliding window":
        return S.sliding_window(back if causal else even, causal)
    if name == "local blocks":
        return S.local_blocks(min(block, L), memory=window, causal=causal)
    if name == "strided":
        return S.strided(min(stride, L), causal)
    if name == "fixed":
        l = min(stride, L)
        if not causal and L % l:  # bidirectional fixed needs l | L: take the largest divisor <= l
            l = max(d for d in range(1, l + 1) if L % d == 0)
        return S.fixed(l, c=1, causal=causal)
    if name == "longformer":
        w = back if causal else even
        d = max(1, min(dilation, L // w))  # the dilated window (d w positions) fits in L
        return S.longformer(w, dilation=d, global_tokens=min(n_global, L - 1), causal=causal)
    if name == "etc":
        g = min(n_global, L - 2)
        return S.etc(g, min(even, 2 * ((L - g) // 2)))
    if name == "bigbird":
        b = min(block, L)
        n_blocks = -(-L // b)
        return S.bigbird(L, b, window_blocks=3, global_blocks=min(n_global, n_blocks),
                         random_blocks=random_blocks, seed=seed, causal=causal)
    return S.full(causal)


def pattern_summary(mask_mod, L: int, lengths=None, pattern_at=None, hops: bool = True) -> dict:
    """Everything the explorer draws for one pattern: a dict of tensors and numbers.

    ``mask`` (L, L) bool, ``pairs`` (its True entries) and ``density`` (pairs / L^2);
    with ``hops``: ``hops`` (L, L) int64 BFS distances (-1 = never) and ``diameter`` (the
    largest over the pairs the pattern ever connects; over j <= i only for a causal
    pattern); with ``lengths`` and ``pattern_at(L) -> mask_mod``: ``lengths``, ``counts``
    (the pattern's pairs at each length) and ``dense_counts`` (L^2, or L(L+1)/2 causal).
    """
    from .. import sparse as S

    mask = S.dense_mask(mask_mod, L)
    pairs = int(mask.sum())
    causal = not bool(mask.triu(1).any())
    out = {"mask": mask, "pairs": pairs, "density": pairs / (L * L), "L": L, "causal": causal,
           "pattern": S.describe(mask_mod)}
    if hops:
        dist = S.hop_distances(mask_mod, L)
        considered = torch.ones(L, L, dtype=torch.bool).tril() if causal else torch.ones(L, L, dtype=torch.bool)
        d = dist[considered]
        out["hops"] = dist
        out["diameter"] = math.inf if bool((d < 0).any()) else int(d.max())
    if lengths is not None:
        lengths = [int(n) for n in lengths]
        build = pattern_at or (lambda n: mask_mod)
        out["lengths"] = lengths
        out["counts"] = [S.count_pairs(build(n), n) for n in lengths]
        out["dense_counts"] = [n * (n + 1) // 2 if causal else n * n for n in lengths]
    return out


def plot_pattern(mask, ax=None, title: str | None = None, color: str = "tab:blue"):
    """One boolean mask (Lq, Lk) as a picture: a filled square where query i may attend to key j."""
    import matplotlib.pyplot as plt  # imported on first draw (see the viz docstring)
    from matplotlib.colors import ListedColormap

    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (Lq, Lk); got shape {m.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(3.2, 3.2))
    # antialiased: when L is larger than the pixels, a one-token row (a global token) still shows
    ax.imshow(m.astype(float), cmap=ListedColormap(["white", color]), vmin=0, vmax=1,
              interpolation="nearest" if max(m.shape) <= 128 else "antialiased")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # positions are whole numbers
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    pad = 0.5 + max(m.shape) / 80  # a margin, so that row 0 (often a global token) is not under the frame
    ax.set_xlim(-pad, m.shape[1] - 1 + pad)
    ax.set_ylim(m.shape[0] - 1 + pad, -pad)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def plot_patterns(masks: dict, ncols: int = 4, size: float = 2.8, suptitle: str | None = None):
    """A gallery of masks ``{title: (L, L) bool}``, each titled with its density. Returns the Figure."""
    import matplotlib.pyplot as plt

    if not isinstance(masks, dict) or not masks:
        raise ValueError("masks must be a non-empty dict {title: (L, L) bool mask}")
    n = len(masks)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), squeeze=False)
    for ax, (title, m) in zip(axes.flat, masks.items(), strict=False):
        dens = float(torch.as_tensor(m).float().mean())
        plot_pattern(m, ax=ax, title=f"{title}\ndensity {dens:.2f}")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def plot_pair_counts(lengths, counts: dict, ax=None, title: str | None = None, guide: str | None = None):
    """Attended pairs against L on log-log axes, ``counts = {label: [pairs at each length]}``.

    A dotted grey line of slope 1 through the first point of the curve ``guide`` (default: the
    first) is drawn for reference: a pattern whose cost grows linearly runs parallel to it.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 4))
    x = np.asarray(lengths, dtype=float)
    for label, ys in counts.items():
        ax.plot(x, np.asarray(ys, dtype=float), marker="o", ms=3, label=label)
    if guide is not None and guide not in counts:
        raise ValueError(f"guide must be one of the curves {list(counts)}; got {guide!r}")
    first = np.asarray(counts[guide] if guide is not None else next(iter(counts.values())), dtype=float)
    ax.plot(x, first[0] * x / x[0], ls=":", color="gray", lw=1, label="slope 1 (linear)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("attended pairs (one head)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def _draw_hops(dist, ax, title):
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    d = dist.numpy().astype(float)
    d[d < 0] = np.nan  # never reached: left blank
    top = max(1, int(np.nanmax(d)) if np.isfinite(d).any() else 1)
    cmap = ListedColormap(plt.cm.viridis(np.linspace(0, 1, top + 1)))
    cmap.set_bad("white")
    im = ax.imshow(d, cmap=cmap, vmin=-0.5, vmax=top + 0.5, interpolation="nearest")
    im.ticks = list(range(0, top + 1, max(1, math.ceil((top + 1) / 10))))  # integer hops
    ax.set_xlabel("key j (information starts here)")
    ax.set_ylabel("query i")
    ax.set_title(title, fontsize=9)
    return im


def sparse_pattern_explorer(pattern: str = "longformer", length: int = 64, window: int = 8,
                            stride: int = 8, dilation: int = 1, n_global: int = 1,
                            random_blocks: int = 1, block: int = 8, causal: bool = False,
                            max_length: int = 256, lengths=(64, 128, 256, 512, 1024, 2048)):
    """Lecture 05: who attends to whom, and what it costs.

    Controls: ``pattern`` (:data:`SPARSE_PATTERNS`), ``length`` L, ``window``, ``stride``,
    ``dilation``, ``n_global`` (global tokens, or global blocks for BigBird),
    ``random_blocks``, ``block`` (BigBird's block, the Image Transformer's query block),
    ``causal`` and BigBird's ``seed``; controls a pattern does not read are disabled. Three
    panels: the mask with its density; the BFS hop distances of its graph with the
    diameter; the attended pairs against L (the same knobs at every length in ``lengths``)
    next to dense attention's.

    State: :func:`pattern_summary` of the chosen pattern (``mask``, ``pairs``, ``density``,
    ``hops``, ``diameter``, ``lengths``, ``counts``, ``dense_counts``, ``pattern``) plus
    ``name`` and ``knobs`` (the values :func:`sparse_pattern` was called with).
    """
    if grading_mode():
        return WidgetsOff()
    if pattern not in SPARSE_PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {', '.join(SPARSE_PATTERNS)}")
    if not 16 <= length <= max_length:
        raise ValueError(f"length must be between 16 and max_length={max_length}; got {length}")
    style = {"description_width": "initial"}
    slider = dict(style=style, continuous_update=False)
    controls = {
        "pattern": widgets.Dropdown(options=SPARSE_PATTERNS, value=pattern, description="pattern",
                                    style=style),
        "length": widgets.IntSlider(value=length, min=16, max=max_length, step=16, description="length L",
                                    **slider),
        "window": widgets.IntSlider(value=window, min=1, max=64, description="window w", **slider),
        "stride": widgets.IntSlider(value=stride, min=2, max=32, description="stride l", **slider),
        "dilation": widgets.IntSlider(value=dilation, min=1, max=8, description="dilation δ", **slider),
        "n_global": widgets.IntSlider(value=n_global, min=0, max=8, description="global", **slider),
        "random_blocks": widgets.IntSlider(value=random_blocks, min=0, max=6, description="random blocks",
                                           **slider),
        "block": widgets.IntSlider(value=block, min=2, max=32, description="block", **slider),
        "causal": widgets.Checkbox(value=causal, description="causal", indent=False),
        "seed": widgets.IntSlider(value=0, min=0, max=9, description="seed", **slider),
    }

    def on_change(ex):
        used = USES[ex.controls["pattern"].value]
        for name, control in ex.controls.items():
            if name not in ("pattern", "length"):
                control.disabled = name not in used

    def knobs(v):
        return {k: v[k] for k in ("window", "stride", "dilation", "n_global", "random_blocks", "block",
                                  "causal", "seed")}

    def compute(v):
        kw = knobs(v)
        mod = sparse_pattern(v["pattern"], v["length"], **kw)
        out = pattern_summary(mod, v["length"], lengths=lengths,
                              pattern_at=lambda n: sparse_pattern(v["pattern"], n, **kw))
        out.update(name=v["pattern"], knobs=kw)
        return out

    def draw(s):
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
        name = textwrap.shorten(s["pattern"], 60, placeholder="...)")
        plot_pattern(s["mask"], ax=axes[0],
                     title=f"{name}\nL = {s['L']}: {s['pairs']:,} pairs, density {s['density']:.3f}")
        im = _draw_hops(s["hops"], axes[1], f"layers before i has seen j (blank: never)\n"
                                            f"diameter {s['diameter']}")
        fig.colorbar(im, ax=axes[1], shrink=0.8, label="hops", ticks=im.ticks)
        plot_pair_counts(s["lengths"], {s["name"]: s["counts"],
                                        "dense (causal)" if s["causal"] else "dense": s["dense_counts"]},
                         ax=axes[2], title="attended pairs against L (same knobs)")
        fig.tight_layout()
        return fig

    return Explorer(controls, compute, draw, on_change=on_change,
                    title="Sparse attention patterns: who attends to whom, and what it costs")
