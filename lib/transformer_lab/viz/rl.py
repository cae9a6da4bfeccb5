"""Lecture 15's figures and widget: the offline data's returns, achieved versus target return,
and a Decision Transformer's episodes on the grid for a chosen target.

* :func:`return_distribution_figure`: a histogram of the offline data's returns, one colour per
  policy that collected them (random, the Q-learner at each p_rand, optimal).
* :func:`achieved_figure`: the Decision Transformer's achieved return against the target (the
  claim, from :func:`transformer_lab.rl.return_conditioning`), the diagonal "achieved = target",
  the data's best return and the behaviour-cloning baseline as horizontal lines.
* :func:`target_explorer`: a slider for the target return over :func:`rollout_figure`: the
  episodes the model plays on the grid (CliffWalking's cliff in black, start and goal marked,
  a red x where an episode fell in), conditioned on that target, with their returns. Asked for
  -100 or less, the model walks into the cliff on purpose: it does what the data did when
  that much return was still to come.
"""

from __future__ import annotations

import ipywidgets as widgets
import torch

from .. import rl
from ..device import grading_mode
from .core import Explorer, WidgetsOff

__all__ = ["grid_shape", "grid_coords", "rollout_state", "rollout_figure", "return_distribution_figure",
           "achieved_figure", "target_explorer"]


def grid_shape(env_id: str) -> tuple:
    """(rows, cols) of a toy-text grid: CliffWalking 4 x 12, FrozenLake 4 x 4, FrozenLake8x8 8 x 8."""
    rl._check_env_id(env_id)
    if env_id.startswith("CliffWalking"):
        return (4, 12)
    return (8, 8) if "8x8" in env_id else (4, 4)


def grid_coords(states, env_id: str = "CliffWalking-v1") -> list:
    """Each state index as its (row, col) on the grid (gymnasium numbers cells row by row)."""
    cols = grid_shape(env_id)[1]
    return [(int(s) // cols, int(s) % cols) for s in states]


def rollout_state(model: "rl.DecisionTransformer", target: float, episodes: int = 3, seed: int = 0) -> dict:
    """What :func:`rollout_figure` draws: ``episodes`` sampled episodes of ``model`` conditioned
    on ``target`` (:func:`transformer_lab.rl.evaluate`), their paths as (row, col) lists (every
    state visited, the final one included) and their returns."""
    ev = rl.evaluate(model, [float(target)], episodes=episodes, seed=seed)
    env_id = getattr(model, "env_id", "CliffWalking-v1")
    paths = [grid_coords(states + [last], env_id)  # every state visited, the last one included
             for (states, _, _), last in zip(ev["trajectories"], ev["final_states"], strict=True)]
    falls = []  # CliffWalking: the cells stepped into at -100 (the agent is then sent to the start)
    moves = {0: (-1, 0), 1: (0, 1), 2: (1, 0), 3: (0, -1)}  # up, right, down, left
    for path, (_, actions, rewards) in zip(paths, ev["trajectories"], strict=True):
        falls.append([(path[t][0] + moves[a][0], path[t][1] + moves[a][1])
                      for t, (a, r) in enumerate(zip(actions, rewards, strict=True)) if r == -100])
    return {"target": float(target), "env_id": env_id, "paths": paths, "falls": falls,
            "returns": ev["returns"][0].tolist(), "achieved": float(ev["achieved"][0]),
            "trajectories": ev["trajectories"]}


def _draw_grid(ax, env_id: str) -> None:
    from matplotlib.patches import Rectangle

    rows, cols = grid_shape(env_id)
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    ax.grid(True, color="0.85")
    ax.set_aspect("equal")
    if env_id.startswith("CliffWalking"):
        for c in range(1, cols - 1):
            ax.add_patch(Rectangle((c - 0.5, rows - 1.5), 1, 1, color="black"))  # the cliff
        ax.text(0, rows - 1, "S", ha="center", va="center", fontsize=12, color="tab:green", weight="bold")
        ax.text(cols - 1, rows - 1, "G", ha="center", va="center", fontsize=12, color="tab:red", weight="bold")


def rollout_figure(state: dict):
    """Draw :func:`rollout_state`: each episode's path on the grid, slightly offset so that
    overlapping paths stay visible; a red x where it fell into the cliff (and was sent back)."""
    import matplotlib.pyplot as plt

    rows, cols = grid_shape(state["env_id"])
    fig, ax = plt.subplots(figsize=(min(12, 0.8 * cols + 2), 0.8 * rows + 1.2))
    _draw_grid(ax, state["env_id"])
    n = len(state["paths"])
    for i, path in enumerate(state["paths"]):
        off = (i - (n - 1) / 2) * 0.12
        xs = [c + off for _, c in path]
        ys = [r + off for r, _ in path]
        for t in range(len(path) - 1):  # no line where a fall into the cliff sent the agent back
            if abs(path[t][0] - path[t + 1][0]) + abs(path[t][1] - path[t + 1][1]) <= 1:
                ax.plot(xs[t:t + 2], ys[t:t + 2], "-", color=f"C{i}", alpha=0.8)
        ax.plot(xs, ys, "o", markersize=3, color=f"C{i}", label=f"return {state['returns'][i]:g}")
        for r, c in state["falls"][i]:
            ax.plot(c + off, r + off, "x", color="tab:red", markersize=9, mew=2)
    ax.set_title(f"target return {state['target']:g}: achieved {state['achieved']:.1f} "
                 f"(mean of {n} episodes)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def return_distribution_figure(data: "rl.OfflineData", bins: int = 40):
    """Histogram of the offline data's returns, stacked by the policy that collected them."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4))
    returns = data.returns
    labels = list(dict.fromkeys(data.sources))
    groups = [returns[torch.tensor([s == name for s in data.sources])].numpy() for name in labels]
    ax.hist(groups, bins=bins, stacked=True, label=labels)
    ax.axvline(float(returns.max()), color="black", linestyle="--", label=f"best {float(returns.max()):g}")
    ax.set_xlabel("return of a trajectory")
    ax.set_ylabel("trajectories")
    ax.set_title(f"{data.env_id}: {data.n_traj} offline trajectories, at most {data.t_max} steps", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def achieved_figure(result: dict):
    """Achieved versus target return from :func:`transformer_lab.rl.return_conditioning` (or any
    dict with ``targets``, ``achieved``, ``data_best`` and optionally ``bc_return``)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    tg, ach = result["targets"].tolist(), result["achieved"].tolist()
    lo, hi = min(tg + ach), max(tg + ach + [result["data_best"]])
    ax.plot([lo, hi], [lo, hi], ":", color="0.5", label="achieved = target")
    ax.plot(tg, ach, "o-", color="tab:blue", label="Decision Transformer")
    ax.axhline(result["data_best"], color="black", linestyle="--", label=f"best return in the data ({result['data_best']:g})")
    if "bc_return" in result:
        ax.axhline(result["bc_return"], color="tab:orange", label=f"behaviour cloning ({result['bc_return']:.0f})")
    ax.set_xlabel("target return (the first return-to-go)")
    ax.set_ylabel("achieved return (mean over episodes)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def target_explorer(model: "rl.DecisionTransformer", target: float = -13.0, episodes: int = 3, seed: int = 0,
                    lowest: float = -400.0, highest: float = 0.0):
    """A slider for the target return over :func:`rollout_figure` (a label in grading mode)."""
    if grading_mode():
        return WidgetsOff()
    controls = {
        "target": widgets.FloatSlider(value=target, min=lowest, max=highest, step=1.0, description="target"),
        "seed": widgets.IntSlider(value=seed, min=0, max=9, description="seed"),
    }

    def compute(values):
        return rollout_state(model, values["target"], episodes, values["seed"])

    return Explorer(controls, compute, rollout_figure, title="Decision Transformer: ask for a return")
