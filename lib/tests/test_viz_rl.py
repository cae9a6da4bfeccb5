"""viz/rl.py: grid coordinates, the rollout state against rl.evaluate, the figures, the
explorer's controls driving its state, grading mode."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from transformer_lab import rl  # noqa: E402
from transformer_lab.viz import rl as vz  # noqa: E402


@pytest.fixture(scope="module")
def setting():
    data = rl.collect_offline_data("CliffWalking-v1", [("random", 6, 1.0), ("optimal", 3, 0.0)], t_max=15, seed=0)
    model, _ = rl.train_policy(data, steps=5, seed=0, n_ctx=3, d_model=16)
    return data, model


def test_grid_coords():
    assert vz.grid_shape("CliffWalking-v1") == (4, 12) and vz.grid_shape("FrozenLake8x8-v1") == (8, 8)
    assert vz.grid_coords([36, 47, 0, 13]) == [(3, 0), (3, 11), (0, 0), (1, 1)]  # start, goal
    assert vz.grid_coords([5, 15], "FrozenLake-v1") == [(1, 1), (3, 3)]
    with pytest.raises(ValueError, match="env_id must be one of"):
        vz.grid_shape("Taxi-v3")


def test_rollout_state_is_the_evaluation(setting):
    _, model = setting
    s = vz.rollout_state(model, -20.0, episodes=2, seed=1)
    ev = rl.evaluate(model, [-20.0], episodes=2, seed=1)
    assert s["trajectories"] == ev["trajectories"] and s["returns"] == ev["returns"][0].tolist()
    for path, (states, _, _), last in zip(s["paths"], ev["trajectories"], ev["final_states"], strict=True):
        assert [r * 12 + c for r, c in path] == states + [last]
    for falls, (_, _, rewards) in zip(s["falls"], ev["trajectories"], strict=True):
        assert len(falls) == rewards.count(-100.0) and all(r == 3 and 1 <= c <= 10 for r, c in falls)
    assert vz.rollout_figure(s).axes


def test_figures(setting):
    data, _ = setting
    fig = vz.return_distribution_figure(data)
    assert len(fig.axes) == 1
    result = {"targets": torch.tensor([-40.0, -13.0]), "achieved": torch.tensor([-38.0, -15.0]),
              "data_best": -13.0, "bc_return": -80.0}
    ax = vz.achieved_figure(result).axes[0]
    assert len(ax.lines) == 4  # diagonal, DT, data best, BC


def test_explorer_controls_drive_state(setting, monkeypatch):
    monkeypatch.delenv("TRANSFORMER_LAB_GRADING", raising=False)
    _, model = setting
    ex = vz.target_explorer(model, episodes=2)
    ex.controls["target"].value = -100.0
    assert ex.state["target"] == -100.0 and ex.renders == 2
    assert ex.state["returns"] == rl.evaluate(model, [-100.0], episodes=2, seed=0)["returns"][0].tolist()


def test_grading_mode_turns_it_off(setting, monkeypatch):
    monkeypatch.setenv("TRANSFORMER_LAB_GRADING", "1")
    w = vz.target_explorer(setting[1])
    assert w.controls == {} and w.figure is None
