"""Lecture 11's widget: the kernel K of a one-state SSM as the step size Δ and A vary.

:func:`kernel_explorer` draws, for one channel with a single real state (A < 0, B = C = 1),

* the kernel ``K_j = C Abar^j Bbar``, j = 0 .. L-1 (:func:`transformer_lab.ssm.ssm_kernel`),
  discretised by zero-order hold (:func:`transformer_lab.ssm.discretize_zoh`) and by Euler
  (:func:`transformer_lab.ssm.discretize_euler`), against the continuous system's impulse
  response ``exp(A t) B`` sampled at t = j Δ (times Δ, the weight of one sample);
* ``|Abar|`` of both as Δ sweeps a log range: ZOH's ``exp(Δ A)`` stays below 1 for every Δ, Euler's
  ``|1 + Δ A|`` crosses 1 at Δ = 2 / |A|, where its kernel starts to grow instead of decay.

A large Δ forgets fast (the kernel is short), a small Δ remembers long: the step size is a
timescale, which is what Mamba makes depend on the input.
"""

from __future__ import annotations

import ipywidgets as widgets
import torch

from .. import ssm as S
from ..device import grading_mode
from .core import Explorer, WidgetsOff

__all__ = ["kernel_state", "kernel_figure", "kernel_explorer"]


def kernel_state(log10_delta: float = -1.0, A: float = -2.0, L: int = 32) -> dict:
    """Everything the two panels show, as tensors and numbers (tests check it)."""
    if not A < 0:
        raise ValueError(f"A must be negative (a stable system); got {A}")
    delta = 10.0 ** float(log10_delta)
    A_t = torch.tensor([[float(A)]], dtype=torch.float64)  # (d_inner, d_state) = (1, 1)
    B_t = torch.ones(1, 1, dtype=torch.float64)
    C_t = torch.ones(1, 1, dtype=torch.float64)
    Az, Bz = S.discretize_zoh(A_t, B_t, delta)
    Ae, Be = S.discretize_euler(A_t, B_t, delta)
    K_zoh = S.ssm_kernel(Az, Bz, C_t, int(L))[0]  # (L,)
    K_euler = S.ssm_kernel(Ae, Be, C_t, int(L))[0]
    j = torch.arange(int(L), dtype=torch.float64)
    K_true = torch.exp(A * j * delta) * delta  # exp(A t) B at t = j delta, one sample's weight
    sweep = torch.logspace(-3, 1, 200, dtype=torch.float64)  # delta from 1e-3 to 10
    return {"delta": delta, "A": float(A), "L": int(L), "K_zoh": K_zoh, "K_euler": K_euler, "K_true": K_true,
            "A_bar_zoh": float(Az), "A_bar_euler": float(Ae), "euler_stable": abs(float(Ae)) <= 1,
            "delta_limit": 2 / abs(A), "sweep": sweep, "sweep_zoh": torch.exp(sweep * A).abs(),
            "sweep_euler": (1 + sweep * A).abs()}


def kernel_figure(state: dict):
    """Draw :func:`kernel_state`: the kernels, and |Abar| over Δ."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    ax = axes[0]
    j = range(state["L"])
    ax.plot(j, state["K_true"].numpy(), color="black", linestyle=":", label="continuous exp(A jΔ) Δ")
    ax.plot(j, state["K_zoh"].numpy(), marker="o", markersize=3, label=f"ZOH (|Abar| = {abs(state['A_bar_zoh']):.3f})")
    ke = state["K_euler"].clamp(-1e3, 1e3).numpy()
    ax.plot(j, ke, marker="x", markersize=3, label=f"Euler (|Abar| = {abs(state['A_bar_euler']):.3f})")
    lim = 1.5 * max(float(state["K_zoh"].abs().max()), float(state["K_true"].abs().max()), 1e-6)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel("lag j")
    ax.set_ylabel("K_j = C Abar^j Bbar")
    verdict = "Euler stable" if state["euler_stable"] else "Euler EXPLODES (clipped)"
    ax.set_title(f"Δ = {state['delta']:.3g}, A = {state['A']:g}: {verdict}", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.loglog(state["sweep"].numpy(), state["sweep_zoh"].numpy(), label="ZOH |exp(Δ A)|")
    ax.loglog(state["sweep"].numpy(), state["sweep_euler"].numpy(), label="Euler |1 + Δ A|")
    ax.axhline(1, color="grey", linestyle=":")
    ax.axvline(state["delta_limit"], color="red", linestyle=":", label=f"Δ = 2/|A| = {state['delta_limit']:.3g}")
    ax.axvline(state["delta"], color="black", label="current Δ")
    ax.set_ylim(1e-4, 1e2)
    ax.set_xlabel("step size Δ")
    ax.set_ylabel("|Abar| (per-step decay)")
    ax.set_title("above 1 the state grows at every step", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def kernel_explorer(log10_delta: float = -1.0, A: float = -2.0, L: int = 32):
    """Sliders for log10 Δ and A over :func:`kernel_figure` (a label in grading mode)."""
    if grading_mode():
        return WidgetsOff()
    controls = {
        "log10_delta": widgets.FloatSlider(value=log10_delta, min=-3.0, max=1.0, step=0.1, description="log10 Δ"),
        "A": widgets.FloatSlider(value=A, min=-10.0, max=-0.1, step=0.1, description="A"),
    }

    def compute(values):
        return kernel_state(values["log10_delta"], values["A"], L)

    return Explorer(controls, compute, kernel_figure, title="The SSM kernel K: ZOH against Euler")


