"""Plots and interactive widgets for the lectures.

Plots
-----
* :func:`plot_attention`: one attention map (or bias matrix) ``(Lq, Lk)`` as a seaborn
  heatmap, queries down the rows, keys along the columns.
* :func:`plot_heads`: a grid of per-head maps ``(H, Lq, Lk)``, optionally on one colour scale.
* :func:`plot_history`: training curves from :func:`transformer_lab.train.train` histories.

Widgets
-------
Each builder returns an :class:`Explorer` (an ``ipywidgets.VBox``) with

* ``.controls``: ``dict`` name -> ipywidget (sliders, dropdowns);
* ``.output``: the ``ipywidgets.Output`` the figure is drawn into;
* ``.state``: ``dict`` of what was last computed (tensors, numbers), so tests and
  notebooks can check what is drawn without a browser;
* ``.render()``: recompute ``.state`` from the controls and redraw. Every control is
  observed: setting ``explorer.controls["temperature"].value = 2.0`` re-renders.

=====================================  ========  ===================================================
builder                                lecture   shows
=====================================  ========  ===================================================
:func:`attention_explorer`             01        attention map and row entropy vs temperature,
                                                 scale (1/sqrt(d), 1, custom), head_dim and mask
:func:`norm_gradient_explorer`         02        per-layer gradient norm at init, pre- vs post-norm,
                                                 residual scaling, depth (Xiong et al. 2020,
                                                 arXiv:2002.04745)
:func:`position_explorer`              03        per-head bias matrices (Shaw, XL, T5, ALiBi), RoPE's
                                                 score vs offset, sinusoidal / learned tables
=====================================  ========  ===================================================

In grading mode (``TRANSFORMER_LAB_GRADING=1``) the builders return a
:class:`WidgetsOff` placeholder (a ``Label`` with empty ``.controls``/``.state`` and a
``render()`` that does nothing) and draw nothing. Figures are closed after they are
shown (``plt.close``), so a notebook does not draw them twice and memory stays flat.

matplotlib and seaborn (with pandas, about 0.5 s on a 2-core CPU) are imported the first
time something is drawn, not when this module is imported: a notebook graded in grading
mode that never draws never pays for them.

Shapes: attention weights are ``(B, H, Lq, Lk)`` in the library; the plots take one
``(Lq, Lk)`` map or ``(H, Lq, Lk)`` heads (a leading batch of 1 is dropped).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import ipywidgets as widgets
import numpy as np
import torch
import torch.nn.functional as F

from .device import grading_mode

if TYPE_CHECKING:  # for annotations only; drawing imports pyplot on first use
    import matplotlib.pyplot as plt

__all__ = [
    "plot_attention",
    "plot_heads",
    "plot_history",
    "Explorer",
    "WidgetsOff",
    "WIDGETS_OFF_MESSAGE",
    "attention_explorer",
    "norm_gradient_explorer",
    "position_explorer",
    "row_entropy",
    "layer_grad_profile",
    "position_pattern",
]

WIDGETS_OFF_MESSAGE = "Interactive widgets are off while grading (TRANSFORMER_LAB_GRADING=1)."


# --------------------------------------------------------------------------- plots
def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=float)
    return x


def _as_2d(weights, name: str = "weights") -> np.ndarray:
    w = _to_numpy(weights, name)
    while w.ndim > 2 and w.shape[0] == 1:
        w = w[0]
    if w.ndim != 2:
        raise ValueError(f"{name} must be a 2-D map (Lq, Lk) (leading dims of size 1 are dropped); "
                         f"got shape {tuple(w.shape)}")
    return w


def _as_3d(weights, name: str = "weights") -> np.ndarray:
    w = _to_numpy(weights, name)
    if w.ndim == 4 and w.shape[0] == 1:
        w = w[0]
    if w.ndim == 2:
        w = w[None]
    if w.ndim != 3:
        raise ValueError(f"{name} must be (H, Lq, Lk) or (1, H, Lq, Lk); got shape {tuple(w.shape)}")
    return w


def _check_labels(labels, n: int, name: str):
    if labels is None:
        return "auto"
    labels = [str(t) for t in labels]
    if len(labels) != n:
        raise ValueError(f"{name} must have one label per {'key' if name == 'x_labels' else 'query'} "
                         f"({n}); got {len(labels)}")
    return labels


def plot_attention(weights, x_labels: Sequence | None = None, y_labels: Sequence | None = None,
                   ax=None, title: str | None = None, cmap: str = "viridis", vmin=None, vmax=None,
                   annot: bool = False, cbar: bool = True, center=None):
    """Heatmap of one attention map or bias matrix ``(Lq, Lk)``; returns the ``Axes``.

    Rows are queries (``y_labels``), columns are keys (``x_labels``); row ``i`` of an
    attention map sums to 1. ``weights`` may be a tensor or array with leading
    dimensions of size 1 (e.g. ``(1, 1, Lq, Lk)``). ``center`` (e.g. 0) switches to a
    diverging colour map around that value, for signed biases.
    """
    import matplotlib.pyplot as plt  # imported on first draw (see the module docstring)
    import seaborn as sns

    w = _as_2d(weights)
    xt = _check_labels(x_labels, w.shape[1], "x_labels")
    yt = _check_labels(y_labels, w.shape[0], "y_labels")
    if ax is None:
        side = min(8.0, 2.0 + 0.3 * max(w.shape))
        _, ax = plt.subplots(figsize=(side + 1.0, side))
    if center is not None and cmap == "viridis":
        cmap = "RdBu_r"
    sns.heatmap(w, ax=ax, cmap=cmap, vmin=vmin, vmax=vmax, center=center, annot=annot,
                fmt=".2f", square=w.shape[0] == w.shape[1], cbar=cbar,
                xticklabels=xt, yticklabels=yt)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title)
    return ax


def plot_heads(weights, titles: Sequence[str] | None = None, ncols: int = 4,
               shared_scale: bool = True, cmap: str = "viridis", x_labels=None, y_labels=None,
               suptitle: str | None = None, figsize=None, center=None):
    """A grid of per-head maps ``(H, Lq, Lk)`` (attention weights or bias matrices).

    ``shared_scale``: one colour scale (and one colour bar) for all heads, so heads can
    be compared; otherwise each head gets its own scale. ``center`` as in
    :func:`plot_attention`. Returns the ``Figure`` (end the cell with ``;`` or call
    ``plt.show()`` so a notebook shows it once).
    """
    w = _as_3d(weights)
    H = w.shape[0]
    titles = [f"head {h}" for h in range(H)] if titles is None else list(titles)
    if len(titles) != H:
        raise ValueError(f"titles must have one entry per head ({H}); got {len(titles)}")
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be a positive int; got {ncols!r}")
    ncols = min(ncols, H)
    nrows = math.ceil(H / ncols)
    if figsize is None:
        figsize = (3.2 * ncols + (0.8 if shared_scale else 0.0), 3.0 * nrows)
    import matplotlib.pyplot as plt  # imported on first draw (see the module docstring)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)
    if center is not None and cmap == "viridis":
        cmap = "RdBu_r"
    vmin = vmax = None
    if shared_scale:
        vmin, vmax = float(np.nanmin(w)), float(np.nanmax(w))
        if center is not None:
            span = max(abs(vmin - center), abs(vmax - center))
            vmin, vmax = center - span, center + span
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.axis("off")
            continue
        plot_attention(w[h], x_labels=x_labels, y_labels=y_labels, ax=ax, title=titles[h],
                       cmap=cmap, vmin=vmin, vmax=vmax, cbar=not shared_scale,
                       center=None if shared_scale else center)
        if h % ncols:
            ax.set_ylabel("")
        if h + ncols < H:  # another head below this one
            ax.set_xlabel("")
    if shared_scale:
        mappable = plt.cm.ScalarMappable(norm=plt.Normalize(vmin, vmax), cmap=cmap)
        fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.8)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def _ema(values: Sequence[float], smooth: float) -> np.ndarray:
    """Exponential moving average, ``m_t = smooth * m_{t-1} + (1 - smooth) * v_t`` (bias-corrected)."""
    out, m = [], 0.0
    for t, v in enumerate(values, start=1):
        m = smooth * m + (1.0 - smooth) * v
        out.append(m / (1.0 - smooth ** t))
    return np.asarray(out)


def plot_history(histories, key: str = "loss", ax=None, smooth: float = 0.0, logy: bool = False,
                 title: str | None = None):
    """Plot ``history[key]`` against ``history["step"]``; returns the ``Axes``.

    ``histories``: one history dict from :func:`~transformer_lab.train.train`, or a dict
    ``{label: history}`` to compare runs (e.g. pre- vs post-norm). ``key="eval"`` plots
    against ``history["eval_step"]``. ``smooth`` in ``[0, 1)``: exponential moving
    average of the curve (0 = raw). ``logy``: log-scale y axis.
    """
    if not isinstance(histories, dict):
        raise TypeError(f"histories must be a history dict or {{label: history}}; got "
                        f"{type(histories).__name__}")
    runs = {None: histories} if "step" in histories else histories
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must be in [0, 1); got {smooth}")
    import matplotlib.pyplot as plt  # imported on first draw (see the module docstring)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for label, hist in runs.items():
        if not isinstance(hist, dict) or key not in hist:
            have = sorted(hist) if isinstance(hist, dict) else type(hist).__name__
            raise ValueError(f"history {label!r} has no {key!r}; it has {have}")
        steps = hist["eval_step"] if key == "eval" else hist["step"]
        values = _ema(hist[key], smooth) if smooth else np.asarray(hist[key], dtype=float)
        ax.plot(steps, values, label=None if label is None else str(label))
    ax.set_xlabel("step")
    ax.set_ylabel(key + (f" (EMA {smooth:g})" if smooth else ""))
    if logy:
        ax.set_yscale("log")
    if any(label is not None for label in runs):
        ax.legend()
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    return ax


# --------------------------------------------------------------------------- widget base
class WidgetsOff(widgets.Label):
    """What a builder returns in grading mode: a label, no controls, nothing drawn."""

    def __init__(self, message: str = WIDGETS_OFF_MESSAGE):
        super().__init__(value=message)
        self.controls: dict = {}
        self.state: dict = {}
        self.output = None
        self.figure = None

    def render(self) -> None:
        """Nothing to draw while grading."""


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with Jupyter
        return False
    return get_ipython() is not None


class Explorer(widgets.VBox):
    """A control panel over a figure: ``.controls``, ``.output``, ``.state``, ``.render()``.

    ``compute(values) -> dict`` turns the controls' values into ``state``;
    ``draw(state) -> Figure`` makes the figure (which is shown in ``output`` and closed);
    ``on_change(explorer)`` (optional) runs before each render, e.g. to disable a
    control that does not apply.
    """

    def __init__(self, controls: dict, compute: Callable[[dict], dict],
                 draw: Callable[[dict], "plt.Figure"], on_change: Callable | None = None,
                 title: str | None = None):
        self.controls = dict(controls)
        self.output = widgets.Output()
        self.state: dict = {}
        self.figure = None
        self.renders = 0
        self._compute, self._draw, self._on_change = compute, draw, on_change
        rows = [widgets.HTML(f"<b>{title}</b>")] if title else []
        rows.append(widgets.HBox(list(self.controls.values()),
                                 layout=widgets.Layout(flex_flow="row wrap")))
        rows.append(self.output)
        super().__init__(children=rows)
        for control in self.controls.values():
            control.observe(self._changed, names="value")
        self.render()

    def values(self) -> dict:
        """The controls' current values, by name."""
        return {name: c.value for name, c in self.controls.items()}

    def _changed(self, change) -> None:
        self.render()

    def render(self) -> None:
        """Recompute ``state`` from the controls, redraw the figure into ``output``."""
        if self._on_change is not None:
            self._on_change(self)
        self.state = self._compute(self.values())
        fig = self._draw(self.state)
        if _in_ipython():  # in a terminal or a test there is nowhere to show it
            from IPython.display import display

            self.output.clear_output(wait=True)
            with self.output:
                display(fig)
        import matplotlib.pyplot as plt  # imported on first draw (see the module docstring)
        plt.close(fig)  # shown once, inside the Output; never again at the end of the cell
        self.figure = fig
        self.renders += 1


# --------------------------------------------------------------------------- 01: attention
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
    from .attention import attention_scores, causal_mask, masked_softmax, padding_mask

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


# --------------------------------------------------------------------------- 02: norms
def layer_grad_profile(depth: int, norm_first: bool, residual: str = "none", d_model: int = 32,
                       n_heads: int = 4, seq_len: int = 16, batch_size: int = 4,
                       vocab_size: int = 32, seed: int = 0) -> list[float]:
    """Per-layer gradient norms of a freshly initialised library LM on one random batch.

    Builds ``TransformerLM(ModelConfig(n_layers=depth, norm_first=..., residual=...))``
    after ``torch.manual_seed(seed)``, computes the next-token cross-entropy of random
    tokens, backpropagates once and returns
    :func:`~transformer_lab.train.per_layer_grad_norms` (block 1 first). The random
    state is restored afterwards, so calling this does not disturb a notebook's seeds.
    """
    from .models import ModelConfig, TransformerLM
    from .train import per_layer_grad_norms

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = ModelConfig(vocab_size=vocab_size, d_model=d_model, n_heads=n_heads,
                          n_layers=depth, max_len=seq_len, norm_first=norm_first,
                          residual=residual, dropout=0.0)
        model = TransformerLM(cfg)
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)  # (B, L)
        y = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)  # (B, L)
        logits = model(x)  # (B, L, V)
        F.cross_entropy(logits.reshape(-1, vocab_size), y.reshape(-1)).backward()
        return per_layer_grad_norms(model)


NORMS = ("pre", "post", "both")


def norm_gradient_explorer(max_depth: int = 24, depth: int = 12, d_model: int = 32,
                           n_heads: int = 4, seq_len: int = 16, batch_size: int = 4,
                           vocab_size: int = 32, seed: int = 0):
    """Lecture 02: gradient norm of each layer at initialisation, pre- vs post-norm.

    For the chosen ``depth`` and ``residual`` scaling (``"none"``, ``"layerscale"``,
    ``"rezero"``, ``"deepnorm"``) it builds a small library LM, runs one forward/backward
    pass on a random batch (:func:`layer_grad_profile`, cached) and plots
    ``||dL/dtheta_l||`` against the layer ``l`` on a log scale. Xiong et al. 2020 ("On
    Layer Normalization in the Transformer Architecture", arXiv:2002.04745) show that at
    initialisation post-norm's gradients are large for the layers near the output (they
    do not shrink with depth), which is why post-norm needs a learning-rate warm-up,
    while pre-norm's are scaled down like ``1/sqrt(L)`` and do not grow toward the
    output. The widget shows what the library's own blocks do. (ReZero has
    no LayerNorm, and DeepNorm is post-norm by definition, so for those two the
    pre/post toggle changes nothing: the plot says so.)

    Controls: ``depth``, ``norm`` (``"pre"``, ``"post"``, ``"both"``), ``residual``.
    State: ``grad_norms`` dict ``{"pre": [...], "post": [...]}`` (the ones shown),
    ``depth``, ``residual``.
    """
    if grading_mode():
        return WidgetsOff()
    from .blocks import RESIDUALS

    cache: dict = {}

    def profile(d, norm_first, residual):
        key = (d, norm_first, residual)
        if key not in cache:
            cache[key] = layer_grad_profile(d, norm_first, residual, d_model=d_model,
                                            n_heads=n_heads, seq_len=seq_len,
                                            batch_size=batch_size, vocab_size=vocab_size,
                                            seed=seed)
        return cache[key]

    style = {"description_width": "initial"}
    controls = {
        "depth": widgets.IntSlider(value=min(depth, max_depth), min=1, max=max_depth,
                                   description="depth (layers)", style=style),
        "norm": widgets.ToggleButtons(options=NORMS, value="both", description="LayerNorm",
                                      style=style),
        "residual": widgets.Dropdown(options=tuple(RESIDUALS), value="none",
                                     description="residual scaling", style=style),
    }

    def compute(v):
        kinds = ("pre", "post") if v["norm"] == "both" else (v["norm"],)
        norms = {kind: profile(v["depth"], kind == "pre", v["residual"]) for kind in kinds}
        return {"grad_norms": norms, "depth": v["depth"], "residual": v["residual"]}

    def draw(s):
        import matplotlib.pyplot as plt  # imported on first draw (see the module docstring)
        fig, ax = plt.subplots(figsize=(7, 4))
        layers = np.arange(1, s["depth"] + 1)
        styles = {"pre": ("tab:blue", "o", "pre-norm"), "post": ("tab:red", "s", "post-norm")}
        for kind, norms in s["grad_norms"].items():
            color, marker, label = styles[kind]
            ax.plot(layers, norms, color=color, marker=marker, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("layer (1 = next to the input)")
        ax.set_ylabel("gradient norm of the layer's parameters")
        note = (" (no LayerNorm inside: same for pre and post)" if s["residual"] == "rezero" else
                " (always post-norm: same for both)" if s["residual"] == "deepnorm" else "")
        ax.set_title(f"at initialisation, residual={s['residual']}{note}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        return fig

    return Explorer(controls, compute, draw,
                    title="Gradient norm per layer at initialisation: pre- vs post-norm")


# --------------------------------------------------------------------------- 03: positions
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
    from .positions import POSITION_SCHEMES, make_positions

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
