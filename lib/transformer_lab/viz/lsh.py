"""Lecture 06's widget and helpers: LSH attention (Reformer), see :mod:`transformer_lab.lsh`.

Import it as ``from transformer_lab.viz import lsh as vz``. What the pictures show, and how
each number is computed:

* the **buckets** of every position in every hash round (:func:`transformer_lab.lsh.lsh_hash`);
* the **sorted, chunked attention matrix** of one round: positions sorted by
  ``(bucket, position)``, cut into chunks of ``chunk_len``; each chunk may look at its own
  chunk and the one before (the grey band), and inside it only keys of the same bucket, not
  itself and (causal) not the future, are attended (the coloured cells, one colour per bucket);
* the **pairs attended in some round**, back in position order, over the full shared-QK
  attention weights: what LSH attention finds of the mass that matters;
* the **relative error** ``|LSH - full| / |full|`` (Frobenius norms over the output) for
  1 .. ``max_rounds`` rounds with the same knobs.

The queries/keys are drawn around a few random directions (as trained queries cluster), with
values similar within a cluster (:func:`clustered_qk`), from a seed: the same knobs always give the same picture.
"""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import torch

from .. import lsh as S
from ..device import grading_mode
from .core import Explorer, WidgetsOff

__all__ = ["clustered_qk", "lsh_picture", "plot_buckets", "plot_sorted_chunks", "plot_rounds_error",
           "lsh_explorer"]


def clustered_qk(L: int, D: int = 16, n_centres: int = 8, spread: float = 0.5, sharpness: float = 6.0,
                 value_noise: float = 0.5, seed: int = 0, dtype=torch.float32):
    """Shared queries/keys (1, 1, L, D) around ``n_centres`` random directions, and values (1, 1, L, D).

    Token i belongs to topic a(i): ``qk_i = sharpness * sqrt(D) * normalise(c_a + spread * noise / sqrt(D))``
    and ``v_i = u_a + value_noise * noise``. Tokens about the same thing point the same way and
    carry similar values, and the scale makes attention peaked, as in a trained model: the
    scores ``q_i . k_j / sqrt(D) = sharpness * cos(q_i, q_j)``.
    """
    if L < 2 or D < 2 or n_centres < 1:
        raise ValueError(f"need L >= 2, D >= 2 and n_centres >= 1; got L={L}, D={D}, n_centres={n_centres}")
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_centres, D, generator=g), dim=-1)
    which = torch.randint(0, n_centres, (L,), generator=g)
    x = centres[which] + spread * torch.randn(L, D, generator=g) / D ** 0.5
    qk = sharpness * D ** 0.5 * torch.nn.functional.normalize(x, dim=-1)
    topic_values = torch.randn(n_centres, D, generator=g)
    v = topic_values[which] + value_noise * torch.randn(L, D, generator=g)
    return qk.to(dtype)[None, None], v.to(dtype)[None, None]


def lsh_picture(qk, v, n_buckets: int, n_rounds: int, chunk_len: int, causal: bool = False,
                seed: int = 0, max_rounds: int = 8) -> dict:
    """Everything the explorer draws, for one (batch, head) of ``qk``, ``v`` (1, 1, L, D).

    Returns a dict: ``buckets`` (n_rounds, L); ``order`` (L,) the sort of round 0; ``sorted_mask``
    (L, L) the pairs round 0 attends, rows and columns in sorted order; ``window`` (L, L) the
    chunk windows (own chunk + previous) in sorted order; ``visited`` (L, L) the pairs attended in
    some round, in position order; ``full`` (L, L) the full shared-QK weights; ``weights`` (L, L)
    LSH's effective weights; ``error`` the relative error of the output; ``covered`` the share of
    the full attention mass that falls on visited pairs; ``errors`` the error for 1 ..
    ``max_rounds`` rounds (the same first rotations, one more each time).
    """
    L = qk.shape[-2]
    out, d = S.lsh_attention(qk, v, n_buckets, n_rounds, chunk_len, causal, generator=seed,
                             return_details=True)
    full_out, full_w = S.shared_qk_attention(qk, v, causal=causal, need_weights=True)
    round0 = S.lsh_mask(d.buckets[:, :, :1], chunk_len, causal)[0, 0]  # (L, L) position order
    order = d.order[0, 0, 0]
    sorted_mask = round0[order][:, order]
    slot_chunk = torch.arange(L) // chunk_len
    n_chunks = int(slot_chunk.max()) + 1
    prev = (slot_chunk - 1) % n_chunks
    window = (slot_chunk[None, :] == slot_chunk[:, None]) | (slot_chunk[None, :] == prev[:, None])

    def rel(o):
        return float((o - full_out).norm() / full_out.norm())

    # error against rounds: R rounds = the first R rotations of one draw of max_rounds
    R_all = S.lsh_rotations(qk.shape[-1], n_buckets, max_rounds, qk.shape[1], generator=seed,
                            dtype=qk.dtype)
    errors = [rel(S.lsh_attention(qk, v, n_buckets, r, chunk_len, causal, rotations=R_all[:, :r]))
              for r in range(1, max_rounds + 1)]
    full_w = full_w[0, 0]
    return {
        "L": L, "n_buckets": n_buckets, "n_rounds": n_rounds, "chunk_len": chunk_len, "causal": causal,
        "n_chunks": n_chunks, "buckets": d.buckets[0, 0], "order": order,
        "sorted_buckets": d.buckets[0, 0, 0][order], "sorted_mask": sorted_mask, "window": window,
        "visited": d.visited[0, 0], "full": full_w, "weights": d.weights[0, 0],
        "error": rel(out), "covered": float((full_w * d.visited[0, 0]).sum() / full_w.sum()),
        "pairs": int(d.visited[0, 0].sum()), "errors": errors,
    }


def plot_buckets(buckets, n_buckets: int, ax=None, title: str | None = None):
    """Bucket of every position (columns) in every round (rows), one colour per bucket."""
    import matplotlib.pyplot as plt

    b = np.asarray(torch.as_tensor(buckets).reshape(-1, torch.as_tensor(buckets).shape[-1]))
    ax = ax or plt.gca()
    ax.imshow(b, aspect="auto", cmap="tab10" if n_buckets <= 10 else "tab20", vmin=0,
              vmax=max(n_buckets - 1, 1), interpolation="nearest")
    ax.set(xlabel="position i", ylabel="round r", yticks=range(b.shape[0]))
    if title:
        ax.set_title(title)
    return ax


def plot_sorted_chunks(sorted_mask, window, sorted_buckets, chunk_len: int, n_buckets: int,
                       ax=None, title: str | None = None):
    """One round's attention pattern in sorted order: chunk windows in grey, attended pairs coloured
    by bucket, chunk boundaries as lines."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    m = np.asarray(torch.as_tensor(sorted_mask), dtype=bool)
    w = np.asarray(torch.as_tensor(window), dtype=bool)
    bk = np.asarray(torch.as_tensor(sorted_buckets))
    L = m.shape[0]
    base = plt.get_cmap("tab10" if n_buckets <= 10 else "tab20")
    colours = [(1, 1, 1, 1), (0.85, 0.85, 0.85, 1)] + [base(i % base.N) for i in range(n_buckets)]
    img = np.where(w, 1, 0)
    img = np.where(m, 2 + bk[:, None], img)
    ax = ax or plt.gca()
    ax.imshow(img, cmap=ListedColormap(colours), vmin=0, vmax=len(colours) - 1, interpolation="nearest")
    for c in range(chunk_len, L, chunk_len):
        ax.axhline(c - 0.5, color="k", lw=0.6)
        ax.axvline(c - 0.5, color="k", lw=0.6)
    ax.set(xlabel="key slot (sorted by bucket)", ylabel="query slot (sorted by bucket)")
    if title:
        ax.set_title(title)
    return ax


def plot_rounds_error(errors, current: int | None = None, ax=None, title: str | None = None):
    """Relative error against full attention for 1 .. len(errors) rounds."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    rounds = np.arange(1, len(errors) + 1)
    ax.plot(rounds, errors, "o-", color="tab:blue")
    if current is not None:
        ax.plot([current], [errors[current - 1]], "o", ms=12, mfc="none", mec="tab:red", mew=2)
    ax.set(xlabel="hash rounds", ylabel="relative error of the output", ylim=(0, None), xticks=rounds)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    return ax


def lsh_explorer(n_buckets: int = 8, n_rounds: int = 2, chunk_len: int = 8, length: int = 64,
                 causal: bool = False, seed: int = 0, max_length: int = 128, max_rounds: int = 8):
    """Lecture 06: what LSH attention compares, and how close it gets to full attention.

    Controls: ``n_buckets`` (even), ``n_rounds``, ``chunk_len``, ``length`` L, ``causal``, ``seed``
    (the rotations and the data). Four panels: the buckets of every position in every round; round
    0's sorted, chunked attention matrix; the pairs attended in some round over the full
    attention weights, with the share of the attention mass they cover and the output's relative
    error; the error against the number of rounds. ``state`` is :func:`lsh_picture`'s dict.
    ``chunk_len`` is clipped to L.
    """
    if grading_mode():
        return WidgetsOff()
    if not 16 <= length <= max_length:
        raise ValueError(f"length must be between 16 and max_length={max_length}; got {length}")
    style = {"description_width": "initial"}
    slider = dict(style=style, continuous_update=False)
    controls = {
        "n_buckets": widgets.IntSlider(value=n_buckets, min=2, max=16, step=2, description="buckets n_b",
                                       **slider),
        "n_rounds": widgets.IntSlider(value=n_rounds, min=1, max=max_rounds, description="rounds", **slider),
        "chunk_len": widgets.IntSlider(value=chunk_len, min=2, max=64, description="chunk L_c", **slider),
        "length": widgets.IntSlider(value=length, min=16, max=max_length, step=16, description="length L",
                                    **slider),
        "causal": widgets.Checkbox(value=causal, description="causal", indent=False),
        "seed": widgets.IntSlider(value=seed, min=0, max=9, description="seed", **slider),
    }

    def compute(v):
        L = v["length"]
        qk, val = clustered_qk(L, seed=v["seed"])
        m = min(v["chunk_len"], L)
        return lsh_picture(qk, val, v["n_buckets"], v["n_rounds"], m, v["causal"], v["seed"], max_rounds)

    def draw(s):
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 4, figsize=(17, 4.3), gridspec_kw={"width_ratios": [1.3, 1, 1, 1]})
        plot_buckets(s["buckets"], s["n_buckets"], ax=axes[0],
                     title=f"buckets (n_b = {s['n_buckets']}) of each position, each round")
        plot_sorted_chunks(s["sorted_mask"], s["window"], s["sorted_buckets"], s["chunk_len"], s["n_buckets"],
                           ax=axes[1], title=f"round 0, sorted: {s['n_chunks']} chunks of L_c = {s['chunk_len']}\n"
                                             "grey: own + previous chunk; colour: attended")
        axes[2].imshow(s["full"].numpy(), cmap="Greys", interpolation="nearest",
                       vmax=float(s["full"].quantile(0.99)))  # the heavy weights dark
        ii, jj = np.nonzero(s["visited"].numpy())
        axes[2].scatter(jj, ii, s=4, c="tab:red", marker="s", linewidths=0)
        axes[2].set(xlabel="key j", ylabel="query i",
                    title=f"full weights (grey), attended pairs (red)\n{s['covered']:.0%} of the mass "
                          f"covered, error {s['error']:.3f}")
        plot_rounds_error(s["errors"], s["n_rounds"], ax=axes[3], title="error against full attention")
        fig.tight_layout()
        return fig

    return Explorer(controls, compute, draw, title="LSH attention: buckets, sorted chunks and the error")
