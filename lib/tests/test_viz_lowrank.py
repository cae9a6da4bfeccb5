"""viz/lowrank.py (lecture 07): the explorer's state is the library's Performer attention, the
error curve falls, trig features make negative weights where positive ones never do, and
grading mode draws nothing."""

from __future__ import annotations

import ipywidgets as widgets
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from transformer_lab import lowrank as LR  # noqa: E402
from transformer_lab.viz import core  # noqa: E402
from transformer_lab.viz import lowrank as vz  # noqa: E402


@pytest.fixture(scope="module")
def ex():
    return vz.kernel_attention_explorer(n_features=16, length=16, head_dim=8)


def test_explorer_protocol(ex):
    assert isinstance(ex, widgets.VBox) and ex.output in ex.children
    assert set(ex.controls) == {"n_features", "kind", "orthogonal", "seed", "sharpness"}
    assert isinstance(ex.figure, plt.Figure) and len(ex.figure.axes) == 3
    before = ex.renders
    ex.controls["seed"].value = 3
    assert ex.renders == before + 1


def test_state_is_the_library_performer(ex):
    c = ex.controls
    c["n_features"].value, c["kind"].value, c["orthogonal"].value = 64, "positive", False
    c["seed"].value, c["sharpness"].value = 2, 2.0
    st = ex.state
    q, k, v = vz.example_qkv(16, 8, 2.0)
    out, w = LR.performer_attention(q, k, v, 64, generator=torch.Generator().manual_seed(2), orthogonal=False,
                                    need_weights=True)
    torch.testing.assert_close(st["approx"], w[0, 0])
    torch.testing.assert_close(st["exact"], torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, -1)[0, 0])
    assert st["error"] == pytest.approx(float(LR.attention_error(out, q, k, v)))
    assert st["errors"][vz.FEATURE_COUNTS.index(64)] == pytest.approx(st["error"])
    assert st["negative"] == 0.0 and st["min_row_sum"] > 0  # positive features: a proper average
    assert st["errors"][-1] < 0.5 * st["errors"][2]  # m = 512 far better than m = 4


def test_trig_features_make_negative_weights():
    q, k, v = vz.example_qkv(32, 16, 2.0)
    st = vz.kernel_attention_state(q, k, v, 4, "trig", True, seed=0, curve=False)
    assert st["negative"] > 0.05 and "errors" not in st
    pos = vz.kernel_attention_state(q, k, v, 4, "positive", True, seed=0, curve=False)
    assert pos["negative"] == 0.0 and pos["error"] < 1.5 < 5 < st["error"] and st["min_row_sum"] < 0  # trig blows up
    q1, k1, v1 = vz.example_qkv(32, 16, 1.0, seed=0)
    assert torch.equal(q1 * 2.0, q * 1.0)  # sharpness only scales q and k
    fig = vz.plot_kernel_attention([pos, st])
    assert len(fig.axes) == 3
    plt.close(fig)


def test_bad_input_and_grading_mode(monkeypatch):
    with pytest.raises(ValueError, match="n_features must be one of"):
        vz.kernel_attention_explorer(n_features=3)
    with pytest.raises(ValueError, match="kind must be one of"):
        vz.kernel_attention_explorer(kind="cos")
    with pytest.raises(ValueError, match="sharpness must be a positive number"):
        vz.example_qkv(8, 4, 0.0)
    with pytest.raises(ValueError, match="states must hold at least one"):
        vz.plot_kernel_attention([])
    monkeypatch.setenv("TRANSFORMER_LAB_GRADING", "1")
    assert isinstance(vz.kernel_attention_explorer(), core.WidgetsOff)
