"""Lecture 02's widgets and helpers: gradient norms by layer, pre- vs post-norm; the attention maps
of an encoder-decoder before and after training (see :mod:`transformer_lab.viz`)."""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import torch
import torch.nn.functional as F

from ..device import grading_mode
from .core import Explorer, WidgetsOff

__all__ = ["layer_grad_profile", "norm_gradient_explorer", "NORMS", "seq2seq_attention_explorer",
           "ATTENTION_KINDS"]


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
    from ..models import ModelConfig, TransformerLM
    from ..train import per_layer_grad_norms

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
    from ..blocks import RESIDUALS

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


#: The three attention maps of an encoder-decoder: the menu's label -> the key of
#: ``EncoderDecoder.attention_maps``.
ATTENTION_KINDS = {"cross (decoder reads source)": "cross", "encoder self": "encoder",
                   "decoder self (causal)": "decoder"}


def seq2seq_attention_explorer(maps: dict, src_labels, tgt_labels):
    """Lecture 02: an encoder-decoder's attention maps per head, untrained beside trained.

    ``maps``: ``{"untrained": m0, "trained": m1}``, each what
    :meth:`transformer_lab.models.EncoderDecoder.attention_maps` returns for the same batch
    (``{"encoder": [(B, H, Ls, Ls)] per layer, "decoder": [(B, H, Lt, Lt)], "cross":
    [(B, H, Lt, Ls)]}``); ``src_labels`` / ``tgt_labels``: per example, the tokens shown along
    the source and the decoder's input (lists of B lists of strings).

    Controls: ``attention`` (cross, encoder self, decoder self), ``layer``, ``example``.
    State: ``untrained`` and ``trained`` (H, Lq, Lk) tensors (the maps drawn), ``kind``,
    ``layer`` (1-based), ``example``, ``x_labels``, ``y_labels``. The figure has one row per
    model and one column per head (a trained reverser's cross-attention is an anti-diagonal).
    """
    if grading_mode():
        return WidgetsOff()
    names = ("untrained", "trained")
    if set(maps) != set(names):
        raise ValueError(f"maps must have the keys {names}; got {sorted(maps)}")
    first = maps["trained"]["cross"]
    n_layers, B = len(first), first[0].shape[0]
    for name in names:
        for key in ATTENTION_KINDS.values():
            got = maps[name][key]
            if len(got) != n_layers or any(w.shape[0] != B for w in got):
                raise ValueError(f"maps[{name!r}][{key!r}] must hold {n_layers} layers of batch {B}")
    if len(src_labels) != B or len(tgt_labels) != B:
        raise ValueError(f"src_labels and tgt_labels need one list of tokens per example ({B}); "
                         f"got {len(src_labels)} and {len(tgt_labels)}")

    style = {"description_width": "initial"}
    controls = {
        "attention": widgets.Dropdown(options=tuple(ATTENTION_KINDS), value=next(iter(ATTENTION_KINDS)),
                                      description="attention", style=style),
        "layer": widgets.IntSlider(value=n_layers, min=1, max=n_layers, description="layer", style=style),
        "example": widgets.IntSlider(value=0, min=0, max=B - 1, description="held-out example",
                                     style=style),
    }

    def compute(v):
        key, layer, b = ATTENTION_KINDS[v["attention"]], v["layer"], v["example"]
        state = {name: maps[name][key][layer - 1][b].detach().float().cpu() for name in names}
        x_labels = list(tgt_labels[b] if key == "decoder" else src_labels[b])
        y_labels = list(src_labels[b] if key == "encoder" else tgt_labels[b])
        return {**state, "kind": key, "layer": layer, "example": b,
                "x_labels": x_labels, "y_labels": y_labels}

    def draw(s):
        import matplotlib.pyplot as plt  # imported on first draw (see the module docstring)
        H = s["trained"].shape[0]
        fig, axes = plt.subplots(2, H, figsize=(2.6 * H + 0.8, 5.4), squeeze=False)
        for row, name in enumerate(names):
            for h in range(H):
                ax = axes[row, h]
                im = ax.imshow(s[name][h].numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
                ax.set_xticks(range(len(s["x_labels"])), s["x_labels"], fontsize=7)
                ax.set_yticks(range(len(s["y_labels"])), s["y_labels"], fontsize=7)
                ax.set_title(f"{name}, head {h}", fontsize=9)
                if h == 0:
                    ax.set_ylabel("decoder input (query)" if s["kind"] != "encoder" else "source (query)",
                                  fontsize=8)
                if row == 1:
                    ax.set_xlabel("source (key)" if s["kind"] != "decoder" else "decoder input (key)",
                                  fontsize=8)
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="attention weight")
        fig.suptitle(f"{s['kind']} attention, layer {s['layer']}, held-out example {s['example']}",
                     fontsize=10)
        return fig

    return Explorer(controls, compute, draw,
                    title="Encoder-decoder attention maps per head: untrained (top) and trained (bottom)")
