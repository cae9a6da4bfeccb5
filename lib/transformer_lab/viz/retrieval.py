"""Lecture 09's kNN-LM explorer: the interpolation weight, the temperature and the neighbours.

The state is computed from what a notebook already has after one search: the LM's
log-probabilities at every position of a text, the distances and next tokens of each position's
nearest keys in a datastore (nearest first, as many as the largest ``n_k`` to try), and the true
next tokens. Moving a control recomputes, with :func:`transformer_lab.retrieval.knn_distribution`
and :func:`transformer_lab.retrieval.interpolate`:

* the kNN-LM's perplexity on the whole text against lambda (at the chosen temperature ``T`` and
  number of neighbours ``n_k``), with the chosen lambda marked;
* at one position, the model's distribution, the neighbours' and their mixture, over the
  characters that matter most there.

Nothing is searched again: the first ``n_k`` columns of the stored neighbours are the ``n_k``
nearest.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import ipywidgets as widgets
import torch

from .. import retrieval as RT
from ..device import grading_mode
from .core import Explorer, WidgetsOff

__all__ = ["knn_lm_state", "knn_lm_figure", "knn_lm_explorer", "LAMBDA_GRID"]

#: The lambdas of the perplexity curve.
LAMBDA_GRID = tuple(round(0.05 * i, 2) for i in range(20)) + (0.97, 0.99)


def _check_inputs(log_p_lm, distances, tokens, targets):
    if log_p_lm.dim() != 2:
        raise ValueError(f"log_p_lm must be (positions, vocab_size); got {tuple(log_p_lm.shape)}")
    n = log_p_lm.shape[0]
    if distances.shape != tokens.shape or distances.dim() != 2 or distances.shape[0] != n:
        raise ValueError(f"distances and tokens must both be (positions = {n}, K); got "
                         f"{tuple(distances.shape)} and {tuple(tokens.shape)}")
    if targets.shape != (n,):
        raise ValueError(f"targets must be (positions = {n},); got {tuple(targets.shape)}")


def knn_lm_state(log_p_lm: torch.Tensor, distances: torch.Tensor, tokens: torch.Tensor,
                 targets: torch.Tensor, lam: float = 0.5, temperature: float = 1.0, n_k: int = 16,
                 position: int = 0, labels: Optional[Sequence[str]] = None, top: int = 10) -> dict:
    """Everything the explorer draws, for one setting of the controls.

    ``log_p_lm`` (n, V) the LM's log-probabilities; ``distances``, ``tokens`` (n, K) each position's
    K nearest neighbours, nearest first; ``targets`` (n,) the true next tokens. Returns a dict:
    ``lams`` and ``ppl`` (the curve at this temperature and n_k), ``ppl_lm``, ``ppl_at`` (at ``lam``),
    ``best_lam``, ``best_ppl``; at ``position``: ``p_lm``, ``p_knn``, ``p_mix`` (V,), ``target``,
    ``shown`` (the ``top`` token ids drawn: the mixture's most likely, the target included) and
    their ``labels``; the settings ``lam``, ``temperature``, ``n_k``, ``position``.
    """
    _check_inputs(log_p_lm, distances, tokens, targets)
    n, K = distances.shape
    if not isinstance(n_k, int) or not 1 <= n_k <= K:
        raise ValueError(f"n_k must lie in [1, K = {K}] (the neighbours stored); got {n_k!r}")
    if not isinstance(position, int) or not 0 <= position < n:
        raise ValueError(f"position must lie in [0, {n - 1}]; got {position!r}")
    V = log_p_lm.shape[1]
    p_lm = log_p_lm.double().exp()                                                  # (n, V)
    p_knn = RT.knn_distribution(distances[:, :n_k].double(), tokens[:, :n_k].long(), V, temperature)
    y = targets.long()[:, None]
    p_lm_y, p_knn_y = p_lm.gather(1, y)[:, 0], p_knn.gather(1, y)[:, 0]
    lams = list(LAMBDA_GRID)

    def ppl(lam_):
        return math.exp(float(-torch.log(lam_ * p_knn_y + (1 - lam_) * p_lm_y).mean()))

    curve = [ppl(x) for x in lams]
    best = min(range(len(lams)), key=lambda i: curve[i])
    p_mix = RT.interpolate(p_lm[position], p_knn[position], lam)
    target = int(targets[position])
    order = [int(i) for i in p_mix.argsort(descending=True)[:top]]
    if target not in order:
        order[-1] = target
    names = [labels[i] for i in order] if labels is not None else [str(i) for i in order]
    return {"lams": lams, "ppl": curve, "ppl_lm": ppl(0.0), "ppl_at": ppl(lam), "best_lam": lams[best],
            "best_ppl": curve[best], "p_lm": p_lm[position], "p_knn": p_knn[position], "p_mix": p_mix,
            "target": target, "shown": order, "labels": names, "lam": lam, "temperature": temperature,
            "n_k": n_k, "position": position}


def knn_lm_figure(s: dict):
    """Left: perplexity against lambda (the chosen lambda marked). Right: the three distributions."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.3), gridspec_kw={"width_ratios": [1, 1.3]})
    ax1.plot(s["lams"], s["ppl"], "o-", ms=3)
    # at lambda = 1 the perplexity is infinite when some target is held by no neighbour: the
    # neighbours alone give it probability 0 (drawn at the top of the axes, marked by an arrow)
    at = s["ppl_at"]
    top = max(2 * s["ppl_lm"], 1.05 * at) if math.isfinite(at) else 2 * s["ppl_lm"]
    shown_at = at if math.isfinite(at) else top
    ax1.plot([s["lam"]], [shown_at], "r*" if math.isfinite(at) else "r^", ms=12,
             label=f"$\\lambda$ = {s['lam']:.2f}: " + (f"{at:.2f}" if math.isfinite(at) else "infinite"))
    ax1.axhline(s["ppl_lm"], color="gray", ls=":", label=f"LM alone: {s['ppl_lm']:.2f}")
    ax1.set_ylim(0, top)
    ax1.set_xlabel("$\\lambda$")
    ax1.set_ylabel("perplexity")
    ax1.set_title(f"T = {s['temperature']:.2g}, $n_k$ = {s['n_k']} (best $\\lambda$ {s['best_lam']})", fontsize=10)
    ax1.legend(fontsize=8)
    idx = torch.tensor(s["shown"])
    x = torch.arange(len(idx)).double().numpy()
    for j, (name, p) in enumerate((("$p_{LM}$", s["p_lm"]), ("$p_{kNN}$", s["p_knn"]),
                                   ("mixture", s["p_mix"]))):
        ax2.bar(x + (j - 1) * 0.27, p[idx].double().numpy(), width=0.27, label=name)
    ax2.set_xticks(x.tolist(), [repr(t) if t.strip() != t or not t else t for t in s["labels"]])
    where = s["shown"].index(s["target"])
    ax2.get_xticklabels()[where].set_color("red")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("probability")
    ax2.legend(fontsize=8)
    ax2.set_title(f"position {s['position']}: the true next token in red", fontsize=10)
    fig.tight_layout()
    return fig


def knn_lm_explorer(log_p_lm, distances, tokens, targets, labels=None, lam: float = 0.5,
                    temperature: float = 1.0, n_k: int = 16, position: int = 0):
    """Sliders for lambda, the temperature T (log scale), n_k and the position; see the module docstring."""
    if grading_mode():
        return WidgetsOff()
    _check_inputs(log_p_lm, distances, tokens, targets)
    n, K = distances.shape
    controls = {
        "lam": widgets.FloatSlider(value=lam, min=0.0, max=1.0, step=0.05, description="lambda"),
        "temperature": widgets.FloatLogSlider(value=temperature, base=10, min=-1.5, max=1.5, step=0.1,
                                              description="T"),
        "n_k": widgets.IntSlider(value=min(n_k, K), min=1, max=K, description="n_k"),
        "position": widgets.IntSlider(value=position, min=0, max=n - 1, description="position"),
    }

    def compute(v):
        return knn_lm_state(log_p_lm, distances, tokens, targets, v["lam"], v["temperature"], v["n_k"],
                            v["position"], labels)

    return Explorer(controls, compute, knn_lm_figure, title="kNN-LM: interpolation, temperature, neighbours")
