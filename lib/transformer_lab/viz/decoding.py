"""Lecture 13's widgets: what temperature, top-k and nucleus do to one next-token distribution;
what the acceptance rate and the draft length do to speculative decoding.

* :func:`sampling_explorer`: sliders for the temperature ``T``, ``k_top`` (0 = off) and
  ``p_top`` over one next-token distribution (a fixed Zipf-like row of logits, or a row you pass,
  e.g. a trained model's): bars of ``softmax(z / T)`` (grey), the kept set ``U_top`` (blue) and
  the distribution sampled from after renormalisation (orange, :func:`decoding.sampling_probs`);
  the title gives the size of ``U_top``, the probability mass it had before renormalisation and
  the entropy.
* :func:`speculative_explorer`: sliders for the acceptance rate ``cA`` and the draft length
  ``n_draft``: the distribution of the number of tokens one round emits (1 .. n_draft + 1, i.i.d.
  acceptances) and the expected tokens per target call ``n_tok`` (the lecture's n-bar_tok) against ``n_draft`` for that cA
  (:func:`decoding.expected_tokens_per_call`).
"""

from __future__ import annotations

import math
from typing import Optional

import ipywidgets as widgets
import torch

from .. import decoding as Dc
from ..device import grading_mode
from .core import Explorer, WidgetsOff

__all__ = ["zipf_logits", "sampling_state", "sampling_figure", "sampling_explorer",
           "speculative_state", "speculative_figure", "speculative_explorer"]


def zipf_logits(vocab_size: int = 30, exponent: float = 1.1) -> torch.Tensor:
    """Logits of a Zipf-like distribution, ``p(rank r) ~ r^-exponent``: (vocab_size,) float64."""
    r = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    return -exponent * r.log()


def sampling_state(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   logits: Optional[torch.Tensor] = None) -> dict:
    """What :func:`sampling_figure` shows. ``top_k=0`` means no top-k filter."""
    z = zipf_logits() if logits is None else torch.as_tensor(logits, dtype=torch.float64).flatten()
    T = max(float(temperature), 1e-6)
    base = torch.softmax(z / T, -1)  # softmax(z / T)
    final = Dc.sampling_probs(z, T, top_k=int(top_k) or None, top_p=float(top_p))
    kept = final > 0
    entropy = float(-(final[kept] * final[kept].log()).sum())
    return {"temperature": T, "top_k": int(top_k), "top_p": float(top_p), "base": base, "final": final,
            "kept": kept, "n_kept": int(kept.sum()), "mass_kept": float(base[kept].sum()),
            "entropy": entropy}


def sampling_figure(state: dict):
    """Bars: softmax(z / T) (grey), the kept set (blue outline), the renormalised distribution (orange)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.4))
    i = torch.arange(state["base"].numel()).numpy()
    ax.bar(i - 0.2, state["base"].numpy(), width=0.4, color="lightgrey", label="softmax(z / T)")
    ax.bar(i + 0.2, state["final"].numpy(), width=0.4, color="tab:orange", label="sampled from (renormalised)")
    kept = state["kept"].numpy()
    ax.bar(i[kept] - 0.2, state["base"].numpy()[kept], width=0.4, fill=False, edgecolor="tab:blue",
           label="kept set U_top")
    ax.set_xlabel("token (by rank)")
    ax.set_ylabel("probability")
    k = state["top_k"] or "off"
    ax.set_title(f"T = {state['temperature']:.2f}, top-k {k}, top-p {state['top_p']:.2f}: "
                 f"{state['n_kept']} tokens kept, holding {state['mass_kept']:.0%} of the mass; "
                 f"entropy {state['entropy']:.2f} nats", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def sampling_explorer(logits: Optional[torch.Tensor] = None, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0):
    """Sliders for T, k_top and p_top over :func:`sampling_figure` (a label in grading mode)."""
    if grading_mode():
        return WidgetsOff()
    V = zipf_logits().numel() if logits is None else torch.as_tensor(logits).numel()
    controls = {
        "temperature": widgets.FloatSlider(value=temperature, min=0.1, max=3.0, step=0.1, description="T"),
        "top_k": widgets.IntSlider(value=top_k, min=0, max=V, description="top-k (0 off)"),
        "top_p": widgets.FloatSlider(value=top_p, min=0.05, max=1.0, step=0.05, description="top-p"),
    }

    def compute(values):
        return sampling_state(values["temperature"], values["top_k"], values["top_p"], logits)

    return Explorer(controls, compute, sampling_figure, title="Temperature, top-k and nucleus sampling")


def speculative_state(alpha: float = 0.7, n_draft: int = 4, max_draft: int = 10) -> dict:
    """Tokens per round when each draft token is accepted with probability cA = ``alpha``
    independently: P(emit j tokens) = cA^(j-1) (1 - cA) for j <= n_draft, cA^n_draft for
    j = n_draft + 1; n_tok for n_draft = 1 .. max_draft."""
    a, n = float(alpha), int(n_draft)
    probs = [a ** (j - 1) * (1 - a) for j in range(1, n + 1)] + [a ** n]  # j = 1 .. n + 1
    mean = sum(j * p for j, p in zip(range(1, n + 2), probs, strict=True))
    curve = [Dc.expected_tokens_per_call(a, m) for m in range(1, max_draft + 1)]
    return {"alpha": a, "n_draft": n, "tokens": list(range(1, n + 2)), "probs": probs, "mean": mean,
            "e_tok": Dc.expected_tokens_per_call(a, n), "curve": curve,
            "limit": math.inf if a == 1.0 else 1 / (1 - a)}


def speculative_figure(state: dict):
    """Left: tokens per round; right: n_tok against n_draft (and its limit 1 / (1 - cA))."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    ax = axes[0]
    ax.bar(state["tokens"], state["probs"], color="tab:blue")
    ax.set_xlabel("tokens emitted by one target call")
    ax.set_ylabel("probability")
    ax.set_title(f"A = {state['alpha']:.2f}, n_draft = {state['n_draft']}: "
                 f"n_tok = {state['e_tok']:.2f} tokens per call", fontsize=10)
    ax = axes[1]
    ns = list(range(1, len(state["curve"]) + 1))
    ax.plot(ns, state["curve"], "o-", color="tab:orange", label="(1 - A^(n+1)) / (1 - A)")
    if math.isfinite(state["limit"]):
        ax.axhline(state["limit"], color="grey", linestyle=":", label="limit 1 / (1 - A)")
        ax.set_ylim(0.9, 1.08 * state["limit"])
    ax.axvline(state["n_draft"], color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("draft length n_draft")
    ax.set_ylabel("tokens per target call")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def speculative_explorer(alpha: float = 0.7, n_draft: int = 4):
    """Sliders for cA and n_draft over :func:`speculative_figure` (a label in grading mode)."""
    if grading_mode():
        return WidgetsOff()
    controls = {
        "alpha": widgets.FloatSlider(value=alpha, min=0.0, max=1.0, step=0.05, description="A (accept)"),
        "n_draft": widgets.IntSlider(value=n_draft, min=1, max=10, description="n_draft"),
    }

    def compute(values):
        return speculative_state(values["alpha"], values["n_draft"])

    return Explorer(controls, compute, speculative_figure, title="Speculative decoding: tokens per target call")
