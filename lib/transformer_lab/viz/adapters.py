"""Lecture 04's widget and helpers: how much of a weight update fits in rank r (see :mod:`transformer_lab.viz`).

LoRA (Hu et al. 2021, arXiv:2106.09685) learns an update of rank at most r. By the
Eckart-Young theorem the best rank-r approximation of a matrix, in the Frobenius norm, keeps
its r largest singular values: ``Delta_r = U[:, :r] diag(s[:r]) V[:, :r]^T``, with error
``||Delta - Delta_r||_F^2 = sum_{i > r} s_i^2``. So the singular values of an update that full
fine-tuning found say how much of it a rank-r update could have carried.
"""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import torch

from ..device import grading_mode
from .core import Explorer, WidgetsOff

__all__ = ["low_rank_summary", "plot_spectra", "lora_rank_explorer", "example_updates"]


def _as_matrix(delta, name: str = "delta") -> torch.Tensor:
    if not isinstance(delta, torch.Tensor):
        delta = torch.as_tensor(delta)
    if delta.dim() != 2 or not delta.is_floating_point() or min(delta.shape) < 1:
        raise ValueError(f"{name} must be a non-empty floating-point matrix (d_out, d_in); got "
                         f"shape {tuple(delta.shape)}, {delta.dtype}")
    return delta.detach().to("cpu", torch.float64)


def low_rank_summary(delta, r: int) -> dict:
    """What a rank-r update keeps of ``delta`` (d_out, d_in), by its singular values.

    Returns ``singular_values`` (min(d_out, d_in),), descending; ``approx`` the best rank-r
    approximation ``U_r diag(s_r) V_r^T`` (d_out, d_in); ``energy`` = sum_{i<=r} s_i^2 /
    sum_i s_i^2 (the share of ||delta||_F^2 kept); ``relative_error`` = ||delta - approx||_F /
    ||delta||_F = sqrt(1 - energy); ``lora_params`` = r (d_in + d_out) and ``full_params`` =
    d_in d_out, what LoRA and full fine-tuning train for this matrix; and ``rank`` = r.
    """
    delta = _as_matrix(delta)
    d_out, d_in = delta.shape
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= min(d_out, d_in):
        raise ValueError(f"r must be an int between 1 and min(d_out, d_in) = {min(d_out, d_in)}; got {r!r}")
    U, s, Vh = torch.linalg.svd(delta, full_matrices=False)  # delta = U diag(s) Vh
    approx = (U[:, :r] * s[:r]) @ Vh[:r]  # Eckart-Young: the best rank-r approximation
    total = float((s ** 2).sum())
    energy = float((s[:r] ** 2).sum()) / total if total > 0 else 1.0
    return {"singular_values": s, "approx": approx, "energy": energy,
            "relative_error": float(np.sqrt(max(0.0, 1.0 - energy))), "rank": r,
            "lora_params": r * (d_in + d_out), "full_params": d_in * d_out}


def example_updates(d_out: int = 48, d_in: int = 32, seed: int = 0) -> dict:
    """Two made-up updates to explore without a trained model: a rank-3 signal plus noise, and
    pure noise (a random matrix has no low-rank structure to find)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d_out, 3, generator=g))[0]
    V = torch.linalg.qr(torch.randn(d_in, 3, generator=g))[0]
    signal = U @ torch.diag(torch.tensor([6.0, 3.0, 1.5])) @ V.T  # rank 3
    noise = torch.randn(d_out, d_in, generator=g) / np.sqrt(d_in)
    return {"rank 3 + noise": signal + 0.3 * noise, "random (no structure)": noise}


def plot_spectra(updates: dict, ranks=(1, 4, 8), ax=None, title: str | None = None):
    """Cumulative share of ||delta||_F^2 kept by the best rank-r update, for each matrix.

    ``updates``: ``{name: delta (d_out, d_in)}``. Each curve is ``energy(r)`` for r = 1 ..
    min(d_out, d_in); dotted verticals mark ``ranks``. Returns the ``Axes``.
    """
    import matplotlib.pyplot as plt  # imported on first draw (see the module docstring)

    if not isinstance(updates, dict) or not updates:
        raise ValueError("updates must be a non-empty dict {name: matrix}")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for name, delta in updates.items():
        s = torch.linalg.svdvals(_as_matrix(delta, name))
        energy = (s ** 2).cumsum(0) / (s ** 2).sum()
        ax.plot(np.arange(1, len(s) + 1), energy.numpy(), marker=".", ms=3, label=name)
    for r in ranks:
        ax.axvline(r, color="gray", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("rank r of the approximation")
    ax.set_ylabel("share of ||ΔW||² kept")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def lora_rank_explorer(updates: dict | None = None, rank: int = 4, max_rank: int | None = None):
    """Lecture 04: an update ΔW, its best rank-r approximation, and its singular values.

    ``updates``: ``{name: ΔW (d_out, d_in)}``, e.g. what full fine-tuning changed in each
    weight (``W_finetuned - W_pretrained``); default :func:`example_updates`. Controls: the
    ``matrix`` and the ``rank`` r. The figure shows ΔW, its rank-r approximation (what a LoRA
    of rank r could at best have learned, by Eckart-Young), and the singular values with the
    kept ones highlighted; the title gives the share of ||ΔW||_F² kept and the parameters a
    rank-r LoRA trains against full fine-tuning's d_in d_out.

    State: :func:`low_rank_summary` of the chosen matrix plus ``name`` and ``delta``.
    """
    if grading_mode():
        return WidgetsOff()
    updates = example_updates() if updates is None else dict(updates)
    if not updates:
        raise ValueError("updates must hold at least one matrix")
    mats = {name: _as_matrix(d, name) for name, d in updates.items()}
    top = min(min(m.shape) for m in mats.values())
    max_rank = top if max_rank is None else min(max_rank, top)
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise ValueError(f"rank must be between 1 and {max_rank}; got {rank!r}")
    style = {"description_width": "initial"}
    names = list(mats)
    controls = {
        "matrix": widgets.Dropdown(options=names, value=names[0], description="matrix", style=style),
        "rank": widgets.IntSlider(value=rank, min=1, max=max_rank, description="rank r", style=style),
    }

    def compute(v):
        out = low_rank_summary(mats[v["matrix"]], v["rank"])
        out.update(name=v["matrix"], delta=mats[v["matrix"]])
        return out

    def draw(s):
        import matplotlib.pyplot as plt  # imported on first draw (see the module docstring)

        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1, 1, 1.3]})
        lim = float(s["delta"].abs().max()) or 1.0
        for ax, m, title in ((axes[0], s["delta"], f"{s['name']}: ΔW"),
                             (axes[1], s["approx"], f"its best rank-{s['rank']} approximation")):
            im = ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("input feature")
        axes[0].set_ylabel("output feature")
        fig.colorbar(im, ax=axes[:2].tolist(), shrink=0.8)
        sv = s["singular_values"].numpy()
        idx = np.arange(1, len(sv) + 1)
        axes[2].bar(idx, sv, color=["tab:blue" if i <= s["rank"] else "lightgray" for i in idx])
        axes[2].set_xlabel("singular value index i")
        axes[2].set_ylabel("s_i")
        axes[2].set_title(f"kept {100 * s['energy']:.0f}% of ||ΔW||², LoRA {s['lora_params']:,} "
                          f"vs full {s['full_params']:,} params", fontsize=9)
        return fig

    return Explorer(controls, compute, draw, title="How much of an update fits in rank r?")
