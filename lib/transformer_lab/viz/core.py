"""The shared plotting and widget primitives of :mod:`transformer_lab.viz` (see its docstring)."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
from typing import TYPE_CHECKING, Callable, Sequence

import ipywidgets as widgets
import numpy as np
import torch

if TYPE_CHECKING:  # for annotations only; drawing imports pyplot on first use
    import matplotlib.pyplot as plt

__all__ = ["plot_attention", "plot_heads", "plot_history", "Explorer", "WidgetsOff", "WIDGETS_OFF_MESSAGE"]

WIDGETS_OFF_MESSAGE = "Interactive widgets are off while grading (TRANSFORMER_LAB_GRADING=1)."
#: Set to 1 by the website's build (jupyter_book/build.py): an :class:`Explorer` then shows itself as
#: a page with its figures computed in advance (no kernel on a static site), see ``static_html``.
STATIC_ENV = "TRANSFORMER_LAB_STATIC_WIDGETS"
STATIC_STEPS = 5  # values per slider on the website (its two ends, evenly between, and its start)
STATIC_MAX_FIGURES = 10  # different figures per explorer on the website: its page weight and build time
STATIC_DPI = 80  # the website's figures: small enough to ship every variant in the page
STATIC_NOTE = ("On this page each control moves alone, the others at their starting values: the "
               "figures were drawn in advance. In JupyterLab every combination is drawn live.")


#: Okabe and Ito's colour-blind-safe palette, ordered like matplotlib's default (blue, orange,
#: green, red-ish first), so a figure that says "the orange line" keeps meaning the same line.
COLORBLIND_CYCLE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")


def use_colorblind_palette() -> None:
    """Make the colour-blind-safe palette matplotlib's default colour cycle (every lecture's setup
    cell imports matplotlib already, so this costs nothing there). Colours a figure names
    explicitly are not changed; sequential colour maps stay viridis-like (safe)."""
    import matplotlib
    from cycler import cycler

    matplotlib.rcParams["axes.prop_cycle"] = cycler(color=list(COLORBLIND_CYCLE))


def static_widgets() -> bool:
    """True while the website is built: widgets are drawn in advance, for a page with no kernel."""
    return os.environ.get(STATIC_ENV) == "1"


# --------------------------------------------------------------------------- plots
def check_int(name, value, low, high=None) -> int:
    """A widget builder's integer argument, checked: an int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        rng = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {rng}; got {value}")
    return int(value)


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


def _is_menu(control) -> bool:
    return hasattr(control, "options")


def _is_boolean(control) -> bool:
    return isinstance(control, (widgets.Checkbox, widgets.ToggleButton))


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _control_values(control, steps: int) -> list:
    """See :meth:`Explorer.static_grid`."""
    value = control.value
    if _is_menu(control):
        return list(control._options_values) if hasattr(control, "_options_values") else list(control.options)
    if _is_boolean(control):
        return [False, True]
    if isinstance(control, widgets.FloatLogSlider):
        exps = np.linspace(control.min, control.max, steps)
        values = [float(control.base ** e) for e in exps]
    elif isinstance(control, (widgets.IntSlider, widgets.FloatSlider)):
        raw = np.linspace(control.min, control.max, steps)
        step = control.step or 1
        values = [control.min + round((v - control.min) / step) * step for v in raw]
        values = [int(v) if isinstance(control, widgets.IntSlider) else float(v) for v in values]
    else:  # a control the website cannot vary (text, ...): its value only
        return [value]
    out: list = []
    for v in sorted(values + [value]):
        if not any(_same(v, w) for w in out):
            out.append(v)
    return out


def _state_key(state) -> str:
    """A digest of an explorer's state (tensors and arrays by their bytes): equal states, one figure."""
    h = hashlib.sha1()

    def feed(x):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        if isinstance(x, np.ndarray):
            h.update(str((x.dtype, x.shape)).encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(repr(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    feed(state)
    return h.hexdigest()


def _small_png(fig, dpi: int) -> bytes:
    """The figure as a PNG with at most 256 colours (a third of the bytes; plots have few)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    buf.seek(0)
    out = io.BytesIO()
    Image.open(buf).convert("RGB").quantize(colors=256).save(out, format="PNG", optimize=True)
    return out.getvalue()


def _static_order(values: list, start) -> list[int]:
    """The indices of ``values`` other than the start, in the order the website adds them: the first
    and the last (a slider's two ends), then the others from the middle out."""
    rest = [i for i, v in enumerate(values) if not _same(v, start)]
    if len(rest) <= 2:
        return rest
    ends = [rest[0], rest[-1]]
    middle = rest[1:-1]
    centre = (len(middle) - 1) / 2
    return ends + sorted(middle, key=lambda i: (abs(middle.index(i) - centre), i))


def _value_label(control, v) -> str:
    if _is_menu(control) and hasattr(control, "_options_labels"):
        return str(control._options_labels[list(control._options_values).index(v)])
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _control_label(control, name: str) -> str:
    return str(getattr(control, "description", "") or name)


# The website's explorer: show the figure of the control just moved, the others back at their start.
_STATIC_JS = """(function () {
  var root = document.getElementById("UID");
  var data = JSON.parse(root.querySelector(".tlx-data").textContent);
  var img = root.querySelector(".tlx-figure");
  var fields = root.querySelectorAll("[data-i]");
  function show(i, j) {
    fields.forEach(function (f) {
      var k = +f.dataset.i, c = data.controls[k], v = (k === i) ? j : c.start;
      if (c.check) { f.checked = (v === c.check[1]); } else { f.value = String(v); }
      var out = f.parentNode.querySelector(".tlx-value");
      if (out) { out.textContent = c.values[v]; }
    });
    img.src = "data:image/png;base64," + data.images[data.controls[i].figures[j]];
  }
  fields.forEach(function (f) {
    var c = data.controls[+f.dataset.i];
    f.addEventListener(c.check ? "change" : "input", function () {
      show(+f.dataset.i, c.check ? c.check[f.checked ? 1 : 0] : +f.value);
    });
  });
})();"""


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
        self._title = title
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
        if _in_ipython() and not static_widgets():  # a terminal, a test, the website: nowhere to show it
            from IPython.display import display

            self.output.clear_output(wait=True)
            with self.output:
                display(fig)
        import matplotlib.pyplot as plt  # imported on first draw (see the module docstring)
        plt.close(fig)  # shown once, inside the Output; never again at the end of the cell
        self.figure = fig
        self.renders += 1

    # ----------------------------------------------------------------------- the website's copy
    def _repr_mimebundle_(self, **kwargs):
        if static_widgets():
            return {"text/plain": f"<{type(self).__name__}: {self._title or 'explorer'}>",
                    "text/html": self.static_html()}
        return super()._repr_mimebundle_(**kwargs)

    def static_grid(self, steps: int = STATIC_STEPS) -> dict[str, list]:
        """The values each control takes on the website: every option of a menu, both states of
        a check box, ``steps`` values of a slider (its ends, evenly between, and its start)."""
        return {name: _control_values(c, steps) for name, c in self.controls.items()}

    def static_html(self, steps: int = STATIC_STEPS, dpi: int = STATIC_DPI,
                    max_figures: int = STATIC_MAX_FIGURES) -> str:
        """The explorer as one self-contained HTML block: its controls as HTML inputs and every
        figure of :meth:`static_grid` as a PNG, drawn now; a few lines of JavaScript show the
        figure of the control just moved, the others at their starting values (one control at a
        time: the grid grows with the sum of the controls' values, not their product), at most
        ``max_figures`` different figures (the values of each control are taken in turns). A
        control whose every kept value draws the same figure is shown disabled."""
        start = self.values()
        grid = self.static_grid(steps)
        images: list[str] = []
        seen: dict[str, int] = {}
        drawn: dict[str, int] = {}

        def figure_index(values: dict) -> int:
            state = self._compute(values)
            key = _state_key(state)
            if key in drawn:  # the same state draws the same figure: draw it once
                return drawn[key]
            png = _small_png(self._draw(state), dpi)
            digest = hashlib.sha1(png).hexdigest()
            if digest not in seen:
                seen[digest] = len(images)
                images.append(base64.b64encode(png).decode("ascii"))
            drawn[key] = seen[digest]
            return drawn[key]

        first = figure_index(start)
        # Which values get a figure: round by round, each control's next value (a slider's two
        # ends first, then the values between, from the middle out), until max_figures
        # different figures are drawn (a value whose state was drawn already costs nothing). The
        # page weight and the build time stay bounded whatever the number of controls.
        queues = {name: _static_order(values, start[name]) for name, values in grid.items()}
        kept = {name: {i: first for i, v in enumerate(values) if _same(v, start[name])}
                for name, values in grid.items()}
        while any(queues.values()) and len(drawn) < max_figures:
            for name in grid:
                if queues[name] and len(drawn) < max_figures:
                    i = queues[name].pop(0)
                    kept[name][i] = figure_index({**start, name: grid[name][i]})
        controls = []
        for name, values in grid.items():
            c = self.controls[name]
            order = sorted(kept[name])
            index = [kept[name][i] for i in order]
            controls.append({"name": name, "label": _control_label(c, name),
                             "values": [_value_label(c, values[i]) for i in order], "figures": index,
                             "start": next(j for j, i in enumerate(order) if _same(values[i], start[name])),
                             "menu": _is_menu(c), "live": len(set(index)) > 1,
                             # a checkbox stays a checkbox: the positions of False and True
                             "check": ([order.index(j) for j in (values.index(False), values.index(True))]
                                       if _is_boolean(c) and {False, True} <= set(values[i] for i in order)
                                       else None)})
        uid = "tlx-" + hashlib.sha1(json.dumps([self._title, [c["values"] for c in controls]]).encode()
                                     + str(id(self)).encode()).hexdigest()[:10]
        parts = [f'<div class="tl-static-explorer" id="{uid}">']
        if self._title:
            parts.append(f"<b>{html.escape(self._title)}</b>")
        parts.append('<div class="tlx-controls" style="display:flex;flex-wrap:wrap;gap:4px 18px;margin:6px 0">')
        for i, c in enumerate(controls):
            disabled = "" if c["live"] else " disabled"
            label = html.escape(c["label"])
            if c["check"]:
                checked = " checked" if c["start"] == c["check"][1] else ""
                field = f'<input type="checkbox" data-i="{i}" aria-label="{label}"{checked}{disabled}>'
            elif c["menu"]:
                options = "".join(f'<option value="{j}"{" selected" if j == c["start"] else ""}>'
                                  f"{html.escape(v)}</option>" for j, v in enumerate(c["values"]))
                field = f'<select data-i="{i}" aria-label="{label}"{disabled}>{options}</select>'
            else:
                field = (f'<input type="range" data-i="{i}" min="0" max="{len(c["values"]) - 1}" step="1" '
                         f'value="{c["start"]}" aria-label="{label}"{disabled}>'
                         f'<span class="tlx-value" style="min-width:3.5em">{html.escape(c["values"][c["start"]])}</span>')
            parts.append(f'<label style="display:flex;align-items:center;gap:6px">{label} {field}</label>')
        parts.append("</div>")
        alt = html.escape(f"{self._title or 'explorer'}: the figure for the controls' starting values")
        parts.append(f'<img class="tlx-figure" alt="{alt}" style="max-width:100%" '
                     f'src="data:image/png;base64,{images[first]}">')
        parts.append(f'<div class="tlx-note" style="font-size:85%;color:#555">{html.escape(STATIC_NOTE)}</div>')
        data = {"images": images,
                "controls": [{k: c[k] for k in ("values", "figures", "start", "check")} for c in controls]}
        payload = json.dumps(data).replace("</", "<\\/")  # a label holding "</script>" cannot end the block
        parts.append(f'<script type="application/json" class="tlx-data">{payload}</script>')
        parts.append("<script>" + _STATIC_JS.replace("UID", uid) + "</script></div>")
        return "".join(parts)



# --------------------------------------------------------------------------- alt text for the website

_TEX_SYMBOLS = {"alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "eta": "η",
                "theta": "θ", "kappa": "κ", "lambda": "λ", "mu": "μ", "nu": "ν", "pi": "π", "rho": "ρ",
                "sigma": "σ", "tau": "τ", "phi": "φ", "psi": "ψ", "omega": "ω", "Delta": "Δ", "Gamma": "Γ",
                "Lambda": "Λ", "top": "ᵀ", "times": "×", "cdot": "·", "le": "≤", "ge": "≥", "leq": "≤",
                "geq": "≥", "to": "→", "infty": "∞", "approx": "≈", "sqrt": "√", "sim": "~", "ell": "ℓ"}


def tex_to_plain(text: str) -> str:
    """"$\\sqrt{d_k}$ scale" -> "√d_k scale": math delimiters and wrappers dropped, Greek letters and
    common symbols as characters (the website's search-fix.js does the same in the browser)."""
    import re

    text = re.sub(r"\\[()[\]]|\$\$?", "", text)
    text = re.sub(r"\\(?:text|mathrm|mathsf|mathcal|mathbf|mathbb|boldsymbol|operatorname|bar|hat|tilde)\s*"
                  r"\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\(?:text|mathrm|mathsf|mathcal|mathbf|mathbb|boldsymbol|operatorname|bar|hat|tilde|left|right)"
                  r"(?![A-Za-z])\s*", "", text)
    text = re.sub(r"\\([A-Za-z]+)", lambda m: _TEX_SYMBOLS.get(m[1], m[1]), text)
    return re.sub(r"[{}]", "", re.sub(r"\\[,;:! ]", " ", text)).strip()


def describe_figure(fig, max_panels: int = 6, max_chars: int = 400) -> str:
    """Alt text for a matplotlib figure, from what the figure says about itself: its title, and for
    each panel its title, kind (plot, bars, image or heat map), axis labels and legend entries.
    The website sets it on every figure of a lecture (``TRANSFORMER_LAB_STATIC_WIDGETS``)."""
    panels = []
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    for ax in axes[:max_panels]:
        title = ax.get_title() or ax.get_title(loc="left") or ax.get_title(loc="right")
        kind = ("heat map" if ax.images or ax.collections and any(type(c).__name__ == "QuadMesh" for c in ax.collections)
                else "bar chart" if ax.patches and not ax.lines else "plot" if ax.has_data() else "panel")
        text = f"{title}: {kind}" if title else kind
        x, y = ax.get_xlabel(), ax.get_ylabel()
        if x or y:
            text += f" of {y or 'values'} against {x or 'position'}"
        labels = [lab for lab in ax.get_legend_handles_labels()[1] if lab and not lab.startswith("_")]
        if labels:
            text += " (" + ", ".join(labels[:6]) + (", ..." if len(labels) > 6 else "") + ")"
        panels.append(tex_to_plain(text))
    if len(axes) > max_panels:
        panels.append(f"{len(axes) - max_panels} more panels")
    suptitle = fig._suptitle.get_text() if getattr(fig, "_suptitle", None) is not None else ""
    head = "Figure" + (f": {tex_to_plain(suptitle)}" if suptitle else "")
    body = "; ".join(panels) if panels else "no panels"
    text = f"{head}. {len(axes)} panel{'s' if len(axes) != 1 else ''}: {body}." if len(axes) > 1 else f"{head}. {body[0].upper() + body[1:]}."
    return text if len(text) <= max_chars else text[:max_chars - 1] + "…"


def install_alt_text() -> bool:
    """Give every inline matplotlib figure an ``alt`` entry in its output's metadata
    (:func:`describe_figure`); the book's build copies it onto the page's ``<img>``. Only while the
    website is built (``TRANSFORMER_LAB_STATIC_WIDGETS``); returns whether it was installed."""
    if not os.environ.get(STATIC_ENV):
        return False
    try:
        from matplotlib_inline import backend_inline
    except ImportError:
        return False
    fetch = backend_inline._fetch_figure_metadata
    if getattr(fetch, "_adds_alt", False):
        return True

    def fetch_with_alt(fig):
        metadata = dict(fetch(fig) or {})
        try:
            metadata["alt"] = describe_figure(fig)
        except Exception:  # noqa: BLE001 - alt text must never break a lecture's figure
            pass
        return metadata

    fetch_with_alt._adds_alt = True
    backend_inline._fetch_figure_metadata = fetch_with_alt
    return True


install_alt_text()
use_colorblind_palette()
