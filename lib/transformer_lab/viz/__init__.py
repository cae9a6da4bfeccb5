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
:func:`lora_rank_explorer`             04        a weight update ΔW, its best rank-r approximation
                                                 and singular values: what a LoRA of rank r keeps
:func:`sparse_pattern_explorer`        05        a sparse pattern's mask and density, the BFS hop
                                                 distances of its graph (diameter), and its
                                                 attended pairs against L next to dense attention's
``lsh.lsh_explorer``                   06        buckets, sorted chunks and the error of LSH attention
``lowrank.kernel_attention_explorer``  07        random-feature attention against exact attention
``flash.flash_tile_explorer``          08        the tiles FlashAttention visits, causal skipping
``memory.memory_explorer``             09        what each layer sees with a Transformer-XL cache
``retrieval.knn_lm_explorer``          09        kNN-LM: interpolation weight, temperature, neighbours
``adaptive.span_act_explorer``         10        adaptive span's soft mask and ACT's halting weights
``ssm.kernel_explorer``                11        the SSM kernel K: zero-order hold against Euler
``ternary.quant_explorer``             12        ternary weights and n-bit activations
``decoding.sampling_explorer``         13        temperature, top-k and top-p on one distribution
``decoding.speculative_explorer``      13        acceptance rate and draft length: tokens per call
``objectives.distill_explorer``        14        distillation's soft targets and loss vs temperature
``rl.target_explorer``                 15        a Decision Transformer's episodes for a target return
=====================================  ========  ===================================================

The builders of lectures 06 on live in their own submodule, imported on use
(``from transformer_lab.viz import lsh as vz``), so that ``import transformer_lab.viz`` stays
cheap; lectures 01-05's are also importable from ``transformer_lab.viz`` itself.

On the website (``TRANSFORMER_LAB_STATIC_WIDGETS=1``, set by the book's build) an
:class:`Explorer` shows itself as HTML with its figures drawn in advance, one control moving at a
time (:meth:`Explorer.static_html`): a static page has no kernel to redraw it.

In grading mode (``TRANSFORMER_LAB_GRADING=1``) the builders return a
:class:`WidgetsOff` placeholder (a ``Label`` with empty ``.controls``/``.state`` and a
``render()`` that does nothing) and draw nothing. Figures are closed after they are
shown (``plt.close``), so a notebook does not draw them twice and memory stays flat.

matplotlib and seaborn (with pandas, about 0.5 s on a 2-core CPU) are imported the first
time something is drawn, not when this module is imported: a notebook graded in grading
mode that never draws never pays for them.

Shapes: attention weights are ``(B, H, Lq, Lk)`` in the library; the plots take one
``(Lq, Lk)`` map or ``(H, Lq, Lk)`` heads (a leading batch of 1 is dropped).

Layout: the shared primitives are in ``viz/core.py``; each lecture's widget and its helpers
in the module of the same name as the library module it illustrates (``viz/attention.py``
for lecture 01, ...).
"""

from __future__ import annotations

from .adapters import example_updates, lora_rank_explorer, low_rank_summary, plot_spectra
from .attention import MASKS, SCALES, attention_explorer, row_entropy
from .blocks import NORMS, layer_grad_profile, norm_gradient_explorer
from .core import (
    WIDGETS_OFF_MESSAGE,
    Explorer,
    WidgetsOff,
    plot_attention,
    plot_heads,
    plot_history,
)
from .positions import BIAS_SCHEMES, TABLE_SCHEMES, position_explorer, position_pattern
from .sparse import (
    SPARSE_PATTERNS,
    pattern_summary,
    plot_pair_counts,
    plot_pattern,
    plot_patterns,
    sparse_pattern,
    sparse_pattern_explorer,
)

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
    "lora_rank_explorer",
    "sparse_pattern_explorer",
    "row_entropy",
    "layer_grad_profile",
    "position_pattern",
    "low_rank_summary",
    "plot_spectra",
    "example_updates",
    "sparse_pattern",
    "pattern_summary",
    "plot_pattern",
    "plot_patterns",
    "plot_pair_counts",
    "SCALES",
    "MASKS",
    "NORMS",
    "BIAS_SCHEMES",
    "TABLE_SCHEMES",
    "SPARSE_PATTERNS",
]
